"""Benchmark of the lossless decoder: ours vs HF assisted generation (same drafter, same run) vs
target-only decoding, over drafters and temperatures.

The arms are interleaved prompt by prompt (every arm decodes prompt i before any arm moves on), so
a noisy machine slows all arms alike and the ratios stay meaningful.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from draftdistill.spec import SamplingConfig, SpecStats

from .acceptance import speculative_stats, target_only
from .hf_assisted import hf_generate_all

HF_COUNTS = ("new_tokens", "target_calls", "seconds")


def add_hf(total: dict | None, one: dict) -> dict:
    total = {k: (total or {}).get(k, 0) + one[k] for k in HF_COUNTS}
    total["tau"] = total["new_tokens"] / max(total["target_calls"], 1)
    total["tokens_per_second"] = total["new_tokens"] / total["seconds"]
    return total


def run_spec_benchmark(target, drafters: dict, prompt_ids: list, *, temperatures=(0.0, 1.0), gamma: int = 4,
                       max_new_tokens: int = 64, eos_token_id=None, seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per (drafter, temperature), every arm decoding the same prompts in the same process."""
    rows = []
    for temperature in temperatures:
        sampling = SamplingConfig(temperature=temperature)
        ours, hf = {name: SpecStats() for name in drafters}, {}
        ours_base, hf_base = SpecStats(), None
        for i, ids in enumerate(tqdm(prompt_ids, desc=f"bench T={temperature:g}", disable=not progress)):
            one = dict(sampling=sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                       seed=seed + i, progress=False)
            hf_base = add_hf(hf_base, hf_generate_all(target, [ids], **one))
            ours_base = ours_base.merge(target_only(target, [ids], **one))
            for name, drafter in drafters.items():
                ours[name] = ours[name].merge(speculative_stats(target, drafter, [ids], gamma=gamma, **one))
                hf[name] = add_hf(hf.get(name), hf_generate_all(target, [ids], drafter=drafter, gamma=gamma, **one))
        base = ours_base.to_dict()
        for name in drafters:
            spec = ours[name].to_dict()
            rows.append({
                "drafter": name, "temperature": temperature, "gamma": gamma,
                "ours": spec, "ours_target_only": base, "hf_assisted": hf[name], "hf_target_only": hf_base,
                "speedup_vs_our_target_only": spec["tokens_per_second"] / base["tokens_per_second"],
                "speedup_vs_hf_target_only": spec["tokens_per_second"] / hf_base["tokens_per_second"],
                "hf_assisted_speedup_vs_hf_target_only": hf[name]["tokens_per_second"] / hf_base["tokens_per_second"],
                "ours_over_hf_assisted_tokens_per_second": spec["tokens_per_second"] / hf[name]["tokens_per_second"],
            })
    return rows

