"""Tiny tokenizers and Llama models built in-process, so tests need no download."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]  # 32 ids


def make_tokenizer(words=WORDS, eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token=eos)


def make_llama(vocab_size=32, layers=2, hidden=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_model_dir(path: Path, layers=2, seed=0, words=WORDS) -> Path:
    """An HF directory (safetensors + tokenizer) a user could pass as --target or --drafter."""
    make_llama(len(words), layers=layers, seed=seed).save_pretrained(path)
    make_tokenizer(words).save_pretrained(path)
    return path


def kill_at_optimizer_step(monkeypatch, run, n: int = 3) -> None:
    """Run `run()` with AdamW.step raising KeyboardInterrupt on its n-th call (a killed process),
    check that it was killed, and restore the real step."""
    import pytest

    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def dies_on_nth_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies_on_nth_step)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(torch.optim.AdamW, "step", original)


def eagle3_target(vocab_size=48, hidden=32, layers=6, seed=0):
    """A tiny untied Llama target deep enough for an EAGLE-3 head's low/mid/high aux layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
