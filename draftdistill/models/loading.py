"""Load a causal LM and its tokenizer from a builtin name, an HF directory, a GGUF file, or a
safetensors checkpoint (a ``*.safetensors`` file whose directory holds ``config.json``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .builtin import BUILTIN_MODELS, ensure_builtin


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: ``directory`` for transformers, ``gguf_file`` inside it if any."""

    directory: Path
    gguf_file: str | None = None
    weights_file: Path | None = None  # a specific safetensors file to load over the config


def resolve_model_source(spec: str) -> ModelSource:
    """Turn a user's model spec into a ModelSource, or raise FileNotFoundError naming it."""
    if spec in BUILTIN_MODELS:
        return ModelSource(ensure_builtin(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise FileNotFoundError(
            f"model {spec!r} not found: not a builtin name ({known}) and no such file or directory"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(path, gguf_file=ggufs[0].name)
            raise FileNotFoundError(f"model directory {path} has no config.json (nor a single .gguf file)")
        return ModelSource(path)
    if path.suffix == ".gguf":
        return ModelSource(path.parent, gguf_file=path.name)
    if path.suffix == ".safetensors":
        if not (path.parent / "config.json").is_file():
            raise FileNotFoundError(f"safetensors checkpoint {path} needs a config.json beside it")
        return ModelSource(path.parent, weights_file=path)
    raise FileNotFoundError(f"model {path}: expected an HF directory, a .gguf or a .safetensors file")


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.gguf_file)


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = str(source.directory)
    if source.weights_file is not None:
        config = AutoConfig.from_pretrained(directory)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = load_file(str(source.weights_file))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied heads are legitimately absent from the file; anything else is a broken checkpoint.
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"{source.weights_file}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        if config.tie_word_embeddings:
            model.tie_weights()
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=source.gguf_file, dtype=dtype)
    return model.to(device).eval()


def default_dtype(device: str | torch.device) -> torch.dtype:
    # bf16 matmuls are fast on GPUs but slow and lossy on most CPUs.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_target(spec: str, dtype: torch.dtype | None = None, device: str | None = None):
    """Load the target (teacher) model and its tokenizer: returns ``(model, tokenizer)``."""
    device = device or default_device()
    source = resolve_model_source(spec)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype or default_dtype(device), device)
    model.requires_grad_(False)
    return model, tokenizer
