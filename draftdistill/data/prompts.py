"""Prompt sources: the bundled GSM8K set (with a fixed held-out split) and user files.

A user file is ``.jsonl`` (one object per line with ``messages``, ``prompt``, ``question`` or
``text``, and optionally ``answer``/``response``), ``.json`` (a list of such objects) or ``.txt``
(one prompt per line). A malformed row raises PromptFileError naming the file and line.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import json
from importlib import resources
from pathlib import Path

from .records import Prompt, PromptFileError  # noqa: F401 - re-exported
from .sharegpt import load_sharegpt

BUNDLED = {"gsm8k": "bundled/gsm8k/train.jsonl"}
SPLITS = ("train", "heldout", "all")
HELDOUT_PERCENT = 10


def split_of(text: str) -> str:
    """Deterministic split by content hash: stable under reordering and file edits elsewhere."""
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def row_to_prompt(row, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    reference = row.get("answer", row.get("response"))
    if reference is not None and not isinstance(reference, str):
        raise PromptFileError(f"{where}: 'answer'/'response' must be a string")
    if "messages" in row:
        messages = row["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        return Prompt(list(messages), reference)
    for key in ("prompt", "question", "text"):
        if key in row:
            if not isinstance(row[key], str) or not row[key].strip():
                raise PromptFileError(f"{where}: {key!r} must be a non-empty string")
            return Prompt([{"role": "user", "content": row[key]}], reference)
    raise PromptFileError(f"{where}: no 'messages', 'prompt', 'question' or 'text' field (keys: {sorted(row)})")


def read_text_file(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped); PromptFileError naming the file,
    line and column of the first byte that is not UTF-8."""
    data = path.read_bytes()
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PromptFileError(f"{path}:{line}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} at column "
                              f"{column}); save the file as UTF-8") from None


def read_prompt_file(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix == ".txt":
        lines = read_text_file(path).splitlines()
        return [Prompt([{"role": "user", "content": line}]) for line in lines if line.strip()]
    if path.suffix == ".json":
        try:
            rows = json.loads(read_text_file(path))
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(rows, list):
            raise PromptFileError(f"{path}: expected a JSON list of prompt objects")
        return [row_to_prompt(row, f"{path}: item {i}") for i, row in enumerate(rows)]
    if path.suffix != ".jsonl":
        raise PromptFileError(f"{path}: unsupported prompt file type (use .jsonl, .json or .txt)")
    prompts = []
    with io.StringIO(read_text_file(path), newline=None) as f:  # newlines as open() reads them
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            prompts.append(row_to_prompt(row, f"{path}:{lineno}"))
    return prompts


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("draftdistill.data").joinpath(BUNDLED[name])))


def load_prompts(source: str = "gsm8k", split: str = "all", limit: int | None = None) -> list[Prompt]:
    """Load prompts from a bundled name (``gsm8k`` or ``gsm8k:heldout``), ``sharegpt[:split]``
    (chat prompts, needs the ``chat`` extra) or a file path.

    The split applies to every source, so a user file also gets a stable held-out part.
    """
    name, _, split_in_name = source.partition(":")
    if split_in_name and (name in BUNDLED or name == "sharegpt"):
        split = split_in_name
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if name == "sharegpt" and not Path(source).exists():
        return load_sharegpt(split, limit, split_of)
    path = bundled_path(name) if name in BUNDLED else Path(source).expanduser()
    prompts = read_prompt_file(path)
    if split != "all":
        prompts = [p for p in prompts if split_of(p.messages[-1]["content"]) == split]
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in split {split!r}")
    return prompts[:limit] if limit else prompts
