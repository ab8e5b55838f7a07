"""Verifier rewards: a score in [0, 1] for a student's decoded completion.

GSM8K references end with "#### <number>"; a completion is correct when its final answer (after
"####" if it writes one, else its last number) equals the reference's, as numbers.
"""
from __future__ import annotations

import re
from typing import Callable

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _normalise(text: str) -> str | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style text: after the last "####", else its last number."""
    if "####" in text:
        numbers = _NUMBER.findall(text.rsplit("####", 1)[1])
        if numbers:
            return _normalise(numbers[0])
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def gsm8k_reward(completion: str, reference: str | None) -> float:
    """1.0 when the completion's final answer equals the reference's, else 0.0."""
    if not reference:
        raise ValueError("the gsm8k reward needs prompts with a reference answer ('#### <number>')")
    want = extract_answer(reference)
    return float(want is not None and extract_answer(completion) == want)


def gsm8k_feedback(completion: str, reference: str | None) -> str:
    """SDPO-style verifier feedback on an attempt, without revealing the answer."""
    got = extract_answer(completion)
    if got is None:
        return "A previous attempt gave no final numeric answer."
    verdict = "correct" if gsm8k_reward(completion, reference) else "incorrect"
    return f"A previous attempt answered {got}, which is {verdict}."


REWARDS: dict[str, Callable[[str, str | None], float]] = {"gsm8k": gsm8k_reward}
FEEDBACK: dict[str, Callable[[str, str | None], str]] = {"gsm8k": gsm8k_feedback}
