"""The reduced draft vocabulary of an EAGLE-3 head: which target tokens the head can propose.

An EAGLE-3 head's lm_head covers only the N target tokens seen most often in training text (32k of
Llama-3's 128k), which makes the head's output layer 4x cheaper. Draft id i stands for target id
``draft_ids[i]``; draft ids follow ascending target ids, as in SpecForge
(specforge/data/preprocessing.py, process_token_dict_to_mappings). Checkpoints store the map as
  d2t[i] = draft_ids[i] - i          int64 [N]  (an offset: target id = i + d2t[i])
  t2d[v] = v is in the draft vocab   bool  [V]
which is what SGLang (models/llama_eagle3.py: hot_token_id = d2t + arange) and vLLM
(Eagle3LlamaForCausalLM.compute_logits: targets = arange + draft_id_to_target_id) read.

Target tokens outside the draft vocabulary
- Decoding: the head's probability of such a token is exactly 0 (``to_target_logits`` puts -inf
  there). Speculative sampling stays lossless for any q, including one that is zero on part of the
  vocabulary: such a token is never drafted, and after a rejection the residual max(0, p - q)
  equals p there, so the target still emits it with its own probability. Acceptance is bounded by
  the target's mass on the draft vocabulary: alpha = sum_{v in draft} min(p(v), q(v)).
- Training, as SpecForge does it (specforge/core/eagle3.py, _compute_target_p): a position is
  dropped from the loss when the target's most likely next token is outside the draft vocabulary
  (``position_mask = loss_mask * t2d[argmax target_logits]``), and the teacher distribution is the
  target's softmax over the draft-vocab logits only, i.e. renormalised on the draft vocabulary
  (``softmax(target_logits[..., t2d])``). ``restrict_logits`` and ``loss_mask`` give exactly those
  two tensors. An acceptance-optimal loss (TVD, -log alpha) may rather compare q with p restricted
  to the draft vocabulary without renormalising, since that is what alpha above measures.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch


class DraftVocab:
    """A sorted set of target token ids; draft id i <-> target id ``draft_ids[i]``. The maps live on
    the device of `draft_ids` (a head's buffers: no host copy per decoding step)."""

    def __init__(self, draft_ids: torch.Tensor | list[int], target_vocab_size: int):
        ids = torch.as_tensor(draft_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("a draft vocabulary needs at least one token")
        if not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("draft ids must be strictly increasing target ids (sorted, no repeats)")
        if int(ids[0]) < 0 or int(ids[-1]) >= target_vocab_size:
            raise ValueError(f"draft ids must lie in [0, {target_vocab_size}), got {int(ids[0])}..{int(ids[-1])}")
        self.draft_ids = ids
        self.target_vocab_size = int(target_vocab_size)

    def __len__(self) -> int:
        return self.draft_ids.numel()

    def __eq__(self, other) -> bool:
        return (isinstance(other, DraftVocab) and self.target_vocab_size == other.target_vocab_size
                and torch.equal(self.draft_ids.cpu(), other.draft_ids.cpu()))

    # ---- construction ----
    @classmethod
    def full(cls, target_vocab_size: int) -> "DraftVocab":
        """The identity map: the head drafts over the whole target vocabulary."""
        return cls(torch.arange(target_vocab_size), target_vocab_size)

    @classmethod
    def from_d2t(cls, d2t: torch.Tensor, target_vocab_size: int) -> "DraftVocab":
        d2t = torch.as_tensor(d2t, dtype=torch.long)
        return cls(d2t + torch.arange(d2t.numel(), device=d2t.device), target_vocab_size)

    @classmethod
    def from_counts(cls, counts: Counter, size: int, target_vocab_size: int,
                    always_include: Iterable[int] = ()) -> "DraftVocab":
        """The `size` most frequent ids of `counts` (ties: the lower id first), plus `always_include`
        (e.g. eos, so the head can propose the end of an answer); filled with the lowest unseen ids
        when fewer distinct tokens were seen."""
        if not 1 <= size <= target_vocab_size:
            raise ValueError(f"draft vocab size must be in [1, {target_vocab_size}], got {size}")
        forced = sorted({int(t) for t in always_include})
        if len(forced) > size:
            raise ValueError(f"always_include has {len(forced)} ids, more than the draft vocab size {size}")
        chosen = set(forced)
        for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(chosen) == size:
                break
            if not 0 <= token < target_vocab_size:
                raise ValueError(f"token id {token} outside the target vocabulary [0, {target_vocab_size})")
            chosen.add(int(token))
        filler = iter(range(target_vocab_size))
        while len(chosen) < size:
            chosen.add(next(filler))
        return cls(sorted(chosen), target_vocab_size)

    @classmethod
    def from_token_ids(cls, sequences: Iterable, size: int, target_vocab_size: int,
                       masks: Iterable | None = None, always_include: Iterable[int] = ()) -> "DraftVocab":
        """Count token ids over `sequences` (lists or 1-D tensors of target ids: tokenized prompts and
        responses). With `masks`, only positions where the mask is true count (SpecForge counts the
        assistant tokens only, i.e. its loss mask)."""
        counts: Counter = Counter()
        masks = iter(masks) if masks is not None else None
        for seq in sequences:
            ids = torch.as_tensor(seq, dtype=torch.long).flatten()
            if masks is not None:
                ids = ids[torch.as_tensor(next(masks), dtype=torch.bool).flatten()]
            values, n = ids.unique(return_counts=True)
            counts.update(dict(zip(values.tolist(), n.tolist())))
        return cls.from_counts(counts, size, target_vocab_size, always_include)

    # ---- the two checkpoint tensors ----
    @property
    def d2t(self) -> torch.Tensor:
        """int64 [N]: target id minus draft id (the offset form SGLang and vLLM load)."""
        return self.draft_ids - torch.arange(len(self), device=self.draft_ids.device)

    @property
    def t2d(self) -> torch.Tensor:
        """bool [V]: which target ids are in the draft vocabulary."""
        mask = torch.zeros(self.target_vocab_size, dtype=torch.bool, device=self.draft_ids.device)
        mask[self.draft_ids] = True
        return mask

    # ---- mapping ----
    def target_to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of `target_ids` (any shape); -1 where a token is outside the draft vocabulary."""
        lookup = torch.full((self.target_vocab_size,), -1, dtype=torch.long, device=self.draft_ids.device)
        lookup[self.draft_ids] = torch.arange(len(self), device=self.draft_ids.device)
        return lookup.to(target_ids.device)[target_ids]

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.draft_ids.to(draft_ids.device)[draft_ids]

    def contains(self, target_ids: torch.Tensor) -> torch.Tensor:
        return self.t2d.to(target_ids.device)[target_ids]

    def to_target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """[..., N] draft logits -> [..., V] target logits, -inf outside the draft vocabulary, so any
        softmax/top-p/argmax over them gives those tokens probability exactly 0."""
        out = draft_logits.new_full((*draft_logits.shape[:-1], self.target_vocab_size), float("-inf"))
        out[..., self.draft_ids.to(draft_logits.device)] = draft_logits
        return out

    def restrict_logits(self, target_logits: torch.Tensor) -> torch.Tensor:
        """[..., V] -> [..., N]: the target's logits on the draft vocabulary (SpecForge's teacher is
        their softmax, i.e. the target renormalised on the draft vocabulary)."""
        return target_logits[..., self.draft_ids.to(target_logits.device)]

    def loss_mask(self, target_logits: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """SpecForge's position mask: keep a position only if the target's argmax is in the draft vocab."""
        keep = self.contains(target_logits.argmax(-1))
        return keep if loss_mask is None else keep & loss_mask.bool()
