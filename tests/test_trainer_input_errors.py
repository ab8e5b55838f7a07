"""Careless and hostile input to the trainers and the CLI: every case gets one named line (`error:
FILE[:LINE]: what is wrong`, exit code 2, no traceback), before any model loads where that is
possible; a run directory is used by one run at a time; an unreadable checkpoint is never silently
trained over; a resumed run logs each step once. (Checkpoint internals: test_checkpoint_safety.py;
model and prompt files: test_file_errors.py; the server: test_serving_limits.py.)"""
from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner

from draftdistill.cli import main
from draftdistill.train import ConfigError, DrafterConfig, load_config, train_drafter
from tiny import kill_at_optimizer_step, save_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    target = save_model_dir(root / "target", layers=2, seed=0)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{(i * 7) % 29}", "answer": f"w{i % 5}"}) + "\n"
                               for i in range(12)))
    return root, target, prompts


def config(setup, out, **kw) -> DrafterConfig:
    root, target, prompts = setup
    base = dict(target=str(target), drafter="pruned:1", prompts=str(prompts), eval_prompts=str(prompts),
                response_tokens=4, batch_size=2, steps=4, eval_every=4, save_every=2, eval_num_prompts=2,
                eval_max_new_tokens=4, out_dir=str(root / out), device="cpu", lr=1e-2, warmup_steps=1)
    base.update(kw)
    return DrafterConfig(**base)


def cli(*args):
    return CliRunner().invoke(main, list(args))


def no_model_loads(monkeypatch):
    """Any model load fails the test: the error must come first."""
    import draftdistill.train.drafter as drafter

    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the config was refused")

    monkeypatch.setattr(drafter, "load_target", refuse)


@pytest.mark.parametrize("override,key", [("steps=-5", "steps"), ("eval_every=0", "eval_every"),
                                          ("batch_size=0", "batch_size"), ("lr=-1", "lr"),
                                          ("gamma=0", "gamma"), ("eval_temperature=-1", "eval_temperature"),
                                          ("divergence=nope", "unknown divergence"),
                                          ("mix_dataset=0", "one positive weight")])
def test_out_of_range_values_are_refused_when_the_config_is_read(setup, monkeypatch, override, key):
    no_model_loads(monkeypatch)
    extra = ["mix_drafter=0", "mix_target=0"] if key == "one positive weight" else []
    result = cli("train", f"out_dir={setup[0] / 'never'}", override, *extra)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: command line: ") and key in result.output
    assert "Traceback" not in result.output
    assert not (setup[0] / "never").exists()  # nothing was written either


def test_broken_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("steps: 3\nlr: [1e-3\ndrafter: pruned:1\n")
    result = cli("train", str(path))
    assert result.exit_code == 2 and result.output.startswith(f"error: {path}:")
    line = int(result.output.split(f"{path}:")[1].split(":")[0])
    assert line in (2, 3) and "invalid YAML" in result.output  # where the parser noticed the open list
    path.write_text("- just\n- a list\n")
    result = cli("train", str(path))
    assert result.exit_code == 2 and "expected a mapping of config keys" in result.output


def test_a_mistake_is_blamed_on_where_it_was_made(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("steps: many\n")
    with pytest.raises(ConfigError, match=f"^{path}: config key 'steps' expects int"):
        load_config(DrafterConfig, path)
    path.write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="^command line: config key 'lr' expects float"):
        load_config(DrafterConfig, path, ["lr=fast"])
    with pytest.raises(ConfigError, match=f"^{path} with the command line's overrides: steps must be >= 1"):
        load_config(DrafterConfig, path, ["steps=0"])


def test_a_prompt_longer_than_the_context_is_refused_before_training(setup):
    root = setup[0]
    long = root / "long.jsonl"  # the tiny target's context is 256 positions
    long.write_text(json.dumps({"prompt": " ".join(["w1"] * 300)}) + "\n")
    result = cli("train", *[f"{k}={v}" for k, v in {
        "target": setup[1], "drafter": "pruned:1", "prompts": long, "eval_prompts": setup[2], "steps": 1,
        "out_dir": root / "long-run", "device": "cpu"}.items()])
    assert result.exit_code == 2, result.output
    assert f"error: {long}: prompt 0 has" in result.output and "over the model's context of 256" in result.output
    assert not (root / "long-run" / "metrics.jsonl").exists()


def test_a_prompt_file_that_is_not_utf8_is_named_with_its_line(setup):
    root = setup[0]
    bad = root / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    result = cli("train", f"prompts={bad}", f"target={setup[1]}", f"out_dir={root / 'bad-prompts'}", "device=cpu")
    assert result.exit_code == 2 and f"\nerror: {bad}:2: not UTF-8" in result.output, result.output


def test_a_second_run_on_the_same_out_dir_is_refused(setup, monkeypatch):
    """The first run holds OUT_DIR's lock for its whole life: a second one stops with a named error
    before loading anything, and the first run's files are untouched."""
    cfg = config(setup, "locked", steps=2, eval_every=2)
    started, release = threading.Event(), threading.Event()
    import draftdistill.train.drafter as drafter

    original = drafter.load_target

    def slow_load(*args, **kwargs):
        started.set()
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(drafter, "load_target", slow_load)
    first = threading.Thread(target=train_drafter, args=(cfg,), kwargs={"progress": False})
    first.start()
    try:
        assert started.wait(60)
        result = cli("train", *[f"{f}={getattr(cfg, f)}" for f in ("target", "drafter", "prompts", "eval_prompts",
                                                                    "out_dir", "device")])
        assert result.exit_code == 2 and "error: " in result.output and "in use" in result.output, result.output
    finally:
        release.set()
        first.join(120)
    assert json.loads((setup[0] / "locked" / "summary.json").read_text())["steps"] == 2


def test_an_unreadable_checkpoint_stops_the_run_until_resume_is_false(setup):
    cfg = config(setup, "broken", steps=2, eval_every=2, save_every=2)
    train_drafter(cfg, progress=False)
    state = setup[0] / "broken" / "checkpoint" / "trainer_state.json"
    state.write_text("{ not json")
    before = (setup[0] / "broken" / "checkpoint" / "drafter.safetensors").read_bytes()
    longer = config(setup, "broken", steps=4, eval_every=4, save_every=2)
    with pytest.raises(ValueError, match="trainer_state.json.*resume=false"):
        train_drafter(longer, progress=False)
    assert (setup[0] / "broken" / "checkpoint" / "drafter.safetensors").read_bytes() == before  # untouched
    summary = train_drafter(config(setup, "broken", steps=4, eval_every=4, save_every=2, resume=False),
                            progress=False)
    assert summary["steps"] == 4 and json.loads(state.read_text())["step"] == 4


def test_a_killed_run_resumes_and_logs_each_step_once(setup, monkeypatch):
    """Killed at step 3 (after the step-2 checkpoint, with step 3's row possibly written): the resumed
    run rewrites from step 3, so metrics.jsonl has steps 1..4 once each, in order."""
    cfg = config(setup, "once", steps=4, eval_every=100, save_every=2)
    kill_at_optimizer_step(monkeypatch, lambda: train_drafter(cfg, progress=False))
    rows = [json.loads(line) for line in (setup[0] / "once" / "metrics.jsonl").read_text().splitlines()]
    (setup[0] / "once" / "metrics.jsonl").open("a").write(json.dumps({"step": 3, "loss": 9.9}) + "\n")  # a stale row
    train_drafter(cfg, progress=False)
    rows = [json.loads(line) for line in (setup[0] / "once" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4] and all(r.get("loss") != 9.9 for r in rows)
