"""The EAGLE-3 head as a drafter in the lossless decoder (spec/drafting.py, Eagle3Drafting).

- greedy: token-for-token equal to the target's greedy decoding, for a random head, a head trained
  for a few seconds (many acceptances, rejections at every depth), and heads over a reduced draft
  vocabulary that misses tokens the target picks;
- sampled: the law of the first tokens equals the target's exact law (chi-square, the helpers of
  test_spec.py), with q = 0 on the tokens outside the draft vocabulary;
- bookkeeping: every q the decoder drafted from equals a fresh computation from the committed
  sequence alone (full target forward -> aux states -> head prefix -> chain).
"""
import pytest
import torch
from test_spec import one_thread  # noqa: F401  (autouse: tiny models run on one thread)
from test_spec import T07_P08, T1, chi_square_pvalue, exact_distribution, hf_greedy, sample_counts, tiny_llama

import draftdistill.spec.drafting as drafting_module
from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import build_eagle3_head, target_aux_hidden_states
from draftdistill.spec import logits_to_probs, speculative_generate, target_generate

PROMPT = torch.tensor([[3, 5, 7, 11]])


def train_head(head, target, steps=120, ttt=2, seed=0):
    """A minimal TTT loop (teacher-forced tokens, loss weights 0.8^j, SpecForge's teacher and mask)
    on the target's own greedy continuations: enough for the head to agree with the target often."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.cat([PROMPT, torch.randint(0, 32, (7, 4), generator=g)])
    with torch.no_grad():
        ids = torch.stack([torch.tensor(p.tolist() + hf_greedy(target, p[None], 40)) for p in prompts])
        aux, out = target_aux_hidden_states(target, ids, head.aux_layer_ids)
    vocab, T = head.vocab, ids.shape[1] - 1
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        cache = head.new_cache()
        hidden, loss = head.fuse(aux[:, :T]), 0.0
        for j in range(ttt):
            # position t at step j eats x_{t+1+j} and predicts x_{t+2+j}, scored by p(. | x_<=t+1+j)
            tokens = torch.nn.functional.pad(ids[:, 1 + j:], (0, j))
            teacher = torch.nn.functional.pad(out.logits[:, 1 + j:], (0, 0, 0, j))
            valid = (torch.arange(T) < T - j) & vocab.loss_mask(teacher)
            logits, hidden = head(tokens, hidden, cache, step=j)
            ce = -(vocab.restrict_logits(teacher).softmax(-1) * logits.log_softmax(-1)).sum(-1)
            loss = loss + 0.8 ** j * (ce * valid).sum() / valid.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


@pytest.fixture(scope="module")
def greedy_setup():
    target = tiny_llama(32, seed=0, layers=5)
    reduced = DraftVocab(list(range(0, 32, 2)), 32)  # half the tokens: the target's odd picks are never drafted
    heads = {
        "random": build_eagle3_head(target, aux_layer_ids=[0, 1, 3], seed=1),
        "random_reduced": build_eagle3_head(target, reduced, aux_layer_ids=[0, 2, 3], seed=2),
        "trained": train_head(build_eagle3_head(target, aux_layer_ids=[0, 1, 3], seed=3), target),
        "trained_reduced": train_head(build_eagle3_head(target, reduced, aux_layer_ids=[1, 2, 3], seed=4), target),
    }
    return target, heads, hf_greedy(target, PROMPT, 60)


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("head_name", ["random", "random_reduced", "trained", "trained_reduced"])
def test_greedy_equals_target_greedy(greedy_setup, head_name, gamma):
    target, heads, reference = greedy_setup
    n = 47  # not a multiple of gamma + 1: the budget cuts a block
    ours, stats = speculative_generate(target, heads[head_name], PROMPT, n, gamma=gamma)
    assert ours.tolist() == reference[:n] == target_generate(target, PROMPT, n)[0].tolist()
    assert stats.new_tokens == n == sum(stats.accepted) + stats.target_calls
    assert stats.drafter_calls >= sum(stats.proposed)
    if head_name.startswith("trained"):  # rejections and acceptances, past the first position too
        assert 0.3 < stats.alpha < 1.0, stats
        if gamma > 1:
            assert stats.accepted[1] > 0, stats
    if head_name.endswith("reduced"):  # odd tokens are off the draft vocab: only the target emits them
        assert any(t % 2 for t in ours.tolist())


def test_first_round_is_the_prefill(greedy_setup):
    """No target features before the first target forward: round 1 drafts nothing."""
    target, heads, reference = greedy_setup
    ours, stats = speculative_generate(target, heads["trained"], PROMPT, 1, gamma=4)
    assert ours.tolist() == reference[:1] and stats.target_calls == 1 and sum(stats.proposed) == 0
    assert stats.drafter_calls == 0


@pytest.mark.parametrize("gamma", [2, 4])
def test_greedy_stops_right_after_eos(greedy_setup, gamma):
    target, heads, reference = greedy_setup
    eos = reference[12]
    expected = reference[: reference.index(eos) + 1]
    for head in heads.values():
        ours, stats = speculative_generate(target, head, PROMPT, 40, gamma=gamma, eos_token_id=eos)
        assert ours.tolist() == expected and stats.new_tokens == len(expected)


def test_every_draft_distribution_matches_a_fresh_computation(greedy_setup, monkeypatch):
    """The session's cache and pending target rows are what they should be: the q of every draft in
    every round equals the head run from scratch on the committed sequence (full target forward ->
    aux rows 0..L-2 -> step 0 over all of them -> the chain over the same drafts)."""
    target, heads, _ = greedy_setup
    head = heads["trained_reduced"]
    rounds, real_propose = [], drafting_module.Eagle3Drafting.propose

    def recording_propose(self, seq, g, sampling, generator, eos):
        drafts, probs = real_propose(self, seq, g, sampling, generator, eos)
        rounds.append((list(seq), drafts, probs))
        return drafts, probs

    monkeypatch.setattr(drafting_module.Eagle3Drafting, "propose", recording_propose)
    generator = torch.Generator().manual_seed(0)
    _, stats = speculative_generate(target, head, PROMPT, 40, gamma=3, sampling=T1, generator=generator)
    assert 0.2 < stats.alpha < 0.95 and len(rounds) == stats.target_calls

    checked = 0
    with torch.no_grad():
        for seq, drafts, probs in rounds:
            if not drafts:
                continue
            ids = torch.tensor([seq])
            aux, _ = target_aux_hidden_states(target, ids, head.aux_layer_ids)
            cache = head.new_cache()
            logits, h = head(ids[:, 1:], head.fuse(aux[:, :-1]), cache, num_logits=1)
            for j, (token, q) in enumerate(zip(drafts, probs)):
                assert bool(head.vocab.contains(torch.tensor(token))) and q[~head.vocab.t2d].eq(0).all()
                fresh = logits_to_probs(head.vocab.to_target_logits(logits[0, -1]), T1)
                torch.testing.assert_close(q, fresh, rtol=1e-9, atol=1e-12)
                checked += 1
                logits, h = head(torch.tensor([[token]]), h[:, -1:], cache, step=j + 1)
    assert checked == stats.drafter_calls  # one q per drafter forward


# ---------------------------------------------------------------- sampled losslessness

@pytest.fixture(scope="module")
def dist_setup():
    target = tiny_llama(6, seed=3, layers=4, hidden=16, heads=2, kv_heads=1, init=0.3)
    return target, {
        "full": build_eagle3_head(target, aux_layer_ids=[0, 1, 2], seed=5),
        "reduced": build_eagle3_head(target, DraftVocab([0, 2, 3, 5], 6), aux_layer_ids=[0, 1, 2], seed=6),
    }


@pytest.mark.parametrize("head_name, sampling, gamma", [
    ("full", T1, 2),
    ("reduced", T1, 3),  # q = 0 on tokens 1 and 4, which the target does emit
    ("reduced", T07_P08, 2),
])
def test_sampled_output_follows_target_distribution(dist_setup, head_name, sampling, gamma):
    target, heads = dist_setup
    length, n = 3, 3000
    exact = exact_distribution(target, [0, 2], length, sampling)
    counts, stats = sample_counts(target, heads[head_name], length, sampling, gamma, n)
    assert sum(counts.values()) == n
    assert chi_square_pvalue(counts, exact, n) > 1e-3
    assert 0.1 < stats.alpha < 0.9, stats  # both the accept and the reject/residual paths ran
    if head_name == "reduced":  # tokens off the draft vocab were emitted (by the target), never accepted drafts
        assert any(t in (1, 4) for seq in counts for t in seq)


def test_chi_square_sees_a_q_that_is_not_zero_off_the_draft_vocab(dist_setup, monkeypatch):
    """Negative control: drafts still come from the head's q (zero on tokens 1 and 4), but verify is
    told a q with mass there. Rejection sampling is exact only for the q the drafts were drawn from,
    so the output law goes wrong, and the test has the power to see it."""
    target, heads = dist_setup
    off_vocab = (~heads["reduced"].vocab.t2d).double()
    real_propose = drafting_module.Eagle3Drafting.propose

    def leaky_propose(self, seq, g, sampling, generator, eos):
        drafts, probs = real_propose(self, seq, g, sampling, generator, eos)
        return drafts, [0.5 * q + 0.5 * off_vocab / off_vocab.sum() for q in probs]

    monkeypatch.setattr(drafting_module.Eagle3Drafting, "propose", leaky_propose)
    exact = exact_distribution(target, [0, 2], 3, T1)
    counts, _ = sample_counts(target, heads["reduced"], 3, T1, 3, 1000)
    assert chi_square_pvalue(counts, exact, 1000) < 1e-6
