"""Builders shared by the serving tests: a tiny target and a drafter behind the embedded server."""
import torch

from draftdistill.models import build_pruned_drafter
from draftdistill.serving.embedded import EmbeddedSpecServer
from tiny import make_llama, make_tokenizer


def untrained_drafter(vocab_size=32, seed=1):
    """A random 1-layer drafter with its own (untied) head: it disagrees with the target at first."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_engine(target_layers=3, drafter_layers=1, seed=0, gamma=3, random_drafter=False):
    """random_drafter: an untrained drafter (accept length near 1, room to learn); otherwise the
    target's first layers."""
    target = make_llama(layers=target_layers, seed=seed)
    drafter = untrained_drafter(seed=seed + 1) if random_drafter else build_pruned_drafter(target, drafter_layers)
    return EmbeddedSpecServer(target, drafter, make_tokenizer(), gamma=gamma, eos_token_id=None)
