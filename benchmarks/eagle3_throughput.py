"""EAGLE-3 TTT training throughput (issue [E]): tokens/s, peak memory, the share of the step spent in
the target's forwards, and the model FLOPs utilisation (MFU) of the whole step.

The step is the trainer's own code (train/ttt.py: ttt_forward, step_loss; AdamW on the head), on a
random-weight target of a given shape, so no weights are needed:

    python benchmarks/eagle3_throughput.py --shape llama-8b --device cuda     # the GPU figure
    python benchmarks/eagle3_throughput.py --shape smollm2 --device cpu       # what a CPU does

Time in the target is measured by hooks around its forward (synchronised on CUDA). FLOPs count the
matmuls: the target forward 2 * P_target per token (over the context, plus the chain tokens with
sampled chains), the head 6 * P_head per token per TTT step (forward + backward), attention scores
left out, so MFU is a slight underestimate. Writes benchmarks/results/eagle3_throughput_<shape>_<device>.json.

--feature-cache DIR (data chains) also times the offline mode on the same batch in the same run:
one step stores the batch's target features (train/feature_cache.py), then the timed steps read
them, and the result adds their step time, the ratio to the step with the target in the loop, and
the cache's bytes per context token.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftdistill.eval.machine import machine_info
from draftdistill.losses import get_divergence
from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import build_eagle3_head
from draftdistill.train.feature_cache import FeatureCache, cache_identity
from draftdistill.train.ttt import CHAINS, ContextBatch, plan_ttt, step_loss, ttt_forward

SHAPES = {  # (hidden, layers, heads, kv_heads, intermediate, vocab)
    "llama-8b": (4096, 32, 32, 8, 14336, 128256),  # Llama-3.1-8B
    "smollm2": (576, 30, 9, 3, 1536, 49152),  # SmolLM2-135M
    "tiny": (64, 6, 4, 2, 128, 1024),  # a smoke test
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--target-dtype", default="bfloat16", help="the frozen target's dtype (the head trains in float32)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048, help="tokens per row (prompt + response)")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per row (not scored)")
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--chain", choices=CHAINS, default="data")
    ap.add_argument("--anchors", type=int, default=64, help="sampled chains scored per row")
    ap.add_argument("--chain-tokens", type=int, default=0, help="drafts per sampled chain the target scores (0: all)")
    ap.add_argument("--reach-weights", action="store_true", help="weight sampled drafts by their reach chance")
    ap.add_argument("--draft-vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--feature-cache", default="", help="also time data-chain steps that read the target features "
                                                       "from this directory (emptied first)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.feature_cache and args.chain != "data":  # before any model is built
        ap.error("--feature-cache times data chains only")
    return args


def random_target(shape: str, dtype, device) -> LlamaForCausalLM:
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    with torch.device(device):
        target = LlamaForCausalLM(config).to(dtype)
    return target.eval().requires_grad_(False)


class TargetTimer:
    """Seconds spent inside target.forward (hooks; CUDA synchronised at both ends)."""

    def __init__(self, target, device):
        self.seconds, self.started, self.cuda = 0.0, 0.0, str(device).startswith("cuda")
        target.register_forward_pre_hook(lambda *_: self._start())
        target.register_forward_hook(lambda *_: self._stop())

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _start(self):
        self._sync()
        self.started = time.perf_counter()

    def _stop(self):
        self._sync()
        self.seconds += time.perf_counter() - self.started


def parameter_count(module, skip=()) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name not in skip)


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.target_dtype)
    torch.manual_seed(0)
    target = random_target(args.shape, dtype, device)
    V = target.config.vocab_size
    head = build_eagle3_head(target, DraftVocab(torch.arange(min(args.draft_vocab, V)), V)).float().train()
    trainable = [p for name, p in head.named_parameters() if name not in head.weights_from_target]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    loss_fn = get_divergence("fkl")
    timer = TargetTimer(target, device)
    generators = [torch.Generator().manual_seed(i) for i in range(args.batch)]
    ids = torch.randint(0, V, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    batch = ContextBatch(ids, torch.full((args.batch,), args.seq, device=device),
                         torch.full((args.batch,), args.prompt, device=device))

    def step(features=None) -> int:
        plan = plan_ttt(batch, args.ttt_steps, args.chain, args.anchors, generators, args.chain_tokens)
        optimizer.zero_grad(set_to_none=True)
        scored, target_tokens = ttt_forward(head, target, batch, plan, 1.0, generators, features,
                                            reach_weights=args.reach_weights)
        counts = plan.counts()
        loss = sum(0.8 ** j * step_loss(r, head.vocab, loss_fn) / max(1, counts[j]) for j, r in enumerate(scored))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return target_tokens

    def peak_memory_gib() -> float | None:  # since the last reset in timed()
        return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    def timed(features=None) -> tuple[float, int]:
        """(seconds, target tokens) of args.steps steps after args.warmup untimed ones."""
        for _ in range(args.warmup):
            step(features)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer.seconds, tokens = 0.0, 0
        started = time.perf_counter()
        for _ in range(args.steps):
            tokens += step(features)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, tokens

    seconds, target_tokens = timed()
    target_seconds = timer.seconds
    peak_memory = peak_memory_gib()
    offline = None
    if args.feature_cache:
        directory = Path(args.feature_cache)
        shutil.rmtree(directory, ignore_errors=True)
        features = FeatureCache(directory, cache_identity(args.shape, target, head.aux_layer_ids))
        cached_seconds, cached_tokens = timed(features)  # the first warmup step stores the features
        stored = sum(f.stat().st_size for f in directory.glob("*/*.safetensors"))
        offline = {"step_seconds": cached_seconds / args.steps,
                   "context_tokens_per_second": args.batch * args.seq * args.steps / cached_seconds,
                   "target_tokens_per_step": cached_tokens / args.steps,
                   "target_forward_share": timer.seconds / cached_seconds,
                   "peak_memory_gib": peak_memory_gib(),
                   "speedup_over_target_in_the_loop": seconds / cached_seconds,
                   "cache_bytes_per_context_token": stored / (args.batch * args.seq),
                   "rows_read": features.rows_read, "rows_computed": features.rows_computed}

    context_tokens = args.batch * args.seq * args.steps
    head_positions = args.batch * (args.seq - 1) * args.steps  # every position runs every TTT step
    # no embedding matmul
    target_params = parameter_count(target) - target.config.vocab_size * target.config.hidden_size
    head_params = parameter_count(head, skip=head.weights_from_target)
    flops = 2 * target_params * target_tokens + 6 * head_params * head_positions * args.ttt_steps
    machine = machine_info(args.device)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)
    result = {
        "name": "eagle3_throughput",
        "command": "python benchmarks/eagle3_throughput.py " + " ".join(argv or sys.argv[1:]),
        "machine": {**machine, "gpu": gpu_name}, "settings": vars(args),
        "target_params": parameter_count(target), "head_trainable_params": head_params,
        "step_seconds": seconds / args.steps,
        "context_tokens_per_second": context_tokens / seconds,
        "target_tokens_per_step": target_tokens / args.steps,
        "target_forward_share": target_seconds / seconds,
        "peak_memory_gib": peak_memory,
        "model_tflops_per_second": flops / seconds / 1e12,
        "mfu": flops / seconds / 1e12 / peak if peak else None,
        "mfu_peak_tflops": peak,
        "offline_from_feature_cache": offline,
    }
    out = Path(args.out or f"benchmarks/results/eagle3_throughput_{args.shape}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "settings", "command")}, indent=1))


if __name__ == "__main__":
    main()
