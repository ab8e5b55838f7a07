"""The peers' accept length (1 + accepted drafts / verify steps) beside tau (tokens / target call).

A verify step is a target forward that verified at least one draft: the EAGLE-3 prefill (which drafts
nothing) and a last forward left no room to draft are target calls (in tau) but not verify steps. The
decoder's own per-round counts are read by wrapping its verify functions, and the reported
accept_length is checked against them for an LM drafter and an EAGLE-3 head, chains and trees.
"""
import math

import pytest
import torch
from test_spec import T1, one_thread, tiny_llama  # noqa: F401  (one_thread: autouse)
from test_spec_eagle3 import train_head

import draftdistill.spec.decoder as decoder_module
import draftdistill.spec.tree_decoder as tree_decoder_module
from draftdistill.eval import evaluate_drafter
from draftdistill.eval.bench_spec import run_spec_benchmark
from draftdistill.models import build_pruned_drafter
from draftdistill.models.eagle3 import build_eagle3_head
from draftdistill.spec import SamplingConfig, SpecStats, TreeConfig, speculative_generate

PROMPT = torch.tensor([[3, 5, 7, 11]])
GREEDY = SamplingConfig()


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(32, seed=0, layers=5)
    return target, {
        "lm": build_pruned_drafter(target, 2),
        "eagle3": train_head(build_eagle3_head(target, aux_layer_ids=[0, 1, 3], seed=3), target, steps=60),
    }


@pytest.fixture
def rounds(monkeypatch):
    """(drafts the target verified, drafts it accepted) for every round the decoders run."""
    log = []
    real_verify, real_tree = decoder_module.verify, tree_decoder_module.verify_tree

    def verify(drafts, q, p, generator):
        n, token = real_verify(drafts, q, p, generator)
        log.append((len(drafts), n))
        return n, token

    def verify_tree(draft, p, generator):
        path, token = real_tree(draft, p, generator)
        log.append((draft.num_drafts, len(path)))
        return path, token

    monkeypatch.setattr(decoder_module, "verify", verify)
    monkeypatch.setattr(tree_decoder_module, "verify_tree", verify_tree)
    return log


def expected_accept_length(log):
    steps = [n for drafted, n in log if drafted]
    return 1 + sum(steps) / len(steps)


@pytest.mark.parametrize("sampling", [GREEDY, T1], ids=["greedy", "T1"])
@pytest.mark.parametrize("shape", [dict(gamma=3), dict(tree=TreeConfig(depth=3, top_k=2, max_nodes=6))],
                         ids=["chain", "tree"])
@pytest.mark.parametrize("kind", ["lm", "eagle3"])
def test_accept_length_is_one_plus_accepted_per_verify_step(models, rounds, kind, shape, sampling):
    target, drafters = models
    n = 30  # not a multiple of 4: the budget leaves the last round less room
    _, stats = speculative_generate(target, drafters[kind], PROMPT, n, sampling=sampling,
                                    generator=torch.Generator().manual_seed(0), **shape)
    assert len(rounds) == stats.target_calls
    verify_steps = sum(drafted > 0 for drafted, _ in rounds)
    assert stats.verify_steps == verify_steps and sum(stats.accepted) == sum(a for _, a in rounds)
    assert stats.accept_length == pytest.approx(expected_accept_length(rounds), abs=1e-12)
    assert stats.tau == stats.new_tokens / stats.target_calls  # tau is unchanged beside it
    if kind == "eagle3":  # the first forward is the prefill: a target call, no verify step
        assert rounds[0] == (0, 0) and verify_steps <= stats.target_calls - 1
    else:
        assert rounds[0][0] > 0
    if sampling is GREEDY:
        assert 1.0 < stats.accept_length < 4.0, stats  # some drafts accepted, some rejected


def test_the_eagle3_prefill_is_why_tau_reads_lower(models, rounds):
    """No eos: a round emits accepted + 1 tokens, so tau = 1 + accepted / target calls. An LM drafter
    verifies in every round (but a last one left no room to draft), so its accept length is its tau;
    an EAGLE-3 head's prefill round verifies nothing, so its tau reads lower than its accept length."""
    target, drafters = models
    for kind in ("lm", "eagle3"):
        rounds.clear()
        _, stats = speculative_generate(target, drafters[kind], PROMPT, 60, gamma=3)
        assert stats.new_tokens == sum(stats.accepted) + stats.target_calls
        empty = [i for i, (drafted, _) in enumerate(rounds) if not drafted]
        assert stats.verify_steps == stats.target_calls - len(empty)
        last = [len(rounds) - 1]
        assert empty in ([0], [0] + last) if kind == "eagle3" else empty in ([], last)
        if kind == "lm" and not empty:
            assert stats.accept_length == pytest.approx(stats.tau)
        if kind == "eagle3":
            assert sum(stats.accepted) > 0 and stats.tau < stats.accept_length


@pytest.mark.parametrize("k", [1, 3, 4])
def test_target_as_its_own_drafter_gives_exactly_k_plus_1(k):
    target = tiny_llama(32, seed=0, layers=2)
    _, stats = speculative_generate(target, target, PROMPT, 5 * (k + 1), gamma=k)
    assert stats.verify_steps == 5 and stats.accept_length == k + 1 == stats.tau
    _, stats = speculative_generate(target, target, PROMPT, 5 * (k + 1),
                                    tree=TreeConfig(depth=k, top_k=1, max_nodes=k))
    assert stats.verify_steps == 5 and stats.accept_length == k + 1 == stats.tau


def test_stats_count_merge_and_report_verify_steps():
    a = SpecStats.empty(3)
    a.record_round(0, 0)  # the EAGLE-3 prefill: no drafts
    a.record_round(3, 2)
    a.record_round(3, 3)
    a.record_round(1, 0)
    a.target_calls = 4
    assert a.verify_steps == 3 and a.accept_length == 1 + 5 / 3
    b = SpecStats.empty(3)
    b.record_round(3, 1)
    merged = a + b
    assert merged.verify_steps == 4 and merged.accept_length == 1 + 6 / 4
    d = merged.to_dict()
    assert d["verify_steps"] == 4 and d["accept_length"] == 2.5 and "tau" in d
    assert math.isnan(SpecStats.empty(2).accept_length)
    assert SpecStats.empty(2).to_dict()["accept_length"] is None


def test_reports_carry_accept_length_beside_tau():
    target = tiny_llama(32, seed=0, layers=2)
    report = evaluate_drafter(target, target, [PROMPT, torch.tensor([[1, 2, 3]])], gamma=2, max_new_tokens=9,
                              baseline=False, progress=False)
    spec = report["speculative"]
    assert spec["accept_length"] == 3.0 == spec["tau"] and spec["verify_steps"] == 6
    rows = run_spec_benchmark(target, {"self": target}, [PROMPT], temperatures=(0.0,), gamma=2, max_new_tokens=9,
                              progress=False)
    assert rows[0]["ours"]["accept_length"] == 3.0 and rows[0]["ours"]["tau"] == 3.0
