"""General on-policy distillation (OPD) of a full LLM student: one loop, many objectives.

    from draftdistill.opd import OPDConfig, train_opd
    train_opd(load_config(OPDConfig, "configs/opd/tinker-opd.yaml", ["steps=10"]))

Modules: config (OPDConfig), rollout (Sampler / Scorer interfaces and their in-process forms),
server (the SGLang-server forms: a teacher pool, student rollouts), guard (template / EOS / special-token
checks), objectives (the per-token losses, by name),
token_losses (primitives they need beyond draftdistill.losses), teachers (routing, privileged
context, EMA), rewards (verifiers), trainer (the loop).
"""
from .config import OPDConfig
from .guard import TemplateMismatchError, check_pair, loss_token_mask
from .objectives import OBJECTIVES, Micro, build_objective
from .rollout import Completion, LocalSampler, LocalScorer, Sampler, Scorer, TeacherScores
from .server import SGLangSampler, SGLangScorer
from .trainer import accumulate, train_opd

__all__ = ["OPDConfig", "TemplateMismatchError", "check_pair", "loss_token_mask", "OBJECTIVES", "Micro",
           "build_objective", "Completion", "LocalSampler", "LocalScorer", "SGLangSampler", "SGLangScorer",
           "Sampler", "Scorer", "TeacherScores", "accumulate", "train_opd"]
