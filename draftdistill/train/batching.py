"""Pack prompt + response pairs so that only response positions reach the lm_head.

Prompts are left-padded and responses right-padded, so every response starts in the same column:
the positions that predict response tokens are one contiguous slice, and the [tokens x vocab]
logits (the largest tensor in the step, 49k-152k wide) are computed only there.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch


@dataclass
class ResponseBatch:
    ids: torch.Tensor  # [B, Pmax + Rmax]
    attention: torch.Tensor  # [B, Pmax + Rmax], 1 on prompt and response tokens
    positions: torch.Tensor  # [B, Pmax + Rmax], position ids that ignore the left padding
    prompt_width: int  # Pmax: responses start in this column
    scored: torch.Tensor  # [B, Rmax] bool, True where a real response token is predicted

    @property
    def targets(self) -> torch.Tensor:
        """The response tokens [B, Rmax] (pad where scored is False)."""
        return self.ids[:, self.prompt_width:]

    def to(self, device) -> "ResponseBatch":
        return ResponseBatch(self.ids.to(device), self.attention.to(device), self.positions.to(device),
                             self.prompt_width, self.scored.to(device))


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> ResponseBatch:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    p_width = max(len(p) for p in prompts)
    r_width = max(1, max(len(r) for r in responses))
    ids = torch.full((len(prompts), p_width + r_width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    scored = torch.zeros((len(prompts), r_width), dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        start = p_width - len(p)
        ids[row, start: p_width + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention[row, start: p_width + len(r)] = 1
        scored[row, : len(r)] = True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return ResponseBatch(ids, attention, positions, p_width, scored)


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def response_logits(model, batch: ResponseBatch) -> torch.Tensor:
    """Logits [B, Rmax, V] at the positions that predict each response token."""
    width = batch.scored.shape[1]
    keep = torch.arange(batch.prompt_width - 1, batch.prompt_width - 1 + width, device=batch.ids.device)
    extra = {"logits_to_keep": keep} if _takes_logits_to_keep(type(model)) else {}
    logits = model(input_ids=batch.ids, attention_mask=batch.attention, position_ids=batch.positions,
                   **extra).logits
    if logits.shape[1] != width:  # a model without logits_to_keep returned every position
        logits = logits[:, keep]
    return logits
