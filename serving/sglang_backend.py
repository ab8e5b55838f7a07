"""A live SGLang server as the online distiller's TrafficBackend.

    traffic      <- the server's JSON request log (request_log.RequestLogTailer)
    teacher      <- /generate scoring of the same tokens (TeacherTopK or TeacherTokenLogProbs)
    new drafter  -> /begin_weight_update -> /update_weights_from_tensor (selector "draft") -> /end
    version      <- /model_info weight_version (per request: meta_info weight_versions)

The server must run with `--log-requests --log-requests-level 3 --log-requests-format json
--log-requests-target DIR` (serve.sh in shared/sglang-cpu does) and, for acceptance, a speculative
algorithm (`--speculative-algorithm STANDALONE --speculative-draft-model-path <export_hf dir>`).

SGLang 0.5.23 keeps ONE weight version per server: a draft push with weight_version "v3" makes
/model_info and every later request report "v3", so the version names the drafter only as long as
the target is not updated too (this backend never updates the target).

Every server failure is an SGLangError (endpoint, status, message): the trainer can catch it,
count it, and try again at its next step.
"""
from __future__ import annotations

import collections
import logging
import os
import time

import torch

from .backend import FinishedRequest
from .request_log import RequestLogTailer
from .sglang_client import SGLangClient, SGLangError, drop_shared_tensors

log = logging.getLogger(__name__)


class SGLangBackend:
    def __init__(self, client: SGLangClient | str, log_dir: str | os.PathLike | None = None, *,
                 teacher: str = "topk", top_k: int = 20, selector: str = "draft",
                 shared_with_target: dict[str, torch.Tensor] | None = None, drop_names: tuple = (),
                 tokenize=None, history: int = 10_000, from_end: bool = False, tp_size: int = 1):
        """
        client: an SGLangClient or the server URL.
        log_dir: the request-log directory; None asks the server (/server_info log_requests_target).
        teacher: "topk" -> teacher_logits returns TeacherTopK (top_k ids and full-vocabulary
            log-probs, what the top-k divergences take); "token" -> TeacherTokenLogProbs of the
            response tokens (sampled-token estimators only).
        shared_with_target / drop_names: tensors never pushed (drop_shared_tensors): the draft
            tensors equal to the target's state dict entries of the same name, and these names.
        history: finished requests kept in memory for finished_requests(since).
        """
        if teacher not in ("topk", "token"):
            raise ValueError(f"teacher must be 'topk' or 'token', got {teacher!r}")
        self.client = client if isinstance(client, SGLangClient) else SGLangClient(client)
        if log_dir is None:
            target = self.client.server_info().get("log_requests_target") or []
            target = [t for t in (target if isinstance(target, list) else [target]) if t and t not in ("stdout",)]
            if not target:
                raise SGLangError("GET /server_info", "the server writes no request log to a directory "
                                  "(start it with --log-requests-target DIR --log-requests-format json)")
            log_dir = target[0]
        self.log_dir = str(log_dir)
        self.tailer = RequestLogTailer(self.log_dir, tokenize=tokenize, from_end=from_end)
        self.teacher, self.top_k, self.selector, self.tp_size = teacher, top_k, selector, tp_size
        self.shared_with_target, self.drop_names = shared_with_target, tuple(drop_names)
        self.log: collections.deque[FinishedRequest] = collections.deque(maxlen=history)
        self.swaps: list[dict] = []  # version, names sent/dropped, seconds, when
        self._version: str | None = None

    # ---- TrafficBackend ----
    def finished_requests(self, since: float) -> list[FinishedRequest]:
        new = sorted(self.tailer.poll(), key=lambda r: r.finished_at)
        self.log.extend(new)
        return sorted((r for r in self.log if r.finished_at > since), key=lambda r: r.finished_at)

    def teacher_logits(self, prompt_ids: list[int], response_ids: list[int]):
        """Scores of every response position: TeacherTopK [R, K] or TeacherTokenLogProbs [R]."""
        scores = self.client.score(prompt_ids, response_ids, top_k=self.top_k if self.teacher == "topk" else 0)
        return scores.top_k if self.teacher == "topk" else scores.token

    def push_draft_weights(self, named_tensors: dict[str, torch.Tensor], version: str) -> None:
        keep, dropped = drop_shared_tensors(named_tensors, self.shared_with_target)
        for name in self.drop_names:
            if keep.pop(name, None) is not None:
                dropped.append(name)
        if not keep:
            raise ValueError("nothing to push: every draft tensor is shared with the target")
        start = time.perf_counter()
        self.client.push_weights(keep, str(version), selector=self.selector, tp_size=self.tp_size)
        self._version = str(version)
        self.swaps.append({"version": str(version), "sent": len(keep), "dropped": dropped,
                           "seconds": time.perf_counter() - start, "at": time.time()})

    def draft_weight_version(self) -> str:
        return self.client.weight_version()
