"""The one config of general on-policy distillation; every recipe in configs/opd/ sets a few keys."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from draftdistill.train.config import TrainConfig, at_least, one_of, require

from .objectives import build_objective, check_importance_sampling
from .rewards import REWARDS
from .teachers import PRIVILEGED_KINDS, SELF_TEACHERS

MIX_SCHEDULES = ("constant", "linear", "adaptive")
TEACHER_SCORES = ("logits", "topk", "token")
GUARDS = ("error", "warn")


@dataclass
class OPDConfig(TrainConfig):
    # --- models -----------------------------------------------------------------------------
    student: str = "smollm2-135m-instruct"  # path / builtin name, or pruned:K / small:... built from the teacher
    teacher: str = "smollm2-135m-instruct"  # path / builtin name, "self" (OPSD: the student with privileged
    # context), or "none" (objective sft: no teacher)
    teachers: dict = field(default_factory=dict)  # MOPD: route value -> teacher path (replaces `teacher`)
    route_field: str = ""  # MOPD: the prompt-file field whose value picks the teacher
    self_teacher: str = "frozen"  # OPSD teacher weights: frozen (initial student) | live (current) | ema
    ema_decay: float = 0.99  # OPSD ema teacher: its weight on the previous average
    teacher_refresh_every: int = 0  # OPSD frozen teacher: copy the student into it every N steps (CRISP); 0 never
    privileged: str = "none"  # OPSD context: none | reference | concise | feedback
    privileged_template: str = ""  # override the context text; placeholders {question} {reference} {feedback}
    reference: str = ""  # G-OPD reference model: "" none | "student" (initial student) | a path
    guard: str = "error"  # template / EOS mismatch between student and teacher: error | warn
    mask_special_tokens: bool = True  # special tokens (not stop tokens) leave the loss
    # --- servers (SGLang) ---------------------------------------------------------------------------
    # teacher_servers (under scale-out below): the teacher served by a pool of SGLang servers
    rollout_server: str = ""  # URL(s) of SGLang servers with the student's architecture (comma list: a
    # pool, rows round-robin, torchrun rank r starting on server r): student rollouts come from them,
    # the student's weights pushed to every one at start and after every optimizer step
    server_patience: float = 900.0  # seconds a step waits for failing servers before the run stops
    # --- data and rollouts ------------------------------------------------------------------------
    prompts: str = "gsm8k:train"  # a bundled name[:split], sharegpt[:split] or a .jsonl/.json file
    prompt_limit: int = 0  # first N prompts only (0: all)
    max_new_tokens: int = 64  # response length cap (student samples and dataset answers)
    rollout_temperature: float = 1.0  # student sampling temperature
    top_p: float = 1.0  # student sampling nucleus
    group_size: int = 1  # samples per prompt (reward baselines are per group when > 1)
    mix_student: float = 1.0  # GKD lambda: fraction of student samples; the rest are dataset answers
    mix_schedule: str = "constant"  # constant | linear | adaptive (DistiLLM)
    mix_student_start: float = 0.0  # linear / adaptive: the fraction at step 0
    mix_schedule_steps: int = 0  # linear: steps to reach mix_student
    adaptive_window: int = 4  # adaptive: steps between validation-loss measurements
    adaptive_delta: float = 0.25  # adaptive: increase of the student fraction when the validation loss rises
    adaptive_validation: int = 8  # adaptive: prompts held out of training for the validation loss
    # --- teacher scores and objective -------------------------------------------------------------
    teacher_scores: str = "logits"  # what the teacher returns: logits (full) | topk | token
    teacher_topk: int = 20  # k for teacher_scores=topk
    objective: str = "opd"  # opd | divergence | minillm | aopd | entropy_switch | sft, with :key=value params
    divergence: str = "rkl"  # for objective "divergence": any losses registry spec, e.g. jsd:beta=0.5
    loss_temperature: float = 1.0  # temperature of both distributions inside the loss
    importance_sampling: bool = True  # weight by q/q_old in policy-gradient terms, both at loss_temperature
    # (the sampler records each sampled token's log-prob under the loss's distribution: ratio 1 on-policy)
    verifier: str = ""  # "" | gsm8k: answer check for the reward and for SDPO feedback
    reward_weight: float = 0.0  # weight of the verifier reward's policy-gradient term
    # --- optimisation (the rest of the keys are every trainer's: train/config.py) ------------------
    steps: int = 50  # optimizer steps
    lr: float = 1e-5  # peak learning rate (AdamW; linear warmup, cosine decay to 10%)
    save_every: int = 25  # steps between checkpoints
    out_dir: str = "runs/opd"  # checkpoint, metrics and the final student (OUT_DIR/final)
    # --- scale-out --------------------------------------------------------------------------------
    teacher_servers: list = field(default_factory=list)  # SGLang servers that score for `teacher` (URLs, a
    # list or comma-separated; its path is still read for the tokenizer and the guard, its weights are not
    # loaded): each batch's rows are dealt round-robin across them

    def servers(self) -> list[str]:
        """teacher_servers as a list (a comma-separated string is accepted too)."""
        urls = self.teacher_servers
        return [u.strip() for u in urls.split(",") if u.strip()] if isinstance(urls, str) else list(urls)

    def validate(self) -> None:
        """Everything that can be refused without reading a model or a prompt."""
        super().validate()
        one_of(self, "privileged", PRIVILEGED_KINDS)
        one_of(self, "self_teacher", SELF_TEACHERS)
        one_of(self, "mix_schedule", MIX_SCHEDULES)
        one_of(self, "teacher_scores", TEACHER_SCORES)
        one_of(self, "guard", GUARDS)
        require(0.0 <= self.mix_student <= 1.0 and 0.0 <= self.mix_student_start <= 1.0,
                "mix_student and mix_student_start must be in [0, 1]")
        at_least(self, 1, "group_size", "max_new_tokens", "teacher_topk", "adaptive_window")
        at_least(self, 0, "prompt_limit", "rollout_temperature", "reward_weight", "mix_schedule_steps",
                 "adaptive_delta", "adaptive_validation", "teacher_refresh_every", "server_patience")
        require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        require(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.loss_temperature > 0 and math.isfinite(self.loss_temperature),
                f"loss_temperature must be > 0, got {self.loss_temperature!r}")
        require(not self.verifier or self.verifier in REWARDS,
                f"unknown verifier {self.verifier!r}; known: {sorted(REWARDS)}")
        require(not ((self.reward_weight or self.privileged == "feedback") and not self.verifier),
                "reward_weight > 0 and privileged=feedback need a verifier (e.g. verifier=gsm8k)")
        require(not (self.teachers and not self.route_field),
                "several teachers (MOPD) need route_field: the prompt field that picks one")
        # A sharded forward needs every rank, and routing sends each rank's rows to other teachers.
        require(not (self.teacher_parallel == "shard" and self.teachers),
                "teacher_parallel=shard does not support several routed teachers (MOPD); use replicate")
        require(not (self.servers() and (self.teachers or self.teacher in ("self", "none"))),
                "teacher_servers score for `teacher` only: not with several teachers, teacher=self or none")
        require(not (self.servers() and self.teacher_scores == "logits"),
                "an SGLang teacher returns top-k or token log-probs: set teacher_scores=topk or token")
        require(not (self.servers() and self.loss_temperature != 1.0),
                "SGLang scores with the raw logits: teacher_servers needs loss_temperature=1")
        objective = self.build_objective()
        check_importance_sampling(self.objective, self.importance_sampling, self.reward_weight,
                                  bool(self.rollout_server), self.rollout_temperature, self.loss_temperature)
        require((self.teacher == "none" and not self.teachers) == (not objective.needs),
                f"objective {self.objective!r} " + ("needs a teacher" if objective.needs else
                                                     "reads no teacher: set teacher=none so none is loaded"))
        require(not (objective.name == "sft" and (self.mix_student != 0.0 or self.mix_schedule != "constant"
                                                  or self.verifier)),
                "sft trains on the dataset answers only: mix_student=0, mix_schedule=constant, no verifier")
        require(not (self.mix_schedule == "adaptive" and self.adaptive_validation < 1),
                "mix_schedule=adaptive needs adaptive_validation >= 1 held-out prompts")
        require(not (objective.needs_reference and not self.reference),
                f"objective {self.objective!r} needs a reference model: reference=student or a path")

    def build_objective(self):
        return build_objective(self.objective, self.divergence, self.teacher_scores, self.importance_sampling)
