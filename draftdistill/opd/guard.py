"""Refuse (or loudly flag) a student/teacher pair that would score different text than it samples.

Distillation compares the two models id by id on the same response. It goes silently wrong when
the pair disagrees on anything around those ids: the vocabulary, the chat template that wraps the
prompt, the stop tokens, the special tokens. (A public recipe rendered the teacher's prompt with
the wrong renderer and biased the teacher's log-probs by +0.29 nats/token without any error.)

`check_pair` runs on tokenizers and configs only, before any weights are loaded:
- vocabulary and special-token ids must match (always an error: the losses would be meaningless);
- the logit width (config vocab_size) must match (always an error);
- the chat templates must render a probe conversation to the same ids, and the stop-token sets must
  match: an error with guard="error" (the default), a loud warning with guard="warn", in which case
  each model still gets its own template (the trainer renders the teacher's prompt with the
  teacher's tokenizer) and the loss masks are built from the union of both stop sets.
`loss_token_mask` drops special tokens (except stop tokens, whose placement is learned) from the loss.
"""
from __future__ import annotations

import warnings

import torch

from draftdistill.data import encode_prompt
from draftdistill.data.prompts import Prompt
from draftdistill.models import TokenizerMismatchError, check_tokenizers_match

GUARD_MODES = ("error", "warn")

PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 + 4?"},
]


class TemplateMismatchError(TokenizerMismatchError):
    """Student and teacher render prompts or stop generation differently."""


def render(tokenizer, messages: list[dict]) -> list[int]:
    """The ids a model sees for `messages` plus its generation prompt (the trainer's own path)."""
    try:
        return encode_prompt(tokenizer, Prompt(messages))[0].tolist()
    except Exception:  # noqa: BLE001 - some templates refuse a system turn: probe without it
        return encode_prompt(tokenizer, Prompt([m for m in messages if m["role"] != "system"]))[0].tolist()


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def template_problems(student_tok, teacher_tok, student_stop: list[int], teacher_stop: list[int],
                      probes: list[list[dict]] = (PROBE,)) -> list[str]:
    """Human-readable differences in chat template and stop tokens (empty when the pair agrees)."""
    problems = []
    has_s, has_t = bool(getattr(student_tok, "chat_template", None)), bool(getattr(teacher_tok, "chat_template", None))
    if has_s != has_t:
        problems.append(f"chat template: the student {'has' if has_s else 'has none'}, the teacher "
                        f"{'has' if has_t else 'has none'}")
    for messages in probes:
        a, b = render(student_tok, messages), render(teacher_tok, messages)
        if a != b:
            i = _first_difference(a, b)
            problems.append(
                f"chat template renders the probe differently from token {i}: student "
                f"{student_tok.decode(a[i:i + 8])!r} vs teacher {teacher_tok.decode(b[i:i + 8])!r}")
            break
    if sorted(student_stop) != sorted(teacher_stop):
        problems.append(f"stop tokens differ: student {sorted(student_stop)}, teacher {sorted(teacher_stop)}")
    return problems


def check_pair(student_tok, teacher_tok, student_stop: list[int], teacher_stop: list[int],
               student_vocab: int | None = None, teacher_vocab: int | None = None, mode: str = "error",
               probes: list[list[dict]] = (PROBE,), name: str = "teacher") -> list[str]:
    """Raise on a pair that cannot be distilled; raise or warn on template/EOS differences.

    Returns the list of (warned) problems; empty when the pair fully agrees.
    """
    if mode not in GUARD_MODES:
        raise ValueError(f"guard must be one of {GUARD_MODES}, got {mode!r}")
    check_tokenizers_match(teacher_tok, student_tok, names=(name, "student"))
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        raise TokenizerMismatchError(f"logit sizes differ: student vocab_size {student_vocab}, "
                                     f"{name} vocab_size {teacher_vocab}")
    problems = template_problems(student_tok, teacher_tok, student_stop, teacher_stop, probes)
    if problems and mode == "error":
        raise TemplateMismatchError(
            f"student and {name} disagree: " + "; ".join(problems) +
            ". Teacher log-probs would be biased. Fix the templates, or set guard=warn to train anyway "
            "(each model then sees its own template).")
    for problem in problems:
        warnings.warn(f"\n{'!' * 72}\nOPD GUARD: student and {name} disagree: {problem}\n"
                      f"Training continues because guard=warn; teacher log-probs may be biased.\n{'!' * 72}",
                      stacklevel=2)
    return problems


def loss_token_mask(targets: torch.Tensor, scored: torch.Tensor, special_ids, keep_ids) -> torch.Tensor:
    """scored & not a special token; stop tokens (`keep_ids`) stay in the loss."""
    drop = sorted(set(int(i) for i in special_ids) - set(int(i) for i in keep_ids))
    if not drop:
        return scored.clone()
    return scored & ~torch.isin(targets, torch.tensor(drop, device=targets.device))
