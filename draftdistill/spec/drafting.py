"""How the decoder gets its drafts: one small protocol, two implementations.

A drafting session lives for one `speculative_generate` call:
  propose(seq, g, ...) -> g (or fewer) chain drafts, each with the q it was sampled from;
  propose_tree(seq, tree_cfg, depth, ...) -> an EAGLE-2 draft tree (spec/tree.py) instead of a
      chain; the session leaves its caches holding committed tokens only, as after a chain;
  commit(seq, hidden, start) -> after verify: `seq` is the committed sequence; `hidden` holds the
      target's hidden states (the `target_hidden_indices` entries of output_hidden_states,
      concatenated) for positions start, start+1, ... of its verify forward, or None when the
      session asked for none. Rows beyond len(seq) - 2 belong to rejected drafts (or to the last
      committed token, whose successor is not known yet) and must be ignored.

- `LMDrafting`: a causal LM called as model(input_ids, past_key_values, use_cache) -> .logits (HF
  models, the pruned/small drafters) with its own KV cache; it needs no target hidden states.
- `Eagle3Drafting`: the EAGLE-3 head. Position t of its prefix is fed (token x_{t+1}, target aux
  states at t), so it can only draft once the target has run over the prompt: the first round
  proposes nothing and its target forward is the prefill.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .kv import forward, forward_masked, new_cache, rollback
from .sampling import SamplingConfig, logits_to_probs, sample_token
from .tree import DraftTree, TreeConfig, grow_tree, visibility_rows


class Drafting(Protocol):
    target_hidden_indices: list[int]  # empty: the decoder asks the target for no hidden states
    calls: int  # drafter forwards so far

    def propose(self, seq: list[int], g: int, sampling: SamplingConfig, generator, eos: set[int]
                ) -> tuple[list[int], list[torch.Tensor]]: ...

    def propose_tree(self, seq: list[int], tree_cfg: TreeConfig, depth: int, sampling: SamplingConfig, generator,
                     eos: set[int]) -> DraftTree: ...

    def commit(self, seq: list[int], hidden: torch.Tensor | None, start: int) -> None: ...


def start_drafting(drafter, device) -> Drafting:
    """The session for `drafter`: an EAGLE-3 head, or anything callable like a causal LM."""
    from draftdistill.models.eagle3 import Eagle3Head

    if isinstance(drafter, Eagle3Head):
        return Eagle3Drafting(drafter, device)
    return LMDrafting(drafter, device)


class LMDrafting:
    """Chain drafting with a causal LM and its own DynamicCache (see decoder.py for the bookkeeping)."""

    target_hidden_indices: list[int] = []

    def __init__(self, model, device):
        self.model, self.device, self.calls = model, device, 0
        self.cache = new_cache(model)

    def propose(self, seq, g, sampling, generator, eos):
        drafts, probs = [], []
        feed = seq[self.cache.get_seq_length():]
        for _ in range(g):
            q = logits_to_probs(forward(self.model, self.cache, feed, self.device, 1)[0][-1], sampling)
            self.calls += 1
            token = sample_token(q, generator)
            drafts.append(token)
            probs.append(q)
            if token in eos:  # nothing after eos could be kept
                break
            feed = [token]
        return drafts, probs

    def propose_tree(self, seq, tree_cfg, depth, sampling, generator, eos):
        if depth == 0:
            return DraftTree.root(seq[-1])
        root_logits = forward(self.model, self.cache, seq[self.cache.get_seq_length():], self.device, 1)[0][-1]
        self.calls += 1
        committed, fed = len(seq), []  # the cache holds seq, then the `fed` tree nodes in feed order

        def expand(tree, nodes):
            visible = visibility_rows(tree, fed, nodes, committed)
            positions = [committed - 1 + tree.depths[n] for n in nodes]  # the root is seq[-1]
            logits = forward_masked(self.model, self.cache, [tree.tokens[n] for n in nodes], positions, visible,
                                    self.device, len(nodes))[0]
            fed.extend(nodes)
            self.calls += 1
            return logits

        tree = grow_tree(seq[-1], root_logits, expand, tree_cfg, depth, sampling, generator, eos)
        rollback(self.cache, committed)  # the tree's entries go; seq stays committed whatever is accepted
        return tree

    def commit(self, seq, hidden, start):
        # It saw seq_old + d_1..d_{g-1}: keep only committed tokens (one short if all were accepted).
        rollback(self.cache, len(seq) - 1)


class Eagle3Drafting:
    """Chain drafting with an EAGLE-3 head.

    The head's cache prefix holds positions 0..P-1, each fed with target features; `pending` holds
    the target's aux rows of committed positions P, P+1, ... not fed yet. A round feeds them (step 0,
    one forward; the last position predicts the first draft), then walks the chain on its own
    states (steps 1..g-1, one position each), then drops the chain: next round the accepted drafts
    come back as prefix positions with the target's real features.
    """

    def __init__(self, head, device):
        self.head, self.device, self.calls = head, device, 0
        self.vocab = head.vocab
        self.target_hidden_indices = head.target_hidden_indices
        self.cache = head.new_cache()
        self.pending: torch.Tensor | None = None  # [n, K * H] aux rows for positions P .. P + n - 1

    def propose(self, seq, g, sampling, generator, eos):
        if g == 0 or self.pending is None:
            return [], []
        logits, h = self._feed_pending(seq)
        drafts, probs = [], []
        for step in range(1, g + 1):
            q = logits_to_probs(self.vocab.to_target_logits(logits[0, -1]), sampling)  # q = 0 off the draft vocab
            token = sample_token(q, generator)
            drafts.append(token)
            probs.append(q)
            if token in eos or step == g:
                break
            logits, h = self.head(torch.tensor([[token]], device=self.device), h[:, -1:], self.cache, step=step)
            self.calls += 1
        self.cache.end_chain()
        return drafts, probs

    def _feed_pending(self, seq):
        """Step 0: the committed positions not fed yet, one forward; its last row drafts the first token."""
        P = self.cache.length
        ids = torch.tensor([seq[P + 1: P + 1 + self.pending.shape[0]]], device=self.device)
        assert ids.shape[1] == self.pending.shape[0] == len(seq) - 1 - P, "aux rows out of step with seq"
        logits, h = self.head(ids, self.head.fuse(self.pending[None]), self.cache, step=0, num_logits=1)
        self.pending = None
        self.calls += 1
        return logits, h

    def propose_tree(self, seq, tree_cfg, depth, sampling, generator, eos):
        if depth == 0 or self.pending is None:
            return DraftTree.root(seq[-1])
        logits, h = self._feed_pending(seq)
        P, fed = self.cache.length, []
        states = {0: h[0, -1]}  # node -> the head's state after it, which its children are drafted from

        def expand(tree, nodes):
            visible = visibility_rows(tree, fed, nodes, 0)  # tree entries only: the prefix is always seen
            logits, h = self.head.tree_step(
                torch.tensor([[tree.tokens[n] for n in nodes]], device=self.device),
                torch.stack([states[tree.parents[n]] for n in nodes])[None],
                [P - 1 + tree.depths[n] for n in nodes], visible, self.cache)
            states.update({n: h[0, i] for i, n in enumerate(nodes)})
            fed.extend(nodes)
            self.calls += 1
            return self.vocab.to_target_logits(logits[0])

        tree = grow_tree(seq[-1], self.vocab.to_target_logits(logits[0, -1]), expand, tree_cfg, depth, sampling,
                         generator, eos)
        self.cache.end_chain()
        return tree

    def commit(self, seq, hidden, start):
        rows = hidden[: len(seq) - 1 - start]  # committed positions whose next token is committed too
        expected = self.cache.length + (0 if self.pending is None else self.pending.shape[0])
        assert start == expected, f"target rows start at {start}, the head expects position {expected}"
        self.pending = rows if self.pending is None else torch.cat([self.pending, rows])
