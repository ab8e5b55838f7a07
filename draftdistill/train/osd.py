"""OSD's rejected-position mask: where the served decoder would reject the drafter's proposal.

    mask = rejected_mask(student_logits, teacher_logits, batch.scored, generators, temperature)

Drawn as the lossless decoder (draftdistill/spec: decoder.py, verify.py) decides, at the temperature
the drafter serves at, both distributions through the decoder's own `logits_to_probs`:

    temperature 0 (greedy): the drafter proposes argmax q, the target rejects it when argmax p differs
                            (no randomness: one-hot p and q make verify's draw irrelevant);
    temperature T > 0:      x ~ q_T, rejected when u * q_T(x) >= p_T(x), u ~ U[0, 1) (verify's test).

The proposal is drawn here rather than read from the context, which may be the dataset's or the
target's token. Used by the drafter trainer (train/drafter_opd.py) and the online distiller
(serving/online.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from draftdistill.spec.sampling import SamplingConfig, logits_to_probs


def rejected_mask(student_logits: torch.Tensor, teacher_logits: torch.Tensor, scored: torch.Tensor,
                  generators: torch.Generator | Sequence[torch.Generator] | None,
                  temperature: float) -> torch.Tensor:
    """[B, R] bool: scored response positions where the drafter's proposal would be rejected.

    student_logits / teacher_logits: [B, R, V] (the drafter's and the target's, same positions);
    scored: [B, R] bool, the positions that count (batch.scored).
    generators: one stream for the whole batch (the online distiller), or a list of one per row
    (the trainer's row streams, which draw the same on any world size): each stream draws every
    position of its rows, proposals first, then the uniforms. Unused (may be None) when greedy.
    temperature: the temperature the drafter serves at (0: greedy), as SamplingConfig takes it.
    """
    sampling = SamplingConfig(temperature=float(temperature))
    if sampling.greedy:  # what verify does with one-hot p and q, without a draw
        # logits_to_probs' argmax: first index on ties, as the decoder breaks them.
        proposal = student_logits.detach().argmax(-1)
        return scored & (teacher_logits.argmax(-1).to(proposal.device) != proposal).to(scored.device)
    if generators is None:
        raise ValueError("rejected_mask at temperature > 0 needs a generator (or one per row)")
    q = logits_to_probs(student_logits.detach(), sampling)
    p = logits_to_probs(teacher_logits.detach(), sampling).to(q.device)
    streams = [generators] if isinstance(generators, torch.Generator) else list(generators)
    if q.shape[0] % len(streams):
        raise ValueError(f"{len(streams)} generators for {q.shape[0]} rows: give one, or one per row")
    chunks = q.reshape(len(streams), -1, q.shape[-1]).cpu()  # the positions each stream draws for
    proposal = torch.cat([torch.multinomial(c, 1, generator=g) for c, g in zip(chunks, streams)])
    proposal = proposal.reshape(q.shape[:-1] + (1,)).to(q.device)
    # float64 as verify compares them: p/q of tiny probabilities must not round.
    q_x = q.gather(-1, proposal).squeeze(-1).double()
    p_x = p.gather(-1, proposal).squeeze(-1).double()
    u = torch.cat([torch.rand(c.shape[0], generator=g, dtype=torch.float64) for c, g in zip(chunks, streams)])
    return scored & (u.reshape(q_x.shape).to(q.device) * q_x >= p_x).to(scored.device)


__all__ = ["rejected_mask"]
