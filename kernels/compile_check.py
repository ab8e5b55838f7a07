"""Compile every kernel variant for a CUDA target without a GPU: `python -m
draftdistill.kernels.compile_check [--arch 90]`.

The variants are those of the registry's divergences with a kernel (`kernel_divergences()`):
each kernel module lists the launches a divergence may make (`compile_variants`).

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, so it accepts code the compiler
rejects (type changes across branches, unsupported ops). This compiles each kernel with Triton's
CUDA backend and ptxas, the way a GPU launch would, and reports register spills (local memory).
Must run without TRITON_INTERPRET (the kernels must be JITFunctions).
"""

from __future__ import annotations

import argparse
import itertools
import sys


def variants(dtypes=("bf16", "fp16", "fp32"), names=None):
    """(label, kernel, signature, constexprs) for every launch the registry's kernel divergences
    (or `names`) may make, per dtype: each kernel module lists its own (`compile_variants`), a
    launch shared by several modules once."""
    from draftdistill.losses.registry import kernel_divergences

    from .dispatch import kernel_module

    by_module: dict = {}
    for name in (kernel_divergences() if names is None else names):
        module = kernel_module(name)
        if module is None:
            raise ValueError(f"divergence {name!r} is reference-only: it has no kernel to compile")
        by_module.setdefault(module, []).append(name)
    seen = set()
    for dt, BLOCK in itertools.product(dtypes, (2048,)):
        for module, group in by_module.items():
            for label, kernel, sig, consts in module.compile_variants(group, dt, BLOCK):
                if label not in seen:
                    seen.add(label)
                    yield label, kernel, sig, consts


def compile_all(arch: int = 90, num_warps: int = 8, dtypes=("bf16", "fp16", "fp32"),
                names=None) -> list[tuple[str, str]]:
    """[(label, "ok" | "ok, N local-memory (spill) lines" | error)] for every variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._common import INTERPRET

    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for label, kernel, sig, consts in variants(dtypes, names):
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
    parser.add_argument("--divergences", default=None,
                        help="comma-separated divergences; default: every one with a kernel")
    args = parser.parse_args(argv)
    names = args.divergences.split(",") if args.divergences else None
    results = compile_all(args.arch, dtypes=tuple(args.dtypes.split(",")), names=names)
    for label, status in results:
        print(f"{label:<40} {status}")
    failed = [label for label, status in results if status.startswith("FAILED")]
    print(f"{len(results) - len(failed)}/{len(results)} variants compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
