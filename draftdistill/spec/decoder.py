"""The lossless speculative decoding loop (batch size 1) with KV caches for both models.

One round:
  1. the drafter proposes g tokens, sampling each from its processed distribution q;
  2. the target scores [pending tokens + g drafts] in ONE forward, giving p at every draft position
     and one past the last (there is no separate target prefill: round one's pending tokens are the
     prompt), so tau = new tokens / target forwards;
  3. `verify` accepts a prefix of the drafts and emits one more token (correction or bonus);
  4. both caches are cropped back to the committed context.

Cache bookkeeping. `committed` is the sequence of prompt + emitted tokens. The target's cache
holds committed[:-1] after every round: the newest token is fed at the start of the next round.
The drafter's cache is cropped to the same committed context; it has seen drafts d1..d_{g-1} but
never d_g, so when all g drafts are accepted it is fed [d_g, next] next round, else [next].
"""
from __future__ import annotations

import time

import torch

from .metrics import SpecStats
from .sampling import SamplingConfig, logits_to_probs, sample_token
from .verify import verify


def eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


def forward(model, tokens: list[int], cache, device) -> tuple[torch.Tensor, object]:
    """Run ``model`` on new ``tokens`` after ``cache``; return logits [len(tokens), V] and the cache."""
    out = model(input_ids=torch.tensor([tokens], device=device), past_key_values=cache, use_cache=True)
    return out.logits[0], out.past_key_values


def crop_to(cache, length: int) -> None:
    """Keep the first ``length`` positions. A negative count (remove that many) is the one form
    ``DynamicCache.crop`` accepts in both transformers 4.x and 5.x."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def truncate_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@torch.inference_mode()
def speculative_generate(target, drafter, input_ids: torch.Tensor, max_new_tokens: int, gamma: int = 4,
                         sampling: SamplingConfig = SamplingConfig(), eos_token_id=None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Generate up to ``max_new_tokens`` tokens distributed exactly as the target's sampling would."""
    from transformers import DynamicCache

    assert input_ids.shape[0] == 1, "batch size 1"
    assert gamma >= 1
    device = input_ids.device
    eos = eos_set(eos_token_id)
    stats = SpecStats.empty(gamma)
    started = time.perf_counter()

    prompt = input_ids[0].tolist()
    emitted: list[int] = []
    target_cache, drafter_cache = DynamicCache(), DynamicCache()
    target_pending = list(prompt)  # tokens the target has not processed yet
    drafter_pending = list(prompt)  # tokens the drafter has not processed yet

    while len(emitted) < max_new_tokens:
        # Never draft past the budget: the last round emits at most g drafts + 1 token.
        g = min(gamma, max_new_tokens - len(emitted) - 1)
        if g == 0:
            # One token left: a plain target step is cheaper than drafting nothing.
            logits, target_cache = forward(target, target_pending, target_cache, device)
            stats.target_calls += 1
            emitted.append(sample_token(logits_to_probs(logits[-1], sampling), generator))
            break

        # 1. Draft g tokens.
        drafts, draft_probs = [], []
        feed = drafter_pending
        for _ in range(g):
            logits, drafter_cache = forward(drafter, feed, drafter_cache, device)
            stats.drafter_calls += 1
            q = logits_to_probs(logits[-1], sampling)
            token = sample_token(q, generator)
            drafts.append(token)
            draft_probs.append(q)
            feed = [token]

        # 2. Score pending context + all drafts in one target forward.
        logits, target_cache = forward(target, target_pending + drafts, target_cache, device)
        stats.target_calls += 1
        target_probs = logits_to_probs(logits[-(g + 1):], sampling)
        assert target_probs.shape[-1] == draft_probs[0].shape[-1], "target and drafter vocabularies differ"

        # 3. Accept a prefix, emit one more token.
        n, next_token = verify(torch.tensor(drafts), torch.stack(draft_probs), target_probs, generator)
        stats.record_round(g, n)
        block = truncate_at_eos(drafts[:n] + [next_token], eos)
        emitted.extend(block)
        if len(block) < n + 1:  # stopped at an eos inside the block
            break

        # 4. Roll both caches back to the committed context (all but the newest token).
        committed = len(prompt) + len(emitted) - 1
        crop_to(target_cache, committed)
        target_pending = [next_token]
        crop_to(drafter_cache, committed)  # it saw d_1..d_{g-1}: a no-op when all g were accepted
        drafter_pending = ([drafts[-1]] if n == g else []) + [next_token]
        if next_token in eos:
            break

    emitted = emitted[:max_new_tokens]
    stats.new_tokens = len(emitted)
    stats.wall_time_s = time.perf_counter() - started
    return torch.tensor(emitted, dtype=torch.long, device=device), stats


@torch.inference_mode()
def target_generate(target, input_ids: torch.Tensor, max_new_tokens: int,
                    sampling: SamplingConfig = SamplingConfig(), eos_token_id=None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Plain autoregressive decoding with a KV cache and the same sampling: the speedup baseline."""
    from transformers import DynamicCache

    device = input_ids.device
    eos = eos_set(eos_token_id)
    stats = SpecStats.empty(0)
    started = time.perf_counter()
    cache, feed, emitted = DynamicCache(), input_ids[0].tolist(), []
    while len(emitted) < max_new_tokens:
        logits, cache = forward(target, feed, cache, device)
        stats.target_calls += 1
        token = sample_token(logits_to_probs(logits[-1], sampling), generator)
        emitted.append(token)
        feed = [token]
        if token in eos:
            break
    stats.new_tokens = len(emitted)
    stats.wall_time_s = time.perf_counter() - started
    return torch.tensor(emitted, dtype=torch.long, device=device), stats
