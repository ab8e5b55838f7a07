"""Refuse a target/drafter pair whose tokenizers disagree, before any compute.

Speculative decoding and distillation compare distributions id by id: one shifted id or a different
EOS silently corrupts every acceptance figure and every loss.
"""
from __future__ import annotations


class TokenizerMismatchError(ValueError):
    pass


SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def id_to_token_table(tokenizer) -> dict[int, str]:
    return {i: t for t, i in tokenizer.get_vocab().items()}


def check_tokenizers_match(target_tokenizer, drafter_tokenizer, names=("target", "drafter")) -> None:
    """Raise TokenizerMismatchError naming the first id whose token differs (or the special token)."""
    a, b = id_to_token_table(target_tokenizer), id_to_token_table(drafter_tokenizer)
    for i in range(max(max(a, default=-1), max(b, default=-1)) + 1):
        ta, tb = a.get(i), b.get(i)
        if ta != tb:
            raise TokenizerMismatchError(
                f"tokenizers differ at id {i}: {names[0]} has {ta!r}, {names[1]} has {tb!r} "
                f"(vocab sizes {len(a)} vs {len(b)})"
            )
    for attr in SPECIAL_TOKEN_ATTRS:
        va, vb = getattr(target_tokenizer, attr, None), getattr(drafter_tokenizer, attr, None)
        if va != vb:
            raise TokenizerMismatchError(
                f"special token {attr.removesuffix('_token_id')} differs: {names[0]} id {va}, {names[1]} id {vb}"
            )
    sa, sb = sorted(target_tokenizer.all_special_ids), sorted(drafter_tokenizer.all_special_ids)
    if sa != sb:
        first = next(i for i in sorted(set(sa) ^ set(sb)))
        raise TokenizerMismatchError(f"special tokens differ at id {first}: {names[0]} {sa}, {names[1]} {sb}")
