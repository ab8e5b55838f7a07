"""Render benchmarks/results/quality_drafter.json as the Markdown table kept in BENCHMARKS.md.

    python benchmarks/quality_table.py [benchmarks/results/quality_drafter.json]
"""
import json
import sys


def fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def main(path="benchmarks/results/quality_drafter.json"):
    result = json.load(open(path))
    arms = result["arms"]
    sets = list(next(iter(arms.values()))["eval"])
    offline = arms.get("offline_fkl")
    print("| arm | divergence | contexts | " + " | ".join(f"tau {s}" for s in sets)
          + " | alpha per position (" + sets[0] + ") | target tokens (rollout + scored)"
          " | est. alpha, training (last 10 steps) | train s |")
    print("|---" * (len(sets) + 7) + "|")
    for name, arm in arms.items():
        recipe, train = arm["recipe"] or {}, arm["train"] or {}
        contexts = "-" if not recipe else ", ".join(f"{k[4:]} {v:g}" for k, v in recipe.items()
                                                     if k.startswith("mix_") and v)
        taus = []
        for s in sets:
            tau = arm["eval"][s]["tau"]
            ratio = f" ({tau / offline['eval'][s]['tau']:.2f}x)" if offline and name != "offline_fkl" else ""
            taus.append(f"{fmt(tau)}{ratio}")
        alphas = " ".join(fmt(a) for a in arm["eval"][sets[0]]["alpha_per_position"])
        tokens = (f"{train['target_rollout_tokens']} + {train['target_scored_tokens']}" if train else "0")
        print(f"| {name} | {recipe.get('divergence', '-')} | {contexts} | " + " | ".join(taus)
              + f" | {alphas} | {tokens} | {fmt(train.get('est_alpha_last10', train.get('final_est_alpha')))}"
              f" | {arm['train_seconds']:.0f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
