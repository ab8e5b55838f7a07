"""Lossless speculative decoding: propose with a drafter, verify with exact rejection sampling.

    from draftdistill.spec import SamplingConfig, speculative_generate, target_generate
    tokens, stats = speculative_generate(target, drafter, input_ids, 128, gamma=4,
                                         sampling=SamplingConfig(temperature=0.7, top_p=0.9))
    stats.alpha_per_position, stats.tau, stats.accept_length, stats.tokens_per_second
    # EAGLE-2 draft trees instead of chains:
    tokens, stats = speculative_generate(target, drafter, input_ids, 128, tree=TreeConfig(depth=5, top_k=4))
"""
from .decoder import speculative_generate, target_generate
from .metrics import SpecStats
from .sampling import SamplingConfig, logits_to_probs, sample_token, top_p_filter
from .tree import DraftTree, TreeConfig, verify_tree
from .verify import verify, verify_batch

__all__ = [
    "SamplingConfig",
    "SpecStats",
    "DraftTree",
    "TreeConfig",
    "logits_to_probs",
    "sample_token",
    "speculative_generate",
    "target_generate",
    "top_p_filter",
    "verify",
    "verify_batch",
    "verify_tree",
]
