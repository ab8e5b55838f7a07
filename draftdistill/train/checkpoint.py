"""Checkpoints, written atomically: to a temporary sibling, then renamed into place, so a run
killed mid-write leaves the previous checkpoint intact.

One process writes safetensors + JSON only (never pickle):
  drafter.safetensors     the trainable weights
  optimizer.safetensors   every optimizer state tensor, keyed "<param index>.<name>"
  trainer_state.json      step, data position, scheduler state, best score, optimizer param groups
A torchrun job's FSDP model writes a torch.distributed.checkpoint (DCP) directory instead, each rank its own
shards of the model and optimizer (.metadata, __<rank>_0.distcp), and rank 0 trainer_state.json.
Either kind resumes on any world size: DCP reshards on load (also into one process, with no
process group), and a safetensors checkpoint loads into sharded models as full tensors.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import distributed


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer, scheduler, trainer_state: dict) -> Path:
    """Every rank calls it. A model held by FSDP writes DCP; a plain one (one process, or a model
    every torchrun rank keeps whole, like the EAGLE-3 head) is written by rank 0 as safetensors."""
    if distributed.is_sharded(model):
        return save_sharded(directory, model, optimizer, scheduler, trainer_state)
    directory = Path(directory)
    if distributed.is_main():
        _save_whole(directory, model, optimizer, scheduler, trainer_state)
    distributed.barrier()
    return directory


def _save_whole(directory: Path, model: torch.nn.Module, optimizer, scheduler, trainer_state: dict) -> None:
    with atomic_directory(directory) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        # Tied weights share storage; safetensors refuses aliases, and the config re-ties them on load.
        if getattr(model.config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)
        for name in getattr(model, "weights_from_target", ()):  # e.g. an EAGLE-3 head's embedding
            weights.pop(name, None)
        save_file(weights, tmp / "drafter.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        payload = {**trainer_state, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
        (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=1))


@contextlib.contextmanager
def atomic_directory(directory: str | Path):
    """Yield a temporary directory beside `directory`; when the block succeeds it replaces
    `directory` (swap_into_place), when it fails it is removed: readers never see a half-written one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        yield tmp
        swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomically(path: str | Path, write) -> None:
    """write(tmp) into a temporary sibling of `path`, then rename it to `path`: readers never see
    half a file, and a failed write leaves nothing behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def swap_into_place(tmp: Path, directory: Path) -> None:
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def is_sharded_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / ".metadata").is_file()


def save_sharded(directory: str | Path, model: torch.nn.Module, optimizer, scheduler, trainer_state: dict) -> Path:
    """A DCP checkpoint of a torchrun job; every rank calls it. OUT_DIR must be on a filesystem
    every node sees (rank 0 renames the directory the others wrote into)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}-tmp")  # one name on every rank
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-write
        tmp.mkdir(parents=True)
    distributed.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    distributed.barrier()  # every rank's shards are written
    if distributed.is_main():
        payload = {**trainer_state, "scheduler": scheduler.state_dict(), "world_size": distributed.world_size()}
        (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=1))
        swap_into_place(tmp, directory)
    distributed.barrier()
    return directory


def load_sharded(directory: Path, model: torch.nn.Module, optimizer=None) -> None:
    """DCP -> model (and optimizer), resharded to this job's world size, or to one process.
    DCP keeps its metadata and the optimizer's non-tensor entries with pickle: only load checkpoints
    this trainer wrote itself (the trainers resume from their own OUT_DIR)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), no_dist=not distributed.active())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_weights(directory: str | Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's drafter weights into ``model`` (built the same way), in place."""
    directory = Path(directory)
    if is_sharded_checkpoint(directory):
        return load_sharded(directory, model)
    missing, unexpected = distributed.load_full_state_dict(model, load_file(directory / "drafter.safetensors"))
    not_stored = {"lm_head.weight", *getattr(model, "weights_from_target", ())}  # tied, or the target's
    missing = [k for k in missing if k not in not_stored]
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not match the drafter (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


def load_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer and scheduler in place; return the trainer state dict."""
    directory = Path(directory)
    state = json.loads((directory / "trainer_state.json").read_text())
    if is_sharded_checkpoint(directory):
        load_sharded(directory, model, optimizer)
        state.pop("world_size", None)
    else:
        load_weights(directory, model)
        meta = state.pop("optimizer")
        tensors = load_file(directory / "optimizer.safetensors")
        if distributed.is_sharded(model):
            sharded_optimizer_from_flat(model, optimizer, tensors, meta)
        else:
            optimizer_from_flat(optimizer, tensors, meta)
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


def sharded_optimizer_from_flat(model, optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """A one-process optimizer checkpoint (keyed by parameter index) into a torchrun job's
    optimizer: indices -> parameter names, then loaded as full tensors and sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, p in model.named_parameters() if p.requires_grad]  # the optimizer's order
    state: dict[str, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, slot = key.split(".", 1)
        state.setdefault(names[int(index)], {})[slot] = value
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in meta["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def export_hf(directory: str | Path, model: torch.nn.Module, tokenizer) -> Path:
    """A plain HF directory (config + safetensors + tokenizer) that transformers and SGLang's
    ``--speculative-algorithm STANDALONE`` load as they are. Under torchrun every rank calls it:
    the full weights are gathered to rank 0, which writes them."""
    directory = Path(directory)
    if distributed.active():
        weights = distributed.full_state_dict(model)
        if distributed.is_main():
            _write_hf(directory, plain_copy(model, weights), tokenizer)
        distributed.barrier()
        return directory
    return _write_hf(directory, model, tokenizer)


def plain_copy(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The unsharded model of the same class over full CPU weights (no second random init: the
    skeleton is built on the meta device and the weights assigned), its tied weights re-tied."""
    with torch.device("meta"):
        plain = distributed.plain_class(model)(model.config)
    plain.load_state_dict(weights, assign=True, strict=False)
    plain.tie_weights()
    missing = [name for name, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"gathered weights miss {missing[:3]}")
    plain.generation_config = model.generation_config
    return plain


def _write_hf(directory: Path, model: torch.nn.Module, tokenizer) -> Path:
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return directory
