"""Tests for draftdistill.spec: the speculative decoder must be lossless.

- greedy: token-for-token equal to the target's own greedy decoding (ours and HF generate);
- sampled: the law of the first few tokens equals the target's exact law (chi-square against an
  enumeration), for a perfect, a random and an adversarial drafter;
- verify alone: 200k vectorised trials per (p, q) pair, q zero where p is not and vice versa;
- KV caches: every logit row the loop computes equals a no-cache forward over the same context, the
  target's cache only ever holds committed tokens, and 100-token greedy runs with rejections at
  every block depth match HF generate;
- stats: counters add up.
Tiny random Llamas in float64, so batched and incremental forwards cannot flip a greedy argmax.
"""
import json
import math

import pytest
import torch
from scipy.stats import binomtest, chisquare
from transformers import LlamaConfig, LlamaForCausalLM

import draftdistill.spec.decoder as decoder_module
from draftdistill.spec import (
    SamplingConfig,
    SpecStats,
    logits_to_probs,
    sample_token,
    speculative_generate,
    target_generate,
    verify,
    verify_batch,
)

GREEDY = SamplingConfig()
T1 = SamplingConfig(temperature=1.0)
T07_P08 = SamplingConfig(temperature=0.7, top_p=0.8)


def tiny_llama(vocab, seed, layers=1, hidden=32, heads=4, kv_heads=2, init=0.2):
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=128, initializer_range=init,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float64).eval()


class Adversarial(torch.nn.Module):
    """A drafter that favours what the target avoids, yet runs a real model with a real KV cache:
    q = mix * softmax(logits) + (1 - mix) * softmax(-3 * logits) of the wrapped model. With mix=0 it
    always proposes the wrapped model's least likely token (greedy: every draft is rejected); with
    mix=0.5 half its mass sits on tokens the target rarely picks, so both accept and reject paths run.
    Its forward takes only the three arguments the decoder promises to pass (no logits_to_keep)."""

    def __init__(self, model, mix=0.0, scale=-3.0):
        super().__init__()
        self.model, self.mix, self.scale = model, mix, scale

    def forward(self, input_ids, past_key_values, use_cache):
        out = self.model(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache)
        q = self.mix * out.logits.softmax(-1) + (1 - self.mix) * (self.scale * out.logits).softmax(-1)
        out.logits = q.log()
        return out


class Flaky(torch.nn.Module):
    """The wrapped model, except that its prediction for a fixed random 30% of the positions is
    negated (greedy: its argmin). Greedy acceptance then runs for an irregular number of drafts and
    breaks, so rejections land at every depth of a block."""

    def __init__(self, model, rate=0.3, seed=0):
        super().__init__()
        self.model = model
        self.wrong = torch.rand(1024, generator=torch.Generator().manual_seed(seed)) < rate

    def forward(self, input_ids, past_key_values, use_cache):
        start = past_key_values.get_seq_length()
        out = self.model(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache)
        flip = self.wrong[start: start + input_ids.shape[1]].view(1, -1, 1)
        out.logits = torch.where(flip, -out.logits, out.logits)
        return out


class Recorder(torch.nn.Module):
    """Pass-through that records (cache length before the call, input tokens, returned logits)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, input_ids, past_key_values, **kwargs):
        start = past_key_values.get_seq_length()
        out = self.model(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
        self.calls.append((start, input_ids[0].tolist(), out.logits[0].clone()))
        return out


def hf_greedy(model, ids, n, eos=None):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, pad_token_id=0, eos_token_id=eos)
    return out[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, and when the CPU is
    shared it makes each op wait for a busy core (measured 16x slower). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPT = torch.tensor([[3, 5, 7, 11]])


@pytest.fixture(scope="module")
def greedy_setup():
    target = tiny_llama(32, seed=0, layers=2)
    drafters = {
        "self": target,
        "random": tiny_llama(32, seed=1, layers=1),
        "adversarial": Adversarial(target),  # greedy: proposes the target's argmin, always rejected
    }
    return target, drafters, hf_greedy(target, PROMPT, 40)


# ---------------------------------------------------------------- sampling.py

def test_logits_to_probs_greedy_temperature_top_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 5.0]])
    greedy = logits_to_probs(logits, GREEDY)
    assert greedy.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]  # first index on ties, like argmax
    assert torch.allclose(logits_to_probs(logits, T1), torch.softmax(logits, -1))
    assert torch.allclose(logits_to_probs(logits, SamplingConfig(temperature=0.5)), torch.softmax(logits / 0.5, -1))
    assert logits_to_probs(logits.to(torch.bfloat16), T1).dtype == torch.float32

    p = torch.tensor([0.1, 0.4, 0.2, 0.3])
    nucleus = lambda top_p: logits_to_probs(p.log(), SamplingConfig(temperature=1.0, top_p=top_p))  # noqa: E731
    assert torch.allclose(nucleus(0.35), torch.tensor([0.0, 1.0, 0.0, 0.0]))  # 0.4 alone reaches 0.35
    assert torch.allclose(nucleus(0.5), torch.tensor([0.0, 0.4, 0.0, 0.3]) / 0.7)  # smallest set >= 0.5
    assert torch.allclose(nucleus(0.9), torch.tensor([0.0, 0.4, 0.2, 0.3]) / 0.9)
    assert torch.allclose(nucleus(0.95), p)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=1.0, top_p=0.0)


# ---------------------------------------------------------------- verify.py

VERIFY_CASES = {
    # q has zeros where p has mass and mass where p is zero
    "mismatched_support": ([[0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 0.5, 0.25, 0.25]],
                           [[0.0, 0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.0, 0.25, 0.25]]),
    "disjoint_support": ([[0.6, 0.4, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2, 0.2]],
                         [[0.0, 0.0, 0.3, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0, 0.0]]),
    "random_dense": (torch.softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(1)) * 2, -1).tolist(),
                     torch.softmax(torch.randn(2, 5, generator=torch.Generator().manual_seed(2)) * 2, -1).tolist()),
}


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_emits_target_distribution_for_any_q(case):
    """Many independent blocks in one vectorised call. With position-wise p that do not depend on the
    prefix, the k-th emitted token (given the block has k tokens) must follow p_k exactly, and the
    first draft is accepted with probability sum_v min(p(v), q(v))."""
    p, q = (torch.tensor(t, dtype=torch.float64) for t in VERIFY_CASES[case])
    g, V, trials = q.shape[0], q.shape[1], 200_000
    generator = torch.Generator().manual_seed(0)
    drafts = torch.stack([torch.multinomial(q[i], trials, replacement=True, generator=generator)
                          for i in range(g)], dim=1)  # [trials, g], x_i ~ q_i
    n, next_token = verify_batch(drafts, q.expand(trials, g, V), p.expand(trials, g + 1, V), generator)
    assert n.min() >= 0 and n.max() <= g
    for k in range(g + 1):
        # the k-th emitted token: an accepted draft if k < n, the verifier's own token if k == n
        reached = n >= k
        token = torch.where(n[reached] > k, drafts[reached, min(k, g - 1)], next_token[reached])
        counts = torch.bincount(token, minlength=V).double()
        if counts.sum() == 0:  # position never reached (e.g. disjoint supports: nothing is accepted)
            continue
        assert counts[p[k] == 0].sum() == 0, k  # never emits a token the target cannot
        support = p[k] > 0
        expected = p[k][support] / p[k][support].sum() * counts.sum()
        if support.sum() > 1:
            assert chisquare(counts[support].numpy(), expected.numpy()).pvalue > 1e-3, k
    alpha = float(torch.minimum(p[0], q[0]).sum())
    first_accepted = int((n >= 1).sum())
    if 0 < alpha < 1:
        assert binomtest(first_accepted, trials, alpha).pvalue > 1e-3
    else:
        assert first_accepted == round(alpha * trials)


def test_verify_is_verify_batch_of_one():
    p = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(5)), -1)
    q = torch.softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(6)), -1)
    drafts = torch.tensor([1, 4, 6])
    for seed in range(20):
        n, t = verify_batch(drafts[None], q[None], p[None], torch.Generator().manual_seed(seed))
        assert verify(drafts, q, p, torch.Generator().manual_seed(seed)) == (int(n[0]), int(t[0]))


def test_verify_greedy_is_argmax_agreement():
    one_hot = lambda ids: torch.nn.functional.one_hot(torch.tensor(ids), 6).double()  # noqa: E731
    p = one_hot([2, 4, 1])
    assert verify(torch.tensor([2, 3]), one_hot([2, 3]), p) == (1, 4)  # second draft wrong: target's argmax
    assert verify(torch.tensor([2, 4]), one_hot([2, 4]), p) == (2, 1)  # all accepted: bonus argmax
    assert verify(torch.tensor([0, 4]), one_hot([0, 4]), p) == (0, 2)
    assert verify(torch.zeros(0, dtype=torch.long), torch.zeros(0, 6), p[:1]) == (0, 2)  # no drafts


# ---------------------------------------------------------------- greedy losslessness

@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("drafter_name", ["self", "random", "adversarial"])
def test_greedy_equals_target_greedy(greedy_setup, drafter_name, gamma):
    target, drafters, reference = greedy_setup
    n = 23  # not a multiple of gamma + 1 for any gamma here: the budget cuts a block
    ours, stats = speculative_generate(target, drafters[drafter_name], PROMPT, n, gamma=gamma)
    plain, plain_stats = target_generate(target, PROMPT, n)
    assert ours.tolist() == plain.tolist() == reference[:n]
    assert plain_stats.target_calls == n
    # each round emits its accepted drafts + one target token; one drafter forward per draft
    assert stats.new_tokens == n == sum(stats.accepted) + stats.target_calls
    assert stats.drafter_calls >= sum(stats.proposed)  # drafts behind a rejection are never looked at
    assert all(0.0 <= a <= 1.0 for a, r in zip(stats.alpha_per_position, stats.proposed) if r)
    assert len(stats.proposed) == gamma and stats.target_calls <= n
    if drafter_name == "adversarial":
        assert stats.alpha == 0.0 and stats.target_calls == n  # every draft rejected, caches rolled back each round


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 6, 7])
def test_greedy_budget_cut_mid_block(greedy_setup, max_new_tokens):
    target, drafters, reference = greedy_setup
    for name, drafter in drafters.items():
        ours, stats = speculative_generate(target, drafter, PROMPT, max_new_tokens, gamma=5)
        assert ours.tolist() == reference[:max_new_tokens]
        assert stats.new_tokens == max_new_tokens
        if name == "self":  # gamma shrinks near the budget: every draft lands inside it and is kept
            assert sum(stats.proposed) == max_new_tokens - stats.target_calls
            assert stats.target_calls == math.ceil(max_new_tokens / 6)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_stops_right_after_eos(greedy_setup, gamma):
    target, drafters, reference = greedy_setup
    eos = reference[9]
    expected = reference[: reference.index(eos) + 1]
    assert 1 < len(expected) < 30
    assert hf_greedy(target, PROMPT, 30, eos=eos) == expected
    assert target_generate(target, PROMPT, 30, eos_token_id=eos)[0].tolist() == expected
    unused = next(t for t in range(32) if t not in reference)  # a second eos id that never fires
    for drafter in drafters.values():
        ours, stats = speculative_generate(target, drafter, PROMPT, 30, gamma=gamma, eos_token_id=[unused, eos])
        assert ours.tolist() == expected
        assert stats.new_tokens == len(expected)


# ---------------------------------------------------------------- KV-cache bookkeeping

@pytest.mark.parametrize("gamma", [2, 5])
@pytest.mark.parametrize("drafter_name", ["adversarial", "flaky", "random"])
def test_greedy_long_output_with_frequent_rejections(greedy_setup, drafter_name, gamma):
    """100 tokens with rejections at every depth of the block: one wrong crop would show up as a
    different token somewhere down the line."""
    target, drafters, _ = greedy_setup
    drafter = Flaky(target) if drafter_name == "flaky" else drafters[drafter_name]
    n = 100
    reference = hf_greedy(target, PROMPT, n)
    ours, stats = speculative_generate(target, drafter, PROMPT, n, gamma=gamma)
    assert ours.tolist() == reference == target_generate(target, PROMPT, n)[0].tolist()
    assert stats.new_tokens == n == sum(stats.accepted) + stats.target_calls
    if drafter_name == "flaky":  # rejections at several depths, acceptances too
        assert 0.4 < stats.alpha < 0.9, stats
        assert all(0 < a < 1 for a in stats.alpha_per_position[:2]), stats



@pytest.mark.parametrize("drafter_name, sampling", [("random", T1), ("adversarial", GREEDY), ("adversarial", T1)])
def test_cached_logits_match_full_forward(greedy_setup, drafter_name, sampling):
    """Every logit row either model produced equals a no-cache forward over the context its cache
    held; the target's cache holds only committed tokens at each call; and its rows over the
    committed sequence match one full forward over the final sequence."""
    target, drafters, _ = greedy_setup
    rec_target = Recorder(target)
    if drafter_name == "adversarial":  # record the real model inside the adversarial wrapper
        rec_drafter = Recorder(target)
        drafter = Adversarial(rec_drafter)
    else:
        rec_drafter = drafter = Recorder(drafters[drafter_name])
    generator = torch.Generator().manual_seed(0)
    out, stats = speculative_generate(rec_target, drafter, PROMPT, 30, gamma=3, sampling=sampling,
                                      generator=generator)
    final = PROMPT[0].tolist() + out.tolist()
    assert stats.alpha < 0.8 and stats.target_calls == len(rec_target.calls)  # rejections happened

    with torch.inference_mode():
        full_final = target(torch.tensor([final])).logits[0]
        for rec in (rec_target, rec_drafter):
            ctx = []
            for start, tokens, logits in rec.calls:
                assert start <= len(ctx)  # the cache is a prefix of what the model was fed
                ctx = ctx[:start] + tokens
                k = logits.shape[0]
                fresh = rec.model(torch.tensor([ctx])).logits[0, -k:]
                torch.testing.assert_close(logits, fresh, rtol=1e-9, atol=1e-9)
                if rec is rec_target:
                    assert ctx[:start] == final[:start]  # only committed tokens were cached
                    for row, pos in enumerate(range(len(ctx) - k, len(ctx))):
                        if ctx[: pos + 1] == final[: pos + 1]:
                            torch.testing.assert_close(logits[row], full_final[pos], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- sampled losslessness

def exact_distribution(target, prompt, length, sampling, eos=()):
    """P(first `length` tokens) under the target's own sampling, by enumerating all prefixes; a
    sequence ends early at an eos token."""
    vocab = target.config.vocab_size
    frontier, result = {(): 1.0}, {}
    with torch.inference_mode():
        for step in range(length):
            next_frontier = {}
            for prefix, prob in frontier.items():
                logits = target(torch.tensor([prompt + list(prefix)])).logits[0, -1]
                p = logits_to_probs(logits, sampling).tolist()
                for v in range(vocab):
                    done = v in eos or step == length - 1
                    (result if done else next_frontier)[prefix + (v,)] = prob * p[v]
            frontier = next_frontier
    return result


def chi_square_pvalue(counts, expected_probs, n):
    """Goodness of fit; cells with expected count < 5 are pooled (sorted ascending until >= 5)."""
    assert set(counts) <= {s for s, p in expected_probs.items() if p > 0}, "emitted an impossible sequence"
    cells = sorted(expected_probs.items(), key=lambda kv: kv[1])
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for seq, p in cells:
        if p * n >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(p * n)
        else:
            pool_o, pool_e = pool_o + counts.get(seq, 0), pool_e + p * n
    if pool_e > 0:
        if pool_e >= 5 or not exp:
            obs.append(pool_o)
            exp.append(pool_e)
        else:  # fold a too-small pool into the smallest regular cell
            obs[0] += pool_o
            exp[0] += pool_e
    scale = n / sum(exp)  # absorb float rounding of the exact total
    return chisquare(obs, [e * scale for e in exp]).pvalue


@pytest.fixture(scope="module")
def dist_models():
    # init 0.3: distributions neither flat nor one-hot, so many sequences have visible mass
    target = tiny_llama(6, seed=3, hidden=16, heads=2, kv_heads=1, init=0.3)
    return target, {
        "self": target,  # alpha = 1
        "random": tiny_llama(6, seed=4, hidden=16, heads=2, kv_heads=1, init=0.3),  # alpha ~ 0.1-0.2
        "adversarial": Adversarial(target, mix=0.5),  # alpha ~ 0.3-0.4, q mass where p has almost none
    }


def sample_counts(target, drafter, length, sampling, gamma, n, eos=None, seed=1234):
    prompt = torch.tensor([[0, 2]])
    generator = torch.Generator().manual_seed(seed)
    counts, total = {}, SpecStats()
    for _ in range(n):
        tokens, stats = speculative_generate(target, drafter, prompt, length, gamma=gamma, sampling=sampling,
                                             eos_token_id=eos, generator=generator)
        seq = tuple(tokens.tolist())
        counts[seq] = counts.get(seq, 0) + 1
        total = total.merge(stats)
    return counts, total


@pytest.mark.parametrize("drafter_name, sampling, gamma, eos", [
    ("self", T1, 3, None),
    ("random", T1, 1, None),
    ("adversarial", T1, 2, None),
    ("random", T07_P08, 2, None),
    ("adversarial", T07_P08, 1, None),
    ("adversarial", T1, 2, [1]),  # eos ends sequences early; the drafter stops drafting at eos
])
def test_sampled_output_follows_target_distribution(dist_models, drafter_name, sampling, gamma, eos):
    target, drafters = dist_models
    length, n = 3, 3000
    exact = exact_distribution(target, [0, 2], length, sampling, eos=eos or ())
    assert abs(sum(exact.values()) - 1) < 1e-9
    counts, stats = sample_counts(target, drafters[drafter_name], length, sampling, gamma, n, eos=eos)
    assert sum(counts.values()) == n
    assert chi_square_pvalue(counts, exact, n) > 1e-3
    assert stats.new_tokens == sum(len(s) * c for s, c in counts.items())
    if drafter_name == "self":
        assert stats.alpha == 1.0
    if drafter_name == "adversarial":
        assert 0.1 < stats.alpha < 0.6  # both the accept and the reject/residual paths really ran


def accept_everything(drafts, q, p, generator=None):
    return len(drafts), sample_token(p[-1], generator)


def resample_from_p(drafts, q, p, generator=None):
    """The classic bug: after a rejection, draw from p instead of norm(max(0, p - q))."""
    for i, x in enumerate(drafts.tolist()):
        if torch.rand((), generator=generator, dtype=torch.float64) * q[i, x] >= p[i, x]:
            return i, sample_token(p[i], generator)
    return len(drafts), sample_token(p[-1], generator)


@pytest.mark.parametrize("lossy_verify", [accept_everything, resample_from_p])
def test_chi_square_catches_a_lossy_decoder(dist_models, monkeypatch, lossy_verify):
    """Negative control: the distribution test has the power to see a wrong verify step."""
    target, drafters = dist_models
    exact = exact_distribution(target, [0, 2], 3, T1)
    monkeypatch.setattr(decoder_module, "verify", lossy_verify)
    counts, _ = sample_counts(target, drafters["random"], 3, T1, 2, 1000)
    assert chi_square_pvalue(counts, exact, 1000) < 1e-6


# ---------------------------------------------------------------- stats

def test_target_as_drafter_greedy_accepts_everything(greedy_setup):
    target, _, reference = greedy_setup
    gamma = 4
    tokens, stats = speculative_generate(target, target, PROMPT, 3 * (gamma + 1), gamma=gamma)
    assert tokens.tolist() == reference[: 3 * (gamma + 1)] and len(tokens) == stats.new_tokens
    assert stats.alpha_per_position == [1.0] * gamma and stats.alpha == 1.0
    assert stats.target_calls == 3 and stats.tau == gamma + 1
    assert stats.drafter_calls == 3 * gamma and stats.drafts_scored == 3 * gamma
    # a partial last block: 3 full rounds then one round of 2 tokens (1 draft + bonus)
    tokens, stats = speculative_generate(target, target, PROMPT, 3 * (gamma + 1) + 2, gamma=gamma)
    assert stats.target_calls == 4 and stats.proposed == [4, 3, 3, 3] and stats.accepted == stats.proposed
    assert stats.tau == (3 * (gamma + 1) + 2) / 4


def test_spec_stats_counting_and_merging():
    a = SpecStats.empty(3)
    a.record_round(3, 1)  # d0 accepted, d1 rejected, d2 never looked at
    a.record_round(3, 3)
    a.record_round(2, 0)  # shrunk gamma near the budget; d0 rejected
    assert a.proposed == [3, 2, 1] and a.accepted == [2, 1, 1]
    assert a.alpha_per_position == [2 / 3, 0.5, 1.0]
    assert a.alpha == 4 / 6
    a.target_calls, a.new_tokens, a.seconds = 3, 7, 2.0
    assert a.tau == 7 / 3 and a.tokens_per_second == 3.5

    b = SpecStats.empty(5)
    b.record_round(5, 5)
    b.target_calls, b.new_tokens, b.drafter_calls = 1, 6, 5
    merged = a.merge(b)
    assert merged.proposed == [4, 3, 2, 1, 1] and merged.accepted == [3, 2, 2, 1, 1]
    assert merged.target_calls == 4 and merged.new_tokens == 13 and merged.drafter_calls == 5
    assert merged.seconds == 2.0
    assert sum([a, b]).to_dict() == merged.to_dict() == (a + b).to_dict()
    assert a.proposed == [3, 2, 1] and b.proposed == [1] * 5  # merge does not mutate its operands

    empty = SpecStats.empty(2)
    assert math.isnan(empty.tau) and math.isnan(empty.alpha_per_position[0])
    d = empty.to_dict()
    assert d["tau"] is None and d["alpha_per_position"] == [None, None]
    json.dumps(merged.to_dict(), allow_nan=False)


def test_vocab_mismatch_is_rejected(greedy_setup):
    target, _, _ = greedy_setup
    with pytest.raises(ValueError, match="vocab"):
        speculative_generate(target, tiny_llama(40, seed=5), PROMPT, 5, gamma=2)
