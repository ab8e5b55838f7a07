"""The forms a teacher can take, and their conversion to log-probabilities.

A divergence compares the student's distribution q (the drafter) with the teacher's p (the
target). How much of p we have depends on where the teacher ran:

- a plain Tensor [..., V]: teacher logits (an in-process target forward);
- `TeacherLogProbs`: normalised log-probs over the full vocabulary [..., V];
- `TeacherTopK`: only the teacher's top-k log-probs (a server's `top_logprobs`);
- `TeacherTokenLogProbs`: the log-prob of one sampled token per position (a server scoring the
  student's own samples), enough for the sampled-token estimators only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

# log(0) stand-in. A filtered teacher (top-p, -inf logits) has exact zeros; keeping log-probs
# finite means 0 * log 0 terms are 0 and never inf - inf or 0 * inf = NaN, forward or backward.
# exp(-1e4) is exactly 0 in float32 and float64, so no finite probability is changed.
LOG_ZERO = -1.0e4


@dataclass(frozen=True)
class TeacherLogProbs:
    """Teacher log-probabilities over the full vocabulary, [..., V], already normalised."""

    logprobs: Tensor


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's top-k tokens: `ids` Long [..., K] and their `logprobs` [..., K].

    The log-probs are normalised over the FULL vocabulary, so exp(logprobs).sum(-1) <= 1 and the
    rest, 1 - sum, is the teacher's mass outside the top-k (the tail). Ids are assumed distinct.
    """

    ids: Tensor
    logprobs: Tensor


@dataclass(frozen=True)
class TeacherTokenLogProbs:
    """The teacher's log-prob `logprobs` [...] of one token `token_ids` Long [...] per position."""

    token_ids: Tensor
    logprobs: Tensor


Teacher = Union[Tensor, TeacherLogProbs, TeacherTopK, TeacherTokenLogProbs]


def check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def finite_log(logp: Tensor) -> Tensor:
    """Replace -inf log-probs (exact zeros) by LOG_ZERO; finite values pass through unchanged."""
    return torch.where(torch.isneginf(logp), LOG_ZERO, logp)


def _keep_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    # Masked rows become all-zero logits (a uniform distribution) *before* any math, so inf/NaN
    # in padding can reach neither the value nor the gradient; torch.where sends zero gradient
    # to the rows it drops.
    return x if mask is None else torch.where(mask[..., None], x, 0.0)


def student_log_probs(student_logits: Tensor, temperature: float = 1.0,
                      mask: Tensor | None = None) -> Tensor:
    """log q = log_softmax(student_logits / T) in float32 (float64 kept), masked rows uniform."""
    check_temperature(temperature)
    x = _keep_rows(student_logits.to(compute_dtype(student_logits)), mask)
    return finite_log(F.log_softmax(x / temperature, dim=-1))


def teacher_log_probs(teacher: Teacher, temperature: float, V: int, mask: Tensor | None = None,
                      dtype: torch.dtype | None = None) -> Tensor:
    """Detached teacher log-probs [..., V] from a full-vocabulary teacher form.

    Logits: log_softmax(logits / T). TeacherLogProbs: re-tempered as log_softmax(logprobs / T),
    which equals log_softmax(logits / T) for the logits they came from (identity at T = 1).
    TeacherTopK and TeacherTokenLogProbs do not determine p over the vocabulary: TypeError.
    """
    check_temperature(temperature)
    if isinstance(teacher, TeacherLogProbs):
        x = teacher.logprobs
    elif isinstance(teacher, Tensor):
        x = teacher
    else:
        raise TypeError(
            f"a full-vocabulary teacher (logits Tensor or TeacherLogProbs) is needed, got "
            f"{type(teacher).__name__}")
    if x.shape[-1] != V:
        raise ValueError(f"teacher vocabulary {x.shape[-1]} != student vocabulary {V}")
    x = _keep_rows(x.detach().to(dtype or compute_dtype(x)), mask)
    return finite_log(F.log_softmax(x / temperature, dim=-1))
