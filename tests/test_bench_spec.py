import torch

from draftdistill.eval.bench_spec import run_spec_benchmark
from draftdistill.eval.hf_assisted import hf_generate_all
from draftdistill.models import build_pruned_drafter
from tiny import make_llama


def test_spec_benchmark_rows_compare_all_arms_on_the_same_prompts():
    target = make_llama(layers=2, seed=0)
    drafters = {"pruned:1": build_pruned_drafter(target, 1)}
    prompts = [torch.tensor([[1, 4, 5, 6]]), torch.tensor([[1, 7, 8]])]
    rows = run_spec_benchmark(target, drafters, prompts, temperatures=(0.0, 1.0), gamma=3, max_new_tokens=10,
                              eos_token_id=[2], progress=False)
    assert [(r["drafter"], r["temperature"]) for r in rows] == [("pruned:1", 0.0), ("pruned:1", 1.0)]
    greedy = rows[0]
    # Greedy decoding is deterministic: every arm emits the same number of tokens.
    assert greedy["ours"]["new_tokens"] == greedy["ours_target_only"]["new_tokens"] \
        == greedy["hf_assisted"]["new_tokens"]
    assert greedy["ours_target_only"]["target_calls"] == greedy["ours_target_only"]["new_tokens"]
    for r in rows:
        assert 1.0 <= r["ours"]["tau"] <= 4.0 and r["hf_assisted"]["tau"] >= 1.0
        assert r["speedup_vs_our_target_only"] > 0 and r["ours_over_hf_assisted_tokens_per_second"] > 0


def test_hf_target_only_counts_one_forward_per_token():
    target = make_llama(layers=1, seed=2)
    result = hf_generate_all(target, [torch.tensor([[1, 9, 9]])], max_new_tokens=6, eos_token_id=[2], progress=False)
    assert result["target_calls"] == result["new_tokens"] <= 6
