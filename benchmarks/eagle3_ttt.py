"""EAGLE-3 benchmark for issue [E]: teacher-forced (offline-style) vs on-policy TTT at equal target budget.

    warm       a fresh head (draft vocabulary from the training prompts) trained with teacher-forced
               TTT chains (EAGLE-3 / SpecForge style): the common starting point
    offline    warm + more teacher-forced TTT (ttt_chain=data, FKL)
    onpolicy   warm + on-policy TTT (ttt_chain=sampled, FKL): the head's own drafted chains, scored by
               the target (ttt_anchors chains per row)

Both continuations spend the same number of target-forward tokens: on-policy runs first, and the
offline arm gets as many steps as the contexts alone take to reach the on-policy total (its steps
see the same contexts in the same order, then continue the stream). Contexts are the target's own
responses on a pool of GSM8K train prompts, generated once and shared through a cache file. Each
head's final weights are measured with the lossless decoder on held-out GSM8K prompts at T=0 and
T=1 (the decoder settings of quality_drafter.py, whose standalone-drafter figures are quoted beside
them), and the acceptance its last training steps simulated is set beside what the decoder measured.

    python benchmarks/eagle3_ttt.py [--warm-steps 40 --steps 50 ...]   # writes benchmarks/results/eagle3_ttt.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from quality_drafter import evaluate

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.eval import plot_alpha_per_position
from draftdistill.eval.machine import machine_info
from draftdistill.models import load_drafter, load_target
from draftdistill.serving.export_eagle3 import export_sglang_eagle3
from draftdistill.train import DrafterOPDConfig, load_config, train_drafter
from draftdistill.train.checkpoint import load_weights

RESULTS = Path(__file__).parent / "results"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm-steps", type=int, default=40, help="teacher-forced steps of the common start")
    ap.add_argument("--steps", type=int, default=50, help="on-policy steps (offline: the same target tokens)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--anchors", type=int, default=16, help="on-policy chains scored per row")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--pool", type=int, default=64, help="training prompts (first N of gsm8k:train)")
    ap.add_argument("--eval-gsm8k", type=int, default=12, help="held-out GSM8K prompts")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--work-dir", default="runs/eagle3_ttt")
    ap.add_argument("--out", default=str(RESULTS / "eagle3_ttt.json"))
    return ap.parse_args(argv)


def train(args, work: Path, name: str, drafter: str, steps: int, chain: str) -> tuple[DrafterOPDConfig, dict, list]:
    cfg = load_config(DrafterOPDConfig, Path(__file__).parents[1] / "configs" / "eagle3.yaml", [
        f"drafter={drafter}", f"ttt_chain={chain}", f"steps={steps}", f"batch_size={args.batch_size}",
        f"lr={args.lr}", f"ttt_anchors={args.anchors}", f"draft_vocab_size={args.draft_vocab}",
        f"prompt_limit={args.pool}", f"gamma={args.gamma}", f"eval_every={steps}", f"save_every={steps}",
        "eval_num_prompts=2", "eval_max_new_tokens=16", f"out_dir={work / name}", "resume=false", "device=cpu",
        f"target_cache={work / 'target_responses.jsonl'}"])
    summary = train_drafter(cfg, progress=True)
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, [r for r in rows if "loss" in r]


def final_head(work: Path, name: str, target, tokenizer):
    """The run's final weights (no checkpoint picking), exported as a server would load them."""
    head = load_drafter(str(work / name / "best"), target, tokenizer)  # same shape and vocabulary
    load_weights(work / name / "checkpoint", head)
    export_sglang_eagle3(work / name / "final", head, tokenizer)
    return head.float().eval()


def simulated(rows: list[dict], gamma: int) -> dict:
    """Mean over the last 10 steps of the acceptance the training chains imply, per draft position."""
    last = rows[-10:]
    mean = {key: [sum(r[key][j] for r in last) / len(last) for j in range(gamma)]
            for key in ("sim_alpha_per_position", "sim_greedy_agreement_per_position")}
    return {"steps": len(last), "T=1 alpha_per_position": mean["sim_alpha_per_position"],
            "T=0 agreement_per_position": mean["sim_greedy_agreement_per_position"]}


def standalone_reference() -> dict:
    """The best standalone drafters of quality_drafter.json (a separate run, same decoder settings)."""
    path = RESULTS / "quality_drafter.json"
    if not path.exists():
        return {}
    arms = json.loads(path.read_text())["arms"]
    return {arm: {k: arms[arm]["eval"][k]["tau"] for k in ("gsm8k@T=0", "gsm8k@T=1")}
            for arm in ("offline_fkl", "onpolicy_fkl") if arm in arms}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    work, out = Path(args.work_dir), Path(args.out)
    target, tokenizer = load_target("smollm2-135m-instruct", device="cpu")
    eos = stop_token_ids(tokenizer, target)
    eval_ids = {"gsm8k": [encode_prompt(tokenizer, p) for p in load_prompts("gsm8k:heldout", limit=args.eval_gsm8k)]}
    result = {"name": "eagle3_ttt", "command": "python benchmarks/eagle3_ttt.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info("cpu"), "settings": vars(args), "arms": {},
              "standalone_reference": standalone_reference()}

    def record(name, cfg, summary, rows, seconds):
        head = final_head(work, name, target, tokenizer)
        result["arms"][name] = {
            "config": asdict(cfg), "train_seconds": seconds, "steps": len(rows),
            "target_tokens": summary["target_tokens"], "draft_vocab_size": summary["draft_vocab_size"],
            "final_loss": rows[-1]["loss"], "simulated_last10": simulated(rows, args.gamma),
            "eval": evaluate(target, head, eval_ids, eos, args)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every arm: a killed run keeps what it measured
        print(name, {k: round(v["tau"], 3) for k, v in result["arms"][name]["eval"].items()}, flush=True)

    started = time.perf_counter()
    cfg, summary, rows = train(args, work, "warm", "eagle3", args.warm_steps, "data")
    record("warm", cfg, summary, rows, time.perf_counter() - started)
    start = str(work / "warm" / "final")

    started = time.perf_counter()
    cfg, on_summary, on_rows = train(args, work, "onpolicy", start, args.steps, "sampled")
    record("onpolicy", cfg, on_summary, on_rows, time.perf_counter() - started)
    # Offline spends only the contexts' tokens per step: as many steps as reach the on-policy total.
    context_tokens = [r["target_tokens"] - r["scored_positions"] * (cfg.ttt_steps - 1) for r in on_rows]
    offline_steps = round(on_summary["target_tokens"] / (sum(context_tokens) / len(context_tokens)))
    started = time.perf_counter()
    cfg, summary, rows = train(args, work, "offline", start, offline_steps, "data")
    record("offline", cfg, summary, rows, time.perf_counter() - started)

    arms = result["arms"]
    result["onpolicy_over_offline"] = {k: arms["onpolicy"]["eval"][k]["tau"] / arms["offline"]["eval"][k]["tau"]
                                       for k in arms["offline"]["eval"]}
    out.write_text(json.dumps(result, indent=1))
    plot_alpha_per_position(
        {**{f"{arm} measured": r["eval"]["gsm8k@T=1"]["alpha_per_position"] for arm, r in arms.items()},
         **{f"{arm} simulated": r["simulated_last10"]["T=1 alpha_per_position"] for arm, r in arms.items()
            if arm != "warm"}},
        out.with_suffix(".png"), title="EAGLE-3 head on SmolLM2, held-out gsm8k, T=1")
    print("on-policy / offline tau:", {k: round(v, 3) for k, v in result["onpolicy_over_offline"].items()})


if __name__ == "__main__":
    main()
