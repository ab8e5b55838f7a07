"""Incremental forwards with a transformers KV cache: feed tokens after what the cache holds, and
crop the cache back after a rejection. Shared by the target and causal-LM drafters. Tree decoding
feeds tokens under an explicit attention mask and positions (`forward_masked`), then keeps only the
accepted path's entries (`keep_positions`)."""
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
def _takes(model_class: type, argument: str) -> bool:
    """Whether model_class.forward accepts `argument` (or **kwargs): HF models take logits_to_keep (skip
    the lm_head for positions we do not need), a plain wrapper module may not. Cached per class:
    inspect is slow per token."""
    params = inspect.signature(model_class.forward).parameters
    return argument in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def forward(model, cache: DynamicCache, tokens: list[int], device, num_logits: int,
            hidden_indices: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed `tokens` after what `cache` holds (the cache grows in place). Returns the last num_logits
    logits [n, V] and, when `hidden_indices` are given, those ``output_hidden_states`` entries
    concatenated for every fed token [len(tokens), K * H] (else None)."""
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    extra = {"logits_to_keep": num_logits} if _takes(type(model), "logits_to_keep") else {}
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


def forward_masked(model, cache: DynamicCache, tokens: list[int], positions: list[int], visible: torch.Tensor,
                   device, num_logits: int, hidden_indices: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like `forward`, but token i sits at position positions[i] and attends exactly to the cache
    entries where visible[i] is True: visible is [len(tokens), cache length + len(tokens)], over what
    the cache holds followed by the new tokens. Needs an HF model (attention_mask and position_ids)."""
    if not (_takes(type(model), "attention_mask") and _takes(type(model), "position_ids")):
        raise ValueError(f"tree decoding needs a drafter that takes attention_mask and position_ids (an HF causal "
                         f"LM or an EAGLE-3 head); {type(model).__name__} does not")
    past = cache.get_seq_length()
    assert visible.shape == (len(tokens), past + len(tokens)), "one mask row per token, one column per cache entry"
    dtype = next(model.parameters()).dtype
    # An additive float mask works for every attention implementation (eager adds it, SDPA too);
    # transformers passes a 4D mask through as it is.
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible.to(device), torch.finfo(dtype).min)
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    extra = {"logits_to_keep": num_logits} if _takes(type(model), "logits_to_keep") else {}
    if hidden_indices:
        extra["output_hidden_states"] = True
    out = model(input_ids=ids, attention_mask=mask[None, None], position_ids=torch.tensor([positions], device=device),
                past_key_values=cache, use_cache=True, **extra)
    hidden = torch.cat([out.hidden_states[i][0] for i in hidden_indices], -1) if hidden_indices else None
    return out.logits[0, -num_logits:], hidden


def keep_positions(cache: DynamicCache, keep: list[int]) -> None:
    """Keep only the cached entries at indices `keep` (ascending), in that order: after a tree round,
    the committed prefix followed by the accepted path's nodes."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise ValueError("tree decoding needs a full-attention KV cache (this model has sliding-window layers)")
        if getattr(layer, "is_initialized", True) and layer.keys is not None and layer.keys.numel():
            index = torch.tensor(keep, dtype=torch.long, device=layer.keys.device)
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
