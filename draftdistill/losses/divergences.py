"""Full-vocabulary divergences between the teacher p and the student q.

Two layers:
- `*_from_log_probs(logp, logq)`: the math, on finite log-probs [..., V], one value per position.
  `topk.py` reuses them on K+1 buckets, and a fused kernel must match them.
- `fkl`, `rkl`, ...: the public functions with the shared signature
  `fn(student_logits, teacher, mask=None, temperature=1.0, reduction="mean", **params)`.

Acceptance of one drafted token is alpha = sum_v min(p_v, q_v) = 1 - TVD(p, q).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reduce import position_mask, reduce_loss
from .teacher import Teacher, TeacherLogProbs, student_log_probs, teacher_log_probs

# ---------------------------------------------------------------------------------------------
# The math: finite log-probs in, one value per position out.
# ---------------------------------------------------------------------------------------------


def kl_from_log_probs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def tvd_from_log_probs(logp: Tensor, logq: Tensor) -> Tensor:
    """TVD(p, q) = 0.5 * sum_v |p_v - q_v|.

    Summing |p - q| rather than computing 1 - sum min(p, q) keeps precision when p ~ q and
    gives exactly 0 at p == q.
    """
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def acceptance_from_log_probs(logp: Tensor, logq: Tensor) -> Tensor:
    """alpha = sum_v min(p_v, q_v): probability that a token drafted from q is accepted by p."""
    return torch.minimum(logp.exp(), logq.exp()).sum(-1)


def jsd_from_log_probs(logp: Tensor, logq: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD (GKD / TRL): beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q.

    beta == 0 is KL(p||q) and beta == 1 is KL(q||p), by the GKD/TRL convention. (The formula
    itself goes to 0 at both ends; the conventions are its normalised limits,
    JSD/beta -> KL(p||q) as beta -> 0 and JSD/(1-beta) -> KL(q||p) as beta -> 1.)
    """
    if beta == 0.0:
        return kl_from_log_probs(logp, logq)
    if beta == 1.0:
        return kl_from_log_probs(logq, logp)
    # log m in log-space: never forms p or q where they underflow.
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * kl_from_log_probs(logp, logm) + (1 - beta) * kl_from_log_probs(logq, logm)


def skew_kl_from_log_probs(log_a: Tensor, log_b: Tensor, alpha: float) -> Tensor:
    """Skew KL (DistiLLM): KL(a || alpha*a + (1-alpha)*b); alpha = 0 is KL(a || b) exactly."""
    if alpha == 0.0:
        return kl_from_log_probs(log_a, log_b)
    log_mix = torch.logaddexp(log_a + math.log(alpha), log_b + math.log1p(-alpha))
    return kl_from_log_probs(log_a, log_mix)


def neg_log_acceptance_from_log_probs(logp: Tensor, logq: Tensor, eps: float = 1e-8) -> Tensor:
    """-log(alpha) = -log(1 - TVD), alpha clamped at eps.

    log1p(-TVD) is accurate when alpha ~ 1 and is >= 0 exactly (TVD >= 0).
    """
    tvd = tvd_from_log_probs(logp, logq)
    return -torch.log1p(-tvd.clamp(max=1 - eps))


def lk_from_log_probs(logp: Tensor, logq: Tensor, eta: float = 3.0,
                      mask: Tensor | None = None, batch_alpha: bool = False) -> Tensor:
    """LK^lambda: lambda * KL(p||q) + (1 - lambda) * TVD(p, q), lambda = exp(-eta * sg[alpha]).

    alpha is the position's acceptance (or, with batch_alpha, the mean over the kept positions in
    `mask`); sg = stop-gradient, so lambda only sets the blend.
    """
    kl = kl_from_log_probs(logp, logq)
    tvd = tvd_from_log_probs(logp, logq)
    alpha = (1 - tvd).clamp(0, 1).detach()
    if batch_alpha:
        kept = torch.ones_like(alpha, dtype=torch.bool) if mask is None else mask
        alpha = torch.where(kept, alpha, 0.0).sum() / kept.sum().clamp_min(1)
    lam = torch.exp(-eta * alpha)
    return lam * kl + (1 - lam) * tvd


# ---------------------------------------------------------------------------------------------
# Parameter checks (also called by the registry when a divergence is configured).
# ---------------------------------------------------------------------------------------------


def check_beta(beta: float = 0.5) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")


def check_skew(alpha: float = 0.1) -> None:
    # alpha = 1 would make the loss identically 0: a configuration error, not a divergence.
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")


def check_nla(eps: float = 1e-8) -> None:
    if not 0.0 < eps < 1.0:
        raise ValueError(f"neg_log_acceptance eps must be in (0, 1), got {eps}")


def check_lk(eta: float = 3.0, batch_alpha: bool = False) -> None:
    if not eta >= 0.0:
        raise ValueError(f"lk eta must be >= 0, got {eta}")


# ---------------------------------------------------------------------------------------------
# Public divergences: same signature for all.
# ---------------------------------------------------------------------------------------------


def full_vocab_log_probs(name: str, student_logits: Tensor, teacher: Teacher,
                         mask: Tensor | None, temperature: float):
    """(log q, log p, bool mask) for a divergence that needs the teacher's full distribution."""
    if not isinstance(teacher, (Tensor, TeacherLogProbs)):
        raise TypeError(
            f"'{name}' needs the teacher's full-vocabulary distribution (a logits Tensor or "
            f"TeacherLogProbs), got {type(teacher).__name__}; use 'topk_tail' for TeacherTopK "
            f"or 'sampled_rkl' for TeacherTokenLogProbs")
    keep = position_mask(mask, student_logits.shape[:-1], student_logits.device)
    logq = student_log_probs(student_logits, temperature, keep)
    logp = teacher_log_probs(teacher, temperature, student_logits.shape[-1], keep, logq.dtype)
    if logp.shape != logq.shape:
        raise ValueError(f"teacher shape {tuple(logp.shape)} != student shape "
                         f"{tuple(logq.shape)}")
    return logq, logp, keep


def fkl(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
        temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Forward KL, KL(p || q) = sum_v p_v (log p_v - log q_v). Mode-covering; the usual
    distillation / EAGLE soft cross-entropy up to the teacher's entropy."""
    logq, logp, keep = full_vocab_log_probs("fkl", student_logits, teacher, mask, temperature)
    return reduce_loss(kl_from_log_probs(logp, logq), keep, reduction)


def rkl(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
        temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Reverse KL, KL(q || p) = sum_v q_v (log q_v - log p_v). Mode-seeking.

    A token with p_v = 0 and q_v > 0 makes the true value infinite; log 0 is taken as LOG_ZERO
    (-1e4), so it is large and finite instead.
    """
    logq, logp, keep = full_vocab_log_probs("rkl", student_logits, teacher, mask, temperature)
    return reduce_loss(kl_from_log_probs(logq, logp), keep, reduction)


def jsd(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
        temperature: float = 1.0, reduction: str = "mean", beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence, GKD convention (Agarwal et al., ICLR 2024; TRL's
    `GKDTrainer.generalized_jsd_loss`):

        m = beta * p + (1 - beta) * q
        JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)      for 0 < beta < 1

    beta = 0 is defined as KL(p||q) (fkl) and beta = 1 as KL(q||p) (rkl), as TRL and GKD do:
    these are the normalised limits, the formula itself tends to 0 there. beta = 0.5 is the
    symmetric JSD.
    """
    check_beta(beta)
    logq, logp, keep = full_vocab_log_probs("jsd", student_logits, teacher, mask, temperature)
    return reduce_loss(jsd_from_log_probs(logp, logq, beta), keep, reduction)


def tvd(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
        temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Total variation distance, TVD = 0.5 * sum_v |p_v - q_v| = 1 - alpha (acceptance).

    Minimising it maximises acceptance directly, but its gradient is small when p and q barely
    overlap (cold start); see neg_log_acceptance and lk.
    """
    logq, logp, keep = full_vocab_log_probs("tvd", student_logits, teacher, mask, temperature)
    return reduce_loss(tvd_from_log_probs(logp, logq), keep, reduction)


def skew_fkl(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
             temperature: float = 1.0, reduction: str = "mean", alpha: float = 0.1) -> Tensor:
    """Skew forward KL (DistiLLM SKL, Ko et al., ICML 2024): KL(p || alpha*p + (1-alpha)*q).

    Mixing a little p into q bounds the log-ratio by -log(alpha), which stabilises the gradient.
    alpha = 0 is fkl exactly.
    """
    check_skew(alpha)
    logq, logp, keep = full_vocab_log_probs("skew_fkl", student_logits, teacher, mask,
                                            temperature)
    return reduce_loss(skew_kl_from_log_probs(logp, logq, alpha), keep, reduction)


def skew_rkl(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
             temperature: float = 1.0, reduction: str = "mean", alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM SRKL): KL(q || (1-alpha)*p + alpha*q). alpha = 0 is rkl."""
    check_skew(alpha)
    logq, logp, keep = full_vocab_log_probs("skew_rkl", student_logits, teacher, mask,
                                            temperature)
    return reduce_loss(skew_kl_from_log_probs(logq, logp, alpha), keep, reduction)


def neg_log_acceptance(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
                       temperature: float = 1.0, reduction: str = "mean",
                       eps: float = 1e-8) -> Tensor:
    """Negative log acceptance, -log(alpha) = -log(sum_v min(p_v, q_v)) = -log(1 - TVD).

    This is LK^alpha of the LK-losses paper (Samarin et al., arXiv:2602.23881). Its gradient is
    grad(TVD) / alpha: TVD's direction with a scale that grows as overlap shrinks, so it trains
    from a cold start where plain TVD stalls. alpha is clamped at eps to stay finite.
    """
    check_nla(eps)
    logq, logp, keep = full_vocab_log_probs("neg_log_acceptance", student_logits, teacher, mask,
                                            temperature)
    return reduce_loss(neg_log_acceptance_from_log_probs(logp, logq, eps), keep, reduction)


def lk(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
       temperature: float = 1.0, reduction: str = "mean", eta: float = 3.0,
       batch_alpha: bool = False) -> Tensor:
    """LK^lambda, the hybrid LK loss of "LK Losses: Direct Acceptance Rate Optimization for
    Speculative Decoding" (Samarin, Krutikov, Shevtsov, Skvortsov, Fisin, Golubev;
    arXiv:2602.23881, 2026):

        L = lambda * KL(p || q) + (1 - lambda) * TVD(p, q),   lambda = exp(-eta * sg[alpha])
        alpha = sum_v min(p_v, q_v) = 1 - TVD,  sg = stop-gradient

    While the drafter is poor (alpha small) lambda ~ 1 and KL's strong gradient leads; as alpha
    grows the loss moves to TVD, i.e. to acceptance itself. Gradient: lambda * grad KL +
    (1 - lambda) * grad TVD (lambda is a constant for autograd). eta defaults to 3, as in
    vLLM speculators' `lk_hybrid` loss (docs.vllm.ai/projects/speculators, "Loss Functions":
    lambda * KL + (1 - lambda) * TV with lambda = exp(-3 * alpha)).

    alpha is per position by default; `batch_alpha=True` uses one lambda from the mean alpha over
    the kept positions (a batch-level schedule). The companion LK^alpha loss is
    `neg_log_acceptance`.
    """
    check_lk(eta, batch_alpha)
    logq, logp, keep = full_vocab_log_probs("lk", student_logits, teacher, mask, temperature)
    per_position = lk_from_log_probs(logp, logq, eta, mask=keep, batch_alpha=batch_alpha)
    return reduce_loss(per_position, keep, reduction)


def acceptance_rate(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
                    temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Expected acceptance of one drafted token, alpha = sum_v min(p_v, q_v) (a metric; the
    graph is kept so it can be differentiated, but it needs no gradient)."""
    logq, logp, keep = full_vocab_log_probs("acceptance_rate", student_logits, teacher, mask,
                                            temperature)
    return reduce_loss(acceptance_from_log_probs(logp, logq), keep, reduction)
