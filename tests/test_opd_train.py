"""The OPD loop on tiny models: sampler, scorer, gradient accumulation, resume, routing, recipes."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from draftdistill.data import encode_prompt, load_prompts
from draftdistill.models import load_tokenizer
from draftdistill.models.loading import resolve_model_source
from draftdistill.opd import LocalSampler, LocalScorer, Micro, OPDConfig, build_objective, train_opd
from draftdistill.opd.rollout import merge_scores, scores_from_lists
from draftdistill.spec import SamplingConfig, target_generate
from draftdistill.train import load_config
from draftdistill.train.batching import pack, response_logits
from draftdistill.opd.trainer import accumulate
from tiny import kill_at_optimizer_step, make_llama, save_model_dir

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "opd").glob("*.yaml"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd")
    teacher = save_model_dir(root / "teacher", layers=2, seed=0)
    other = save_model_dir(root / "other", layers=2, seed=5)
    student = save_model_dir(root / "student", layers=1, seed=1)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"w{i} w{(i * 7) % 29} w{(i * 3) % 29}",
                                           "answer": f"w{i % 5} w{i % 7} #### {i % 3}",
                                           "domain": ["math", "chat"][i % 2]}) + "\n" for i in range(16)))
    return root, teacher, student, other, prompts


def config(setup, out, **kw):
    root, teacher, student, _, prompts = setup
    base = dict(student=str(student), teacher=str(teacher), prompts=str(prompts), max_new_tokens=5, batch_size=2,
                steps=2, save_every=2, out_dir=str(root / out), device="cpu", lr=1e-2, warmup_steps=1)
    base.update(kw)
    return OPDConfig(**base)


def test_batched_sampler_matches_single_sequence_decoding():
    model = make_llama(layers=2, seed=3)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 4, 4]]
    sampler = LocalSampler(model, eos_ids=[2], pad_id=2, temperature=0.0)
    got = sampler.sample(prompts, 6, torch.Generator().manual_seed(0))
    for p, c in zip(prompts, got):
        want, _ = target_generate(model, torch.tensor([p]), 6, SamplingConfig(), 2)
        assert c.tokens == want.tolist()
    # Sampled: the recorded log-probs are the training forward's (importance ratio ~ 1).
    sampler = LocalSampler(model, eos_ids=[2], pad_id=2, temperature=1.0)
    got = sampler.sample(prompts, 6, torch.Generator().manual_seed(0))
    batch = pack(prompts, [c.tokens for c in got], 2)
    logp = torch.log_softmax(response_logits(model, batch), -1).gather(-1, batch.targets[..., None])[..., 0]
    for row, c in enumerate(got):
        torch.testing.assert_close(logp[row, : len(c.tokens)], torch.tensor(c.logprobs), atol=1e-4, rtol=0)


def test_scorer_forms_merge_and_server_parsing():
    model = make_llama(layers=1, seed=4)
    scorer = LocalScorer(model, pad_id=2)
    prompts, responses = [[1, 5], [1, 6, 7]], [[8, 9, 2], [10]]
    full = scorer.score(prompts, responses, {"logits", "topk"}, 4, 1.0)
    assert full.logits.shape == (2, 3, 32) and full.topk.ids.shape == (2, 3, 4)
    logp = torch.log_softmax(full.logits, -1)
    torch.testing.assert_close(full.token.logprobs, logp.gather(-1, full.token.token_ids[..., None])[..., 0])
    # Rows scored separately (routing) and merged back line up with the joint scores.
    parts = [([1], scorer.score([prompts[1]], [responses[1]], {"logits"}, 4, 1.0)),
             ([0], scorer.score([prompts[0]], [responses[0]], {"logits"}, 4, 1.0))]
    merged = merge_scores(parts, 2, 3)
    torch.testing.assert_close(merged.token.logprobs[0], full.token.logprobs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged.token.logprobs[1, :1], full.token.logprobs[1, :1], atol=1e-5, rtol=0)
    # Server scores (per row, per position) padded into the same [B, R] layout.
    token = [[-0.5, -1.5], [-0.25]]
    top = [[([8, 3], [-0.5, -1.0]), ([4, 9], [-0.2, -1.5])], [([10, 3], [-0.25, -2.0])]]
    scores = scores_from_lists(token, top, [[8, 9], [10]])
    assert scores.token.logprobs.tolist() == [[-0.5, -1.5], [-0.25, 0.0]]
    assert scores.token.token_ids.tolist() == [[8, 9], [10, 0]]
    assert scores.topk.ids.tolist() == [[[8, 3], [4, 9]], [[10, 3], [0, 0]]]


@pytest.mark.parametrize("objective,divergence", [("opd", "rkl"), ("divergence", "jsd:beta=0.5"),
                                                  ("minillm:gamma=0.9", "rkl"), ("aopd:k=4", "rkl")])
def test_gradient_accumulation_equals_one_big_batch(objective, divergence):
    """Micro-batches of uneven lengths (4 rows as 1 + 3) give the gradient of the one batch of 4."""
    student, teacher = make_llama(layers=1, seed=6), make_llama(layers=1, seed=7)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1, 11]]
    responses = [[12, 13, 14, 15, 2], [16], [17, 18, 19], [20, 21]]
    old = [[-3.0, -3.1, -2.9, -3.2, -3.0], [-3.3], [-2.8, -3.0, -3.1], [-3.0, -3.2]]
    obj = build_objective(objective, divergence)

    def micro(rows):
        batch = pack([prompts[r] for r in rows], [responses[r] for r in rows], 2)
        scores = LocalScorer(teacher, 2).score([prompts[r] for r in rows], [responses[r] for r in rows],
                                               {"logits"}, 4, 1.0)
        lp = torch.full(batch.scored.shape, float("nan"))
        for i, r in enumerate(rows):
            lp[i, : len(old[r])] = torch.tensor(old[r])
        return Micro(batch, batch.scored, scores, old_logprobs=lp, sampled=torch.ones(len(rows), dtype=torch.bool))

    def grads(groups):
        student.zero_grad(set_to_none=True)
        sums = accumulate(student, [micro(g) for g in groups], obj, 1.0)
        return sums["loss"] / sums["loss_tokens"], [p.grad.clone() for p in student.parameters()]

    loss_one, one = grads([[0, 1, 2, 3]])
    loss_acc, acc = grads([[1], [0, 2, 3]])
    assert loss_one == pytest.approx(loss_acc, abs=1e-5)
    for a, b in zip(one, acc):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_killed_run_resumes_exactly(setup, monkeypatch):
    # An EMA self-teacher and DistiLLM's adaptive schedule: both are state that must survive a kill.
    kw = dict(teacher="self", self_teacher="ema", ema_decay=0.5, privileged="reference", objective="divergence",
              divergence="skew_rkl:alpha=0.1", mix_schedule="adaptive", mix_student_start=0.5, adaptive_window=1,
              adaptive_delta=0.25, adaptive_validation=4, steps=4, save_every=2)
    train_opd(config(setup, "straight", **kw), progress=False)
    root = setup[0]
    expected = load_file(root / "straight" / "checkpoint" / "drafter.safetensors")
    kill_at_optimizer_step(monkeypatch, lambda: train_opd(config(setup, "killed", **kw), progress=False))
    assert json.loads((root / "killed" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    train_opd(config(setup, "killed", **kw), progress=False)
    resumed = load_file(root / "killed" / "checkpoint" / "drafter.safetensors")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)
    ema = load_file(root / "killed" / "ema-4.safetensors")
    for key, value in load_file(root / "straight" / "ema-4.safetensors").items():
        torch.testing.assert_close(ema[key], value, rtol=0, atol=0)
    rows = [json.loads(l) for l in (root / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss_tokens"] > 0 for r in rows)


class Recording:
    """A scorer that records what each teacher was asked to score."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, []

    def score(self, prompts, responses, forms, top_k, temperature):
        self.prompts.extend(prompts)
        return self.inner.score(prompts, responses, forms, top_k, temperature)


def test_mopd_routes_rows_and_opsd_shows_privileged_context(setup):
    root, teacher, _, other, prompts = setup
    from draftdistill.models import load_target
    from draftdistill.data import encode_prompt, load_prompts

    tokenizer = load_target(str(teacher), device="cpu")[1]
    by_domain = {}
    for p, row in zip(load_prompts(str(prompts)), prompts.read_text().splitlines()):
        by_domain.setdefault(json.loads(row)["domain"], set()).add(tuple(encode_prompt(tokenizer, p)[0].tolist()))
    scorers = {name: Recording(LocalScorer(load_target(str(path), device="cpu")[0], 2))
               for name, path in (("math", teacher), ("chat", other))}
    train_opd(config(setup, "mopd", teachers={"math": str(teacher), "chat": str(other)}, route_field="domain",
                     batch_size=4), progress=False, scorers=scorers)
    for name, scorer in scorers.items():
        assert scorer.prompts and {tuple(p) for p in scorer.prompts} <= by_domain[name]

    privileged = {"self": Recording(LocalScorer(make_llama(layers=1, seed=1), 2))}
    train_opd(config(setup, "opsd", teacher="self", privileged="reference", objective="divergence", steps=1),
              progress=False, scorers=privileged)
    plain = set().union(*by_domain.values())
    assert privileged["self"].prompts and not {tuple(p) for p in privileged["self"].prompts} & plain


def test_gkd_lambda_zero_trains_on_dataset_answers_only(setup):
    train_opd(config(setup, "gkd0", objective="divergence", divergence="jsd:beta=0.5", mix_student=0.0, steps=1),
              progress=False)
    row = json.loads((setup[0] / "gkd0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["mix_student"] == 0.0 and "rkl_estimate" not in row  # no student samples to estimate on


def test_sft_is_the_dataset_answers_negative_log_likelihood(setup):
    from transformers import AutoModelForCausalLM

    root, _, student, _, prompts = setup
    with pytest.raises(ValueError, match="teacher=none"):
        train_opd(config(setup, "sft-bad", objective="sft", mix_student=0.0), progress=False)
    with pytest.raises(ValueError, match="needs a teacher"):
        train_opd(config(setup, "sft-bad", teacher="none"), progress=False)
    with pytest.raises(ValueError, match="mix_student=0"):
        train_opd(config(setup, "sft-bad", objective="sft", teacher="none"), progress=False)
    # Both prompts in the one step's batch: the logged loss is their mean token NLL at the initial weights.
    train_opd(config(setup, "sft", objective="sft", teacher="none", mix_student=0.0, prompt_limit=2,
                     max_new_tokens=32, steps=1), progress=False)
    row = json.loads((root / "sft" / "metrics.jsonl").read_text().splitlines()[0])
    tokenizer, model = (load_tokenizer(resolve_model_source(str(student))),
                        AutoModelForCausalLM.from_pretrained(student).float())
    rows = load_prompts(str(prompts), limit=2)
    answers = [tokenizer(p.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p in rows]
    batch = pack([encode_prompt(tokenizer, p)[0].tolist() for p in rows], answers, tokenizer.eos_token_id)
    with torch.no_grad():
        logp = torch.log_softmax(response_logits(model, batch), -1).gather(-1, batch.targets[..., None])[..., 0]
    # Special tokens other than the stop token ("####" is <unk> in the tiny vocabulary) leave the loss.
    special = torch.tensor([t for t in tokenizer.all_special_ids if t != tokenizer.eos_token_id])
    mask = batch.scored & ~torch.isin(batch.targets, special)
    assert row["loss"] == pytest.approx(float(-logp[mask].mean()), rel=1e-5)
    assert row["loss_tokens"] == int(mask.sum()) and "rkl_estimate" not in row


def test_distillm_schedule_watches_held_out_prompts(setup):
    root = setup[0]
    seen = Recording(LocalScorer(make_llama(layers=2, seed=0), 2))
    train_opd(config(setup, "distillm", objective="divergence", divergence="skew_rkl:alpha=0.1",
                     mix_schedule="adaptive", mix_student_start=0.0, adaptive_window=2, adaptive_validation=4,
                     steps=4), progress=False, scorers={"teacher": seen})
    rows = [json.loads(l) for l in (root / "distillm" / "metrics.jsonl").read_text().splitlines()]
    assert ["validation_loss" in r for r in rows] == [False, True, False, True]
    # The validation prompts are scored (as validation) but never trained on: with 16 prompts,
    # 4 held out, 4 steps x 2 draw from the other 12.
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    held_out = set(order[-4:].tolist())
    tokenizer = load_tokenizer(resolve_model_source(str(setup[2])))
    ids = [tuple(encode_prompt(tokenizer, p)[0].tolist()) for p in load_prompts(str(setup[4]))]
    asked = [tuple(p) for p in seen.prompts]
    validation_calls = [p for p in asked if ids.index(p) in held_out]
    assert len(validation_calls) == 2 * 4  # two measurements x four held-out prompts
    assert len(asked) - len(validation_calls) == 4 * 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_runs_on_tiny_models(setup, recipe, tmp_path):
    root, teacher, student, _, prompts = setup
    cfg = load_config(OPDConfig, recipe)
    assert cfg.out_dir.startswith("runs/opd/") and "# " in recipe.read_text().splitlines()[0]
    overrides = [f"student={student}", f"prompts={prompts}", "max_new_tokens=4", "batch_size=2", "steps=1",
                 "adaptive_validation=2", f"out_dir={tmp_path}", "device=cpu"]
    if cfg.teacher not in ("self", "none") and not cfg.teachers:
        overrides.append(f"teacher={teacher}")
    if cfg.teachers:
        overrides.append("teachers={" + ", ".join(f"{k}: {teacher}" for k in cfg.teachers) + "}")
    cfg = load_config(OPDConfig, recipe, overrides)
    summary = train_opd(cfg, progress=False)
    assert summary["steps"] == 1 and (tmp_path / "final" / "config.json").is_file()


def test_cli_runs_a_recipe_with_overrides(setup, tmp_path):
    from draftdistill.cli import main

    root, teacher, student, _, prompts = setup
    recipe = Path(__file__).resolve().parents[1] / "configs" / "opd" / "tinker-opd.yaml"
    result = CliRunner().invoke(main, ["opd", str(recipe), f"student={student}", f"teacher={teacher}",
                                       f"prompts={prompts}", "steps=1", "max_new_tokens=3", "batch_size=1",
                                       f"out_dir={tmp_path}", "device=cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trained 1 steps" in result.output
    bad = CliRunner().invoke(main, ["opd", str(recipe), "objective=nope", f"out_dir={tmp_path}"])
    assert bad.exit_code != 0 and "unknown objective" in bad.output
