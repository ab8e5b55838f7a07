"""Checkpoints as safetensors + JSON only (never pickle), written atomically.

A checkpoint directory holds:
  drafter.safetensors     the trainable weights
  optimizer.safetensors   every optimizer state tensor, keyed "<param index>.<name>"
  trainer_state.json      step, data position, scheduler state, best score, optimizer param groups
It is written to a temporary sibling and renamed into place, so a run killed mid-write leaves the
previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        # Tied weights share storage; safetensors refuses aliases, and the config re-ties them on load.
        if getattr(model.config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)
        save_file(weights, tmp / "drafter.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        payload = {**trainer_state, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
        (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=1))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_weights(directory: str | Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's drafter weights into ``model`` (built the same way), in place."""
    directory = Path(directory)
    missing, unexpected = model.load_state_dict(load_file(directory / "drafter.safetensors"), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings, not stored
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not match the drafter (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


def load_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer and scheduler in place; return the trainer state dict."""
    directory = Path(directory)
    state = json.loads((directory / "trainer_state.json").read_text())
    load_weights(directory, model)
    optimizer_from_flat(optimizer, load_file(directory / "optimizer.safetensors"), state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


def export_hf(directory: str | Path, model: torch.nn.Module, tokenizer) -> Path:
    """A plain HF directory (config + safetensors + tokenizer) that transformers and SGLang's
    ``--speculative-algorithm STANDALONE`` load as they are."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
