"""draftdistill/models/draft_vocab.py: the reduced draft vocabulary and its d2t/t2d maps."""
from collections import Counter

import pytest
import torch

from draftdistill.models.draft_vocab import DraftVocab


def test_top_n_by_frequency_sorted_with_offset_d2t_and_mask_t2d():
    # counts: 7 x5, 3 x4, 9 x4, 1 x2, 0 x1 -> the top 3 are {7, 3, 9}
    seqs = [[7, 7, 3, 9, 1], [7, 3, 3, 9, 9, 0], [7, 7, 3, 9, 1]]
    vocab = DraftVocab.from_token_ids(seqs, size=3, target_vocab_size=12)
    assert vocab.draft_ids.tolist() == [3, 7, 9]  # ascending target ids, as SpecForge sorts them
    assert vocab.d2t.tolist() == [3, 6, 7] and vocab.d2t.dtype == torch.int64  # target = i + d2t[i]
    assert (vocab.d2t + torch.arange(3)).tolist() == [3, 7, 9]  # SGLang: hot_token_id = d2t + arange
    assert vocab.t2d.dtype == torch.bool and vocab.t2d.nonzero().flatten().tolist() == [3, 7, 9]
    assert len(vocab.t2d) == 12
    # a tie at the cut goes to the lower id: 1 (x2) vs 4 (x2) for the last slot
    tie = DraftVocab.from_counts(Counter({5: 9, 4: 2, 1: 2}), size=2, target_vocab_size=8)
    assert tie.draft_ids.tolist() == [1, 5]


def test_masks_always_include_and_filling():
    seqs = [torch.tensor([4, 4, 4, 6, 6, 2])]
    masks = [torch.tensor([0, 0, 0, 1, 1, 1])]  # only the response (6, 6, 2) counts
    assert DraftVocab.from_token_ids(seqs, 2, 10, masks=masks).draft_ids.tolist() == [2, 6]
    # eos forced in even though never seen; then the most frequent
    assert DraftVocab.from_token_ids(seqs, 2, 10, always_include=[9]).draft_ids.tolist() == [4, 9]
    # fewer distinct tokens than the size: filled with the lowest unused ids
    assert DraftVocab.from_token_ids(seqs, 5, 10).draft_ids.tolist() == [0, 1, 2, 4, 6]
    assert DraftVocab.full(4).draft_ids.tolist() == [0, 1, 2, 3] and DraftVocab.full(4).d2t.tolist() == [0] * 4
    with pytest.raises(ValueError):
        DraftVocab([3, 3], 10)
    with pytest.raises(ValueError):
        DraftVocab([2, 10], 10)
    with pytest.raises(ValueError):
        DraftVocab.from_token_ids(seqs, 11, 10)


def test_mapping_both_ways_and_round_trip_through_d2t():
    vocab = DraftVocab([1, 4, 5, 8], 10)
    target = torch.tensor([[8, 0, 4], [1, 5, 9]])
    assert vocab.target_to_draft(target).tolist() == [[3, -1, 1], [0, 2, -1]]
    assert vocab.contains(target).tolist() == [[True, False, True], [True, True, False]]
    assert vocab.draft_to_target(torch.tensor([0, 3, 2])).tolist() == [1, 8, 5]
    assert DraftVocab.from_d2t(vocab.d2t, 10) == vocab


def test_to_target_logits_gives_zero_probability_outside_the_draft_vocab():
    vocab = DraftVocab([1, 4, 5], 7)
    draft_logits = torch.tensor([[0.5, 2.0, -1.0], [1.0, 1.0, 1.0]])
    full = vocab.to_target_logits(draft_logits)
    assert full.shape == (2, 7)
    probs = full.softmax(-1)
    assert probs[:, [0, 2, 3, 6]].eq(0).all()  # exactly zero, not merely small
    torch.testing.assert_close(probs[:, [1, 4, 5]], draft_logits.softmax(-1))
    assert full.argmax(-1).tolist() == [4, 1]


def test_specforge_teacher_and_position_mask():
    """SpecForge (specforge/core/eagle3.py, _compute_target_p): teacher = softmax of the target's
    logits on the draft vocab; a position counts only if the target's argmax is in the draft vocab."""
    vocab = DraftVocab([0, 2, 3], 5)
    target_logits = torch.tensor([[3.0, 0.0, 1.0, 2.0, 0.5],   # argmax 0: in
                                  [0.0, 5.0, 1.0, 2.0, 0.5],   # argmax 1: out -> masked
                                  [0.0, 0.1, 0.2, 0.3, 4.0]])  # argmax 4: out -> masked
    teacher = vocab.restrict_logits(target_logits).softmax(-1)
    torch.testing.assert_close(teacher, target_logits[:, [0, 2, 3]].softmax(-1))
    assert vocab.loss_mask(target_logits).tolist() == [True, False, False]
    assert vocab.loss_mask(target_logits, torch.tensor([0, 1, 1])).tolist() == [False, False, False]
