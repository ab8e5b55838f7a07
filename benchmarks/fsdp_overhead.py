"""Issue [X]: step time and tokens/s of the drafter trainer in one plain process vs one torchrun rank
with FSDP2 (and vs one rank replicated, i.e. DDP), same config, same steps, run back to back.

    python benchmarks/fsdp_overhead.py [--device cpu|cuda --steps 12]
        -> benchmarks/results/fsdp_overhead_<device>.json

On CPU the rank uses gloo, on a GPU NCCL. The first two steps (warm-up, allocator) are left out of
the means; evaluation and checkpoints are kept out of the timed steps (eval/save only at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from draftdistill.eval.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--work-dir", default="runs/fsdp_overhead")
    ap.add_argument("--out", default="")
    return ap.parse_args(argv)


def run(args, name: str, launcher: list[str], extra: list[str]) -> dict:
    out = Path(args.work_dir) / name
    overrides = [f"steps={args.steps}", f"eval_every={args.steps}", f"save_every={args.steps}", "eval_num_prompts=2",
                 "eval_max_new_tokens=8", f"out_dir={out}", "resume=false", f"device={args.device}", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([*launcher, "train", args.config, *overrides, "--quiet"], check=True, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_seconds" in r][2:]
    seconds = sum(r["step_seconds"] for r in steps) / len(steps)
    tokens = sum(r["scored_tokens"] for r in steps) / len(steps)
    return {"timed_steps": len(steps), "step_seconds": seconds, "scored_tokens_per_second": tokens / seconds}


def main(argv=None):
    args = parse_args(argv)
    cli = [sys.executable, "-m", "draftdistill.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                "-m", "draftdistill.cli"]
    arms = {"plain": run(args, "plain", cli, []),
            "torchrun_fsdp": run(args, "fsdp", torchrun, ["fsdp=true"]),
            "torchrun_replicated": run(args, "ddp", torchrun, ["fsdp=false"])}
    for arm in arms.values():
        arm["step_time_over_plain"] = arm["step_seconds"] / arms["plain"]["step_seconds"]
    result = {"name": "fsdp_overhead",
              "command": "python benchmarks/fsdp_overhead.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info(args.device), "settings": vars(args), "arms": arms}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"fsdp_overhead_{args.device.split(':')[0]}.json")
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(arms, indent=1))


if __name__ == "__main__":
    main()
