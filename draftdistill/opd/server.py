"""OPD with SGLang servers: teachers scored by a pool of servers, student rollouts from a server.

    SGLangScorer(["http://a:30000", "http://b:30000"])  -> a Scorer (token / top-k log-probs)
    SGLangSampler("http://s:30000,http://t:30000", ...) -> a Sampler; sync(student, version)
                                                           pushes the student's weights to them

Both talk through serving's SGLangClient (timeouts, retries with backoff on connection errors
and 5xx). On top of that a server that stays down is waited for, `patience` seconds in all, with
the other servers of a pool tried first, so a restarting teacher stalls a step instead of killing
the run; a request the server refuses (4xx) raises at once, it would fail again.

Log-prob conventions (checked against a real server in tests/serving/test_sglang_opd.py): scoring
log-probs are those of the raw logits, so a server teacher needs loss_temperature 1. Rollout
log-probs are log_softmax(logits / T) at the request's temperature T, taken before top-p / top-k
(SGLang's Sampler: log(softmax(logits / T)) of the probabilities it then filters), and of the raw
logits (T = 1) for greedy requests, or for every request when the server runs with
SGLANG_RETURN_ORIGINAL_LOGPROB set (do not: it hides the temperature). So they are the importance
ratio's loss-distribution log-probs (Completion.loss_logprobs) exactly when that T equals
loss_temperature; opd.objectives.check_importance_sampling refuses the other combinations.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .rollout import Completion, TeacherScores, scores_from_lists

log = logging.getLogger(__name__)


def _client(url: str, timeout: float):
    from draftdistill.serving.sglang_client import SGLangClient  # serving/ is optional for in-process OPD

    return SGLangClient(url, timeout=timeout, retries=3)


def split_urls(urls: str | list[str]) -> list[str]:
    out = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
    if not out:
        raise ValueError("no server URL given")
    return out


class _Pool:
    """Round-robin over servers; a call that fails with a retryable error moves to the next server
    and, once every server has failed, waits (1 s, doubling, at most 30 s) until `patience`
    seconds of waiting are spent."""

    def __init__(self, urls, timeout: float, patience: float, start: int = 0, sleep=time.sleep):
        self.clients = [_client(u, timeout) for u in split_urls(urls)]
        self.patience, self.start, self.sleep = patience, start, sleep

    def call(self, row: int, fn, failover: bool = True):
        """fn(client) on server (start + row) % n. failover=False: that server or none (a weight
        push every server must get), waited for up to `patience` seconds."""
        from draftdistill.serving.sglang_client import SGLangError

        waited, wait, attempt = 0.0, 1.0, 0
        while True:
            client = self.clients[(self.start + row + (attempt if failover else 0)) % len(self.clients)]
            try:
                return fn(client)
            except SGLangError as err:
                if not err.retryable:
                    raise
                attempt += 1
                if failover and attempt % len(self.clients):
                    continue  # another server of the pool first
                if waited + wait > self.patience:
                    raise SGLangError(err.endpoint, f"{client.url} still failing after {self.patience:.0f} s "
                                      f"of patience: {err}", err.status, retryable=True) from err
                log.warning("SGLang server(s) failing (%s); retrying in %.0f s", err, wait)
                self.sleep(wait)
                waited, wait = waited + wait, min(30.0, wait * 2)


class SGLangScorer:
    """A teacher served by SGLang: one `/generate` scoring request per row (`max_new_tokens: 0`,
    `logprob_start_len: P - 1`), rows spread over the pool and sent concurrently. Token and top-k
    log-probs only: a server does not return full logits."""

    def __init__(self, urls: str | list[str], timeout: float = 600.0, patience: float = 900.0,
                 concurrency: int = 8, start: int = 0, device="cpu"):
        """start: the server row 0 goes to (a rank, so ranks begin on different servers)."""
        self.pool = _Pool(urls, timeout, patience, start)
        self.concurrency, self.device, self.dealt = concurrency, device, 0

    def score(self, prompts, responses, forms, top_k, temperature) -> TeacherScores:
        if "logits" in forms:
            raise ValueError("an SGLang teacher returns top-k or token log-probs, not full logits "
                             "(use teacher_scores=topk or token)")
        if temperature != 1.0:
            raise ValueError("SGLang scores with the raw logits: a server teacher needs loss_temperature=1")
        k = top_k if "topk" in forms else 0
        offset, self.dealt = self.dealt, self.dealt + len(prompts)  # each call goes on where the last stopped

        def one(row):
            scores = self.pool.call(offset + row, lambda c: c.score(prompts[row], responses[row], top_k=k))
            top = [] if scores.top_k is None else list(zip(scores.top_k.ids.tolist(), scores.top_k.logprobs.tolist()))
            return scores.token.logprobs.tolist(), top

        with ThreadPoolExecutor(max(1, min(self.concurrency, len(prompts)))) as threads:
            results = list(threads.map(one, range(len(prompts))))
        token = [t for t, _ in results]
        top = [t for _, t in results] if k else []
        return scores_from_lists(token, top, responses, self.device)


class SGLangSampler:
    """Student rollouts from SGLang servers that serve the student (one URL, or a pool: rows
    round-robin from server `start`, a rank under torchrun). Call `sync(student, version)` after
    every optimizer step (the trainer does) so every server samples from the current weights: a
    pushed (`selector: target`) tensor update between begin/end_weight_update."""

    def __init__(self, urls: str | list[str], eos_ids: list[int], temperature: float = 1.0, top_p: float = 1.0,
                 timeout: float = 600.0, patience: float = 900.0, concurrency: int = 8, start: int = 0,
                 loss_temperature: float = 1.0):
        self.pool = _Pool(urls, timeout, patience, start)
        self.eos, self.temperature, self.top_p = sorted(set(eos_ids)), temperature, top_p
        # The server's log-probs are the loss distribution's only when it scales by loss_temperature.
        self.loss_logprobs = served_logprob_temperature(temperature) == loss_temperature
        self.concurrency = concurrency
        self.version: str | None = None

    def sync(self, model: torch.nn.Module, version) -> None:
        """Push `model`'s weights (HF names; a tied lm_head left out) to every server. Under torchrun
        every rank calls it: the full weights are gathered to rank 0, which pushes them, and no rank
        samples again before every server holds them."""
        from draftdistill.train import distributed

        weights = distributed.full_state_dict(model)  # a collective under torchrun ({} off rank 0)
        if distributed.is_main():
            named = {name: t for name, t in weights.items()
                     if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
            for server in range(len(self.pool.clients)):
                self.pool.call(server - self.pool.start,
                               lambda c: c.push_weights(named, str(version), selector="target"),
                               failover=False)
        distributed.barrier()
        self.version = str(version)

    def sample(self, prompts, max_new_tokens, generator) -> list[Completion]:
        # One seed per row from the caller's generator: repeated prompts (group_size > 1) differ,
        # and a resumed step asks for the same samples.
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()

        def one(row):
            out = self.pool.call(row, lambda c: c.rollout(prompts[row], max_new_tokens=max_new_tokens,
                                                          temperature=self.temperature, top_p=self.top_p,
                                                          seed=seeds[row], stop_token_ids=self.eos))
            if self.version is not None and out.weight_version not in (None, self.version):
                raise RuntimeError(f"rollout came from weights {out.weight_version!r}, expected {self.version!r}")
            finished = bool(out.output_ids) and out.output_ids[-1] in self.eos
            logprobs = list(out.logprobs or [])
            return Completion(list(out.output_ids), logprobs, finished, logprobs if self.loss_logprobs else None)

        with ThreadPoolExecutor(max(1, min(self.concurrency, len(prompts)))) as threads:
            return list(threads.map(one, range(len(prompts))))


def served_logprob_temperature(rollout_temperature: float) -> float:
    """The temperature of the log-probs an SGLang rollout returns: the request's, 1 when greedy."""
    return rollout_temperature if rollout_temperature > 0 else 1.0


__all__ = ["SGLangSampler", "SGLangScorer", "served_logprob_temperature", "split_urls"]
