"""Sampled-token reverse KL: on-policy distillation from one teacher log-prob per token.

The student samples x ~ q; the teacher scores it, log p(x). Then log q(x) - log p(x) is an
unbiased single-sample estimate of KL(q || p), and with the advantage A = log p(x) - log q(x)
(held constant) the REINFORCE gradient E_q[-A * grad log q(x)] is exactly grad KL(q || p),
because E_q[grad log q] = 0. This is the per-token reward of Thinking Machines' "On-Policy
Distillation" (Lu et al., 2025) and the tinker-cookbook recipe, trained with an
importance-sampling or PPO-clipped policy-gradient loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reduce import position_mask, reduce_loss
from .teacher import Teacher, TeacherTokenLogProbs, check_temperature, student_log_probs


def sampled_token_advantage(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """A = log p_teacher(x) - log q_student(x), detached: minus the per-token estimate of
    KL(q || p), used as the reward/advantage of token x."""
    return (teacher_logprobs - student_logprobs).detach()


def check_sampled(old_logprobs: Tensor | None = None, clip: float | None = 0.2,
                  max_weight: float | None = None) -> None:
    if clip is not None and not 0.0 < clip < 1.0:
        raise ValueError(f"sampled_rkl clip must be in (0, 1) or None, got {clip}")
    if max_weight is not None and not max_weight > 0.0:
        raise ValueError(f"sampled_rkl max_weight must be > 0 or None, got {max_weight}")


def sampled_rkl(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
                temperature: float = 1.0, reduction: str = "mean",
                old_logprobs: Tensor | None = None, clip: float | None = 0.2,
                max_weight: float | None = None) -> Tensor:
    """Sampled-token reverse-KL policy-gradient loss.

    teacher: TeacherTokenLogProbs(token_ids [...], logprobs [...]) for the tokens the student
    sampled; the teacher log-probs are taken as given (no temperature is applied to them).
    Per position, with log q = log_softmax(student_logits / T)[token]:

        A     = sg(log p_teacher - log q)                     (sampled_token_advantage)
        ratio = exp(log q - old_logprobs)                     (importance weight)
        loss  = -min(ratio * A, clip(ratio, 1-c, 1+c) * A)    (PPO, clip = c)
        loss  = -ratio * A                                    (clip = None)

    old_logprobs None means on-policy: ratio = exp(log q - sg(log q)), whose value is 1, so the
    loss value is -A = log q - log p (the per-token KL(q||p) estimate) and its gradient is the
    REINFORCE -A * grad log q; clipping is then moot and skipped. max_weight truncates the
    importance weight's value at max_weight (truncated IS) while the gradient still flows as
    weight * grad log q; clipping applies after truncation. Gradient reaches the student logits
    only through log q.
    """
    check_temperature(temperature)
    check_sampled(old_logprobs, clip, max_weight)
    if not isinstance(teacher, TeacherTokenLogProbs):
        raise TypeError(f"'sampled_rkl' needs TeacherTokenLogProbs, got "
                        f"{type(teacher).__name__}")
    shape = student_logits.shape[:-1]
    if teacher.token_ids.shape != shape or teacher.logprobs.shape != shape:
        raise ValueError(f"TeacherTokenLogProbs token_ids {tuple(teacher.token_ids.shape)} and "
                         f"logprobs {tuple(teacher.logprobs.shape)} must be {tuple(shape)}")
    keep = position_mask(mask, shape, student_logits.device)
    logq_all = student_log_probs(student_logits, temperature, keep)
    dtype = logq_all.dtype

    # Masked positions may hold ignore ids (-100) and garbage log-probs: make them harmless.
    ids = torch.where(keep, teacher.token_ids, 0).long()
    logq = logq_all.gather(-1, ids[..., None]).squeeze(-1)
    teacher_lp = torch.where(keep, teacher.logprobs.detach().to(dtype), 0.0)
    adv = sampled_token_advantage(logq, teacher_lp)

    if old_logprobs is None:
        log_ratio = torch.zeros_like(logq)
    else:
        if old_logprobs.shape != shape:
            raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} must be {tuple(shape)}")
        old = torch.where(keep, old_logprobs.detach().to(dtype), 0.0)
        log_ratio = logq.detach() - old
    loss = clipped_policy_loss(logq, adv, log_ratio, clip if old_logprobs is not None else None, max_weight)
    return reduce_loss(loss, keep, reduction)


def clipped_policy_loss(logq: Tensor, advantage: Tensor, log_ratio: Tensor, clip: float | None,
                        max_weight: float | None) -> Tensor:
    """Per-token -min(ratio * A, clip(ratio, 1-c, 1+c) * A) (or -ratio * A when clip is None),
    where log_ratio = sg(log q) - old log-probs (zeros on-policy) and max_weight truncates the
    ratio's value. Shared by sampled_rkl, the OPD objectives and the sampled-RKL kernel."""
    if max_weight is not None:
        log_ratio = log_ratio.clamp(max=math.log(max_weight))
    # Value exp(log_ratio); gradient ratio * grad log q. Built in log-space so a large
    # log-ratio cannot make inf / inf.
    ratio = torch.exp(logq - logq.detach() + log_ratio)
    loss = -ratio * advantage
    if clip is not None:
        loss = torch.maximum(loss, -ratio.clamp(1 - clip, 1 + clip) * advantage)
    return loss
