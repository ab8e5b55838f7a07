"""The one training loop. Every trainer (drafter.py, eagle3.py, opd/trainer.py) is a config plus a
`build` that loads its models and data and returns a `Trainer`: the model, its optimizer and
schedule, and a step function that does one optimizer step from data to update. This loop does
the rest, the same way for all of them:

    run directory (locked) -> resume -> [held-out evaluation] -> for each step:
        step() -> metrics (JSONL, TensorBoard, progress bar)
        every eval_every: held-out evaluation, the best model exported to OUT_DIR/best
        every save_every: checkpoint (atomic; a killed run resumes bit-exactly)
    -> export (OUT_DIR/final when nothing is evaluated), plot, summary.json

The per-row random streams live here too: every random draw of a training row derives from
(seed, the row's position in the prompt stream), so a resumed run repeats the next step exactly,
and N torchrun ranks with batch_size B draw what one process draws with batch_size N * B.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from draftdistill.eval import plot_alpha_per_position
from draftdistill.models import default_device

from . import distributed
from .checkpoint import has_checkpoint, load_checkpoint, recover_checkpoint_dir, save_checkpoint
from .metrics import MetricsLog
from .run_lock import run_lock


# --- the schedule and the row streams, shared by every trainer ------------------------------------


def lr_lambda(cfg):
    def scale(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return scale


def make_optimizer(cfg, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params` with the shared schedule (linear warmup, cosine decay to 10%)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def apply_update(optimizer, scheduler, params, max_grad_norm: float) -> float:
    """Clip the gradients, take the optimizer (and schedule, when there is one) step; returns the
    gradient norm before clipping (over every rank's shard of a sharded model)."""
    grad_norm = distributed.scalar(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return grad_norm


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


# --- what a trainer hands the loop -----------------------------------------------------------------


@dataclass
class Trainer:
    name: str  # the progress bar's label
    model: torch.nn.Module  # checkpointed and resumed with the optimizer and scheduler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: Callable[[int], dict]  # one optimizer step, data to update; returns the step's metrics
    export: Callable[[Path], None]  # the model as a server loads it (called on every rank)
    evaluate: Callable[[], dict] | None = None  # held-out report with tau and alpha_per_position; the best
    # by tau is exported to OUT_DIR/best. None: no evaluation, the model is exported to OUT_DIR/final at the end
    shown: dict[str, str] = field(default_factory=lambda: {"loss": "loss"})  # progress bar label -> metric
    state: dict = field(default_factory=dict)  # the trainer's own resumable state (JSON), checkpointed
    on_start: Callable[[int], None] | None = None  # after resume, before the first step (given the step)
    before_save: Callable[[int], None] | None = None  # extra files a checkpoint needs, written before it
    after_save: Callable[[int], None] | None = None
    eval_note: Callable[[dict], str] | None = None  # held-out line's addendum, given the last step's metrics
    plot_series: Callable[[], dict] | None = None  # extra alpha-per-position series for the final plot
    plot_title: str = ""
    summary: Callable[[dict], dict] | None = None  # the trainer's own summary entries, given the loop's


def run(cfg, build: Callable[[object, str], Trainer], progress: bool = True) -> dict:
    """Train `build(cfg, device)`'s trainer for cfg.steps. Under torchrun every rank runs this; rank
    0 alone logs and writes files."""
    cfg.validate()  # configs built in code are checked like loaded ones, before anything is read
    device = distributed.setup(cfg.device) or default_device()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One run per OUT_DIR: a second one would interleave metrics and overwrite checkpoints.
    with run_lock(out) if distributed.is_main() else contextlib.nullcontext():
        return _run(cfg, build, out, device, progress)


def _run(cfg, build, out: Path, device: str, progress: bool) -> dict:
    main = distributed.is_main()
    if main:  # a run killed mid-save leaves its checkpoint (or best export) in one piece
        for directory in (out / "checkpoint", out / "best"):
            note = recover_checkpoint_dir(directory)
            if note:
                tqdm.write(f"{directory}: {note}")
    distributed.barrier()
    torch.manual_seed(cfg.seed)
    trainer = build(cfg, device)

    state = {"step": 0, "best_tau": None, "tau_before": None, "alpha_before": None}
    resumed = False
    if has_checkpoint(out / "checkpoint"):
        if cfg.resume:  # an unreadable checkpoint raises: never silently start over it
            saved = load_checkpoint(out / "checkpoint", trainer.model, trainer.optimizer, trainer.scheduler)
            trainer.state.update(saved.pop("trainer", {}))
            state.update(saved)
            resumed = True
        elif main:
            tqdm.write(f"resume=false: starting from step 0; {out / 'checkpoint'} will be overwritten")
    if trainer.on_start is not None:
        trainer.on_start(state["step"])
    log = MetricsLog(out, enabled=main, resume_step=state["step"] if resumed else None)
    if main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    def evaluate(step: int) -> dict:
        report = trainer.evaluate()
        log.write(step, eval_tau=report["tau"], eval_alpha=report["alpha"],
                  eval_alpha_per_position=report["alpha_per_position"],
                  **({"eval_accept_length": report["accept_length"]} if "accept_length" in report else {}))
        if state["best_tau"] is None or report["tau"] > state["best_tau"]:
            state["best_tau"] = report["tau"]
            trainer.export(out / "best")
        return report

    if trainer.evaluate is not None and state["step"] == 0:
        before = evaluate(0)
        state["tau_before"], state["alpha_before"] = before["tau"], before["alpha_per_position"]

    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, desc=trainer.name,
               disable=not (progress and main))
    for step in bar:
        metrics = trainer.step(step)
        log.write(step + 1, **metrics)
        bar.set_postfix({label: _short(metrics.get(key)) for label, key in trainer.shown.items()})
        state["step"] = step + 1
        if trainer.evaluate is not None and (state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps):
            report = evaluate(state["step"])
            if main:
                note = trainer.eval_note(metrics) if trainer.eval_note else ""
                accept = report.get("accept_length")
                bar.write(f"step {state['step']}: held-out tau {report['tau']:.3f}"
                          + (f", accept length {accept:.3f}" if accept is not None else "")
                          + f", decoder alpha per position {rates(report['alpha_per_position'])}{note}")
            state["last_eval"] = report
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            if trainer.before_save is not None:
                trainer.before_save(state["step"])
            save_checkpoint(out / "checkpoint", trainer.model, trainer.optimizer, trainer.scheduler,
                            {**state, "trainer": trainer.state})
            if trainer.after_save is not None:
                trainer.after_save(state["step"])

    summary = {"steps": state["step"], "out_dir": str(out)}
    if trainer.evaluate is None:
        trainer.export(out / "final")
        summary["final"] = str(out / "final")
    else:
        after = state.get("last_eval")
        summary.update(tau_before=state["tau_before"], tau_after=after["tau"] if after else None,
                       best_tau=state["best_tau"])
        if main and after is not None and state["alpha_before"] is not None:
            series = {"before": state["alpha_before"], "after": after["alpha_per_position"]}
            series.update(trainer.plot_series() if trainer.plot_series else {})
            plot_alpha_per_position(series, out / "alpha_per_position.png", title=trainer.plot_title)
            summary["plot"] = str(out / "alpha_per_position.png")
    if trainer.summary is not None:
        summary.update(trainer.summary(state))
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def rates(values: list) -> str:
    return " ".join("n/a" if v is None else f"{v:.3f}" for v in values)  # None: a position never reached


def _short(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
