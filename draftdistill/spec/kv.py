"""Incremental forwards with a transformers KV cache: feed tokens after what the cache holds, and
crop the cache back after a rejection. Shared by the target and causal-LM drafters."""
from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache


def new_cache(model) -> DynamicCache:
    cache = DynamicCache(config=getattr(model, "config", None))
    # Sliding-window layers drop old states on update unless told to keep them until the next crop.
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """HF models can skip the lm_head for positions we do not need (a long prompt x a big vocab);
    a plain wrapper module may not take the argument. Cached per class: inspect is slow per token."""
    params = inspect.signature(model_class.forward).parameters
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def forward(model, cache: DynamicCache, tokens: list[int], device, num_logits: int,
            hidden_indices: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed `tokens` after what `cache` holds (the cache grows in place). Returns the last num_logits
    logits [n, V] and, when `hidden_indices` are given, those ``output_hidden_states`` entries
    concatenated for every fed token [len(tokens), K * H] (else None)."""
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    extra = {"logits_to_keep": num_logits} if _takes_logits_to_keep(type(model)) else {}
    if hidden_indices:
        extra["output_hidden_states"] = True
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra)
    hidden = torch.cat([out.hidden_states[i][0] for i in hidden_indices], -1) if hidden_indices else None
    return out.logits[0, -num_logits:], hidden


def rollback(cache: DynamicCache, keep: int) -> None:
    """Drop cached positions beyond the first `keep` (no-op if the cache is not longer)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)  # negative = number of tokens to remove (transformers >= 4.56 and 5.x)
