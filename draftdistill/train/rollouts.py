"""Where the response context of a training example comes from (GKD's lambda, generalised):

  dataset  the prompt's reference answer (off-policy, fixed data);
  target   a response sampled from the target once and cached (the EAGLE/SpecForge-style data);
  drafter  a response sampled from the drafter itself, fresh every time (fully on-policy).

Every response position is then a proposal the drafter would have made from that context, and the
target scores all of them in one forward pass.
"""
from __future__ import annotations

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
                 temperature: float, eos_token_id, seed: int = 0):
        self.target, self.drafter, self.tokenizer = target, drafter, tokenizer
        self.prompts, self.prompt_ids = prompts, prompt_ids
        self.response_tokens = response_tokens
        self.sampling = SamplingConfig(temperature=temperature)
        self.eos = eos_token_id
        self.seed = seed
        self.target_cache: dict[int, list[int]] = {}  # prompt index -> cached target response
        self.target_forward_tokens = 0  # teacher tokens spent on rollouts (for equal-budget comparisons)

    def response(self, index: int, source: str, generator: torch.Generator) -> list[int]:
        ids = self.prompt_ids[index]
        if source == "drafter":
            tokens, _ = target_generate(self.drafter, ids, self.response_tokens, self.sampling, self.eos, generator)
            return tokens.tolist()
        if source == "target":
            if index not in self.target_cache:
                # Seeded by the prompt alone: the cached response is the same in a resumed run.
                own = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                tokens, _ = target_generate(self.target, ids, self.response_tokens, self.sampling, self.eos, own)
                self.target_cache[index] = tokens.tolist()
                self.target_forward_tokens += len(self.target_cache[index])
            return self.target_cache[index]
        if source == "dataset":
            reference = self.prompts[index].reference
            if not reference:
                raise ValueError(f"prompt {index} has no reference answer for the 'dataset' prefix source")
            return self.tokenizer(reference, add_special_tokens=False)["input_ids"][: self.response_tokens]
        raise ValueError(f"unknown prefix source {source!r}; choose from {SOURCES}")


def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Right-padded [B, L] ids, attention mask, and a mask of the positions whose NEXT token is a
    response token (where the drafter's prediction is scored), shape [B, L-1]."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    scored = torch.zeros((len(prompts), width - 1), dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attention[row, : len(p) + len(r)] = 1
        scored[row, len(p) - 1: len(p) + len(r) - 1] = True
    return ids, attention, scored
