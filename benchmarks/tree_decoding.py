"""Chain vs EAGLE-2 dynamic-tree drafting on the lossless decoder (SmolLM2, held-out GSM8K prompts).

For each drafter and temperature, the same prompts and seeds are decoded with a chain of `gamma`
drafts and with trees of the given shapes. Reported per arm: tau (tokens per target forward),
acceptance per depth, tokens/s, drafted tokens per target forward, and tree / chain ratios taken in
the same run. Greedy outputs are the target's in every arm (checked here); sampled outputs follow
the target's law in every arm (tests/test_spec_tree.py checks that).

    python benchmarks/tree_decoding.py --drafter pruned2_onpolicy_fkl=runs/quality_drafter/onpolicy_fkl/best \\
        --drafter eagle3_offline=runs/eagle3_ttt_b/offline/final
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.eval.acceptance import decode_all
from draftdistill.eval.machine import machine_info
from draftdistill.models import load_drafter, load_target
from draftdistill.spec import SamplingConfig, TreeConfig, speculative_generate

RESULTS = Path(__file__).parent / "results"


def parse_tree(text: str) -> TreeConfig:
    depth, top_k, max_nodes = (int(v) for v in text.split("/"))
    return TreeConfig(depth=depth, top_k=top_k, max_nodes=max_nodes)


def decode_arm(target, drafter, prompt_ids, sampling, eos, args, tree):
    """Decode every prompt; return (stats dict, outputs)."""
    outputs = []

    def one(ids, generator):
        tokens, stats = speculative_generate(target, drafter, ids, args.max_new_tokens, gamma=args.gamma,
                                             sampling=sampling, eos_token_id=eos, generator=generator, tree=tree)
        outputs.append(tokens.tolist())
        return tokens, stats

    stats = decode_all(one, prompt_ids, args.seed, "tree" if tree else "chain", progress=False)
    return {**stats.to_dict(), "drafts_scored_per_target_call": stats.drafts_scored / stats.target_calls}, outputs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", action="append", required=True, help="NAME=PATH (or a spec like pruned:2); repeat")
    ap.add_argument("--trees", default="5/4/24,6/8/60", help="depth/top_k/max_nodes of each tree arm, comma-separated")
    ap.add_argument("--gamma", type=int, default=4, help="chain arm: drafts per round")
    ap.add_argument("--prompts", type=int, default=16, help="held-out GSM8K prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "tree_decoding.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    target, tokenizer = load_target("smollm2-135m-instruct", device="cpu")
    eos = stop_token_ids(tokenizer, target)
    prompt_ids = [encode_prompt(tokenizer, p) for p in load_prompts("gsm8k:heldout", limit=args.prompts)]
    trees = [parse_tree(t) for t in args.trees.split(",")]
    result = {"name": "tree_decoding", "command": "python benchmarks/tree_decoding.py " +
              " ".join(argv if argv is not None else sys.argv[1:]), "machine": machine_info("cpu"),
              "settings": vars(args), "runs": []}
    for spec in args.drafter:
        name, _, source = spec.partition("=")
        drafter = load_drafter(source or name, target, tokenizer).float().eval()
        for temperature in (float(t) for t in args.temperatures.split(",")):
            sampling = SamplingConfig(temperature=temperature)
            chain, chain_out = decode_arm(target, drafter, prompt_ids, sampling, eos, args, None)
            run = {"drafter": name, "source": source or name, "temperature": temperature,
                   "chain": {"gamma": args.gamma, **chain}, "trees": []}
            for tree in trees:
                stats, out = decode_arm(target, drafter, prompt_ids, sampling, eos, args, tree)
                arm = {"tree": dataclasses.asdict(tree), **stats, "tau_vs_chain": stats["tau"] / chain["tau"],
                       "tokens_per_second_vs_chain": stats["tokens_per_second"] / chain["tokens_per_second"]}
                if temperature == 0:
                    arm["outputs_identical_to_chain"] = out == chain_out  # both are the target's greedy text
                run["trees"].append(arm)
                print(f"{name} T={temperature:g} tree {tree.depth}/{tree.top_k}/{tree.max_nodes}: "
                      f"tau {stats['tau']:.3f} "
                      f"vs chain {chain['tau']:.3f}; tok/s {stats['tokens_per_second']:.2f} vs "
                      f"{chain['tokens_per_second']:.2f}", flush=True)
            result["runs"].append(run)
            out_path = Path(args.out)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1))  # after every run: a killed job keeps what it measured


if __name__ == "__main__":
    main()
