"""Two row kernels for the losses that read the teacher at a few ids only (top-k, sampled token).

- `row_lse`: lse(x / T) per row and, given K ids per row, the log of the student's mass
  outside them, summed directly (never as 1 - sum of the top-k, which cancels when the top-k hold
  almost all the mass) - the top-k tail bucket of `draftdistill.losses.topk`.
- `scaled_softmax`: grad[r, v] = coef[r] * q[r, v], the dense part of those losses' gradients;
  the caller then overwrites the K ids of each row with their exact values (a tiny scatter).

Both skip masked rows: row_lse leaves them at 0, scaled_softmax writes zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch_config


@triton.jit
def _lse_kernel(x_ptr, ids_ptr, keep_ptr, out_ptr, V, K, x_stride, inv_T,
                HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(keep_ptr + row) != 0:
        x_row = x_ptr + row * x_stride
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        r = tl.zeros((), tl.float32)  # sum over the entries outside the ids, same running max
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_T
            new = tl.maximum(m, tl.max(z, 0))
            safe = tl.where(new == float("-inf"), 0.0, new)  # no exp(-inf - -inf)
            e = tl.exp(z - safe)
            f = tl.exp(m - safe)
            s = s * f + tl.sum(e, 0)
            if HAS_IDS:
                # K compares per entry: cheap next to the load for the k of a serving teacher.
                top = offs < 0
                for k in range(0, K):
                    top = top | (offs == tl.load(ids_ptr + row * K + k))
                r = r * f + tl.sum(tl.where(top, 0.0, e), 0)
            m = new
        tl.store(out_ptr + row * 2, m + tl.log(s))
        tl.store(out_ptr + row * 2 + 1, m + tl.log(r))  # -inf when nothing is left out


@triton.jit
def _scaled_softmax_kernel(x_ptr, keep_ptr, lse_ptr, coef_ptr, grad_ptr, V, x_stride,
                           g_stride, inv_T, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g_row = grad_ptr + row * g_stride
    if tl.load(keep_ptr + row) != 0:
        x_row = x_ptr + row * x_stride
        lse = tl.load(lse_ptr + row * 2)
        c = tl.load(coef_ptr + row)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < V
            z = tl.load(x_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_T
            grad = c * tl.exp(z - lse)
            tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=inb)
    else:
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            zero = tl.zeros([BLOCK], tl.float32)
            tl.store(g_row + offs, zero.to(grad_ptr.dtype.element_ty), mask=offs < V)


def row_lse(x: Tensor, keep: Tensor, temperature: float, ids: Tensor | None = None,
            block_size: int | None = None) -> Tensor:
    """[N, 2] float32 per row: lse(x / T) over the vocabulary, and over the entries outside
    `ids` (Long [N, K]; all of them without ids). Their difference is the log of the student's
    probability mass outside the ids."""
    N, V = x.shape
    BLOCK, warps = launch_config(V, block_size)
    out = torch.zeros(N, 2, dtype=torch.float32, device=x.device)
    K = 0 if ids is None else ids.shape[1]
    ids_arg = out if ids is None else ids.contiguous()  # unused when HAS_IDS is False
    _lse_kernel[(N,)](x, ids_arg, keep.to(torch.int8).contiguous(), out, V, K, x.stride(0),
                      1.0 / temperature, HAS_IDS=ids is not None, BLOCK=BLOCK, num_warps=warps)
    return out


def scaled_softmax(x: Tensor, keep: Tensor, lse: Tensor, coef: Tensor, temperature: float,
                   out: Tensor | None = None, block_size: int | None = None) -> Tensor:
    """grad = coef[:, None] * softmax(x / T) in x's dtype, zero on masked rows; `lse` is
    row_lse's output. `out` may be x itself."""
    N, V = x.shape
    BLOCK, warps = launch_config(V, block_size)
    grad = torch.empty_like(x) if out is None else out
    _scaled_softmax_kernel[(N,)](x, keep.to(torch.int8).contiguous(), lse,
                                 coef.to(torch.float32).contiguous(), grad, V, x.stride(0),
                                 grad.stride(0), 1.0 / temperature, BLOCK=BLOCK,
                                 num_warps=warps)
    return grad


def compile_variants(dtype: str, BLOCK: int, has_ids=(True, False)):
    """(label, kernel, signature, constexprs) of row_lse (with / without ids) and scaled_softmax
    launches on `dtype` logits (kernels/compile_check.py compiles them)."""
    scalars = {"V": "i32", "inv_T": "fp32"}
    for ids in has_ids:
        sig = {"x_ptr": f"*{dtype}", "ids_ptr": "*i64", "keep_ptr": "*i8", "out_ptr": "*fp32",
               "K": "i32", "x_stride": "i64", **scalars, "HAS_IDS": "constexpr",
               "BLOCK": "constexpr"}
        yield f"row_lse {dtype} ids={ids}", _lse_kernel, sig, {"HAS_IDS": ids, "BLOCK": BLOCK}
    sig = {"x_ptr": f"*{dtype}", "keep_ptr": "*i8", "lse_ptr": "*fp32", "coef_ptr": "*fp32",
           "grad_ptr": f"*{dtype}", "x_stride": "i64", "g_stride": "i64", **scalars,
           "BLOCK": "constexpr"}
    yield f"scaled_softmax {dtype}", _scaled_softmax_kernel, sig, {"BLOCK": BLOCK}
