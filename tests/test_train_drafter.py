import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from draftdistill.train import DrafterConfig, load_config, train_drafter
from tiny import kill_at_optimizer_step, save_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    target = save_model_dir(root / "target", layers=3, seed=0)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{(i * 7) % 29} w{(i * 3) % 29}",
                                           "answer": f"w{i % 5} w{i % 7}"}) + "\n" for i in range(40)))
    return root, target, prompts


def config(setup, out, **kw):
    root, target, prompts = setup
    base = dict(target=str(target), drafter="pruned:1", prompts=str(prompts), eval_prompts=str(prompts),
                response_tokens=6, batch_size=2, steps=4, eval_every=2, save_every=2, eval_num_prompts=2,
                eval_max_new_tokens=6, out_dir=str(out), device="cpu", lr=1e-2, warmup_steps=1)
    base.update(kw)
    return DrafterConfig(**base)


def test_training_logs_checkpoints_and_exports_a_loadable_drafter(setup):
    root = setup[0]
    cfg = config(setup, root / "run", mix_dataset=1.0, mix_target=1.0, mix_drafter=1.0, divergence="fkl")
    summary = train_drafter(cfg, progress=False)
    out = root / "run"
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [1, 2, 3, 4]
    assert all(l["loss"] >= 0 and 0 <= l["est_alpha"] <= 1 for l in train_lines)
    assert [l["step"] for l in lines if "eval_tau" in l] == [0, 2, 4]
    assert summary["tau_before"] >= 1 and summary["best_tau"] >= summary["tau_before"]
    best = AutoModelForCausalLM.from_pretrained(out / "best")  # a plain HF directory
    assert best.config.num_hidden_layers == 1 and (out / "best" / "tokenizer.json").is_file()
    assert (out / "alpha_per_position.png").read_bytes()[:4] == b"\x89PNG"


def test_training_reduces_the_divergence_on_fixed_data(setup):
    root = setup[0]
    four = root / "four.jsonl"  # batch_size 4 over 4 prompts: the same batch every step
    four.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 3}", "answer": f"w{i + 1} w{i + 2} w{i}"}) + "\n"
                            for i in range(4)))
    cfg = config(setup, root / "fixed", drafter="small:layers=1,hidden=16,heads=2,kv_heads=1,intermediate=32",
                 prompts=str(four), mix_dataset=1.0, mix_drafter=0.0, divergence="tvd", steps=15,
                 eval_every=100, save_every=100, batch_size=4)
    train_drafter(cfg, progress=False)
    rows = [json.loads(l) for l in (root / "fixed" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_killed_run_resumes_exactly(setup, monkeypatch):
    root = setup[0]
    train_drafter(config(setup, root / "straight"), progress=False)
    expected = load_file(root / "straight" / "checkpoint" / "drafter.safetensors")

    kill_at_optimizer_step(monkeypatch, lambda: train_drafter(config(setup, root / "killed"), progress=False))
    state = json.loads((root / "killed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2  # the checkpoint written before the kill is intact
    train_drafter(config(setup, root / "killed"), progress=False)
    resumed = load_file(root / "killed" / "checkpoint" / "drafter.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("divergence: jsd:beta=0.5\nsteps: 10\nlr: 1e-4\n")
    cfg = load_config(DrafterConfig, path, ["steps=3", "drafter=pruned:4", "lr=0.001", "rejected_only=true"])
    assert (cfg.steps, cfg.drafter, cfg.lr, cfg.rejected_only, cfg.divergence) == (3, "pruned:4", 0.001, True,
                                                                                   "jsd:beta=0.5")
    with pytest.raises(ValueError, match="unknown config key 'stpes'"):
        load_config(DrafterConfig, path, ["stpes=3"])


def test_config_numbers_in_exponent_form_and_wrong_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nwarmup_steps: 2\n")  # YAML 1.1 reads 1e-4 as a string
    assert load_config(DrafterConfig, path, ["loss_temperature=2"]).lr == 1e-4
    assert load_config(DrafterConfig, path, ["lr=3e-3"]).lr == 3e-3
    with pytest.raises(ValueError, match="'steps' expects int, got 'many'"):
        load_config(DrafterConfig, path, ["steps=many"])
    with pytest.raises(ValueError, match="'lr' expects float"):
        load_config(DrafterConfig, path, ["lr=fast"])


def test_target_responses_are_shared_through_the_cache_file(setup, tmp_path):
    cache = tmp_path / "target.jsonl"
    common = dict(mix_target=1.0, mix_drafter=0.0, steps=2, eval_every=100, save_every=2, target_cache=str(cache),
                  prompt_limit=4)
    train_drafter(config(setup, tmp_path / "first", **common), progress=False)
    lines = cache.read_text().splitlines()
    assert len(lines) == 4  # 2 steps x batch 2 over a pool of 4 prompts
    with cache.open("a") as f:
        f.write('{"key": "cut mid-wr')  # a killed writer's last line is skipped, not fatal
    train_drafter(config(setup, tmp_path / "second", **common), progress=False)
    assert cache.read_text().splitlines()[:4] == lines and len(cache.read_text().splitlines()) == 5
    first = load_file(tmp_path / "first" / "checkpoint" / "drafter.safetensors")
    second = load_file(tmp_path / "second" / "checkpoint" / "drafter.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    rows = [json.loads(l) for l in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert rows[-1]["target_rollout_tokens"] > 0  # read from the file, still counted in the budget


@pytest.mark.parametrize("name", ["quickstart", "distillspec-tvd", "offline-fkl"])
def test_shipped_training_recipes_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = load_config(DrafterConfig, path)
    assert isinstance(cfg.lr, float) and cfg.steps > 0 and cfg.out_dir.startswith("runs/")
