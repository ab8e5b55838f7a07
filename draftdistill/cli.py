"""The ``draftdistill`` command line."""
from __future__ import annotations

import json
import os
import sys
import typing
from pathlib import Path

import click

from draftdistill.decoding_options import tree_config, tree_options

DEFAULT_TARGET = "smollm2-135m-instruct"
class UserError(click.ClickException):
    """A mistake in what the user gave (a file, a value): one line on stderr, exit code 2, no traceback."""
    exit_code = 2

    def format_message(self) -> str:
        return self.message

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: ValueError covers our named errors (ConfigError,
    CheckpointError, PromptFileError, TokenizerMismatchError, JSON and UTF-8 decoding errors)."""
    import yaml
    from safetensors import SafetensorError

    from draftdistill.train.run_lock import RunDirBusy

    return (ValueError, TypeError, OSError, yaml.YAMLError, SafetensorError, RunDirBusy)


def user_error_message(error: BaseException) -> str:
    """`FILE[:LINE]: what is wrong`: our errors already start with the file; OSError gets its path."""
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror or error}"
    return str(error) or type(error).__name__


class CLI(click.Group):
    """The command group: every user-caused error of any command becomes `error: ...`, exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.ClickException:
            raise
        except user_errors() as error:
            raise UserError(user_error_message(error)) from error


def fail_clearly(fn):
    """Kept for the commands' decorators: the CLI group already turns user errors into one line."""
    return fn


def setup(target_spec: str, prompts: str, num_prompts: int, device: str | None, max_new_tokens: int = 0):
    """Load the target, its tokenizer and encoded prompts (prompts first: a bad file fails fast)."""
    from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
    from draftdistill.data.chat import check_fits_context
    from draftdistill.models import default_device, load_target

    prompt_list = load_prompts(prompts, limit=num_prompts)
    device = device or default_device()
    target, tokenizer = load_target(target_spec, device=device)
    ids = [encode_prompt(tokenizer, p).to(device) for p in prompt_list]
    check_fits_context(ids, max_new_tokens, target, prompts, "--max-new-tokens")
    return target, tokenizer, ids, stop_token_ids(tokenizer, target), device


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def fmt(value, spec=".3f") -> str:
    """A number for humans; positions never reached have no acceptance rate (None)."""
    return "n/a" if value is None else format(value, spec)


def load_config(ctx: click.Context, _param, path: str | None):
    """``--config FILE.yaml``: its keys become the command's defaults; explicit options override them.
    Read by the same loader as every config in configs/ (errors name the file and line)."""
    if path is None:
        return None
    from draftdistill.train.config import ConfigError, read_yaml_mapping

    try:
        values = read_yaml_mapping(path)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    # A key is an option's long name (``max_new_tokens`` or ``max-new-tokens``, ``json``).
    param_of = {opt.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params for opt in p.opts}
    keys = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(keys) - set(param_of))
    if unknown:
        raise click.BadParameter(f"{path}: unknown keys {unknown}")
    ctx.default_map = {**(ctx.default_map or {}), **{param_of[k]: v for k, v in keys.items()}}
    return path


config_option = click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=load_config,
                             is_eager=True, expose_value=False,
                             help="YAML file of option values (e.g. configs/eval-pruned2.yaml); "
                                  "options given on the command line override it.")
target_option = click.option("--target", default=DEFAULT_TARGET, show_default=True,
                             help="Target model: builtin name, HF directory, .gguf file or .safetensors checkpoint.")
prompts_option = click.option("--prompts", default="gsm8k:heldout", show_default=True,
                              help="Prompt source: bundled 'gsm8k[:train|:heldout]' or a .jsonl/.json/.txt file.")
num_prompts_option = click.option("--num-prompts", default=20, show_default=True, help="Use the first N prompts.")
max_new_option = click.option("--max-new-tokens", default=64, show_default=True, help="Tokens generated per prompt.")
gamma_option = click.option("--gamma", default=4, show_default=True, help="Draft tokens proposed per target forward.")
seed_option = click.option("--seed", default=0, show_default=True, help="Sampling seed (prompt i uses seed + i).")
device_option = click.option("--device", default=None, help="cpu or cuda[:N]; default: cuda if available, else cpu.")


@click.group(cls=CLI)
@click.version_option(package_name="draftdistill")
def main():
    """Train speculative-decoding drafters and LLM students by on-policy distillation."""


@main.command("eval")
@config_option
@target_option
@click.option("--drafter", required=True,
              help="Drafter: 'pruned:K' (first K target layers), 'small:layers=2,hidden=256,...', 'eagle3' (a fresh "
                   "EAGLE-3 head), or a path (an HF directory, or an exported EAGLE-3 directory).")
@prompts_option
@num_prompts_option
@max_new_option
@gamma_option
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling threshold, applied to both models.")
@tree_options
@seed_option
@device_option
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also decode with the target alone to measure the speedup.")
@click.option("--json", "json_out", default=None, help="Write the full report to this JSON file.")
@click.option("--plot", default=None, help="Write a PNG of alpha per draft position here.")
@fail_clearly
def eval_command(target, drafter, prompts, num_prompts, max_new_tokens, gamma, temperature, top_p, tree_depth,
                 tree_top_k, tree_max_nodes, seed, device, baseline, json_out, plot):
    """Measure a drafter on the lossless speculative decoder: alpha per position, accept length (1 + accepted
    drafts per verify step, the peers' number), tau (tokens per target call), tokens/s, speedup."""
    from draftdistill.eval import evaluate_drafter, plot_alpha_per_position
    from draftdistill.eval.machine import machine_info
    from draftdistill.models import load_drafter
    from draftdistill.spec import SamplingConfig

    target_model, tokenizer, ids, eos, device = setup(target, prompts, num_prompts, device, max_new_tokens)
    drafter_model = load_drafter(drafter, target_model, tokenizer)
    tree = tree_config(tree_depth, tree_top_k, tree_max_nodes)
    report = evaluate_drafter(target_model, drafter_model, ids, gamma=gamma,
                              sampling=SamplingConfig(temperature=temperature, top_p=top_p),
                              max_new_tokens=max_new_tokens, eos_token_id=eos, seed=seed, baseline=baseline, tree=tree)
    report.update(target=target, drafter=drafter, prompts=prompts, command=" ".join(sys.argv),
                  machine=machine_info(device))
    spec = report["speculative"]
    shape = f"tree depth {tree.depth} top-k {tree.top_k} <= {tree.max_nodes} nodes" if tree else f"gamma {gamma}"
    click.echo(f"drafter {drafter} on {target}: {len(ids)} prompts, {shape}, T={temperature}")
    click.echo("alpha per position: " + "  ".join(fmt(a) for a in spec["alpha_per_position"]))
    click.echo(f"alpha {fmt(spec['alpha'])}   accept length {fmt(spec['accept_length'])} "
               f"(1 + accepted/verify step)   tau {fmt(spec['tau'])} tokens/target call   "
               f"{spec['tokens_per_second']:.1f} tokens/s")
    if baseline:
        click.echo(f"target-only {report['target_only']['tokens_per_second']:.1f} tokens/s   "
                   f"speedup {report['speedup']:.2f}x")
    if json_out:
        write_json(json_out, report)
        click.echo(f"wrote {json_out}")
    if plot:
        plot_alpha_per_position({drafter: spec["alpha_per_position"]}, plot,
                                title=f"{target}, {shape}, T={temperature}")
        click.echo(f"wrote {plot}")


def first_rank() -> bool:
    """Rank 0 of a torchrun job (or no torchrun): the one process that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def echo(message: str) -> None:
    if first_rank():
        click.echo(message)


def field_notes(config_class) -> dict[str, str]:
    """Each field's explanation: its comment in the source of the class that declares it (a comment
    line right below a field continues it); a subclass's comment wins."""
    import inspect

    notes: dict[str, str] = {}
    for cls in reversed([c for c in config_class.__mro__ if c is not object]):
        current = None
        for line in inspect.getsource(cls).splitlines():
            code, _, comment = line.strip().partition("# ")
            field_name = code.split(":", 1)[0]
            if code and field_name.isidentifier() and ":" in code and not code.startswith(("def ", "class ")):
                current, notes[field_name] = field_name, comment.strip()
            elif not code and current and comment and not comment.startswith("---"):
                notes[current] = f"{notes[current]} {comment.strip()}".strip()
            else:
                current = None
    return notes


def config_keys(config_class, skip: typing.Collection[str] = ()) -> list[tuple[str, str]]:
    """(key, "explanation [default: value]") for every field of a config dataclass but `skip`."""
    import dataclasses

    notes = field_notes(config_class)
    rows = []
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append((f.name, f"{notes.get(f.name, '')} [default: {default!r}]".strip()))
    return rows


class ConfigCommand(click.Command):
    """A command whose key=value overrides are the fields of config classes, listed in --help
    (imported only when help is shown): `config_classes` is a list of (section title, "module:Class"),
    and a later section lists only the keys the earlier ones did not (or whose default differs)."""

    def __init__(self, *args, config_classes: list[tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.config_classes = config_classes

    def format_epilog(self, ctx, formatter):
        import dataclasses
        import importlib

        shown: dict[str, object] = {}
        for title, where in self.config_classes:
            module, _, name = where.partition(":")
            cls = getattr(importlib.import_module(module), name)
            defaults = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
                        for f in dataclasses.fields(cls)}
            skip = {k for k, v in defaults.items() if k in shown and shown[k] == v}
            with formatter.section(title):
                formatter.write_dl(config_keys(cls, skip))
            shown.update(defaults)
        super().format_epilog(ctx, formatter)


def config_from_cli(config_class, config: str | None, overrides: tuple):
    """CONFIG [key=value ...] -> the config dataclass (CONFIG may be left out: overrides only),
    validated and echoed so a run's log records every setting."""
    from dataclasses import fields

    from draftdistill.train import load_config

    config, overrides = split_config_argument(config, overrides)
    cfg = load_config(config_class, config, overrides)
    echo("config: " + ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)))
    return cfg


def split_config_argument(config: str | None, overrides: tuple) -> tuple[str | None, tuple]:
    """CONFIG is optional: `draftdistill train steps=3` has only overrides."""
    if config and "=" in config and not Path(config).is_file():
        return None, (config, *overrides)
    if config and not Path(config).is_file():
        raise click.BadParameter(f"config file {config} does not exist", param_hint="CONFIG")
    return config, overrides


def drafter_trainer(config: str | None, overrides: tuple):
    """The CLI picks the trainer from the `drafter` key: an EAGLE-3 head (eagle3, or an EAGLE-3
    directory) trains with the EAGLE-3 trainer, anything else with the standalone drafter trainer."""
    from draftdistill.models import is_eagle3_drafter
    from draftdistill.train import DrafterConfig, Eagle3Config, train_drafter, train_eagle3
    from draftdistill.train.config import read_yaml_mapping

    config, overrides = split_config_argument(config, overrides)
    drafter = str((read_yaml_mapping(config) if config else {}).get("drafter", DrafterConfig.drafter))
    for item in overrides:
        if item.startswith("drafter="):
            drafter = item.partition("=")[2]
    return (Eagle3Config, train_eagle3) if is_eagle3_drafter(drafter) else (DrafterConfig, train_drafter)


@main.command("train", cls=ConfigCommand, context_settings={"ignore_unknown_options": True},
              config_classes=[("Keys of both drafter trainers (key=value on the command line, or in CONFIG)",
                               "draftdistill.train.drafting:DraftConfig"),
                              ("Standalone drafters only", "draftdistill.train.drafter:DrafterConfig"),
                              ("EAGLE-3 heads only (drafter=eagle3 or an EAGLE-3 directory)",
                               "draftdistill.train.eagle3:Eagle3Config")])
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(config, overrides, quiet):
    """Distil a drafter on-policy: draftdistill train CONFIG.yaml [key=value ...].

    CONFIG is a recipe from configs/ (e.g. configs/distillspec-tvd.yaml); each key=value overrides
    one of its fields (e.g. steps=200 divergence=jsd:beta=0.5 drafter=pruned:4). The `drafter` key
    picks the trainer: an EAGLE-3 head (eagle3, or an EAGLE-3 directory) trains with training-time
    test on the target's hidden states, any other drafter with the standalone drafter trainer.
    Metrics go to OUT_DIR/metrics.jsonl and OUT_DIR/tensorboard, checkpoints to OUT_DIR/checkpoint
    (resumed when present; a checkpoint that cannot be read stops the run unless resume=false), the
    best drafter by held-out tau to OUT_DIR/best (an HF directory, or SGLang's EAGLE3 format).
    Under torchrun (torchrun --nproc-per-node N -m draftdistill.cli train ...) every rank trains on
    its slice of the global batch (batch_size per rank); see the README, "Multi-GPU and multi-node".
    A torchrun job's sharded checkpoint is torch.distributed.checkpoint, whose metadata is pickle: it
    is read only when the checkpoint's trainer_state.json says this trainer wrote it that way.
    """
    from draftdistill.train import distributed

    config_class, train = drafter_trainer(config, overrides)
    cfg = config_from_cli(config_class, config, overrides)
    try:
        summary = train(cfg, progress=not quiet)
    finally:
        distributed.close()
    echo(f"held-out tau before {fmt(summary['tau_before'])}, after {fmt(summary['tau_after'])}, "
         f"best {fmt(summary['best_tau'])}  (gamma {cfg.gamma}, T={cfg.eval_temperature:g}, "
         f"{cfg.eval_num_prompts} prompts)")
    echo(f"best drafter: {cfg.out_dir}/best   metrics: {cfg.out_dir}/metrics.jsonl" +
         (f"   plot: {summary['plot']}" if summary.get("plot") else ""))


@main.command("opd", cls=ConfigCommand, context_settings={"ignore_unknown_options": True},
              config_classes=[("Keys (key=value on the command line, or in CONFIG)",
                               "draftdistill.opd.config:OPDConfig")])
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def opd_command(config, overrides, quiet):
    """Distil a full LLM student on-policy: draftdistill opd CONFIG.yaml [key=value ...].

    CONFIG is a recipe from configs/opd/ (tinker-opd, gkd, minillm, distillm, gopd, aopd,
    entropy-switch, opsd-*, sdpo-feedback, mopd, opd-verifier, sft; see configs/opd/README.md); each
    key=value overrides one field (e.g. student=PATH teacher=PATH steps=200 objective=opd:clip=0.2).
    Metrics go to OUT_DIR/metrics.jsonl, checkpoints to OUT_DIR/checkpoint (resumed when present),
    the trained student to OUT_DIR/final (a plain HF directory). Runs under torchrun like `train`.
    """
    from draftdistill.opd import OPDConfig, train_opd
    from draftdistill.train import distributed

    cfg = config_from_cli(OPDConfig, config, overrides)
    try:
        summary = train_opd(cfg, progress=not quiet)
    finally:
        distributed.close()
    echo(f"trained {summary['steps']} steps ({cfg.objective}); student: {summary['final']}   "
         f"metrics: {cfg.out_dir}/metrics.jsonl")

@main.group()
def bench():
    """Benchmarks that write benchmarks/results/*.json with command, machine, date and numbers."""


@bench.command("spec")
@config_option
@target_option
@click.option("--drafters", default="pruned:1,pruned:2,pruned:4", show_default=True,
              help="Comma-separated drafter specs to compare.")
@click.option("--temperatures", default="0,1", show_default=True, help="Comma-separated temperatures.")
@prompts_option
@num_prompts_option
@max_new_option
@gamma_option
@seed_option
@device_option
@click.option("--out", default="benchmarks/results/spec_decoder.json", show_default=True, help="Result JSON.")
@click.option("--plot", default="benchmarks/results/spec_decoder_alpha.png", show_default=True,
              help="PNG of alpha per position for every drafter and temperature.")
@fail_clearly
def bench_spec(target, drafters, temperatures, prompts, num_prompts, max_new_tokens, gamma, seed, device, out, plot):
    """Our lossless decoder vs HF assisted generation (same drafter, same run) vs target-only decoding."""
    from draftdistill.eval import plot_alpha_per_position
    from draftdistill.eval.bench_spec import run_spec_benchmark
    from draftdistill.eval.machine import machine_info
    from draftdistill.models import load_drafter

    target_model, tokenizer, ids, eos, device = setup(target, prompts, num_prompts, device, max_new_tokens)
    drafter_models = {spec: load_drafter(spec, target_model, tokenizer) for spec in drafters.split(",")}
    temps = [float(t) for t in temperatures.split(",")]
    rows = run_spec_benchmark(target_model, drafter_models, ids, temperatures=temps, gamma=gamma,
                              max_new_tokens=max_new_tokens, eos_token_id=eos, seed=seed)
    write_json(out, {"name": "spec_decoder", "command": "draftdistill " + " ".join(sys.argv[1:]),
                     "machine": machine_info(device), "target": target, "prompts": prompts,
                     "num_prompts": len(ids), "max_new_tokens": max_new_tokens, "rows": rows})
    plot_alpha_per_position({f"{r['drafter']} T={r['temperature']:g}": r["ours"]["alpha_per_position"] for r in rows},
                            plot, title=f"{target}, gamma {gamma}")
    click.echo(f"{'drafter':<10} {'T':>3} {'tau':>6} {'hf tau':>7} {'tok/s':>7} {'hf tok/s':>9} "
               f"{'target tok/s':>13} {'speedup':>8}")
    for r in rows:
        click.echo(f"{r['drafter']:<10} {r['temperature']:>3g} {r['ours']['tau']:>6.2f} "
                   f"{r['hf_assisted']['tau']:>7.2f} "
                   f"{r['ours']['tokens_per_second']:>7.1f} {r['hf_assisted']['tokens_per_second']:>9.1f} "
                   f"{r['ours_target_only']['tokens_per_second']:>13.1f} {r['speedup_vs_our_target_only']:>7.2f}x")
    click.echo(f"wrote {out} and {plot}")


@bench.command("kernels")
@click.option("--tokens", default=8192, show_default=True, help="Token positions (rows of logits) per call.")
@click.option("--vocab", "vocabs", default="128256,151936", show_default=True,
              help="Comma-separated vocabulary sizes; one kernels_<vocab>.json each.")
@click.option("--divergences", default=None,
              help="Comma-separated divergences of the losses registry to time (a reference-only one gets no fused "
                   "arm); default: every registered divergence with a kernel.")
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Logits dtype.")
@click.option("--arms", default="fused,eager,compile,liger", show_default=True,
              help="Comma-separated arms: fused (ours), eager, compile (torch.compile), liger (if importable).")
@click.option("--repeats", default=20, show_default=True, help="Timed forward+backward runs; the median is reported.")
@click.option("--warmup", default=3, show_default=True, help="Untimed runs first (compilation, autotuning, caches).")
@click.option("--hidden", default=4096, show_default=True,
              help="Hidden size of the fused linear + JSD rows; 0 leaves them out.")
@click.option("--block-size", default=None, type=int,
              help="Vocabulary tile of the kernels (a power of two); default: their heuristic.")
@click.option("--out-dir", default="benchmarks/results", show_default=True,
              help="Where kernels_<vocab>.json are written.")
@click.option("--interpret", is_flag=True,
              help="No GPU: a tiny CPU smoke run under TRITON_INTERPRET=1 that checks the fused path against "
                   "the references; no timings, nothing written.")
@fail_clearly
def bench_kernels(tokens, vocabs, divergences, dtype, arms, repeats, warmup, hidden, block_size, out_dir, interpret):
    """Fused divergence kernels vs eager PyTorch, torch.compile and Liger-Kernel: forward+backward time and peak
    extra memory, beside the bandwidth floor."""
    import os
    import subprocess

    from draftdistill.eval.bench_kernels import check_divergences, default_divergences, has_kernel

    try:  # the registry is the list: names checked here, before any subprocess or GPU work
        names = check_divergences(default_divergences() if divergences is None
                                  else [d.strip() for d in divergences.split(",") if d.strip()])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--divergences") from None
    if interpret:  # a fresh process: the interpreter must be chosen before the kernels are imported
        for name in names:
            if not has_kernel(name):
                click.echo(f"{name:<20} reference only: no kernel to check")
        names = [n for n in names if has_kernel(n)]
        if not names:
            return
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "draftdistill.eval.bench_kernels", "--smoke", "--divergences", ",".join(names)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        click.echo(done.stdout, nl=False)
        if done.returncode:
            raise click.ClickException(f"smoke run failed:\n{done.stderr[-2000:]}")
        return
    import torch

    if not torch.cuda.is_available():
        raise click.ClickException("bench kernels times CUDA kernels and no GPU is visible; "
                                   "--interpret runs a CPU smoke check without timings")
    from draftdistill.eval.bench_kernels import ARMS, DTYPES, run_kernel_benchmark
    from draftdistill.eval.machine import machine_info

    arm_list = [a.strip() for a in arms.split(",") if a.strip()]
    unknown = sorted(set(arm_list) - set(ARMS))
    if unknown:
        raise click.BadParameter(f"unknown arms {unknown}; known: {', '.join(ARMS)}", param_hint="--arms")
    for vocab in (int(v) for v in vocabs.split(",")):
        result = run_kernel_benchmark(tokens, vocab, names, DTYPES[dtype], arm_list, repeats=repeats,
                                      warmup=warmup, hidden=hidden, block_size=block_size)
        out = Path(out_dir) / f"kernels_{vocab}.json"
        write_json(out, {"name": "kernels", "command": "draftdistill " + " ".join(sys.argv[1:]),
                         "machine": machine_info("cuda"), **result})
        click.echo(f"vocab {vocab}: bandwidth floor {result['bandwidth_floor_ms']:.2f} ms "
                   f"({result['copy_bandwidth_gb_s']:.0f} GB/s copy)")
        click.echo(f"{'divergence':<20} {'arm':<8} {'ms':>9} {'GiB':>7}")
        for r in result["rows"]:
            ms, gib = r.get("ms"), r.get("peak_extra_gib")
            click.echo(f"{r['divergence']:<20} {r['arm']:<8} {fmt(ms, '9.2f')} {fmt(gib, '7.2f')} {r.get('error', '')}")
        click.echo(f"wrote {out}")


@main.command("export")
@click.argument("src")
@click.argument("out")
@click.option("--format", "fmt", required=True, type=click.Choice(["hf", "sglang", "vllm"]),
              help="hf: a standalone drafter; sglang, vllm: an EAGLE-3 head (see above).")
@click.option("--target", default=None,
              help="The target (HF directory or builtin name): checks that the drafter fits it, gives the vllm "
                   "export its embedding and verifier name, and a standalone drafter its tokenizer when it has none.")
@click.option("--verifier", default=None,
              help="vllm: speculators_config.verifier.name_or_path (default: --target, or the source's own).")
@click.option("--speculative-tokens", default=3, show_default=True, type=click.IntRange(min=1),
              help="vllm: the proposal's speculative_tokens.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Cast the weights (default: keep the source's).")
@click.option("--overwrite", is_flag=True, help="Replace OUT when it exists and is not empty.")
def export_command(src, out, fmt, target, verifier, speculative_tokens, dtype, overwrite):
    """Convert the drafter at SRC into the directory a server loads, OUT.

    \b
    SRC: an HF drafter directory (a standalone LM drafter, e.g. a run's OUT_DIR/best),
         an EAGLE-3 head in SGLang's format (ours), a SpecForge EAGLE-3 checkpoint (midlayer.*),
         a vLLM speculators EAGLE-3 checkpoint, or a training run's OUT_DIR (its checkpoint).
         Safetensors only: .bin/.pt files and sharded (DCP) checkpoints are refused, never unpickled.

    \b
    --format hf      standalone drafter, a plain HF directory:
                     SGLang: --speculative-algorithm STANDALONE --speculative-draft-model-path OUT
                     vLLM:   speculative_config={"method": "draft_model", "model": OUT, ...}
    --format sglang  EAGLE-3 head, SGLang's LlamaForCausalLMEagle3:
                     SGLang: --speculative-algorithm EAGLE3 --speculative-draft-model-path OUT
    --format vllm    EAGLE-3 head, vLLM's speculators format (embedding included; needs --target
                     when SRC has no embedding):
                     vLLM:   speculative_config={"method": "eagle3", "model": OUT, ...}
    """
    from draftdistill.export import convert

    report = convert(src, out, fmt, target=target, verifier=verifier, speculative_tokens=speculative_tokens,
                     dtype=dtype, overwrite=overwrite)
    click.echo(f"{src} ({report['kind']}) -> {report['out']} ({fmt})")
    click.echo(f"serve it with {report['serve']}")


def _add_serve():
    from draftdistill.serving.cli import serve  # serving/ installs as draftdistill.serving

    main.add_command(serve)


_add_serve()

if __name__ == "__main__":
    main()
