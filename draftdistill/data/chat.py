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
