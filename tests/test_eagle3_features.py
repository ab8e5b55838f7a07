"""The EAGLE-3 offline mode (train/feature_cache.py): TTT rows computed from cached target features
are the rows computed with the target in the loop, the target's layers do not run on a cached
batch, a cache of another target is refused, a damaged file is computed again, and a training run
reading the cache trains exactly like one running the target."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_spec import tiny_llama
from tiny import save_model_dir

from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import build_eagle3_head
from draftdistill.train import DrafterOPDConfig, train_drafter
from draftdistill.train.feature_cache import FeatureCache, cache_identity
from draftdistill.train.ttt import pack_right, plan_ttt, ttt_forward

PROMPTS = [[3, 5, 7], [4, 6, 8, 10], [9, 2]]
RESPONSES = [[11, 13, 15, 17, 19, 21], [12, 14, 16], [20, 22, 24, 26, 28]]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    target = tiny_llama(32, seed=0, layers=5)
    head = build_eagle3_head(target, DraftVocab(list(range(0, 32, 2)) + [31], 32), seed=1)
    with torch.no_grad():
        for p in head.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return target, head


class LayerCalls:
    """Counts forwards of the target's first decoder layer."""

    def __init__(self, target):
        self.n = 0
        target.model.layers[0].register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def test_cached_features_give_the_rows_of_the_target_in_the_loop(models, tmp_path):
    target, head = models
    calls = LayerCalls(target)
    batch = pack_right(PROMPTS, RESPONSES, pad_id=0)
    plan = plan_ttt(batch, 3, "data")
    cache = FeatureCache(tmp_path / "features", cache_identity("tiny", target, head.aux_layer_ids))
    with torch.no_grad():
        want, want_tokens = ttt_forward(head, target, batch, plan)
        first, first_tokens = ttt_forward(head, target, batch, plan, features=cache)  # computes and stores
        assert (cache.rows_computed, cache.rows_read, first_tokens) == (3, 0, want_tokens)
        assert len(list((tmp_path / "features").glob("*/*.safetensors"))) == 3
        before = calls.n
        got, got_tokens = ttt_forward(head, target, batch, plan, features=cache)  # reads
    assert calls.n == before and got_tokens == 0  # the target's layers did not run
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


# ---------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3-features")
    target = save_model_dir(root / "target", layers=5, seed=0)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{(i * 7) % 29} w{(i * 3) % 29}",
                                           "answer": f"w{i % 5} w{i % 7} w{i % 3}"}) + "\n" for i in range(8)))
    return root, target, prompts


def config(setup, out, **kw):
    root, target, prompts = setup
    # 4 prompts, 2 per step, 6 steps: every context is seen 3 times (the target's own responses).
    base = dict(target=str(target), drafter="eagle3", prompts=str(prompts), prompt_limit=4,
                eval_prompts=str(prompts), mix_dataset=0.0, mix_target=1.0, mix_drafter=0.0, divergence="fkl",
                ttt_steps=3, ttt_chain="data", draft_vocab_size=20, response_tokens=6, batch_size=2, steps=6,
                eval_every=100, save_every=100, eval_num_prompts=1, eval_max_new_tokens=4,
                out_dir=str(root / out), device="cpu", lr=1e-2, warmup_steps=1)
    base.update(kw)
    return DrafterOPDConfig(**base)


def metrics(cfg) -> list[dict]:
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_training_from_cached_features_is_training_with_the_target(setup):
    root = setup[0]
    plain = config(setup, root / "plain")
    cached = config(setup, root / "cached", feature_cache=str(root / "features"))
    again = config(setup, root / "again", feature_cache=str(root / "features"))  # another run, same cache
    for cfg in (plain, cached, again):
        train_drafter(cfg, progress=False)
    want = metrics(plain)
    for cfg in (cached, again):
        got = metrics(cfg)
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
        want_weights = load_file(Path(plain.out_dir) / "checkpoint" / "drafter.safetensors")
        got_weights = load_file(Path(cfg.out_dir) / "checkpoint" / "drafter.safetensors")
        for key in want_weights:
            torch.testing.assert_close(got_weights[key], want_weights[key], rtol=1e-4, atol=1e-5)
    first = metrics(cached)
    assert [r["feature_rows_computed"] for r in first] == [2, 4, 4, 4, 4, 4]  # epoch 1 fills the cache
    assert first[-1]["feature_rows_read"] == 8 and first[-1]["target_tokens"] == 0
    assert [r["feature_rows_computed"] for r in metrics(again)] == [0] * 6  # served from the start
    assert sum(r["target_tokens"] for r in metrics(again)) == 0
    assert sum(r["target_tokens"] for r in want) > 0


def test_trainer_refuses_cached_features_with_sampled_chains(setup):
    root = setup[0]
    with pytest.raises(ValueError, match="feature_cache serves data chains only"):
        train_drafter(config(setup, root / "bad", ttt_chain="sampled", feature_cache=str(root / "f")), progress=False)
