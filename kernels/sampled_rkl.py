"""Fused sampled-token reverse-KL policy-gradient loss (TeacherTokenLogProbs).

Reference: `draftdistill.losses.sampled.sampled_rkl`. The loss of a row depends on the student
only through log q(x) = z_x - lse(z) at its sampled token x, so the vocabulary-sized work is the
row lse and the gradient dL/dz_v = h * (1[v = x] - q_v) with h = dL / d log q(x): one lse pass,
one dense pass writing -h q_v, and one scatter at x. The importance weight, its truncation and
the PPO clip act on N scalars only and are computed here in PyTorch, h by autograd.
"""

from __future__ import annotations


import torch
from torch import Tensor

from draftdistill.losses.sampled import clipped_policy_loss, sampled_token_advantage
from draftdistill.losses.teacher import LOG_ZERO, TeacherTokenLogProbs

from . import row_softmax
from .row_softmax import row_lse, scaled_softmax


def compile_variants(names, dtype: str, BLOCK: int):
    """The row kernels this divergence launches (kernels/compile_check.py compiles them)."""
    return row_softmax.compile_variants(dtype, BLOCK, has_ids=(False,))


def supports(shape: torch.Size, teacher, params: dict) -> bool:
    old = params.get("old_logprobs")
    return (isinstance(teacher, TeacherTokenLogProbs) and teacher.token_ids.shape == shape[:-1]
            and teacher.logprobs.shape == shape[:-1]
            and (old is None or old.shape == shape[:-1]))


def policy_loss(logq: Tensor, teacher_lp: Tensor, old: Tensor | None, clip: float | None,
                max_weight: float | None) -> Tensor:
    """Per-token loss from log q(x), the same steps as the reference (see its docstring)."""
    log_ratio = torch.zeros_like(logq) if old is None else logq.detach() - old
    return clipped_policy_loss(logq, sampled_token_advantage(logq, teacher_lp), log_ratio,
                               clip if old is not None else None, max_weight)


def loss_and_grad(name: str, x: Tensor, teacher: TeacherTokenLogProbs, keep: Tensor,
                  temperature: float, params: dict, scale: Tensor | float, need_grad: bool, *,
                  out: Tensor | None = None, block_size: int | None = None):
    """Per-row loss [N] (0 on masked rows) and scale * dL/dx [N, V] if need_grad."""
    # Masked rows may hold ignore ids (-100) and garbage log-probs: make them harmless.
    tok = torch.where(keep, teacher.token_ids, 0).long()
    teacher_lp = torch.where(keep, teacher.logprobs.to(torch.float32), 0.0)
    old = params["old_logprobs"]
    if old is not None:
        old = torch.where(keep, old.to(torch.float32), 0.0)

    st = row_lse(x, keep, temperature, block_size=block_size)
    z = torch.where(keep, x.gather(1, tok[:, None])[:, 0].to(torch.float32) * (1.0 / temperature),
                    0.0)
    lq = torch.where(torch.isneginf(z), LOG_ZERO, z - st[:, 0])
    with torch.enable_grad():
        lq_leaf = lq.detach().requires_grad_(True)
        rows = policy_loss(lq_leaf, teacher_lp, old, params["clip"], params["max_weight"])
        h = torch.autograd.grad(rows.sum(), lq_leaf)[0] if need_grad else None
    rows = torch.where(keep, rows.detach(), 0.0)
    if not need_grad:
        return rows, None

    s = torch.where(keep, scale / temperature, 0.0)
    h = torch.where(torch.isneginf(z), 0.0, h) * s  # a -inf logit's LOG_ZERO passes no grad
    grad = scaled_softmax(x, keep, st, -h, temperature, out=out, block_size=block_size)
    grad.scatter_(1, tok[:, None], (h * (1 - lq.exp()))[:, None].to(grad.dtype))
    return rows, grad
