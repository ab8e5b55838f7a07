"""Lossless speculative decoding over EAGLE-2 draft trees (spec/tree.py) instead of chains.

One round, with the caches kept as in decoder.py (the target's holds all of `seq` but its last token):
  1. draft:  the drafting session grows a tree under the root seq[-1] (one drafter forward per depth);
  2. score:  ONE target forward over the root and every tree node, each node at position
             len(seq) - 1 + depth, seeing the committed prefix and its own ancestors (the first round
             feeds the prompt before the root through a plain causal forward);
  3. verify: recursive rejection sampling down the tree keeps a path of n nodes and draws one more
             token from the target;
  4. commit: the target's cache keeps the committed prefix and the path's entries (the other nodes'
             entries are dropped); an EAGLE-3 head gets the target's states for the same positions.
tau = new_tokens / target_calls and accept_length = 1 + accepted / verify_steps, as for chains; stats
count acceptance per depth (position i is proposed when the path reached depth i and the node there had
children), and a round whose tree is only the root (an EAGLE-3 head's prefill) is no verify step.
"""
from __future__ import annotations

import time

import torch

from .drafting import LMDrafting, start_drafting
from .kv import check_tree_capable, forward, forward_masked, keep_path, new_cache
from .metrics import SpecStats
from .sampling import SamplingConfig, logits_to_probs
from .sequence import check_input, cut_at_eos, eos_set
from .tree import TreeConfig, verify_tree, visibility_rows


@torch.inference_mode()
def tree_speculative_generate(
    target,
    drafter,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    tree: TreeConfig = TreeConfig(),
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Sample up to max_new_tokens from `target`, drafting trees with `drafter`; returns (new_tokens, stats).

    The output has exactly the target's distribution under `sampling` (identical tokens when greedy).
    """
    device = input_ids.device
    eos = eos_set(eos_token_id)
    seq = check_input(input_ids)
    prompt_len = len(seq)
    target_cache = new_cache(target)
    drafting = start_drafting(drafter, device)
    check_tree_capable(target, target_cache)  # before any compute, not at the first masked forward
    if isinstance(drafting, LMDrafting):
        check_tree_capable(drafter, drafting.cache)
    stats = SpecStats.empty(tree.depth)
    start = time.perf_counter()

    while len(seq) - prompt_len < max_new_tokens:
        # A round emits at most depth + 1 tokens: keep the tree within the budget.
        depth = min(tree.depth, max_new_tokens - (len(seq) - prompt_len) - 1)

        # 1. Draft a tree (only the root when the drafter cannot draft yet).
        draft = drafting.propose_tree(seq, tree, depth, sampling, generator, eos)
        nodes = list(range(1, len(draft)))

        # 2. Score the root and every node under the tree mask. Committed tokens before the root are
        #    only there in the first round (the prompt): they go through the plain causal forward first,
        #    as a dense mask over a long prompt would be quadratic in memory. One round, one verify.
        scored_from = target_cache.get_seq_length()
        prefix_hidden = None
        if len(seq) - scored_from > 1:
            prefix_hidden = forward(target, target_cache, seq[scored_from:-1], device, 1,
                                    drafting.target_hidden_indices)[1]
        root_sees = torch.cat([torch.ones(1, len(seq), dtype=torch.bool),
                               torch.zeros(1, len(nodes), dtype=torch.bool)], 1)
        visible = torch.cat([root_sees, visibility_rows(draft, [], nodes, len(seq))])  # the root is seq[-1]
        positions = [len(seq) - 1 + draft.depths[n] for n in [0] + nodes]
        logits, hidden = forward_masked(target, target_cache, [seq[-1]] + [draft.tokens[n] for n in nodes], positions,
                                        visible, device, len(draft), drafting.target_hidden_indices)
        if prefix_hidden is not None:
            hidden = torch.cat([prefix_hidden, hidden])
        p = logits_to_probs(logits, sampling)  # row 0: after the root; row n: after node n
        stats.target_calls += 1
        if any(q.shape[-1] != p.shape[-1] for q in draft.draft_probs.values()):
            raise ValueError(f"drafter vocab != target vocab {p.shape[-1]}")

        # 3. Verify: a path of accepted nodes, then one token from the target.
        path, next_token = verify_tree(draft, p, generator)
        stats.record_round(len(path) + bool(draft.children(path[-1] if path else 0)), len(path))
        stats.drafts_scored += draft.num_drafts
        emitted = [draft.tokens[n] for n in path] + [next_token]

        # 4. Commit, stopping right after the first eos.
        emitted, hit_eos = cut_at_eos(emitted, eos)
        committed_before = len(seq)
        seq += emitted
        stats.new_tokens += len(emitted)
        if hit_eos:
            break
        # Node n's entry sits n places after the root's (committed_before - 1), and so does its hidden row.
        keep_path(target_cache, committed_before, [committed_before - 1 + n for n in path])
        if hidden is not None:
            root_row = committed_before - 1 - scored_from
            hidden = torch.cat([hidden[: root_row + 1], hidden[[root_row + n for n in path]]])
        drafting.commit(seq, hidden, scored_from)

    stats.drafter_calls = drafting.calls
    stats.seconds = time.perf_counter() - start
    return torch.tensor(seq[prompt_len:], dtype=torch.long, device=device), stats
