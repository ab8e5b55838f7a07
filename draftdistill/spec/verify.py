"""The exact speculative-sampling step (Leviathan et al. 2023; Chen et al. 2023), as a pure function.

Given g draft tokens x_i ~ q_i and the target's distributions p_0..p_g over the same positions:
  - accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), left to right;
  - at the first rejection, draw the replacement from norm(max(0, p_i - q_i));
  - if all g drafts are accepted, draw a bonus token from p_g.
Every emitted token is then distributed exactly as the target's p given the prefix, whatever q is.
With one-hot p and q (greedy) this reduces to "accept while draft == argmax target, then emit the
target's argmax": q(x) = 1, p(x) is 0 or 1, and u < 1 always, so no random draw can change it.

`verify_batch` does B independent blocks at once (the decoder calls it with B = 1 through `verify`;
tests use it for many trials in one call).
"""
from __future__ import annotations

import torch


def verify_batch(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens [B, g], draft_probs [B, g, V], target_probs [B, g+1, V] -> (n_accepted [B], next_token [B])."""
    B, g = draft_tokens.shape
    assert draft_probs.shape[:2] == (B, g) and target_probs.shape[:2] == (B, g + 1), "need g drafts, g+1 target rows"
    assert draft_probs.shape[-1] == target_probs.shape[-1], "drafter and target vocabularies differ"
    # Draw on the generator's device so one CPU generator reproduces the same run for any model device.
    dev = generator.device if generator is not None else target_probs.device
    # float64: p/q ratios of tiny probabilities must not round to 0 or 1.
    p = target_probs.to(dev, torch.float64)
    q = draft_probs.to(dev, torch.float64)
    x = draft_tokens.to(dev).long()

    # Accept x_i iff u_i < p_i(x)/q_i(x), written u*q < p: no division, and q(x) = 0 (impossible for a
    # sampled draft) would accept.
    p_x = p[:, :g].gather(2, x[..., None])[..., 0]
    q_x = q.gather(2, x[..., None])[..., 0]
    u = torch.rand(B, g, generator=generator, device=dev, dtype=torch.float64)
    accepted = u * q_x < p_x
    n = accepted.long().cumprod(1).sum(1)  # length of the leading run of acceptances

    # Row i < g: the residual norm(max(0, p_i - q_i)) used after rejecting draft i; row g: the bonus p_g.
    residual = (p[:, :g] - q).clamp_min(0.0)
    # Sum 0 means p_i == q_i, where rejection cannot happen; p_i keeps the row valid for multinomial.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :g])
    next_dist = torch.cat([residual, p[:, g:]], dim=1)[torch.arange(B, device=dev), n]  # [B, V]
    next_token = torch.multinomial(next_dist, 1, generator=generator)[:, 0]  # normalises each row itself
    return n, next_token


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Return (n_accepted, next_token) for draft_tokens [g], draft_probs [g, V], target_probs [g+1, V].

    The emitted block is draft_tokens[:n_accepted] followed by next_token.
    """
    n, next_token = verify_batch(draft_tokens[None], draft_probs[None], target_probs[None], generator)
    return int(n[0]), int(next_token[0])
