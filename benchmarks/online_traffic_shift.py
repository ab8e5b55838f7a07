"""Online distillation under a traffic shift (issue [S]): chat -> math -> code prompts served by the
embedded server on SmolLM2, with the online distiller attached vs the same drafter frozen.

Both arms serve the identical request sequence (greedy, so their outputs are identical too: the
decoder is lossless). The online arm runs one distiller step after every request (capture, gate,
train, push), in the serving process, so the swap pauses and their latency cost are measured.

    python benchmarks/online_traffic_shift.py --drafter pruned:2 --per-phase 40
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
from draftdistill.models import load_drafter, load_target
from draftdistill.serving.embedded import EmbeddedSpecServer
from draftdistill.serving.online import OnlineConfig, OnlineDistiller

CODE_WORDS = ("python", "code", "function", "javascript", "sql", "```", "java ", "c++", "script")


def is_code(prompt) -> bool:
    text = prompt.messages[-1]["content"].lower()
    return any(word in text for word in CODE_WORDS)


def phases(per_phase: int) -> dict[str, list]:
    chat_pool = load_prompts("sharegpt:train", limit=8 * per_phase)
    chat = [p for p in chat_pool if not is_code(p)][:per_phase]
    code = [p for p in chat_pool if is_code(p)][:per_phase]
    if len(code) < per_phase:  # code questions are rarer: read further
        code = [p for p in load_prompts("sharegpt:train", limit=40 * per_phase) if is_code(p)][:per_phase]
    math = load_prompts("gsm8k:train", limit=per_phase)
    return {"chat": chat, "math": math, "code": code}


def serve_arm(name, target, drafter, tokenizer, traffic, args, online: bool) -> list[dict]:
    eos = stop_token_ids(tokenizer, target)
    engine = EmbeddedSpecServer(target, drafter, tokenizer, gamma=args.gamma, eos_token_id=eos)
    distiller = None
    if online:
        distiller = OnlineDistiller(engine, drafter, OnlineConfig(
            divergence=args.divergence, lr=args.lr, batch_size=args.batch_size, update_every=args.update_every,
            steps_per_update=args.steps_per_update, window=args.window, max_response_tokens=args.max_new_tokens))
    rows = []
    for i, (phase, prompt) in enumerate(traffic):
        ids = encode_prompt(tokenizer, prompt)[0].tolist()
        started = time.perf_counter()
        request = engine.complete(ids, args.max_new_tokens, temperature=0.0)
        latency = time.perf_counter() - started
        spec = request.meta["spec"]
        row = {"i": i, "phase": phase, "version": request.weight_version, "accept_length": request.accept_length,
               "proposed": sum(spec["proposed"]), "accepted": sum(spec["accepted"]), "latency_s": latency,
               "tokens": len(request.output_ids), "output_ids": request.output_ids}
        if distiller is not None:
            step_started = time.perf_counter()
            metrics = distiller.step()
            row["distiller_seconds"] = time.perf_counter() - step_started
            row["distiller"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        rows.append(row)
        print(f"{name} {i} {phase} v={request.weight_version} tau={request.accept_length:.2f}", flush=True)
    extra = {"swaps": engine.swaps}
    if distiller is not None:
        extra.update(history=distiller.history, counters=distiller.counters)
    return rows, extra


def phase_alpha(rows, phase, part):
    """Acceptance over the first or second half of a phase's requests."""
    chosen = [r for r in rows if r["phase"] == phase]
    half = len(chosen) // 2
    chosen = chosen[:half] if part == "first" else chosen[half:]
    return sum(r["accepted"] for r in chosen) / max(1, sum(r["proposed"] for r in chosen))


def gain_windows(result, size):
    """Online minus frozen alpha over consecutive windows of `size` requests in each phase: how soon after
    a shift the online drafter pulls ahead, and whether it stays ahead."""
    windows = []
    for phase in ("chat", "math", "code"):
        frozen = [r for r in result["arms"]["frozen"]["requests"] if r["phase"] == phase]
        online = [r for r in result["arms"]["online"]["requests"] if r["phase"] == phase]
        for start in range(0, len(frozen), size):
            alpha = {arm: sum(r["accepted"] for r in rows[start:start + size]) /
                     max(1, sum(r["proposed"] for r in rows[start:start + size]))
                     for arm, rows in (("frozen", frozen), ("online", online))}
            windows.append({"phase": phase, "requests": [start, min(start + size, len(frozen))],
                            "frozen_alpha": alpha["frozen"], "online_alpha": alpha["online"],
                            "gain": alpha["online"] - alpha["frozen"]})
    return windows


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for arm, data in result["arms"].items():
        rows, k = data["requests"], result["settings"]["smooth"]
        alpha = []
        for i in range(len(rows)):
            window = rows[max(0, i - k + 1): i + 1]
            alpha.append(sum(r["accepted"] for r in window) / max(1, sum(r["proposed"] for r in window)))
        ax.plot(range(len(rows)), alpha, label=arm)
    boundaries = [i for i, r in enumerate(result["arms"]["frozen"]["requests"]) if i and
                  r["phase"] != result["arms"]["frozen"]["requests"][i - 1]["phase"]]
    for b in boundaries:
        ax.axvline(b, color="grey", linestyle="--")
    ax.set_xlabel("request")
    ax.set_ylabel(f"alpha (rolling over {result['settings']['smooth']} requests)")
    ax.set_title("online distillation vs frozen drafter: chat -> math -> code")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="pruned:2")
    ap.add_argument("--per-phase", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--divergence", default="fkl")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--update-every", type=int, default=8)
    ap.add_argument("--steps-per-update", type=int, default=4)
    ap.add_argument("--window", type=int, default=6)
    ap.add_argument("--smooth", type=int, default=10)
    ap.add_argument("--report-every", type=int, default=20, help="requests per window of the gain table")
    ap.add_argument("--out", default="benchmarks/results/online_traffic_shift.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    target, tokenizer = load_target("smollm2-135m-instruct", device="cpu")
    traffic = [(phase, p) for phase, prompts in phases(args.per_phase).items() for p in prompts]
    result = {"name": "online_traffic_shift", "command": "python benchmarks/online_traffic_shift.py " +
              " ".join(argv if argv is not None else sys.argv[1:]), "machine": machine_info("cpu"),
              "settings": vars(args), "arms": {}}
    for arm, online in (("frozen", False), ("online", True)):
        drafter = load_drafter(args.drafter, target, tokenizer).float()
        rows, extra = serve_arm(arm, target, drafter, tokenizer, traffic, args, online)
        result["arms"][arm] = {"requests": rows, **extra}
    frozen, online = result["arms"]["frozen"]["requests"], result["arms"]["online"]["requests"]
    result["identical_outputs"] = [a["output_ids"] for a in frozen] == [b["output_ids"] for b in online]
    result["summary"] = {phase: {f"{arm}_{part}": phase_alpha(result["arms"][arm]["requests"], phase, part)
                                 for arm in ("frozen", "online") for part in ("first", "second")}
                         for phase in ("chat", "math", "code")}
    result["windows"] = gain_windows(result, args.report_every)
    swaps = result["arms"]["online"]["swaps"]
    result["swap_pause_ms"] = [1000 * s["swap_seconds"] for s in swaps]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"summary": result["summary"], "windows": result["windows"],
                      "identical_outputs": result["identical_outputs"],
                      "swap_pause_ms": result["swap_pause_ms"]}, indent=1))


if __name__ == "__main__":
    main()
