"""Logits -> the probabilities we sample from (temperature, then top-p), and drawing one token.

The drafter and the target both go through `logits_to_probs`, so the drafter proposes from exactly
the q that `verify` compares against, and the target's p is exactly the distribution the
speculative decoder reproduces. Greedy decoding (temperature 0) is a one-hot p, which makes the
rejection-sampling step deterministic without a special case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with cumulative prob >= top_p

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def logits_to_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """[..., V] logits -> [..., V] probabilities (float32, or float64 if the logits are)."""
    # bf16/fp16 probabilities would make p/q ratios coarse; never go below float32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if cfg.greedy:
        # First index on ties, like torch.argmax and HF greedy search.
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        probs = top_p_filter(probs, cfg.top_p)
    return probs


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose total mass is >= top_p; renormalise."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    # A token is kept if the tokens ranked above it do not reach top_p yet (the top token always is).
    mass_above = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = mass_above < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs.masked_fill(~keep, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample_token(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one token id from a [V] probability vector (need not be normalised).

    Draws on the generator's device so a CPU generator also works for a CUDA model (reproducible
    across devices); zero-probability tokens are never drawn.
    """
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))
