import json

from click.testing import CliRunner

from draftdistill.cli import main
from tiny import save_model_dir


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_prompts(path, n=3):
    path.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(n)))
    return path


def test_eval_reports_alpha_tau_and_writes_json_and_png(tmp_path):
    target = save_model_dir(tmp_path / "target", layers=2, seed=0)
    prompts = write_prompts(tmp_path / "p.jsonl")
    out, png = tmp_path / "r.json", tmp_path / "a.png"
    result = run("eval", "--target", str(target), "--drafter", "pruned:1", "--prompts", str(prompts),
                 "--max-new-tokens", "12", "--gamma", "3", "--json", str(out), "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert "alpha per position" in result.output and "speedup" in result.output
    report = json.loads(out.read_text())
    spec = report["speculative"]
    assert report["num_prompts"] == 3 and len(spec["alpha_per_position"]) == 3
    assert all(0.0 <= a <= 1.0 for a in spec["alpha_per_position"])
    assert 1.0 <= spec["tau"] <= 4.0
    assert report["target_only"]["new_tokens"] == spec["new_tokens"]  # greedy: same lengths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_with_target_as_drafter_accepts_everything(tmp_path):
    target = save_model_dir(tmp_path / "target", layers=2, seed=0)
    prompts = write_prompts(tmp_path / "p.jsonl", n=2)
    out = tmp_path / "r.json"
    result = run("eval", "--target", str(target), "--drafter", str(target), "--prompts", str(prompts),
                 "--max-new-tokens", "9", "--gamma", "2", "--json", str(out), "--no-baseline")
    assert result.exit_code == 0, result.output
    spec = json.loads(out.read_text())["speculative"]
    assert spec["alpha_per_position"] == [1.0, 1.0] and spec["tau"] == 3.0
    assert spec["accept_length"] == 3.0  # the peers' number: 1 + accepted drafts per verify step
    assert "accept length 3.000" in result.output and "tau 3.000" in result.output


def test_eval_with_a_draft_tree(tmp_path):
    """--tree-depth: the target as drafter keeps every path to full depth; the report names the tree."""
    target = save_model_dir(tmp_path / "target", layers=2, seed=0)
    prompts = write_prompts(tmp_path / "p.jsonl", n=2)
    out = tmp_path / "r.json"
    result = run("eval", "--target", str(target), "--drafter", str(target), "--prompts", str(prompts),
                 "--max-new-tokens", "9", "--tree-depth", "2", "--tree-top-k", "1", "--tree-max-nodes", "2",
                 "--json", str(out), "--no-baseline")
    assert result.exit_code == 0, result.output
    assert "tree depth 2 top-k 1" in result.output
    report = json.loads(out.read_text())
    assert report["tree"] == {"depth": 2, "top_k": 1, "max_nodes": 2} and report["gamma"] is None
    assert report["speculative"]["alpha_per_position"] == [1.0, 1.0] and report["speculative"]["tau"] == 3.0


def test_tree_option_defaults_are_tree_configs():
    from draftdistill.spec import TreeConfig

    defaults = {param.name: param.default for param in main.commands["eval"].params}
    assert (defaults["tree_top_k"], defaults["tree_max_nodes"]) == (TreeConfig.top_k, TreeConfig.max_nodes)


def test_building_the_cli_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, draftdistill.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_malformed_prompt_file_is_a_clear_error(tmp_path):
    target = save_model_dir(tmp_path / "target")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1"}\n{"prompt": \n')
    result = CliRunner().invoke(main, ["eval", "--target", str(target), "--drafter", "pruned:1",
                                       "--prompts", str(bad)])
    assert result.exit_code != 0
    assert f"{bad}:2: invalid JSON" in result.output and "Traceback" not in result.output


def test_missing_target_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["eval", "--target", str(tmp_path / "nope"), "--drafter", "pruned:1",
                                       "--prompts", str(write_prompts(tmp_path / "p.jsonl"))])
    assert result.exit_code != 0 and "nope" in result.output and "not found" in result.output


def test_help_explains_every_option():
    result = run("eval", "--help")
    for option in ("--target", "--drafter", "--prompts", "--gamma", "--temperature", "--top-p", "--tree-depth",
                   "--tree-top-k", "--tree-max-nodes", "--json", "--plot"):
        assert option in result.output


def test_train_and_opd_help_explain_every_config_key():
    from dataclasses import fields

    from draftdistill.opd import OPDConfig
    from draftdistill.train import DrafterConfig, Eagle3Config

    for command, config_class in (("train", DrafterConfig), ("train", Eagle3Config), ("opd", OPDConfig)):
        text = " ".join(run(command, "--help").output.split())  # unwrapped
        for f in fields(config_class):
            assert f"{f.name} " in text, (command, f.name)
    opd = " ".join(run("opd", "--help").output.split())
    # A field's comment, its continuation line and its default all reach the help.
    assert ("rollout_server URL(s) of SGLang servers with the student's architecture (comma list: a pool, rows "
            "round-robin, torchrun rank r starting on server r): student rollouts come from them") in opd
    assert "adaptive_validation adaptive: prompts held out of training for the validation loss [default: 8]" in opd
    assert "teacher_parallel" in " ".join(run("train", "--help").output.split())


def test_config_file_sets_defaults_and_command_line_overrides(tmp_path):
    target = save_model_dir(tmp_path / "target", layers=2, seed=0)
    out = tmp_path / "r.json"
    config = tmp_path / "c.yaml"
    config.write_text(f"target: {target}\ndrafter: pruned:1\nprompts: {write_prompts(tmp_path / 'p.jsonl', n=2)}\n"
                      f"max_new_tokens: 8\ngamma: 2\njson: {out}\nbaseline: false\n")
    result = run("eval", "--config", str(config), "--gamma", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["gamma"] == 3 and report["max_new_tokens"] == 8 and "target_only" not in report


def test_config_with_unknown_key_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("drafter: pruned:1\ngama: 3\n")
    result = CliRunner().invoke(main, ["eval", "--config", str(config)])
    assert result.exit_code != 0 and "unknown keys ['gama']" in result.output


def test_train_command_reads_config_and_overrides(tmp_path):
    target = save_model_dir(tmp_path / "target", layers=2, seed=0)
    prompts = write_prompts(tmp_path / "p.jsonl", n=6)
    config = tmp_path / "c.yaml"
    config.write_text(f"target: {target}\ndrafter: pruned:1\nprompts: {prompts}\neval_prompts: {prompts}\n"
                      f"steps: 50\nresponse_tokens: 4\nbatch_size: 2\neval_num_prompts: 2\neval_max_new_tokens: 5\n"
                      f"device: cpu\nout_dir: {tmp_path / 'run'}\n")
    result = run("train", str(config), "steps=2", "eval_every=1", "divergence=jsd:beta=0.5", "--quiet")
    assert result.exit_code == 0, result.output
    assert "held-out tau before" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tau_after"] is not None
    bad = CliRunner().invoke(main, ["train", str(config), "divergence=kl2"])
    assert bad.exit_code != 0 and "unknown divergence 'kl2'" in bad.output


def test_train_without_a_file_takes_overrides_and_names_a_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["train", "stpes=3"])
    assert result.exit_code == 2 and "error: command line: unknown config key 'stpes'" in result.output
    result = CliRunner().invoke(main, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0 and "nope.yaml does not exist" in result.output
