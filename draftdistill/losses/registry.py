"""The divergence registry: the one list of divergences. Each entry has its reference function, its
spec parameters (defaults from the function's signature, a range check) and optionally the fused
kernel that implements it on CUDA; everything else derives its list from here (CLI choices and
defaults, the kernel dispatch, tests and benchmark, compile_check).

    loss_fn = get_divergence("jsd", beta=0.9)
    loss = loss_fn(student_logits, teacher_logits, mask, temperature=1.0)

    name, params = parse_divergence("topk_tail:k=20,base=rkl")     # from a CLI flag or YAML
    divergence_names()      # every registered name
    kernel_divergences()    # those with a fused kernel (the rest are reference-only)

Specs follow the grammar of draftdistill.spec_strings (shared with the OPD objectives).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from draftdistill.spec_strings import parse_spec

from .divergences import (check_beta, check_lk, check_nla, check_skew, fkl, jsd, lk,
                          neg_log_acceptance, rkl, skew_fkl, skew_rkl, tvd)
from .sampled import check_sampled, sampled_rkl
from .teacher import Teacher
from .topk import check_topk, topk_tail

# The arguments every divergence shares; anything after them is a parameter.
_SHARED = ("student_logits", "teacher", "mask", "temperature", "reduction")


@dataclass(frozen=True)
class Divergence:
    """One registered divergence.

    needs: the least teacher information it works from. "full": a logits Tensor or
    TeacherLogProbs; "topk": TeacherTopK (or a full teacher, whose top-k it takes);
    "token": TeacherTokenLogProbs.
    kernel: the module (a dotted name, imported only when a kernel is wanted, so the losses never
    import Triton) with `supports(shape, teacher, params)` and `loss_and_grad(name, ...)` that
    fuses this divergence; None for a reference-only divergence, which runs its reference on
    CUDA too and which the kernel tests, benchmark and compile check leave out.
    """

    name: str
    fn: Callable[..., Tensor]
    needs: str
    check: Callable[..., None] | None = None  # validates parameter values
    defaults: dict[str, Any] = field(default_factory=dict)
    kernel: str | None = None


NEEDS = ("full", "topk", "token")
KERNELS = "draftdistill.kernels"  # the package the kernel modules live in


def make_divergence(name: str, fn: Callable[..., Tensor], needs: str,
                    check: Callable[..., None] | None = None,
                    kernel: str | None = None) -> Divergence:
    """A registry entry for `fn`, whose signature is the shared one followed by its parameters
    (their defaults are read from it, so they are written in one place). kernel: a module name,
    relative to draftdistill.kernels ("logits_divergence") or absolute; None: reference only."""
    params = list(inspect.signature(fn).parameters.values())
    if tuple(p.name for p in params[:len(_SHARED)]) != _SHARED:
        raise TypeError(f"divergence {name!r}: {fn.__name__} must start with the arguments "
                        f"{', '.join(_SHARED)}")
    if needs not in NEEDS:
        raise ValueError(f"divergence {name!r}: needs must be one of {NEEDS}, got {needs!r}")
    if kernel is not None and "." not in kernel:
        kernel = f"{KERNELS}.{kernel}"
    defaults = {p.name: p.default for p in params[len(_SHARED):]}
    return Divergence(name, fn, needs, check, defaults, kernel)


DIVERGENCES: dict[str, Divergence] = {d.name: d for d in [
    make_divergence("fkl", fkl, "full", kernel="logits_divergence"),
    make_divergence("rkl", rkl, "full", kernel="logits_divergence"),
    make_divergence("jsd", jsd, "full", check_beta, kernel="logits_divergence"),
    make_divergence("tvd", tvd, "full", kernel="logits_divergence"),
    make_divergence("skew_fkl", skew_fkl, "full", check_skew, kernel="logits_divergence"),
    make_divergence("skew_rkl", skew_rkl, "full", check_skew, kernel="logits_divergence"),
    make_divergence("neg_log_acceptance", neg_log_acceptance, "full", check_nla,
                    kernel="logits_divergence"),
    make_divergence("lk", lk, "full", check_lk, kernel="logits_divergence"),
    make_divergence("topk_tail", topk_tail, "topk", check_topk, kernel="topk_tail"),
    make_divergence("sampled_rkl", sampled_rkl, "token", check_sampled, kernel="sampled_rkl"),
]}


def divergence_names(needs: str | None = None) -> tuple[str, ...]:
    """Every registered divergence (those taking teacher form `needs` only, when given), in
    registry order: the CLI's and configs' choices."""
    return tuple(n for n, d in DIVERGENCES.items() if needs is None or d.needs == needs)


def kernel_divergences(needs: str | None = None) -> tuple[str, ...]:
    """The registered divergences that have a fused kernel (and `needs`, when given): what the
    kernel dispatch registers, the kernel tests check and `bench kernels` times by default."""
    return tuple(n for n in divergence_names(needs) if DIVERGENCES[n].kernel is not None)


# name -> fused CUDA implementation with the same signature; kernels/ fills it in. Used only
# for CUDA tensors, so the references above stay the CPU path and the ground truth in tests.
FUSED_KERNELS: dict[str, Callable[..., Tensor]] = {}
KERNEL_DISPATCH = "draftdistill.kernels.dispatch"  # its register() fills FUSED_KERNELS (a plugin, loaded by name)
_kernels_loaded = False


def fused_kernel(name: str) -> Callable[..., Tensor] | None:
    """FUSED_KERNELS[name], registering draftdistill.kernels on the first call (the first CUDA
    loss), so importing the losses never imports Triton. Without Triton the references serve."""
    global _kernels_loaded
    if not _kernels_loaded:
        _kernels_loaded = True
        try:  # by name: the kernels import the losses (their references), never the other way round
            register = importlib.import_module(KERNEL_DISPATCH).register
        except ImportError as err:
            warnings.warn(f"fused divergence kernels unavailable ({err}); using the PyTorch "
                          f"references on CUDA", stacklevel=3)
        else:
            register()
    return FUSED_KERNELS.get(name)


def _lookup(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; known: {', '.join(divergence_names())}")
    return DIVERGENCES[name]


def _check_names(spec: Divergence, params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        known = ", ".join(spec.defaults) or "none"
        raise ValueError(f"unknown parameter(s) {unknown} for divergence {spec.name!r}; "
                         f"its parameters: {known}")


def resolve_params(name: str, params: dict[str, Any]):
    """(spec, the divergence's defaults overridden by `params`), refused now when a name is unknown
    or a value is out of range."""
    spec = _lookup(name)
    _check_names(spec, params)
    bound = {**spec.defaults, **params}
    if spec.check is not None:
        spec.check(**bound)
    return spec, bound


def get_divergence(name: str, **params: Any) -> Callable[..., Tensor]:
    """The divergence `name` with `params` bound and checked now (not at the first step).

    The returned callable has the shared signature
    `(student_logits, teacher, mask=None, temperature=1.0, reduction="mean", **call_params)`;
    call_params (e.g. sampled_rkl's per-batch `old_logprobs`) override the bound ones. On CUDA
    tensors it uses FUSED_KERNELS[name] when one is registered.
    """
    spec, bound = resolve_params(name, params)

    def loss_fn(student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
                temperature: float = 1.0, reduction: str = "mean", **call_params: Any) -> Tensor:
        _check_names(spec, call_params)
        fn = fused_kernel(name) if student_logits.is_cuda else None
        return (fn or spec.fn)(student_logits, teacher, mask=mask, temperature=temperature,
                               reduction=reduction, **{**bound, **call_params})

    loss_fn.__name__ = name
    loss_fn.__doc__ = spec.fn.__doc__
    loss_fn.params = bound  # for logging the exact objective
    return loss_fn


def divergence(name: str, student_logits: Tensor, teacher: Teacher, mask: Tensor | None = None,
               temperature: float = 1.0, reduction: str = "mean", **params: Any) -> Tensor:
    """One-shot form of get_divergence(name, **params)(student_logits, teacher, ...)."""
    return get_divergence(name, **params)(student_logits, teacher, mask=mask,
                                          temperature=temperature, reduction=reduction)


def parse_divergence(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse "name" or "name:key=value,key=value" into (name, params), checked now.

    "jsd:beta=0.9" -> ("jsd", {"beta": 0.9}); "topk_tail:k=20,base=rkl" ->
    ("topk_tail", {"k": 20, "base": "rkl"}); "tvd" -> ("tvd", {}). Values parse as int, float,
    true/false, none/null, else string (draftdistill.spec_strings). Errors quote the spec.
    """
    name, params = parse_spec(spec, "divergence")
    try:
        resolve_params(name, params)  # validates name, parameter names and values
    except ValueError as err:
        raise ValueError(f"divergence spec {spec!r}: {err}") from None
    return name, params
