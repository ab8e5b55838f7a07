"""The registry-facing entry point: same signature and results as the references, kernels inside.

    fused_divergence("jsd", student_logits, teacher, mask, temperature=1.0, beta=0.9)

A divergence's registry entry names its kernel module (`Divergence.kernel`), which has
`supports(shape, teacher, params)` and `loss_and_grad(...)` (per-row loss and the already-scaled
gradient). Whatever a kernel does not cover - a reference-only divergence (no kernel), float64, a
teacher form it does not take, tensors it cannot run on - goes to the reference function, which
also raises the reference's errors for invalid inputs. `register()` fills
`draftdistill.losses.FUSED_KERNELS` for `kernel_divergences()`; the registry uses it for CUDA
tensors.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from draftdistill.losses.reduce import check_reduction, position_mask, reduce_loss
from draftdistill.losses.registry import (DIVERGENCES, FUSED_KERNELS, _lookup, kernel_divergences,
                                          resolve_params)
from draftdistill.losses.teacher import check_temperature

from ._common import as_rows, flatten_teacher, kernels_can_run


def kernel_module(name: str) -> ModuleType | None:
    """The kernel module the registry names for divergence `name`; None when it is reference-only."""
    module = _lookup(name).kernel
    return None if module is None else importlib.import_module(module)


class FusedLoss(torch.autograd.Function):
    """Loss whose gradient was computed with its value (forward), as Liger-Kernel does: backward
    only scales it by grad_output, in place, so the gradient is the one N x V buffer."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, compute, keep: Tensor, reduction: str) -> Tensor:
        # "mean" divides by the kept-position count; as a tensor, so no host sync.
        scale = 1.0 / keep.sum().clamp_min(1) if reduction == "mean" else 1.0
        rows, grad = compute(scale, ctx.needs_input_grad[0])
        ctx.grad = None if grad is None else grad.view(student_logits.shape)
        ctx.reduction = reduction
        return reduce_loss(rows.view(student_logits.shape[:-1]),
                           keep.view(student_logits.shape[:-1]), reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("fused divergence: backward ran twice; its gradient buffer is "
                               "scaled in place and freed after the first backward")
        if ctx.reduction == "none":
            grad.mul_(grad_output.unsqueeze(-1))
        elif not bool(grad_output == 1):  # the usual loss.backward(): nothing to do
            grad.mul_(grad_output)
        return grad, None, None, None


def fused_divergence(name: str, student_logits: Tensor, teacher, mask: Tensor | None = None,
                     temperature: float = 1.0, reduction: str = "mean", *,
                     block_size: int | None = None, **params: Any) -> Tensor:
    """Divergence `name` through the kernels where they apply, else through the reference."""
    spec, params = resolve_params(name, params)
    check_temperature(temperature)
    check_reduction(reduction)
    op = kernel_module(name)
    if op is None or not (kernels_can_run(student_logits)
                          and op.supports(student_logits.shape, teacher, params)):
        return spec.fn(student_logits, teacher, mask=mask, temperature=temperature,
                       reduction=reduction, **params)
    lead = student_logits.shape[:-1]
    keep = position_mask(mask, lead, student_logits.device).reshape(-1)
    x = as_rows(student_logits.detach())
    flat = flatten_teacher(teacher, lead)
    if params.get("old_logprobs") is not None:
        params = {**params, "old_logprobs": params["old_logprobs"].detach().reshape(-1)}
    compute = functools.partial(op.loss_and_grad, name, x, flat, keep, temperature, params,
                                block_size=block_size)
    return FusedLoss.apply(student_logits, compute, keep, reduction)


def register() -> None:
    """Put one fused function per divergence with a kernel into FUSED_KERNELS (used on CUDA
    tensors); reference-only divergences get none, and an entry already there (a user's own
    kernel) is kept."""
    for name in kernel_divergences():
        FUSED_KERNELS.setdefault(name, functools.wraps(DIVERGENCES[name].fn)(
            functools.partial(fused_divergence, name)))
