"""OPSD vs SFT on GSM8K (issue [O], benchmark a): on-policy self-distillation with the reference
solution as privileged context, against supervised fine-tuning on the same solutions, at equal
compute.

Both arms start from SmolLM2-135M-Instruct and train on the same GSM8K training prompts:
- sft: -log q of the reference solution's tokens (configs/opd/sft.yaml);
- opsd: the student samples its own answer to the bare question; a frozen copy of the initial
  model, shown the question plus the reference solution, scores the same tokens; JSD(0.5) over the
  full vocabulary at every response position (configs/opd/opsd-reference.yaml).

Equal compute: OPSD runs first; its cost is counted in model-forward tokens from the trainer's
metrics, 2N per forward token (rollout prefill + sampled tokens, the self-teacher's scoring
forward) and 6N per training token (forward + backward), N the parameter count. SFT then gets as
many steps as that budget buys at its own per-step cost (6N x prompt + solution tokens); both
budgets are recorded. Wall-clock seconds are recorded too but depend on machine load.

Metric: held-out GSM8K (gsm8k:heldout, never trained on) greedy accuracy (final number vs the
reference's "#### n"), mean answer length in tokens, and the share of answers cut off at
--eval-max-new-tokens.

    python benchmarks/opd_opsd.py --opsd-steps 40
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.eval.machine import machine_info
from draftdistill.models import load_target
from draftdistill.opd import OPDConfig, train_opd
from draftdistill.opd.rewards import extract_answer, gsm8k_reward
from draftdistill.opd.rollout import LocalSampler
from draftdistill.train import load_config
from draftdistill.train.checkpoint import load_weights

MODEL = "smollm2-135m-instruct"
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "opd"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opsd-steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-new-tokens", type=int, default=192, help="OPSD rollouts and SFT solution cut-off")
    ap.add_argument("--train-prompts", type=int, default=512, help="GSM8K training prompts both arms draw from")
    ap.add_argument("--eval-prompts", type=int, default=200, help="held-out GSM8K prompts")
    ap.add_argument("--eval-max-new-tokens", type=int, default=256)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--arms", default="none,opsd,sft")
    ap.add_argument("--work-dir", default="runs/opd_opsd")
    ap.add_argument("--out", default="benchmarks/results/opd_opsd.json")
    return ap.parse_args(argv)


def recipe(arm: str, args, steps: int, work: Path) -> OPDConfig:
    """The shipped recipe (configs/opd/opsd-reference.yaml or sft.yaml) with this run's budget."""
    overrides = {"student": MODEL, "prompts": "gsm8k:train", "prompt_limit": args.train_prompts, "steps": steps,
                 "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 4,
                 "max_new_tokens": args.max_new_tokens, "save_every": steps, "out_dir": str(work / arm),
                 "resume": False, "device": "cpu"}
    name = {"opsd": "opsd-reference", "sft": "sft"}[arm]
    return load_config(OPDConfig, RECIPES / f"{name}.yaml", [f"{k}={v}" for k, v in overrides.items()])


def compute(rows: list[dict], params: int) -> dict:
    """Model FLOPs of a run from its metrics: 2N per forward token, 6N per training token."""
    rollout = sum(r["rollout_tokens"] for r in rows)
    teacher = sum(r["teacher_tokens"] for r in rows)
    train = sum(r["train_tokens"] for r in rows)
    return {"rollout_tokens": rollout, "teacher_tokens": teacher, "train_tokens": train,
            "flops": 2 * params * (rollout + teacher) + 6 * params * train}


def sft_tokens_per_step(tokenizer, prompts, args) -> float:
    """Mean training tokens of one SFT step (prompt + cut-off solution + stop, per row x batch)."""
    per_row = []
    for p in prompts:
        solution = tokenizer(p.reference, add_special_tokens=False)["input_ids"][: args.max_new_tokens]
        per_row.append(encode_prompt(tokenizer, p)[0].numel() + len(solution) + 1)
    return args.batch_size * sum(per_row) / len(per_row)


@torch.no_grad()
def gsm8k_eval(model, tokenizer, stop, prompts, args) -> dict:
    sampler = LocalSampler(model, stop, tokenizer.pad_token_id or stop[0], temperature=0.0)
    generator = torch.Generator().manual_seed(0)
    correct, lengths, cut, answered, examples = 0, [], 0, 0, []
    for start in range(0, len(prompts), args.eval_batch):
        chunk = prompts[start: start + args.eval_batch]
        ids = [encode_prompt(tokenizer, p)[0].tolist() for p in chunk]
        for prompt, completion in zip(chunk, sampler.sample(ids, args.eval_max_new_tokens, generator)):
            text = tokenizer.decode(completion.tokens, skip_special_tokens=True)
            correct += int(gsm8k_reward(text, prompt.reference))
            answered += int(extract_answer(text) is not None)
            lengths.append(len(completion.tokens))
            cut += int(not completion.finished)
            if len(examples) < 3:
                examples.append({"question": prompt.messages[-1]["content"], "answer": text})
        print(f"  eval {start + len(chunk)}/{len(prompts)}: {correct} correct", flush=True)
    n = len(prompts)
    return {"accuracy": correct / n, "correct": correct, "prompts": n, "mean_length": sum(lengths) / n,
            "cut_off_share": cut / n, "numeric_answer_share": answered / n, "examples": examples}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_target(MODEL, device="cpu")
    model = model.float().eval()
    stop = stop_token_ids(tokenizer, model)
    params = sum(p.numel() for p in model.parameters())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    eval_prompts = load_prompts("gsm8k:heldout", limit=args.eval_prompts)
    train_prompts = load_prompts("gsm8k:train", limit=args.train_prompts)

    result = {"name": "opd_opsd", "command": "python benchmarks/opd_opsd.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info("cpu"), "settings": vars(args), "parameters": params, "arms": {}}
    opsd_flops = None
    for arm in args.arms.split(","):
        started, train = time.perf_counter(), None
        model.load_state_dict(initial)
        if arm != "none":
            if arm == "opsd":
                steps = args.opsd_steps
            else:
                if opsd_flops is None:
                    raise SystemExit("the sft arm's budget comes from the opsd arm: list opsd before sft")
                steps = max(1, round(opsd_flops / (6 * params * sft_tokens_per_step(tokenizer, train_prompts, args))))
            cfg = recipe(arm, args, steps, work)
            train_opd(cfg, progress=True)
            rows = [json.loads(line) for line in (work / arm / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "loss" in r]
            train = {"steps": steps, **compute(rows, params), "first_loss": rows[0]["loss"],
                     "final_loss": rows[-1]["loss"],
                     "mean_response_tokens": sum(r["response_tokens"] for r in rows) / len(rows),
                     "config": {k: v for k, v in vars(cfg).items() if k not in ("out_dir", "device")}}
            if arm == "opsd":
                opsd_flops = train["flops"]
            load_weights(work / arm / "checkpoint", model)
        train_seconds = time.perf_counter() - started
        model.eval()
        result["arms"][arm] = {"train": train, "train_seconds": train_seconds,
                               "eval": gsm8k_eval(model, tokenizer, stop, eval_prompts, args)}
        if arm == "sft" and opsd_flops:
            result["arms"][arm]["flops_vs_opsd"] = train["flops"] / opsd_flops
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every arm: a killed run keeps what it measured
        ev = result["arms"][arm]["eval"]
        print(arm, {k: ev[k] for k in ("accuracy", "mean_length", "cut_off_share")}, flush=True)


if __name__ == "__main__":
    main()
