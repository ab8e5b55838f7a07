"""Incremental forwards with a transformers KV cache: feed tokens after what the cache holds, and
crop the cache back after a rejection. Shared by the target and causal-LM drafters. Tree decoding
feeds tokens under an explicit attention mask and positions (`forward_masked`), then keeps only the
accepted path's entries (`keep_path`)."""
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
    the cache holds followed by the new tokens. The mask is dense: feed a long prompt with `forward`."""
    check_tree_capable(model, cache)
    past = cache.get_seq_length()
    assert visible.shape == (len(tokens), past + len(tokens)), "one mask row per token, one column per cache entry"
    dtype = next(model.parameters()).dtype
    # An additive float mask, which eager and SDPA attention both add to the scores; transformers
    # passes a 4D mask through as it is.
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


def check_tree_capable(model, cache: DynamicCache) -> None:
    """Refuse, before any forward, what would silently ignore or misread a tree mask."""
    name = type(model).__name__
    if not (_takes(type(model), "attention_mask") and _takes(type(model), "position_ids")):
        raise ValueError(f"tree decoding needs models that take attention_mask and position_ids (HF causal LMs, "
                         f"EAGLE-3 heads); {name} does not")
    # flash-attention kernels read a 4D mask as a padding mask: the tree would be ignored, not refused.
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention not in (None, "eager", "sdpa"):
        raise ValueError(f"tree decoding needs eager or sdpa attention; {name} uses {attention}")
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise ValueError(f"tree decoding needs full attention; {name} has sliding-window layers")


def keep_path(cache: DynamicCache, committed: int, path_entries: list[int]) -> None:
    """After a tree round: keep the first `committed` entries, then the accepted path's entries (at
    ascending indices `path_entries`, all >= committed) right after them; drop the rest. Copies only
    the path, so a round costs no copy of the context."""
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None or not layer.keys.numel():
            continue
        if path_entries:
            index = torch.tensor(path_entries, dtype=torch.long, device=layer.keys.device)
            # path_entries[i] >= committed + i: the gathered copy is read before any slot it overwrites
            layer.keys[..., committed: committed + len(path_entries), :] = layer.keys.index_select(-2, index)
            layer.values[..., committed: committed + len(path_entries), :] = layer.values.index_select(-2, index)
    rollback(cache, committed + len(path_entries))
