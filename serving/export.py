"""Export a trained drafter as a standalone draft model for SGLang.

    python -m sglang.launch_server --model-path TARGET \
        --speculative-algorithm STANDALONE --speculative-draft-model-path DRAFT_DIR \
        --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4

The directory is a plain HF one (config + safetensors + tokenizer), written atomically by
draftdistill.train.checkpoint.export_hf. SGLang's StandaloneWorkerV2 (speculative/
standalone_worker_v2.py, _validate_vocab_compatibility) refuses a draft whose config vocab_size
or tokenizer vocabulary differs from the target's, so both are checked here first, when the
target is given, instead of at server start.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from draftdistill.train.checkpoint import export_hf


def check_standalone_compatible(drafter: torch.nn.Module, tokenizer, target=None, target_tokenizer=None) -> None:
    """Raise ValueError where SGLang's STANDALONE worker would refuse the pair."""
    if target is not None:
        dv, tv = drafter.config.vocab_size, target.config.vocab_size
        if dv != tv:
            raise ValueError(f"STANDALONE needs the draft vocab_size to equal the target's: {dv} != {tv}")
    if target_tokenizer is not None and tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError("STANDALONE needs identical tokenizer vocabularies (token -> id) for draft and target")


def export_standalone_drafter(directory: str | Path, drafter: torch.nn.Module, tokenizer, *, target=None,
                              target_tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write `drafter` (+ tokenizer) as an HF directory for --speculative-draft-model-path.

    dtype: save a cast copy (e.g. torch.bfloat16 to match a bf16 target); the model passed in is
    never modified. Returns the directory.
    """
    check_standalone_compatible(drafter, tokenizer, target, target_tokenizer)
    model = drafter
    if dtype is not None and next(drafter.parameters()).dtype != dtype:
        model = copy.deepcopy(drafter).to(dtype)
        model.config.dtype = dtype
    return export_hf(directory, model, tokenizer)
