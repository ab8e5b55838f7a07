import json
from pathlib import Path

import torch

from draftdistill.train import train_drafter
from draftdistill.train.batching import pack, response_logits
from tiny import make_llama
from test_train_drafter import config, setup  # noqa: F401  (the module fixture)
from safetensors.torch import load_file


def test_packed_response_logits_equal_unpadded_forwards():
    model = make_llama(layers=2, seed=3).eval()
    prompts = [[1, 5, 7], [2, 9, 4, 4, 8, 3], [6]]
    responses = [[11, 12, 13, 14], [15], [16, 17]]
    batch = pack(prompts, responses, pad_id=0)
    assert batch.prompt_width == 6 and batch.scored.tolist() == [[True] * 4, [True, False, False, False],
                                                                  [True, True, False, False]]
    with torch.no_grad():
        packed = response_logits(model, batch)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            alone = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1: len(p) + len(r) - 1]
            torch.testing.assert_close(packed[row, : len(r)], alone, atol=1e-5, rtol=1e-4)
            assert batch.targets[row, : len(r)].tolist() == r


def test_gradient_accumulation_equals_one_big_batch(setup, tmp_path):  # noqa: F811  (the imported fixture)
    """2 micro-batches of 2 and 1 batch of 4 over the same prompts take the same step: the loss is
    normalised by the step's total token count, not per micro-batch (answers differ in length)."""
    prompts = tmp_path / "uneven.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 2}",
                                           "answer": " ".join(f"w{j}" for j in range(1 + 3 * i))})
                               + "\n" for i in range(4)))
    common = dict(prompts=str(prompts), mix_dataset=1.0, mix_drafter=0.0, divergence="fkl", steps=1,
                  eval_every=100, save_every=1, warmup_steps=1, max_grad_norm=1e9)
    train_drafter(config(setup, tmp_path / "accum", batch_size=2, grad_accum=2, **common), progress=False)
    train_drafter(config(setup, tmp_path / "big", batch_size=4, grad_accum=1, **common), progress=False)
    accum = load_file(tmp_path / "accum" / "checkpoint" / "drafter.safetensors")
    big = load_file(tmp_path / "big" / "checkpoint" / "drafter.safetensors")
    for name in big:
        # Adam moves a weight whose gradient is near its eps (1e-8) by a step that is sensitive to the
        # last bits of that gradient; 1e-5 is a thousandth of the step size (lr 1e-2).
        torch.testing.assert_close(accum[name], big[name], atol=1e-5, rtol=1e-5)
    # The step moved the weights away from the target's, so the comparison is not vacuous.
    target = load_file(Path(setup[1]) / "model.safetensors")
    moved = [name for name in big if name in target and not torch.equal(big[name], target[name])]
    assert moved


def test_accumulated_gradients_equal_one_big_batch_gradient():
    from draftdistill.losses import get_divergence
    from draftdistill.train.drafter import accumulate_gradients

    target, drafter = make_llama(layers=2, seed=1).eval(), make_llama(layers=1, seed=2).train()
    prompts = [[1, 5, 7], [2, 9, 4, 4], [6, 3], [8, 8, 8, 9, 10]]
    responses = [[11], [12, 13, 14, 15, 16, 17], [18, 19], [20, 21, 22, 23]]  # uneven on purpose
    loss_fn = get_divergence("jsd", beta=0.3)

    def grads(groups):
        batches = [pack([prompts[i] for i in g], [responses[i] for i in g], pad_id=0) for g in groups]
        with torch.no_grad():
            teacher = [response_logits(target, b) for b in batches]
        drafter.zero_grad(set_to_none=True)
        sums = accumulate_gradients(drafter, batches, teacher, [b.scored for b in batches], loss_fn, 1.5)
        return sums, {n: p.grad.clone() for n, p in drafter.named_parameters()}

    big_sums, big = grads([[0, 1, 2, 3]])
    micro_sums, micro = grads([[0, 1], [2, 3]])
    assert big_sums["loss_tokens"] == micro_sums["loss_tokens"] == 13
    assert abs(big_sums["loss"] - micro_sums["loss"]) < 1e-4
    for name in big:
        torch.testing.assert_close(micro[name], big[name], atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in big.values())


def test_rejected_mask_rejects_the_drafters_proposals_at_the_speculative_sampling_rate():
    from draftdistill.train.osd import rejected_mask

    torch.manual_seed(0)
    student, teacher = torch.randn(1, 3, 6) * 2, torch.randn(1, 3, 6) * 2
    batch = pack([[1]], [[2, 3, 4]], pad_id=0)
    generator = torch.Generator().manual_seed(1)
    rate = torch.stack([rejected_mask(student, teacher, batch.scored, generator, 1.0).float()
                        for _ in range(4000)]).mean(0)
    expected = 1 - torch.minimum(student.softmax(-1), teacher.softmax(-1)).sum(-1)
    torch.testing.assert_close(rate, expected, atol=0.03, rtol=0)
