"""Compress SmolLM2 into a layer-pruned student (issue [O], benchmark b): on-policy distillation
(sampled-token RKL as in the Thinking-Machines recipe, and GKD's JSD(0.5) on the student's own
samples) vs off-policy KD (forward KL over the full vocabulary on teacher samples), at equal
teacher-forward tokens.

Every arm starts from the same pruned student and runs the same steps x batch x max_new_tokens,
so the teacher scores (about) the same number of tokens per arm. The off-policy arm's teacher
samples are drawn once, one per training prompt, before training; a serving stack would keep the
teacher's logits from that generation pass, so its teacher budget is one forward per sampled token,
the same as the on-policy arms' scoring (this script re-scores them through the same trainer loop).

Metric: held-out per-token reverse KL, KL(q_student || p_teacher), exact over the vocabulary, at
every position of the student's own T=1 samples on held-out GSM8K prompts (what OPD minimises and
what the student meets when it generates), plus mean sample length.

    python benchmarks/opd_compress.py --student pruned:8 --steps 40
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.eval.machine import machine_info
from draftdistill.models import load_drafter, load_target
from draftdistill.opd import OPDConfig, train_opd
from draftdistill.opd.rollout import LocalSampler
from draftdistill.train.batching import pack, response_logits
from draftdistill.train.checkpoint import load_weights

TEACHER = "smollm2-135m-instruct"


def arms(samples_file: str) -> dict[str, dict | None]:
    return {
        "none": None,
        "offline_kd_fkl": dict(objective="divergence", divergence="fkl", teacher_scores="logits", mix_student=0.0,
                               prompts=samples_file),
        "opd_sampled_rkl": dict(objective="opd:clip=0.2", teacher_scores="token", mix_student=1.0),
        "gkd_jsd": dict(objective="divergence", divergence="jsd:beta=0.5", teacher_scores="logits", mix_student=1.0),
    }


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="pruned:8", help="layer-pruned copy of the teacher")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out GSM8K prompts")
    ap.add_argument("--eval-samples", type=int, default=2, help="student samples per held-out prompt")
    ap.add_argument("--arms", default="none,offline_kd_fkl,opd_sampled_rkl,gkd_jsd")
    ap.add_argument("--work-dir", default="runs/opd_compress")
    ap.add_argument("--out", default="benchmarks/results/opd_compress.json")
    return ap.parse_args(argv)


def write_teacher_samples(teacher, tokenizer, stop, prompts, path: Path, max_new_tokens: int, batch: int) -> int:
    """One T=1 teacher sample per training prompt, as a prompt file whose 'answer' is the sample."""
    sampler = LocalSampler(teacher, stop, tokenizer.pad_token_id or stop[0], temperature=1.0)
    generator = torch.Generator().manual_seed(1234)
    rows, tokens = [], 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start: start + batch]
        ids = [encode_prompt(tokenizer, p)[0].tolist() for p in chunk]
        for prompt, completion in zip(chunk, sampler.sample(ids, max_new_tokens, generator)):
            tokens += len(completion.tokens)
            rows.append({"messages": prompt.messages,
                         "answer": tokenizer.decode(completion.tokens, skip_special_tokens=True)})
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return tokens


@torch.no_grad()
def heldout_reverse_kl(student, teacher, tokenizer, stop, prompts, samples: int, max_new_tokens: int) -> dict:
    """Mean over tokens of KL(q || p) at the student's own samples' positions (exact, full vocabulary)."""
    pad = tokenizer.pad_token_id or stop[0]
    sampler = LocalSampler(student, stop, pad, temperature=1.0)
    generator = torch.Generator().manual_seed(4321)
    kl_sum, tokens, lengths = 0.0, 0, []
    for prompt in prompts:
        ids = [encode_prompt(tokenizer, prompt)[0].tolist()] * samples
        responses = [c.tokens for c in sampler.sample(ids, max_new_tokens, generator)]
        lengths += [len(r) for r in responses]
        batch = pack(ids, responses, pad)
        logq = F.log_softmax(response_logits(student, batch).float(), -1)
        logp = F.log_softmax(response_logits(teacher, batch).float(), -1)
        kl = (logq.exp() * (logq - logp)).sum(-1)
        kl_sum += float(kl[batch.scored].sum())
        tokens += int(batch.scored.sum())
    return {"reverse_kl_per_token": kl_sum / max(1, tokens), "tokens": tokens,
            "mean_length": sum(lengths) / len(lengths)}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_target(TEACHER, device="cpu")
    teacher = teacher.float().eval()
    stop = stop_token_ids(tokenizer, teacher)
    train_prompts = load_prompts("gsm8k:train", limit=args.steps * args.batch_size)  # each prompt seen once
    eval_prompts = load_prompts("gsm8k:heldout", limit=args.eval_prompts)

    result = {"name": "opd_compress", "command": "python benchmarks/opd_compress.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info("cpu"), "settings": vars(args), "arms": {}}
    samples_file = work / "teacher_samples.jsonl"
    names = args.arms.split(",")
    if "offline_kd_fkl" in names:
        started = time.perf_counter()
        sample_tokens = write_teacher_samples(teacher, tokenizer, stop, train_prompts, samples_file,
                                              args.max_new_tokens, args.batch_size)
        result["teacher_samples"] = {"tokens": sample_tokens, "seconds": time.perf_counter() - started}

    for arm in names:
        recipe = arms(str(samples_file))[arm]
        started, train = time.perf_counter(), None
        student = load_drafter(args.student, teacher, tokenizer)
        if recipe is not None:
            settings = dict(student=args.student, teacher=TEACHER, prompts="gsm8k:train",
                            prompt_limit=args.steps * args.batch_size, max_new_tokens=args.max_new_tokens,
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=4,
                            save_every=args.steps, out_dir=str(work / arm), resume=False, device="cpu")
            cfg = OPDConfig(**{**settings, **recipe})
            train_opd(cfg, progress=True)
            rows = [json.loads(line) for line in (work / arm / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "loss" in r]
            train = {"teacher_scored_tokens": int(sum(r["loss_tokens"] for r in rows)),
                     "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"],
                     "final_rkl_estimate": rows[-1].get("rkl_estimate")}
            load_weights(work / arm / "checkpoint", student)
        train_seconds = time.perf_counter() - started
        student = student.float().eval()
        result["arms"][arm] = {"recipe": recipe, "train": train, "train_seconds": train_seconds,
                               "eval": heldout_reverse_kl(student, teacher, tokenizer, stop, eval_prompts,
                                                          args.eval_samples, args.max_new_tokens)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every arm: a killed run keeps what it measured
        print(arm, result["arms"][arm]["eval"], flush=True)


if __name__ == "__main__":
    main()
