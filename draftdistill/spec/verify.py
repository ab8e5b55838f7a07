"""The exact speculative-sampling step (Leviathan et al. 2023; Chen et al. 2023), as a pure function.

Given g draft tokens x_i ~ q_i and the target's distributions p_0..p_g over the same positions:
  - accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), left to right;
  - at the first rejection, draw the replacement from norm(max(0, p_i - q_i));
  - if all g drafts are accepted, draw a bonus token from p_g.
Every emitted token is then distributed exactly as the target's p given the prefix, whatever q is.
With one-hot p and q (greedy) this reduces to "accept while draft == argmax target".
"""
from __future__ import annotations

import torch

from .sampling import sample_token


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Return (n_accepted, next_token) for draft_tokens [g], draft_probs [g, V], target_probs [g+1, V].

    The emitted block is draft_tokens[:n_accepted] followed by next_token.
    """
    g = draft_tokens.numel()
    assert draft_probs.shape[0] == g and target_probs.shape[0] == g + 1, "need g drafts and g+1 target rows"
    assert draft_probs.shape[-1] == target_probs.shape[-1], "drafter and target vocabularies differ"
    dev = generator.device if generator is not None else target_probs.device
    # float64: p/q ratios of tiny probabilities must not round to 0 or 1.
    p = target_probs.to(dev, torch.float64)
    q = draft_probs.to(dev, torch.float64)
    x = draft_tokens.to(dev).long().view(g, 1)

    p_x = p[:g].gather(1, x).squeeze(1)
    q_x = q.gather(1, x).squeeze(1)
    u = torch.rand(g, generator=generator, device=dev, dtype=torch.float64)
    # u < p/q written as u*q < p: no division, and q(x)=0 (impossible for a sampled draft) accepts.
    accepted = u * q_x < p_x
    n = int(accepted.long().cumprod(0).sum())  # length of the leading run of acceptances

    if n == g:
        return n, sample_token(p[g], generator)
    residual = (p[n] - q[n]).clamp_min(0.0)
    if residual.sum() <= 0:  # only reachable through rounding when p ~= q; p is then the right law
        residual = p[n]
    return n, sample_token(residual, generator)
