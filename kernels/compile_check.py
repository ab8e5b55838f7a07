"""Compile every kernel variant for a CUDA target without a GPU: `python -m
draftdistill.kernels.compile_check [--arch 90]`.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, so it accepts code the compiler
rejects (type changes across branches, unsupported ops). This compiles each kernel with Triton's
CUDA backend and ptxas, the way a GPU launch would, and reports register spills (local memory).
Must run without TRITON_INTERPRET (the kernels must be JITFunctions).
"""

from __future__ import annotations

import argparse
import itertools
import sys


def variants(dtypes=("bf16", "fp16", "fp32")):
    """(label, kernel, signature, constexprs) for every kernel x divergence x dtype combination."""
    from . import logits_divergence as ld
    from . import row_softmax as rs

    for dt, BLOCK in itertools.product(dtypes, (2048,)):
        scalars = {"V": "i32", "inv_T": "fp32"}
        params = {"w": "fp32", "log_w": "fp32", "log_1mw": "fp32"}
        for k1, k2 in [(ld.FKL, ld.NONE), (ld.RKL, ld.NONE), (ld.JSD, ld.NONE), (ld.TVD, ld.NONE),
                       (ld.SKEW_FKL, ld.NONE), (ld.SKEW_RKL, ld.NONE), (ld.FKL, ld.TVD)]:
            sig = {"x_ptr": f"*{dt}", "t_ptr": f"*{dt}", "keep_ptr": "*i8", "stats_ptr": "*fp32",
                   "V": "i32", "x_stride": "i64", "t_stride": "i64", "inv_T": "fp32", **params,
                   "KIND1": "constexpr", "KIND2": "constexpr", "SUMS": "constexpr",
                   "BLOCK": "constexpr"}
            for sums in (True, False):
                yield (f"stats {dt} kinds={k1},{k2} sums={sums}", ld._stats_kernel, sig,
                       {"KIND1": k1, "KIND2": k2, "SUMS": sums, "BLOCK": BLOCK})
            sig = {"x_ptr": f"*{dt}", "t_ptr": f"*{dt}", "keep_ptr": "*i8", "stats_ptr": "*fp32",
                   "coef_ptr": "*fp32", "grad_ptr": f"*{dt}", "loss_ptr": "*fp32", "V": "i32",
                   "x_stride": "i64", "t_stride": "i64", "g_stride": "i64", "inv_T": "fp32",
                   **params, "KIND1": "constexpr", "KIND2": "constexpr", "LOSS": "constexpr",
                   "BLOCK": "constexpr"}
            for loss in (True, False):
                yield (f"grad {dt} kinds={k1},{k2} loss={loss}", ld._grad_kernel, sig,
                       {"KIND1": k1, "KIND2": k2, "LOSS": loss, "BLOCK": BLOCK})
        for has_ids in (True, False):
            sig = {"x_ptr": f"*{dt}", "ids_ptr": "*i64", "keep_ptr": "*i8", "out_ptr": "*fp32",
                   "K": "i32", "x_stride": "i64", **scalars, "HAS_IDS": "constexpr",
                   "BLOCK": "constexpr"}
            yield (f"row_lse {dt} ids={has_ids}", rs._lse_kernel, sig,
                   {"HAS_IDS": has_ids, "BLOCK": BLOCK})
        sig = {"x_ptr": f"*{dt}", "keep_ptr": "*i8", "lse_ptr": "*fp32", "coef_ptr": "*fp32",
               "grad_ptr": f"*{dt}", "x_stride": "i64", "g_stride": "i64", **scalars,
               "BLOCK": "constexpr"}
        yield f"scaled_softmax {dt}", rs._scaled_softmax_kernel, sig, {"BLOCK": BLOCK}


def compile_all(arch: int = 90, num_warps: int = 8,
                dtypes=("bf16", "fp16", "fp32")) -> list[tuple[str, str]]:
    """[(label, "ok" | "ok, N local-memory (spill) lines" | error)] for every variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._common import INTERPRET

    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for label, kernel, sig, consts in variants(dtypes):
        # Argument order is the kernel's; the signature dict must follow it.
        sig = {name: sig[name] for name in kernel.arg_names}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                      target=target, options={"num_warps": num_warps})
        except Exception as err:  # report every failing variant, not only the first
            results.append((label, f"FAILED: {type(err).__name__}: {err}"))
            continue
        spills = compiled.asm["ptx"].count(".local")
        results.append((label, "ok" if not spills else f"ok, {spills} local-memory lines"))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="logits dtypes to compile")
    args = parser.parse_args(argv)
    results = compile_all(args.arch, dtypes=tuple(args.dtypes.split(",")))
    for label, status in results:
        print(f"{label:<40} {status}")
    failed = [label for label, status in results if status.startswith("FAILED")]
    print(f"{len(results) - len(failed)}/{len(results)} variants compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
