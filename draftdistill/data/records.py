"""What every prompt source yields (prompts.py for files and bundled sets, sharegpt.py for ShareGPT)."""
from __future__ import annotations

from dataclasses import dataclass, field


class PromptFileError(ValueError):
    """A prompt file or row that cannot be used; the message names the file (and line)."""


@dataclass
class Prompt:
    messages: list[dict]  # chat messages ending with the user turn
    reference: str | None = None  # a dataset response, for off-policy prefixes and answer checks
    meta: dict = field(default_factory=dict)
