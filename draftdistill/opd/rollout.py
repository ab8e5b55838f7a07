"""The two things OPD asks of a model: sample responses (the student) and score them (teachers).

Both are small interfaces so a server backend (SGLang) can replace the in-process one:

    Sampler.sample(prompts, max_new_tokens, generator) -> [Completion(tokens, logprobs, finished, loss_logprobs)]
    Scorer.score(prompts, responses, forms, top_k, temperature) -> TeacherScores

`LocalSampler` decodes a whole batch at once with a KV cache (left-padded prompts); `LocalScorer`
runs one forward over prompt + response (batching.pack / response_logits) and returns the forms
asked for. The SGLang-server versions are in server.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from draftdistill.losses import TeacherTokenLogProbs, TeacherTopK
from draftdistill.spec import SamplingConfig, logits_to_probs
from draftdistill.train.batching import pack, response_logits

FORMS = ("logits", "topk", "token")


@dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]  # log-prob of each token under the sampling distribution (behaviour policy)
    finished: bool = False  # ended with a stop token
    # log-prob of each token under the LOSS distribution of the weights that sampled it,
    # log_softmax(logits / loss_temperature) with no top-p: what the importance ratio compares the
    # student against (Micro.old_logprobs), so the ratio is 1 whenever the weights are unchanged,
    # whatever the rollout's temperature / top-p / greedy. None: the sampler cannot give it.
    loss_logprobs: list[float] | None = None


class Sampler(Protocol):
    def sample(self, prompts: list[list[int]], max_new_tokens: int,
               generator: torch.Generator) -> list[Completion]: ...


@dataclass
class TeacherScores:
    """A teacher's view of a batch of responses, [B, R] aligned with `pack(prompts, responses)`.

    token: log p(response token) at each position (always present);
    topk: the top-k log-probs (normalised over the full vocabulary) when asked for;
    logits: raw logits [B, R, V] when asked for (the divergences apply the temperature).
    token and topk are computed at the scoring temperature.
    """

    token: TeacherTokenLogProbs
    topk: TeacherTopK | None = None
    logits: torch.Tensor | None = None

    def full_or_topk(self):
        """The richest distribution form: logits, else top-k."""
        return self.logits if self.logits is not None else self.topk


class Scorer(Protocol):
    def score(self, prompts: list[list[int]], responses: list[list[int]], forms: set[str], top_k: int,
              temperature: float) -> TeacherScores: ...


class LocalSampler:
    """Batched in-process sampling with a KV cache, randomness from the caller's generator.
    Records each token's log-prob under the sampling distribution (temperature, top-p) and under
    the loss distribution (loss_temperature, no top-p; Completion.loss_logprobs)."""

    def __init__(self, model, eos_ids: list[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                 loss_temperature: float = 1.0):
        if not loss_temperature > 0:
            raise ValueError(f"loss_temperature must be > 0, got {loss_temperature}")
        self.model, self.eos, self.pad_id = model, sorted(set(eos_ids)), pad_id
        self.sampling = SamplingConfig(temperature=temperature, top_p=top_p)
        self.loss_temperature = loss_temperature

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], max_new_tokens: int, generator: torch.Generator) -> list[Completion]:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        batch = pack(prompts, [[] for _ in prompts], self.pad_id)
        width = batch.prompt_width
        ids, attention = batch.ids[:, :width].to(device), batch.attention[:, :width].to(device)
        positions = batch.positions[:, :width].to(device)
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        eos = torch.tensor(self.eos, device=device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        tokens, logps, loss_logps = [], [], []
        for _ in range(max_new_tokens):
            probs = logits_to_probs(logits, self.sampling)
            token = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(device)[:, 0]
            tokens.append(token)
            logps.append(probs.gather(-1, token[:, None])[:, 0].clamp_min(1e-30).log())
            loss_logp = F.log_softmax(logits.float() / self.loss_temperature, -1)
            loss_logps.append(loss_logp.gather(-1, token[:, None])[:, 0])
            done = done | torch.isin(token, eos)
            if bool(done.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=attention, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
        model.train(was_training)
        if not tokens:
            return [Completion([], [], False) for _ in prompts]
        tokens_t, logps_t = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).float().tolist()
        loss_t = torch.stack(loss_logps, 1).tolist()
        completions = []
        for row_tokens, row_logps, row_loss in zip(tokens_t, logps_t, loss_t):
            end = next((i + 1 for i, t in enumerate(row_tokens) if t in self.eos), len(row_tokens))
            completions.append(Completion(row_tokens[:end], row_logps[:end], row_tokens[end - 1] in self.eos,
                                          row_loss[:end]))
        return completions


def old_logprobs(logprobs: list[list[float] | None], sampled: list[bool], shape, device=None) -> torch.Tensor:
    """Micro.old_logprobs [B, R] from each row's Completion.loss_logprobs (`logprobs[r]`): NaN where
    unknown (rows the student did not sample, padding), which the objectives treat as on-policy.
    A sampled row without them is refused: its ratio would compare two different distributions
    (e.g. top-p or rollout-temperature log-probs against the loss temperature's), which the PPO
    clip turns into lost gradients."""
    old = torch.full(tuple(shape), float("nan"))
    for row, (lp, own) in enumerate(zip(logprobs, sampled)):
        if own and lp is None:
            raise ValueError("the sampler gave no log-probs under the loss distribution (Completion.loss_logprobs) "
                             "for the importance ratio; give them, or set importance_sampling=false")
        if own and lp:
            old[row, : len(lp)] = torch.tensor(lp, dtype=old.dtype)
    return old.to(device) if device is not None else old


def scores_from_logits(logits: torch.Tensor, targets: torch.Tensor, forms: set[str], top_k: int,
                       temperature: float) -> TeacherScores:
    """Turn teacher logits [B, R, V] into the forms asked for (what a server would return)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    token = TeacherTokenLogProbs(targets, logp.gather(-1, targets[..., None]).squeeze(-1))
    topk = None
    if "topk" in forms:
        values, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        topk = TeacherTopK(ids, values)
    return TeacherScores(token, topk, logits if "logits" in forms else None)


class LocalScorer:
    """An in-process teacher: one forward over prompt + response, only at response positions."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id

    @torch.no_grad()
    def score(self, prompts, responses, forms, top_k, temperature) -> TeacherScores:
        device = next(self.model.parameters()).device
        batch = pack(prompts, responses, self.pad_id).to(device)
        logits = response_logits(self.model, batch)
        return scores_from_logits(logits, batch.targets, set(forms), top_k, temperature)


def _place(parts: list[tuple[list[int], torch.Tensor | None]], rows: int, width: int, fill=0.0):
    present = [(r, t) for r, t in parts if t is not None]
    if not present:
        return None
    sample = present[0][1]
    out = torch.full((rows, width, *sample.shape[2:]), fill, dtype=sample.dtype, device=sample.device)
    for index, tensor in present:
        out[index, : tensor.shape[1]] = tensor
    return out


def merge_scores(parts: list[tuple[list[int], TeacherScores]], rows: int, width: int) -> TeacherScores:
    """Scores of disjoint row subsets (one per routed teacher) -> one [rows, width] TeacherScores."""
    def field(get, fill=0.0):
        return _place([(r, get(s)) for r, s in parts], rows, width, fill)

    token = TeacherTokenLogProbs(field(lambda s: s.token.token_ids, 0), field(lambda s: s.token.logprobs))
    topk = None
    if all(s.topk is not None for _, s in parts):
        topk = TeacherTopK(field(lambda s: s.topk.ids, 0), field(lambda s: s.topk.logprobs))
    logits = field(lambda s: s.logits) if all(s.logits is not None for _, s in parts) else None
    return TeacherScores(token, topk, logits)


def scores_from_lists(token: list[list[float]], top: list[list], responses: list[list[int]],
                      device="cpu") -> TeacherScores:
    """Pad per-sequence server scores (top: per row, per position (ids, log-probs)) into a TeacherScores
    aligned with pack(prompts, responses)."""
    width = max(1, max(len(r) for r in responses))
    ids = torch.zeros((len(responses), width), dtype=torch.long)
    lp = torch.zeros((len(responses), width))
    for row, (r, t) in enumerate(zip(responses, token)):
        ids[row, : len(r)] = torch.tensor(r, dtype=torch.long)
        lp[row, : len(t)] = torch.tensor(t)
    topk = None
    if top and all(top):
        k = min(len(ids_) for row in top for ids_, _ in row)
        top_ids = torch.zeros((len(responses), width, k), dtype=torch.long)
        top_lp = torch.full((len(responses), width, k), -1e4)
        for row, positions in enumerate(top):
            for col, (i, v) in enumerate(positions):
                top_ids[row, col], top_lp[row, col] = torch.tensor(i[:k]), torch.tensor(v[:k])
        topk = TeacherTopK(top_ids.to(device), top_lp.to(device))
    return TeacherScores(TeacherTokenLogProbs(ids.to(device), lp.to(device)), topk, None)


__all__ = ["Completion", "FORMS", "LocalSampler", "LocalScorer", "Sampler", "Scorer", "TeacherScores",
           "merge_scores", "old_logprobs", "scores_from_lists", "scores_from_logits"]
