"""OPD's importance ratio is taken under ONE distribution: the student's loss distribution.

The sampler records each sampled token's log-prob under log_softmax(logits / loss_temperature) (no
top-p), so while the weights are unchanged every ratio is 1 and the PPO clip takes no token's
gradient, whatever the rollout's temperature, top-p or greedy decoding; a real weight change
still moves the ratio (the stale-weights correction). Before, the ratio compared the rollout's
sampling distribution with the loss distribution and the clip zeroed most tokens' gradient.
"""
import copy
from types import SimpleNamespace

import pytest
import torch

from draftdistill.opd import LocalSampler, LocalScorer, Micro, SGLangSampler, build_objective
from draftdistill.opd.objectives import check_importance_sampling
from draftdistill.opd.rollout import Completion, old_logprobs
from draftdistill.train.batching import pack, response_logits
from tiny import make_llama

PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 4, 4, 20], [1, 11, 3], [1, 8, 8, 8, 9], [1, 30], [1, 12, 13], [1, 7, 6]]
CASES = {"top_p 0.6": dict(temperature=1.0, top_p=0.6, loss_temperature=1.0),
         "rollout T 0.5, loss T 1": dict(temperature=0.5, top_p=1.0, loss_temperature=1.0),
         "greedy": dict(temperature=0.0, top_p=1.0, loss_temperature=1.0),
         "rollout T 1, loss T 0.7, top_p 0.8": dict(temperature=1.0, top_p=0.8, loss_temperature=0.7)}


@pytest.fixture(scope="module")
def models():
    return make_llama(layers=1, seed=1), make_llama(layers=2, seed=0)


def rollouts(student, case, seed=0):
    sampler = LocalSampler(student, eos_ids=[2], pad_id=2, **case)
    return sampler.sample(PROMPTS, 12, torch.Generator().manual_seed(seed))


def opd_step(student, teacher, completions, loss_temperature, logprobs):
    """Per-token importance ratios and which loss tokens got no gradient under opd:clip=0.2."""
    responses = [c.tokens for c in completions]
    batch = pack(PROMPTS, responses, 2)
    scores = LocalScorer(teacher, 2).score(PROMPTS, responses, set(), 1, loss_temperature)
    old = old_logprobs(logprobs, [True] * len(PROMPTS), batch.scored.shape)
    micro = Micro(batch, batch.scored, scores, old_logprobs=old, sampled=torch.ones(len(PROMPTS), dtype=torch.bool))
    logits = response_logits(student, batch)
    loss, _ = build_objective("opd:clip=0.2").fn(logits, micro, loss_temperature)
    (grad,) = torch.autograd.grad(torch.where(micro.mask, loss, 0.0).sum(), logits)
    logq = torch.log_softmax(logits.detach().float() / loss_temperature, -1).gather(
        -1, batch.targets[..., None])[..., 0]
    ratio = torch.where(micro.mask, (logq - old.nan_to_num()).exp(), 1.0)
    no_gradient = micro.mask & (grad.abs().sum(-1) == 0)
    return ratio, no_gradient, micro.mask


@pytest.mark.parametrize("case", list(CASES))
def test_on_policy_every_ratio_is_one_and_no_token_is_clipped(models, case):
    student, teacher = models
    completions = rollouts(student, CASES[case])
    loss_t = CASES[case]["loss_temperature"]
    ratio, no_gradient, mask = opd_step(student, teacher, completions, loss_t, [c.loss_logprobs for c in completions])
    assert int(mask.sum()) >= 60
    assert (ratio[mask] - 1).abs().max() < 1e-5  # 1 up to the KV-cache vs full-forward float noise (~2e-7)
    assert int(no_gradient.sum()) == 0
    # Control: what the ratio used to compare against (the sampling distribution's log-probs) clips tokens.
    _, old_way, _ = opd_step(student, teacher, completions, loss_t, [c.logprobs for c in completions])
    assert int(old_way.sum()) > 0


def test_a_real_weight_change_still_moves_the_ratio_and_clips(models):
    """Rollouts from the old weights, the loss with weights a few optimizer steps on (stale server
    weights): ratios are q_new / q_old under the loss distribution, off 1, and the clip acts on
    tokens the steps already pushed past 1 +- clip."""
    student, teacher = models
    completions = rollouts(student, CASES["top_p 0.6"])
    responses = [c.tokens for c in completions]
    batch = pack(PROMPTS, responses, 2)
    micro = Micro(batch, batch.scored, LocalScorer(teacher, 2).score(PROMPTS, responses, set(), 1, 1.0),
                  old_logprobs=old_logprobs([c.loss_logprobs for c in completions], [True] * len(PROMPTS),
                                            batch.scored.shape))
    moved, objective = copy.deepcopy(student), build_objective("opd:clip=0.2")
    optimizer = torch.optim.Adam(moved.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss, _ = objective.fn(response_logits(moved, batch), micro, 1.0)
        torch.where(micro.mask, loss, 0.0).sum().backward()
        optimizer.step()
    ratio, no_gradient, mask = opd_step(moved, teacher, completions, 1.0, [c.loss_logprobs for c in completions])
    assert (ratio[mask] - 1).abs().max() > 0.25
    assert int(no_gradient.sum()) > 0
    # The ratio is exactly the weight change's: q_new(y) / q_old(y) at the loss temperature.
    batch = pack(PROMPTS, [c.tokens for c in completions], 2)
    with torch.no_grad():
        new, old = (torch.log_softmax(response_logits(m, batch), -1).gather(-1, batch.targets[..., None])[..., 0]
                    for m in (moved, student))
    torch.testing.assert_close(ratio[mask], (new - old).exp()[mask], atol=1e-4, rtol=1e-4)


def test_sampler_records_both_distributions(models):
    student, _ = models
    (c,) = LocalSampler(student, [2], 2, temperature=0.5, top_p=0.6, loss_temperature=0.8).sample(
        [PROMPTS[0]], 6, torch.Generator().manual_seed(0))
    batch = pack([PROMPTS[0]], [c.tokens], 2)
    with torch.no_grad():
        logits = response_logits(student, batch)[0, : len(c.tokens)]
    want = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(c.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(c.loss_logprobs), want, atol=1e-4, rtol=0)
    assert len(c.logprobs) == len(c.loss_logprobs) == len(c.tokens)


def test_a_sampled_row_without_loss_logprobs_is_refused():
    old = old_logprobs([[-1.0, -2.0], None], [True, False], (2, 3))
    assert old[0, :2].tolist() == [-1.0, -2.0] and torch.isnan(old[0, 2]) and torch.isnan(old[1]).all()
    with pytest.raises(ValueError, match="loss distribution"):
        old_logprobs([None], [True], (1, 2))


class _Rollouts:
    def rollout(self, prompt, **kw):
        return SimpleNamespace(output_ids=[5, 2], logprobs=[-0.5, -1.5], weight_version=None)


@pytest.mark.parametrize("temperature,top_p,loss_temperature,usable", [
    (0.7, 1.0, 0.7, True), (1.0, 0.6, 1.0, True),  # SGLang's log-probs are taken before top-p
    (0.0, 1.0, 1.0, True),  # greedy: log-probs of the raw logits
    (0.5, 1.0, 1.0, False), (0.0, 1.0, 0.5, False)])
def test_server_rollouts_give_loss_logprobs_only_at_the_loss_temperature(temperature, top_p, loss_temperature,
                                                                         usable):
    sampler = SGLangSampler("http://stub:1", eos_ids=[2], temperature=temperature, top_p=top_p,
                            loss_temperature=loss_temperature)
    sampler.pool = SimpleNamespace(call=lambda row, fn, failover=True: fn(_Rollouts()))
    (c,) = sampler.sample([[1, 4]], 4, torch.Generator().manual_seed(0))
    assert c.logprobs == [-0.5, -1.5] and c.finished
    assert c.loss_logprobs == ([-0.5, -1.5] if usable else None)
    check = dict(rollout_server=True, rollout_temperature=temperature, loss_temperature=loss_temperature)
    if usable:
        check_importance_sampling("opd:clip=0.2", **check)
    else:
        with pytest.raises(ValueError, match="rollout_temperature"):
            check_importance_sampling("opd:clip=0.2", **check)


def test_check_importance_sampling_refuses_only_what_cannot_be_had():
    bad = dict(rollout_server=True, rollout_temperature=0.5, loss_temperature=1.0)
    for objective in ("opd", "minillm:gamma=0.9", "aopd:k=4"):
        with pytest.raises(ValueError, match="importance_sampling=false"):
            check_importance_sampling(objective, **bad)
    with pytest.raises(ValueError, match="loss_temperature=1"):
        check_importance_sampling("divergence", reward_weight=0.5, **bad)  # the reward term is importance-sampled
    check_importance_sampling("divergence", **bad)  # reads no sampler log-probs
    check_importance_sampling("entropy_switch", **bad)
    check_importance_sampling("opd:importance_sampling=false", **bad)
    check_importance_sampling("opd", importance_sampling=False, **bad)
    # In-process rollouts record loss-distribution log-probs at any rollout setting.
    check_importance_sampling("opd", rollout_server=False, rollout_temperature=0.0, loss_temperature=0.5)


def test_completion_defaults_keep_old_samplers_constructible():
    c = Completion([5], [-0.1])
    assert c.loss_logprobs is None and not c.finished
