"""Read SGLang's JSON request logs as served traffic: FinishedRequest objects, incrementally.

SGLang 0.5.23 writes them with `--log-requests --log-requests-level 3 --log-requests-format json
--log-requests-target DIR` (python/sglang/srt/utils/request_logger.py, log_utils.py):

- one file per scheduler rank, DIR/<hostname>_<rank>.log, a TimedRotatingFileHandler that
  rotates hourly (the old file is renamed <name>.YYYY-MM-DD_HH and a new one started);
- one line per event, `[YYYY-MM-DD HH:MM:SS] {json}`, with json = {"timestamp" (ISO, local
  time), "event", "rid", "obj": the GenerateReqInput (text, input_ids, sampling_params, ...)};
  "request.finished" adds "out": {"text", "output_ids", "meta_info"}. Level 3 is needed: levels
  0-1 leave out input_ids/output_ids and level 2 truncates them at 2048 characters.

Fields read from out.meta_info (set in managers/tokenizer_manager.py):
- weight_version (the version at finish) and weight_versions [{"version", "start", "end"}] (the
  output-token span each version produced; several when weights changed mid-request);
- speculative decoding only (`_calculate_spec_decoding_metrics`): spec_verify_ct (target verify
  forwards), spec_accept_length (= completion_tokens / spec_verify_ct, bonus token included),
  spec_accept_rate (= spec_num_correct_drafts / spec_num_proposed_drafts), spec_num_correct_drafts,
  spec_num_proposed_drafts, spec_correct_drafts_histogram;
- request_finished_ts (epoch seconds; the event's ISO timestamp is the fallback).

Skipped: rids starting with HEALTH_CHECK (every /health sends a real 1-token request) or
draftdistill-score- (the teacher scoring requests SGLangClient.score sends), and the
startup warmup request, recognised by its text "The capital city of France is" (it has an
ordinary random rid; entrypoints/http_server.py sends it before /health turns 200). A request
sent by text only has no input_ids in the log; it is kept only when a `tokenize` function is given.

Tailing: the reader keeps a byte offset per file *inode*, so a rotated (renamed) file is finished
where it was left and nothing is read twice; it consumes only complete lines, so a line still
being written is read on a later poll; a file that shrank (truncated in place) is read from 0.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .backend import FinishedRequest
from .sglang_client import SCORING_RID_PREFIX  # SGLangClient.score's own requests: not traffic

log = logging.getLogger(__name__)

HEALTH_CHECK_RID_PREFIX = "HEALTH_CHECK"  # sglang/srt/constants.py
SKIP_RID_PREFIXES = (HEALTH_CHECK_RID_PREFIX, SCORING_RID_PREFIX)
WARMUP_TEXTS = ("The capital city of France is",)  # entrypoints/http_server.py, the warmup request
SPEC_FIELDS = ("spec_verify_ct", "spec_accept_length", "spec_accept_rate", "spec_num_correct_drafts",
               "spec_num_proposed_drafts", "spec_correct_drafts_histogram")


def parse_line(line: str) -> dict | None:
    """The JSON event of one log line (`[time] {json}`), or None when it is not one."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        event = json.loads(line[start:])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _finished_at(event: dict, meta_info: dict) -> float:
    ts = meta_info.get("request_finished_ts")
    if isinstance(ts, (int, float)):
        return float(ts)
    try:
        return datetime.fromisoformat(event["timestamp"]).timestamp()  # naive = local time, as logged
    except (KeyError, TypeError, ValueError):
        return time.time()


def served_version(meta_info: dict) -> str:
    """The weight version that produced most of the output tokens (weight_versions spans), else
    the version at finish."""
    spans = meta_info.get("weight_versions") or []
    best, most = None, -1
    for span in spans:
        if isinstance(span, dict):
            version, start, end = span.get("version"), span.get("start", 0), span.get("end", 0)
        elif isinstance(span, (list, tuple)) and len(span) == 3:  # msgspec array_like form
            version, start, end = span
        else:
            continue
        if version is not None and end - start > most:
            best, most = str(version), end - start
    if best is not None:
        return best
    return str(meta_info.get("weight_version") or "default")


def finished_request(event: dict, tokenize: Callable[[str], list[int]] | None = None,
                     skip_rid_prefixes: Iterable[str] = SKIP_RID_PREFIXES,
                     skip_texts: Iterable[str] = WARMUP_TEXTS) -> FinishedRequest | None:
    """A FinishedRequest from one "request.finished" event; None for other events and skipped ones."""
    if event.get("event") != "request.finished":
        return None
    rid = event.get("rid")
    obj, out = event.get("obj") or {}, event.get("out") or {}
    if not isinstance(rid, str) or any(rid.startswith(p) for p in skip_rid_prefixes):
        return None
    if not isinstance(obj, dict) or not isinstance(out, dict):
        return None
    text = obj.get("text")
    # the logger fills obj.text from input_ids at level >= 2, so only a request that came with
    # text has text and no input_ids; the warmup is one.
    if obj.get("input_ids") is None and isinstance(text, str) and text in set(skip_texts):
        return None
    prompt_ids = obj.get("input_ids")
    meta_info = out.get("meta_info") or {}
    from_text = False
    if prompt_ids is None and isinstance(text, str) and tokenize is not None:
        prompt_ids, from_text = list(tokenize(text)), True
    if not isinstance(prompt_ids, list) or (prompt_ids and not isinstance(prompt_ids[0], int)):
        return None  # text without a tokenizer, embeddings, or a batch entry we cannot split
    output_ids = out.get("output_ids")
    if not isinstance(output_ids, list):
        return None
    verify = meta_info.get("spec_verify_ct")
    meta = {
        "sampling_params": obj.get("sampling_params") or {},
        "finish_reason": meta_info.get("finish_reason"),
        "prompt_tokens": meta_info.get("prompt_tokens"),
        "cached_tokens": meta_info.get("cached_tokens"),
        "weight_versions": meta_info.get("weight_versions"),
        "spec": {k: meta_info[k] for k in SPEC_FIELDS if k in meta_info},
    }
    if from_text:
        meta["prompt_ids_from_text"] = True
        if meta_info.get("prompt_tokens") not in (None, len(prompt_ids)):
            log.debug("rid %s: tokenized text has %d ids, the server counted %s", rid, len(prompt_ids),
                      meta_info.get("prompt_tokens"))
            meta["prompt_ids_mismatch"] = True
    return FinishedRequest(rid, [int(t) for t in prompt_ids], [int(t) for t in output_ids],
                           weight_version=served_version(meta_info),
                           verify_steps=int(verify) if isinstance(verify, (int, float)) and verify > 0 else None,
                           finished_at=_finished_at(event, meta_info), meta=meta)


@dataclass
class _FileState:
    offset: int = 0
    path: str = ""


@dataclass
class RequestLogTailer:
    """Incremental reader of a request-log directory (or one file).

    poll() returns the requests finished since the previous poll, oldest file first. Offsets are
    kept per inode (see the module docstring); `from_end=True` skips what is already on disk.
    """

    path: str | os.PathLike
    tokenize: Callable[[str], list[int]] | None = None
    skip_rid_prefixes: tuple = SKIP_RID_PREFIXES
    skip_texts: tuple = WARMUP_TEXTS
    from_end: bool = False
    max_read: int = 64 << 20  # bytes read per file per poll (a huge backlog is read over several polls)
    counters: dict = field(default_factory=lambda: {"lines": 0, "finished": 0, "skipped": 0, "malformed": 0})

    def __post_init__(self):
        self._files: dict[tuple[int, int], _FileState] = {}
        self._primed = not self.from_end

    def _list(self) -> list[tuple[Path, os.stat_result]]:
        root = Path(self.path)
        paths = [root] if root.is_file() else (
            sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else [])
        found = []
        for p in paths:
            try:
                found.append((p, p.stat()))
            except OSError:  # rotated away between listing and stat
                continue
        return sorted(found, key=lambda item: (item[1].st_mtime, str(item[0])))

    def _read_new(self) -> Iterator[str]:
        listed = self._list()
        live = set()
        for path, st in listed:
            key = (st.st_dev, st.st_ino)
            live.add(key)
            state = self._files.setdefault(key, _FileState(st.st_size if not self._primed else 0, str(path)))
            if st.st_size < state.offset:  # truncated in place
                state.offset = 0
            if st.st_size == state.offset:
                continue
            try:
                with open(path, "rb") as f:
                    f.seek(state.offset)
                    chunk = f.read(min(self.max_read, st.st_size - state.offset))
            except OSError:
                continue
            end = chunk.rfind(b"\n")
            if end < 0:
                if len(chunk) >= self.max_read:  # one absurdly long line: skip it rather than stall
                    state.offset += len(chunk)
                    self.counters["malformed"] += 1
                continue  # only a partial line so far
            state.offset += end + 1
            for raw in chunk[: end + 1].splitlines():
                yield raw.decode("utf-8", errors="replace")
        for key in list(self._files):  # forget deleted files (bounded memory)
            if key not in live:
                del self._files[key]
        self._primed = True

    def poll(self) -> list[FinishedRequest]:
        out = []
        for line in self._read_new():
            if not line.strip():
                continue
            self.counters["lines"] += 1
            event = parse_line(line)
            if event is None:
                self.counters["malformed"] += 1
                continue
            if event.get("event") != "request.finished":
                continue
            request = finished_request(event, self.tokenize, self.skip_rid_prefixes, self.skip_texts)
            if request is None:
                self.counters["skipped"] += 1
            else:
                self.counters["finished"] += 1
                out.append(request)
        return out


def read_request_log(path: str | os.PathLike, **kw) -> list[FinishedRequest]:
    """Every finished request in a log file or directory (one full pass)."""
    return RequestLogTailer(path, **kw).poll()
