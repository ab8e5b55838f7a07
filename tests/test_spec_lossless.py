"""The speculative decoder is lossless: greedy outputs equal the target's, and sampled outputs follow
the target's distribution exactly, whatever the drafter (good, random or adversarial)."""
import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from draftdistill.spec import SamplingConfig, logits_to_probs, speculative_generate, target_generate, verify


def llama(vocab, seed, layers=1, hidden=16, init=0.02):
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         initializer_range=init, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


class Adversarial(torch.nn.Module):
    """A real model (real KV cache) whose logits are flipped: it favours what the target avoids."""

    def __init__(self, model, scale=-4.0):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = out.logits * self.scale
        return out


def greedy_reference(target, ids, n):
    with torch.inference_mode():
        out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=1)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def greedy_models():
    target = llama(32, seed=0, layers=2, hidden=32, init=0.2)
    other = llama(32, seed=1, layers=1, hidden=32, init=0.2)
    return target, {"self": target, "random": other, "adversarial": Adversarial(target)}


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("drafter_name", ["self", "random", "adversarial"])
def test_greedy_output_equals_target_greedy(greedy_models, drafter_name, gamma):
    target, drafters = greedy_models
    ids = torch.tensor([[0, 5, 9, 13, 2]])
    n = 23  # not a multiple of gamma + 1: the last block is cut by the budget
    expected = greedy_reference(target, ids, n)
    ours, stats = speculative_generate(target, drafters[drafter_name], ids, n, gamma=gamma)
    assert ours.tolist() == expected
    plain, _ = target_generate(target, ids, n)
    assert plain.tolist() == expected
    assert stats.new_tokens == n and sum(stats.accepted) + stats.target_calls == n
    assert all(0.0 <= a <= 1.0 for a in stats.alpha_per_position if a == a)
    if drafter_name == "adversarial":
        assert stats.alpha < 0.5 and stats.target_calls > n / 2  # many rejections and cache rollbacks


def test_greedy_stops_right_after_eos(greedy_models):
    target, drafters = greedy_models
    ids = torch.tensor([[0, 5, 9, 13, 2]])
    full = greedy_reference(target, ids, 20)
    eos = full[7]
    expected = full[: full.index(eos) + 1]
    for drafter in drafters.values():
        ours, _ = speculative_generate(target, drafter, ids, 20, gamma=3, eos_token_id=[eos])
        assert ours.tolist() == expected


def test_target_as_drafter_accepts_everything(greedy_models):
    target, _ = greedy_models
    ids = torch.tensor([[0, 3, 4]])
    tokens, stats = speculative_generate(target, target, ids, 20, gamma=4)
    assert stats.alpha_per_position == [1.0] * 4
    assert stats.target_calls == 4 and stats.tau == 5.0 and len(tokens) == 20


def exact_sequence_probs(target, prompt, length, sampling):
    """Enumerate every continuation of `length` tokens with the target's own sampling distribution."""
    vocab = target.config.vocab_size
    probs = {}
    with torch.inference_mode():
        for seq in itertools.product(range(vocab), repeat=length):
            ids = torch.tensor([prompt + list(seq[:-1])])
            p = logits_to_probs(target(ids).logits[0, len(prompt) - 1:], sampling)
            probs[seq] = float(torch.prod(p[torch.arange(length), torch.tensor(seq)]))
    return probs


def chi_square_pvalue(counts, expected_probs, n):
    """Chi-square goodness of fit, pooling cells with expected count < 5 into one."""
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for seq, p in expected_probs.items():
        if p * n >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(seq, 0)
            pool_e += p * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    total = sum(exp)
    return chisquare(obs, [e * n / total for e in exp]).pvalue  # float32 rounding of the exact sum


@pytest.mark.parametrize("drafter_name, sampling, gamma", [
    ("self", SamplingConfig(temperature=1.0), 2),
    ("random", SamplingConfig(temperature=1.0), 2),
    ("adversarial", SamplingConfig(temperature=1.0), 2),
    ("adversarial", SamplingConfig(temperature=0.7, top_p=0.8), 1),
])
def test_sampled_output_follows_target_distribution(drafter_name, sampling, gamma):
    vocab, length, n = 4, 3, 2500
    target = llama(vocab, seed=3, init=1.0)  # large init: peaked, position-dependent distributions
    drafter = {"self": target, "random": llama(vocab, seed=4, init=1.0),
               "adversarial": Adversarial(target, scale=-3.0)}[drafter_name]
    prompt = [0, 2]
    exact = exact_sequence_probs(target, prompt, length, sampling)
    assert abs(sum(exact.values()) - 1) < 1e-5
    generator = torch.Generator().manual_seed(1234)
    counts, accepted, proposed = {}, 0, 0
    for _ in range(n):
        tokens, stats = speculative_generate(target, drafter, torch.tensor([prompt]), length, gamma=gamma,
                                             sampling=sampling, generator=generator)
        seq = tuple(tokens.tolist())
        counts[seq] = counts.get(seq, 0) + 1
        accepted, proposed = accepted + sum(stats.accepted), proposed + sum(stats.proposed)
    assert sum(counts.values()) == n
    assert chi_square_pvalue(counts, exact, n) > 1e-3
    if drafter_name == "adversarial":
        assert accepted / proposed < 0.6  # the test really exercised the rejection path
    if drafter_name == "self":
        assert accepted == proposed


def test_verify_alone_reproduces_p_for_any_q():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]])
    q = torch.tensor([[0.0, 0.1, 0.1, 0.4, 0.4]])  # zero where p has mass, mass where p is zero
    generator = torch.Generator().manual_seed(0)
    n, counts = 20000, torch.zeros(5)
    for _ in range(n):
        draft = torch.multinomial(q[0], 1, generator=generator)
        accepted, token = verify(draft, q, p, generator)
        counts[draft.item() if accepted else token] += 1
    assert counts[3:].sum() == 0  # tokens the target never emits are never emitted
    assert chisquare(counts[:3].numpy(), (p[0, :3] * n).numpy()).pvalue > 1e-3


def test_verify_greedy_is_argmax_agreement():
    p = torch.nn.functional.one_hot(torch.tensor([2, 4, 1]), 6).float()
    q = torch.nn.functional.one_hot(torch.tensor([2, 3]), 6).float()
    assert verify(torch.tensor([2, 3]), q, p) == (1, 4)
    q = torch.nn.functional.one_hot(torch.tensor([2, 4]), 6).float()
    assert verify(torch.tensor([2, 4]), q, p) == (2, 1)
