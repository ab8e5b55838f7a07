"""OSD's rejected-position mask against the lossless decoder's own rejections (draftdistill/spec)."""
import pytest
import torch

from draftdistill.spec import SamplingConfig, decoder, logits_to_probs, speculative_generate, verify, verify_batch
from draftdistill.train.batching import pack, response_logits
from draftdistill.train.osd import rejected_mask
from tiny import make_llama


def test_greedy_mask_is_exactly_the_decoders_rejections(monkeypatch):
    """Temperature 0: served by speculative_generate (gamma 1, so every round verifies one draft at
    a known response position), the rounds that rejected are exactly the mask's positions."""
    target, drafter = make_llama(layers=2, seed=0), make_llama(layers=2, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # the target, perturbed: agrees often, not always
        for weight in drafter.parameters():
            weight.add_(torch.randn_like(weight) * 0.06)
    rounds = []  # (draft, accepted) per round, as the decoder verified them

    def recording_verify(drafts, q, p, generator=None):
        n, token = verify(drafts, q, p, generator)
        if len(drafts):
            rounds.append((int(drafts[0]), n))
        return n, token

    checked = rejected = 0
    for prompt in ([1, 5, 6, 7], [1, 9, 3], [1, 4, 4, 20, 11]):
        rounds.clear()
        monkeypatch.setattr(decoder, "verify", recording_verify)
        out, _ = speculative_generate(target, drafter, torch.tensor([prompt]), 24, gamma=1,
                                      sampling=SamplingConfig(temperature=0.0))
        monkeypatch.undo()
        batch = pack([prompt], [out.tolist()], pad_id=2)
        with torch.no_grad():
            student = response_logits(drafter, batch)
            mask = rejected_mask(student, response_logits(target, batch), batch.scored, None, 0.0)
        position = 0  # response position of each round's draft: +1 after a rejection, +2 after an acceptance
        for draft, accepted in rounds:
            assert draft == int(student[0, position].argmax())  # the same position the mask looks at
            assert bool(mask[0, position]) == (accepted == 0), (prompt, position)
            checked, rejected = checked + 1, rejected + (accepted == 0)
            position += 1 if accepted == 0 else 2
    assert checked >= 30 and 0 < rejected < checked  # both outcomes were exercised


def test_greedy_mask_matches_verify_and_breaks_ties_like_the_decoder():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    student[0, 0] = teacher[0, 0] = torch.tensor([0.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0])  # tie: both pick id 1
    teacher[1, 1] = student[1, 1]  # the same distribution: never rejected
    scored = torch.ones(2, 5, dtype=torch.bool)
    scored[1, 4] = False
    mask = rejected_mask(student, teacher, scored, None, 0.0)
    greedy = SamplingConfig(temperature=0.0)
    q, p = logits_to_probs(student, greedy), logits_to_probs(teacher, greedy)
    for b in range(2):
        for t in range(5):
            draft = torch.tensor([int(q[b, t].argmax())])  # the decoder's draft: sample_token of a one-hot q
            n, _ = verify(draft, q[b, t][None], torch.stack([p[b, t], p[b, t]]), torch.Generator().manual_seed(t))
            assert bool(mask[b, t]) == (scored[b, t] and n == 0), (b, t)
    assert not mask[0, 0] and not mask[1, 1] and not mask[1, 4] and mask.any()


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_sampled_mask_rejects_at_the_decoders_rate_and_not_at_another_temperatures(temperature):
    """T > 0: per position, the mask's rejection frequency equals the decoder's (drafts x ~ q_T,
    verify_batch's test against p_T). Negative control: a mask drawn at T = 1 (what the mask used
    to do whatever the serving temperature) misses the decoder's rate."""
    torch.manual_seed(3)
    student, teacher = torch.randn(1, 4, 6) * 2, torch.randn(1, 4, 6) * 2
    scored = torch.ones(1, 4, dtype=torch.bool)
    trials = 6000
    sampling = SamplingConfig(temperature=temperature)
    q, p = logits_to_probs(student[0], sampling), logits_to_probs(teacher[0], sampling)  # [4, V]
    g = torch.Generator().manual_seed(0)
    decoder_rate = []
    for t in range(4):
        drafts = torch.multinomial(q[t], trials, replacement=True, generator=g)[:, None]  # sample_token's draw
        n, _ = verify_batch(drafts, q[t].expand(trials, 1, -1), p[t].expand(trials, 2, -1), g)
        decoder_rate.append((n == 0).double().mean())
    decoder_rate = torch.stack(decoder_rate).float()

    def mask_rate(at):  # `trials` rows of the same positions in one call
        def rows(x):
            return x.expand(trials, *x.shape[1:])

        mask = rejected_mask(rows(student), rows(teacher), rows(scored), torch.Generator().manual_seed(1), at)
        return mask.float().mean(0)

    torch.testing.assert_close(mask_rate(temperature), decoder_rate, atol=0.03, rtol=0)
    wrong = mask_rate(1.0 if temperature != 1.0 else 0.5)
    assert (wrong - decoder_rate).abs().max() > 0.1, (wrong, decoder_rate)


def test_row_streams_draw_each_row_as_on_its_own():
    """A list of one generator per row: each row's mask depends only on its own stream (the
    trainer's row streams, the same draws on any world size)."""
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 8, 5), torch.randn(3, 8, 5)
    scored = torch.ones(3, 8, dtype=torch.bool)
    together = rejected_mask(student, teacher, scored, [torch.Generator().manual_seed(10 + r) for r in range(3)], 0.8)
    for r in range(3):
        alone = rejected_mask(student[r: r + 1], teacher[r: r + 1], scored[r: r + 1],
                              [torch.Generator().manual_seed(10 + r)], 0.8)
        assert torch.equal(together[r], alone[0])
    with pytest.raises(ValueError, match="generator"):
        rejected_mask(student, teacher, scored, None, 0.8)


def test_online_distiller_masks_each_request_at_the_temperature_it_was_served_at():
    from draftdistill.serving.backend import FinishedRequest
    from draftdistill.serving.online import served_temperature

    def request(meta):
        return FinishedRequest("r", [1], [2], meta=meta)

    assert served_temperature(request({"temperature": 0.0, "top_p": 1.0}), 1.0) == 0.0  # the embedded server
    assert served_temperature(request({"sampling_params": {"temperature": 0.6}}), 1.0) == 0.6  # SGLang's log
    assert served_temperature(request({"sampling_params": {"temperature": 0.6, "top_k": 1}}), 1.0) == 0.0
    assert served_temperature(request({"sampling_params": {}}), 0.7) == 0.7  # OnlineConfig.temperature
    assert served_temperature(request({}), 0.0) == 0.0
