"""Fused linear + divergence: the loss of `hidden @ weight.T` without the [N, V] logits.

    loss = fused_linear_divergence("fkl", hidden, lm_head.weight, TeacherHidden(t_hidden, t_head))

Tokens are processed in chunks: per chunk, the student logits (and, for TeacherHidden, the
teacher's) are formed by a matmul, the fused divergence kernel writes d loss / d logits over the
student logits in place, and that feeds grad_hidden = g @ W and grad_weight += g.T @ h. Peak
extra memory is one chunk of logits per model plus the gradients of hidden and weight, all
computed in forward (as Liger-Kernel's fused linear losses do) and scaled by grad_output in
backward.

The teacher is any form the divergence takes, sliced per chunk, or `TeacherHidden`. Where the
kernels cannot run (CPU without TRITON_INTERPRET, float64, a teacher form a kernel does not
take) each chunk uses the reference divergence and autograd instead: still chunked, same result.
`lk` with batch_alpha needs every row's acceptance before any gradient, so it goes to
`linear_divergence_reference` (materialised logits). That function is also the reference the
tests compare with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from draftdistill.losses.reduce import check_reduction, position_mask, reduce_loss
from draftdistill.losses.registry import _lookup, divergence, resolve_params
from draftdistill.losses.teacher import check_temperature, compute_dtype

from ._common import flatten_teacher, kernels_can_run, slice_teacher


@dataclass(frozen=True)
class TeacherHidden:
    """Teacher hidden states [..., H_t] and its output head `weight` [V, H_t]; the teacher's
    logits are formed chunk by chunk, never whole."""

    hidden: Tensor
    weight: Tensor


def _teacher_logits(teacher):
    if isinstance(teacher, TeacherHidden):
        return teacher.hidden.detach() @ teacher.weight.detach().T
    return teacher


def linear_divergence_reference(name: str, hidden: Tensor, weight: Tensor, teacher,
                                mask: Tensor | None = None, temperature: float = 1.0,
                                reduction: str = "mean", **params: Any) -> Tensor:
    """The plain version: divergence(name, hidden @ weight.T, teacher, ...)."""
    return divergence(name, hidden @ weight.T, _teacher_logits(teacher), mask=mask,
                      temperature=temperature, reduction=reduction, **params)


def default_chunk_size(N: int, H: int, V: int) -> int:
    """Liger's rule: chunks of about N * H / V rows, so a chunk of logits is about as large as
    the hidden states (a power of two)."""
    rows = max(1, math.ceil(N / math.ceil(V / H)))
    return 1 << (rows - 1).bit_length()


def _chunk_loss_and_grad(name, logits, teacher, keep, temperature, params, scale, need_grad,
                         block_size):
    """Rows of loss and scale * dL/dlogits for one chunk; the gradient overwrites `logits`."""
    from .dispatch import kernel_module  # imports triton; only needed once a chunk runs

    op = kernel_module(name)
    if op is not None and kernels_can_run(logits) and op.supports(logits.shape, teacher, params):
        return op.loss_and_grad(name, logits, teacher, keep, temperature, params, scale,
                                need_grad, out=logits, block_size=block_size)
    spec = _lookup(name)
    with torch.enable_grad():
        x = logits.detach().requires_grad_(need_grad)
        rows = spec.fn(x, teacher, mask=keep, temperature=temperature, reduction="none",
                       **params)
        grad = torch.autograd.grad((rows * scale).sum(), x)[0] if need_grad else None
    return rows.detach(), grad


def _run(name, h, weight, teacher, keep, temperature, params, chunk_size, block_size, scale,
         need_h, need_w):
    """(rows [N], grad_h, grad_w); scale: a number, a 0-dim tensor or one weight per row."""
    N, V = h.shape[0], weight.shape[0]
    rows = torch.empty(N, dtype=compute_dtype(h), device=h.device)  # the reference's dtype
    grad_h = torch.empty_like(h) if need_h else None
    # In the weight's dtype, as Liger: an fp32 accumulator would add V x H x 4 bytes.
    grad_w = torch.zeros_like(weight) if need_w else None
    chunk = chunk_size or default_chunk_size(N, h.shape[1], V)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        hc = h[start:end]
        logits = hc @ weight.T
        if isinstance(teacher, TeacherHidden):
            tc = teacher.hidden[start:end] @ teacher.weight.T
        else:
            tc = slice_teacher(teacher, start, end)
        pc = params
        if params.get("old_logprobs") is not None:  # sampled_rkl's per-row parameter
            pc = {**params, "old_logprobs": params["old_logprobs"][start:end]}
        sc = scale[start:end] if isinstance(scale, Tensor) and scale.dim() else scale
        r, g = _chunk_loss_and_grad(name, logits, tc, keep[start:end], temperature, pc,
                                    sc, need_h or need_w, block_size)
        rows[start:end] = r
        if need_h:
            torch.mm(g, weight, out=grad_h[start:end])
        if need_w:
            grad_w.addmm_(g.T, hc)
    return rows, grad_h, grad_w


class FusedLinearLoss(torch.autograd.Function):
    """Gradients computed with the value (forward) and scaled by grad_output in backward; for
    reduction "none" the per-row grad_output must weight every row before the weight gradient
    sums them, so forward only computes the loss and backward runs the chunks again."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, run, keep: Tensor, reduction: str):
        lead = hidden.shape[:-1]
        ctx.shape, ctx.reduction = hidden.shape, reduction
        if reduction == "none":
            rows, _, _ = run(1.0, False, False)
            ctx.run = run
        else:
            scale = 1.0 / keep.sum().clamp_min(1) if reduction == "mean" else 1.0
            rows, grad_h, grad_w = run(scale, *ctx.needs_input_grad[:2])
            ctx.grads = (grad_h, grad_w)
        return reduce_loss(rows.view(lead), keep.view(lead), reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        if ctx.reduction == "none":
            _, grad_h, grad_w = ctx.run(grad_output.reshape(-1).to(torch.float32),
                                        *ctx.needs_input_grad[:2])
        else:
            if ctx.grads is None:
                raise RuntimeError("fused linear divergence: backward ran twice; its gradients "
                                   "are scaled in place and freed after the first backward")
            (grad_h, grad_w), ctx.grads = ctx.grads, None
            if not bool(grad_output == 1):
                for g in (grad_h, grad_w):
                    if g is not None:
                        g.mul_(grad_output.to(g.dtype))
        grad_h = None if grad_h is None else grad_h.view(ctx.shape)
        return grad_h, grad_w, None, None, None


def fused_linear_divergence(name: str, hidden: Tensor, weight: Tensor, teacher,
                            mask: Tensor | None = None, temperature: float = 1.0,
                            reduction: str = "mean", *, chunk_size: int | None = None,
                            block_size: int | None = None, **params: Any) -> Tensor:
    """divergence(name, hidden @ weight.T, teacher, mask, temperature, reduction, **params),
    computed chunk by chunk over the tokens; gradients reach `hidden` and `weight`.

    hidden [..., H], weight [V, H]; teacher: a logits Tensor, TeacherLogProbs, TeacherTopK or
    TeacherTokenLogProbs over the same positions, or TeacherHidden.
    """
    spec, params = resolve_params(name, params)
    check_temperature(temperature)
    check_reduction(reduction)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if name == "lk" and params["batch_alpha"]:
        return linear_divergence_reference(name, hidden, weight, teacher, mask, temperature,
                                           reduction, **params)
    lead = hidden.shape[:-1]
    keep = position_mask(mask, lead, hidden.device).reshape(-1)
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    if isinstance(teacher, TeacherHidden):
        flat = TeacherHidden(teacher.hidden.detach().reshape(h.shape[0], -1),
                             teacher.weight.detach())
    else:
        flat = flatten_teacher(teacher, lead)
    if params.get("old_logprobs") is not None:
        params = {**params, "old_logprobs": params["old_logprobs"].detach().reshape(-1)}

    def run(scale, need_h, need_w):
        return _run(name, h, weight.detach(), flat, keep, temperature, params, chunk_size,
                    block_size, scale, need_h, need_w)

    return FusedLinearLoss.apply(hidden, weight, run, keep, reduction)
