"""Training an EAGLE-3 head with the target in the loop, as one plain loop (the TTT math: ttt.py).

    prompts -> contexts (dataset answers / target responses, mixed by weight)
            -> target forward (aux hidden states, logits) -> the head's TTT unroll of ttt_steps
            -> [ttt_chain=sampled/mixed: the target scores the head's own drafted chains]
            -> divergence over the draft vocabulary at every step, weighted ttt_decay**j -> optimizer step

Data stream, per-row random streams, schedule, checkpoints and the held-out evaluation on the real
lossless decoder are the standalone drafter trainer's (drafter_opd.py). The best head by held-out
tau is exported in SGLang's EAGLE3 format (OUT_DIR/best), which `draftdistill eval --drafter` and
`serving/export_eagle3.py` read. Every step also logs the acceptance the training chains imply
(simulated alpha per TTT step), to set beside the decoder's measured alpha per position.

Under torchrun every rank takes its slice of each global micro-batch (as the drafter trainer does)
and keeps the head whole: it is one decoder layer, so its gradients are summed over ranks with one
all-reduce rather than sharded, and rank 0 writes its one-process checkpoint. The target is
replicated or sharded by FSDP2 (`teacher_parallel`); every rank runs the same number of target
forwards per step (one, plus one for sampled chains), as a sharded target needs.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.eval import plot_alpha_per_position
from draftdistill.losses import get_divergence, parse_divergence
from draftdistill.models import default_device, load_drafter, load_target
from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import build_eagle3_head
from draftdistill.serving.export_eagle3 import export_sglang_eagle3

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .drafter_opd import DrafterOPDConfig, evaluate_and_keep_best, lr_lambda, micro_batch_rows
from .feature_cache import FeatureCache, cache_identity
from .metrics import MetricsLog
from .rollouts import RolloutSource
from .ttt import pack_right, plan_ttt, simulated_tau, step_acceptance, step_loss, ttt_forward


def check_eagle3_config(cfg: DrafterOPDConfig) -> None:
    if cfg.teacher_parallel not in distributed.TEACHER_PARALLEL:
        raise ValueError(f"teacher_parallel must be one of {distributed.TEACHER_PARALLEL}, "
                         f"got {cfg.teacher_parallel!r}")
    if cfg.mix_drafter > 0:
        raise ValueError("an EAGLE-3 head cannot write a response without the target: set mix_drafter=0 and "
                         "mix_dataset and/or mix_target > 0 (its on-policy variant is ttt_chain=sampled)")
    if cfg.rejected_only:
        raise ValueError("rejected_only applies to standalone drafters; not to EAGLE-3 heads")
    if cfg.feature_cache and cfg.ttt_chain != "data":
        raise ValueError("feature_cache serves data chains only (the target scores sampled chains on each "
                         "context's KV cache): set ttt_chain=data or feature_cache=''")
    if cfg.feature_cache and distributed.launched() and cfg.teacher_parallel == "shard":
        raise ValueError("feature_cache needs teacher_parallel=replicate: a sharded target's forward is a "
                         "collective, which ranks reading their rows from the cache would skip")
    if cfg.ttt_reach_weights and cfg.ttt_chain == "data":
        raise ValueError("ttt_reach_weights weights sampled chains by their drafts' acceptance: set "
                         "ttt_chain=sampled or mixed")
    if not 0 <= cfg.ttt_chain_tokens <= cfg.ttt_steps - 1:
        raise ValueError(f"ttt_chain_tokens must be in 0..ttt_steps - 1 = {cfg.ttt_steps - 1} (0: all), "
                         f"got {cfg.ttt_chain_tokens}")
    if cfg.ttt_steps < 1 or not 0 < cfg.ttt_decay <= 1:
        raise ValueError(f"need ttt_steps >= 1 and 0 < ttt_decay <= 1, got {cfg.ttt_steps}, {cfg.ttt_decay}")


def training_vocab(cfg, target, tokenizer, prompts, prompt_ids, eos: list[int]) -> DraftVocab:
    """The `draft_vocab_size` most frequent tokens of the training text: every prompt and its
    reference answer (SpecForge counts its training data), the stop tokens always in."""
    size = min(cfg.draft_vocab_size, target.config.vocab_size)
    texts = [ids[0].tolist() for ids in prompt_ids]
    texts += [tokenizer(p.reference, add_special_tokens=False)["input_ids"] for p in prompts if p.reference]
    return DraftVocab.from_token_ids(texts, size, target.config.vocab_size, always_include=eos)


def build_head(cfg, target, tokenizer, prompts, prompt_ids, eos):
    """A fresh head (cfg.drafter == "eagle3") or an EAGLE-3 directory to fine-tune."""
    if cfg.drafter != "eagle3":
        return load_drafter(cfg.drafter, target, tokenizer)
    vocab = training_vocab(cfg, target, tokenizer, prompts, prompt_ids, eos)
    aux = [int(i) for i in cfg.aux_layers.split(",")] if cfg.aux_layers.strip() else None
    return build_eagle3_head(target, vocab, aux_layer_ids=aux, seed=cfg.seed)


def train_eagle3(cfg: DrafterOPDConfig, progress: bool = True) -> dict:
    check_eagle3_config(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = distributed.setup(cfg.device) or default_device()
    main = distributed.is_main()
    shard_target = distributed.active() and cfg.teacher_parallel == "shard"
    torch.manual_seed(cfg.seed)

    # Prompts first, so a malformed file fails before any model is loaded.
    prompts = load_prompts(cfg.prompts, limit=cfg.prompt_limit or None)
    eval_prompts = load_prompts(cfg.eval_prompts, limit=cfg.eval_num_prompts)
    # A target to be sharded is read into CPU memory first (FSDP keeps each rank's shard).
    target, tokenizer = load_target(cfg.target, device="cpu" if shard_target else device)
    eos = stop_token_ids(tokenizer, target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    prompt_ids = [encode_prompt(tokenizer, p).to(device) for p in prompts]
    eval_ids = [encode_prompt(tokenizer, p).to(device) for p in eval_prompts]

    # The head trains in float32 (its optimizer state too); the embedding stays the target's, frozen
    # (shared with a replicated target on the same device, a copy when the target is sharded).
    head = build_head(cfg, target, tokenizer, prompts, prompt_ids, eos).float().to(device).train()
    # Every rank starts from rank 0's head and vocabulary (the embedding is the target's on every rank).
    distributed.broadcast_module(head, skip=head.weights_from_target)
    target = distributed.place_frozen(target, cfg.teacher_parallel, device)
    trainable = [p for name, p in head.named_parameters() if name not in head.weights_from_target]
    for p in trainable:
        p.requires_grad_(True)
    vocab = head.vocab

    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed))
    rollouts = RolloutSource(target, None, tokenizer, prompts, prompt_ids, response_tokens=cfg.response_tokens,
                             temperature=cfg.rollout_temperature, eos_token_id=eos, seed=cfg.seed,
                             cache_path=cfg.target_cache or None, cache_tag=cfg.target,
                             write_cache=main or not shard_target)
    mix = {"dataset": cfg.mix_dataset, "target": cfg.mix_target, "drafter": 0.0}
    features = FeatureCache(cfg.feature_cache, cache_identity(cfg.target, target, head.aux_layer_ids)) \
        if cfg.feature_cache else None
    name, params = parse_divergence(cfg.divergence)
    loss_fn = get_divergence(name, **params)

    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state = {"step": 0, "best_tau": None, "tau_before": None, "alpha_before": None, "target_tokens": 0}
    if cfg.resume and (out / "checkpoint" / "trainer_state.json").is_file():
        state = load_checkpoint(out / "checkpoint", head, optimizer, scheduler)
        vocab = head.vocab  # the checkpoint's d2t/t2d
    log = MetricsLog(out, enabled=main)
    if main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    dtype = next(target.parameters()).dtype  # the exported head's, as a server would load it
    recent: list[dict] = []  # the last steps' simulated acceptance, to compare with the next evaluation

    def export_best() -> None:
        if main:
            export_sglang_eagle3(out / "best", head, tokenizer, dtype=dtype)
        distributed.barrier()

    def evaluate(step: int) -> dict:
        return evaluate_and_keep_best(step, target, head, eval_ids, eos, cfg, state, log, export=export_best)

    if state["step"] == 0:
        before = evaluate(0)
        state["tau_before"], state["alpha_before"] = before["tau"], before["alpha_per_position"]

    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, desc="eagle3 ttt",
               disable=not (progress and main))
    for step in bar:
        started = time.perf_counter()
        # 1. Contexts and plans of every micro-batch first: each TTT step's loss is divided by its
        #    token count over the whole optimizer step (every micro-batch, every rank).
        micro_batches = []
        for micro in range(cfg.grad_accum):
            indices, responses, rows = micro_batch_rows(step, micro, cfg, order, rollouts, mix, shard_target)
            batch = pack_right([prompt_ids[i][0].tolist() for i in indices], responses, pad_id).to(device)
            plan = plan_ttt(batch, cfg.ttt_steps, cfg.ttt_chain, cfg.ttt_anchors, rows, cfg.ttt_chain_tokens)
            micro_batches.append((batch, plan, rows))
        counts = [sum(per_step) for per_step in zip(*(plan.counts() for _, plan, _ in micro_batches))]
        counts = [int(n) for n in distributed.all_sum(counts)]

        # 2. Target forward(s), the head's unroll, weighted step losses, backward per micro-batch.
        optimizer.zero_grad(set_to_none=True)
        loss_sums = [0.0] * cfg.ttt_steps
        accept_sums = [0.0] * cfg.ttt_steps
        agree_sums = [0.0] * cfg.ttt_steps
        step_target_tokens = 0
        chain_tokens = sum(plan.chain_target_tokens() for _, plan, _ in micro_batches)
        for batch, plan, rows in micro_batches:
            scored, target_tokens = ttt_forward(head, target, batch, plan, cfg.rollout_temperature, rows, features,
                                                reach_weights=cfg.ttt_reach_weights)
            step_target_tokens += target_tokens
            loss = 0.0
            for j, step_rows in enumerate(scored):
                step_sum = step_loss(step_rows, vocab, loss_fn, cfg.loss_temperature)
                loss = loss + cfg.ttt_decay ** j * step_sum / max(1, counts[j])
                loss_sums[j] += float(step_sum.detach())
                accept, agree = step_acceptance(step_rows, vocab)
                accept_sums[j] += accept
                agree_sums[j] += agree
            loss.backward()
        distributed.sum_gradients(trainable)  # every rank's head takes the same step
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - started

        # Metrics of the global batch (sums over ranks).
        k = cfg.ttt_steps
        cached = [features.rows_read, features.rows_computed] if features else [0, 0]
        totals = distributed.all_sum([*loss_sums, *accept_sums, *agree_sums, step_target_tokens, chain_tokens,
                                      rollouts.target_forward_tokens, *cached])
        loss_sums, accept_sums, agree_sums = totals[:k], totals[k: 2 * k], totals[2 * k: 3 * k]
        step_target_tokens, chain_tokens, rollout_tokens, rows_read, rows_computed = map(int, totals[3 * k:])
        state["target_tokens"] += step_target_tokens
        # None at a step with no scored row (sampled chains scored over fewer drafts than ttt_steps - 1).
        sim_alpha = [a / n if n else None for a, n in zip(accept_sums, counts)]
        sim_agree = [a / n if n else None for a, n in zip(agree_sums, counts)]
        metrics = {"loss": sum(cfg.ttt_decay ** j * s / max(1, n) for j, (s, n) in enumerate(zip(loss_sums, counts))),
                   "loss_per_step": [s / n if n else None for s, n in zip(loss_sums, counts)],
                   "sim_alpha_per_position": sim_alpha, "sim_greedy_agreement_per_position": sim_agree,
                   "sim_tau": simulated_tau(sim_alpha, cfg.gamma),
                   "sim_tau_greedy": simulated_tau(sim_agree, cfg.gamma),
                   "scored_positions": counts[0], "target_tokens": step_target_tokens,
                   "target_chain_tokens": chain_tokens,  # of target_tokens: the sampled chains' drafts
                   "target_tokens_total": state["target_tokens"],
                   "target_rollout_tokens": rollout_tokens,
                   "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "step_seconds": seconds}
        if features:  # rows since this process started (a resumed run counts afresh)
            metrics.update(feature_rows_read=rows_read, feature_rows_computed=rows_computed)
        log.write(step + 1, **metrics)
        recent = (recent + [metrics])[-10:]
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", sim_tau=f"{metrics['sim_tau']:.2f}")
        state["step"] = step + 1
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            report = evaluate(state["step"])
            if main:
                bar.write(f"step {state['step']}: held-out tau {report['tau']:.3f}, decoder alpha per position "
                          f"{_rates(report['alpha_per_position'])}, simulated {_rates(sim_alpha[:cfg.gamma])}")
            state["last_eval"] = report
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            save_checkpoint(out / "checkpoint", head, optimizer, scheduler, state)

    after = state.get("last_eval")
    simulated = simulated_acceptance(recent, cfg)
    if main and after is not None and state["alpha_before"] is not None:
        series = {"before": state["alpha_before"], "after": after["alpha_per_position"]}
        if simulated:
            series["simulated in training (last steps)"] = simulated["alpha_per_position"]
        plot_alpha_per_position(series, out / "alpha_per_position.png",
                                title=f"EAGLE-3 head, {cfg.ttt_chain} chains, {cfg.divergence}, "
                                      f"T={cfg.eval_temperature:g}")
    summary = {"tau_before": state["tau_before"], "tau_after": after["tau"] if after else None,
               "best_tau": state["best_tau"], "steps": state["step"], "target_tokens": state["target_tokens"],
               "measured_alpha_per_position": after["alpha_per_position"] if after else None,
               "simulated": simulated, "draft_vocab_size": len(vocab), "out_dir": str(out)}
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def simulated_acceptance(recent: list[dict], cfg) -> dict | None:
    """Mean over the last logged steps of the training chains' acceptance, in the decoder's terms:
    greedy agreement for a greedy evaluation, alpha at T=1 otherwise."""
    if not recent:
        return None
    key = "sim_greedy_agreement_per_position" if cfg.eval_temperature == 0 else "sim_alpha_per_position"
    per_position = mean_per_position(recent, key, min(cfg.ttt_steps, cfg.gamma))
    return {"of": key, "steps": len(recent), "alpha_per_position": per_position,
            "tau": simulated_tau(per_position, cfg.gamma)}


def mean_per_position(rows: list[dict], key: str, positions: int) -> list[float | None]:
    """Per position, the mean of rows[*][key][j] over the rows that scored it (None: none did)."""
    means = []
    for j in range(positions):
        seen = [row[key][j] for row in rows if row[key][j] is not None]
        means.append(sum(seen) / len(seen) if seen else None)
    return means


def _rates(values: list) -> str:
    return " ".join("n/a" if v is None else f"{v:.3f}" for v in values)  # None: a position never reached
