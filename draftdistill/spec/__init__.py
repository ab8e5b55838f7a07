"""Lossless speculative decoding: chain drafting, exact rejection sampling, KV rollback, metrics."""
from .decoder import speculative_generate, target_generate
from .metrics import SpecStats
from .sampling import SamplingConfig, logits_to_probs, sample_token, top_p_filter
from .verify import verify

__all__ = ["speculative_generate", "target_generate", "SpecStats", "SamplingConfig", "logits_to_probs",
           "sample_token", "top_p_filter", "verify"]
