"""Where the response context of a training example comes from (GKD's lambda, generalised):

  dataset  the prompt's reference answer (off-policy, fixed data);
  target   a response sampled from the target once and cached (the EAGLE/SpecForge-style data);
  drafter  a response sampled from the drafter itself, fresh every time (fully on-policy).

Every response position is then a proposal the drafter would have made from that context, and the
target scores all of them in one forward pass.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from draftdistill.spec import SamplingConfig, target_generate

SOURCES = ("dataset", "target", "drafter")


def pick_source(weights: dict[str, float], generator: torch.Generator) -> str:
    names = [s for s in SOURCES if weights.get(s, 0) > 0]
    if not names:
        raise ValueError(f"prefix mix needs a positive weight for one of {SOURCES}, got {weights}")
    w = torch.tensor([float(weights[s]) for s in names])
    return names[int(torch.multinomial(w / w.sum(), 1, generator=generator))]


class RolloutSource:
    def __init__(self, target, drafter, tokenizer, prompts, prompt_ids, *, response_tokens: int,
                 temperature: float, eos_token_id, seed: int = 0, cache_path: str | Path | None = None,
                 cache_tag: str = "", write_cache: bool = True):
        self.target, self.drafter, self.tokenizer = target, drafter, tokenizer
        self.prompts, self.prompt_ids = prompts, prompt_ids
        self.response_tokens = response_tokens
        self.sampling = SamplingConfig(temperature=temperature)
        self.eos = eos_token_id
        self.seed = seed
        self.target_cache: dict[int, list[int]] = {}  # prompt index -> cached target response
        self.target_forward_tokens = 0  # teacher tokens spent on rollouts (for equal-budget comparisons)
        # Optional JSONL file of target responses shared by runs (arms of a benchmark, resumed runs):
        # a line is used only when its key (target, prompt ids, length, temperature, seed) matches.
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache_tag = cache_tag
        self.write_cache = write_cache  # False: another rank writes the same lines
        self.stored = self._read_cache_file()

    def _key(self, index: int) -> str:
        what = [self.cache_tag, self.prompt_ids[index][0].tolist(), self.response_tokens,
                self.sampling.temperature, self.seed, index]
        return hashlib.sha1(json.dumps(what).encode()).hexdigest()

    def _read_cache_file(self) -> dict[str, list[int]]:
        stored = {}
        if self.cache_path is not None and self.cache_path.is_file():
            for line in self.cache_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    stored[row["key"]] = [int(t) for t in row["tokens"]]
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a line cut by a killed run: that response is generated again
        return stored

    def response(self, index: int, source: str, generator: torch.Generator) -> list[int]:
        ids = self.prompt_ids[index]
        if source == "drafter":
            tokens, _ = target_generate(self.drafter, ids, self.response_tokens, self.sampling, self.eos, generator)
            return tokens.tolist()
        if source == "target":
            tokens = self.target_response(index)
            # Counted whether generated now or read from the file: the budget is the same.
            self.target_forward_tokens += len(tokens)
            return tokens
        if source == "dataset":
            reference = self.prompts[index].reference
            if not reference:
                raise ValueError(f"prompt {index} has no reference answer for the 'dataset' prefix source")
            return self.tokenizer(reference, add_special_tokens=False)["input_ids"][: self.response_tokens]
        raise ValueError(f"unknown prefix source {source!r}; choose from {SOURCES}")

    def target_response(self, index: int) -> list[int]:
        """The prompt's target response: from memory, the cache file, or sampled now (seeded by the
        prompt alone, so a resumed run, or another rank, gets the same one)."""
        if index not in self.target_cache:
            key = self._key(index) if self.cache_path else None
            if key in self.stored:
                self.target_cache[index] = self.stored[key]
            else:
                own = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                tokens, _ = target_generate(self.target, self.prompt_ids[index], self.response_tokens, self.sampling,
                                            self.eos, own)
                self.target_cache[index] = tokens.tolist()
                if self.cache_path is not None and self.write_cache:
                    # One write() of one line in append mode: lines from several ranks do not mix.
                    self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                    with self.cache_path.open("a") as f:
                        f.write(json.dumps({"key": key, "tokens": self.target_cache[index]}) + "\n")
        return self.target_cache[index]

