"""The embedded speculative server: a frozen target and a swappable drafter in this process.

Every completion runs draftdistill.spec's lossless decoder, so the drafter only changes speed,
never the output distribution (greedy outputs are identical whatever the drafter). It is also a
TrafficBackend: it keeps a bounded log of finished requests, scores them with the target, and takes
new draft weights between requests (a swap waits for the request being decoded).

Hostile input is refused before it reaches the model (RequestError names the field): prompt ids
must be ints in [0, vocab), prompt + max_new_tokens must fit the context of both models, sampling
parameters must be finite and in range. A running request can be stopped between decode rounds:
`complete(..., should_stop=fn)` asks fn before every target forward (and while waiting for the
lock) and raises GenerationStopped when it returns a reason, which frees the lock. Pushed draft
weights must be finite tensors with the served drafter's names, shapes and kinds, and a version
name that is safe to print anywhere (VERSION_PATTERN).
"""
from __future__ import annotations

import collections
import math
import re
import threading
import time
import uuid
from collections.abc import Callable

import torch

from draftdistill.spec import SamplingConfig, TreeConfig, speculative_generate
from draftdistill.train.batching import pack, response_logits

from .backend import FinishedRequest

VERSION_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-6  # besides exactly 0 (greedy): logits / a subnormal temperature overflow to inf
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A request the engine refuses; `field` names the request field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class GenerationStopped(RuntimeError):
    """A generation stopped before it finished, for `reason` (client gone, time limit, shutdown)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_int(model, name: str) -> int | None:
    value = getattr(getattr(model, "config", None), name, None)
    return int(value) if _is_int(value) and value > 0 else None


def check_version(version) -> str:
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise RequestError("version", f"must match {VERSION_PATTERN.pattern} (letters, digits, . _ : -; "
                                      f"1 to 64 characters), got {str(version)[:80]!r}")
    return version


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
        self.stopped: collections.Counter[str] = collections.Counter()  # generations stopped early, by reason
        self._stopped_lock = threading.Lock()
        # The positions both models can encode, and the ids the target embeds.
        contexts = [c for c in (_config_int(target, "max_position_embeddings"),
                                _config_int(drafter, "max_position_embeddings")) if c is not None]
        self.context_length: int | None = min(contexts) if contexts else None
        embeddings = target.get_input_embeddings() if hasattr(target, "get_input_embeddings") else None
        vocabs = [v for v in (_config_int(target, "vocab_size"), getattr(embeddings, "num_embeddings", None))
                  if _is_int(v) and v > 0]
        self.vocab_size: int | None = min(vocabs) if vocabs else None
        # Asked before every target forward of the thread that is decoding (others see None): the
        # per-round cancellation point, without touching the decoder.
        self._decoding = threading.local()
        self.target.register_forward_pre_hook(self._stop_point)

    def _stop_point(self, module, args):
        should_stop = getattr(self._decoding, "should_stop", None)
        if should_stop is not None:
            reason = should_stop()
            if reason:
                raise GenerationStopped(reason)

    def check_request(self, prompt_ids, max_new_tokens, temperature, top_p, seed) -> None:
        """Raise RequestError (naming the field) for anything the decoder must not be given."""
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise RequestError("prompt", "empty prompt")
        vocab = self.vocab_size
        for i, token in enumerate(prompt_ids):
            if not _is_int(token) or token < 0 or (vocab is not None and token >= vocab):
                raise RequestError("prompt", f"token id at index {i} ({str(token)[:40]}) is not an int in "
                                             f"[0, {vocab if vocab is not None else 'vocab'})")
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise RequestError("max_tokens", f"must be an int >= 1, got {str(max_new_tokens)[:40]}")
        if self.context_length is not None and len(prompt_ids) + max_new_tokens > self.context_length:
            raise RequestError("max_tokens", f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_new_tokens}) "
                                             f"exceeds the model's context of {self.context_length} tokens")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
                or not math.isfinite(temperature) \
                or not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
            raise RequestError("temperature", f"must be 0 (greedy) or a finite number in [{MIN_TEMPERATURE}, "
                                              f"{MAX_TEMPERATURE}], got {str(temperature)[:40]}")
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not math.isfinite(top_p) \
                or not 0 < top_p <= 1:
            raise RequestError("top_p", f"must be a finite number in (0, 1], got {str(top_p)[:40]}")
        if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
            raise RequestError("seed", f"must be null or an int in [0, 2**63 - 1], got {str(seed)[:40]}")

    def _count_stop(self, reason: str) -> None:
        with self._stopped_lock:
            self.stopped[reason] += 1

    def _acquire(self, should_stop: Callable[[], str | None] | None) -> None:
        if should_stop is None:
            self.lock.acquire()
            return
        while not self.lock.acquire(timeout=0.05):
            reason = should_stop()
            if reason:
                raise GenerationStopped(reason)

    # ---- serving ----
    def complete(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, rid: str | None = None,
                 should_stop: Callable[[], str | None] | None = None) -> FinishedRequest:
        """Decode one request. should_stop: asked while waiting for the lock and before every target
        forward; a non-empty reason stops the request (GenerationStopped) and frees the lock."""
        self.check_request(prompt_ids, max_new_tokens, temperature, top_p, seed)
        sampling = SamplingConfig(temperature=float(temperature), top_p=float(top_p))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        device = next(self.target.parameters()).device
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        try:
            self._acquire(should_stop)
        except GenerationStopped as stopped:
            self._count_stop(stopped.reason)
            raise
        try:
            self._decoding.should_stop = should_stop
            version = self.version
            with torch.no_grad():
                tokens, stats = speculative_generate(self.target, self.drafter, ids, max_new_tokens, gamma=self.gamma,
                                                     sampling=sampling, eos_token_id=self.eos, generator=generator,
                                                     tree=self.tree)
        except GenerationStopped as stopped:
            self._count_stop(stopped.reason)
            raise
        finally:
            self._decoding.should_stop = None
            self.lock.release()
        request = FinishedRequest(rid or uuid.uuid4().hex, list(prompt_ids), tokens.tolist(), version,
                                  verify_steps=stats.verify_steps, finished_at=time.time(),
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

    def check_draft_weights(self, named_tensors: dict[str, torch.Tensor], complete: bool = False) -> None:
        """Refuse (ValueError, nothing changed) weights the serving drafter must not take: unknown
        names, other shapes, non-tensors, a float parameter given non-float values, NaN or inf; with
        complete=True also any tensor left out (a name tied to another, e.g. lm_head.weight with tied
        embeddings, is covered by either name) and two different values for one tied tensor."""
        if not isinstance(named_tensors, dict) or not named_tensors:
            raise ValueError("no draft weights given")
        current = self.drafter.state_dict()
        unknown = sorted(set(named_tensors) - set(current))
        if unknown:
            raise ValueError(f"draft weights {unknown[:3]} are not parameters of the serving drafter")
        for name, tensor in named_tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"draft weight {name}: not a tensor")  # noqa: TRY004 - one error type for callers
            if tensor.shape != current[name].shape:
                raise ValueError(f"draft weight {name}: shape {tuple(tensor.shape)} != {tuple(current[name].shape)}")
            if current[name].is_floating_point():
                if not tensor.is_floating_point():
                    raise ValueError(f"draft weight {name}: dtype {tensor.dtype} is not floating point")
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"draft weight {name}: contains NaN or inf")
            elif tensor.dtype != current[name].dtype:
                raise ValueError(f"draft weight {name}: dtype {tensor.dtype} != {current[name].dtype}")
        tied: dict[tuple, list[str]] = collections.defaultdict(list)
        for name, tensor in current.items():
            tied[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))].append(name)
        for names in tied.values():
            given = [n for n in names if n in named_tensors]
            if complete and not given:
                raise ValueError(f"draft weight {names[0]} is missing "
                                 "(a full set of the drafter's weights is required)")
            if complete and any(not torch.equal(named_tensors[given[0]], named_tensors[n]) for n in given[1:]):
                raise ValueError(f"draft weights {given}: one tied tensor given two different values")

    def push_draft_weights(self, named_tensors: dict[str, torch.Tensor], version: str, complete: bool = False) -> None:
        check_version(version)
        self.check_draft_weights(named_tensors, complete=complete)
        current = self.drafter.state_dict()
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
