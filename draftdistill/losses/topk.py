"""Divergences from the teacher's top-k only, with the rest of the mass kept in a tail bucket.

A serving teacher returns its top-k log-probs, not V of them. Dropping the rest and
renormalising changes the objective (and top-k reverse KL can collapse onto the k ids); keeping
the missing mass as one extra bucket gives a proper distribution on K+1 outcomes for both sides:

    p_bucket = [p_{i_1}, ..., p_{i_K}, 1 - sum_k p_{i_k}]
    q_bucket = [q_{i_1}, ..., q_{i_K}, 1 - sum_k q_{i_k}]

Any divergence D on the buckets is <= D(p, q) on the vocabulary (data processing inequality)
and equals it when K = V.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .divergences import (check_beta, jsd_from_log_probs, kl_from_log_probs,
                          tvd_from_log_probs)
from .reduce import position_mask, reduce_loss
from .teacher import (LOG_ZERO, Teacher, TeacherLogProbs, TeacherTopK, check_temperature,
                       finite_log, student_log_probs, teacher_log_probs)

BASES = {
    "fkl": lambda logp, logq, beta: kl_from_log_probs(logp, logq),
    "rkl": lambda logp, logq, beta: kl_from_log_probs(logq, logp),
    "jsd": lambda logp, logq, beta: jsd_from_log_probs(logp, logq, beta),
    "tvd": lambda logp, logq, beta: tvd_from_log_probs(logp, logq),
}


def tail_buckets(logq: Tensor, ids: Tensor, teacher_top: Tensor) -> tuple[Tensor, Tensor]:
    """Collapse p and q onto K+1 buckets; returns (log p_bucket, log q_bucket), [..., K+1].

    logq: student log-probs [..., V]; ids: Long [..., K]; teacher_top: teacher log-probs at ids.

    Both tails get the same tiny floor, tail + (K+1)*eps(dtype). That is the resolution of a tail
    computed as 1 - sum(top-k): below it the teacher's tail is rounding noise, and a tail of
    exactly 0 would make the reverse direction infinite. Flooring both sides equally keeps K = V
    exact (both tails are then the floor) and the gradient smooth.
    """
    K = ids.shape[-1]
    log_floor = math.log((K + 1) * torch.finfo(logq.dtype).eps)
    floor = torch.full_like(teacher_top[..., :1], log_floor)

    # Teacher tail, log(1 - sum exp(top) + floor); -expm1 keeps 1 - s accurate when s ~ 1.
    top_mass = teacher_top.logsumexp(-1, keepdim=True).clamp(max=0.0)
    p_tail = torch.log(-torch.expm1(top_mass) + math.exp(log_floor))

    # Student tail, logsumexp over the non-top-k entries: no cancellation, unlike 1 - sum.
    # The top-k entries are filled with LOG_ZERO, not -inf, so an empty tail (K = V) gives a
    # finite logsumexp and a finite gradient (all -inf would give NaN).
    q_rest = logq.scatter(-1, ids, LOG_ZERO).logsumexp(-1, keepdim=True)
    q_tail = torch.logaddexp(q_rest, floor)

    logp_b = torch.cat([teacher_top, p_tail], dim=-1)
    logq_b = torch.cat([logq.gather(-1, ids), q_tail], dim=-1)
    return logp_b, logq_b


def check_topk(k: int = 20, base: str = "fkl", beta: float = 0.5) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"topk_tail k must be an int >= 1, got {k!r}")
    if base not in BASES:
        raise ValueError(f"topk_tail base must be one of {sorted(BASES)}, got {base!r}")
    check_beta(beta)


def topk_tail(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
              temperature: float = 1.0, reduction: str = "mean", k: int = 20,
              base: str = "fkl", beta: float = 0.5) -> Tensor:
    """`base` divergence ("fkl", "rkl", "jsd" with `beta`, "tvd") on the teacher's top-k tokens
    plus one tail bucket (see the module docstring).

    Teacher forms:
    - logits Tensor or TeacherLogProbs: the top-`k` of the tempered teacher are taken here
      (k is capped at V);
    - TeacherTopK: its ids and log-probs are taken as given and `k` is unused. Top-k log-probs
      cannot be re-tempered exactly (the normaliser needs the whole vocabulary), so
      `temperature` then applies to the student only: ask the teacher for log-probs at the
      temperature you train at.
    """
    check_temperature(temperature)
    check_topk(k, base, beta)
    V = student_logits.shape[-1]
    keep = position_mask(mask, student_logits.shape[:-1], student_logits.device)
    logq = student_log_probs(student_logits, temperature, keep)

    if isinstance(teacher, TeacherTopK):
        ids, top = teacher.ids, teacher.logprobs.detach()
        if ids.shape != top.shape or ids.shape[:-1] != logq.shape[:-1]:
            raise ValueError(f"TeacherTopK ids {tuple(ids.shape)} and logprobs "
                             f"{tuple(top.shape)} must both be {tuple(logq.shape[:-1])} + (K,)")
        K = ids.shape[-1]
        if K > V:
            raise ValueError(f"TeacherTopK has K={K} > vocabulary {V}")
        # Masked rows may hold padding ids (-100) or garbage: give them valid distinct ids and a
        # finite, sub-normalised distribution so gather and the tail stay finite.
        pad_ids = torch.arange(K, device=ids.device).expand_as(ids)
        ids = torch.where(keep[..., None], ids, pad_ids).long()
        top = torch.where(keep[..., None], top.to(logq.dtype), -math.log(K + 1))
        top = finite_log(top)
    elif isinstance(teacher, (Tensor, TeacherLogProbs)):
        logp = teacher_log_probs(teacher, temperature, V, keep, logq.dtype)
        top, ids = logp.topk(min(k, V), dim=-1)
    else:
        raise TypeError(f"'topk_tail' needs a logits Tensor, TeacherLogProbs or TeacherTopK, "
                        f"got {type(teacher).__name__}")

    logp_b, logq_b = tail_buckets(logq, ids, top)
    return reduce_loss(BASES[base](logp_b, logq_b, beta), keep, reduction)
