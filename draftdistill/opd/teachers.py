"""Who scores a response, and what it is shown: routing (MOPD), privileged context (OPSD), EMA.

- Routing: each prompt names its teacher through a field of the prompt file (`route_field`);
  rows are scored by their own teacher and the scores merged back into one [B, R] batch.
- Privileged context: the teacher (often the student itself) sees a richer prompt than the
  student: a worked reference solution (OPSD), a "be concise" instruction (CRISP), or a
  verifier's feedback on the student's own attempt (SDPO). The response tokens stay the same, so
  the scores line up with the student's positions.
- Self-teacher weights: frozen (the initial student), live (the current student), or an EMA.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from draftdistill.data.prompts import Prompt

PRIVILEGED = {
    "reference": "{question}\n\nA correct worked solution, for your eyes only (answer in your own words, "
                 "do not mention it):\n{reference}",
    "concise": "{question}\n\nBe concise: give the shortest response that is still complete and correct.",
    "feedback": "{question}\n\n{feedback} Take this feedback into account in your answer.",
}
PRIVILEGED_KINDS = ("none", *PRIVILEGED)
SELF_TEACHERS = ("frozen", "live", "ema")


def privileged_prompt(prompt: Prompt, kind: str, template: str = "", feedback: str = "") -> Prompt:
    """The prompt the teacher sees: the last user turn rewritten with the privileged context."""
    if kind == "none":
        return prompt
    if kind not in PRIVILEGED:
        raise ValueError(f"privileged must be one of {PRIVILEGED_KINDS}, got {kind!r}")
    if kind == "reference" and not prompt.reference:
        raise ValueError("privileged=reference needs prompts with a reference answer")
    last = max(i for i, m in enumerate(prompt.messages) if m["role"] == "user")
    text = (template or PRIVILEGED[kind]).format(question=prompt.messages[last]["content"],
                                                 reference=prompt.reference or "", feedback=feedback)
    messages = [dict(m) for m in prompt.messages]
    messages[last]["content"] = text
    return Prompt(messages, prompt.reference, prompt.meta)


def attach_field(prompts: list[Prompt], source: str, field: str) -> list[Prompt]:
    """Copy `field` of each row of a .jsonl/.json prompt file into prompt.meta (for routing).

    load_prompts keeps file order for a file path, so rows and prompts pair up one to one.
    """
    path = Path(source).expanduser()
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        raise ValueError(f"route_field={field!r} needs a .jsonl or .json prompt file, got {source!r}")
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        if field not in row:
            raise ValueError(f"{path}: row {i + 1} has no {field!r} field to route on")
        prompt.meta[field] = str(row[field])
    return prompts


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model).eval()
    twin.requires_grad_(False)
    return twin


@torch.no_grad()
def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """dst's parameters := src's (same architecture; plain, or sharded the same way by FSDP)."""
    for mine, theirs in zip(dst.parameters(), src.parameters()):
        mine.copy_(theirs.detach().to(mine.dtype))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for shadow, live in zip(ema.parameters(), model.parameters()):
        shadow.mul_(decay).add_(live.detach().to(shadow.dtype), alpha=1 - decay)
