"""A small HTTP client for a live SGLang (0.5.23) server: health, rollouts, teacher scoring,
Prometheus metrics and weight pushes.

Only the standard library and torch are needed (urllib, no `requests`), so the module imports in
any environment; SGLang itself is imported lazily and only for serializing tensors, with an
equivalent fallback (see `serialize_named_tensors`).

Errors: every failure is an `SGLangError` carrying the endpoint, the HTTP status (None for a
connection error or timeout) and the server's message, so an online trainer can catch it, count
it and carry on. Connection errors and 5xx answers are retried with exponential backoff and
jitter; 4xx answers never are (the request itself is wrong; sending it again cannot help).

Scoring (the off-by-one). SGLang returns input-token log-probs starting at `logprob_start_len`,
and the first entry of that window is always null. To score the response tokens that follow a
prompt of length P we send `logprob_start_len = P - 1` and drop the first entry; entry j is then
log p(ids[P + j] | ids[:P + j]), i.e. the same row the in-process `teacher_logits` gives for
response position j. `input_top_logprobs[j]` is the top-k of that same distribution.

Hidden states (`score(..., hidden_states=True)`) need a server started with
`--enable-return-hidden-states`. They are the final-norm outputs (HF's `hidden_states[-1]`, the
lm_head input), one per *computed* prompt position: SGLang returns nothing for positions it took
from the prefix cache and nothing at all with `max_new_tokens: 0`, so that call asks for one new
token and keeps the trailing prompt positions (checked against HF on the CPU server).
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from draftdistill.losses.teacher import TeacherTokenLogProbs, TeacherTopK

log = logging.getLogger(__name__)

SELECTORS = ("target", "draft", "all")
SCORING_RID_PREFIX = "draftdistill-score-"  # request_log.py skips these rids
# The gauges SGLang 0.5.23 exports for speculative decoding
# (python/sglang/srt/observability/metrics_collector.py, needs --enable-metrics).
SPEC_GAUGES = {
    "accept_length": "sglang:spec_accept_length",  # accepted drafts + bonus token per verify forward
    "accept_rate": "sglang:spec_accept_rate",  # accepted drafts / proposed drafts
    "num_steps": "sglang:spec_num_steps",
    "num_draft_tokens": "sglang:spec_num_draft_tokens",
}


class SGLangError(RuntimeError):
    """A failed call to an SGLang server.

    endpoint: e.g. "POST /generate"; status: the HTTP status, or None when no answer came back
    (connection refused/reset, timeout); message: the server's message or the transport error;
    retryable: whether the client would retry it (connection error, timeout, 5xx).
    """

    def __init__(self, endpoint: str, message: str, status: int | None = None, retryable: bool = False,
                 attempts: int = 1):
        self.endpoint, self.message, self.status = endpoint, message, status
        self.retryable, self.attempts = retryable, attempts
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{endpoint}: {where}: {message}" + (f" (after {attempts} attempts)" if attempts > 1 else ""))


@dataclass
class Rollout:
    """One generated completion."""

    output_ids: list[int]
    text: str
    logprobs: list[float] | None  # log-prob of each output token (return_logprob), else None
    meta_info: dict = field(default_factory=dict)

    @property
    def weight_version(self) -> str | None:
        return self.meta_info.get("weight_version")


@dataclass
class Scores:
    """Teacher scores of the response positions of one (prompt, response) pair.

    Row j is the distribution that predicts response_ids[j] (given prompt + response[:j]).
    """

    token: TeacherTokenLogProbs  # log p(response_ids[j]) per position, [R]
    top_k: TeacherTopK | None  # [R, K] ids and log-probs, when top_k > 0
    token_ids_logprobs: torch.Tensor | None  # [R, len(token_ids)] for the requested token_ids
    hidden_states: torch.Tensor | None  # [R, H] the states that predict each response token
    weight_version: str | None
    meta_info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample line: name{labels} value."""

    name: str
    labels: dict
    value: float


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_prometheus(text: str) -> list[Sample]:
    """Parse the Prometheus text exposition format (what /metrics serves) into samples.

    Comments (# HELP / # TYPE) and blank lines are skipped; label values are unescaped; values
    may be NaN/+Inf; an optional trailing timestamp is ignored. A malformed line is skipped
    (logged at debug level), never raised, so one odd exporter line cannot stop a trainer.
    """
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            log.debug("skipping malformed metrics line %r", line)
            continue
        name, _, body, value = m.group(1), m.group(2), m.group(3), m.group(4)
        labels = {}
        if body:
            for lm in _LABEL.finditer(body):
                labels[lm.group(1)] = (lm.group(2).replace("\\\\", "\x00").replace('\\"', '"')
                                       .replace("\\n", "\n").replace("\x00", "\\"))
        try:
            samples.append(Sample(name, labels, float(value)))
        except ValueError:
            log.debug("skipping metrics line with a bad value %r", line)
    return samples


def spec_metrics(samples: Iterable[Sample]) -> dict[str, float]:
    """The speculative-decoding gauges (keys of SPEC_GAUGES) found among `samples`; a gauge
    exported once per rank/label set is averaged. Missing gauges are left out (a server without
    --enable-metrics has no /metrics at all). SGLang 0.5.23 exports these gauges as 0 when no
    speculative algorithm runs (and before the first speculative decode step): accept_length is
    >= 1 whenever it measured something."""
    out: dict[str, list[float]] = {}
    by_name = {v: k for k, v in SPEC_GAUGES.items()}
    for s in samples:
        if s.name in by_name and not math.isnan(s.value):
            out.setdefault(by_name[s.name], []).append(s.value)
    return {k: sum(v) / len(v) for k, v in out.items()}


# ---- tensors over the wire ----

_shm_manager_started = False


def _start_shm_manager_quietly() -> None:
    """The first file_system share spawns torch_shm_manager, which inherits our stdout/stderr and
    lives as long as the *server* holds the handle; give it /dev/null, so a parent reading our
    output pipes is not kept waiting for EOF (see sglang-cpu README, "Tensor updates across
    processes")."""
    global _shm_manager_started
    if _shm_manager_started:
        return
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        torch.zeros(1).share_memory_()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)
    _shm_manager_started = True


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """Base64 payload for /update_weights_from_tensor's `serialized_named_tensors` (one TP rank).

    Uses sglang.srt.utils.MultiprocessingSerializer when SGLang is importable. Without SGLang it
    falls back to what that class does in 0.5.23 (utils/common.py): pickle with
    multiprocessing's ForkingPickler, whose torch reductions (registered by importing
    torch.multiprocessing) pass CPU tensors as shared-memory handles. Either way the sender must
    use the "file_system" sharing strategy (set here): with file descriptors the server crashes
    with AuthenticationError. The tensors are moved to shared memory in place and must stay alive
    until the server has answered: pass CPU copies you hold (update_weights_from_tensor does).
    """
    import torch.multiprocessing as tmp

    tmp.set_sharing_strategy("file_system")
    _start_shm_manager_quietly()
    named = list(named)
    try:
        from sglang.srt.utils import MultiprocessingSerializer  # noqa: PLC0415 (lazy on purpose)
    except Exception:  # noqa: BLE001 - not installed, or fails to import here: same bytes below
        import io
        from multiprocessing.reduction import ForkingPickler

        buf = io.BytesIO()
        ForkingPickler(buf).dump(named)
        return base64.b64encode(buf.getvalue()).decode()
    return MultiprocessingSerializer.serialize(named, output_str=True)


def drop_shared_tensors(named: dict[str, torch.Tensor], target: dict[str, torch.Tensor] | None = None,
                        tied_names: Iterable[str] = ("model.embed_tokens.weight", "lm_head.weight"),
                        drop_tied: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The draft tensors worth sending, and the names left out.

    A draft that shares tensors with the target (EAGLE's embed_tokens, and lm_head for EAGLE heads
    that reuse the target's; a pruned drafter's copied embeddings) must not send them: the server
    shares the storage, so a push could change the target, and it is wasted bandwidth. A tensor is
    left out when `target` (the target's state dict, HF names) has one of the same name that is the
    same object, shares its storage, or is equal in shape, dtype and value. With drop_tied, the
    `tied_names` are always left out (use it when the target is not at hand and the draft ties
    them to the target).
    """
    keep, dropped = {}, []
    tied = set(tied_names) if drop_tied else set()
    for name, tensor in named.items():
        other = None if target is None else target.get(name)
        shared = name in tied
        if not shared and other is not None:
            shared = (other is tensor
                      or (other.device == tensor.device and other.untyped_storage().data_ptr()
                          == tensor.untyped_storage().data_ptr() and other.shape == tensor.shape)
                      or (other.shape == tensor.shape and other.dtype == tensor.dtype
                          and torch.equal(other.detach().cpu(), tensor.detach().cpu())))
        if shared:
            dropped.append(name)
        else:
            keep[name] = tensor
    return keep, dropped


# ---- the client ----

class SGLangClient:
    def __init__(self, url: str = "http://127.0.0.1:30000", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 10.0, *, api_key: str | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        """retries: extra attempts after the first on a retryable failure; the wait before retry
        i (0-based) is uniform in [d/2, d] with d = min(max_backoff, backoff * 2**i)."""
        self.url = url.rstrip("/")
        self.timeout, self.retries = timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.api_key = api_key
        self.sleep = sleep
        self.rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"SGLangClient({self.url!r})"

    # ---- transport ----
    def backoff_delay(self, attempt: int) -> float:
        d = min(self.max_backoff, self.backoff * (2 ** attempt))
        return d / 2 + self.rng.uniform(0, d / 2)

    def _once(self, method: str, path: str, body: Any, timeout: float) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            try:
                payload = e.read()
            except Exception:  # noqa: BLE001
                payload = b""
            return e.code, payload

    @staticmethod
    def _message(payload: bytes) -> str:
        text = payload.decode(errors="replace")
        try:
            j = json.loads(text)
        except ValueError:
            return text.strip()[:1000]
        if isinstance(j, dict):
            err = j.get("error")
            if isinstance(err, dict) and "message" in err:
                return str(err["message"])[:1000]
            if "message" in j:
                return str(j["message"])[:1000]
            if "detail" in j:
                return str(j["detail"])[:1000]
        return text.strip()[:1000]

    def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None,
                retries: int | None = None, parse_json: bool = True) -> Any:
        """One call with retries. Retried: connection errors, timeouts and 5xx. Raised at once:
        4xx. Returns the parsed JSON (or the text with parse_json=False)."""
        endpoint = f"{method} {path}"
        retries = self.retries if retries is None else retries
        timeout = self.timeout if timeout is None else timeout
        attempt = 0
        while True:
            status, message = None, ""
            try:
                status, payload = self._once(method, path, body, timeout)
            except (OSError, http.client.HTTPException) as e:  # URLError, refused/reset, timeouts
                reason = getattr(e, "reason", e)
                message = f"{type(reason).__name__}: {reason}"
            else:
                if 200 <= status < 300:
                    text = payload.decode(errors="replace")
                    if not parse_json:
                        return text
                    try:
                        return json.loads(text) if text.strip() else None
                    except ValueError as e:
                        raise SGLangError(endpoint, f"bad JSON in the answer: {e}: {text[:200]!r}", status,
                                          attempts=attempt + 1) from None
                message = self._message(payload)
                if status < 500:  # the request is wrong: never retried
                    raise SGLangError(endpoint, message, status, retryable=False, attempts=attempt + 1)
            if attempt >= retries:
                raise SGLangError(endpoint, message, status, retryable=True, attempts=attempt + 1)
            delay = self.backoff_delay(attempt)
            log.warning("%s failed (%s); retry %d/%d in %.2fs", endpoint,
                        f"HTTP {status}: {message}" if status else message, attempt + 1, retries, delay)
            self.sleep(delay)
            attempt += 1

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw) -> Any:
        return self.request("POST", path, {} if body is None else body, **kw)

    def _post_success(self, path: str, body: dict, **kw) -> dict:
        """POST to an endpoint that answers {"success": bool, "message": str}; success false -> error."""
        out = self.post(path, body, **kw)
        if not isinstance(out, dict) or out.get("success") is not True:
            message = out.get("message", out) if isinstance(out, dict) else out
            raise SGLangError(f"POST {path}", str(message), 200, retryable=False)
        return out

    # ---- server state ----
    def health(self, timeout: float = 5.0) -> bool:
        """True when /health answers 200 (it answers 503 while starting); never raises."""
        try:
            self.request("GET", "/health", timeout=timeout, retries=0, parse_json=False)
            return True
        except SGLangError:
            return False

    def wait_until_healthy(self, timeout: float = 180.0, poll: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.health():
            if time.monotonic() > deadline:
                raise SGLangError("GET /health", f"not healthy within {timeout:.0f}s", None)
            time.sleep(poll)

    def model_info(self) -> dict:
        return self.get("/model_info")

    def server_info(self) -> dict:
        return self.get("/server_info")

    def weight_version(self) -> str:
        """The server's weight version (one per server in 0.5.23: the last update's, target or draft)."""
        return str(self.model_info().get("weight_version", "default"))

    def metrics(self) -> list[Sample]:
        """/metrics as samples (the server needs --enable-metrics; 404 otherwise)."""
        return parse_prometheus(self.get("/metrics", parse_json=False))

    def spec_metrics(self) -> dict[str, float]:
        return spec_metrics(self.metrics())

    # ---- generation ----
    def generate(self, input_ids: list[int] | list[list[int]] | None = None, text: str | list[str] | None = None,
                 sampling_params: dict | None = None, **options) -> Any:
        """Raw /generate: exactly one of input_ids / text (a list of them for a batch, which
        answers a list). `options` go into the body as they are (return_logprob,
        logprob_start_len, top_logprobs_num, token_ids_logprob, return_hidden_states, rid, ...)."""
        if (input_ids is None) == (text is None):
            raise ValueError("give exactly one of input_ids and text")
        body = {"sampling_params": dict(sampling_params or {}), **options}
        if input_ids is not None:
            body["input_ids"] = input_ids
        else:
            body["text"] = text
        return self.post("/generate", body)

    def rollout(self, input_ids: list[int] | list[list[int]] | None = None, text: str | list[str] | None = None,
                max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                seed: int | None = None, ignore_eos: bool = False, stop_token_ids: list[int] | None = None,
                return_logprob: bool = True, rid: str | list[str] | None = None,
                **sampling) -> Rollout | list[Rollout]:
        """Sample completions; a batch (list of prompts) gives a list of Rollouts."""
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                  "top_k": top_k, "ignore_eos": ignore_eos, **sampling}
        if seed is not None:
            params["sampling_seed"] = seed
        if stop_token_ids:
            params["stop_token_ids"] = list(stop_token_ids)
        options: dict = {"return_logprob": return_logprob}
        if rid is not None:
            options["rid"] = rid
        out = self.generate(input_ids, text, params, **options)
        parsed = [self._rollout(o) for o in (out if isinstance(out, list) else [out])]
        return parsed if isinstance(out, list) else parsed[0]

    @staticmethod
    def _rollout(out: dict) -> Rollout:
        mi = out.get("meta_info", {})
        lps = mi.get("output_token_logprobs")
        return Rollout([int(t) for t in out.get("output_ids", [])], out.get("text", ""),
                       [float(e[0]) for e in lps] if lps is not None else None, mi)

    # ---- teacher scoring ----
    def score(self, prompt_ids: list[int], response_ids: list[int], top_k: int = 20,
              token_ids: list[int] | None = None, hidden_states: bool = False, rid: str | None = None) -> Scores:
        """Teacher log-probs of the response positions (one prefill, nothing generated).

        See the module docstring for the off-by-one: logprob_start_len = len(prompt) - 1 and the
        first (null) entry is dropped. The token ids SGLang echoes are checked against
        `response_ids`, so a misalignment raises instead of training on shifted targets.
        """
        prompt_ids, response_ids = [int(t) for t in prompt_ids], [int(t) for t in response_ids]
        if not prompt_ids:
            raise ValueError("scoring needs a non-empty prompt (the first token has no distribution)")
        R = len(response_ids)
        if R == 0:
            empty = torch.zeros(0)
            return Scores(TeacherTokenLogProbs(empty.long(), empty), None, None, None, None)
        P = len(prompt_ids)
        ids = prompt_ids + response_ids
        body: dict = {"return_logprob": True, "logprob_start_len": P - 1}
        if top_k:
            body["top_logprobs_num"] = int(top_k)
        if token_ids:
            body["token_ids_logprob"] = [int(t) for t in token_ids]
        if hidden_states:
            body["return_hidden_states"] = True
        # a recognisable rid, so request_log.py does not take our own scoring for traffic
        body["rid"] = rid if rid is not None else f"{SCORING_RID_PREFIX}{uuid.uuid4().hex}"
        # max_new_tokens 0 = a pure prefill; hidden states need one decode step (see module doc).
        params = {"max_new_tokens": 1 if hidden_states else 0, "temperature": 0.0, "ignore_eos": True}
        out = self.generate(ids, None, params, **body)
        return self._scores(out.get("meta_info", {}), response_ids, top_k, token_ids, hidden_states, len(ids))

    @staticmethod
    def _scores(mi: dict, response_ids: list[int], top_k: int, token_ids, hidden: bool, n_ids: int) -> Scores:
        endpoint, R = "POST /generate", len(response_ids)

        def window(key: str) -> list:
            entries = mi.get(key)
            if entries is None:
                raise SGLangError(endpoint, f"meta_info has no {key!r}", 200)
            if len(entries) != R + 1:
                raise SGLangError(endpoint, f"{key}: {len(entries)} entries, expected {R + 1} "
                                  "(the server ignored logprob_start_len?)", 200)
            return entries[1:]  # the first entry of the window is always null

        tokens = window("input_token_logprobs")
        got = [int(e[1]) for e in tokens]
        if got != response_ids:
            raise SGLangError(endpoint, f"scored token ids {got[:8]} do not match the response {response_ids[:8]}", 200)
        token = TeacherTokenLogProbs(torch.tensor(got, dtype=torch.long),
                                     torch.tensor([float(e[0]) for e in tokens], dtype=torch.float32))
        topk = None
        if top_k:
            rows = window("input_top_logprobs")
            topk = TeacherTopK(torch.tensor([[int(e[1]) for e in row] for row in rows], dtype=torch.long),
                               torch.tensor([[float(e[0]) for e in row] for row in rows], dtype=torch.float32))
        requested = None
        if token_ids:
            rows = window("input_token_ids_logprobs")
            requested = torch.tensor([[float(e[0]) for e in row] for row in rows], dtype=torch.float32)
        states = None
        if hidden:
            hs = mi.get("hidden_states") or []
            if not hs or not isinstance(hs[0], list) or not hs[0] or not isinstance(hs[0][0], list):
                raise SGLangError(endpoint, "no prompt hidden states in meta_info (start the server with "
                                  "--enable-return-hidden-states)", 200)
            prefill = torch.tensor(hs[0], dtype=torch.float32)  # positions n_ids - len .. n_ids - 1
            if prefill.shape[0] < R + 1:
                raise SGLangError(endpoint, f"only {prefill.shape[0]} prompt hidden states for {R} response "
                                  "positions (prefix cache hit beyond logprob_start_len?)", 200)
            states = prefill[-(R + 1):-1]  # positions P-1 .. P+R-2: each predicts response[j]
        return Scores(token, topk, requested, states, mi.get("weight_version"), mi)

    # ---- weights ----
    def begin_weight_update(self, selector: str = "all") -> dict:
        _check_selector(selector)
        return self._post_success("/begin_weight_update", {"selector": selector})

    def end_weight_update(self) -> dict:
        return self._post_success("/end_weight_update", {})

    def update_weights_from_tensor(self, named_tensors: dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]],
                                   selector: str = "draft", weight_version: str | None = None,
                                   flush_cache: bool = True, tp_size: int = 1, load_format: str | None = None) -> dict:
        """/update_weights_from_tensor with HF parameter names (SGLang maps and stacks them, e.g.
        q/k/v_proj into qkv_proj). Must run between begin/end_weight_update: use push_weights."""
        _check_selector(selector)
        named = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        # Private CPU copies: serializing moves storage to shared memory in place (the caller's
        # tensors stay untouched), and `named` keeps them alive until the server has read them.
        named = [(str(n), t.detach().to("cpu", copy=True).contiguous()) for n, t in named]
        payload = serialize_named_tensors(named)
        body: dict = {"serialized_named_tensors": [payload] * tp_size, "selector": selector,
                      "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        if load_format is not None:
            body["load_format"] = load_format
        # never retried: a request that reached the server may have been applied in part
        return self._post_success("/update_weights_from_tensor", body, retries=0)

    def push_weights(self, named_tensors: dict[str, torch.Tensor], weight_version: str, selector: str = "draft",
                     flush_cache: bool = True, tp_size: int = 1) -> dict:
        """begin_weight_update -> update_weights_from_tensor -> end_weight_update; the session is
        closed even when the update fails (then the update's SGLangError is raised)."""
        self.begin_weight_update(selector)
        try:
            out = self.update_weights_from_tensor(named_tensors, selector, weight_version, flush_cache, tp_size)
        except BaseException:
            try:  # close the session, but report the update's own error
                self.end_weight_update()
            except SGLangError as e:
                log.warning("end_weight_update after a failed update failed too: %s", e)
            raise
        self.end_weight_update()
        return out

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                 flush_cache: bool = True, abort_all_requests: bool = False) -> dict:
        """Reload every runner from `model_path` (SGLang 0.5.23 has no selector here: target AND
        draft load the same path, so never use it for a separate draft)."""
        body: dict = {"model_path": str(model_path), "flush_cache": flush_cache,
                      "abort_all_requests": abort_all_requests}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return self._post_success("/update_weights_from_disk", body, retries=0)


def _check_selector(selector: str) -> None:
    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
