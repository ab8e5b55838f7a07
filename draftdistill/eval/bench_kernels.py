"""Benchmark of the fused divergence kernels (`draftdistill bench kernels`), forward + backward.

Per divergence and vocabulary size, every arm computes the loss of [tokens, vocab] student
logits against the teacher and backpropagates to the logits:

    fused     draftdistill.kernels (the registry's CUDA path; none for a reference-only divergence)
    eager     the PyTorch reference in draftdistill.losses
    compile   torch.compile of that reference
    liger     Liger-Kernel where it has the op (JSD, forward KL, fused linear JSD), if importable

and reports the median time of `repeats` runs and the peak memory allocated beyond the inputs.
The divergences are the registry's: by default those with a kernel (`kernel_divergences()`).
The bandwidth floor is 3 x tokens x vocab x bytes (read student and teacher logits, write the
gradient) at the copy bandwidth measured on the same GPU. Fused linear rows add the
lm_head matmul: hidden states [tokens, hidden] x weight [vocab, hidden] for student and teacher.

GPU only. `smoke()` runs a tiny CPU version under TRITON_INTERPRET=1 that checks the fused path
against the references and reports no timings; `python -m draftdistill.eval.bench_kernels
--smoke` is what `draftdistill bench kernels --interpret` runs (a fresh process, because the
interpreter must be chosen before the kernels are imported).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch

ARMS = ("fused", "eager", "compile", "liger")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOPK = 20


def default_divergences() -> tuple[str, ...]:
    """What is timed unless told otherwise: every registered divergence with a kernel."""
    from draftdistill.losses import kernel_divergences

    return kernel_divergences()


def check_divergences(names) -> list[str]:
    """`names` as a list, refused (ValueError naming the registry's) when one is not registered."""
    from draftdistill.losses import divergence_names

    names = list(names)
    unknown = [n for n in names if n not in divergence_names()]
    if unknown:
        raise ValueError(f"unknown divergences {unknown}; known: {', '.join(divergence_names())}")
    return names


def has_kernel(name: str) -> bool:
    from draftdistill.losses import DIVERGENCES

    return DIVERGENCES[name].kernel is not None


def make_inputs(name: str, tokens: int, vocab: int, dtype: torch.dtype, device, seed: int = 0):
    """Student logits (leaf, requires grad) and the teacher form the divergence takes (its
    registry entry's `needs`: full logits, top-k, or sampled-token log-probs)."""
    from draftdistill.losses import DIVERGENCES, TeacherTokenLogProbs, TeacherTopK

    g = torch.Generator(device=device).manual_seed(seed)
    student = (torch.randn(tokens, vocab, generator=g, device=device) * 2).to(dtype)
    teacher = (torch.randn(tokens, vocab, generator=g, device=device) * 2).to(dtype)
    needs = DIVERGENCES[name].needs
    if needs == "topk":
        top, ids = teacher.float().log_softmax(-1).topk(min(TOPK, vocab), dim=-1)
        teacher = TeacherTopK(ids, top)
    elif needs == "token":
        ids = torch.randint(0, vocab, (tokens,), generator=g, device=device)
        teacher = TeacherTokenLogProbs(ids, -3 * torch.rand(tokens, generator=g, device=device))
    return student.requires_grad_(True), teacher


def make_arms(name: str, arms, block_size: int | None = None) -> dict[str, Callable]:
    """arm -> fn(student, teacher) returning the loss, for the arms that exist for `name` (no
    fused arm for a reference-only divergence)."""
    from draftdistill.kernels import fused_divergence
    from draftdistill.losses import DIVERGENCES as REFS

    ref = REFS[name].fn
    out: dict[str, Callable] = {}
    if "fused" in arms and has_kernel(name):
        out["fused"] = lambda s, t: fused_divergence(name, s, t, block_size=block_size)
    if "eager" in arms:
        out["eager"] = ref
    if "compile" in arms:
        out["compile"] = torch.compile(ref, dynamic=False)
    if "liger" in arms and name in ("jsd", "fkl"):
        try:
            from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
        except ImportError:
            pass
        else:
            # Liger takes log-probs: the log-softmax is part of its arm, as in our loss.
            op = LigerJSD(beta=0.5) if name == "jsd" else LigerKLDIVLoss(reduction="batchmean",
                                                                          log_target=True)

            def liger(s, t):
                logq = torch.log_softmax(s.float(), -1)
                logp = torch.log_softmax(t.float(), -1)
                return op(logq, logp)
            out["liger"] = liger
    return out


def time_fwd_bwd(fn: Callable, make: Callable, repeats: int, warmup: int) -> dict:
    """Median ms and peak extra GiB of loss = fn(*make()); loss.backward()."""
    args = make()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    try:
        for _ in range(warmup):
            fn(*args).backward()
            for a in leaves:
                a.grad = None
        torch.cuda.synchronize()
        times = []
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args).backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            for a in leaves:
                a.grad = None
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        return {"ms": statistics.median(times), "peak_extra_gib": peak, "repeats": repeats}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as err:  # an arm that cannot run this case is a row, not a crash
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        del args, leaves
        torch.cuda.empty_cache()


def copy_bandwidth(numel: int = 1 << 28, repeats: int = 20) -> float:
    """Device copy bandwidth in bytes/s (read + write) of a bf16 tensor."""
    src = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * numel * src.element_size() / statistics.median(times)


def fused_linear_rows(tokens: int, vocab: int, hidden: int, dtype, arms, repeats: int,
                      warmup: int) -> list[dict]:
    """Fused linear JSD: hidden states x lm_head for student and teacher, then JSD; gradients
    for the student's hidden states and head."""
    from draftdistill.kernels import TeacherHidden, fused_linear_divergence
    from draftdistill.kernels.fused_linear import linear_divergence_reference

    def make():
        g = torch.Generator(device="cuda").manual_seed(0)
        h = (torch.randn(tokens, hidden, generator=g, device="cuda") / 8).to(dtype)
        w = (torch.randn(vocab, hidden, generator=g, device="cuda") / 8).to(dtype)
        th = (torch.randn(tokens, hidden, generator=g, device="cuda") / 8).to(dtype)
        tw = (torch.randn(vocab, hidden, generator=g, device="cuda") / 8).to(dtype)
        return h.requires_grad_(True), w.requires_grad_(True), th, tw

    fns = {}
    if "fused" in arms:
        fns["fused"] = lambda h, w, th, tw: fused_linear_divergence("jsd", h, w,
                                                                    TeacherHidden(th, tw))
    if "eager" in arms:
        fns["eager"] = lambda h, w, th, tw: linear_divergence_reference("jsd", h, w,
                                                                        TeacherHidden(th, tw))
    if "liger" in arms:
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except ImportError:
            pass
        else:
            fns["liger"] = LigerFusedLinearJSD(jsd_beta=0.5)
    rows = []
    for arm, fn in fns.items():
        rows.append({"divergence": "fused_linear_jsd", "arm": arm, "hidden": hidden,
                     **time_fwd_bwd(fn, make, repeats, warmup)})
    return rows


def run_kernel_benchmark(tokens: int, vocab: int, divergences, dtype: torch.dtype, arms,
                         repeats: int = 20, warmup: int = 3, hidden: int = 0,
                         block_size: int | None = None, progress: bool = True) -> dict:
    """All rows for one vocabulary size (needs CUDA); divergences None: default_divergences()."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench kernels needs a CUDA GPU; use --interpret for a CPU smoke run")
    bw = copy_bandwidth()
    floor_ms = 3 * tokens * vocab * torch.finfo(dtype).bits / 8 / bw * 1e3
    rows = []
    for name in check_divergences(default_divergences() if divergences is None else divergences):
        for arm, fn in make_arms(name, arms, block_size).items():
            row = {"divergence": name, "arm": arm,
                   **time_fwd_bwd(fn, lambda: make_inputs(name, tokens, vocab, dtype, "cuda"),
                                  repeats, warmup)}
            rows.append(row)
            if progress:
                print(f"  {name:<20} {arm:<8} {row.get('ms', float('nan')):9.2f} ms "
                      f"{row.get('peak_extra_gib', float('nan')):7.2f} GiB {row.get('error', '')}",
                      file=sys.stderr)
    if hidden:
        rows += fused_linear_rows(tokens, vocab, hidden, dtype, arms, repeats, warmup)
    return {"tokens": tokens, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
            "copy_bandwidth_gb_s": bw / 1e9, "bandwidth_floor_ms": floor_ms, "rows": rows}


def smoke(divergences=None, tokens: int = 6, vocab: int = 100,
          block_size: int = 32) -> list[dict]:
    """Tiny CPU run of the fused path (TRITON_INTERPRET=1 must be set before this module's
    first kernel import): loss and gradient against the reference, no timings. divergences:
    default every one with a kernel; a reference-only one gets a row that says so (nothing to
    compare)."""
    from draftdistill.kernels import (TeacherHidden, fused_divergence, fused_linear_divergence,
                                      linear_divergence_reference)
    from draftdistill.kernels._common import INTERPRET
    from draftdistill.losses import DIVERGENCES as REFS

    if not INTERPRET:
        raise RuntimeError("smoke() needs TRITON_INTERPRET=1 set before the kernels are imported")
    results = []
    for name in check_divergences(default_divergences() if divergences is None else divergences):
        if not has_kernel(name):
            results.append({"divergence": name, "reference_only": True})
            continue
        s, t = make_inputs(name, tokens, vocab, torch.float32, "cpu")
        ours = fused_divergence(name, s, t, block_size=block_size)
        (g_ours,) = torch.autograd.grad(ours, s)
        ref = REFS[name].fn(s, t)
        (g_ref,) = torch.autograd.grad(ref, s)
        results.append({"divergence": name, "loss_error": (ours - ref).abs().item(),
                        "grad_error": (g_ours - g_ref).abs().max().item()})
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, 16, generator=g).requires_grad_(True)
    w = torch.randn(vocab, 16, generator=g) / 4
    teacher = TeacherHidden(torch.randn(tokens, 8, generator=g), torch.randn(vocab, 8, generator=g))
    ours = fused_linear_divergence("jsd", h, w, teacher, chunk_size=4, block_size=block_size)
    ref = linear_divergence_reference("jsd", h, w, teacher)
    results.append({"divergence": "fused_linear_jsd", "loss_error": (ours - ref).abs().item(),
                    "grad_error": (torch.autograd.grad(ours, h)[0]
                                   - torch.autograd.grad(ref, h)[0]).abs().max().item()})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CPU smoke run of the fused kernels "
                                                 "(TRITON_INTERPRET=1); see `draftdistill "
                                                 "bench kernels` for the GPU benchmark.")
    parser.add_argument("--smoke", action="store_true", required=True)
    parser.add_argument("--divergences", default=None,
                        help="comma-separated; default: every registered divergence with a kernel")
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=100)
    args = parser.parse_args(argv)
    names = args.divergences.split(",") if args.divergences else None
    results = smoke(names, args.tokens, args.vocab)
    ok = True
    print(f"{'divergence':<20} {'|loss - ref|':>13} {'max|grad - ref|':>16}")
    for r in results:
        if r.get("reference_only"):
            print(f"{r['divergence']:<20} reference only: no kernel to check")
            continue
        good = r["loss_error"] <= 1e-4 and r["grad_error"] <= 1e-5
        ok &= good
        print(f"{r['divergence']:<20} {r['loss_error']:>13.2e} {r['grad_error']:>16.2e}"
              f"{'' if good else '  MISMATCH'}")
    print("smoke run under TRITON_INTERPRET=1: code path checked, no timings"
          if ok else "MISMATCH against the references")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
