"""Checkpoints, written atomically: to a temporary sibling, then renamed into place, so a run
killed mid-write leaves the previous checkpoint intact (recover_checkpoint_dir, called at start-up,
finishes or undoes a save that was killed between its renames, and removes its temporary directories).

One process writes safetensors + JSON only (never pickle):
  drafter.safetensors     the trainable weights
  optimizer.safetensors   every optimizer state tensor, keyed "<param index>.<name>"
  trainer_state.json      step, data position, scheduler state, best score, optimizer param groups,
                          "format": "safetensors"
A torchrun job's FSDP model writes a torch.distributed.checkpoint (DCP) directory instead, each rank its own
shards of the model and optimizer (.metadata, __<rank>_0.distcp), and rank 0 trainer_state.json
("format": "dcp"). Either kind resumes on any world size: DCP reshards on load (also into one process,
with no process group), and a safetensors checkpoint loads into sharded models as full tensors.

Only trainer_state.json decides the kind: a stray .metadata beside a safetensors checkpoint is never
read. DCP_NOTE says what is trusted when a DCP checkpoint is read. A checkpoint that cannot be resumed
from raises CheckpointError (a ValueError) naming the file and the fix.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from draftdistill.atomic_files import (atomic_directory, fsync_dir, fsync_tree, old_path, remove_path,
                                        swap_into_place, temporaries)
from draftdistill.atomic_files import write_atomically  # noqa: F401 - re-exported for the trainers

from . import distributed

STATE_FILE = "trainer_state.json"
FORMATS = ("safetensors", "dcp")
FRESH_START = "pass resume=false to start from scratch and overwrite it"
DCP_NOTE = ("A DCP checkpoint's .metadata is a Python pickle: it is read only when the checkpoint's "
            "trainer_state.json says this trainer wrote it (\"format\": \"dcp\"), and then through an "
            "allow-list unpickler that builds DCP's own metadata classes and nothing else; resume only from "
            "checkpoints this trainer wrote.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file, what is wrong, and how to
    start from scratch instead."""


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
    # torch checks the groups' sizes but not the state's shapes (a mismatch would surface as a shape
    # error in the first optimizer step): a state tensor with dimensions has its parameter's shape.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, slots in state.items():
        if not 0 <= index < len(params):
            raise ValueError(f"optimizer state for parameter {index}, but the optimizer has {len(params)}")
        for name, value in slots.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(f"optimizer state {index}.{name} has shape {list(value.shape)}, "
                                 f"its parameter {list(params[index].shape)}")
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
        payload = {**trainer_state, "format": "safetensors", "optimizer": opt_meta,
                   "scheduler": scheduler.state_dict()}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1))


def _looks_complete(directory: Path) -> bool:
    """A checkpoint directory whose trainer state reads and whose weight files are there (any
    non-empty directory when it has no trainer state: .old is only ever a renamed complete directory,
    this is a check against a hand-made one)."""
    if not directory.is_dir():
        return False
    if not (directory / STATE_FILE).exists():
        return any(directory.iterdir())
    try:
        fmt = checkpoint_format(directory)
    except CheckpointError:
        return False
    needed = ("drafter.safetensors", "optimizer.safetensors") if fmt == "safetensors" else (".metadata",)
    return all((directory / name).is_file() for name in needed)


def recover_checkpoint_dir(directory: str | Path) -> str | None:
    """Call once at start-up, by one process (rank 0, holding run_lock), before has_checkpoint and
    load_checkpoint: it brings `directory` back to one complete checkpoint after a save was killed.
    - `directory` missing, `directory`.old complete (killed between swap_into_place's renames): .old
      is renamed back (the previous checkpoint);
    - both there (killed after the second rename, or a stale .old): .old is removed;
    - temporary directories of killed saves (.{name}-*) are removed.
    Returns a note of what it did (for the log), or None when there was nothing to do."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        return None
    notes = []
    for tmp in temporaries(directory):
        shutil.rmtree(tmp, ignore_errors=True)
        notes.append(f"removed {tmp.name} (an interrupted save's temporary directory)")
    old = old_path(directory)
    if old.exists() or old.is_symlink():
        if directory.exists():
            remove_path(old)
            notes.append(f"removed {old.name} (left by an interrupted save; {directory.name} is complete)")
        elif _looks_complete(old):
            os.replace(old, directory)
            fsync_dir(directory.parent)
            notes.append(f"restored {directory.name} from {old.name} (a save was interrupted between its renames)")
        else:
            notes.append(f"left {old} in place: {directory.name} is missing and {old.name} is incomplete")
    return "; ".join(notes) or None


def has_checkpoint(directory: str | Path) -> bool:
    """Whether a checkpoint is there at all, complete or not (call recover_checkpoint_dir first): a
    trainer resuming must then load it (load_checkpoint raises CheckpointError when it is broken), never
    silently start from scratch over it."""
    directory = Path(directory)
    return directory.exists() or directory.is_symlink() or old_path(directory).exists()


def read_trainer_state(directory: str | Path) -> dict:
    """trainer_state.json as a dict, or CheckpointError naming the file and what is wrong."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so the checkpoint in {Path(directory)} is incomplete; {FRESH_START}")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); {FRESH_START}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); {FRESH_START}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror}); {FRESH_START}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0 \
            or not isinstance(state.get("scheduler"), dict):
        raise CheckpointError(f"{path}: not a trainer state (an object with a 'step' count and a 'scheduler'); "
                              f"{FRESH_START}")
    return state


def checkpoint_format(directory: str | Path, state: dict | None = None) -> str:
    """"safetensors" or "dcp", as the checkpoint's trainer_state.json says (never guessed from a
    .metadata file). A state written before the format was recorded is safetensors when
    drafter.safetensors is there, else DCP."""
    directory = Path(directory)
    state = read_trainer_state(directory) if state is None else state
    fmt = state.get("format")
    if fmt is None:
        if (directory / "drafter.safetensors").is_file():
            return "safetensors"
        if (directory / ".metadata").is_file():
            return "dcp"
        raise CheckpointError(f"{directory}: neither drafter.safetensors nor a DCP .metadata; {FRESH_START}")
    if fmt not in FORMATS:
        raise CheckpointError(f"{directory / STATE_FILE}: unknown checkpoint format {fmt!r} "
                              f"(expected one of {FORMATS}); {FRESH_START}")
    return fmt


def is_sharded_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds a DCP checkpoint, as its trainer_state.json says (False when it has
    none or an unreadable one)."""
    try:
        return checkpoint_format(directory) == "dcp"
    except CheckpointError:
        return False


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
        payload = {**trainer_state, "format": "dcp", "scheduler": scheduler.state_dict(),
                   "world_size": distributed.world_size()}
        payload.pop("optimizer", None)  # a state loaded from a safetensors checkpoint: DCP holds it
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1))
        fsync_tree(tmp)
        swap_into_place(tmp, directory)
    distributed.barrier()
    return directory


_DCP_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata (its own dataclasses and enums, torch.Size, dtypes, layouts, paths) and
    refuses every other global, so a crafted .metadata cannot call anything."""

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata as dcp_metadata

        allowed = (module, name) in _DCP_GLOBALS
        if module == "torch.distributed.checkpoint.metadata":
            value = getattr(dcp_metadata, name, None)
            allowed = isinstance(value, type) and value.__module__ == module
        elif module == "torch" and not allowed:
            allowed = isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of DCP metadata")
        return super().find_class(module, name)


def _safe_dcp_reader(directory: Path):
    """DCP's FileSystemReader with its .metadata unpickled through _MetadataUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def _safe_dcp_planner():
    """DCP's DefaultLoadPlanner, whose non-tensor entries (the optimizer's hyper-parameters) are read
    with torch.load(weights_only=True) instead of a full unpickle."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            entry = torch.load(value, weights_only=True)
            plain = io.BytesIO()  # torch's own, now known to hold plain values, for the planner's bookkeeping
            torch.save(entry, plain)
            plain.seek(0)
            super().load_bytes(read_item, plain)

    return SafePlanner()


def load_sharded(directory: Path, model: torch.nn.Module, optimizer=None) -> None:
    """DCP -> model (and optimizer), resharded to this job's world size, or to one process.
    DCP keeps its metadata and the optimizer's non-tensor entries with pickle; they are read here with
    an allow-list unpickler and weights_only=True (DCP_NOTE)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    # Read once here, so that a refused .metadata is reported as such (DCP would fall back to looking
    # for per-rank metadata and report that missing instead).
    _MetadataUnpickler(io.BytesIO((Path(directory) / ".metadata").read_bytes())).load()
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), storage_reader=_safe_dcp_reader(directory),
                 planner=_safe_dcp_planner(), no_dist=not distributed.active())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so the checkpoint in {path.parent} is incomplete; {FRESH_START}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors, truncated or corrupt ({e}); {FRESH_START}") from None


def _check_directory(directory: Path) -> None:
    if not directory.is_dir():
        if old_path(directory).exists():  # what recover_checkpoint_dir leaves when it is not a complete checkpoint
            raise CheckpointError(f"{directory}: missing, and {old_path(directory)} is not a complete checkpoint; "
                                  f"{FRESH_START}")
        if directory.exists() or directory.is_symlink():
            raise CheckpointError(f"{directory}: not a checkpoint directory; {FRESH_START}")
        raise CheckpointError(f"{directory}: no checkpoint directory")


@contextlib.contextmanager
def _named_errors(directory: Path, what: str):
    """Any failure while restoring -> CheckpointError naming the checkpoint and the way out."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError, OSError,
            pickle.UnpicklingError, EOFError) as e:
        message = " ".join(str(e).split())  # torch's size-mismatch report spans lines
        message = message if len(message) <= 400 else message[:400] + "..."
        raise CheckpointError(f"{directory}: {what} ({type(e).__name__}: {message}); {FRESH_START}") from e


def load_weights(directory: str | Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's drafter weights into ``model`` (built the same way), in place; a DCP
    checkpoint only when its trainer_state.json says so (DCP_NOTE). CheckpointError when it cannot."""
    directory = Path(directory)
    _check_directory(directory)
    if not (directory / STATE_FILE).exists() and (directory / "drafter.safetensors").is_file():
        fmt = "safetensors"  # weights alone, e.g. copied out of a checkpoint
    else:
        fmt = checkpoint_format(directory)
    if fmt == "dcp":
        with _named_errors(directory, "the DCP checkpoint does not load into this model"):
            load_sharded(directory, model)
        return
    path = directory / "drafter.safetensors"
    weights = _read_safetensors(path)
    with _named_errors(path, "does not match the model"):
        missing, unexpected = distributed.load_full_state_dict(model, weights)
    not_stored = {"lm_head.weight", *getattr(model, "weights_from_target", ())}  # tied, or the target's
    missing = [k for k in missing if k not in not_stored]
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match the drafter (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); {FRESH_START}")


def load_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer and scheduler in place; return the trainer state dict (without the
    checkpoint's own keys). A checkpoint that cannot be restored (missing or unreadable
    trainer_state.json, truncated safetensors, shapes that do not match the model) raises
    CheckpointError naming the file; the model may then be half-restored, so do not train on."""
    directory = Path(directory)
    _check_directory(directory)
    state = read_trainer_state(directory)
    fmt = checkpoint_format(directory, state)
    state.pop("format", None)
    if fmt == "dcp":
        with _named_errors(directory, "the DCP checkpoint does not load into this run's model and optimizer"):
            load_sharded(directory, model, optimizer)
        state.pop("world_size", None)
    else:
        load_weights(directory, model)
        meta = state.pop("optimizer", None)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{directory / STATE_FILE}: no optimizer state; {FRESH_START}")
        path = directory / "optimizer.safetensors"
        tensors = _read_safetensors(path)
        with _named_errors(path, "does not match this run's optimizer"):
            if distributed.is_sharded(model):
                sharded_optimizer_from_flat(model, optimizer, tensors, meta)
            else:
                optimizer_from_flat(optimizer, tensors, meta)
    with _named_errors(directory / STATE_FILE, "scheduler state does not load"):
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

