"""SGLang plugin: per-step draft proposals and accept/reject events, streamed to the distiller.

No fork of SGLang: SGLang 0.5.23 loads general plugins from the entry point group
`sglang.srt.plugins` (python/sglang/srt/plugins/__init__.py, load_plugins(), called early in the
HTTP, scheduler and detokenizer processes) and lets them wrap functions through
sglang.srt.plugins.hook_registry.HookRegistry. draftdistill registers
`draftdistill = "draftdistill.serving.plugin:register"` (pyproject.toml).

Enable it by installing draftdistill into the server's environment and setting
    DRAFTDISTILL_SPEC_EVENTS=/path/events.jsonl   (JSON lines, appended; "{pid}" is expanded)
                           or udp://127.0.0.1:PORT  (one JSON datagram per event, loopback)
Without that variable register() does nothing, so an installed draftdistill never changes a server.

Hook point: an AROUND hook on sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.verify(self,
batch, ...), which EAGLE, EAGLE3 and STANDALONE (StandaloneWorkerV2 inherits it) run once per
decode step. Shapes, from speculative/eagle_worker_common.py (run_eagle_verify) and
eagle_info.py (EagleVerifyInput):
- before the call, batch.spec_info is the EagleVerifyInput: draft_token [bs * draft_token_num],
  per request a row whose entry 0 is the last verified token (the root) and entries 1.. the
  draft's proposals (a chain for topk == 1, a tree in tree order for topk > 1);
- the result is a GenerationBatchResult: next_token_ids [bs * draft_token_num] with the accepted
  path moved to the front of each row (for topk > 1 by _finalize_accept_tree_path; a chain is
  already there) and accept_lens [bs], the tokens emitted this step (accepted drafts + the bonus).
These exist only on the GPU/AMX code paths (speculative decoding cannot run on this project's CPU
test server); the tests drive the real hook chain with CPU tensors of these shapes.

Never blocking the worker: the hook only starts asynchronous device-to-host copies (pinned
memory, non_blocking) and records a CUDA event on the worker's stream, then put_nowait()s the
pending item on a bounded queue, dropping it (counted) when the queue is full. A background thread
waits for the event, turns the item into events and writes them. Any exception inside the hook is
swallowed (counted, logged once): the original verify result is always returned unchanged.

One event per request per verify step:
    {"type": "verify", "time": 1.7e9, "pid": 123, "rid": "...", "seq_len": 57,
     "topk": 1, "draft_tokens": [d1, ..., dk], "accepted_tokens": [t1, ..., tn],
     "accept_length": n, "num_accepted_drafts": n - 1, "rejected_draft": d_n or null}
accepted_tokens are the tokens the target emitted (the accepted drafts, then its own bonus
token); rejected_draft is the first draft token it refused (null when all were accepted; for a
tree, the chain notion does not apply and it is null). seq_len is the sequence length before
the step (prompt + tokens so far), so position seq_len holds accepted_tokens[0].
register() also writes one {"type": "plugin_loaded", "time", "pid", "hook"} event per SGLang
process that loaded it, so a consumer can tell a live plugin from a missing one.
This module uses only the standard library and torch, so it can be loaded by file path too.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

ENV_SINK = "DRAFTDISTILL_SPEC_EVENTS"
ENV_QUEUE = "DRAFTDISTILL_SPEC_EVENTS_QUEUE"  # queue capacity in verify steps (default 1024)
HOOK_TARGET = "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.verify"


class EventEmitter:
    """A bounded queue and a daemon thread that writes events to a JSON-lines file or UDP.

    emit() never blocks: it returns False (and counts a drop) when the queue is full. An item is
    either a dict (one event) or an object with .events() -> list of dicts (materialised on the
    writer thread, e.g. PendingVerify).
    """

    def __init__(self, sink: str, maxsize: int = 1024, flush_every: float = 0.2):
        self.sink = sink.replace("{pid}", str(os.getpid()))
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.flush_every = flush_every
        self.counters = {"emitted": 0, "dropped": 0, "written": 0, "errors": 0}
        self._closed = threading.Event()
        self._udp = None
        self._file = None
        if self.sink.startswith("udp://"):
            host, _, port = self.sink[len("udp://"):].rpartition(":")
            self._addr = (host or "127.0.0.1", int(port))
            self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._udp.setblocking(False)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.sink)), exist_ok=True)
            self._file = open(self.sink, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="draftdistill-spec-events", daemon=True)
        self._thread.start()

    def emit(self, item: Any) -> bool:
        if self._closed.is_set():
            return False
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.counters["dropped"] += 1
            return False
        self.counters["emitted"] += 1
        return True

    def _write(self, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":"))
        if self._udp is not None:
            try:
                self._udp.sendto(line.encode(), self._addr)
            except OSError:  # nobody listening, buffer full, datagram too big: drop it
                self.counters["dropped"] += 1
                return
        else:
            self._file.write(line + "\n")
        self.counters["written"] += 1

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                item = self.queue.get(timeout=self.flush_every)
            except queue.Empty:
                item = None
            if item is not None:
                try:
                    for event in (item.events() if hasattr(item, "events") else [item]):
                        self._write(event)
                except Exception:  # noqa: BLE001 - a bad item must not stop the writer
                    self.counters["errors"] += 1
                    log.debug("draftdistill spec events: dropped a bad item", exc_info=True)
            if self._file is not None and (item is None or time.monotonic() - last_flush > self.flush_every):
                self._file.flush()
                last_flush = time.monotonic()
            if item is None and self._closed.is_set():
                break

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout`), then stop."""
        self._closed.set()
        self._thread.join(timeout)
        if self._file is not None:
            self._file.flush()
            self._file.close()
        if self._udp is not None:
            self._udp.close()


def _to_host_async(t):
    """A host copy that does not block: pinned + non_blocking for CUDA tensors, a clone otherwise."""
    import torch

    if t.is_cuda:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out
    return t.detach().clone()


class PendingVerify:
    """One verify step's tensors on their way to the host; .events() runs on the writer thread."""

    def __init__(self, rids, seq_lens, draft_token, next_token_ids, accept_lens, draft_token_num: int,
                 topk: int, when: float):
        import torch

        self.rids, self.draft_token_num, self.topk, self.when = list(rids), draft_token_num, topk, when
        self.seq_lens = _to_host_async(seq_lens) if seq_lens is not None else None
        self.draft = _to_host_async(draft_token)
        self.predict = _to_host_async(next_token_ids)
        self.accept_lens = _to_host_async(accept_lens)
        self.ready = None
        if any(getattr(t, "is_cuda", False) for t in (draft_token, next_token_ids, accept_lens)):
            self.ready = torch.cuda.Event()
            self.ready.record()  # on the worker's current stream, after the copies were queued

    def events(self) -> list[dict]:
        if self.ready is not None:
            self.ready.synchronize()  # the writer thread waits, never the worker
        bs, n = len(self.rids), self.draft_token_num
        draft = self.draft.reshape(bs, n).tolist()
        predict = self.predict.reshape(bs, -1).tolist()
        accept = self.accept_lens.reshape(bs).tolist()
        seq = self.seq_lens.reshape(bs).tolist() if self.seq_lens is not None else [None] * bs
        pid, out = os.getpid(), []
        for i, rid in enumerate(self.rids):
            a = int(accept[i])
            proposals = [int(t) for t in draft[i][1:]]
            rejected = proposals[a - 1] if self.topk == 1 and 0 < a <= len(proposals) else None
            out.append({"type": "verify", "time": self.when, "pid": pid, "rid": rid,
                        "seq_len": None if seq[i] is None else int(seq[i]), "topk": self.topk,
                        "draft_tokens": proposals, "accepted_tokens": [int(t) for t in predict[i][:a]],
                        "accept_length": a, "num_accepted_drafts": max(0, a - 1), "rejected_draft": rejected})
        return out


_emitter: EventEmitter | None = None
_emitter_lock = threading.Lock()
_hook_errors = 0


def get_emitter() -> EventEmitter | None:
    """The process's emitter, created on first use from DRAFTDISTILL_SPEC_EVENTS (None if unset)."""
    global _emitter
    if _emitter is None:
        sink = os.environ.get(ENV_SINK)
        if not sink:
            return None
        with _emitter_lock:
            if _emitter is None:
                _emitter = EventEmitter(sink, maxsize=int(os.environ.get(ENV_QUEUE, "1024")))
    return _emitter


def capture_verify(worker, batch, result, emitter: EventEmitter, spec_info=None) -> bool:
    """Queue one verify step (see the module docstring for the shapes). Returns whether queued."""
    spec_info = spec_info if spec_info is not None else batch.spec_info
    mode = getattr(batch, "forward_mode", None)
    if mode is not None and mode.is_idle():
        return False
    reqs = getattr(batch, "reqs", None) or []
    if not reqs or result is None or getattr(result, "accept_lens", None) is None:
        return False
    target = getattr(worker, "_target_worker", None)
    if getattr(target, "tp_rank", 0) != 0:  # every TP rank verifies the same tokens: emit once
        return False
    n = int(getattr(spec_info, "draft_token_num", 0) or getattr(worker, "speculative_num_draft_tokens"))
    topk = int(getattr(spec_info, "topk", getattr(worker, "topk", 1)))
    seq_lens = getattr(spec_info, "seq_lens_cpu", None)
    if seq_lens is None:
        seq_lens = getattr(batch, "seq_lens_cpu", None)
    pending = PendingVerify([r.rid for r in reqs], seq_lens, spec_info.draft_token, result.next_token_ids,
                            result.accept_lens, n, topk, time.time())
    return emitter.emit(pending)


def verify_hook(original, self, batch, *args, **kwargs):
    """AROUND hook for EAGLEWorkerV2.verify: run it, then queue the step; never raises its own errors."""
    spec_info = getattr(batch, "spec_info", None)  # verify may rebind batch.spec_info
    result = original(self, batch, *args, **kwargs)
    global _hook_errors
    try:
        emitter = get_emitter()
        if emitter is not None:
            capture_verify(self, batch, result, emitter, spec_info)
    except Exception:  # noqa: BLE001 - the served result matters more than the event
        _hook_errors += 1
        if _hook_errors == 1:
            log.exception("draftdistill spec-event hook failed (further failures are only counted)")
    return result


def _announce(sink: str) -> None:
    """Write one {"type": "plugin_loaded"} event synchronously (no thread; register() runs in every
    SGLang process, and SGLang's loggers are not configured yet at that point)."""
    event = {"type": "plugin_loaded", "time": time.time(), "pid": os.getpid(), "hook": HOOK_TARGET}
    line = json.dumps(event, separators=(",", ":"))
    sink = sink.replace("{pid}", str(os.getpid()))
    try:
        if sink.startswith("udp://"):
            host, _, port = sink[len("udp://"):].rpartition(":")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(line.encode(), (host or "127.0.0.1", int(port)))
        else:
            os.makedirs(os.path.dirname(os.path.abspath(sink)), exist_ok=True)
            with open(sink, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    except OSError:
        pass


def register() -> None:
    """Entry point for `sglang.srt.plugins`: hook the verify step when DRAFTDISTILL_SPEC_EVENTS is set."""
    sink = os.environ.get(ENV_SINK)
    if not sink:
        log.info("draftdistill plugin: %s is not set, no hooks registered", ENV_SINK)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGET, verify_hook, HookType.AROUND)
    _announce(sink)
    log.info("draftdistill plugin: spec events from %s -> %s", HOOK_TARGET, sink)
