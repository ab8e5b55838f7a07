"""The one config of general on-policy distillation; every recipe in configs/opd/ sets a few keys."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OPDConfig:
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
    importance_sampling: bool = True  # weight by q/q_sampler (the sampler's log-probs) in policy-gradient terms
    verifier: str = ""  # "" | gsm8k: answer check for the reward and for SDPO feedback
    reward_weight: float = 0.0  # weight of the verifier reward's policy-gradient term
    # --- optimisation -----------------------------------------------------------------------------
    steps: int = 50  # optimizer steps
    batch_size: int = 4  # prompts per micro-batch on each rank (x group_size rows; torchrun: N times this in all)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # peak learning rate (AdamW; linear warmup, cosine decay to 10%)
    warmup_steps: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    save_every: int = 25  # steps between checkpoints
    out_dir: str = "runs/opd"  # checkpoint, metrics and the final student
    resume: bool = True  # continue from out_dir/checkpoint when it exists
    seed: int = 0  # every random draw derives from it and the step
    device: str | None = None  # cpu | cuda[:N]; default: cuda when there is one
    # --- scale-out --------------------------------------------------------------------------------
    # torchrun only (ignored in one process):
    fsdp: bool = True  # FSDP2-shard the student (false: replicate it, i.e. DDP)
    teacher_parallel: str = "replicate"  # the frozen teachers and reference: replicate | shard
    teacher_servers: list = field(default_factory=list)  # SGLang servers that score for `teacher` (URLs, a
    # list or comma-separated; its path is still read for the tokenizer and the guard, its weights are not
    # loaded): each batch's rows are dealt round-robin across them
