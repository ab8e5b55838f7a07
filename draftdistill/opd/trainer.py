"""General on-policy distillation of a full LLM student, as one plain loop.

    prompts -> student samples responses (or dataset answers, mixed by the GKD lambda)
            -> each row's teacher scores the same tokens (its own template, maybe privileged context)
            -> objective: a per-token loss over the response -> sum / step's loss tokens -> step

Every objective (OPD, GKD, MiniLLM, DistiLLM, G-OPD, AOPD, entropy switch, OPSD, MOPD) is a
config over this loop: configs/opd/*.yaml. All randomness of a step derives from (seed, step), and
every piece of state (weights, optimizer, scheduler, mix schedule, EMA teacher) is checkpointed,
so a resumed run repeats the next step exactly. Under torchrun each rank trains on its slice of the
global batch (draftdistill/train/distributed.py); the batched sampler draws all of a micro-batch's
rows from one stream per (step, rank), so sampled rollouts are the same distribution, not the same
draws, on another world size (greedy or dataset rollouts are the same rows).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.models import default_device, load_drafter, load_model, load_target, load_tokenizer
from draftdistill.models.loading import resolve_model_source
from draftdistill.train import distributed
from draftdistill.train.batching import pack, response_logits
from draftdistill.train.checkpoint import export_hf, load_checkpoint, save_checkpoint, write_atomically
from draftdistill.train.drafter_opd import batch_indices, lr_lambda
from draftdistill.train.metrics import MetricsLog

from .config import OPDConfig
from .guard import PROBE, check_pair, loss_token_mask
from .objectives import Micro, Objective, build_objective, reward_term
from .rewards import FEEDBACK, REWARDS
from .rollout import LocalSampler, LocalScorer, Sampler, Scorer, merge_scores
from .server import SGLangSampler, SGLangScorer
from .teachers import (PRIVILEGED_KINDS, SELF_TEACHERS, attach_field, copy_weights, ema_update, frozen_copy,
                       privileged_prompt)

MIX_SCHEDULES = ("constant", "linear", "adaptive")


# --- setup: check the config, guard the pair, load the models ------------------------------------


def check_config(cfg: OPDConfig) -> Objective:
    """Everything that can be refused without reading a model."""
    if cfg.privileged not in PRIVILEGED_KINDS:
        raise ValueError(f"privileged must be one of {PRIVILEGED_KINDS}, got {cfg.privileged!r}")
    if cfg.self_teacher not in SELF_TEACHERS:
        raise ValueError(f"self_teacher must be one of {SELF_TEACHERS}, got {cfg.self_teacher!r}")
    if cfg.mix_schedule not in MIX_SCHEDULES:
        raise ValueError(f"mix_schedule must be one of {MIX_SCHEDULES}, got {cfg.mix_schedule!r}")
    if not 0.0 <= cfg.mix_student <= 1.0 or not 0.0 <= cfg.mix_student_start <= 1.0:
        raise ValueError("mix_student and mix_student_start must be in [0, 1]")
    if cfg.verifier and cfg.verifier not in REWARDS:
        raise ValueError(f"unknown verifier {cfg.verifier!r}; known: {sorted(REWARDS)}")
    if (cfg.reward_weight or cfg.privileged == "feedback") and not cfg.verifier:
        raise ValueError("reward_weight > 0 and privileged=feedback need a verifier (e.g. verifier=gsm8k)")
    if cfg.teachers and not cfg.route_field:
        raise ValueError("several teachers (MOPD) need route_field: the prompt field that picks one")
    if cfg.group_size < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_new_tokens < 1:
        raise ValueError("group_size, batch_size, grad_accum and max_new_tokens must be >= 1")
    if cfg.teacher_parallel not in distributed.TEACHER_PARALLEL:
        raise ValueError(f"teacher_parallel must be one of {distributed.TEACHER_PARALLEL}, "
                         f"got {cfg.teacher_parallel!r}")
    if cfg.teacher_parallel == "shard" and cfg.teachers:
        # A sharded forward needs every rank, and routing sends each rank's rows to other teachers.
        raise ValueError("teacher_parallel=shard does not support several routed teachers (MOPD); use replicate")
    if servers(cfg) and (cfg.teachers or cfg.teacher in ("self", "none")):
        raise ValueError("teacher_servers score for `teacher` only: not with several teachers, teacher=self or none")
    if servers(cfg) and cfg.teacher_scores == "logits":
        raise ValueError("an SGLang teacher returns top-k or token log-probs: set teacher_scores=topk or token")
    objective = build_objective(cfg.objective, cfg.divergence, cfg.teacher_scores, cfg.importance_sampling)
    if (cfg.teacher == "none" and not cfg.teachers) != (not objective.needs):
        raise ValueError(f"objective {cfg.objective!r} " + ("needs a teacher" if objective.needs else
                         "reads no teacher: set teacher=none so none is loaded"))
    if objective.name == "sft" and (cfg.mix_student != 0.0 or cfg.mix_schedule != "constant" or cfg.verifier):
        raise ValueError("sft trains on the dataset answers only: mix_student=0, mix_schedule=constant, no verifier")
    if cfg.mix_schedule == "adaptive" and cfg.adaptive_validation < 1:
        raise ValueError("mix_schedule=adaptive needs adaptive_validation >= 1 held-out prompts")
    if servers(cfg) and cfg.loss_temperature != 1.0:
        raise ValueError("SGLang scores with the raw logits: teacher_servers needs loss_temperature=1")
    if objective.needs_reference and not cfg.reference:
        raise ValueError(f"objective {cfg.objective!r} needs a reference model: reference=student or a path")
    return objective


def servers(cfg: OPDConfig) -> list[str]:
    """teacher_servers as a list (a comma-separated string is accepted too)."""
    urls = cfg.teacher_servers
    return [u.strip() for u in urls.split(",") if u.strip()] if isinstance(urls, str) else list(urls)


def model_info(spec: str):
    """(tokenizer, stop ids, logit width) from a model's files, without loading its weights."""
    from transformers import AutoConfig, GenerationConfig

    source = resolve_model_source(spec)
    tokenizer = load_tokenizer(source)
    generation = vocab = None
    try:
        generation = GenerationConfig.from_pretrained(str(source.directory))
    except (OSError, ValueError):
        pass
    try:
        vocab = AutoConfig.from_pretrained(str(source.directory), gguf_file=source.gguf_file).vocab_size
    except (OSError, ValueError):
        pass
    return tokenizer, stop_token_ids(tokenizer, SimpleNamespace(generation_config=generation)), vocab


def is_built_student(spec: str) -> bool:
    return spec.split(":", 1)[0] in ("pruned", "small")


def load_models(cfg: OPDConfig, probes: list, device: str) -> SimpleNamespace:
    """Guard every student/teacher pair on tokenizers and configs, then load the weights."""
    specs = dict(cfg.teachers) if cfg.teachers else ({} if cfg.teacher in ("self", "none") else {"teacher": cfg.teacher})
    built = is_built_student(cfg.student)
    if built and len(specs) != 1:
        raise ValueError(f"student {cfg.student!r} is built from one teacher; give a model path instead")
    infos = {name: model_info(spec) for name, spec in specs.items()}
    s_tok, s_stop, s_vocab = next(iter(infos.values())) if built else model_info(cfg.student)
    if cfg.reference not in ("", "student"):
        infos["reference"] = model_info(cfg.reference)
    for name, (tok, stop, vocab) in infos.items():  # before any weights: a bad pair costs nothing
        check_pair(s_tok, tok, s_stop, stop, s_vocab, vocab, cfg.guard, probes, name)

    # Teachers on SGLang servers load no weights here (their files still gave the guard its
    # tokenizer); a teacher to be sharded is read into CPU memory first (FSDP moves it layer by
    # layer, keeping its shard).
    if built and servers(cfg):
        raise ValueError(f"student {cfg.student!r} is built from the teacher's weights; with teacher_servers "
                         "give the student as a model path")
    local = "cpu" if distributed.active() and cfg.teacher_parallel == "shard" else device
    teachers = {} if servers(cfg) else {name: load_target(spec, device=local)[0] for name, spec in specs.items()}
    if built:
        student = load_drafter(cfg.student, next(iter(teachers.values())), s_tok)
    else:
        student = load_model(resolve_model_source(cfg.student), torch.float32, device)
    student = student.float().train().requires_grad_(True)
    tokenizers = {name: infos[name][0] for name in specs}
    stops = set(s_stop).union(*(set(infos[name][1]) for name in specs))
    ema = None
    if cfg.teacher == "self" and not cfg.teachers:
        own = {"frozen": lambda: frozen_copy(student), "live": lambda: student, "ema": lambda: frozen_copy(student)}
        teachers["self"], tokenizers["self"] = own[cfg.self_teacher](), s_tok
        # Self-teachers that change during training are checkpointed with the student.
        if cfg.self_teacher == "ema" or (cfg.self_teacher == "frozen" and cfg.teacher_refresh_every):
            ema = teachers["self"]
    reference = None
    if cfg.reference == "student":
        reference = frozen_copy(student)
    elif cfg.reference:
        reference = load_target(cfg.reference, device=local)[0]
    return SimpleNamespace(student=student, tokenizer=s_tok, stop=s_stop, loss_stops=sorted(stops),
                           teachers=teachers, tokenizers=tokenizers, reference=reference, ema=ema)


# --- one step's pieces ---------------------------------------------------------------------------


def mix_student_at(cfg: OPDConfig, step: int, state: dict) -> float:
    """The student-sample fraction (GKD lambda) at this step: constant, linear ramp, or DistiLLM's
    adaptive schedule (state['mix_student'], raised by adaptive_delta when the loss rises)."""
    if cfg.mix_schedule == "constant":
        return cfg.mix_student
    if cfg.mix_schedule == "linear":
        progress = min(1.0, step / max(1, cfg.mix_schedule_steps))
        return cfg.mix_student_start + (cfg.mix_student - cfg.mix_student_start) * progress
    return state.setdefault("mix_student", cfg.mix_student_start)


def adapt_mix(cfg: OPDConfig, state: dict, validation_loss: float) -> None:
    """DistiLLM's adaptive off-policy -> on-policy schedule: when the validation loss (measured every
    adaptive_window steps on held-out prompts) is above the previous measurement, move
    adaptive_delta towards on-policy."""
    previous = state.get("previous_validation_loss")
    if previous is not None and validation_loss > previous:
        state["mix_student"] = min(cfg.mix_student, state["mix_student"] + cfg.adaptive_delta)
    state["previous_validation_loss"] = validation_loss


def centred_rewards(rewards: list[float | None], group_size: int, step_mean: float | None = None) -> list[float]:
    """Reward minus a baseline: the group mean (group_size > 1) or the mean over the step's
    student rows (group size 1; `step_mean` when the step spans several ranks); None (dataset
    rows) -> 0."""
    out = [0.0] * len(rewards)
    groups = [range(i, i + group_size) for i in range(0, len(rewards), group_size)] if group_size > 1 \
        else [range(len(rewards))]
    for group in groups:
        values = [rewards[i] for i in group if rewards[i] is not None]
        if values:
            base = sum(values) / len(values) if step_mean is None or group_size > 1 else step_mean
            for i in group:
                if rewards[i] is not None:
                    out[i] = rewards[i] - base
    return out


def accumulate(student, micros: list[Micro], objective: Objective, temperature: float,
               reward_weight: float = 0.0) -> dict:
    """Backward over every micro-batch of a step. Each loss is a sum over tokens divided by the
    step's total loss tokens (over every micro-batch and rank), so any split into micro-batches and
    ranks gives the gradient of one big batch. Returns this rank's sums and the global token count."""
    total = max(1, int(distributed.all_sum([sum(int(m.mask.sum()) for m in micros)])[0]))
    scale = distributed.grad_scale()  # undoes the average over ranks of the gradient reduction
    sums = {"loss": 0.0, "loss_tokens": total, "rkl_estimate": 0.0, "sampled_tokens": 0}
    for micro in micros:
        logits = response_logits(student, micro.batch)
        loss_tokens, stats = objective.fn(logits, micro, temperature)
        if reward_weight and micro.reward is not None:
            loss_tokens = loss_tokens + reward_term(logits, micro, temperature, reward_weight)
        loss = torch.where(micro.mask, loss_tokens, 0.0).sum()
        (loss / total * scale).backward()
        sums["loss"] += float(loss.detach())
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
        if micro.teacher is None:
            continue
        with torch.no_grad():  # the sampled reverse-KL estimate, log q - log p_T, on the student's own tokens
            on_policy = micro.mask if micro.sampled is None else micro.mask & micro.sampled[:, None]
            logq = torch.log_softmax(logits.detach().float() / temperature, -1).gather(
                -1, micro.batch.targets[..., None]).squeeze(-1)
            diff = logq - micro.teacher.token.logprobs.float()
            sums["rkl_estimate"] += float(torch.where(on_policy, diff, 0.0).sum())
            sums["sampled_tokens"] += int(on_policy.sum())
    return sums


def save_ema(out: Path, ema, step: int) -> None:
    """EMA teacher weights beside the checkpoint, tagged by step (written before the checkpoint,
    so the one a checkpoint needs always exists). Under torchrun every rank calls it (a gather)."""
    weights = distributed.full_state_dict(ema)
    if not distributed.is_main():
        return
    tensors = {k: v.contiguous() for k, v in weights.items()
               if k != "lm_head.weight" or not ema.config.tie_word_embeddings}
    write_atomically(out / f"ema-{step}.safetensors", lambda tmp: save_file(tensors, tmp))


def drop_old_ema(out: Path, keep_step: int) -> None:
    for path in out.glob("ema-*.safetensors"):
        if path.name != f"ema-{keep_step}.safetensors":
            path.unlink(missing_ok=True)


# --- the loop ------------------------------------------------------------------------------------


def train_opd(cfg: OPDConfig, progress: bool = True, sampler: Sampler | None = None,
              scorers: dict[str, Scorer] | None = None) -> dict:
    """Run the recipe. `sampler` / `scorers` replace the in-process student sampler / teachers
    (e.g. server backends); by default both run in this process."""
    objective = check_config(cfg)  # before anything is read
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = distributed.setup(cfg.device) or default_device()
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    torch.manual_seed(cfg.seed)

    prompts = load_prompts(cfg.prompts, limit=cfg.prompt_limit or None)
    if cfg.route_field:
        attach_field(prompts, cfg.prompts, cfg.route_field)
        unknown = sorted({p.meta[cfg.route_field] for p in prompts} - set(cfg.teachers))
        if unknown:
            raise ValueError(f"prompts route to {unknown}, which are not in teachers {sorted(cfg.teachers)}")
    m = load_models(cfg, [PROBE, prompts[0].messages], device)
    # Under torchrun: the student (and a self-teacher that follows it, parameter by parameter) is
    # sharded or replicated by FSDP2; frozen teachers follow teacher_parallel. In place.
    student, tokenizer = distributed.shard_model(m.student.to(device), cfg.fsdp), m.tokenizer
    for model in {id(t): t for t in [*m.teachers.values(), m.reference] if t is not None}.values():
        if model is m.ema:
            distributed.shard_model(model.to(device), cfg.fsdp, forward_only=True)
        elif model is not student:
            distributed.place_frozen(model, cfg.teacher_parallel, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else m.stop[0]
    own_sampler = sampler is None and not cfg.rollout_server  # in-process sampling needs the whole student
    if sampler is None and cfg.rollout_server:
        sampler = SGLangSampler(cfg.rollout_server, m.stop, cfg.rollout_temperature, cfg.top_p,
                                patience=cfg.server_patience, start=rank)  # rank r starts on server r
    sampler = sampler or LocalSampler(student, m.stop, pad_id, cfg.rollout_temperature, cfg.top_p)
    if scorers is None and servers(cfg):  # rank r starts on server r
        scorers = {"teacher": SGLangScorer(servers(cfg), patience=cfg.server_patience, start=rank, device=device)}
    scorers = scorers or {name: LocalScorer(model, pad_id) for name, model in m.teachers.items()}
    ref_scorer = LocalScorer(m.reference, pad_id) if m.reference is not None else None
    # Only what the objective reads: full logits [B, R, V] are the largest tensor of the step.
    forms = {"logits": {"logits"}, "topk": {"topk"}, "token": set()}[cfg.teacher_scores]
    if not objective.needs & {"dist", "full"}:
        forms = set()

    def route(prompt) -> str:
        return prompt.meta[cfg.route_field] if cfg.route_field else next(iter(scorers))

    student_ids = [encode_prompt(tokenizer, p)[0].tolist() for p in prompts]
    teacher_ids: dict[tuple[int, str], list[int]] = {}  # cached unless the context depends on the response

    def teacher_prompt(index: int, completion_text: str) -> list[int]:
        name, prompt = route(prompts[index]), prompts[index]
        if cfg.privileged == "feedback":
            feedback = FEEDBACK[cfg.verifier](completion_text, prompt.reference)
            return encode_prompt(m.tokenizers[name], privileged_prompt(prompt, "feedback", cfg.privileged_template,
                                                                       feedback))[0].tolist()
        if (index, name) not in teacher_ids:
            shown = privileged_prompt(prompt, cfg.privileged, cfg.privileged_template)
            teacher_ids[(index, name)] = encode_prompt(m.tokenizers[name], shown)[0].tolist()
        return teacher_ids[(index, name)]

    def dataset_response(index: int) -> list[int]:
        reference = prompts[index].reference
        if not reference:
            raise ValueError(f"prompt {index} has no reference answer for dataset samples (mix_student < 1)")
        tokens = tokenizer(reference, add_special_tokens=False)["input_ids"][: cfg.max_new_tokens]
        return tokens + [m.stop[0]] if len(tokens) < cfg.max_new_tokens else tokens

    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed))
    validation = []  # DistiLLM's adaptive schedule watches a loss on held-out prompts
    if cfg.mix_schedule == "adaptive":
        if len(order) <= cfg.adaptive_validation:
            raise ValueError(f"{len(order)} prompts leave none to train on after holding out "
                             f"adaptive_validation={cfg.adaptive_validation}")
        validation, order = order[-cfg.adaptive_validation:].tolist(), order[: -cfg.adaptive_validation]

    tally = {"teacher_tokens": 0}  # teacher-forward tokens (prompt + response), for compute accounting

    def micro_for(indices, responses, logps, owns, texts, rewards) -> Micro:
        """Teacher (and reference) scores of the same tokens, the loss mask: one micro-batch."""
        batch = pack([student_ids[i] for i in indices], responses, pad_id).to(device)
        width = batch.scored.shape[1]
        parts = []
        for name, scorer in scorers.items():
            mine = [r for r, i in enumerate(indices) if route(prompts[i]) == name]
            if mine:
                shown = [teacher_prompt(indices[r], texts[r]) for r in mine]
                tally["teacher_tokens"] += sum(len(p) + len(responses[r]) for p, r in zip(shown, mine))
                parts.append((mine, scorer.score(shown, [responses[r] for r in mine], forms, cfg.teacher_topk,
                                                 cfg.loss_temperature)))
        teacher = merge_scores(parts, len(indices), width) if parts else None
        mask = batch.scored
        if cfg.mask_special_tokens:
            mask = loss_token_mask(batch.targets, batch.scored, tokenizer.all_special_ids, m.loss_stops)
        old = None
        if cfg.importance_sampling:
            old = torch.full(batch.scored.shape, float("nan"))
            for r, lp in enumerate(logps):
                if lp is not None:
                    old[r, : len(lp)] = torch.tensor(lp)
            old = old.to(device)
        ref = None
        if ref_scorer is not None:
            ref = ref_scorer.score([student_ids[i] for i in indices], responses, set(), 1,
                                   cfg.loss_temperature).token.logprobs
        sampled = torch.tensor(owns, dtype=torch.bool, device=device)
        reward = torch.tensor(rewards, device=device) if cfg.verifier else None
        return Micro(batch, mask, teacher, old, ref, sampled, reward)

    @torch.no_grad()
    def validation_loss() -> float:
        """The objective on the held-out prompts' dataset answers (fixed tokens, so losses compare)."""
        total, tokens = 0.0, 0
        for start in range(0, len(validation), cfg.batch_size):
            indices = validation[start: start + cfg.batch_size]
            responses = [dataset_response(i) for i in indices]
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            micro = micro_for(indices, responses, [None] * len(indices), [False] * len(indices), texts,
                              [0.0] * len(indices))
            loss_tokens, _ = objective.fn(response_logits(student, micro.batch), micro, cfg.loss_temperature)
            total += float(torch.where(micro.mask, loss_tokens, 0.0).sum())
            tokens += int(micro.mask.sum())
        return total / max(1, tokens)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state: dict = {"step": 0}
    if cfg.resume and (out / "checkpoint" / "trainer_state.json").is_file():
        state = load_checkpoint(out / "checkpoint", student, optimizer, scheduler)
        if m.ema is not None:  # the EMA / refreshed self-teacher of that step
            missing, unexpected = distributed.load_full_state_dict(
                m.ema, load_file(out / f"ema-{state['step']}.safetensors"))
            if [k for k in missing if k != "lm_head.weight"] or unexpected:
                raise ValueError(f"{out}: self-teacher weights do not match (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
    sync = getattr(sampler, "sync", None)  # a server sampler samples from the weights last pushed to it
    if sync is not None:
        sync(student, state["step"])
    log = MetricsLog(out, enabled=main)
    if main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, desc="opd",
               disable=not (progress and main))
    for step in bar:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * world + rank)
        mix = mix_student_at(cfg, step, state)

        # 1. Rollouts for the whole step first: rewards are centred, and the loss normalised, over it.
        rows = []  # per micro-batch: (prompt indices, responses, sampler log-probs or None, texts)
        for micro in range(cfg.grad_accum):
            indices = [i for i in batch_indices(step, micro, cfg, order, rank, world) for _ in range(cfg.group_size)]
            by_student = (torch.rand(len(indices), generator=generator) < mix).tolist()
            chosen = [i for i, s in zip(indices, by_student) if s]
            with distributed.gathered(student) if own_sampler else contextlib.nullcontext():
                samples = iter(sampler.sample([student_ids[i] for i in chosen], cfg.max_new_tokens, generator)
                               if chosen else [])
            responses, logps = [], []
            for index, own in zip(indices, by_student):
                c = next(samples) if own else None
                responses.append(c.tokens if own else dataset_response(index))
                logps.append(c.logprobs if own else None)
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            rows.append((indices, responses, logps, by_student, texts))
        flat_rewards = [REWARDS[cfg.verifier](t, prompts[i].reference) if own and cfg.verifier else None
                        for indices, _, _, owns, texts in rows for i, own, t in zip(indices, owns, texts)]
        given = [r for r in flat_rewards if r is not None]
        reward_sum, reward_rows = distributed.all_sum([sum(given), len(given)])
        step_mean = reward_sum / reward_rows if reward_rows and world > 1 else None
        centred = iter(centred_rewards(flat_rewards, cfg.group_size, step_mean))

        # 2. Teacher (and reference) scores of the same tokens; loss masks.
        tally["teacher_tokens"] = 0
        micros = [micro_for(indices, responses, logps, owns, texts, [next(centred) for _ in indices])
                  for indices, responses, logps, owns, texts in rows]

        # 3. Student forward and backward, one optimizer step.
        optimizer.zero_grad(set_to_none=True)
        sums = accumulate(student, micros, objective, cfg.loss_temperature, cfg.reward_weight)
        grad_norm = distributed.scalar(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        if sync is not None:
            sync(student, step + 1)
        if m.ema is not None and cfg.self_teacher == "ema":
            ema_update(m.ema, student, cfg.ema_decay)
        elif m.ema is not None and (step + 1) % cfg.teacher_refresh_every == 0:
            copy_weights(m.ema, student)
        seconds = time.perf_counter() - started

        # Metrics over the global batch (sums over ranks; every rank gets the same numbers).
        loss_tokens = sums.pop("loss_tokens")
        all_rows = [r for (_, responses, _, _, _) in rows for r in responses]
        # Compute accounting, in model-forward tokens: the student's rollouts (prompt prefill + sampled
        # tokens), the teachers' scoring forwards, and the student's training forward (+ backward).
        sums["rollout_tokens"] = sum(len(student_ids[i]) + len(r) for indices, responses, _, owns, _ in rows
                                     for i, r, own in zip(indices, responses, owns) if own)
        sums["teacher_tokens"] = tally["teacher_tokens"]
        sums["train_tokens"] = sum(int(micro.batch.attention.sum()) for micro in micros)
        keys = sorted(sums)
        totals = dict(zip(keys + ["response_tokens", "rows"], distributed.all_sum(
            [sums[k] for k in keys] + [sum(map(len, all_rows)), len(all_rows)])))
        loss = totals.pop("loss") / loss_tokens
        sampled_tokens, rkl_sum = totals.pop("sampled_tokens"), totals.pop("rkl_estimate")
        response_tokens = totals.pop("response_tokens")
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "mix_student": mix,
                   "response_tokens": response_tokens / totals.pop("rows"), "step_seconds": seconds,
                   "response_tokens_per_second": response_tokens / seconds, "loss_tokens": loss_tokens,
                   **{k: int(totals.pop(k)) for k in ("rollout_tokens", "teacher_tokens", "train_tokens")},
                   **{k: v / loss_tokens for k, v in totals.items()}}
        if sampled_tokens:
            metrics["rkl_estimate"] = rkl_sum / sampled_tokens
        if validation and (step + 1) % cfg.adaptive_window == 0:
            metrics["validation_loss"] = validation_loss()
            adapt_mix(cfg, state, metrics["validation_loss"])
        if reward_rows:
            metrics["reward"] = reward_sum / reward_rows
        log.write(step + 1, **metrics)
        bar.set_postfix(loss=f"{loss:.3f}", rkl=f"{metrics.get('rkl_estimate', float('nan')):.3f}")
        state["step"] = step + 1
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            if m.ema is not None:
                save_ema(out, m.ema, state["step"])
            save_checkpoint(out / "checkpoint", student, optimizer, scheduler, state)
            if main:
                drop_old_ema(out, state["step"])

    export_hf(out / "final", student, tokenizer)
    summary = {"steps": state["step"], "out_dir": str(out), "final": str(out / "final"),
               "objective": cfg.objective}
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
