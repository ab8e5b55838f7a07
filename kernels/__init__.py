"""Triton kernels that fuse softmax, divergence and gradient over large vocabularies.

Installed as ``draftdistill.kernels``. Every kernel sits beside its reference in
``draftdistill.losses``; the losses dispatch here on CUDA only (the registry imports
``dispatch`` on its first CUDA call), so importing draftdistill never imports Triton.

    logits_divergence  fkl, rkl, jsd, tvd, skew_fkl, skew_rkl, neg_log_acceptance, lk
    topk_tail          top-k teacher with a tail bucket (TeacherTopK)
    sampled_rkl        sampled-token reverse KL with importance weights and clipping
    row_softmax        the two row kernels the last two share
    fused_linear       hidden states x lm_head + any of the above, chunked over tokens
    dispatch           registry-facing functions (reference fallback), FUSED_KERNELS

Names below are imported on first use, so ``import draftdistill.kernels`` stays cheap.
"""

_EXPORTS = {
    "fused_divergence": "dispatch", "register": "dispatch",
    "fused_linear_divergence": "fused_linear", "linear_divergence_reference": "fused_linear",
    "TeacherHidden": "fused_linear",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
