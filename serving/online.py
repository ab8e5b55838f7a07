"""Online distillation: learn the drafter from live traffic, push it, keep it only if it helps.

    finished requests -> bounded buffer -> teacher scores -> a few drafter steps -> push version N
      -> measure accept length over the next `window` requests served by N
      -> keep N if it is not worse than N-1 over its window, else push N-1's weights back (rollback)

The server's outputs never depend on the drafter (its decoder is lossless), so a bad version costs
speed, never correctness. Examples older than `max_staleness` versions are dropped: their contexts
were served by a drafter that no longer exists, which matters for OSD's rejected-position loss.
"""
from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from dataclasses import dataclass

import torch

from draftdistill.losses import TeacherTopK, get_divergence, parse_divergence
from draftdistill.losses.teacher import LOG_ZERO
from draftdistill.train.batching import pack, response_logits
from draftdistill.train.loop import apply_update
from draftdistill.train.osd import rejected_mask

from .backend import FinishedRequest, TrafficBackend

log = logging.getLogger(__name__)


@dataclass
class OnlineConfig:
    divergence: str = "fkl"  # any registry spec
    rejected_only: bool = False  # OSD: loss only where the served drafter's token would be rejected
    lr: float = 3e-4
    batch_size: int = 8
    update_every: int = 16  # new examples needed before the next update
    steps_per_update: int = 4
    max_response_tokens: int = 64  # longer responses are cut (memory bound per example)
    buffer_size: int = 256  # bounded: when full, new requests are refused (counted), not queued
    max_staleness: int = 2  # drop examples served more than this many versions ago
    window: int = 16  # requests served by a new version before it is judged
    gate_margin: float = 0.0  # keep a version if its accept length >= previous - margin
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0
    temperature: float = 1.0  # OSD: the temperature the drafter serves at (0: greedy), for requests that
    # do not say their own (the embedded server's meta["temperature"], SGLang's logged sampling_params)


def served_temperature(request: FinishedRequest, default: float) -> float:
    """The temperature `request` was decoded at: the embedded server's meta["temperature"], else the
    logged SGLang sampling_params (temperature; top_k 1 is greedy), else `default`."""
    if request.meta.get("temperature") is not None:
        return float(request.meta["temperature"])
    params = request.meta.get("sampling_params") or {}
    if params.get("top_k") == 1:
        return 0.0
    return float(params["temperature"]) if params.get("temperature") is not None else default


def stack_teacher(rows: list, width: int, device):
    """Pad per-request teacher scores to [B, width, ...]: logits from an in-process target, or the
    top-k log-probs a server returns (then use a divergence that takes TeacherTopK, e.g. topk_tail)."""
    first = rows[0]
    if isinstance(first, torch.Tensor):
        out = first.new_zeros((len(rows), width, first.shape[-1]))
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out.to(device)
    if isinstance(first, TeacherTopK):
        k = first.ids.shape[-1]
        ids = torch.zeros((len(rows), width, k), dtype=torch.long)
        logprobs = torch.full((len(rows), width, k), LOG_ZERO)
        for i, row in enumerate(rows):
            ids[i, : len(row.ids)], logprobs[i, : len(row.ids)] = row.ids, row.logprobs
        return TeacherTopK(ids.to(device), logprobs.to(device))
    raise TypeError(f"online distillation needs teacher logits or TeacherTopK, got {type(first).__name__}")


def update_step(drafter, optimizer, loss_fn, examples: list[FinishedRequest], backend: TrafficBackend,
                cfg: OnlineConfig, generator: torch.Generator) -> float:
    """One update of the online distiller, from served requests to optimizer step; returns the loss."""
    device = next(drafter.parameters()).device
    # 1. A batch of served requests: the prompt and the tokens the server emitted for it.
    picks = torch.randint(len(examples), (min(cfg.batch_size, len(examples)),), generator=generator)
    chosen = [examples[int(i)] for i in picks]
    responses = [r.output_ids[: cfg.max_response_tokens] for r in chosen]
    batch = pack([r.prompt_ids for r in chosen], responses, pad_id=0).to(device)

    # 2. Teacher scores of the same tokens (in-process logits or a server's top-k) and the loss mask
    #    (OSD: where the decoder would reject the drafter, each row at the temperature it was served at).
    teacher = stack_teacher([backend.teacher_logits(r.prompt_ids, response) for r, response in zip(chosen, responses)],
                            batch.scored.shape[1], device)
    if cfg.rejected_only and not isinstance(teacher, torch.Tensor):
        raise ValueError("rejected_only needs full teacher logits (an in-process target), not top-k scores")
    student = response_logits(drafter, batch)
    mask = batch.scored
    if cfg.rejected_only:
        mask = torch.cat([rejected_mask(student[i: i + 1], teacher[i: i + 1], batch.scored[i: i + 1], generator,
                                        served_temperature(r, cfg.temperature)) for i, r in enumerate(chosen)])

    # 3. The divergence over the scored positions, one optimizer step.
    loss = loss_fn(student, teacher, mask, reduction="sum") / max(1, int(mask.sum()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    apply_update(optimizer, None, drafter.parameters(), cfg.max_grad_norm)
    return float(loss.detach())


@dataclass
class Version:
    name: str
    weights: dict[str, torch.Tensor]  # a CPU copy, to roll back to
    index: int


class OnlineDistiller:
    def __init__(self, backend: TrafficBackend, drafter: torch.nn.Module, cfg: OnlineConfig = OnlineConfig()):
        self.backend, self.cfg = backend, cfg
        self.drafter = copy.deepcopy(drafter).float().train()  # trained here, pushed by copy
        self.drafter.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.drafter.parameters(), lr=cfg.lr, weight_decay=0.0)
        name, params = parse_divergence(cfg.divergence)
        self.loss_fn = get_divergence(name, **params)
        self.buffer: collections.deque[FinishedRequest] = collections.deque()
        self.seen_since = 0.0
        self.new_examples = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        start = backend.draft_weight_version()
        self.kept = Version(start, self._snapshot(), 0)  # the last version that passed the gate
        self.indices = {start: 0}  # version name -> how many updates in it was made
        self.candidate: Version | None = None  # pushed, waiting for its window
        self.history: list[dict] = []  # one record per update / gate decision
        self.counters = {"refused_full": 0, "dropped_stale": 0, "updates": 0, "rollbacks": 0, "errors": 0}

    # ---- capture ----
    def poll(self) -> int:
        """Move newly finished requests into the buffer; returns how many were added."""
        added = 0
        for request in self.backend.finished_requests(self.seen_since):
            self.seen_since = max(self.seen_since, request.finished_at)
            if not request.output_ids:
                continue
            if len(self.buffer) >= self.cfg.buffer_size:
                self.counters["refused_full"] += 1  # backpressure: memory stays bounded
                continue
            self.buffer.append(request)
            added += 1
        self.new_examples += added
        return added

    def _fresh_examples(self) -> list[FinishedRequest]:
        newest = max(self.indices.values())
        fresh = []
        for request in self.buffer:  # a version we never pushed is the one we started from
            if newest - self.indices.get(request.weight_version, 0) > self.cfg.max_staleness:
                self.counters["dropped_stale"] += 1
            else:
                fresh.append(request)
        self.buffer = collections.deque(fresh)
        return fresh

    # ---- training ----
    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.drafter.state_dict().items()}

    def train_steps(self) -> dict:
        """`steps_per_update` update steps on the fresh examples in the buffer."""
        examples = self._fresh_examples()
        if not examples:
            return {}
        losses = [update_step(self.drafter, self.optimizer, self.loss_fn, examples, self.backend, self.cfg,
                              self.generator) for _ in range(self.cfg.steps_per_update)]
        return {"loss": sum(losses) / len(losses), "examples": len(examples)}

    # ---- push and gate ----
    def push(self) -> Version:
        index = (self.candidate or self.kept).index + 1
        name = f"v{index}"
        weights = self._snapshot()
        self.backend.push_draft_weights(weights, name)
        self.candidate = Version(name, weights, index)
        self.indices[name] = index
        return self.candidate

    def _window(self, version: str) -> list[FinishedRequest]:
        served = [r for r in self.buffer if r.weight_version == version and r.accept_length is not None]
        return served[-self.cfg.window:]

    @staticmethod
    def _accept_length(requests: list[FinishedRequest]) -> float:
        return sum(len(r.output_ids) for r in requests) / max(1, sum(r.verify_steps for r in requests))

    def judge(self, reference: list[FinishedRequest]) -> str | None:
        """Keep or roll back the candidate once it has served a full window; None while waiting."""
        if self.candidate is None:
            return None
        served = [r for r in self.backend.finished_requests(0.0) if r.weight_version == self.candidate.name
                  and r.accept_length is not None][-self.cfg.window:]
        if len(served) < self.cfg.window:
            return None
        new, old = self._accept_length(served), self._accept_length(reference) if reference else 0.0
        record = {"version": self.candidate.name, "accept_length": new, "previous": self.kept.name,
                  "previous_accept_length": old, "at": time.time()}
        if new >= old - self.cfg.gate_margin:
            record["decision"] = "keep"
            self.kept, self.candidate = self.candidate, None
        else:
            record["decision"] = "rollback"
            self.counters["rollbacks"] += 1
            restored = f"{self.kept.name}-restored-{self.candidate.index}"
            self.backend.push_draft_weights(self.kept.weights, restored)
            with torch.no_grad():  # train on from the kept weights, not the rejected ones
                for name, tensor in self.drafter.state_dict().items():
                    tensor.copy_(self.kept.weights[name])
            self.optimizer.state.clear()
            self.kept = Version(restored, self.kept.weights, self.candidate.index)
            self.indices[restored] = self.candidate.index
            self.candidate = None
        self.history.append(record)
        return record["decision"]

    def reference_window(self) -> list[FinishedRequest]:
        served = [r for r in self.backend.finished_requests(0.0) if r.weight_version == self.kept.name
                  and r.accept_length is not None]
        return served[-self.cfg.window:]

    # ---- the loop ----
    def step(self) -> dict:
        """One pass of the loop: capture, judge a pending version, maybe train and push.
        Server errors are logged and counted, never raised: serving goes on with the kept drafter."""
        try:
            self.poll()
            if self.candidate is not None:
                self.judge(self.reference_window())
                return {}
            if self.new_examples < self.cfg.update_every:
                return {}
            self.new_examples = 0
            metrics = self.train_steps()
            if metrics:
                version = self.push()
                self.counters["updates"] += 1
                metrics["pushed"] = version.name
                self.history.append({"version": version.name, "decision": "pushed", **metrics, "at": time.time()})
            return metrics
        except Exception as error:  # noqa: BLE001 - the distiller must outlive a failing server
            self.counters["errors"] += 1
            log.warning("online distiller step failed (%s); serving continues with %s", error, self.kept.name)
            return {"error": str(error)}

    def run_in_background(self, stop: threading.Event, interval: float = 0.5) -> threading.Thread:
        def loop():
            while not stop.is_set():
                self.step()
                stop.wait(interval)
        thread = threading.Thread(target=loop, name="online-distiller", daemon=True)
        thread.start()
        return thread
