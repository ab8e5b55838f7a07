"""On-policy distillation of a standalone drafter (DistillSpec-style): its config and its step.

    prompts -> response context (dataset / cached target / drafter samples, mixed by weight)
            -> one target forward and one drafter forward over prompt + response
            -> divergence at every response position -> optimizer step

The shared loop (loop.py) runs the steps, evaluates the drafter on held-out prompts with the real
lossless decoder every `eval_every` steps and exports the best one by held-out tau (acceptance can
fall while the loss keeps falling) as a plain HF directory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch

from draftdistill.data import load_prompts, stop_token_ids
from draftdistill.export import export_hf
from draftdistill.losses import acceptance_rate, get_divergence, parse_divergence
from draftdistill.models import load_drafter, load_target, require_lm_drafter

from . import distributed
from .batching import ResponseBatch, pack, response_logits
from .config import at_least, require
from .drafting import DraftConfig, decoder_report, encode_prompts, micro_batch_rows
from .loop import Trainer, apply_update, make_optimizer, run
from .osd import rejected_mask
from .rollouts import RolloutSource


@dataclass
class DrafterConfig(DraftConfig):
    # --- the standalone drafter trainer -------------------------------------------------------------
    mix_drafter: float = 1.0  # weight of contexts sampled by the drafter itself (on-policy)
    rejected_only: bool = False  # OSD: loss only where the decoder would reject the drafter's token, drawn
    # at eval_temperature as the decoder draws it (0: where the argmaxes differ)

    def validate(self) -> None:
        super().validate()
        at_least(self, 0, "mix_drafter")
        require(self.mix_dataset + self.mix_target + self.mix_drafter > 0,
                "mix_dataset, mix_target and mix_drafter need one positive weight")
        require(not self.drafter.startswith("eagle3"),
                "an EAGLE-3 head trains with the EAGLE-3 trainer (draftdistill train picks it for drafter=eagle3)")

    def mix(self) -> dict[str, float]:
        return {**super().mix(), "drafter": self.mix_drafter}


@dataclass
class DrafterTraining:
    """Everything `step` reads, made once by `build`."""
    cfg: DrafterConfig
    target: torch.nn.Module
    drafter: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: object
    rollouts: RolloutSource
    prompt_ids: list[torch.Tensor]
    order: torch.Tensor  # the shuffled prompt order the row stream walks
    pad_id: int
    device: str
    shard_target: bool


def step(t: DrafterTraining, step: int) -> dict:
    """One optimizer step of the standalone drafter, from contexts to update."""
    cfg, started = t.cfg, time.perf_counter()
    # 1. Every micro-batch's contexts first, so the loss is normalised by the step's total number of
    #    scored tokens (not per micro-batch) under gradient accumulation.
    batches, streams = [], []
    for micro in range(cfg.grad_accum):
        t.drafter.eval()
        with distributed.gathered(t.drafter):  # the drafter may sample contexts
            indices, responses, rows = micro_batch_rows(step, micro, cfg, t.order, t.rollouts, t.shard_target)
        t.drafter.train()
        batches.append(pack([t.prompt_ids[i][0].tolist() for i in indices], responses, t.pad_id).to(t.device))
        streams.append(rows)

    # 2. Teacher scores at every response position; the loss mask (OSD: where the decoder rejects).
    with torch.no_grad():
        teacher = [response_logits(t.target, batch) for batch in batches]
        masks = [batch.scored for batch in batches]
        if cfg.rejected_only:  # needs the drafter's q before any backward, to count the scored tokens
            masks = [rejected_mask(response_logits(t.drafter, batch), t_logits, batch.scored, rows,
                                   cfg.eval_temperature)
                     for batch, t_logits, rows in zip(batches, teacher, streams)]

    # 3. Drafter forward and backward per micro-batch, one optimizer step.
    t.optimizer.zero_grad(set_to_none=True)
    sums = accumulate_gradients(t.drafter, batches, teacher, masks, t.loss_fn, cfg.loss_temperature)
    grad_norm = apply_update(t.optimizer, t.scheduler, t.drafter.parameters(), cfg.max_grad_norm)
    seconds = time.perf_counter() - started

    # 4. Metrics over the global batch (sums over ranks).
    loss_sum, accept, agree, scored, rollout_tokens = distributed.all_sum(
        [sums["loss"], sums["accept"], sums["agree"], sum(int(b.scored.sum()) for b in batches),
         t.rollouts.target_forward_tokens])
    scored_tokens = max(1, int(scored))
    return {"loss": loss_sum / sums["loss_tokens"], "est_alpha": accept / scored_tokens,
            "est_greedy_agreement": agree / scored_tokens, "grad_norm": grad_norm,
            "lr": t.scheduler.get_last_lr()[0], "scored_tokens": scored_tokens,
            "target_rollout_tokens": int(rollout_tokens), "step_seconds": seconds,
            "scored_tokens_per_second": scored_tokens / seconds}


def accumulate_gradients(drafter, batches: list[ResponseBatch], teacher_logits, masks, loss_fn,
                         temperature: float) -> dict:
    """Backward over every micro-batch of a step. The loss is a sum over tokens divided by the
    step's total number of loss tokens (over every micro-batch and rank), so micro-batches of any
    size, on any number of ranks, give the gradient of one big batch (a per-micro-batch mean would
    overweight the short ones). Returns this rank's sums and the global token count."""
    total_tokens = max(1, int(distributed.all_sum([sum(int(m.sum()) for m in masks)])[0]))
    scale = distributed.grad_scale()  # undoes the average over ranks of the gradient reduction
    sums = {"loss": 0.0, "accept": 0.0, "agree": 0.0, "loss_tokens": total_tokens}
    for batch, t_logits, mask in zip(batches, teacher_logits, masks):
        s_logits = response_logits(drafter, batch)
        loss = loss_fn(s_logits, t_logits, mask, temperature=temperature, reduction="sum")
        (loss / total_tokens * scale).backward()
        sums["loss"] += float(loss.detach())
        with torch.no_grad():  # training-time acceptance estimates over all response positions
            sums["accept"] += float(acceptance_rate(s_logits, t_logits, batch.scored, reduction="sum"))
            sums["agree"] += float(((s_logits.argmax(-1) == t_logits.argmax(-1)) & batch.scored).sum())
    return sums


def build(cfg: DrafterConfig, device: str) -> Trainer:
    shard_target = distributed.active() and cfg.teacher_parallel == "shard"
    # Prompts first, so a malformed file fails before any model is loaded.
    prompts = load_prompts(cfg.prompts, limit=cfg.prompt_limit or None)
    eval_prompts = load_prompts(cfg.eval_prompts, limit=cfg.eval_num_prompts)
    # Models: a frozen target, a trainable drafter in float32 (its optimizer state too). A target
    # to be sharded is read into CPU memory first: FSDP moves it layer by layer, keeping its shard.
    target, tokenizer = load_target(cfg.target, device="cpu" if shard_target else device)
    drafter = load_drafter(cfg.drafter, target, tokenizer)
    require_lm_drafter(drafter, "draftdistill train")
    drafter = drafter.float().train()
    drafter.requires_grad_(True)
    drafter = distributed.shard_model(drafter.to(device), cfg.fsdp)
    target = distributed.place_frozen(target, cfg.teacher_parallel, device)
    eos = stop_token_ids(tokenizer, target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    prompt_ids, eval_ids = encode_prompts(cfg, tokenizer, target, prompts, eval_prompts, device)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed))
    rollouts = RolloutSource(target, drafter, tokenizer, prompts, prompt_ids, response_tokens=cfg.response_tokens,
                             temperature=cfg.rollout_temperature, eos_token_id=eos, seed=cfg.seed,
                             cache_path=cfg.target_cache or None, cache_tag=cfg.target,
                             write_cache=distributed.is_main() or not shard_target)
    name, params = parse_divergence(cfg.divergence)
    optimizer, scheduler = make_optimizer(cfg, drafter.parameters())
    training = DrafterTraining(cfg, target, drafter, optimizer, scheduler, get_divergence(name, **params), rollouts,
                               prompt_ids, order, pad_id, device, shard_target)
    return Trainer(
        name="distill", model=drafter, optimizer=optimizer, scheduler=scheduler, step=partial(step, training),
        export=lambda path: export_hf(path, drafter, tokenizer),
        evaluate=lambda: decoder_report(target, drafter, eval_ids, eos, cfg),
        shown={"loss": "loss", "alpha": "est_alpha"},
        eval_note=lambda m: (f"; training estimate alpha {m['est_alpha']:.3f} "
                             f"(greedy agreement {m['est_greedy_agreement']:.3f})"),
        plot_title=f"{cfg.drafter} distilled with {cfg.divergence}, T={cfg.eval_temperature:g}")


def train_drafter(cfg: DrafterConfig, progress: bool = True) -> dict:
    return run(cfg, build, progress)
