"""General on-policy distillation of a full LLM student: its config (config.py) and its step.

    prompts -> student samples responses (or dataset answers, mixed by the GKD lambda)
            -> each row's teacher scores the same tokens (its own template, maybe privileged context)
            -> objective: a per-token loss over the response -> sum / step's loss tokens -> step

Every objective (OPD, GKD, MiniLLM, DistiLLM, G-OPD, AOPD, entropy switch, OPSD, MOPD) is a
config over this step: configs/opd/*.yaml. The shared loop (draftdistill/train/loop.py) runs the
steps, checkpoints and resumes, and exports the student to OUT_DIR/final. All randomness of a step
derives from (seed, step), and every piece of state (weights, optimizer, scheduler, mix schedule,
EMA teacher) is checkpointed, so a resumed run repeats the next step exactly. Under torchrun each
rank trains on its slice of the global batch (draftdistill/train/distributed.py); the batched
sampler draws all of a micro-batch's rows from one stream per (step, rank), so sampled rollouts
are the same distribution, not the same draws, on another world size (greedy or dataset rollouts
are the same rows).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.data.chat import check_fits_context
from draftdistill.data.prompts import Prompt
from draftdistill.export import export_hf
from draftdistill.models import load_drafter, load_model, load_target, load_tokenizer
from draftdistill.models.loading import resolve_model_source
from draftdistill.train import distributed
from draftdistill.train.batching import pack, response_logits
from draftdistill.train.checkpoint import write_atomically
from draftdistill.train.loop import Trainer, apply_update, batch_indices, make_optimizer, run

from .config import OPDConfig
from .guard import PROBE, check_pair, loss_token_mask
from .objectives import Micro, Objective, reward_term
from .rewards import FEEDBACK, REWARDS
from .rollout import LocalSampler, LocalScorer, Sampler, Scorer, merge_scores, old_logprobs
from .server import SGLangSampler, SGLangScorer
from .teachers import attach_field, copy_weights, ema_update, frozen_copy, privileged_prompt


# --- setup: guard the pair, load the models -------------------------------------------------------


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
    specs = dict(cfg.teachers) if cfg.teachers else (
        {} if cfg.teacher in ("self", "none") else {"teacher": cfg.teacher})
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
    if built and cfg.servers():
        raise ValueError(f"student {cfg.student!r} is built from the teacher's weights; with teacher_servers "
                         "give the student as a model path")
    local = "cpu" if distributed.active() and cfg.teacher_parallel == "shard" else device
    teachers = {} if cfg.servers() else {name: load_target(spec, device=local)[0] for name, spec in specs.items()}
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


# --- the step --------------------------------------------------------------------------------------


@dataclass
class OPDTraining:
    """Everything `step` reads, made once by `build`."""
    cfg: OPDConfig
    objective: Objective
    models: SimpleNamespace  # load_models' result: student, tokenizer, teachers, reference, ema, stops
    student: torch.nn.Module  # sharded or replicated under torchrun
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: Sampler
    own_sampler: bool  # in-process sampling needs the whole student gathered
    scorers: dict[str, Scorer]
    ref_scorer: Scorer | None
    forms: set[str]  # the teacher score forms the objective reads
    prompts: list[Prompt]
    student_ids: list[list[int]]
    order: torch.Tensor  # training prompts, shuffled
    validation: list[int]  # prompts held out for DistiLLM's adaptive schedule
    pad_id: int
    device: str
    state: dict  # resumable: the adaptive mix and its last validation loss
    teacher_ids: dict = None  # (prompt index, teacher) -> the teacher's prompt ids, when fixed

    def route(self, prompt: Prompt) -> str:
        return prompt.meta[self.cfg.route_field] if self.cfg.route_field else next(iter(self.scorers))


def step(t: OPDTraining, step: int) -> dict:
    """One optimizer step: rollouts, teacher scores, the objective's backward, the update."""
    cfg, started = t.cfg, time.perf_counter()
    rank, world = distributed.rank(), distributed.world_size()
    generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * world + rank)
    mix = mix_student_at(cfg, step, t.state)

    # 1. Rollouts for the whole step first: rewards are centred, and the loss normalised, over it.
    rows = []  # per micro-batch: (prompt indices, responses, sampler log-probs or None, by student, texts)
    for micro in range(cfg.grad_accum):
        indices = [i for i in batch_indices(step, micro, cfg, t.order, rank, world) for _ in range(cfg.group_size)]
        by_student = (torch.rand(len(indices), generator=generator) < mix).tolist()
        chosen = [i for i, s in zip(indices, by_student) if s]
        with distributed.gathered(t.student) if t.own_sampler else contextlib.nullcontext():
            samples = iter(t.sampler.sample([t.student_ids[i] for i in chosen], cfg.max_new_tokens, generator)
                           if chosen else [])
        responses, logps = [], []
        for index, own in zip(indices, by_student):
            c = next(samples) if own else None
            responses.append(c.tokens if own else dataset_response(t, index))
            logps.append(c.loss_logprobs if own else None)  # under the loss's distribution: ratio 1 on-policy
        texts = [t.models.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        rows.append((indices, responses, logps, by_student, texts))
    flat_rewards = [REWARDS[cfg.verifier](text, t.prompts[i].reference) if own and cfg.verifier else None
                    for indices, _, _, owns, texts in rows for i, own, text in zip(indices, owns, texts)]
    given = [r for r in flat_rewards if r is not None]
    reward_sum, reward_rows = distributed.all_sum([sum(given), len(given)])
    step_mean = reward_sum / reward_rows if reward_rows and world > 1 else None
    centred = iter(centred_rewards(flat_rewards, cfg.group_size, step_mean))

    # 2. Teacher (and reference) scores of the same tokens; loss masks.
    scored = [score_micro(t, indices, responses, logps, owns, texts, [next(centred) for _ in indices])
              for indices, responses, logps, owns, texts in rows]
    micros = [micro for micro, _ in scored]

    # 3. Student forward and backward, one optimizer step; servers and self-teachers follow it.
    t.optimizer.zero_grad(set_to_none=True)
    sums = accumulate(t.student, micros, t.objective, cfg.loss_temperature, cfg.reward_weight)
    grad_norm = apply_update(t.optimizer, t.scheduler, t.params, cfg.max_grad_norm)
    sync = getattr(t.sampler, "sync", None)  # a server sampler samples from the weights last pushed to it
    if sync is not None:
        sync(t.student, step + 1)
    if t.models.ema is not None and cfg.self_teacher == "ema":
        ema_update(t.models.ema, t.student, cfg.ema_decay)
    elif t.models.ema is not None and (step + 1) % cfg.teacher_refresh_every == 0:
        copy_weights(t.models.ema, t.student)
    seconds = time.perf_counter() - started

    # 4. Metrics over the global batch (sums over ranks; every rank gets the same numbers).
    loss_tokens = sums.pop("loss_tokens")
    all_rows = [r for (_, responses, _, _, _) in rows for r in responses]
    # Compute accounting, in model-forward tokens: the student's rollouts (prompt prefill + sampled
    # tokens), the teachers' scoring forwards, and the student's training forward (+ backward).
    sums["rollout_tokens"] = sum(len(t.student_ids[i]) + len(r) for indices, responses, _, owns, _ in rows
                                 for i, r, own in zip(indices, responses, owns) if own)
    sums["teacher_tokens"] = sum(tokens for _, tokens in scored)
    sums["train_tokens"] = sum(int(micro.batch.attention.sum()) for micro in micros)
    keys = sorted(sums)
    totals = dict(zip(keys + ["response_tokens", "rows"], distributed.all_sum(
        [sums[k] for k in keys] + [sum(map(len, all_rows)), len(all_rows)])))
    loss = totals.pop("loss") / loss_tokens
    sampled_tokens, rkl_sum = totals.pop("sampled_tokens"), totals.pop("rkl_estimate")
    response_tokens = totals.pop("response_tokens")
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": t.scheduler.get_last_lr()[0], "mix_student": mix,
               "response_tokens": response_tokens / totals.pop("rows"), "step_seconds": seconds,
               "response_tokens_per_second": response_tokens / seconds, "loss_tokens": loss_tokens,
               **{k: int(totals.pop(k)) for k in ("rollout_tokens", "teacher_tokens", "train_tokens")},
               **{k: v / loss_tokens for k, v in totals.items()}}
    if sampled_tokens:
        metrics["rkl_estimate"] = rkl_sum / sampled_tokens
    if t.validation and (step + 1) % cfg.adaptive_window == 0:
        metrics["validation_loss"] = validation_loss(t)
        adapt_mix(cfg, t.state, metrics["validation_loss"])
    if reward_rows:
        metrics["reward"] = reward_sum / reward_rows
    return metrics


def teacher_prompt(t: OPDTraining, index: int, completion_text: str) -> list[int]:
    """The prompt a row's teacher sees: its own chat template, with privileged context if any."""
    cfg, prompt = t.cfg, t.prompts[index]
    name = t.route(prompt)
    if cfg.privileged == "feedback":  # depends on the response: never cached
        feedback = FEEDBACK[cfg.verifier](completion_text, prompt.reference)
        return encode_prompt(t.models.tokenizers[name], privileged_prompt(prompt, "feedback", cfg.privileged_template,
                                                                          feedback))[0].tolist()
    if (index, name) not in t.teacher_ids:
        shown = privileged_prompt(prompt, cfg.privileged, cfg.privileged_template)
        t.teacher_ids[(index, name)] = encode_prompt(t.models.tokenizers[name], shown)[0].tolist()
    return t.teacher_ids[(index, name)]


def dataset_response(t: OPDTraining, index: int) -> list[int]:
    reference = t.prompts[index].reference
    if not reference:
        raise ValueError(f"prompt {index} has no reference answer for dataset samples (mix_student < 1)")
    tokens = t.models.tokenizer(reference, add_special_tokens=False)["input_ids"][: t.cfg.max_new_tokens]
    return tokens + [t.models.stop[0]] if len(tokens) < t.cfg.max_new_tokens else tokens


def score_micro(t: OPDTraining, indices, responses, logps, owns, texts, rewards) -> tuple[Micro, int]:
    """Teacher (and reference) scores of one micro-batch's tokens and its loss mask; returns the
    Micro and the teacher-forward tokens it cost (prompt + response), for compute accounting."""
    cfg = t.cfg
    batch = pack([t.student_ids[i] for i in indices], responses, t.pad_id).to(t.device)
    width = batch.scored.shape[1]
    parts, teacher_tokens = [], 0
    for name, scorer in t.scorers.items():
        mine = [r for r, i in enumerate(indices) if t.route(t.prompts[i]) == name]
        if mine:
            shown = [teacher_prompt(t, indices[r], texts[r]) for r in mine]
            teacher_tokens += sum(len(p) + len(responses[r]) for p, r in zip(shown, mine))
            parts.append((mine, scorer.score(shown, [responses[r] for r in mine], t.forms, cfg.teacher_topk,
                                             cfg.loss_temperature)))
    teacher = merge_scores(parts, len(indices), width) if parts else None
    mask = batch.scored
    if cfg.mask_special_tokens:
        mask = loss_token_mask(batch.targets, batch.scored, t.models.tokenizer.all_special_ids, t.models.loss_stops)
    old = old_logprobs(logps, owns, batch.scored.shape, t.device) if cfg.importance_sampling else None
    ref = None
    if t.ref_scorer is not None:
        ref = t.ref_scorer.score([t.student_ids[i] for i in indices], responses, set(), 1,
                                 cfg.loss_temperature).token.logprobs
    sampled = torch.tensor(owns, dtype=torch.bool, device=t.device)
    reward = torch.tensor(rewards, device=t.device) if cfg.verifier else None
    return Micro(batch, mask, teacher, old, ref, sampled, reward), teacher_tokens


@torch.no_grad()
def validation_loss(t: OPDTraining) -> float:
    """The objective on the held-out prompts' dataset answers (fixed tokens, so losses compare)."""
    total, tokens = 0.0, 0
    for start in range(0, len(t.validation), t.cfg.batch_size):
        indices = t.validation[start: start + t.cfg.batch_size]
        responses = [dataset_response(t, i) for i in indices]
        texts = [t.models.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        micro, _ = score_micro(t, indices, responses, [None] * len(indices), [False] * len(indices), texts,
                               [0.0] * len(indices))
        loss_tokens, _ = t.objective.fn(response_logits(t.student, micro.batch), micro, t.cfg.loss_temperature)
        total += float(torch.where(micro.mask, loss_tokens, 0.0).sum())
        tokens += int(micro.mask.sum())
    return total / max(1, tokens)


# --- build: models, data, optimizer -------------------------------------------------------------


def build(cfg: OPDConfig, device: str, sampler: Sampler | None = None,
          scorers: dict[str, Scorer] | None = None) -> Trainer:
    objective = cfg.build_objective()
    rank = distributed.rank()
    prompts = load_prompts(cfg.prompts, limit=cfg.prompt_limit or None)
    if cfg.route_field:
        attach_field(prompts, cfg.prompts, cfg.route_field)
        unknown = sorted({p.meta[cfg.route_field] for p in prompts} - set(cfg.teachers))
        if unknown:
            raise ValueError(f"prompts route to {unknown}, which are not in teachers {sorted(cfg.teachers)}")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed))
    validation = []  # DistiLLM's adaptive schedule watches a loss on held-out prompts
    if cfg.mix_schedule == "adaptive":
        if len(order) <= cfg.adaptive_validation:
            raise ValueError(f"{len(order)} prompts leave none to train on after holding out "
                             f"adaptive_validation={cfg.adaptive_validation}")
        validation, order = order[-cfg.adaptive_validation:].tolist(), order[: -cfg.adaptive_validation]

    m = load_models(cfg, [PROBE, prompts[0].messages], device)
    # Under torchrun: the student (and a self-teacher that follows it, parameter by parameter) is
    # sharded or replicated by FSDP2; frozen teachers follow teacher_parallel. In place.
    student, tokenizer = distributed.shard_model(m.student.to(device), cfg.fsdp), m.tokenizer
    for model in {id(x): x for x in [*m.teachers.values(), m.reference] if x is not None}.values():
        if model is m.ema:
            distributed.shard_model(model.to(device), cfg.fsdp, forward_only=True)
        elif model is not student:
            distributed.place_frozen(model, cfg.teacher_parallel, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else m.stop[0]
    own_sampler = sampler is None and not cfg.rollout_server
    if sampler is None and cfg.rollout_server:
        sampler = SGLangSampler(cfg.rollout_server, m.stop, cfg.rollout_temperature, cfg.top_p,
                                patience=cfg.server_patience, start=rank,  # rank r starts on server r
                                loss_temperature=cfg.loss_temperature)
    sampler = sampler or LocalSampler(student, m.stop, pad_id, cfg.rollout_temperature, cfg.top_p,
                                      loss_temperature=cfg.loss_temperature)
    if scorers is None and cfg.servers():  # rank r starts on server r
        scorers = {"teacher": SGLangScorer(cfg.servers(), patience=cfg.server_patience, start=rank, device=device)}
    scorers = scorers or {name: LocalScorer(model, pad_id) for name, model in m.teachers.items()}
    # Only what the objective reads: full logits [B, R, V] are the largest tensor of the step.
    forms = {"logits": {"logits"}, "topk": {"topk"}, "token": set()}[cfg.teacher_scores]
    if not objective.needs & {"dist", "full"}:
        forms = set()

    student_ids = [encode_prompt(tokenizer, p)[0].tolist() for p in prompts]
    check_fits_context(student_ids, cfg.max_new_tokens, student, cfg.prompts, "max_new_tokens")
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, params)
    training = OPDTraining(
        cfg, objective, m, student, params, optimizer, scheduler, sampler, own_sampler, scorers,
        LocalScorer(m.reference, pad_id) if m.reference is not None else None, forms, prompts,
        student_ids, order, validation, pad_id, device,
        state={}, teacher_ids={})
    out = Path(cfg.out_dir)

    def on_start(step: int) -> None:
        if m.ema is not None and step > 0:  # the EMA / refreshed self-teacher of the resumed step
            missing, unexpected = distributed.load_full_state_dict(m.ema, load_file(out / f"ema-{step}.safetensors"))
            if [k for k in missing if k != "lm_head.weight"] or unexpected:
                raise ValueError(f"{out}: self-teacher weights do not match (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        sync = getattr(sampler, "sync", None)  # a server sampler samples from the weights last pushed to it
        if sync is not None:
            sync(student, step)

    def after_save(step: int) -> None:
        if m.ema is not None and distributed.is_main():
            drop_old_ema(out, step)

    return Trainer(
        name="opd", model=student, optimizer=optimizer, scheduler=scheduler, step=partial(step, training),
        export=lambda path: export_hf(path, student, tokenizer), state=training.state,
        shown={"loss": "loss", "rkl": "rkl_estimate"}, on_start=on_start,
        before_save=(lambda step: save_ema(out, m.ema, step)) if m.ema is not None else None,
        after_save=after_save, summary=lambda _: {"objective": cfg.objective})



def train_opd(cfg: OPDConfig, progress: bool = True, sampler: Sampler | None = None,
              scorers: dict[str, Scorer] | None = None) -> dict:
    """Run the recipe. `sampler` / `scorers` replace the in-process student sampler / teachers
    (e.g. server backends); by default both run in this process."""
    return run(cfg, partial(build, sampler=sampler, scorers=scorers), progress)
