"""Load a causal LM and its tokenizer from a builtin name, an HF directory, a GGUF file, or a
safetensors checkpoint (a ``*.safetensors`` file whose directory holds ``config.json``).

The files are checked before anything is built: a config.json that is not JSON, a truncated
safetensors file, or weights only in pickle form (``pytorch_model.bin``, ``*.pt``: unpickling can run
code, so they are refused, never loaded) raise ModelFileError naming the file."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .builtin import BUILTIN_MODELS, ensure_builtin

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
JSON_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json")


class ModelFileError(ValueError):
    """A model or tokenizer file that cannot be read; the message names the file."""


class PickleWeightsError(ModelFileError):
    """Weights only as a pickle (pytorch_model.bin and the like), which are never unpickled."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: ``directory`` for transformers, ``gguf_file`` inside it if any."""

    directory: Path
    gguf_file: str | None = None
    weights_file: Path | None = None  # a specific safetensors file to load over the config


def resolve_model_source(spec: str) -> ModelSource:
    """Turn a user's model spec into a ModelSource whose files are checked (check_model_files), or
    raise FileNotFoundError / ModelFileError naming it."""
    source = _resolve(spec)
    check_model_files(source)
    return source


def read_json_file(path: Path, what: str = "JSON file") -> object:
    """json.loads of a file, or ModelFileError naming it (with the line and column of a syntax error)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}:{e.lineno}:{e.colno}: invalid {what}: {e.msg}") from None


def check_safetensors_file(path: Path) -> None:
    """Read the header (cheap): a truncated or corrupt file raises ModelFileError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from None


def check_model_files(source: ModelSource) -> None:
    """The checks resolve_model_source makes, none of which reads a weight file (a drafter's
    tokenizer is compared with the target's first): JSON files parse (config.json is an object), and a
    directory with pickle weights only is refused before transformers would unpickle them."""
    directory = source.directory
    if source.gguf_file is None:  # a GGUF carries its config; a config.json beside it is not ours to read
        for name in JSON_FILES:
            if (directory / name).is_file():
                value = read_json_file(directory / name, name)
                if name == "config.json" and not isinstance(value, dict):
                    raise ModelFileError(f"{directory / name}: expected a JSON object")
    if source.weights_file is not None or source.gguf_file is not None:
        return
    if not any(directory.glob("*.safetensors")):
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickles:
            raise PickleWeightsError(
                f"{directory / pickles[0]}: weights in pickle form are refused (unpickling a file can run "
                f"code); convert them to safetensors where you trust the file, e.g. "
                f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")


def check_weight_files(source: ModelSource) -> None:
    """Every safetensors file of the source has a readable header (cheap): ModelFileError naming a
    truncated or corrupt one, where transformers would report it without the file's name."""
    if source.gguf_file is not None:
        return
    files = [source.weights_file] if source.weights_file is not None else sorted(source.directory.glob("*.safetensors"))
    for path in files:
        check_safetensors_file(path)


def _resolve(spec: str) -> ModelSource:
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
    if path.suffix in PICKLE_SUFFIXES:
        raise PickleWeightsError(f"{path}: weights in pickle form are refused (unpickling a file can run code); "
                                 f"use a .safetensors file (with config.json beside it) or an HF directory")
    raise FileNotFoundError(f"model {path}: expected an HF directory, a .gguf or a .safetensors file")


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.gguf_file)
    except (ImportError, ModelFileError):
        raise
    except Exception as e:  # tokenizers raises bare Exception on a tokenizer.json it cannot parse
        where = source.directory / source.gguf_file if source.gguf_file else source.directory
        raise ModelFileError(f"{where}: tokenizer does not load ({type(e).__name__}: {e})") from e


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    check_weight_files(source)
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
        # use_safetensors: never fall back to unpickling a pytorch_model.bin lying beside the weights
        safe = {} if source.gguf_file else {"use_safetensors": True}
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=source.gguf_file, dtype=dtype, **safe)
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
