"""Tests for draftdistill.losses: values, gradients, masks, reductions, registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from draftdistill.losses import (DIVERGENCES, FUSED_KERNELS, TeacherLogProbs,
                                 TeacherTokenLogProbs, TeacherTopK, acceptance_rate, divergence,
                                 divergence_names, fkl, get_divergence, jsd, kernel_divergences,
                                 lk, make_divergence, neg_log_acceptance, parse_divergence, rkl,
                                 sampled_rkl, sampled_token_advantage, skew_fkl, skew_rkl,
                                 teacher_log_probs, topk_tail, tvd)
from draftdistill.spec_strings import format_spec, parse_spec

ln = math.log
P = [0.5, 0.3, 0.2]  # teacher
Q = [0.2, 0.5, 0.3]  # student
FULL = list(divergence_names("full"))  # the contract tests below run over every registered one
SMOOTH = ["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl"]  # TVD-based ones have |.| kinks


def logits_of(probs, dtype=torch.float64):
    return torch.tensor(probs, dtype=dtype).log()


def kl(a, b):
    return sum(x * ln(x / y) for x, y in zip(a, b))


def rand_logits(*shape, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# --------------------------------------------------------------------------- hand values


def test_hand_computed_values():
    s, t = logits_of(Q), logits_of(P)
    m = [0.35, 0.4, 0.25]  # (p + q) / 2
    expected = {
        "fkl": 0.5 * ln(0.5 / 0.2) + 0.3 * ln(0.3 / 0.5) + 0.2 * ln(0.2 / 0.3),
        "rkl": 0.2 * ln(0.2 / 0.5) + 0.5 * ln(0.5 / 0.3) + 0.3 * ln(0.3 / 0.2),
        "jsd": 0.5 * kl(P, m) + 0.5 * kl(Q, m),
        "tvd": 0.5 * (0.3 + 0.2 + 0.1),
        # m = 0.1 p + 0.9 q = [0.23, 0.48, 0.29];  m = 0.9 p + 0.1 q = [0.47, 0.32, 0.21]
        "skew_fkl": 0.5 * ln(0.5 / 0.23) + 0.3 * ln(0.3 / 0.48) + 0.2 * ln(0.2 / 0.29),
        "skew_rkl": 0.2 * ln(0.2 / 0.47) + 0.5 * ln(0.5 / 0.32) + 0.3 * ln(0.3 / 0.21),
        "neg_log_acceptance": -ln(0.7),
        # lambda = exp(-3 * 0.7)
        "lk": math.exp(-2.1) * kl(P, Q) + (1 - math.exp(-2.1)) * 0.3,
    }
    assert expected["fkl"] == pytest.approx(0.2238047, abs=1e-6)
    assert expected["rkl"] == pytest.approx(0.1937942, abs=1e-6)
    assert expected["jsd"] == pytest.approx(0.0508746, abs=1e-6)
    for name, value in expected.items():
        assert divergence(name, s, t).item() == pytest.approx(value, abs=1e-12), name
        # float32 path too
        assert divergence(name, s.float(), t.float()).item() == pytest.approx(value, abs=1e-6)
    assert acceptance_rate(s, t).item() == pytest.approx(0.2 + 0.3 + 0.2, abs=1e-12)
    # jsd with beta = 0.9: m = 0.9 p + 0.1 q = [0.47, 0.32, 0.21]
    m9 = [0.47, 0.32, 0.21]
    assert jsd(s, t, beta=0.9).item() == pytest.approx(0.9 * kl(P, m9) + 0.1 * kl(Q, m9))


def test_topk_tail_hand_values():
    s, t = logits_of(Q), logits_of(P)
    # k = 1: buckets p = [0.5, 0.5], q = [0.2, 0.8] (teacher's top id is 0)
    pb, qb = [0.5, 0.5], [0.2, 0.8]
    assert topk_tail(s, t, k=1).item() == pytest.approx(kl(pb, qb), abs=1e-12)
    assert topk_tail(s, t, k=1, base="rkl").item() == pytest.approx(kl(qb, pb), abs=1e-12)
    assert topk_tail(s, t, k=1, base="tvd").item() == pytest.approx(0.3, abs=1e-12)
    mb = [0.35, 0.65]
    assert topk_tail(s, t, k=1, base="jsd").item() == pytest.approx(
        0.5 * kl(pb, mb) + 0.5 * kl(qb, mb), abs=1e-12)
    # The same from TeacherTopK(ids=[0], logprobs=[log 0.5])
    top = TeacherTopK(torch.tensor([0]), torch.tensor([ln(0.5)], dtype=torch.float64))
    assert topk_tail(s, top).item() == pytest.approx(kl(pb, qb), abs=1e-12)


def test_sampled_rkl_hand_values():
    s = logits_of(Q)
    teacher = TeacherTokenLogProbs(torch.tensor(1), torch.tensor(ln(0.3), dtype=torch.float64))
    # on-policy: value = log q(x) - log p(x)
    assert sampled_rkl(s, teacher).item() == pytest.approx(ln(0.5) - ln(0.3), abs=1e-12)
    adv = sampled_token_advantage(torch.tensor(ln(0.5)), torch.tensor(ln(0.3)))
    assert adv.item() == pytest.approx(ln(0.3) - ln(0.5))


# --------------------------------------------------------------------------- identities


def test_identities():
    s, t = rand_logits(4, 7, seed=1), rand_logits(4, 7, seed=2)
    kw = dict(reduction="none")
    torch.testing.assert_close(jsd(s, t, beta=0.0, **kw), fkl(s, t, **kw))
    torch.testing.assert_close(jsd(s, t, beta=1.0, **kw), rkl(s, t, **kw))
    torch.testing.assert_close(jsd(s, t, beta=0.5, **kw), jsd(t, s, beta=0.5, **kw))
    # the endpoint conventions are the normalised limits
    torch.testing.assert_close(jsd(s, t, beta=1e-6, **kw) / 1e-6, fkl(s, t, **kw),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(jsd(s, t, beta=1 - 1e-6, **kw) / 1e-6, rkl(s, t, **kw),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(skew_fkl(s, t, alpha=0.0, **kw), fkl(s, t, **kw))
    torch.testing.assert_close(skew_rkl(s, t, alpha=0.0, **kw), rkl(s, t, **kw))
    ps, pt = s.softmax(-1), t.softmax(-1)
    torch.testing.assert_close(tvd(s, t, **kw), 1 - torch.minimum(ps, pt).sum(-1))
    torch.testing.assert_close(tvd(s, t, **kw), 1 - acceptance_rate(s, t, **kw))
    torch.testing.assert_close(neg_log_acceptance(s, t, **kw),
                               -torch.log(acceptance_rate(s, t, **kw)))
    # lk: eta = 0 is pure forward KL
    torch.testing.assert_close(lk(s, t, eta=0.0, **kw), fkl(s, t, **kw))


def test_lk_gradient_uses_stopped_lambda():
    s, t = rand_logits(3, 6, seed=3), rand_logits(3, 6, seed=4)
    x = s.clone().requires_grad_()
    lk(x, t, eta=3.0, reduction="sum").backward()
    lam = torch.exp(-3.0 * acceptance_rate(s, t, reduction="none"))
    y = s.clone().requires_grad_()
    (lam * fkl(y, t, reduction="none") + (1 - lam) * tvd(y, t, reduction="none")).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_lk_batch_alpha():
    s, t = rand_logits(5, 6, seed=5), rand_logits(5, 6, seed=6)
    mask = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)
    lam = torch.exp(-2.0 * acceptance_rate(s, t, mask))  # mean over kept positions
    expected = lam * fkl(s, t, reduction="none") + (1 - lam) * tvd(s, t, reduction="none")
    torch.testing.assert_close(lk(s, t, mask, eta=2.0, batch_alpha=True, reduction="none"),
                               expected * mask)


@pytest.mark.parametrize("name", FULL + ["topk_tail"])
def test_nonnegative_and_zero_at_match(name):
    s, t = rand_logits(6, 9, seed=7), rand_logits(6, 9, seed=8)
    params = {"k": 4} if name == "topk_tail" else {}
    assert (divergence(name, s, t, reduction="none", **params) >= -1e-12).all()
    assert (divergence(name, s.float(), t.float(), reduction="none", **params) >= -1e-6).all()
    same = divergence(name, t, t, reduction="none", **params)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", SMOOTH)
def test_zero_gradient_at_match(name):
    t = rand_logits(4, 9, seed=9)
    x = t.clone().requires_grad_()
    divergence(name, x, t).backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name,params", [
    ("fkl", {}), ("rkl", {}), ("jsd", {}), ("jsd", {"beta": 0.2}), ("tvd", {}),
    ("skew_fkl", {}), ("skew_rkl", {"alpha": 0.3}), ("neg_log_acceptance", {}),
    ("lk", {"eta": 0.0}),
    ("topk_tail", {"k": 3}), ("topk_tail", {"k": 3, "base": "rkl"}),
    ("topk_tail", {"k": 2, "base": "jsd", "beta": 0.7}), ("topk_tail", {"k": 3, "base": "tvd"}),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(name, params, reduction):
    s, t = rand_logits(2, 3, 5, seed=10), rand_logits(2, 3, 5, seed=11)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    fn = get_divergence(name, **params)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: fn(z, t, mask, temperature=0.7, reduction=reduction), (x,))


def test_gradcheck_topk_tail_teacher_topk():
    s, t = rand_logits(2, 3, 6, seed=12), rand_logits(2, 3, 6, seed=13)
    top, ids = F.log_softmax(t / 0.7, -1).topk(3, dim=-1)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: topk_tail(z, TeacherTopK(ids, top), mask, temperature=0.7, base="rkl"), (x,))


# An active max_weight caps the value but keeps the gradient (truncated IS), so it is not a
# finite difference: test_sampled_rkl_importance_weights_and_clipping checks it by value.
@pytest.mark.parametrize("params", [{}, {"clip": 0.2}, {"clip": None},
                                    {"clip": None, "max_weight": 1.5}])
def test_gradcheck_sampled_rkl(params):
    # The loss holds the advantage A = sg(log p - log q) constant, so a finite difference of its
    # value is not its gradient. Feed a teacher log-prob that moves with log q (the teacher is
    # detached inside), so A stays fixed at A0 and the value is -A0 * surrogate(ratio): then
    # gradcheck checks the surrogate gradient exactly.
    s = rand_logits(2, 3, 5, seed=14)
    ids = torch.tensor([[0, 3, 4], [2, 2, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    adv0 = torch.tensor([[0.5, -0.3, 0.1], [-0.8, 0.2, 0.4]], dtype=torch.float64)
    logq0 = F.log_softmax(s / 0.7, -1).gather(-1, ids[..., None]).squeeze(-1)
    # Off-policy ratios away from the clip kinks (0.7 ... 1.4). On-policy ({}) the value is
    # -A * 1 whatever the logits, so finite differences cannot see it: check the equivalent
    # off-policy form with old = log q at this point, then that on-policy gives the same gradient.
    shift = torch.tensor([[0.3, -0.25, 0.0], [0.1, 0.0, -0.35]], dtype=torch.float64)
    old = logq0 - shift if params else logq0

    def f(z, old_logprobs=old):
        logq = F.log_softmax(z / 0.7, -1).gather(-1, ids[..., None]).squeeze(-1)
        teacher = TeacherTokenLogProbs(ids, logq + adv0)
        return sampled_rkl(z, teacher, mask, temperature=0.7, reduction="none",
                           old_logprobs=old_logprobs, **params)

    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x,))
    if not params:
        g_old, = torch.autograd.grad(f(x).sum(), x)
        g_on, = torch.autograd.grad(f(x, None).sum(), x)
        torch.testing.assert_close(g_on, g_old)


# --------------------------------------------------------------------------- sampled_rkl


def test_sampled_rkl_expected_gradient_is_rkl_gradient():
    # E_{x~q}[grad loss(x)] = sum_x q_x (log q_x - log p_x) grad log q_x = grad KL(q || p).
    V, T = 6, 1.3
    s, t = rand_logits(V, seed=15), rand_logits(V, seed=16)
    x = s.clone().requires_grad_()
    logits = x.expand(V, V)  # one row per possible token
    tokens = torch.arange(V)
    logp = F.log_softmax(t / T, -1)
    q = F.softmax(s / T, -1)
    losses = sampled_rkl(logits, TeacherTokenLogProbs(tokens, logp), temperature=T,
                         reduction="none")
    (q * losses).sum().backward()
    # value: E_q[log q - log p] = KL(q || p)
    torch.testing.assert_close((q * losses).sum(), rkl(s, t, temperature=T))
    y = s.clone().requires_grad_()
    rkl(y, t, temperature=T).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_sampled_rkl_importance_weights_and_clipping():
    s = logits_of(Q)  # log q(token 1) = log 0.5
    old = torch.tensor(ln(0.25), dtype=torch.float64)  # ratio = 2

    def run(teacher_p, **kw):
        x = s.clone().requires_grad_()
        teacher = TeacherTokenLogProbs(torch.tensor(1), torch.tensor(ln(teacher_p),
                                                                     dtype=torch.float64))
        loss = sampled_rkl(x, teacher, old_logprobs=old, **kw)
        loss.backward()
        return loss.item(), x.grad

    grad_logq = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64) - torch.tensor(Q,
                                                                               dtype=torch.float64)
    a_pos, a_neg = ln(0.6) - ln(0.5), ln(0.3) - ln(0.5)
    # A > 0: PPO takes the clipped 1.2 * A and the gradient is cut
    value, grad = run(0.6)
    assert value == pytest.approx(-1.2 * a_pos)
    torch.testing.assert_close(grad, torch.zeros(3, dtype=torch.float64))
    # A < 0: the unclipped 2 * A is the pessimistic one, gradient -2 A grad log q
    value, grad = run(0.3)
    assert value == pytest.approx(-2 * a_neg)
    torch.testing.assert_close(grad, -2 * a_neg * grad_logq)
    # no clipping: plain importance weight
    value, grad = run(0.6, clip=None)
    assert value == pytest.approx(-2 * a_pos)
    torch.testing.assert_close(grad, -2 * a_pos * grad_logq)
    # truncated importance weight: value and gradient use min(ratio, 1.5)
    value, grad = run(0.6, clip=None, max_weight=1.5)
    assert value == pytest.approx(-1.5 * a_pos)
    torch.testing.assert_close(grad, -1.5 * a_pos * grad_logq)
    # on-policy: gradient is REINFORCE -A grad log q
    x = s.clone().requires_grad_()
    teacher = TeacherTokenLogProbs(torch.tensor(1), torch.tensor(ln(0.6), dtype=torch.float64))
    sampled_rkl(x, teacher).backward()
    torch.testing.assert_close(x.grad, -a_pos * grad_logq)


# --------------------------------------------------------------------------- masks, reductions


@pytest.mark.parametrize("name", FULL + ["topk_tail"])
def test_mask_and_reductions(name):
    s, t = rand_logits(2, 4, 7, seed=17), rand_logits(2, 4, 7, seed=18)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    params = {"k": 3} if name == "topk_tail" else {}
    # garbage in the masked rows: inf and NaN logits for both sides
    bad_s, bad_t = s.clone(), t.clone()
    bad_s[~mask] = float("nan")
    bad_s[0, 1, 0] = float("inf")
    bad_t[~mask] = float("-inf")
    x = bad_s.clone().requires_grad_()
    total = divergence(name, x, bad_t, mask, reduction="sum", **params)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()
    # masked rows change nothing: same as the kept rows alone
    kept = divergence(name, s[mask], t[mask], reduction="none", **params)
    torch.testing.assert_close(total, kept.sum())
    per_pos = divergence(name, bad_s, bad_t, mask, reduction="none", **params)
    assert per_pos.shape == (2, 4) and (per_pos[~mask] == 0).all()
    torch.testing.assert_close(per_pos[mask], kept)
    mean = divergence(name, bad_s, bad_t, mask, reduction="mean", **params)
    torch.testing.assert_close(mean, total / 4)
    # a 0/1 float mask works the same
    torch.testing.assert_close(divergence(name, s, t, mask.double(), reduction="sum", **params),
                               total)
    # [B, S, V] and [N, V] agree
    torch.testing.assert_close(divergence(name, s, t, **params),
                               divergence(name, s.reshape(8, 7), t.reshape(8, 7), **params))


@pytest.mark.parametrize("name", FULL + ["topk_tail", "sampled_rkl"])
def test_all_masked_mean_is_zero(name):
    s, t = rand_logits(3, 5, seed=19), rand_logits(3, 5, seed=20)
    if name == "sampled_rkl":
        t = TeacherTokenLogProbs(torch.full((3,), -100), torch.full((3,), float("nan")))
    x = s.clone().requires_grad_()
    loss = divergence(name, x, t, torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert (x.grad == 0).all()


def test_sampled_rkl_mask_ignores_padding():
    s = rand_logits(2, 3, 5, seed=21)
    ids = torch.tensor([[1, 4, -100], [0, -100, -100]])
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("inf"), 0.0]],
                      dtype=torch.float64)
    old = torch.tensor([[-1.2, -1.9, float("nan")], [-0.7, 3.0, 0.0]], dtype=torch.float64)
    mask = ids != -100
    x = s.clone().requires_grad_()
    loss = sampled_rkl(x, TeacherTokenLogProbs(ids, lp), mask, old_logprobs=old,
                       reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and (x.grad[~mask] == 0).all()
    kept = sampled_rkl(s[mask], TeacherTokenLogProbs(ids[mask], lp[mask]),
                       old_logprobs=old[mask], reduction="sum")
    torch.testing.assert_close(loss, kept)


# --------------------------------------------------------------------------- temperature


def test_temperature_applies_to_both_sides():
    s, t, T = rand_logits(3, 6, seed=22), rand_logits(3, 6, seed=23), 2.5
    logq, logp = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    manual = (logp.exp() * (logp - logq)).sum(-1).mean()
    torch.testing.assert_close(fkl(s, t, temperature=T), manual)
    # teacher given as log-probs at T = 1 is re-tempered to the same distribution
    as_logprobs = TeacherLogProbs(F.log_softmax(t, -1))
    for name in FULL:
        torch.testing.assert_close(divergence(name, s, as_logprobs, temperature=T),
                                   divergence(name, s, t, temperature=T))
    torch.testing.assert_close(teacher_log_probs(as_logprobs, T, 6), logp)
    with pytest.raises(ValueError):
        fkl(s, t, temperature=0.0)


# --------------------------------------------------------------------------- topk_tail


@pytest.mark.parametrize("base", ["fkl", "rkl", "jsd", "tvd"])
def test_topk_tail_with_k_equal_v_is_the_base(base):
    s, t = rand_logits(4, 8, seed=24), rand_logits(4, 8, seed=25)
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        got = topk_tail(s.to(dtype), t.to(dtype), k=8, base=base, temperature=0.8,
                        reduction="none")
        want = divergence(base, s.to(dtype), t.to(dtype), temperature=0.8, reduction="none")
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("base", ["fkl", "rkl", "jsd", "tvd"])
def test_topk_tail_teacher_topk_matches_full_logits(base):
    s, t, T = rand_logits(2, 3, 10, seed=26), rand_logits(2, 3, 10, seed=27), 1.7
    top, ids = F.log_softmax(t / T, -1).topk(4, dim=-1)  # teacher's top-k at T
    full = topk_tail(s, t, k=4, base=base, temperature=T)
    given = topk_tail(s, TeacherTopK(ids, top), base=base, temperature=T)
    torch.testing.assert_close(given, full)
    # and the top-k divergence is below the full one (data processing inequality)
    assert full <= divergence(base, s, t, temperature=T) + 1e-12


def test_topk_tail_peaked_teacher_stays_finite():
    # Top-k mass that rounds to 1 leaves an empty teacher tail; reverse KL must stay finite.
    s = torch.zeros(1, 50)
    t = torch.full((1, 50), -60.0)
    t[0, 0] = 0.0
    for base in ["fkl", "rkl", "jsd", "tvd"]:
        x = s.clone().requires_grad_()
        loss = topk_tail(x, t, k=1, base=base)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- registry


def test_registry_contents():
    assert divergence_names() == tuple(DIVERGENCES)
    assert {"fkl", "rkl", "jsd", "tvd", "lk"} <= set(FULL)
    for name, d in DIVERGENCES.items():
        assert d.name == name and d.needs in ("full", "topk", "token")
        assert d.kernel is None or d.kernel.startswith("draftdistill.kernels.")
    assert set(kernel_divergences()) <= set(divergence_names())
    assert DIVERGENCES["jsd"].defaults == {"beta": 0.5}
    assert DIVERGENCES["lk"].defaults["eta"] == 3.0
    assert DIVERGENCES["topk_tail"].needs == "topk"
    assert DIVERGENCES["sampled_rkl"].needs == "token"
    assert all(DIVERGENCES[n].needs == "full" for n in FULL)


def test_parse_divergence():
    assert parse_divergence("tvd") == ("tvd", {})
    assert parse_divergence("jsd:beta=0.9") == ("jsd", {"beta": 0.9})
    assert parse_divergence(" topk_tail : k=20, base=rkl ") == ("topk_tail",
                                                                {"k": 20, "base": "rkl"})
    assert parse_divergence("sampled_rkl:clip=none,max_weight=2") == (
        "sampled_rkl", {"clip": None, "max_weight": 2})
    assert parse_divergence("lk:eta=2,batch_alpha=true") == ("lk", {"eta": 2,
                                                                    "batch_alpha": True})
    for bad in ["nope", "jsd:gamma=1", "jsd:beta", "jsd:beta=2", "topk_tail:base=ce",
                "topk_tail:k=0", "skew_fkl:alpha=1", "sampled_rkl:clip=1.5"]:
        with pytest.raises(ValueError):
            parse_divergence(bad)


def test_spec_grammar_is_shared_and_typed():
    assert parse_spec("opd:clip=none,reward_scale=1.25,importance_sampling=False,eps=1e-3") == (
        "opd", {"clip": None, "reward_scale": 1.25, "importance_sampling": False, "eps": 1e-3})
    assert parse_spec("  x ") == ("x", {}) and parse_spec("x:") == ("x", {})
    assert parse_spec("x:k=20,base=rkl,") == ("x", {"k": 20, "base": "rkl"})
    assert parse_spec(format_spec("jsd", {"beta": 0.5, "b": True, "c": None})) == (
        "jsd", {"beta": 0.5, "b": True, "c": None})
    for bad, says in [("", "expected a name"), (":beta=1", "expected a name"),
                      ("jsd:beta", "expected key=value"), ("jsd:=1", "expected key=value"),
                      ("jsd:beta=", "expected key=value"), ("jsd:beta=1,beta=2", "given twice"),
                      ("jsd:be-ta=1", "parameter name"), ("js d", "expected a name")]:
        with pytest.raises(ValueError, match=says) as err:
            parse_spec(bad, "divergence")
        assert repr(bad) in str(err.value) and "divergence" in str(err.value)
    # The divergence parser is this grammar plus the registry's checks, and names the spec.
    with pytest.raises(ValueError, match=r"'jsd:beta=2'.*beta"):
        parse_divergence("jsd:beta=2")
    with pytest.raises(ValueError, match=r"'kl:beta=1'.*unknown divergence 'kl'; known: fkl"):
        parse_divergence("kl:beta=1")


def test_a_reference_only_divergence_is_registered_like_any_other(monkeypatch):
    def half_tvd(student_logits, teacher, mask=None, temperature=1.0, reduction="mean",
                 weight: float = 0.5):
        return weight * tvd(student_logits, teacher, mask=mask, temperature=temperature,
                            reduction=reduction)

    monkeypatch.setitem(DIVERGENCES, "half_tvd", make_divergence("half_tvd", half_tvd, "full"))
    assert "half_tvd" in divergence_names("full") and "half_tvd" not in kernel_divergences()
    assert DIVERGENCES["half_tvd"].defaults == {"weight": 0.5}
    assert parse_divergence("half_tvd:weight=0.2") == ("half_tvd", {"weight": 0.2})
    s, t = rand_logits(3, 5, seed=40), rand_logits(3, 5, seed=41)
    torch.testing.assert_close(get_divergence("half_tvd", weight=0.2)(s, t), 0.2 * tvd(s, t))
    with pytest.raises(TypeError, match="must start with"):
        make_divergence("bad", lambda logits, teacher: logits, "full")
    with pytest.raises(ValueError, match="needs"):
        make_divergence("bad", half_tvd, "logits")


def test_get_divergence_binds_and_validates():
    s, t = rand_logits(3, 5, seed=28), rand_logits(3, 5, seed=29)
    fn = get_divergence("jsd", beta=0.9)
    assert fn.__name__ == "jsd" and fn.params == {"beta": 0.9}
    torch.testing.assert_close(fn(s, t), jsd(s, t, beta=0.9))
    torch.testing.assert_close(fn(s, t, beta=0.1), jsd(s, t, beta=0.1))  # call-time override
    with pytest.raises(ValueError, match="known: fkl"):
        get_divergence("kl")
    with pytest.raises(ValueError, match="unknown parameter"):
        get_divergence("fkl", beta=0.5)
    with pytest.raises(ValueError, match="unknown parameter"):
        get_divergence("jsd")(s, t, alpha=0.1)
    with pytest.raises(ValueError):
        get_divergence("jsd", beta=-0.1)
    with pytest.raises(ValueError):
        fkl(s, t, reduction="avg")


def test_teacher_form_errors():
    s, t = rand_logits(3, 5, seed=30), rand_logits(3, 5, seed=31)
    top, ids = t.topk(2, dim=-1)
    token = TeacherTokenLogProbs(torch.zeros(3, dtype=torch.long), torch.zeros(3))
    for name in FULL:
        with pytest.raises(TypeError, match="topk_tail"):
            divergence(name, s, TeacherTopK(ids, top))
        with pytest.raises(TypeError):
            divergence(name, s, token)
    with pytest.raises(TypeError):
        acceptance_rate(s, TeacherTopK(ids, top))
    with pytest.raises(TypeError):
        topk_tail(s, token)
    with pytest.raises(TypeError):
        sampled_rkl(s, t)
    with pytest.raises(TypeError):
        teacher_log_probs(TeacherTopK(ids, top), 1.0, 5)
    with pytest.raises(ValueError):
        fkl(s, rand_logits(3, 6))


def test_fused_kernel_dispatch_is_cuda_only():
    calls = []
    FUSED_KERNELS["fkl"] = lambda *a, **k: calls.append(1)
    try:
        s, t = rand_logits(2, 5, seed=32), rand_logits(2, 5, seed=33)
        torch.testing.assert_close(get_divergence("fkl")(s, t), fkl(s, t))  # CPU: reference
        assert calls == []
    finally:
        del FUSED_KERNELS["fkl"]


def test_fused_kernel_used_for_cuda_logits():
    # No GPU here: a stand-in with is_cuda = True shows the dispatch and the bound params.
    class FakeCuda:
        is_cuda = True

    seen = {}
    FUSED_KERNELS["jsd"] = lambda s, t, **kw: seen.update(kw) or "fused"
    try:
        assert get_divergence("jsd", beta=0.9)(FakeCuda(), None) == "fused"
        assert seen == {"mask": None, "temperature": 1.0, "reduction": "mean", "beta": 0.9}
    finally:
        del FUSED_KERNELS["jsd"]


def test_teacher_is_detached_and_bf16_input():
    s = rand_logits(2, 5, seed=34).to(torch.bfloat16).requires_grad_()
    t = rand_logits(2, 5, seed=35).requires_grad_()
    loss = fkl(s, t)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert t.grad is None
