"""The acceptance harness: run the lossless decoder over prompts and aggregate alpha, tau (tokens per
target call), the peers' accept length (1 + accepted drafts per verify step) and tokens/s, beside
target-only decoding of the same prompts for the speedup."""
from __future__ import annotations

import dataclasses
import time

import torch
from tqdm.auto import tqdm

from draftdistill.spec import SamplingConfig, SpecStats, TreeConfig, speculative_generate, target_generate


def decode_all(generate_one, prompt_ids: list[torch.Tensor], seed: int, desc: str, progress: bool) -> SpecStats:
    """Run ``generate_one(ids, generator)`` over every prompt (one seed per prompt) and merge stats."""
    total = SpecStats()  # merge pads the per-position lists, so an empty start works for any gamma
    for i, ids in enumerate(tqdm(prompt_ids, desc=desc, disable=not progress, leave=False)):
        generator = torch.Generator(device=ids.device).manual_seed(seed + i)
        _, stats = generate_one(ids, generator)
        total = total.merge(stats)
    return total


def evaluate_drafter(target, drafter, prompt_ids: list[torch.Tensor], *, gamma: int = 4,
                     sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 64,
                     eos_token_id=None, seed: int = 0, baseline: bool = True, progress: bool = True,
                     tree: TreeConfig | None = None) -> dict:
    """Return a JSON-able report: speculative stats (SpecStats.to_dict: alpha per position, tau,
    accept_length, ...), target-only stats and the speedup. With `tree`, the decoder drafts EAGLE-2
    trees instead of chains of gamma tokens."""
    started = time.perf_counter()
    spec = speculative_stats(target, drafter, prompt_ids, gamma=gamma, sampling=sampling, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_token_id, seed=seed, progress=progress, tree=tree)
    report = {
        "gamma": None if tree else gamma, "tree": dataclasses.asdict(tree) if tree else None,
        "temperature": sampling.temperature, "top_p": sampling.top_p,
        "max_new_tokens": max_new_tokens, "num_prompts": len(prompt_ids), "seed": seed,
        "speculative": spec.to_dict(),
    }
    if baseline:
        base = target_only(target, prompt_ids, sampling=sampling, max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, seed=seed, progress=progress)
        report["target_only"] = base.to_dict()
        report["speedup"] = spec.tokens_per_second / base.tokens_per_second
    report["seconds"] = time.perf_counter() - started
    return report


def speculative_stats(target, drafter, prompt_ids: list[torch.Tensor], *, gamma: int, sampling: SamplingConfig,
                      max_new_tokens: int, eos_token_id=None, seed: int = 0, progress: bool = True,
                      tree: TreeConfig | None = None) -> SpecStats:
    """The lossless decoder over every prompt, its stats merged."""
    return decode_all(
        lambda ids, g: speculative_generate(target, drafter, ids, max_new_tokens, gamma=gamma, sampling=sampling,
                                            eos_token_id=eos_token_id, generator=g, tree=tree),
        prompt_ids, seed, "speculative", progress)


def target_only(target, prompt_ids: list[torch.Tensor], *, sampling: SamplingConfig, max_new_tokens: int,
                eos_token_id=None, seed: int = 0, progress: bool = True) -> SpecStats:
    """Plain autoregressive decoding of the same prompts with the same sampling: the speedup's baseline."""
    return decode_all(
        lambda ids, g: target_generate(target, ids, max_new_tokens, sampling=sampling,
                                       eos_token_id=eos_token_id, generator=g),
        prompt_ids, seed, "target-only", progress)
