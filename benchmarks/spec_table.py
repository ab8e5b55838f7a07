"""Render benchmarks/results/spec_decoder.json as the Markdown table kept in BENCHMARKS.md.

    python benchmarks/spec_table.py [benchmarks/results/spec_decoder.json]
"""
import json
import sys


def fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def main(path="benchmarks/results/spec_decoder.json"):
    result = json.load(open(path))
    print("| drafter | T | tau (ours) | tau (HF assisted) | alpha per position (ours) | tok/s ours | tok/s HF assisted "
          "| tok/s target-only (ours / HF) | speedup ours | speedup HF | ours / HF assisted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        alphas = " ".join(fmt(a) for a in r["ours"]["alpha_per_position"])
        print(f"| {r['drafter']} | {r['temperature']:g} | {fmt(r['ours']['tau'])} | {fmt(r['hf_assisted']['tau'])} "
              f"| {alphas} | {fmt(r['ours']['tokens_per_second'], '.1f')} "
              f"| {fmt(r['hf_assisted']['tokens_per_second'], '.1f')} "
              f"| {fmt(r['ours_target_only']['tokens_per_second'], '.1f')} / "
              f"{fmt(r['hf_target_only']['tokens_per_second'], '.1f')} "
              f"| {fmt(r['speedup_vs_our_target_only'])}x | {fmt(r['hf_assisted_speedup_vs_hf_target_only'])}x "
              f"| {fmt(r['ours_over_hf_assisted_tokens_per_second'])}x |")


if __name__ == "__main__":
    main(*sys.argv[1:])
