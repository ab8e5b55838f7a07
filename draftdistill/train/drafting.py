"""What the two drafter trainers (drafter.py, eagle3.py) share: their data and held-out evaluation
keys, each micro-batch's response contexts, and the held-out evaluation on the lossless decoder."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from draftdistill.data import encode_prompt
from draftdistill.data.chat import check_fits_context
from draftdistill.eval import evaluate_drafter
from draftdistill.losses import parse_divergence
from draftdistill.spec import SamplingConfig

from . import distributed
from .config import TrainConfig, at_least, require
from .loop import batch_positions, row_generator
from .rollouts import RolloutSource, pick_source


@dataclass
class DraftConfig(TrainConfig):
    # --- models and data (both drafter trainers) ----------------------------------------------------
    target: str = "smollm2-135m-instruct"  # the model to speed up: path or builtin name
    drafter: str = "pruned:2"  # the drafter to train: a path or builtin name, pruned:K, small:..., or eagle3
    prompts: str = "gsm8k:train"  # training prompts: a bundled name[:split], sharegpt[:split] or a .jsonl/.json file
    prompt_limit: int = 0  # use only the first N training prompts (0: all)
    eval_prompts: str = "gsm8k:heldout"  # held-out prompts for the decoder's tau/alpha
    divergence: str = "tvd"  # any registry spec, e.g. "fkl", "jsd:beta=0.5", "lk"
    mix_dataset: float = 0.0  # prefix-source weights (GKD lambda, generalised): the dataset's answers
    mix_target: float = 0.0  # weight of contexts sampled by the target
    target_cache: str = ""  # JSONL file of target responses to reuse across runs ("" keeps them in memory)
    response_tokens: int = 48  # length of each response context
    rollout_temperature: float = 1.0  # sampling temperature of drafter/target responses
    loss_temperature: float = 1.0  # temperature of both distributions inside the divergence
    # --- held-out evaluation on the lossless decoder ------------------------------------------------
    gamma: int = 4  # draft tokens per target call, in training-time acceptance and in the held-out eval
    eval_every: int = 20  # steps between held-out decoder evaluations (the best one is kept)
    eval_num_prompts: int = 8  # held-out prompts per evaluation
    eval_max_new_tokens: int = 48  # new tokens per held-out prompt
    eval_temperature: float = 0.0  # sampling temperature of the held-out evaluation (0: greedy)

    def validate(self) -> None:
        super().validate()
        at_least(self, 0, "prompt_limit", "mix_dataset", "mix_target", "rollout_temperature", "eval_temperature")
        at_least(self, 1, "response_tokens", "gamma", "eval_every", "eval_num_prompts", "eval_max_new_tokens")
        require(self.loss_temperature > 0 and math.isfinite(self.loss_temperature),
                f"loss_temperature must be > 0, got {self.loss_temperature!r}")
        parse_divergence(self.divergence)  # an unknown divergence or parameter fails here, before any model

    def mix(self) -> dict[str, float]:
        return {"dataset": self.mix_dataset, "target": self.mix_target, "drafter": getattr(self, "mix_drafter", 0.0)}


def encode_prompts(cfg: DraftConfig, tokenizer, target, prompts, eval_prompts, device) -> tuple[list, list]:
    """Training and held-out prompts as ids with the target's chat template, each checked against the
    target's context with the tokens generated after it (before any compute)."""
    prompt_ids = [encode_prompt(tokenizer, p).to(device) for p in prompts]
    eval_ids = [encode_prompt(tokenizer, p).to(device) for p in eval_prompts]
    check_fits_context(prompt_ids, cfg.response_tokens, target, cfg.prompts, "response_tokens")
    check_fits_context(eval_ids, cfg.eval_max_new_tokens, target, cfg.eval_prompts, "eval_max_new_tokens")
    return prompt_ids, eval_ids


def micro_batch_rows(step: int, micro: int, cfg: DraftConfig, order: torch.Tensor, rollouts: RolloutSource,
                     shard_target: bool) -> tuple[list[int], list[list[int]], list[torch.Generator]]:
    """This rank's rows of one micro-batch: prompt indices, response contexts, and each row's random
    stream (already drawn from for the source and the response; the trainer draws on from it)."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = batch_positions(step, micro, cfg, rank, world)
    # A sharded target needs every rank in each forward: then every rank draws the sources of the
    # whole global micro-batch and samples its target rows, in the same order.
    drawn = [p for r in range(world) for p in batch_positions(step, micro, cfg, r, world)] if shard_target else mine
    rows = {p: row_generator(cfg.seed, p) for p in drawn}
    mix = cfg.mix()
    sources = {p: pick_source(mix, rows[p]) for p in drawn}
    if shard_target:
        for p in drawn:
            if sources[p] == "target":
                rollouts.target_response(int(order[p % len(order)]))
    indices = [int(order[p % len(order)]) for p in mine]
    responses = [rollouts.response(i, sources[p], rows[p]) for i, p in zip(indices, mine)]
    return indices, responses, [rows[p] for p in mine]


def decoder_report(target, drafter, eval_ids, eos, cfg: DraftConfig) -> dict:
    """The drafter on the held-out prompts with the lossless decoder. Under torchrun every rank
    decodes the same prompts the same way (a sharded target needs every rank in each forward), and
    rank 0's report is everyone's, so all ranks agree on keeping the best."""
    drafter.eval()
    with distributed.gathered(drafter):
        report = evaluate_drafter(target, drafter, eval_ids, gamma=cfg.gamma,
                                  sampling=SamplingConfig(temperature=cfg.eval_temperature),
                                  max_new_tokens=cfg.eval_max_new_tokens, eos_token_id=eos,
                                  seed=cfg.seed, baseline=False, progress=False)["speculative"]
    drafter.train()
    return distributed.broadcast(report)
