"""The divergence registry: names -> reference functions, bound parameters, CUDA dispatch.

    loss_fn = get_divergence("jsd", beta=0.9)
    loss = loss_fn(student_logits, teacher_logits, mask, temperature=1.0)

    name, params = parse_divergence("topk_tail:k=20,base=rkl")     # from a CLI flag or YAML
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

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
    """

    name: str
    fn: Callable[..., Tensor]
    needs: str
    check: Callable[..., None] | None = None  # validates parameter values
    defaults: dict[str, Any] = field(default_factory=dict)


def _spec(name: str, fn: Callable[..., Tensor], needs: str,
          check: Callable[..., None] | None = None) -> Divergence:
    # Defaults come from the function signature, so they are written in one place.
    params = list(inspect.signature(fn).parameters.values())
    assert tuple(p.name for p in params[:len(_SHARED)]) == _SHARED, name
    defaults = {p.name: p.default for p in params[len(_SHARED):]}
    return Divergence(name, fn, needs, check, defaults)


DIVERGENCES: dict[str, Divergence] = {d.name: d for d in [
    _spec("fkl", fkl, "full"),
    _spec("rkl", rkl, "full"),
    _spec("jsd", jsd, "full", check_beta),
    _spec("tvd", tvd, "full"),
    _spec("skew_fkl", skew_fkl, "full", check_skew),
    _spec("skew_rkl", skew_rkl, "full", check_skew),
    _spec("neg_log_acceptance", neg_log_acceptance, "full", check_nla),
    _spec("lk", lk, "full", check_lk),
    _spec("topk_tail", topk_tail, "topk", check_topk),
    _spec("sampled_rkl", sampled_rkl, "token", check_sampled),
]}

# name -> fused CUDA implementation with the same signature; kernels/ fills it in. Used only
# for CUDA tensors, so the references above stay the CPU path and the ground truth in tests.
FUSED_KERNELS: dict[str, Callable[..., Tensor]] = {}
_kernels_loaded = False


def fused_kernel(name: str) -> Callable[..., Tensor] | None:
    """FUSED_KERNELS[name], registering draftdistill.kernels on the first call (the first CUDA
    loss), so importing the losses never imports Triton. Without Triton the references serve."""
    global _kernels_loaded
    if not _kernels_loaded:
        _kernels_loaded = True
        try:
            from draftdistill.kernels.dispatch import register
        except ImportError as err:
            warnings.warn(f"fused divergence kernels unavailable ({err}); using the PyTorch "
                          f"references on CUDA", stacklevel=3)
        else:
            register()
    return FUSED_KERNELS.get(name)


def _lookup(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; known: {', '.join(DIVERGENCES)}")
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


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_divergence(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse "name" or "name:key=value,key=value" into (name, params), checked.

    "jsd:beta=0.9" -> ("jsd", {"beta": 0.9}); "topk_tail:k=20,base=rkl" ->
    ("topk_tail", {"k": 20, "base": "rkl"}); "tvd" -> ("tvd", {}). Values parse as int, float,
    true/false, none/null, else string.
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"bad divergence parameter {item!r} in {spec!r}; expected key=value")
        params[key] = _parse_value(value)
    get_divergence(name, **params)  # validates name, parameter names and values
    return name, params
