"""Top-k-with-tail and sampled-token RKL kernels (kernels/topk_tail.py, kernels/sampled_rkl.py)
against the references."""

import math

import pytest
import torch
from kernel_testing import DEVICE, IGNORE_LOG0, compare, fused_divergence, logits_pair, rand

from draftdistill.losses import TeacherTokenLogProbs, TeacherTopK

pytestmark = IGNORE_LOG0


def topk_teacher(t, k, mask):
    """The teacher's top-k log-probs; dropped positions hold ignore ids and NaN."""
    top, ids = torch.log_softmax(t.float().nan_to_num(posinf=0.0), -1).topk(k, dim=-1)
    drop = ~mask
    ids[drop] = -100
    top[drop] = float("nan")
    return TeacherTopK(ids, top)


@pytest.mark.parametrize("V,block", [(37, 16), (100, 32)])
@pytest.mark.parametrize("k", [1, 5, "V"])
@pytest.mark.parametrize("base,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("jsd", 1.0),
                                       ("tvd", 0.5)])
def test_topk_tail_matches_reference(base, beta, k, V, block):
    k = V if k == "V" else k  # K = V: empty tail, both sides at the floor
    s, t, mask = logits_pair((2, 3), V, seed=V + len(base))
    teacher = topk_teacher(t, k, mask)
    reduction = {37: "mean", 100: "none"}[V]
    compare("topk_tail", s, teacher, mask, 0.8, reduction, block_size=block, base=base, beta=beta)


def test_topk_tail_student_minus_inf_on_a_top_id_and_half_precision():
    s, t, mask = logits_pair((5,), 64, dtype=torch.bfloat16, seed=4)
    teacher = topk_teacher(t, 8, mask)
    s[0, teacher.ids[0, 0]] = float("-inf")
    for base in ("fkl", "rkl", "tvd"):
        compare("topk_tail", s, teacher, mask, 1.0, "sum", block_size=16, base=base)


def test_topk_tail_full_teacher_goes_to_reference():
    s, t, mask = logits_pair((4,), 30, seed=8)
    compare("topk_tail", s, t, mask, 1.0, "mean", k=4, base="rkl")


def test_topk_tail_bad_k_is_the_reference_error():
    s = rand(2, 6)
    teacher = TeacherTopK(torch.zeros(2, 7, dtype=torch.long, device=DEVICE), rand(2, 7))
    with pytest.raises(ValueError, match="K=7 > vocabulary 6"):
        fused_divergence("topk_tail", s, teacher)


def token_teacher(s, mask, seed):
    g = torch.Generator().manual_seed(seed)
    N, V = s.shape[0], s.shape[-1]
    ids = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    ids[0] = 3  # the student's -inf entry in logits_pair: LOG_ZERO, no gradient
    ids[~mask] = -100
    lp = (-3 * torch.rand(N, generator=g)).to(DEVICE)
    lp[~mask] = float("nan")
    return TeacherTokenLogProbs(ids, lp)


@pytest.mark.parametrize("max_weight", [None, 1.5])
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("old", [False, True], ids=["on-policy", "old-logprobs"])
def test_sampled_rkl_matches_reference(old, clip, max_weight):
    s, t, mask = logits_pair((7,), 100, seed=21)
    teacher = token_teacher(s, mask, 1)
    params = {"clip": clip, "max_weight": max_weight}
    if old:
        lq = torch.log_softmax(s.float().nan_to_num() / 1.3, -1)
        old_lp = lq.gather(-1, teacher.token_ids.clamp(min=0)[:, None])[:, 0]
        params["old_logprobs"] = old_lp + 0.5 * rand(7, seed=2, scale=1.0)  # ratios off 1
    for reduction in ("mean", "none"):
        compare("sampled_rkl", s, teacher, mask, 1.3, reduction, block_size=32, **params)


def test_sampled_rkl_3d_half_precision_and_ragged_tiles():
    s, t, mask = logits_pair((2, 3), 37, dtype=torch.bfloat16, seed=6)
    flat = token_teacher(s.view(-1, 37), mask.view(-1), 3)
    teacher = TeacherTokenLogProbs(flat.token_ids.view(2, 3), flat.logprobs.view(2, 3))
    compare("sampled_rkl", s, teacher, mask, 1.0, "sum", block_size=16,
            old_logprobs=torch.full((2, 3), -math.log(37), device=DEVICE))
