"""Benchmark of the lossless decoder: ours vs HF assisted generation (same drafter, same run) vs
target-only decoding, over drafters and temperatures."""
from __future__ import annotations

from draftdistill.spec import SamplingConfig

from .acceptance import evaluate_drafter, target_only
from .hf_assisted import hf_generate_all


def run_spec_benchmark(target, drafters: dict, prompt_ids: list, *, temperatures=(0.0, 1.0), gamma: int = 4,
                       max_new_tokens: int = 64, eos_token_id=None, seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per (drafter, temperature), every arm decoding the same prompts in the same process."""
    rows = []
    for temperature in temperatures:
        sampling = SamplingConfig(temperature=temperature)
        common = dict(sampling=sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                      seed=seed, progress=progress)
        hf_target = hf_generate_all(target, prompt_ids, **common)
        base = target_only(target, prompt_ids, **common).to_dict()
        for name, drafter in drafters.items():
            spec = evaluate_drafter(target, drafter, prompt_ids, gamma=gamma, baseline=False, **common)["speculative"]
            hf = hf_generate_all(target, prompt_ids, drafter=drafter, gamma=gamma, **common)
            rows.append({
                "drafter": name, "temperature": temperature, "gamma": gamma,
                "ours": spec, "ours_target_only": base, "hf_assisted": hf, "hf_target_only": hf_target,
                "speedup_vs_our_target_only": spec["tokens_per_second"] / base["tokens_per_second"],
                "speedup_vs_hf_target_only": spec["tokens_per_second"] / hf_target["tokens_per_second"],
                "hf_assisted_speedup_vs_hf_target_only": hf["tokens_per_second"] / hf_target["tokens_per_second"],
                "ours_over_hf_assisted_tokens_per_second": spec["tokens_per_second"] / hf["tokens_per_second"],
            })
    return rows
