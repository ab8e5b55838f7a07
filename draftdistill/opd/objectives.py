"""The OPD objectives: per-token losses over one micro-batch, each a config over the same loop.

    objective: "opd:clip=0.2,reward_scale=1.0"   -> build_objective(cfg) -> Objective(fn, needs)
    loss_tokens, stats = objective.fn(student_logits, micro, temperature)

`needs` names the teacher information the objective reads: "token" (log p of the sampled token),
"dist" (a distribution: full logits or top-k) or "full" (full logits only); empty for sft, which
reads no teacher at all. The trainer checks it against `teacher_scores` before any model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from draftdistill import spec_strings
from draftdistill.losses import DIVERGENCES, TeacherTokenLogProbs, get_divergence, parse_divergence
from draftdistill.train.batching import ResponseBatch

from .rollout import TeacherScores
from .token_losses import (_fill_old, aopd_loss, entropy_switch_loss, future_rewards, kl_pair,
                           policy_gradient_loss, token_log_probs)

AVAILABLE = {"logits": {"token", "dist", "full"}, "topk": {"token", "dist"}, "token": {"token"}}


@dataclass
class Micro:
    """Everything one micro-batch needs, built before any backward of the step."""

    batch: ResponseBatch  # the student's prompt + response
    mask: Tensor  # [B, R] bool: loss tokens
    teacher: TeacherScores | None  # None when the objective needs no teacher (sft)
    # [B, R] the importance ratio's denominators: each sampled token's log-prob under the loss distribution
    # (log_softmax(logits / loss_temperature), no top-p) of the weights that sampled it, i.e.
    # Completion.loss_logprobs (rollout.old_logprobs builds it); NaN where unknown (dataset rows)
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None  # [B, R] reference model log p(token) (G-OPD)
    sampled: Tensor | None = None  # [B] bool: rows the student sampled
    reward: Tensor | None = None  # [B] centred verifier reward, 0 on dataset rows


@dataclass
class Objective:
    name: str
    fn: Callable[[Tensor, Micro, float], tuple[Tensor, dict]]
    needs: set[str]
    needs_reference: bool = False


def parse_spec(spec: str) -> tuple[str, dict]:
    """"name:key=value,key=value" -> (name, params): the grammar of draftdistill.spec_strings,
    shared with the divergence specs."""
    return spec_strings.parse_spec(spec, "objective")


def _old(micro: Micro, use: bool):
    return micro.old_logprobs if use else None


# --- the objectives ------------------------------------------------------------------------------


def opd(clip: float | None = 0.2, max_weight: float | None = None, reward_scale: float = 1.0,
        importance_sampling: bool = True):
    """Sampled-token reverse KL as a per-token advantage (Thinking Machines / tinker OPD):
    A_t = log p_T(y_t) - log q(y_t), importance-sampling loss -ratio * A, PPO-clipped.

    G-OPD / ExOPD (reward_scale = lambda != 1): the teacher's implicit reward log p_T - log p_ref is
    scaled by lambda against a reference model: A_t = lambda (log p_T - log p_ref) - (log q - log p_ref),
    i.e. sampled_rkl against the effective teacher log-prob lambda log p_T + (1 - lambda) log p_ref.
    lambda = 1 is plain OPD; lambda > 1 extrapolates past the teacher.
    """
    loss_fn = get_divergence("sampled_rkl", clip=clip, max_weight=max_weight)

    def fn(student_logits, micro: Micro, temperature):
        token = micro.teacher.token
        if reward_scale != 1.0:
            if micro.ref_logprobs is None:
                raise ValueError("opd with reward_scale != 1 (G-OPD) needs a reference model "
                                 "(reference=student or a path)")
            eff = reward_scale * token.logprobs + (1 - reward_scale) * micro.ref_logprobs
            token = TeacherTokenLogProbs(token.token_ids, eff)
        params = {}
        old = _old(micro, importance_sampling)
        if old is not None:
            logq = token_log_probs(student_logits, token.token_ids, micro.mask, temperature)
            params["old_logprobs"] = _fill_old(old, logq, micro.mask)
        return loss_fn(student_logits, token, micro.mask, temperature=temperature, reduction="none", **params), {}

    return fn, {"token"}, reward_scale != 1.0


def divergence(spec: str):
    """Any registry divergence at every response position (GKD's JSD(beta), DistiLLM's skew KL,
    OPSD's full-vocabulary KL, top-k + tail variants)."""
    name, params = parse_divergence(spec)
    loss_fn = get_divergence(name, **params)
    need = {"full": "full", "topk": "dist", "token": "token"}[DIVERGENCES[name].needs]

    def fn(student_logits, micro: Micro, temperature):
        teacher = {"full": micro.teacher.logits, "dist": micro.teacher.full_or_topk(),
                   "token": micro.teacher.token}[need]
        return loss_fn(student_logits, teacher, micro.mask, temperature=temperature, reduction="none"), {}

    return fn, {need}, False


def minillm(gamma: float = 1.0, length_norm: bool = True, single_step: bool = True, clip: float | None = 0.2,
            k: int = 20, importance_sampling: bool = True):
    """MiniLLM (Gu et al., ICLR 2024): sequence-level reverse KL by policy gradient.

    r_t = log p_T(y_t) - log q(y_t); the long-term reward R_{t+1} = future rewards from t+1 on,
    discounted by gamma and (length_norm) divided by the discount weights (the mean of future
    rewards at gamma = 1). single_step: the step-t term is taken exactly as the full-vocabulary
    KL(q_t || p_t) (lower variance), so loss_t = KL_t - ratio_t * R_{t+1}; without it,
    loss_t = -ratio_t * R_t (R including r_t).
    """
    def fn(student_logits, micro: Micro, temperature):
        mask = micro.mask
        logq = token_log_probs(student_logits, micro.teacher.token.token_ids, mask, temperature)
        reward = (micro.teacher.token.logprobs.to(logq.dtype) - logq).detach()
        future = future_rewards(reward, mask, gamma, length_norm, include_current=not single_step)
        loss = policy_gradient_loss(logq, future, mask, _old(micro, importance_sampling), clip)
        if single_step:
            (_, _), (name, params) = kl_pair(micro.teacher.full_or_topk(), k)
            loss = loss + get_divergence(name, **params)(student_logits, micro.teacher.full_or_topk(), mask,
                                                         temperature=temperature, reduction="none")
        return loss, {"future_reward": float(torch.where(mask, future, 0.0).sum())}

    return fn, {"token", "dist"} if single_step else {"token"}, False


def aopd(k: int = 20, clip: float | None = 0.2, importance_sampling: bool = True):
    """AOPD: per token, teacher prob <= student prob -> top-k forward KL, else the OPD loss."""
    def fn(student_logits, micro: Micro, temperature):
        loss, gate = aopd_loss(student_logits, micro.teacher.full_or_topk(), micro.teacher.token, micro.mask,
                               temperature, k, _old(micro, importance_sampling), clip)
        return loss, {"fkl_fraction": float(gate.sum())}

    return fn, {"token", "dist"}, False


def entropy_switch(threshold: float = 1.0, k: int = 20, augment: bool = False):
    """Entropy-aware switching: forward KL where the teacher's entropy > threshold (uncertain),
    reverse KL where it is confident (augment: reverse KL everywhere, plus forward KL where uncertain)."""
    def fn(student_logits, micro: Micro, temperature):
        loss, uncertain = entropy_switch_loss(student_logits, micro.teacher.full_or_topk(), micro.mask,
                                              temperature, threshold, k, augment)
        return loss, {"fkl_fraction": float(uncertain.sum())}

    return fn, {"dist"}, False


def sft():
    """Supervised fine-tuning on the dataset answers: -log q(y_t). No teacher (teacher: none) and
    no student samples (mix_student: 0): the off-policy baseline every OPD recipe is compared with."""
    def fn(student_logits, micro: Micro, temperature):
        return -token_log_probs(student_logits, micro.batch.targets, micro.mask, temperature), {}

    return fn, set(), False


OBJECTIVES = {"opd": opd, "divergence": divergence, "minillm": minillm, "aopd": aopd,
              "entropy_switch": entropy_switch, "sft": sft}


def build_objective(objective: str, divergence_spec: str = "rkl", teacher_scores: str = "logits",
                    importance_sampling: bool = True) -> Objective:
    """Parse and check an objective now (names, parameters, teacher information), not at step 1."""
    name, params = parse_spec(objective)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    if name == "divergence":
        if params:
            raise ValueError("objective 'divergence' takes its spec from the `divergence` key")
        params = {"spec": divergence_spec}
    elif name not in ("entropy_switch", "sft"):
        params.setdefault("importance_sampling", importance_sampling)
    try:
        fn, needs, needs_reference = OBJECTIVES[name](**params)
    except TypeError as err:
        raise ValueError(f"objective {name!r}: {err}") from None
    if teacher_scores not in AVAILABLE:
        raise ValueError(f"teacher_scores must be one of {sorted(AVAILABLE)}, got {teacher_scores!r}")
    missing = needs - AVAILABLE[teacher_scores]
    if missing:
        raise ValueError(f"objective {objective!r} (divergence {divergence_spec!r}) needs teacher "
                         f"{sorted(missing)} but teacher_scores={teacher_scores!r} provides only "
                         f"{sorted(AVAILABLE[teacher_scores])}")
    return Objective(name, fn, needs, needs_reference)


def reward_term(student_logits: Tensor, micro: Micro, temperature: float, weight: float,
                clip: float | None = 0.2) -> Tensor:
    """The verifier reward mixed in: -weight * ratio_t * r (centred sequence reward on every token
    of the student's own samples)."""
    mask = micro.mask & micro.sampled[:, None]
    logq = token_log_probs(student_logits, micro.batch.targets, micro.mask, temperature)
    advantage = micro.reward[:, None].to(logq.dtype).expand_as(logq)
    return weight * policy_gradient_loss(logq, advantage, mask, micro.old_logprobs, clip)


IMPORTANCE_SAMPLED = ("opd", "minillm", "aopd")  # the objectives whose ratio reads Micro.old_logprobs


def check_importance_sampling(objective: str, importance_sampling: bool = True, reward_weight: float = 0.0,
                              rollout_server: bool = False, rollout_temperature: float = 1.0,
                              loss_temperature: float = 1.0) -> None:
    """Refuse, before any model loads, an importance ratio that would compare two distributions.

    The ratio is q_theta(y) / q_old(y), both under the loss distribution softmax(logits / loss_temperature)
    (no top-p): 1 while the weights are unchanged, whatever the rollout's temperature, top-p or
    greedy decoding, and the correction for stale weights otherwise. The in-process sampler records
    q_old that way at any rollout setting. An SGLang rollout server returns log-probs at the
    request's temperature (1 when greedy; before top-p), so with importance sampling it needs that
    temperature to be loss_temperature: otherwise the ratio is not 1 on-policy and the PPO clip
    zeroes the gradient of most tokens.
    """
    from .server import served_logprob_temperature

    name, params = parse_spec(objective)
    reads_old = (name in IMPORTANCE_SAMPLED and params.get("importance_sampling", importance_sampling)) \
        or reward_weight > 0
    if not (importance_sampling and reads_old and rollout_server):
        return
    served = served_logprob_temperature(rollout_temperature)
    if served != loss_temperature:
        raise ValueError(
            f"importance sampling with rollout_server: SGLang returns each sampled token's log-prob under "
            f"softmax(logits / {served:g}) (rollout_temperature={rollout_temperature:g}"
            f"{', greedy' if rollout_temperature <= 0 else ''}), but the ratio needs it under the loss "
            f"distribution softmax(logits / loss_temperature={loss_temperature:g}); set "
            f"rollout_temperature={loss_temperature:g} (top_p may stay: the server's log-probs are taken before "
            f"top-p) or importance_sampling=false")
