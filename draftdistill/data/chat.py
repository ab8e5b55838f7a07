"""Turn prompts into token ids with the model's own chat template (so EOS and roles match)."""
from __future__ import annotations

import torch

from .prompts import Prompt


def encode_prompt(tokenizer, prompt: Prompt) -> torch.Tensor:
    """Return input ids of shape [1, P] ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    else:
        text = "\n".join(m["content"] for m in prompt.messages) + "\n"
        ids = tokenizer(text)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (they can differ)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is not None:
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(ids)


def context_length(model) -> int | None:
    """The longest sequence `model` was built for (max_position_embeddings), when its config says."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_fits_context(prompt_ids: list, new_tokens: int, model, source: str, key: str) -> None:
    """Refuse, before any compute, a prompt that cannot fit the model's context with `new_tokens`
    generated after it (a 20k-token prompt would otherwise run for minutes and fail late).
    `source` names the prompt set, `key` the setting that asks for the new tokens."""
    limit = context_length(model)
    if limit is None:
        return
    for index, ids in enumerate(prompt_ids):
        length = int(ids.shape[-1]) if hasattr(ids, "shape") else len(ids)
        if length + new_tokens > limit:
            raise ValueError(f"{source}: prompt {index} has {length} tokens; with {key}={new_tokens} it needs "
                             f"{length + new_tokens} positions, over the model's context of {limit}")
