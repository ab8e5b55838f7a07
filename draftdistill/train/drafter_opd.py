"""On-policy distillation of a drafter (DistillSpec-style), as one plain loop.

    prompts -> response context (dataset / cached target / drafter samples, mixed by weight)
            -> one target forward and one drafter forward over prompt + response
            -> divergence at every response position -> optimizer step

Every few steps the drafter is measured on held-out prompts with the real lossless decoder; the
best drafter by held-out tau is exported, because acceptance can fall while the loss keeps falling.
Every random draw of a row derives from (seed, the row's position in the prompt stream), so a
resumed run repeats the next step exactly, and N torchrun ranks with batch_size B draw what one
process draws with batch_size N * B (see distributed.py).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.eval import evaluate_drafter, plot_alpha_per_position
from draftdistill.losses import acceptance_rate, get_divergence, parse_divergence
from draftdistill.models import default_device, is_eagle3_drafter, load_drafter, load_target, require_lm_drafter
from draftdistill.spec import SamplingConfig

from . import distributed
from .checkpoint import export_hf, load_checkpoint, save_checkpoint
from .metrics import MetricsLog
from .batching import pack, response_logits
from .rollouts import RolloutSource, pick_source


@dataclass
class DrafterOPDConfig:
    target: str = "smollm2-135m-instruct"  # the model to speed up: path or builtin name
    drafter: str = "pruned:2"  # path / builtin name, pruned:K (first K target layers), small:..., or eagle3
    # (a fresh EAGLE-3 head, or an EAGLE-3 directory: trained with TTT on the target's hidden states)
    prompts: str = "gsm8k:train"  # training prompts: a bundled name[:split], sharegpt[:split] or a .jsonl/.json file
    prompt_limit: int = 0  # use only the first N training prompts (0: all)
    eval_prompts: str = "gsm8k:heldout"  # held-out prompts for the decoder's tau/alpha
    divergence: str = "tvd"  # any registry spec, e.g. "fkl", "jsd:beta=0.5", "lk"
    mix_dataset: float = 0.0  # prefix-source weights (GKD lambda, generalised)
    mix_target: float = 0.0  # weight of contexts sampled by the target
    mix_drafter: float = 1.0  # weight of contexts sampled by the drafter (on-policy)
    target_cache: str = ""  # JSONL file of target responses to reuse across runs ("" keeps them in memory)
    response_tokens: int = 48  # length of each response context
    rollout_temperature: float = 1.0  # sampling temperature of drafter/target responses
    loss_temperature: float = 1.0  # temperature of both distributions inside the divergence
    rejected_only: bool = False  # OSD: loss only where the target would reject the drafter's token
    steps: int = 60  # optimizer steps
    batch_size: int = 4  # prompts per micro-batch on each rank (torchrun: the global batch is N times this)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate (AdamW; linear warmup, cosine decay to 10%)
    warmup_steps: int = 5  # linear warmup steps
    max_grad_norm: float = 1.0  # gradient clipping
    gamma: int = 4  # draft tokens per target call, in training-time acceptance and in the held-out eval
    eval_every: int = 20  # steps between held-out decoder evaluations (the best one is kept)
    eval_num_prompts: int = 8  # held-out prompts per evaluation
    eval_max_new_tokens: int = 48  # new tokens per held-out prompt
    eval_temperature: float = 0.0  # sampling temperature of the held-out evaluation (0: greedy)
    save_every: int = 20  # steps between checkpoints
    out_dir: str = "runs/distill"  # checkpoints, metrics, plots and the best drafter
    resume: bool = True  # continue from out_dir/checkpoint when it exists
    seed: int = 0  # every random draw derives from it (and the step, row)
    device: str | None = None  # cpu | cuda[:N]; default: cuda when there is one
    # EAGLE-3 heads only (drafter: eagle3, or an EAGLE-3 directory to fine-tune; see train/ttt.py):
    ttt_steps: int = 7  # training-time test: steps unrolled per position (the head fed its own states)
    ttt_decay: float = 0.8  # loss weight of TTT step j is ttt_decay ** j
    ttt_chain: str = "data"  # chain tokens: data (teacher-forced, as EAGLE-3/SpecForge), sampled
    # (on-policy: the head's own drafts, scored by the target) or mixed (sampled chains at the anchors,
    # data chains at every other position, whose teachers the context forward gives for free)
    ttt_anchors: int = 16  # sampled/mixed chains: positions per row whose chain is sampled (0: all)
    ttt_chain_tokens: int = 0  # sampled/mixed chains: drafts per chain the target scores, <= ttt_steps - 1 (0: all)
    ttt_reach_weights: bool = False  # sampled/mixed chains: weight a chain's step j by the chance that a
    # decoder accepts its first j drafts (the loss then follows the states a decoder reaches)
    draft_vocab_size: int = 32000  # a fresh head's draft vocabulary: the most frequent training tokens
    # (capped at the target's vocabulary)
    aux_layers: str = ""  # a fresh head's target layers, e.g. "1,14,26" ("": SGLang's default low/mid/high)
    feature_cache: str = ""  # data chains: a directory of the contexts' target features (aux and final hidden
    # states); a context seen again skips the target's layers, for runs of several epochs ("": none)
    # torchrun only (ignored in one process):
    fsdp: bool = True  # FSDP2-shard the drafter (false: replicate it, i.e. DDP)
    teacher_parallel: str = "replicate"  # the frozen target: replicate | shard


def lr_lambda(cfg: DrafterOPDConfig):
    def scale(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return scale


def batch_positions(step: int, micro: int, cfg, rank: int = 0, world: int = 1) -> list[int]:
    """Positions in the endless prompt stream of one micro-batch on one rank: the step's global
    micro-batch is batch_size * world rows and rank r takes its r-th slice."""
    start = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
    return list(range(start, start + cfg.batch_size))


def batch_indices(step: int, micro: int, cfg, order: torch.Tensor, rank: int = 0, world: int = 1) -> list[int]:
    """Prompt indices of one micro-batch on one rank (the stream wraps around the shuffled order)."""
    return [int(order[p % len(order)]) for p in batch_positions(step, micro, cfg, rank, world)]


def row_generator(seed: int, position: int) -> torch.Generator:
    """The random stream of one row, whichever rank and micro-batch it lands on."""
    return torch.Generator().manual_seed(seed * 1_000_003 + position)


def micro_batch_rows(step: int, micro: int, cfg, order: torch.Tensor, rollouts: RolloutSource, mix: dict,
                     shard_target: bool) -> tuple[list[int], list[list[int]], list[torch.Generator]]:
    """This rank's rows of one micro-batch: prompt indices, response contexts, and each row's random
    stream (already drawn from for the source and the response; the trainer draws on from it)."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = batch_positions(step, micro, cfg, rank, world)
    # A sharded target needs every rank in each forward: then every rank draws the sources of the
    # whole global micro-batch and samples its target rows, in the same order.
    drawn = [p for r in range(world) for p in batch_positions(step, micro, cfg, r, world)] if shard_target else mine
    rows = {p: row_generator(cfg.seed, p) for p in drawn}
    sources = {p: pick_source(mix, rows[p]) for p in drawn}
    if shard_target:
        for p in drawn:
            if sources[p] == "target":
                rollouts.target_response(int(order[p % len(order)]))
    indices = [int(order[p % len(order)]) for p in mine]
    responses = [rollouts.response(i, sources[p], rows[p]) for i, p in zip(indices, mine)]
    return indices, responses, [rows[p] for p in mine]


def rejected_mask(student_logits, teacher_logits, batch, generator) -> torch.Tensor:
    """Response positions where the drafter's proposal would be rejected by speculative sampling
    (OSD): draw x ~ q at each position, reject when u * q(x) >= p(x). The proposal is drawn here
    rather than read from the context, which may be the dataset's or the target's token.
    `generator`: one stream for the whole batch (the online distiller), or a list of one per row
    (the trainer's row streams, which draw the same on any world size)."""
    q = torch.softmax(student_logits.detach().float(), -1)
    p = torch.softmax(teacher_logits.float(), -1)
    streams = [generator] if isinstance(generator, torch.Generator) else list(generator)
    chunks = q.reshape(len(streams), -1, q.shape[-1]).cpu()  # the positions each stream draws for
    proposal = torch.cat([torch.multinomial(c, 1, generator=g) for c, g in zip(chunks, streams)])
    proposal = proposal.reshape(q.shape[:-1] + (1,)).to(q.device)
    q_x, p_x = q.gather(-1, proposal).squeeze(-1), p.gather(-1, proposal).squeeze(-1)
    u = torch.cat([torch.rand(c.shape[0], generator=g) for c, g in zip(chunks, streams)])
    return batch.scored & (u.reshape(q_x.shape).to(q.device) * q_x >= p_x)


def accumulate_gradients(drafter, batches, teacher_logits, masks, loss_fn, temperature: float) -> dict:
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


def evaluate_and_keep_best(step: int, target, drafter, eval_ids, eos, cfg, state: dict, log: MetricsLog,
                           export) -> dict:
    """The drafter on the held-out prompts with the lossless decoder, logged; `export()` writes it to
    OUT_DIR/best when its tau beats state["best_tau"]. Under torchrun every rank decodes the same
    prompts the same way (a sharded target needs every rank in each forward); rank 0's report
    decides, so all ranks agree on exporting."""
    drafter.eval()
    with distributed.gathered(drafter):
        report = evaluate_drafter(target, drafter, eval_ids, gamma=cfg.gamma,
                                  sampling=SamplingConfig(temperature=cfg.eval_temperature),
                                  max_new_tokens=cfg.eval_max_new_tokens, eos_token_id=eos,
                                  seed=cfg.seed, baseline=False, progress=False)["speculative"]
    drafter.train()
    report = distributed.broadcast(report)
    log.write(step, eval_tau=report["tau"], eval_alpha=report["alpha"],
              eval_alpha_per_position=report["alpha_per_position"])
    if state["best_tau"] is None or report["tau"] > state["best_tau"]:
        state["best_tau"] = report["tau"]
        export()
    return report


def train_drafter(cfg: DrafterOPDConfig, progress: bool = True) -> dict:
    """Under torchrun every rank runs this; rank 0 alone logs and writes files."""
    if is_eagle3_drafter(cfg.drafter):
        from .eagle3_trainer import train_eagle3

        return train_eagle3(cfg, progress)
    if cfg.teacher_parallel not in distributed.TEACHER_PARALLEL:
        raise ValueError(f"teacher_parallel must be one of {distributed.TEACHER_PARALLEL}, "
                         f"got {cfg.teacher_parallel!r}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = distributed.setup(cfg.device) or default_device()
    main = distributed.is_main()
    shard_target = distributed.active() and cfg.teacher_parallel == "shard"
    torch.manual_seed(cfg.seed)

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

    prompt_ids = [encode_prompt(tokenizer, p).to(device) for p in prompts]
    eval_ids = [encode_prompt(tokenizer, p).to(device) for p in eval_prompts]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed))
    rollouts = RolloutSource(target, drafter, tokenizer, prompts, prompt_ids, response_tokens=cfg.response_tokens,
                             temperature=cfg.rollout_temperature, eos_token_id=eos, seed=cfg.seed,
                             cache_path=cfg.target_cache or None, cache_tag=cfg.target,
                             write_cache=main or not shard_target)
    mix = {"dataset": cfg.mix_dataset, "target": cfg.mix_target, "drafter": cfg.mix_drafter}
    name, params = parse_divergence(cfg.divergence)
    loss_fn = get_divergence(name, **params)

    optimizer = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state = {"step": 0, "best_tau": None, "tau_before": None, "alpha_before": None}
    if cfg.resume and (out / "checkpoint" / "trainer_state.json").is_file():
        state = load_checkpoint(out / "checkpoint", drafter, optimizer, scheduler)
    log = MetricsLog(out, enabled=main)
    if main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    def evaluate(step: int) -> dict:
        return evaluate_and_keep_best(step, target, drafter, eval_ids, eos, cfg, state, log,
                                      export=lambda: export_hf(out / "best", drafter, tokenizer))

    if state["step"] == 0:
        before = evaluate(0)
        state["tau_before"], state["alpha_before"] = before["tau"], before["alpha_per_position"]

    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, desc="distill",
               disable=not (progress and main))
    for step in bar:
        started = time.perf_counter()
        # 1. Build every micro-batch's context first, so the loss is normalised by the step's total
        #    number of scored tokens (not per micro-batch) under gradient accumulation.
        batches, generators = [], []
        for micro in range(cfg.grad_accum):
            drafter.eval()
            with distributed.gathered(drafter):
                indices, responses, rows = micro_batch_rows(step, micro, cfg, order, rollouts, mix, shard_target)
            drafter.train()
            batches.append(pack([prompt_ids[i][0].tolist() for i in indices], responses, pad_id).to(device))
            generators.append(rows)

        # 2. Teacher scores, drafter forward, divergence at every response position.
        with torch.no_grad():
            teacher = [response_logits(target, batch) for batch in batches]
            masks = [batch.scored for batch in batches]
            if cfg.rejected_only:  # needs the drafter's q before any backward, to count the scored tokens
                masks = [rejected_mask(response_logits(drafter, batch), t_logits, batch, gens)
                         for batch, t_logits, gens in zip(batches, teacher, generators)]
        optimizer.zero_grad(set_to_none=True)
        sums = accumulate_gradients(drafter, batches, teacher, masks, loss_fn, cfg.loss_temperature)
        grad_norm = distributed.scalar(torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - started

        # Metrics over the global batch (sums over ranks).
        loss_sum, accept, agree, scored, rollout_tokens = distributed.all_sum(
            [sums["loss"], sums["accept"], sums["agree"], sum(int(b.scored.sum()) for b in batches),
             rollouts.target_forward_tokens])
        scored_tokens = max(1, int(scored))
        metrics = {"loss": loss_sum / sums["loss_tokens"], "est_alpha": accept / scored_tokens,
                   "est_greedy_agreement": agree / scored_tokens, "grad_norm": grad_norm,
                   "lr": scheduler.get_last_lr()[0], "scored_tokens": scored_tokens,
                   "target_rollout_tokens": int(rollout_tokens), "step_seconds": seconds,
                   "scored_tokens_per_second": scored_tokens / seconds}
        log.write(step + 1, **metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", alpha=f"{metrics['est_alpha']:.3f}")
        state["step"] = step + 1
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            report = evaluate(state["step"])
            if main:
                bar.write(f"step {state['step']}: held-out tau {report['tau']:.3f}, "
                      f"decoder alpha {report['alpha']:.3f}, training estimate {metrics['est_alpha']:.3f} "
                      f"(greedy agreement {metrics['est_greedy_agreement']:.3f})")
            state["last_eval"] = report
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            save_checkpoint(out / "checkpoint", drafter, optimizer, scheduler, state)

    after = state.get("last_eval")
    if main and after is not None and state["alpha_before"] is not None:
        plot_alpha_per_position({"before": state["alpha_before"], "after": after["alpha_per_position"]},
                                out / "alpha_per_position.png",
                                title=f"{cfg.drafter} distilled with {cfg.divergence}, T={cfg.eval_temperature:g}")
    summary = {"tau_before": state["tau_before"], "tau_after": after["tau"] if after else None,
               "best_tau": state["best_tau"], "steps": state["step"], "out_dir": str(out)}
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
