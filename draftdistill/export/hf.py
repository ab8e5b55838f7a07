"""Standalone drafters (and OPD students) as plain HF directories: config + safetensors + tokenizer.

transformers loads them as they are, and so do both servers' standalone-drafter modes:
    SGLang: --speculative-algorithm STANDALONE --speculative-draft-model-path DIR
    vLLM:   --speculative-config '{"method": "draft_model", "model": "DIR", "num_speculative_tokens": 4}'
SGLang's StandaloneWorkerV2 (speculative/standalone_worker_v2.py, _validate_vocab_compatibility)
refuses a draft whose config vocab_size or tokenizer vocabulary differs from the target's, so
``export_standalone_drafter`` checks both first when the target is given, instead of at server start.

Under torchrun every rank calls ``export_hf``: the full weights are gathered to rank 0, which writes
them. That uses torch.distributed directly (as train/distributed.py's full_state_dict and
plain_class do), so this package never imports the trainers.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

from .files import atomic_directory


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _plain_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2's fully_shard swaps it for FSDP<Name>(FSDPModule, Name)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def export_hf(directory: str | Path, model: torch.nn.Module, tokenizer) -> Path:
    """A plain HF directory (config + safetensors + tokenizer) that transformers, SGLang STANDALONE
    and vLLM draft_model load as they are. Under torchrun every rank calls it: the full weights are
    gathered to rank 0 (a collective every rank joins), which writes them."""
    directory = Path(directory)
    if not _distributed():
        return write_hf(directory, model, tokenizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        write_hf(directory, plain_copy(model, weights), tokenizer)
    dist.barrier()
    return directory


def plain_copy(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The unsharded model of the same class over full CPU weights (no second random init: the
    skeleton is built on the meta device and the weights assigned), its tied weights re-tied.
    Good for saving (non-persistent buffers such as rotary frequencies stay on meta)."""
    with torch.device("meta"):
        plain = _plain_class(model)(model.config)
    plain.load_state_dict(weights, assign=True, strict=False)
    plain.tie_weights()
    missing = [name for name, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"gathered weights miss {missing[:3]}")
    plain.generation_config = model.generation_config
    return plain


def write_hf(directory: str | Path, model: torch.nn.Module, tokenizer=None, tokenizer_dir: Path | None = None) -> Path:
    """save_pretrained (safetensors) + the tokenizer (an object, or the files of `tokenizer_dir`), atomically."""
    from .files import copy_tokenizer_files

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)
    return directory


def check_standalone_compatible(drafter: torch.nn.Module, tokenizer, target=None, target_tokenizer=None) -> None:
    """Raise ValueError where SGLang's STANDALONE worker would refuse the pair. `target` needs only
    a ``.config.vocab_size``."""
    if target is not None:
        dv, tv = drafter.config.vocab_size, target.config.vocab_size
        if dv != tv:
            raise ValueError(f"STANDALONE needs the draft vocab_size to equal the target's: {dv} != {tv}")
    if target_tokenizer is not None and tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError("STANDALONE needs identical tokenizer vocabularies (token -> id) for draft and target")


def export_standalone_drafter(directory: str | Path, drafter: torch.nn.Module, tokenizer, *, target=None,
                              target_tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write `drafter` (+ tokenizer) as an HF directory for --speculative-draft-model-path (SGLang
    STANDALONE) or speculative_config {"method": "draft_model"} (vLLM).

    dtype: save a cast copy (e.g. torch.bfloat16 to match a bf16 target); the model passed in is
    never modified. Returns the directory.
    """
    check_standalone_compatible(drafter, tokenizer, target, target_tokenizer)
    return export_hf(directory, _cast_copy(drafter, dtype), tokenizer)


def _cast_copy(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    if dtype is None or next(model.parameters()).dtype == dtype:
        return model
    model = copy.deepcopy(model).to(dtype)
    model.config.dtype = dtype
    return model
