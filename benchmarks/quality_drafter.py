"""Drafter quality benchmark for issue [D]: which training signal gives the best held-out tau?

Every arm starts from the same drafter init, trains for the same number of steps on the same
prompt pool, and scores the same number of response tokens with the target. Target responses are
generated once for the pool (shared through a cache file), so the arms that use them spend the same
target-forward tokens as the others, plus that one-off pool generation.

    (a) none            no training
    (b) offline_fkl     forward KL on target-generated responses (EAGLE/SpecForge-style data)
    (c) onpolicy_<div>  GKD-style lambda = 0.5: half the contexts sampled by the drafter itself,
                        half the same target responses as (b); divergence fkl/rkl/jsd/tvd/lk

Each trained drafter (its final weights, no checkpoint selection) is then measured with the
lossless decoder on held-out GSM8K and held-out ShareGPT chat prompts at T=0 and T=1.

    python benchmarks/quality_drafter.py [--steps 60 ...]   # writes benchmarks/results/quality_drafter.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.eval import evaluate_drafter, plot_alpha_per_position
from draftdistill.eval.machine import machine_info
from draftdistill.models import load_drafter, load_target
from draftdistill.spec import SamplingConfig
from draftdistill.train import DrafterConfig, train_drafter
from draftdistill.train.checkpoint import load_weights

ON_POLICY = {"fkl": "fkl", "rkl": "rkl", "jsd": "jsd:beta=0.5", "tvd": "tvd", "lk": "lk"}


def arms() -> dict[str, dict | None]:
    table = {"none": None, "offline_fkl": dict(divergence="fkl", mix_target=1.0, mix_drafter=0.0)}
    for name, spec in ON_POLICY.items():
        table[f"onpolicy_{name}"] = dict(divergence=spec, mix_target=0.5, mix_drafter=0.5)
    return table


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="pruned:2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--response-tokens", type=int, default=48)
    ap.add_argument("--pool", type=int, default=64, help="training prompts (first N of gsm8k:train)")
    ap.add_argument("--eval-gsm8k", type=int, default=12, help="held-out GSM8K prompts")
    ap.add_argument("--eval-chat", type=int, default=12, help="held-out ShareGPT prompts (0 to skip)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--arms", default=",".join(arms()), help="comma-separated subset of the arms")
    ap.add_argument("--work-dir", default="runs/quality_drafter")
    ap.add_argument("--out", default="benchmarks/results/quality_drafter.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep arms already in --out (same settings) and add or replace the ones run now")
    return ap.parse_args(argv)


def evaluate(target, drafter, eval_sets, eos, args) -> dict:
    results = {}
    for set_name, ids in eval_sets.items():
        for temperature in [float(t) for t in args.temperatures.split(",")]:
            report = evaluate_drafter(target, drafter, ids, gamma=args.gamma,
                                      sampling=SamplingConfig(temperature=temperature),
                                      max_new_tokens=args.max_new_tokens, eos_token_id=eos, seed=0,
                                      baseline=False, progress=False)["speculative"]
            results[f"{set_name}@T={temperature:g}"] = {k: report[k] for k in ("tau", "alpha", "alpha_per_position",
                                                                                "new_tokens", "target_calls")}
    return results


def merge_previous(previous: dict, result: dict) -> dict:
    """Resume a benchmark cut off between arms: earlier arms count only if every setting that shapes them matches."""
    per_run = {"arms", "out", "merge"}
    old = {k: v for k, v in previous["settings"].items() if k not in per_run}
    new = {k: v for k, v in result["settings"].items() if k not in per_run}
    if old != new:
        raise SystemExit(f"--merge: settings differ from {result['settings']['out']}: {old} vs {new}")
    result["arms"] = dict(previous["arms"])
    result["earlier_runs"] = previous.get("earlier_runs", []) + [
        {"command": previous["command"], "machine": previous["machine"], "arms": list(previous["arms"])}]
    return result


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    work, out = Path(args.work_dir), Path(args.out)
    target, tokenizer = load_target("smollm2-135m-instruct", device="cpu")
    eos = stop_token_ids(tokenizer, target)
    eval_sets = {"gsm8k": load_prompts("gsm8k:heldout", limit=args.eval_gsm8k)}
    if args.eval_chat:
        eval_sets["chat"] = load_prompts("sharegpt:heldout", limit=args.eval_chat)
    eval_ids = {name: [encode_prompt(tokenizer, p) for p in ps] for name, ps in eval_sets.items()}

    result = {"name": "quality_drafter",
              "command": "python benchmarks/quality_drafter.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info("cpu"), "settings": vars(args), "arms": {}}
    if args.merge and out.exists():
        result = merge_previous(json.loads(out.read_text()), result)
    for arm in args.arms.split(","):
        recipe = arms()[arm]
        started = time.perf_counter()
        if recipe is None:
            drafter, train_summary = load_drafter(args.drafter, target, tokenizer), None
        else:
            cfg = DrafterConfig(drafter=args.drafter, prompts="gsm8k:train", prompt_limit=args.pool,
                                   response_tokens=args.response_tokens, steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr, gamma=args.gamma, eval_every=args.steps, save_every=args.steps,
                                   eval_num_prompts=2, eval_max_new_tokens=16, out_dir=str(work / arm), resume=False,
                                   device="cpu",
                                   target_cache=str(work / "target_responses.jsonl"), **recipe)
            train_summary = train_drafter(cfg, progress=True)
            rows = [json.loads(l) for l in (work / arm / "metrics.jsonl").read_text().splitlines()]
            train_rows = [r for r in rows if "loss" in r]
            train_summary.update(config=asdict(cfg), target_rollout_tokens=train_rows[-1]["target_rollout_tokens"],
                                 target_scored_tokens=sum(r["scored_tokens"] for r in train_rows),
                                 final_loss=train_rows[-1]["loss"], final_est_alpha=train_rows[-1]["est_alpha"],
                                 est_alpha_last10=sum(r["est_alpha"] for r in train_rows[-10:]) / len(train_rows[-10:]))
            drafter = load_drafter(args.drafter, target, tokenizer)  # same init, then the final trained weights
            load_weights(work / arm / "checkpoint", drafter)
        train_seconds = time.perf_counter() - started
        drafter = drafter.float().eval()
        result["arms"][arm] = {"recipe": recipe, "train": train_summary, "train_seconds": train_seconds,
                               "eval": evaluate(target, drafter, eval_ids, eos, args)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every arm: a killed run keeps what it measured
        print(arm, {k: round(v["tau"], 3) for k, v in result["arms"][arm]["eval"].items()}, flush=True)

    first_set = next(iter(result["arms"][next(iter(result["arms"]))]["eval"]))
    plot_alpha_per_position({arm: r["eval"][first_set]["alpha_per_position"] for arm, r in result["arms"].items()},
                            out.with_suffix(".png"), title=f"{args.drafter} on SmolLM2, held-out {first_set}")


if __name__ == "__main__":
    main()
