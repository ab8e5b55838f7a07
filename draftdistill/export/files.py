"""Reading and writing exported directories: safetensors only (never pickle), written atomically."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from draftdistill.atomic_files import atomic_directory  # noqa: F401 - the exporters' writer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What a tokenizer (and its chat template) may be saved as; copied as they are by the converters.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class ExportError(ValueError):
    """A source the exporters cannot read or a conversion they refuse; the message says why."""


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return value


def refuse_pickles(directory: Path) -> None:
    """Raise when `directory` holds weights only in pickle-based files (which we never load)."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not safetensors_files(directory):
        raise ExportError(f"{directory}: only pickle-based weight files ({', '.join(pickles)}); loading them could run "
                          "arbitrary code, so they are refused. Save the weights as .safetensors "
                          "(e.g. transformers' save_pretrained(..., safe_serialization=True)) and export that")


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of `directory`: those its model.safetensors.index.json names, else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [directory / name for name in names]
    return sorted(directory.glob("*.safetensors"))


def tensor_names(files: list[Path]) -> list[str]:
    """Every tensor name in `files`, read from their headers only."""
    from safetensors import safe_open

    names = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.extend(f.keys())
    return names


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def load_one_tensor(files: list[Path], names: tuple[str, ...]) -> tuple[str, torch.Tensor] | None:
    """The first of `names` found in `files` (only that tensor is read), or None."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for name in names:
                if name in keys:
                    return name, f.get_tensor(name)
    return None


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer files `source` has into `destination`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
