"""Lossless speculative decoding with two KV caches, plus the plain autoregressive baseline.

One round:
  1. draft:  the drafter eats the tokens it has not seen yet, then proposes g tokens one at a time
             (each sampled from q = logits_to_probs(drafter logits)).
  2. score:  ONE target forward over [tokens it has not seen + g drafts] gives p_0..p_g.
  3. verify: exact rejection sampling keeps n drafts and appends one target-sampled token.
  4. commit: append the n drafts + next token; crop both caches back to the committed prefix.

Cache bookkeeping. `seq` is the committed sequence (prompt + emitted tokens); each cache holds the
keys/values of a prefix of the tokens that model has been fed. Invariant at the start of a round:
both caches hold only committed tokens, and the target's holds all of `seq` but the last token
(none at all in the first round: there is no separate target prefill). So each model is simply fed
seq[cache_len:] (+ drafts). After verify, everything up to and including the n accepted drafts is
committed, i.e. len(seq) - 1 tokens once the next token is appended:
  - target: it processed seq_old + d_1..d_g  -> crop to len(seq) - 1.
  - drafter: it processed seq_old + d_1..d_{g-1} -> crop to len(seq) - 1 if it holds more; when all g
    drafts were accepted it never saw d_g, so it is one short and is fed [d_g, next] next round.
Hence tau = new_tokens / target_calls exactly. The peers' accept length (metrics.py) counts only the
rounds that verified at least one draft: 1 + accepted / verify_steps.

Drafting lives in drafting.py (a session per call): a causal-LM drafter keeps the cache described
above; an EAGLE-3 head reads the target's hidden states instead, which the verify forward returns
and `commit` hands over for the committed positions. Its first round proposes nothing: the
target's first forward is then the prefill that gives the head its first features (a target call,
so in tau, but no verify step, so not in accept_length).
"""
from __future__ import annotations

import time

import torch

from .drafting import start_drafting
from .kv import forward, new_cache, rollback
from .metrics import SpecStats
from .sampling import SamplingConfig, logits_to_probs, sample_token
from .sequence import check_input, cut_at_eos, eos_set
from .tree import TreeConfig
from .tree_decoder import tree_speculative_generate
from .verify import verify


@torch.inference_mode()
def speculative_generate(
    target,
    drafter,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    gamma: int = 4,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    tree: TreeConfig | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Sample up to max_new_tokens from `target`, proposing with `drafter`; returns (new_tokens [n], stats).

    The output has exactly the target's distribution under `sampling` (identical tokens when greedy).
    Generation stops after max_new_tokens or right after an eos token. With `tree`, each round drafts
    an EAGLE-2 tree instead of a chain of gamma tokens (tree_decoder.py).
    """
    if tree is not None:
        return tree_speculative_generate(target, drafter, input_ids, max_new_tokens, tree, sampling, eos_token_id,
                                         generator)
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    device = input_ids.device
    eos = eos_set(eos_token_id)
    seq = check_input(input_ids)  # committed tokens: prompt + emitted
    prompt_len = len(seq)
    target_cache = new_cache(target)
    drafting = start_drafting(drafter, device)  # the drafter's own cache and state for this sequence
    stats = SpecStats.empty(gamma)
    start = time.perf_counter()

    while len(seq) - prompt_len < max_new_tokens:
        # A round emits at most g + 1 tokens: shrink g near the budget so no draft is wasted.
        g = min(gamma, max_new_tokens - (len(seq) - prompt_len) - 1)

        # 1. Draft g tokens (fewer if the drafter proposes eos: nothing after it could be kept).
        drafts, draft_probs = drafting.propose(seq, g, sampling, generator, eos)

        # 2. Score every draft plus one bonus position with a single target forward (with the hidden
        #    states an EAGLE-style drafter reads, when it asks for them).
        scored_from = target_cache.get_seq_length()
        feed = seq[scored_from:] + drafts
        logits, hidden = forward(target, target_cache, feed, device, len(drafts) + 1, drafting.target_hidden_indices)
        p = logits_to_probs(logits, sampling)
        stats.target_calls += 1
        q = torch.stack(draft_probs) if drafts else p.new_zeros((0, p.shape[-1]))
        if q.shape[-1] != p.shape[-1]:
            raise ValueError(f"drafter vocab {q.shape[-1]} != target vocab {p.shape[-1]}")

        # 3. Verify: keep n drafts, then one token drawn from the target (residual or bonus).
        n, next_token = verify(torch.tensor(drafts, dtype=torch.long), q, p, generator)
        stats.record_round(len(drafts), n)
        stats.drafts_scored += len(drafts)
        emitted = drafts[:n] + [next_token]

        # 4. Commit, stopping right after the first eos.
        emitted, hit_eos = cut_at_eos(emitted, eos)
        seq += emitted
        stats.new_tokens += len(emitted)
        if hit_eos:
            break
        rollback(target_cache, len(seq) - 1)
        drafting.commit(seq, hidden, scored_from)

    stats.drafter_calls = drafting.calls
    stats.seconds = time.perf_counter() - start
    return torch.tensor(seq[prompt_len:], dtype=torch.long, device=device), stats


@torch.inference_mode()
def target_generate(
    target,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Plain autoregressive decoding with a KV cache and the same sampling: the speedup baseline."""
    device = input_ids.device
    eos = eos_set(eos_token_id)
    feed = check_input(input_ids)
    cache = new_cache(target)
    stats = SpecStats.empty(0)
    new_tokens: list[int] = []
    start = time.perf_counter()
    while len(new_tokens) < max_new_tokens:
        p = logits_to_probs(forward(target, cache, feed, device, 1)[0][-1], sampling)
        stats.target_calls += 1
        token = sample_token(p, generator)
        new_tokens.append(token)
        if token in eos:
            break
        feed = [token]
    stats.new_tokens = len(new_tokens)
    stats.seconds = time.perf_counter() - start
    return torch.tensor(new_tokens, dtype=torch.long, device=device), stats
