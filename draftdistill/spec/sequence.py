"""The committed sequence both decoders (decoder.py chains, tree_decoder.py trees) keep: the
prompt's ids as a list, the stop tokens as a set, and emitted tokens cut right after a stop token."""
from __future__ import annotations

import torch


def eos_set(eos_token_id: int | list[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def cut_at_eos(emitted: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """The round's tokens up to and including the first eos, and whether there was one."""
    hit = next((i for i, t in enumerate(emitted) if t in eos), None)
    return (emitted, False) if hit is None else (emitted[: hit + 1], True)


def check_input(input_ids: torch.Tensor) -> list[int]:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [1, P] with P >= 1, got {tuple(input_ids.shape)}")
    return input_ids[0].tolist()
