"""Data-parallel training on PyTorch's own engine: torchrun starts one process per GPU, FSDP2
(`fully_shard` over a DeviceMesh) holds the trainable model, and this module is all the plumbing
the two trainers need. Without torchrun (WORLD_SIZE unset) nothing here touches torch.distributed
and every helper is the identity, so a single-process run is what it always was.

The conventions both trainers follow:
- `batch_size` is per rank. A step's global micro-batch is batch_size * world prompts of the
  shuffled order and rank r takes its r-th slice, so 2 ranks x batch 2 train on the prompts of
  1 rank x batch 4.
- The loss is a sum over tokens divided by the step's loss tokens summed over every rank and
  micro-batch (`all_sum` before any backward). FSDP averages gradients over ranks, so each rank's
  loss is multiplied by `grad_scale()` (the world size): the reduced gradient is then the global
  batch's, exactly as one process would compute it.
- The trainable model is sharded per decoder layer (`fsdp: true`) or replicated through FSDP2 on a
  (world, 1) mesh, which is DDP (`fsdp: false`). Frozen teachers are replicated plain modules or
  sharded the same way (`teacher_parallel`); a sharded forward is a collective, so every rank must
  run it the same number of times.
- A model small enough to keep whole on every rank (the EAGLE-3 head) stays a plain module: rank 0's
  weights are broadcast once, its gradients summed over ranks (`sum_gradients`, the loss already
  divided by the global token count), and rank 0 writes its one-process checkpoint.
- Anything that runs a data-dependent number of forwards (sampling, speculative decoding) runs
  inside `gathered(model)`: the parameters are all-gathered once and those forwards talk to no
  other rank.
"""
from __future__ import annotations

import contextlib
import functools
import os
import weakref

import torch
import torch.distributed as dist

TEACHER_PARALLEL = ("replicate", "shard")
_FORWARD_ONLY = weakref.WeakSet()  # sharded models that never run backward (teachers, EMA copies)


def launched() -> bool:
    """Started by torchrun (or anything else that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: str | None) -> str | None:
    """Join the torchrun job (once) and return this rank's device; outside torchrun return `device`
    unchanged. Under torchrun `device` only picks the kind: cuda (NCCL, GPU LOCAL_RANK) unless it
    says cpu or there is no GPU, then cpu (gloo)."""
    if not launched():
        return device
    cuda = torch.cuda.is_available() and not (device or "").startswith("cpu")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not active():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def close() -> None:
    """Leave the job (the CLI does, once a trainer returns)."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _collective_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only


def all_sum(values: list[float]) -> list[float]:
    """Each number summed over ranks (in float64, exact for token counts)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def grad_scale() -> int:
    """The factor FSDP's gradient reduction divides by (it averages over ranks)."""
    return world_size()


def broadcast(obj):
    """Rank 0's copy of a small picklable object (our own ranks' data, never a file)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def scalar(value) -> float:
    """A float from a tensor or a DTensor (e.g. clip_grad_norm_ of FSDP parameters)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# --- models --------------------------------------------------------------------------------------


@functools.cache
def _mesh(shard: bool):
    from torch.distributed.device_mesh import init_device_mesh

    if shard:
        return init_device_mesh(_collective_device(), (world_size(),), mesh_dim_names=("shard",))
    return init_device_mesh(_collective_device(), (world_size(), 1), mesh_dim_names=("replicate", "shard"))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one at a time: HF models name their classes in _no_split_modules."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: torch.nn.Module, shard: bool = True, forward_only: bool = False) -> torch.nn.Module:
    """FSDP2 over each decoder layer, then the root (embeddings, final norm, head), in place; the
    parameters move to this rank's device. shard=False: a (world, 1) mesh, i.e. every rank keeps
    every parameter and gradients are all-reduced (DDP). Build the optimizer after this.
    forward_only: a model that never runs backward (a frozen teacher, an EMA copy), whose root
    must also reshard after forward (no backward would do it)."""
    if not active():
        return model
    from torch.distributed.fsdp import fully_shard

    if not forward_only:
        broadcast_module(model)
    mesh = _mesh(shard)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if forward_only:
        _FORWARD_ONLY.add(model)
    # Gather once here, outside torch.inference_mode: FSDP allocates the unsharded parameters on
    # its first gather, and if that ran inside the decoder (inference mode) they would be inference
    # tensors that no later gather outside it may write.
    with gathered(model):
        pass
    return model


def broadcast_module(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """Every parameter and buffer but those named in `skip` set to rank 0's, in place (a random init
    could differ by GPU)."""
    if active():
        named = [*model.named_parameters(), *model.named_buffers()]
        with torch.no_grad():
            for tensor in {id(t): t for name, t in named if name not in skip}.values():
                dist.broadcast(tensor, src=0)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Held by FSDP2 (sharded or replicated through it), rather than a plain module every rank keeps whole."""
    if not active():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sum_gradients(parameters) -> None:
    """Each gradient summed over ranks, in place: for a small model every rank keeps whole (the
    EAGLE-3 head), whose loss is already divided by the global token count. One all-reduce over
    a flat buffer per dtype."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group]).to(_collective_device())
        dist.all_reduce(flat)
        offset = 0
        for g in group:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def place_frozen(model: torch.nn.Module, how: str, device) -> torch.nn.Module:
    """A frozen teacher: replicated (a plain module on this rank's device) or sharded by FSDP2."""
    if how not in TEACHER_PARALLEL:
        raise ValueError(f"teacher_parallel must be one of {TEACHER_PARALLEL}, got {how!r}")
    if not active() or how == "replicate":
        return model.to(device)
    return shard_model(model, shard=True, forward_only=True)


@contextlib.contextmanager
def gathered(*models: torch.nn.Module):
    """All parameters of the FSDP models all-gathered for the duration, and kept: the forwards
    inside talk to no other rank, so ranks may run different numbers of them (sampling, decoding).
    Collective: every rank enters. Costs the models' full size in memory meanwhile."""
    from torch.distributed.fsdp import FSDPModule

    roots = {id(m): m for m in models if isinstance(m, FSDPModule)}
    units = list({id(u): u for root in roots.values() for u in root.modules() if isinstance(u, FSDPModule)}.values())
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # FSDP's defaults: the root of a trained model keeps its parameters after forward (its
            # backward follows at once), every other unit frees them.
            unit.set_reshard_after_forward(id(unit) not in roots or unit in _FORWARD_ONLY, recurse=False)


# --- state dicts ---------------------------------------------------------------------------------


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as a full CPU tensor: on every rank in one process, on rank 0 only (others get
    {}) under torch.distributed, where gathering is a collective every rank must join."""
    if not active():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list, list]:
    """Load full tensors (every rank passes the same dict) into a plain or sharded model;
    returns (missing, unexpected) keys."""
    if not is_sharded(model):
        result = model.load_state_dict(weights, strict=False)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    return list(result.missing_keys), list(result.unexpected_keys)


def plain_class(model: torch.nn.Module) -> type:
    """The model's own class: fully_shard swaps it for FSDP<Name>(FSDPModule, Name)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
