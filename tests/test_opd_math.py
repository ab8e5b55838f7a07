"""Per-token math of the general-OPD objectives, against hand values and brute-force expectations."""
import itertools
import math

import pytest
import torch

from draftdistill.losses import TeacherTokenLogProbs, TeacherTopK, get_divergence
from draftdistill.opd.objectives import Micro, build_objective, parse_spec
from draftdistill.opd.rewards import extract_answer, gsm8k_feedback, gsm8k_reward
from draftdistill.opd.rollout import scores_from_logits
from draftdistill.opd.token_losses import (aopd_loss, entropy_switch_loss, future_rewards,
                                           policy_gradient_loss, teacher_entropy, token_log_probs)
from draftdistill.opd.trainer import OPDConfig, adapt_mix, centred_rewards, mix_student_at
from draftdistill.train.batching import pack



@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons in float64; restored afterwards so other test modules are unaffected."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def micro_for(student_logits, teacher_logits, targets, mask=None, **kw):
    B, R, _ = student_logits.shape
    batch = pack([[1]] * B, [t.tolist() for t in targets], 0)
    mask = torch.ones(B, R, dtype=torch.bool) if mask is None else mask
    scores = scores_from_logits(teacher_logits, targets, {"logits", "topk"}, 3, 1.0)
    return Micro(batch, mask, scores, **kw)


def test_policy_gradient_loss_is_sampled_rkl_for_the_opd_advantage():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3))
    teacher_lp = torch.randn(2, 3) - 2
    old = torch.randn(2, 3) - 1.5
    mask = torch.tensor([[True, True, False], [True, True, True]])
    ref = get_divergence("sampled_rkl", clip=0.2)(logits, TeacherTokenLogProbs(targets, teacher_lp), mask,
                                                  reduction="none", old_logprobs=old)
    logq = token_log_probs(logits, targets, mask)
    ours = policy_gradient_loss(logq, teacher_lp - logq.detach(), mask, old, clip=0.2)
    torch.testing.assert_close(ours, ref)
    g1, = torch.autograd.grad(ours.sum(), logits, retain_graph=True)
    g2, = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_opd_per_token_value_and_clipping_by_hand():
    # one position, vocabulary 2, student q = (0.8, 0.2), sampled token 1, teacher log p = log 0.5
    logits = torch.tensor([[[math.log(0.8), math.log(0.2)]]], requires_grad=True)
    targets = torch.tensor([[1]])
    teacher = torch.log(torch.tensor([[[0.5, 0.5]]]))
    fn = build_objective("opd:clip=0.2").fn
    loss, _ = fn(logits, micro_for(logits, teacher, targets), 1.0)
    adv = math.log(0.5) - math.log(0.2)  # +0.916: the teacher likes the token more than the student
    assert loss.item() == pytest.approx(-adv)  # on-policy: value is the per-token KL estimate log q - log p
    # sampler gave the token 0.1: ratio 2 > 1 + clip, positive advantage -> clipped at 1.2 (no gradient)
    loss, _ = fn(logits, micro_for(logits, teacher, targets, old_logprobs=torch.log(torch.tensor([[0.1]]))), 1.0)
    assert loss.item() == pytest.approx(-1.2 * adv)
    grad, = torch.autograd.grad(loss.sum(), logits)
    assert torch.count_nonzero(grad) == 0


def exact_expectation(fn, student_logits, teacher_logits):
    """E_{y ~ q}[sum_t loss_t(y)] over every sequence y (student positions independent of context)."""
    B, R, V = student_logits.shape
    q = torch.softmax(student_logits[0].detach(), -1)
    total = 0.0
    for seq in itertools.product(range(V), repeat=R):
        targets = torch.tensor([seq])
        weight = math.prod(q[t, y].item() for t, y in enumerate(seq))
        loss, _ = fn(student_logits, micro_for(student_logits, teacher_logits, targets), 1.0)
        total = total + weight * loss.sum()
    return total


@pytest.mark.parametrize("objective", ["opd", "minillm:gamma=1.0,length_norm=true",
                                       "minillm:gamma=0.7,length_norm=true",
                                       "minillm:single_step=false,length_norm=false,gamma=1.0"])
def test_expected_gradient_is_the_reverse_kl_gradient(objective):
    """Brute force over all 3^3 responses: each objective's expected gradient equals the gradient of
    sum_t KL(q_t || p_t) (context-free positions make that the sequence-level reverse KL)."""
    torch.manual_seed(1)
    student = torch.randn(1, 3, 3, requires_grad=True)
    teacher = torch.randn(1, 3, 3)
    fn = build_objective(objective, teacher_scores="logits").fn
    got, = torch.autograd.grad(exact_expectation(fn, student, teacher), student)
    exact = get_divergence("rkl")(student, teacher, reduction="sum")
    want, = torch.autograd.grad(exact, student)
    torch.testing.assert_close(got, want)


def test_gopd_advantage_scales_the_reward_against_the_reference():
    logits = torch.log(torch.tensor([[[0.8, 0.2]]])).requires_grad_(True)
    targets = torch.tensor([[1]])
    teacher = torch.log(torch.tensor([[[0.5, 0.5]]]))
    ref = torch.log(torch.tensor([[0.4]]))
    for lam in (1.0, 1.5):
        fn = build_objective(f"opd:reward_scale={lam}").fn
        loss, _ = fn(logits, micro_for(logits, teacher, targets, ref_logprobs=ref), 1.0)
        adv = lam * (math.log(0.5) - math.log(0.4)) - (math.log(0.2) - math.log(0.4))
        assert loss.item() == pytest.approx(-adv)
    assert build_objective("opd:reward_scale=1.5").needs_reference
    with pytest.raises(ValueError, match="reference"):
        build_objective("opd:reward_scale=2").fn(logits, micro_for(logits, teacher, targets), 1.0)


def test_future_rewards_by_hand():
    r = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    mask = torch.tensor([[True, True, True, False]])
    # excluding the current token, gamma 0.5: R_0 = 2 + 0.5*4 = 4, weights 1 + 0.5; R_1 = 4; R_2 = 0
    plain = future_rewards(r, mask, gamma=0.5, normalise=False)
    torch.testing.assert_close(plain, torch.tensor([[4.0, 4.0, 0.0, 0.0]]))
    norm = future_rewards(r, mask, gamma=0.5, normalise=True)
    torch.testing.assert_close(norm, torch.tensor([[4.0 / 1.5, 4.0, 0.0, 0.0]]))
    mean = future_rewards(r, mask, gamma=1.0, normalise=True, include_current=True)  # MiniLLM's mean
    torch.testing.assert_close(mean, torch.tensor([[7 / 3, 3.0, 4.0, 0.0]]))


def test_aopd_gate_picks_forward_kl_where_the_teacher_likes_the_token_less():
    torch.manual_seed(2)
    student = torch.randn(1, 2, 6, requires_grad=True)
    teacher = torch.randn(1, 2, 6)
    logq = torch.log_softmax(student.detach(), -1)[0]
    logp = torch.log_softmax(teacher, -1)[0]
    # position 0: token where p <= q; position 1: token where p > q
    t0 = int(torch.nonzero(logp[0] <= logq[0])[0])
    t1 = int(torch.nonzero(logp[1] > logq[1])[0])
    targets = torch.tensor([[t0, t1]])
    micro = micro_for(student, teacher, targets)
    loss, gate = aopd_loss(student, teacher, micro.teacher.token, micro.mask, k=3)
    assert gate.tolist() == [[True, False]]
    fkl = get_divergence("topk_tail", k=3, base="fkl")(student, teacher, reduction="none")
    opd = get_divergence("sampled_rkl")(student, micro.teacher.token, reduction="none")
    torch.testing.assert_close(loss[0], torch.stack([fkl[0, 0], opd[0, 1]]))
    assert opd[0, 1] < 0  # positive advantage kept as reinforcement


def test_entropy_switch_uses_forward_kl_where_the_teacher_is_uncertain():
    student = torch.randn(1, 2, 4, requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]]])  # uniform (log 4 nats), peaked
    mask = torch.ones(1, 2, dtype=torch.bool)
    h = teacher_entropy(teacher, 1.0, 4, mask)
    assert h[0, 0].item() == pytest.approx(math.log(4)) and h[0, 1].item() < 0.01
    loss, uncertain = entropy_switch_loss(student, teacher, mask, threshold=1.0)
    fkl = get_divergence("fkl")(student, teacher, reduction="none")
    rkl = get_divergence("rkl")(student, teacher, reduction="none")
    assert uncertain.tolist() == [[True, False]]
    torch.testing.assert_close(loss[0], torch.stack([fkl[0, 0], rkl[0, 1]]))
    augmented, _ = entropy_switch_loss(student, teacher, mask, threshold=1.0, augment=True)
    torch.testing.assert_close(augmented[0], torch.stack([rkl[0, 0] + fkl[0, 0], rkl[0, 1]]))
    # top-k form: entropy of k tokens + a tail bucket
    top = TeacherTopK(torch.tensor([[[0, 1]]]), torch.log(torch.tensor([[[0.5, 0.25]]])))
    hk = teacher_entropy(top, 1.0, 4, torch.ones(1, 1, dtype=torch.bool))
    assert hk.item() == pytest.approx(-(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 0.25 * math.log(0.25)))


def test_objective_parsing_and_teacher_information_checks():
    assert parse_spec("minillm:gamma=0.9,length_norm=false") == ("minillm", {"gamma": 0.9, "length_norm": False})
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("opdd")
    with pytest.raises(ValueError, match="needs teacher"):
        build_objective("divergence", "jsd:beta=0.5", teacher_scores="topk")
    with pytest.raises(ValueError, match="needs teacher"):
        build_objective("aopd", teacher_scores="token")
    assert build_objective("divergence", "topk_tail:k=4,base=jsd", teacher_scores="topk").needs == {"dist"}
    assert build_objective("opd", teacher_scores="token").needs == {"token"}
    with pytest.raises(ValueError, match="unexpected keyword"):
        build_objective("opd:gamma=1")


def test_mix_schedules_linear_and_distillm_adaptive():
    cfg = OPDConfig(mix_schedule="linear", mix_student_start=0.2, mix_student=1.0, mix_schedule_steps=4)
    assert [mix_student_at(cfg, s, {}) for s in (0, 2, 4, 8)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    cfg = OPDConfig(mix_schedule="adaptive", mix_student_start=0.0, mix_student=0.6, adaptive_delta=0.25)
    state = {}
    seen = []
    for validation_loss in [2.0, 1.0, 3.0, 1.0, 2.0, 2.5]:
        seen.append(mix_student_at(cfg, 0, state))
        adapt_mix(cfg, state, validation_loss)
    # 2, 1 (fell: stay), 3 (rose: +0.25), 1 (fell), 2 (rose: +0.25), 2.5 (rose: capped at mix_student)
    assert seen == [0, 0, 0, 0.25, 0.25, 0.5] and state["mix_student"] == 0.6


def test_rewards_and_baselines():
    assert extract_answer("so 3 + 4 = 7\n#### 1,200") == "1200"
    assert extract_answer("The answer is $18.00.") == "18"
    assert gsm8k_reward("... she earned 10 dollars", "#### 10") == 1.0
    assert gsm8k_reward("I think 11", "#### 10") == 0.0
    assert "incorrect" in gsm8k_feedback("I think 11", "#### 10") \
        and "10" not in gsm8k_feedback("I think 11", "#### 10")
    assert centred_rewards([1.0, 0.0, None, 1.0], 1) == pytest.approx([1 / 3, -2 / 3, 0.0, 1 / 3])
    assert centred_rewards([1.0, 0.0, 1.0, 1.0], 2) == pytest.approx([0.5, -0.5, 0.0, 0.0])
