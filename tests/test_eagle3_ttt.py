"""EAGLE-3 TTT training (train/ttt.py, train/eagle3.py).

- Every scored row of a TTT step, teacher-forced (data) or on-policy (sampled), equals what the
  decoder would compute for that chain: the head's logits from a fresh prefix + chain walk on the
  row's unpadded tokens, and the target's logits from a plain forward over prefix + chain tokens.
  This pins the padding, the anchors, the tree mask of the chain scoring and the step alignment.
- The plan scores exactly the positions that predict response tokens (and, with data chains, only
  while the context has the chain's tokens).
- The trainer: logs, evaluates, exports a loadable SGLang-format head, resumes a killed run exactly,
  lowers its loss on fixed data, and refuses settings that cannot work.
- The offline mode (train/feature_cache.py): rows computed from cached target features are the rows
  with the target in the loop, the target's layers do not run on a cached batch, a cache of another
  target is refused, a damaged file is computed again, and a run reading the cache trains exactly
  like one running the target.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_spec import tiny_llama
from tiny import kill_at_optimizer_step, save_model_dir

from draftdistill.models import load_drafter, load_target
from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import Eagle3Head, build_eagle3_head, target_aux_hidden_states
from draftdistill.train import Eagle3Config, load_config, train_eagle3
from draftdistill.train.feature_cache import FeatureCache, cache_identity
from draftdistill.train.ttt import pack_right, plan_ttt, simulated_tau, step_acceptance, ttt_forward

PROMPTS = [[3, 5, 7], [4, 6, 8, 10], [9, 2]]
RESPONSES = [[11, 13, 15, 17, 19, 21], [12, 14, 16], [20, 22, 24, 26, 28]]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    target = tiny_llama(32, seed=0, layers=5)
    head = build_eagle3_head(target, DraftVocab(list(range(0, 32, 2)) + [31], 32), seed=1)
    with torch.no_grad():  # a head that is not uniform, so sampled chains differ row to row
        for p in head.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return target, head


def decoder_view(target, head, prefix: list[int], chain: list[int]):
    """(head logits after walking `chain` from `prefix`, target logits after prefix + chain), the
    way the decoder computes them: target aux states of the prefix, head prefix pass, chain steps."""
    ids = torch.tensor([prefix])
    aux, _ = target_aux_hidden_states(target, ids, head.aux_layer_ids)
    cache = head.new_cache()
    logits, h = head(ids[:, 1:], head.fuse(aux[:, :-1]), cache)
    for step, token in enumerate(chain, start=1):
        logits, h = head(torch.tensor([[token]]), h[:, -1:], cache, step=step)
    teacher = target(input_ids=torch.tensor([prefix + chain])).logits[0, -1]
    return logits[0, -1], teacher


# 5 anchors: row 1 has only 4 positions, so the chain scoring pads it (and, mixed, it has no data chain)
@pytest.mark.parametrize("chain,chain_tokens,anchors", [("data", 0, 3), ("sampled", 0, 3), ("sampled", 1, 5),
                                                        ("mixed", 0, 5), ("mixed", 1, 3)])
def test_every_scored_row_is_what_the_decoder_computes(models, chain, chain_tokens, anchors):
    target, head = models
    batch = pack_right(PROMPTS, RESPONSES, pad_id=0)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    plan = plan_ttt(batch, 3, chain, anchors_per_row=anchors, generators=generators, chain_tokens=chain_tokens)
    with torch.no_grad():
        steps, target_tokens = ttt_forward(head, target, batch, plan, temperature=1.0, generators=generators)
    eaten = {}  # (row, t) -> the chain tokens fed so far
    for j, rows in enumerate(steps):
        assert len(rows.student) == plan.counts()[j]
        assert rows.weights is None
        for m, (b, t) in enumerate(rows.where.tolist()):
            if j > 0:
                eaten[b, t] = eaten.get((b, t), []) + [int(rows.tokens[m])]
            row = batch.ids[b, : int(batch.lengths[b])].tolist()
            if not bool(plan.sampled[b, t]):
                assert eaten.get((b, t), []) == row[t + 2: t + 2 + j]  # teacher-forced: the context's own
            elif j > 0:
                assert bool(head.vocab.contains(torch.tensor(eaten[b, t])).all())  # drafts from the draft vocab
            student, teacher = decoder_view(target, head, row[: t + 2], eaten.get((b, t), []))
            torch.testing.assert_close(rows.student[m], student, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(rows.teacher[m], teacher, rtol=1e-9, atol=1e-9)
    assert (plan.counts()[2] > 0) == (chain != "sampled" or chain_tokens != 1)
    assert target_tokens == int(batch.lengths.sum()) + int(plan.sampled.sum()) * plan.chain_tokens


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_reach_weights_are_the_chance_a_decoder_accepts_the_earlier_drafts(models, temperature):
    target, head = models
    batch = pack_right(PROMPTS, RESPONSES, pad_id=0)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    # 5 anchors pad row 1's chains; 2 of the 3 chain steps are scored
    plan = plan_ttt(batch, 4, "mixed", anchors_per_row=5, generators=generators, chain_tokens=2)
    with torch.no_grad():
        steps, _ = ttt_forward(head, target, batch, plan, temperature=temperature, generators=generators,
                               reach_weights=True)
    assert steps[0].weights is None and steps[3].weights is None  # no draft before / none scored
    weights = torch.cat([rows.weights for rows in steps[1:3]])
    if temperature > 0:
        assert bool(((weights > 0) & (weights < 1)).any())  # not a vacuous 0 / 1 everywhere
    else:
        assert set(weights.tolist()) <= {0.0, 1.0}
    chains = {}  # (row, t) -> the sampled chain so far
    for rows in steps[1:3]:
        for m, (b, t) in enumerate(rows.where.tolist()):
            if not bool(plan.sampled[b, t]):
                assert rows.weights[m] == 1  # teacher-forced rows keep their weight
                continue
            chains[b, t] = chains.get((b, t), []) + [int(rows.tokens[m])]
            prefix = batch.ids[b, : t + 2].tolist()
            expected = 1.0
            for i, token in enumerate(chains[b, t]):  # accept c_{i+1} after c_1..c_i were accepted
                with torch.no_grad():
                    student, teacher = decoder_view(target, head, prefix, chains[b, t][:i])
                if temperature == 0:
                    expected *= float(teacher.argmax() == token)
                else:
                    p = torch.softmax(teacher / temperature, -1)[token]
                    q = torch.softmax(student / temperature, -1)[head.vocab.target_to_draft(torch.tensor(token))]
                    expected *= min(1.0, float(p / q))
            assert float(rows.weights[m]) == pytest.approx(expected, rel=1e-5, abs=1e-12)  # float32 softmax
    assert len(chains) == int(plan.sampled.sum()) and all(len(c) == 2 for c in chains.values())


def test_step_loss_weights_each_row():
    from draftdistill.losses import get_divergence
    from draftdistill.train.ttt import StepRows, step_loss
    vocab = DraftVocab(list(range(0, 32, 2)) + [31], 32)
    student, teacher = torch.randn(5, len(vocab), dtype=torch.float64), torch.randn(5, 32, dtype=torch.float64)
    teacher[:, 0] = 10.0  # every row's target argmax is in the draft vocabulary
    weights = torch.tensor([1.0, 0.5, 0.0, 2.0, 0.25], dtype=torch.float64)
    fkl = get_divergence("fkl")
    rows = StepRows(student, teacher, torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, dtype=torch.long), weights)
    per_row = [float(step_loss(StepRows(student[i:i + 1], teacher[i:i + 1], rows.where[:1], rows.tokens[:1]),
                               vocab, fkl)) for i in range(5)]
    assert float(step_loss(rows, vocab, fkl)) == pytest.approx(sum(w * l for w, l in zip(weights.tolist(), per_row)))
    rows.weights = None
    assert float(step_loss(rows, vocab, fkl)) == pytest.approx(sum(per_row))


def test_plan_scores_the_positions_that_predict_response_tokens():
    batch = pack_right(PROMPTS, RESPONSES, pad_id=0)
    plan = plan_ttt(batch, 3, "data")
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        # step 0 at t predicts x_{t+2}: t = len(p) - 2 predicts the first response token
        assert plan.valid[0][b].nonzero().flatten().tolist() == list(range(len(p) - 2, len(p) + len(r) - 1))
        assert plan.valid[2][b].nonzero().flatten().tolist() == list(range(len(p) - 2, len(p) + len(r) - 3))
    assert not bool(plan.sampled.any())
    sampled = plan_ttt(batch, 3, "sampled", anchors_per_row=2, generators=[torch.Generator()] * 3)
    assert sampled.counts() == [6, 6, 6]
    assert bool((sampled.sampled <= plan.valid[0]).all()) and sampled.sampled.sum(1).tolist() == [2, 2, 2]
    assert plan_ttt(batch, 3, "sampled", 2, [torch.Generator()] * 3, chain_tokens=1).counts() == [6, 6, 0]
    # mixed: every data row, except at the anchors, whose sampled chains are scored instead
    mixed = plan_ttt(batch, 3, "mixed", anchors_per_row=2, generators=[torch.Generator()] * 3)
    assert torch.equal(mixed.sampled, sampled.sampled)  # the same draws
    assert torch.equal(mixed.valid[0], plan.valid[0])
    for j in (1, 2):
        assert torch.equal(mixed.valid[j], (plan.valid[j] & ~mixed.sampled) | mixed.sampled)
    short = plan_ttt(batch, 3, "mixed", anchors_per_row=2, generators=[torch.Generator()] * 3, chain_tokens=1)
    assert torch.equal(short.valid[2], plan.valid[2] & ~short.sampled)  # the last step: data chains only
    for chain in ("sampled", "mixed"):  # one step: nothing drafted, every row is step 0's
        one = plan_ttt(batch, 1, chain, anchors_per_row=2, generators=[torch.Generator()] * 3, chain_tokens=3)
        assert one.chain_tokens == 0 and one.steps == 1
    assert plan_ttt(batch, 3, "sampled", 2, [torch.Generator()] * 3, chain_tokens=9).chain_tokens == 2
    with pytest.raises(ValueError, match="chain must be one of"):
        plan_ttt(batch, 3, "teacher")
    with pytest.raises(ValueError, match="chain_tokens"):
        plan_ttt(batch, 3, "sampled", chain_tokens=-1)


def test_simulated_acceptance():
    assert simulated_tau([0.5, 0.5, 0.5, 0.5], gamma=2) == 1 + 0.5 + 0.25
    assert simulated_tau([1.0] * 7, gamma=4) == 5
    assert simulated_tau([0.5, None, 0.5], gamma=3) == 1.5  # an unscored position ends the chain
    target = tiny_llama(32, seed=0, layers=5)
    head = build_eagle3_head(target)  # full vocabulary
    logits = torch.randn(4, 32, dtype=torch.float64)

    class Rows:
        student, teacher = logits, logits
    alpha, agree = step_acceptance(Rows, head.vocab)
    assert alpha == pytest.approx(4) and agree == 4


# ---------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3")
    target = save_model_dir(root / "target", layers=5, seed=0)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{(i * 7) % 29} w{(i * 3) % 29}",
                                           "answer": f"w{i % 5} w{i % 7} w{i % 3}"}) + "\n" for i in range(40)))
    return root, target, prompts


def config(setup, out, **kw):
    root, target, prompts = setup
    base = dict(target=str(target), drafter="eagle3", prompts=str(prompts), eval_prompts=str(prompts),
                mix_dataset=1.0, mix_target=1.0, divergence="fkl", ttt_steps=3,
                ttt_chain="sampled", ttt_anchors=4, draft_vocab_size=20, response_tokens=6, batch_size=2,
                steps=4, eval_every=2, save_every=2, eval_num_prompts=2, eval_max_new_tokens=6, gamma=3,
                out_dir=str(out), device="cpu", lr=1e-2, warmup_steps=1)
    base.update(kw)
    return Eagle3Config(**base)


def test_trainer_logs_evaluates_and_exports_a_loadable_head(setup):
    root, target_dir, _ = setup
    summary = train_eagle3(config(setup, root / "run"), progress=False)
    out = root / "run"
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [1, 2, 3, 4]
    for line in train_lines:
        assert line["loss"] >= 0 and len(line["sim_alpha_per_position"]) == 3
        assert all(0 <= a <= 1 for a in line["sim_alpha_per_position"] + line["sim_greedy_agreement_per_position"])
        assert 1 <= line["sim_tau"] <= 4
        # sampled chains: the context plus (steps - 1) chain tokens per scored anchor
        assert line["target_chain_tokens"] == 2 * line["scored_positions"] and line["scored_positions"] <= 2 * 4
        assert line["target_tokens"] > line["target_chain_tokens"]
    assert [l["step"] for l in lines if "eval_tau" in l] == [0, 2, 4]
    assert summary["target_tokens"] == sum(l["target_tokens"] for l in train_lines)
    assert len(summary["simulated"]["alpha_per_position"]) == 3 and summary["draft_vocab_size"] == 20
    target, tokenizer = load_target(str(target_dir), device="cpu")
    best = load_drafter(str(out / "best"), target, tokenizer)  # the SGLang-format export
    assert isinstance(best, Eagle3Head) and best.config.draft_vocab_size == 20
    assert int(best.t2d.sum()) == 20 and bool(best.t2d[tokenizer.eos_token_id])  # stop token always drafted
    saved = load_file(out / "checkpoint" / "drafter.safetensors")
    assert "embed_tokens.weight" not in saved and "d2t" in saved  # the target's embedding is not copied
    assert (out / "alpha_per_position.png").read_bytes()[:4] == b"\x89PNG"


def test_killed_run_resumes_exactly(setup, monkeypatch):
    root = setup[0]
    train_eagle3(config(setup, root / "straight"), progress=False)
    expected = load_file(root / "straight" / "checkpoint" / "drafter.safetensors")
    kill_at_optimizer_step(monkeypatch, lambda: train_eagle3(config(setup, root / "killed"), progress=False))
    train_eagle3(config(setup, root / "killed"), progress=False)
    resumed = load_file(root / "killed" / "checkpoint" / "drafter.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("chain", ["data", "sampled", "mixed"])
def test_ttt_lowers_the_loss_on_fixed_data(setup, chain):
    root = setup[0]
    four = root / "four.jsonl"  # batch_size 4 over 4 prompts: the same contexts every step
    four.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 3}", "answer": f"w{i + 1} w{i + 2} w{i} w{i + 4}"})
                            + "\n" for i in range(4)))
    cfg = config(setup, root / f"fixed-{chain}", prompts=str(four), mix_target=0.0, ttt_chain=chain, steps=25,
                 eval_every=100, save_every=100, batch_size=4, draft_vocab_size=32, lr=3e-2)
    train_eagle3(cfg, progress=False)
    rows = [json.loads(l) for l in (root / f"fixed-{chain}" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_trainer_refuses_what_cannot_work(setup):
    root = setup[0]
    # The standalone drafter's keys are not the EAGLE-3 trainer's: the loader names them unknown.
    for key in ("mix_drafter=1", "rejected_only=true"):
        with pytest.raises(ValueError, match=f"unknown config key '{key.split('=')[0]}'"):
            load_config(Eagle3Config, None, [key])
    with pytest.raises(ValueError, match="mix_dataset and/or mix_target > 0"):
        train_eagle3(config(setup, root / "bad", mix_dataset=0.0, mix_target=0.0), progress=False)
    with pytest.raises(ValueError, match="ttt_chain=sampled or mixed"):
        train_eagle3(config(setup, root / "bad", ttt_chain="data", ttt_reach_weights=True), progress=False)
    for chain_tokens in (-2, 3):  # ttt_steps 3: at most 2 drafts per chain
        with pytest.raises(ValueError, match="ttt_chain_tokens"):
            train_eagle3(config(setup, root / "bad", ttt_chain_tokens=chain_tokens), progress=False)


def test_short_reach_weighted_chains_log_only_the_steps_they_score(setup):
    root = setup[0]
    cfg = config(setup, root / "short", ttt_chain="sampled", ttt_chain_tokens=1, ttt_reach_weights=True, steps=2,
                 eval_every=2, save_every=2)
    summary = train_eagle3(cfg, progress=False)
    rows = [json.loads(l) for l in (root / "short" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(rows) == 2
    for row in rows:  # steps 0 and 1 are scored; step 2 (the chain's second draft) is not
        assert row["sim_alpha_per_position"][2] is None and row["loss_per_step"][2] is None
        assert row["sim_alpha_per_position"][1] is not None and row["loss_per_step"][1] >= 0
    assert summary["simulated"]["alpha_per_position"][2] is None


# ---------------------------------------------------------------- the offline mode (feature cache)

def test_cached_features_give_the_rows_of_the_target_in_the_loop(models, tmp_path):
    target, head = models
    calls = []  # forwards of the target's first decoder layer
    hook = target.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    batch = pack_right(PROMPTS, RESPONSES, pad_id=0)
    plan = plan_ttt(batch, 3, "data")
    cache = FeatureCache(tmp_path / "features", cache_identity("tiny", target, head.aux_layer_ids))
    with torch.no_grad():
        want, want_tokens = ttt_forward(head, target, batch, plan)
        first, first_tokens = ttt_forward(head, target, batch, plan, features=cache)  # computes and stores
        assert (cache.rows_computed, cache.rows_read, first_tokens) == (3, 0, want_tokens)
        assert len(list((tmp_path / "features").glob("*/*.safetensors"))) == 3
        before = len(calls)
        got, got_tokens = ttt_forward(head, target, batch, plan, features=cache)  # reads
    hook.remove()
    assert len(calls) == before and got_tokens == 0  # the target's layers did not run
    assert (cache.rows_computed, cache.rows_read) == (3, 3)
    for rows in (first, got):
        assert len(rows) == len(want)
        for a, b in zip(rows, want):
            torch.testing.assert_close(a.student, b.student, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(a.teacher, b.teacher, rtol=1e-9, atol=1e-9)
            assert torch.equal(a.where, b.where) and torch.equal(a.tokens, b.tokens)

    # A batch with one new row runs the target over the batch and stores the new row.
    mixed = pack_right(PROMPTS[:2] + [[1, 2]], RESPONSES[:2] + [[5, 6, 7]], pad_id=0)
    with torch.no_grad():
        _, tokens = ttt_forward(head, target, mixed, plan_ttt(mixed, 3, "data"), features=cache)
    assert tokens == int(mixed.lengths.sum()) and cache.rows_computed == 6
    assert cache.get([1, 2, 5, 6, 7]) is not None


def test_sampled_chains_refuse_cached_features(models, tmp_path):
    target, head = models
    batch = pack_right(PROMPTS, RESPONSES, pad_id=0)
    plan = plan_ttt(batch, 3, "sampled", anchors_per_row=2, generators=[torch.Generator() for _ in PROMPTS])
    cache = FeatureCache(tmp_path, cache_identity("tiny", target, head.aux_layer_ids))
    with pytest.raises(ValueError, match="data chains only"):
        ttt_forward(head, target, batch, plan, generators=[torch.Generator() for _ in PROMPTS], features=cache)


def test_cache_of_another_target_is_refused_and_a_damaged_file_computed_again(models, tmp_path):
    target, head = models
    identity = cache_identity("tiny", target, head.aux_layer_ids)
    cache = FeatureCache(tmp_path, identity)
    with pytest.raises(ValueError, match="holds features of"):
        FeatureCache(tmp_path, {**identity, "aux_layer_ids": [0, 1, 2]})
    row, other = [1, 2, 3], [1, 2, 4]
    cache.put(row, torch.ones(3, 6), torch.ones(3, 2))
    aux, final = cache.get(row)
    assert aux.shape == (3, 6) and final.shape == (3, 2)
    assert load_file(cache.path(row))["ids"].tolist() == row

    cache.path(other).parent.mkdir(exist_ok=True)
    cache.path(other).write_bytes(cache.path(row).read_bytes())  # a file holding another context
    with pytest.warns(UserWarning, match="computing it again"):
        assert cache.get(other) is None
    cache.path(row).write_bytes(b"not safetensors")  # cut by a crash or a full disk
    with pytest.warns(UserWarning, match="computing it again"):
        assert cache.get(row) is None
    assert not list(tmp_path.glob("*/.*"))  # no temporary files left behind


def feature_config(setup, out, **kw):
    # 4 prompts, 2 per step, 6 steps: every context (the target's own response) is seen 3 times.
    return config(setup, out, prompt_limit=4, mix_dataset=0.0, ttt_chain="data", steps=6, eval_every=100,
                  save_every=100, eval_num_prompts=1, eval_max_new_tokens=4, **kw)


def step_metrics(cfg) -> list[dict]:
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_training_from_cached_features_is_training_with_the_target(setup):
    root = setup[0]
    plain = feature_config(setup, root / "plain")
    cached = feature_config(setup, root / "cached", feature_cache=str(root / "features"))
    again = feature_config(setup, root / "again", feature_cache=str(root / "features"))  # another run, same cache
    for cfg in (plain, cached, again):
        train_eagle3(cfg, progress=False)
    want = step_metrics(plain)
    for cfg in (cached, again):
        got = step_metrics(cfg)
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
        want_weights = load_file(Path(plain.out_dir) / "checkpoint" / "drafter.safetensors")
        got_weights = load_file(Path(cfg.out_dir) / "checkpoint" / "drafter.safetensors")
        for key in want_weights:
            torch.testing.assert_close(got_weights[key], want_weights[key], rtol=1e-4, atol=1e-5)
    first = step_metrics(cached)
    assert [r["feature_rows_computed"] for r in first] == [2, 4, 4, 4, 4, 4]  # epoch 1 fills the cache
    assert first[-1]["feature_rows_read"] == 8 and first[-1]["target_tokens"] == 0
    assert [r["feature_rows_computed"] for r in step_metrics(again)] == [0] * 6  # served from the start
    assert sum(r["target_tokens"] for r in step_metrics(again)) == 0
    assert sum(r["target_tokens"] for r in want) > 0


def test_trainer_refuses_cached_features_with_sampled_chains(setup):
    root = setup[0]
    with pytest.raises(ValueError, match="feature_cache serves data chains only"):
        train_eagle3(config(setup, root / "bad", feature_cache=str(root / "f")), progress=False)  # sampled
