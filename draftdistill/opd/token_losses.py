"""Per-token loss primitives the general-OPD objectives need beyond draftdistill.losses.

All take student logits [B, R, V] (or log-probs [B, R]) and return one value per position
[B, R] (masked positions 0); the trainer sums them and divides by the step's loss tokens.
"""
from __future__ import annotations


import torch
from torch import Tensor

from draftdistill.losses import TeacherTokenLogProbs, TeacherTopK, get_divergence, student_log_probs
from draftdistill.losses.sampled import clipped_policy_loss
from draftdistill.losses.teacher import teacher_log_probs


def token_log_probs(student_logits: Tensor, targets: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """log q(target) [B, R] with gradient; masked positions give 0-safe values."""
    logq = student_log_probs(student_logits, temperature, mask)
    return logq.gather(-1, torch.where(mask, targets, 0)[..., None]).squeeze(-1)


def policy_gradient_loss(logq: Tensor, advantage: Tensor, mask: Tensor, old_logprobs: Tensor | None = None,
                         clip: float | None = 0.2, max_weight: float | None = None) -> Tensor:
    """REINFORCE / PPO-clip loss for a given (detached) per-token advantage, [B, R].

    Same convention as losses.sampled_rkl (which is this with A = log p_teacher - log q):
    ratio = exp(log q - old) (value 1 and plain REINFORCE when old is None or NaN),
    loss = -min(ratio * A, clip(ratio, 1-c, 1+c) * A); max_weight truncates the ratio's value.
    """
    advantage = torch.where(mask, advantage.detach(), 0.0)
    if old_logprobs is None:
        log_ratio = torch.zeros_like(logq)
    else:
        old = torch.where(torch.isnan(old_logprobs) | ~mask, logq.detach(), old_logprobs.to(logq.dtype))
        log_ratio = logq.detach() - old
    loss = clipped_policy_loss(logq, advantage, log_ratio, clip if old_logprobs is not None else None, max_weight)
    return torch.where(mask, loss, 0.0)


def future_rewards(rewards: Tensor, mask: Tensor, gamma: float = 1.0, normalise: bool = True,
                   include_current: bool = False) -> Tensor:
    """MiniLLM's long-term reward at each position t of each row, [B, R]:

        R_t = sum_{t' >= t + s} gamma^(t' - t - s) r_t'          s = 0 if include_current else 1
        normalise: R_t / sum_{t' >= t + s} gamma^(t' - t - s)     (length normalisation; gamma = 1
                                                                   gives MiniLLM's mean of future rewards)
    Positions with no future token get 0. Only masked-in rewards count (masked tokens are skipped
    but do not break the discounting chain).
    """
    r = torch.where(mask, rewards, 0.0)
    weight = mask.to(r.dtype)
    total, count = torch.zeros_like(r[:, 0]), torch.zeros_like(r[:, 0])
    sums, counts = torch.zeros_like(r), torch.zeros_like(r)
    for t in range(r.shape[1] - 1, -1, -1):
        if include_current:
            total, count = r[:, t] + gamma * total, weight[:, t] + gamma * count
            sums[:, t], counts[:, t] = total, count
        else:
            sums[:, t], counts[:, t] = total, count
            total, count = r[:, t] + gamma * total, weight[:, t] + gamma * count
    if normalise:
        return torch.where(counts > 0, sums / counts.clamp_min(1e-12), 0.0)
    return sums


def teacher_entropy(teacher, temperature: float, vocab: int, mask: Tensor) -> Tensor:
    """Teacher entropy per position [B, R]. Logits: exact. TeacherTopK: entropy of the top-k plus
    one tail bucket (a lower bound on the true entropy)."""
    if isinstance(teacher, TeacherTopK):
        logp = teacher.logprobs.float()
        tail = (1 - logp.exp().sum(-1)).clamp_min(0.0)
        h = -(logp.exp() * logp).sum(-1) - tail * tail.clamp_min(1e-30).log()
        return torch.where(mask, h, 0.0)
    logp = teacher_log_probs(teacher, temperature, vocab, mask)
    return torch.where(mask, -(logp.exp() * logp).sum(-1), 0.0)


def _per_token(name: str, student_logits: Tensor, teacher, mask: Tensor, temperature: float, **params) -> Tensor:
    return get_divergence(name, **params)(student_logits, teacher, mask, temperature=temperature, reduction="none")


def kl_pair(teacher, k: int):
    """(forward, reverse) per-token KL specs for this teacher form: full-vocabulary for logits,
    top-k + tail buckets for TeacherTopK."""
    if isinstance(teacher, TeacherTopK):
        return ("topk_tail", {"base": "fkl", "k": k}), ("topk_tail", {"base": "rkl", "k": k})
    return ("fkl", {}), ("rkl", {})


def aopd_loss(student_logits: Tensor, teacher_dist, teacher_token: TeacherTokenLogProbs, mask: Tensor,
              temperature: float = 1.0, k: int = 20, old_logprobs: Tensor | None = None,
              clip: float | None = 0.2) -> tuple[Tensor, Tensor]:
    """AOPD gate per sampled token y_t:

        p_teacher(y_t) <= q(y_t)  ->  top-k forward KL (k teacher tokens + tail), pull q to the teacher's modes
        otherwise                  ->  the OPD sampled-token reverse-KL policy-gradient loss
    Returns (loss [B, R], gate [B, R] bool, True where the forward-KL branch is used).
    """
    logq = token_log_probs(student_logits, teacher_token.token_ids, mask, temperature)
    gate = mask & (teacher_token.logprobs.to(logq.dtype) <= logq.detach())
    fwd = _per_token("topk_tail", student_logits, teacher_dist, mask, temperature, k=k, base="fkl")
    params = {"old_logprobs": _fill_old(old_logprobs, logq, mask)} if old_logprobs is not None else {}
    opd = get_divergence("sampled_rkl", clip=clip)(student_logits, teacher_token, mask, temperature=temperature,
                                                   reduction="none", **params)
    return torch.where(gate, fwd, opd), gate


def entropy_switch_loss(student_logits: Tensor, teacher_dist, mask: Tensor, temperature: float = 1.0,
                        threshold: float = 1.0, k: int = 20, augment: bool = False) -> tuple[Tensor, Tensor]:
    """Entropy-aware switch: forward KL where the teacher is uncertain (entropy > threshold nats),
    reverse KL where it is confident; augment=True keeps the reverse KL everywhere and adds the
    forward KL where uncertain (the form of Jin et al., 2026). Returns (loss [B, R], uncertain [B, R])."""
    h = teacher_entropy(teacher_dist, temperature, student_logits.shape[-1], mask)
    uncertain = mask & (h > threshold)
    (f_name, f_params), (r_name, r_params) = kl_pair(teacher_dist, k)
    fwd = _per_token(f_name, student_logits, teacher_dist, mask, temperature, **f_params)
    rev = _per_token(r_name, student_logits, teacher_dist, mask, temperature, **r_params)
    if augment:
        return rev + torch.where(uncertain, fwd, 0.0), uncertain
    return torch.where(uncertain, fwd, rev), uncertain


def _fill_old(old_logprobs: Tensor, logq: Tensor, mask: Tensor) -> Tensor:
    """Unknown behaviour log-probs (NaN: dataset rows, masked positions) -> on-policy (ratio 1)."""
    return torch.where(torch.isnan(old_logprobs) | ~mask, logq.detach(), old_logprobs.to(logq.dtype))
