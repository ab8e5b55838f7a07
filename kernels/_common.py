"""Shared plumbing for the kernels: when they can run, tile sizes, row views of the inputs.

Triton decides at decoration (import) time whether a kernel is compiled for the GPU or run by
the interpreter (TRITON_INTERPRET=1, CPU tensors, numpy underneath), so the choice is recorded
once here, when the kernel modules are first imported.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from draftdistill.losses.teacher import (TeacherLogProbs, TeacherTokenLogProbs, TeacherTopK)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Largest vocabulary tile. A row is one program; 2048 fp32 lanes with 8 warps keeps the live
# vectors of the two-divergence (LK) gradient pass in registers. Untuned: no GPU was at hand when
# this was written; `draftdistill bench kernels --block-size` sweeps it.
MAX_BLOCK = 2048


def kernels_can_run(t: Tensor) -> bool:
    """True where the Triton kernels can take `t`: CUDA, or CPU under TRITON_INTERPRET=1."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False  # float64 stays on the reference (the kernels compute in float32)
    return t.device.type == "cpu" if INTERPRET else t.is_cuda


def launch_config(V: int, block_size: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of V logits. Fixed meta-parameters, no autotune: autotune
    needs a GPU (it fails under the interpreter), and the gradient kernels may write in place,
    which repeated tuning launches would corrupt."""
    if block_size is None:
        block_size = min(MAX_BLOCK, 1 << max(V - 1, 1).bit_length())
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    return block_size, (8 if block_size >= 2048 else 4)


def as_rows(x: Tensor) -> Tensor:
    """[..., V] -> [N, V] with unit stride along the vocabulary (a view when possible)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def flatten_teacher(teacher, lead: torch.Size):
    """The teacher with its leading (position) dims flattened to one, N = prod(lead)."""
    n = lead.numel()
    if isinstance(teacher, Tensor):
        return as_rows(teacher.detach())
    if isinstance(teacher, TeacherLogProbs):
        return TeacherLogProbs(as_rows(teacher.logprobs.detach()))
    if isinstance(teacher, TeacherTopK):
        return TeacherTopK(teacher.ids.reshape(n, -1), teacher.logprobs.detach().reshape(n, -1))
    if isinstance(teacher, TeacherTokenLogProbs):
        return TeacherTokenLogProbs(teacher.token_ids.reshape(n),
                                    teacher.logprobs.detach().reshape(n))
    raise TypeError(f"unknown teacher form {type(teacher).__name__}")


def slice_teacher(teacher, start: int, end: int):
    """Rows start:end of a flattened teacher (any form)."""
    if isinstance(teacher, Tensor):
        return teacher[start:end]
    fields = {k: v[start:end] for k, v in vars(teacher).items()}
    return type(teacher)(**fields)
