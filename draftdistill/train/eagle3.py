"""Training an EAGLE-3 head with the target in the loop: its config and its step (TTT math: ttt.py).

    prompts -> contexts (dataset answers / target responses, mixed by weight)
            -> target forward (aux hidden states, logits) -> the head's TTT unroll of ttt_steps
            -> [ttt_chain=sampled/mixed: the target scores the head's own drafted chains]
            -> divergence over the draft vocabulary at every step, weighted ttt_decay**j -> optimizer step

The shared loop (loop.py) evaluates the head on held-out prompts with the lossless decoder and
exports the best one by held-out tau in SGLang's EAGLE3 format (OUT_DIR/best), which
`draftdistill eval --drafter` and `draftdistill export` read. Every step also logs the acceptance
the training chains imply (simulated alpha per TTT step), to set beside the decoder's measured
alpha per position.

Under torchrun every rank takes its slice of each global micro-batch and keeps the head whole: it
is one decoder layer, so its gradients are summed over ranks with one all-reduce rather than
sharded, and rank 0 writes its one-process checkpoint. The target is replicated or sharded by
FSDP2 (`teacher_parallel`); every rank runs the same number of target forwards per step (one, plus
one for sampled chains), as a sharded target needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from draftdistill.data import load_prompts, stop_token_ids
from draftdistill.export import export_sglang_eagle3
from draftdistill.losses import get_divergence, parse_divergence
from draftdistill.models import load_drafter, load_target
from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import build_eagle3_head

from . import distributed
from .config import at_least, one_of, require
from .drafting import DraftConfig, decoder_report, encode_prompts, micro_batch_rows
from .feature_cache import FeatureCache, cache_identity
from .loop import Trainer, apply_update, make_optimizer, rates, run
from .rollouts import RolloutSource
from .ttt import CHAINS, pack_right, plan_ttt, simulated_tau, step_acceptance, step_loss, ttt_forward


@dataclass
class Eagle3Config(DraftConfig):
    drafter: str = "eagle3"  # eagle3 (a fresh EAGLE-3 head) or an EAGLE-3 directory to fine-tune
    mix_target: float = 1.0  # contexts: the target's own responses (a head cannot write a response alone)
    # --- the EAGLE-3 head's training-time test (see train/ttt.py) -----------------------------------
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

    def validate(self) -> None:
        super().validate()
        require(self.mix_dataset + self.mix_target > 0,
                "an EAGLE-3 head trains on dataset answers or target responses: mix_dataset and/or mix_target > 0 "
                "(its on-policy variant is ttt_chain=sampled)")
        one_of(self, "ttt_chain", CHAINS)
        at_least(self, 1, "ttt_steps", "draft_vocab_size")
        at_least(self, 0, "ttt_anchors")
        require(0 < self.ttt_decay <= 1, f"ttt_decay must be in (0, 1], got {self.ttt_decay}")
        require(0 <= self.ttt_chain_tokens <= self.ttt_steps - 1,
                f"ttt_chain_tokens must be in 0..ttt_steps - 1 = {self.ttt_steps - 1} (0: all), "
                f"got {self.ttt_chain_tokens}")
        require(not (self.feature_cache and self.ttt_chain != "data"),
                "feature_cache serves data chains only (the target scores sampled chains on each context's KV "
                "cache): set ttt_chain=data or feature_cache=''")
        require(not (self.feature_cache and distributed.launched() and self.teacher_parallel == "shard"),
                "feature_cache needs teacher_parallel=replicate: a sharded target's forward is a collective, "
                "which ranks reading their rows from the cache would skip")
        require(not (self.ttt_reach_weights and self.ttt_chain == "data"),
                "ttt_reach_weights weights sampled chains by their drafts' acceptance: set ttt_chain=sampled or mixed")
        if self.aux_layers.strip():
            try:
                [int(i) for i in self.aux_layers.split(",")]
            except ValueError:
                raise ValueError(f"aux_layers must be comma-separated layer indices, got {self.aux_layers!r}") from None


@dataclass
class Eagle3Training:
    """Everything `step` reads, made once by `build`."""
    cfg: Eagle3Config
    target: torch.nn.Module
    head: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: object
    rollouts: RolloutSource
    features: FeatureCache | None
    prompt_ids: list[torch.Tensor]
    order: torch.Tensor
    pad_id: int
    device: str
    shard_target: bool
    state: dict  # resumable: target_tokens so far
    recent: list[dict] = field(default_factory=list)  # the last steps' metrics, for the simulated acceptance


def step(t: Eagle3Training, step: int) -> dict:
    """One optimizer step of the EAGLE-3 head, from contexts to update."""
    cfg, k, started = t.cfg, t.cfg.ttt_steps, time.perf_counter()
    vocab = t.head.vocab  # the checkpoint's d2t/t2d after a resume
    # 1. Contexts and plans of every micro-batch first: each TTT step's loss is divided by its token
    #    count over the whole optimizer step (every micro-batch, every rank).
    micro_batches = []
    for micro in range(cfg.grad_accum):
        indices, responses, rows = micro_batch_rows(step, micro, cfg, t.order, t.rollouts, t.shard_target)
        batch = pack_right([t.prompt_ids[i][0].tolist() for i in indices], responses, t.pad_id).to(t.device)
        plan = plan_ttt(batch, k, cfg.ttt_chain, cfg.ttt_anchors, rows, cfg.ttt_chain_tokens)
        micro_batches.append((batch, plan, rows))
    counts = [sum(per_step) for per_step in zip(*(plan.counts() for _, plan, _ in micro_batches))]
    counts = [int(n) for n in distributed.all_sum(counts)]

    # 2. Target forward(s), the head's unroll, weighted step losses, backward per micro-batch.
    t.optimizer.zero_grad(set_to_none=True)
    loss_sums, accept_sums, agree_sums = [0.0] * k, [0.0] * k, [0.0] * k
    step_target_tokens = 0
    chain_tokens = sum(plan.chain_target_tokens() for _, plan, _ in micro_batches)
    for batch, plan, rows in micro_batches:
        scored, target_tokens = ttt_forward(t.head, t.target, batch, plan, cfg.rollout_temperature, rows, t.features,
                                            reach_weights=cfg.ttt_reach_weights)
        step_target_tokens += target_tokens
        loss = 0.0
        for j, step_rows in enumerate(scored):
            step_sum = step_loss(step_rows, vocab, t.loss_fn, cfg.loss_temperature)
            loss = loss + cfg.ttt_decay ** j * step_sum / max(1, counts[j])
            loss_sums[j] += float(step_sum.detach())
            accept, agree = step_acceptance(step_rows, vocab)
            accept_sums[j] += accept
            agree_sums[j] += agree
        loss.backward()

    # 3. One optimizer step; every rank's head takes the same one.
    distributed.sum_gradients(t.trainable)
    grad_norm = apply_update(t.optimizer, t.scheduler, t.trainable, cfg.max_grad_norm)
    seconds = time.perf_counter() - started

    # 4. Metrics of the global batch (sums over ranks).
    cached = [t.features.rows_read, t.features.rows_computed] if t.features else [0, 0]
    totals = distributed.all_sum([*loss_sums, *accept_sums, *agree_sums, step_target_tokens, chain_tokens,
                                  t.rollouts.target_forward_tokens, *cached])
    loss_sums, accept_sums, agree_sums = totals[:k], totals[k: 2 * k], totals[2 * k: 3 * k]
    step_target_tokens, chain_tokens, rollout_tokens, rows_read, rows_computed = map(int, totals[3 * k:])
    t.state["target_tokens"] = t.state.get("target_tokens", 0) + step_target_tokens
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
               "target_tokens_total": t.state["target_tokens"],
               "target_rollout_tokens": rollout_tokens,
               "grad_norm": grad_norm, "lr": t.scheduler.get_last_lr()[0], "step_seconds": seconds}
    if t.features:  # rows since this process started (a resumed run counts afresh)
        metrics.update(feature_rows_read=rows_read, feature_rows_computed=rows_computed)
    t.recent[:] = (t.recent + [metrics])[-10:]
    return metrics


def training_vocab(cfg: Eagle3Config, target, tokenizer, prompts, prompt_ids, eos: list[int]) -> DraftVocab:
    """The `draft_vocab_size` most frequent tokens of the training text: every prompt and its
    reference answer (SpecForge counts its training data), the stop tokens always in."""
    size = min(cfg.draft_vocab_size, target.config.vocab_size)
    texts = [ids[0].tolist() for ids in prompt_ids]
    texts += [tokenizer(p.reference, add_special_tokens=False)["input_ids"] for p in prompts if p.reference]
    return DraftVocab.from_token_ids(texts, size, target.config.vocab_size, always_include=eos)


def build_head(cfg: Eagle3Config, target, tokenizer, prompts, prompt_ids, eos):
    """A fresh head (cfg.drafter == "eagle3") or an EAGLE-3 directory to fine-tune."""
    if cfg.drafter != "eagle3":
        return load_drafter(cfg.drafter, target, tokenizer)
    vocab = training_vocab(cfg, target, tokenizer, prompts, prompt_ids, eos)
    aux = [int(i) for i in cfg.aux_layers.split(",")] if cfg.aux_layers.strip() else None
    return build_eagle3_head(target, vocab, aux_layer_ids=aux, seed=cfg.seed)


def build(cfg: Eagle3Config, device: str) -> Trainer:
    main = distributed.is_main()
    shard_target = distributed.active() and cfg.teacher_parallel == "shard"
    # Prompts first, so a malformed file fails before any model is loaded.
    prompts = load_prompts(cfg.prompts, limit=cfg.prompt_limit or None)
    eval_prompts = load_prompts(cfg.eval_prompts, limit=cfg.eval_num_prompts)
    # A target to be sharded is read into CPU memory first (FSDP keeps each rank's shard).
    target, tokenizer = load_target(cfg.target, device="cpu" if shard_target else device)
    eos = stop_token_ids(tokenizer, target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    prompt_ids, eval_ids = encode_prompts(cfg, tokenizer, target, prompts, eval_prompts, device)

    # The head trains in float32 (its optimizer state too); the embedding stays the target's, frozen
    # (shared with a replicated target on the same device, a copy when the target is sharded).
    head = build_head(cfg, target, tokenizer, prompts, prompt_ids, eos).float().to(device).train()
    # Every rank starts from rank 0's head and vocabulary (the embedding is the target's on every rank).
    distributed.broadcast_module(head, skip=head.weights_from_target)
    target = distributed.place_frozen(target, cfg.teacher_parallel, device)
    trainable = [p for name, p in head.named_parameters() if name not in head.weights_from_target]
    for p in trainable:
        p.requires_grad_(True)

    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed))
    rollouts = RolloutSource(target, None, tokenizer, prompts, prompt_ids, response_tokens=cfg.response_tokens,
                             temperature=cfg.rollout_temperature, eos_token_id=eos, seed=cfg.seed,
                             cache_path=cfg.target_cache or None, cache_tag=cfg.target,
                             write_cache=main or not shard_target)
    features = FeatureCache(cfg.feature_cache, cache_identity(cfg.target, target, head.aux_layer_ids)) \
        if cfg.feature_cache else None
    name, params = parse_divergence(cfg.divergence)
    optimizer, scheduler = make_optimizer(cfg, trainable)
    dtype = next(target.parameters()).dtype  # the exported head's, as a server would load it
    training = Eagle3Training(cfg, target, head, trainable, optimizer, scheduler, get_divergence(name, **params),
                              rollouts, features, prompt_ids, order, pad_id, device, shard_target,
                              state={"target_tokens": 0})

    def export(path) -> None:
        if main:
            export_sglang_eagle3(path, head, tokenizer, dtype=dtype)
        distributed.barrier()

    def summary(loop_state: dict) -> dict:
        after = loop_state.get("last_eval")
        return {"target_tokens": training.state["target_tokens"],
                "measured_alpha_per_position": after["alpha_per_position"] if after else None,
                "simulated": simulated_acceptance(training.recent, cfg), "draft_vocab_size": len(head.vocab)}

    def plot_series() -> dict:
        simulated = simulated_acceptance(training.recent, cfg)
        return {"simulated in training (last steps)": simulated["alpha_per_position"]} if simulated else {}

    return Trainer(
        name="eagle3 ttt", model=head, optimizer=optimizer, scheduler=scheduler, step=partial(step, training),
        export=export, evaluate=lambda: decoder_report(target, head, eval_ids, eos, cfg),
        shown={"loss": "loss", "sim_tau": "sim_tau"}, state=training.state,
        eval_note=lambda m: f", simulated {rates(m['sim_alpha_per_position'][:cfg.gamma])}",
        plot_series=plot_series, summary=summary,
        plot_title=f"EAGLE-3 head, {cfg.ttt_chain} chains, {cfg.divergence}, T={cfg.eval_temperature:g}")


def train_eagle3(cfg: Eagle3Config, progress: bool = True) -> dict:
    return run(cfg, build, progress)


def simulated_acceptance(recent: list[dict], cfg: Eagle3Config) -> dict | None:
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
