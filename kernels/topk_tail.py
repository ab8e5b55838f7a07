"""Fused top-k-with-tail divergence (TeacherTopK, e.g. a serving teacher's top_logprobs).

Reference: `draftdistill.losses.topk.topk_tail`. The vocabulary-sized work is two row kernels
(`row_softmax`): the student's lse and its mass outside the K ids, then the dense gradient. The
K + 1 buckets are O(N K) and are computed here with the reference's own bucket divergences
(`BASES`), their gradient h = dL / d log q_bucket by autograd on those small tensors.

Gradient w.r.t. log q_v (before the log-softmax Jacobian):
  v = ids_k      h_k
  v outside      h_tail * q_v / q_tail      (the tail is log(sum of those q_v + floor))
so dL/dx_v = scale / T * (g_v - q_v G), G = sum_k h_k + h_tail * rest / q_tail: a row constant
times q_v everywhere (one kernel pass), then the K ids overwritten with their exact values.

Full-vocabulary teachers (logits, TeacherLogProbs) go to the reference, which takes their top-k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from draftdistill.losses.teacher import LOG_ZERO, TeacherTopK, finite_log
from draftdistill.losses.topk import BASES

from . import row_softmax
from .row_softmax import row_lse, scaled_softmax


def compile_variants(names, dtype: str, BLOCK: int):
    """The row kernels this divergence launches (kernels/compile_check.py compiles them)."""
    return row_softmax.compile_variants(dtype, BLOCK, has_ids=(True,))


def supports(shape: torch.Size, teacher, params: dict) -> bool:
    return (isinstance(teacher, TeacherTopK) and teacher.ids.shape == teacher.logprobs.shape
            and teacher.ids.shape[:-1] == shape[:-1] and teacher.ids.shape[-1] <= shape[-1])


def loss_and_grad(name: str, x: Tensor, teacher: TeacherTopK, keep: Tensor, temperature: float,
                  params: dict, scale: Tensor | float, need_grad: bool, *,
                  out: Tensor | None = None, block_size: int | None = None):
    """Per-row loss [N] (0 on masked rows) and scale * dL/dx [N, V] if need_grad."""
    N, V = x.shape
    K = teacher.ids.shape[-1]
    # Masked rows: valid distinct ids and a finite sub-normalised teacher, as the reference.
    ids = torch.where(keep[:, None], teacher.ids, torch.arange(K, device=x.device)).long()
    top = torch.where(keep[:, None], teacher.logprobs.to(torch.float32), -math.log(K + 1))
    top = finite_log(top).contiguous()

    st = row_lse(x, keep, temperature, ids=ids, block_size=block_size)
    lse, log_rest = st[:, 0], st[:, 1]
    z_top = torch.where(keep[:, None], x.gather(1, ids).to(torch.float32) * (1.0 / temperature),
                        0.0)
    lq_top = torch.where(torch.isneginf(z_top), LOG_ZERO, z_top - lse[:, None])
    lq_rest = torch.where(keep, log_rest - lse, 0.0)

    # Buckets exactly as losses.topk.tail_buckets, with the student's rest from the kernel.
    log_floor = math.log((K + 1) * torch.finfo(torch.float32).eps)
    p_tail = torch.log(-torch.expm1(top.logsumexp(-1, keepdim=True).clamp(max=0.0))
                       + math.exp(log_floor))
    q_tail = torch.logaddexp(lq_rest, torch.tensor(log_floor, device=x.device))
    logp_b = torch.cat([top, p_tail], dim=-1)
    with torch.enable_grad():
        logq_b = torch.cat([lq_top, q_tail[:, None]], dim=-1).requires_grad_(True)
        rows = BASES[params["base"]](logp_b, logq_b, params["beta"])
        h = torch.autograd.grad(rows.sum(), logq_b)[0] if need_grad else None
    rows = torch.where(keep, rows.detach(), 0.0)
    if not need_grad:
        return rows, None

    s = torch.where(keep, scale / temperature, 0.0)  # scale may be a 0-dim tensor
    h_top = torch.where(torch.isneginf(z_top), 0.0, h[:, :K])  # LOG_ZERO entries pass no grad
    h_tail = h[:, K]
    G = h_top.sum(-1) + h_tail * torch.exp(lq_rest - q_tail)
    grad = scaled_softmax(x, keep, st, s * (h_tail * torch.exp(-q_tail) - G), temperature,
                          out=out, block_size=block_size)
    exact = s[:, None] * (h_top - lq_top.exp() * G[:, None])
    grad.scatter_(1, ids, exact.to(grad.dtype))
    return rows, grad
