"""Fused linear + divergence (kernels/fused_linear.py) against the materialised reference."""

import pytest
import torch
from kernel_testing import DEVICE, IGNORE_LOG0, mask_of, rand, tolerances

from draftdistill.kernels import (TeacherHidden, fused_linear_divergence,
                                  linear_divergence_reference)
from draftdistill.kernels.fused_linear import default_chunk_size
from draftdistill.losses import TeacherLogProbs, TeacherTokenLogProbs, TeacherTopK

pytestmark = IGNORE_LOG0
N, H, HT, V = 7, 16, 12, 37


def inputs(dtype=torch.float32, seed=0):
    h = rand(N, H, seed=seed, scale=1.0, dtype=dtype)
    w = rand(V, H, seed=seed + 1, scale=0.5, dtype=dtype)
    teacher = TeacherHidden(rand(N, HT, seed=seed + 2, scale=1.0, dtype=dtype),
                            rand(V, HT, seed=seed + 3, scale=0.5, dtype=dtype))
    return h, w, teacher, mask_of((N,), seed)


def teacher_forms(teacher, mask):
    logits = (teacher.hidden @ teacher.weight.T).float()
    logp = torch.log_softmax(logits, -1)
    top, ids = logp.topk(5, dim=-1)
    tok = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return {"hidden": teacher, "logits": logits, "logprobs": TeacherLogProbs(logp),
            "topk": TeacherTopK(ids, top),
            "token": TeacherTokenLogProbs(tok, logp.gather(-1, tok[:, None])[:, 0])}


def compare_linear(name, h, w, teacher, mask, reduction="mean", chunk_size=3, dtype=None,
                   **params):
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ours = fused_linear_divergence(name, h1, w1, teacher, mask, 1.2, reduction,
                                   chunk_size=chunk_size, block_size=16, **params)
    ref = linear_divergence_reference(name, h2, w2, teacher, mask, 1.2, reduction, **params)
    tol = tolerances(dtype or h.dtype)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    weight = (torch.rand(ref.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
              if reduction == "none" else torch.tensor(0.5, device=DEVICE))
    (ours * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), **tol)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), **tol)


@pytest.mark.parametrize("name,form,params", [
    ("fkl", "hidden", {}), ("jsd", "hidden", {"beta": 0.3}), ("tvd", "logits", {}),
    ("neg_log_acceptance", "logprobs", {}), ("lk", "hidden", {}),
    ("topk_tail", "topk", {"base": "rkl"}), ("topk_tail", "hidden", {"k": 4}),  # reference chunks
    ("sampled_rkl", "token", {}), ("lk", "hidden", {"batch_alpha": True}),  # materialised
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(name, form, params, reduction):
    h, w, teacher, mask = inputs()
    compare_linear(name, h, w, teacher_forms(teacher, mask)[form], mask, reduction, **params)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_chunk_sizes_and_sum(chunk_size):
    h, w, teacher, mask = inputs(seed=5)
    compare_linear("rkl", h, w, teacher, mask, "sum", chunk_size=chunk_size)


def test_sampled_rkl_old_logprobs_are_sliced_per_chunk():
    h, w, teacher, mask = inputs(seed=6)
    token = teacher_forms(teacher, mask)["token"]
    old = token.logprobs + 0.3 * rand(N, seed=9, scale=1.0)
    compare_linear("sampled_rkl", h, w, token, mask, "mean", old_logprobs=old)


def test_half_precision_and_float64():
    h, w, teacher, mask = inputs(dtype=torch.bfloat16, seed=7)
    compare_linear("jsd", h, w, teacher, mask, "mean")
    h, w, teacher, mask = inputs(dtype=torch.float64, seed=8)  # reference per chunk
    compare_linear("fkl", h, w, teacher, mask, "mean")


def test_default_chunk_size():
    assert default_chunk_size(8192, 4096, 128256) == 256  # logits chunk ~ hidden states
    assert default_chunk_size(3, 64, 32) == 4
