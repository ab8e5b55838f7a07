"""The embedded speculative server: a frozen target and a swappable drafter in this process.

Every completion runs draftdistill.spec's lossless decoder, so the drafter only changes speed,
never the output distribution (greedy outputs are identical whatever the drafter). It is also a
TrafficBackend: it keeps a bounded log of finished requests, scores them with the target, and takes
new draft weights between requests (a swap waits for the request being decoded).
"""
from __future__ import annotations

import collections
import threading
import time
import uuid

import torch

from draftdistill.spec import SamplingConfig, TreeConfig, speculative_generate
from draftdistill.train.batching import pack, response_logits

from .backend import FinishedRequest


class EmbeddedSpecServer:
    def __init__(self, target, drafter, tokenizer, *, gamma: int = 4, eos_token_id=None,
                 log_capacity: int = 10_000, tree: TreeConfig | None = None):
        self.target, self.drafter, self.tokenizer = target.eval(), drafter.eval(), tokenizer
        self.gamma, self.tree = gamma, tree  # tree: draft EAGLE-2 trees instead of gamma-token chains
        self.eos = eos_token_id
        self.version = "v0"
        self.lock = threading.Lock()  # one decode or one swap at a time
        self.log: collections.deque[FinishedRequest] = collections.deque(maxlen=log_capacity)
        self.swaps: list[dict] = []  # version, seconds the swap held the lock, when

    # ---- serving ----
    def complete(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, rid: str | None = None) -> FinishedRequest:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = SamplingConfig(temperature=temperature, top_p=top_p)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        device = next(self.target.parameters()).device
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        with self.lock, torch.no_grad():
            version = self.version
            tokens, stats = speculative_generate(self.target, self.drafter, ids, max_new_tokens, gamma=self.gamma,
                                                 sampling=sampling, eos_token_id=self.eos, generator=generator,
                                                 tree=self.tree)
        request = FinishedRequest(rid or uuid.uuid4().hex, list(prompt_ids), tokens.tolist(), version,
                                  verify_steps=stats.target_calls, finished_at=time.time(),
                                  meta={"spec": stats.to_dict(), "temperature": temperature, "top_p": top_p})
        self.log.append(request)
        return request

    # ---- TrafficBackend ----
    def finished_requests(self, since: float) -> list[FinishedRequest]:
        return [r for r in list(self.log) if r.finished_at > since]

    def teacher_logits(self, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
        device = next(self.target.parameters()).device
        batch = pack([list(prompt_ids)], [list(response_ids)], pad_id=0).to(device)
        with torch.no_grad():  # the target is read-only; no lock needed for a pure forward
            return response_logits(self.target, batch)[0, : len(response_ids)]

    def push_draft_weights(self, named_tensors: dict[str, torch.Tensor], version: str) -> None:
        current = self.drafter.state_dict()
        unknown = sorted(set(named_tensors) - set(current))
        if unknown:
            raise ValueError(f"draft weights {unknown[:3]} are not parameters of the serving drafter")
        for name, tensor in named_tensors.items():
            if tensor.shape != current[name].shape:
                raise ValueError(f"draft weight {name}: shape {tuple(tensor.shape)} != {tuple(current[name].shape)}")
        waited = time.perf_counter()
        with self.lock:
            held = time.perf_counter()
            with torch.no_grad():
                for name, tensor in named_tensors.items():
                    current[name].copy_(tensor)
            self.version = version
            done = time.perf_counter()
        self.swaps.append({"version": version, "wait_seconds": held - waited, "swap_seconds": done - held,
                           "at": time.time()})

    def draft_weight_version(self) -> str:
        return self.version
