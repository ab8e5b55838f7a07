"""Fused full-vocabulary divergences (kernels/logits_divergence.py) against the references."""

import pytest
import torch
from kernel_testing import (DEVICE, compare, fused_divergence, kernel_variants, logits_pair,
                            mask_of, rand, variant_id)

from draftdistill.losses import DIVERGENCES, TeacherLogProbs

# Every registered divergence with a kernel over full logits, at its defaults, then these
# parameter end points and special cases (those of divergences in the registry).
EDGE_CASES = [
    ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}),
    ("skew_fkl", {"alpha": 0.0}), ("skew_rkl", {"alpha": 0.3}), ("skew_rkl", {"alpha": 0.0}),
    ("neg_log_acceptance", {"eps": 0.5}),  # clamp active on some rows
    ("lk", {"eta": 1.0, "batch_alpha": True}),
]
VARIANTS = kernel_variants(EDGE_CASES, needs="full")
IDS = [variant_id(name, p) for name, p in VARIANTS]
# (positions, vocab, temperature, reduction, block): several tiles and a ragged last one each.
SETTINGS = [((2, 3), 37, 1.0, "mean", 16), ((5,), 100, 0.7, "none", 32),
            ((7,), 257, 2.0, "sum", 64)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"V{s[1]}-{s[3]}")
@pytest.mark.parametrize("name,params", VARIANTS, ids=IDS)
def test_matches_reference_fp32(name, params, setting):
    lead, V, T, reduction, block = setting
    s, t, mask = logits_pair(lead, V, seed=V)
    compare(name, s, t, mask, T, reduction, block_size=block, **params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,params", VARIANTS, ids=IDS)
def test_matches_reference_half(name, params, dtype):
    s, t, mask = logits_pair((2, 3), 100, dtype=dtype, seed=3)
    compare(name, s, t, mask, 1.3, "mean", block_size=32, **params)


@pytest.mark.parametrize("name,params", VARIANTS[::2], ids=IDS[::2])
def test_teacher_log_probs_and_no_mask(name, params):
    s, t, _ = logits_pair((4,), 50, seed=11, special=False)
    teacher = TeacherLogProbs(torch.log_softmax(t, -1))
    compare(name, s, teacher, None, 0.8, "mean", block_size=16, **params)


@pytest.mark.parametrize("name,params", VARIANTS, ids=IDS)
def test_value_without_grad(name, params):
    # No gradient wanted: the loss comes from the stats pass alone (FKL's two-pass path is off).
    s, t, mask = logits_pair((6,), 70, seed=5)
    ours = fused_divergence(name, s, t, mask, 1.0, "none", block_size=32, **params)
    ref = DIVERGENCES[name].fn(s, t, mask=mask, reduction="none", **params)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_default_tiles_non_contiguous_input_and_3d_mask():
    s, t, mask = logits_pair((2, 4), 257, seed=2)
    s_t = s.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided positions
    for name in ("fkl", "jsd", "lk"):
        compare(name, s_t, t, mask, 1.0, "mean")  # default block: one ragged tile


def test_all_positions_masked_gives_zero_loss_and_grad():
    s, t = rand(3, 40, seed=1), rand(3, 40, seed=2)
    mask = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        loss, grad = compare("tvd", s, t, mask, 1.0, reduction, block_size=16)
        assert (loss == 0).all() and (grad == 0).all()


def test_identical_distributions_give_zero():
    s = rand(4, 64, seed=9)
    for name in ("fkl", "rkl", "jsd", "tvd", "neg_log_acceptance"):
        loss, grad = compare(name, s, s.clone(), None, 1.0, "sum", block_size=16)
        assert abs(loss.item()) < 1e-5 and grad.abs().max() < 1e-6


def test_backward_twice_is_an_error():
    s = rand(2, 20, seed=4).requires_grad_(True)
    loss = fused_divergence("fkl", s, rand(2, 20, seed=5), block_size=16)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_mask_of_wrong_shape_is_the_reference_error():
    s, t = rand(2, 3, 10), rand(2, 3, 10, seed=1)
    with pytest.raises(ValueError, match="does not fit positions"):
        fused_divergence("fkl", s, t, mask_of((4,)))
