"""Position masks and the one reduction every divergence shares."""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("none", "sum", "mean")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def position_mask(mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """A bool mask of the position shape [...]: None keeps every position; 0/1 or bool accepted."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.shape != shape:
        try:
            mask = mask.expand(shape)
        except RuntimeError:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not fit positions "
                             f"{tuple(shape)}") from None
    return mask.to(device) != 0


def reduce_loss(per_position: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Zero the masked positions, then reduce.

    "none": per-position values [...]; "sum": sum over kept positions; "mean": that sum divided by
    the number of kept positions (a token mean), 0 when none is kept. Under gradient
    accumulation or several ranks, use "sum" and divide by the global token count yourself.
    """
    check_reduction(reduction)
    # where, not multiply: 0 * inf would be NaN.
    per_position = torch.where(mask, per_position, 0.0)
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1)
