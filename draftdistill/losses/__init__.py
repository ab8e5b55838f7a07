"""Divergences between a teacher p and a student (drafter) q, one reference function each.

Every divergence has the signature
    fn(student_logits [..., V], teacher, mask [...] = None, temperature = 1.0,
       reduction = "mean", **params) -> Tensor
with `teacher` a logits Tensor, TeacherLogProbs, TeacherTopK or TeacherTokenLogProbs. Use the
registry (`get_divergence`, `divergence`, `parse_divergence`; `divergence_names()` lists them)
to pick one by name; on CUDA tensors it dispatches to the fused Triton kernels in FUSED_KERNELS
(draftdistill.kernels, registered on the first CUDA call for the divergences that declare a
kernel, `kernel_divergences()`, so importing the losses never imports Triton).
"""

from .divergences import (acceptance_rate, fkl, jsd, lk, neg_log_acceptance, rkl, skew_fkl,
                          skew_rkl, tvd)
from .reduce import reduce_loss
from .registry import (DIVERGENCES, FUSED_KERNELS, Divergence, divergence, divergence_names,
                       get_divergence, kernel_divergences, make_divergence, parse_divergence)
from .sampled import sampled_rkl, sampled_token_advantage
from .teacher import (Teacher, TeacherLogProbs, TeacherTokenLogProbs, TeacherTopK,
                       student_log_probs, teacher_log_probs)
from .topk import topk_tail

__all__ = [
    "DIVERGENCES", "FUSED_KERNELS", "Divergence", "Teacher", "TeacherLogProbs",
    "TeacherTokenLogProbs", "TeacherTopK", "acceptance_rate", "divergence", "divergence_names",
    "fkl", "get_divergence", "jsd", "kernel_divergences", "lk", "make_divergence",
    "neg_log_acceptance", "parse_divergence", "reduce_loss",
    "rkl", "sampled_rkl", "sampled_token_advantage", "skew_fkl", "skew_rkl",
    "student_log_probs", "teacher_log_probs", "topk_tail", "tvd",
]
