"""Training-time test (TTT) of an EAGLE-3 head with the target in the loop (no hidden-state cache).

Rows are prompt + response, right-padded: the head's causal attention has no padding mask, so the
padding must come after every real position. One target forward gives the aux hidden states and the
logits; the head then unrolls `steps` steps over every position t (models/eagle3.py):

  step 0   position t eats (x_{t+1}, aux_t) and predicts x_{t+2}; teacher p(. | x_<=t+1)
  step j   the chain started at t eats its token c_j and its own state of step j-1;
           teacher p(. | x_<=t+1, c_1..c_j)

Chain tokens (`chain`):
  data     c_j = x_{t+1+j}, the context's own tokens (EAGLE-3 / SpecForge: teacher-forced). The
           teacher is the target's logits at t+1+j, from the same forward.
  sampled  c_j ~ q_{j-1}, the head's own draft at step j-1: the chain it drafts at decode time
           (on-policy, as [D] does for standalone drafters). The target then scores every chain in
           one more forward over the chain tokens only, on the context's KV cache, each chain token
           seeing its anchor's prefix x_<=t+1 and its own chain (a tree attention mask).
  mixed    sampled chains at the anchors, data chains at every other position, all scored: the
           data chains' teachers come from the context forward the sampled chains need anyway, so
           on-policy chains are added to teacher-forced ones at the sampled chains' target cost only.

Anchors (the positions whose chains are sampled) are drawn among the positions that predict
response tokens, `anchors_per_row` per row, which keeps the target's extra cost at anchors *
chain_tokens per row; the target scores the first `chain_tokens` drafts of each chain (default all
steps - 1; a decoder drafting gamma tokens only ever uses the first gamma - 1). Which (row, position,
step) is scored is fixed by `plan_ttt` before any forward, so a step's loss can be divided by its
token count over every micro-batch.

Reach weights (`reach_weights`, sampled chains): a decoder only gets to use the draft of step j
after accepting the chain's first j drafts, which it does with chance prod_i min(1, p(c_i) / q(c_i))
when it samples (at the chain's temperature). Weighting the sampled rows of step j by that chance makes the
loss an expectation over the states the decoder reaches, instead of every state the head can draft
into (most of which follow a rejected draft).

The loss of step j is a registry divergence over the draft vocabulary, SpecForge's way (see
models/draft_vocab.py): the teacher is the target's logits restricted to the draft vocabulary, and
a position whose target argmax lies outside it is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from draftdistill.models.eagle3 import target_aux_hidden_states

from .feature_cache import FeatureCache

CHAINS = ("data", "sampled", "mixed")


@dataclass
class ContextBatch:
    ids: torch.Tensor  # [B, L] prompt + response, right-padded
    lengths: torch.Tensor  # [B] real tokens per row
    prompt_lengths: torch.Tensor  # [B]

    def to(self, device) -> "ContextBatch":
        return ContextBatch(self.ids.to(device), self.lengths.to(device), self.prompt_lengths.to(device))


def pack_right(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> ContextBatch:
    rows = [p + r for p, r in zip(prompts, responses)]
    if any(len(p) == 0 for p in prompts) or any(len(row) < 3 for row in rows):
        raise ValueError("every row needs a prompt token and at least 3 tokens in all")
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ContextBatch(ids, torch.tensor([len(r) for r in rows]), torch.tensor([len(p) for p in prompts]))


@dataclass
class TTTPlan:
    """Which positions t (of the head's T = L - 1) each step scores."""

    chain: str
    sampled: torch.Tensor  # [B, T] bool: the anchors, positions whose chains are the head's own drafts
    valid: list[torch.Tensor]  # per step, [B, T] bool: positions whose step-j row is scored
    chain_tokens: int  # drafts per sampled chain the target scores (steps 1..chain_tokens)

    @property
    def steps(self) -> int:
        return len(self.valid)

    def counts(self) -> list[int]:
        return [int(v.sum()) for v in self.valid]

    def chain_target_tokens(self) -> int:
        """Tokens the target runs over to score the sampled chains (beyond the context)."""
        return int(self.sampled.sum()) * self.chain_tokens


def plan_ttt(batch: ContextBatch, steps: int, chain: str, anchors_per_row: int = 0,
             generators: list[torch.Generator] | None = None, chain_tokens: int = 0) -> TTTPlan:
    """Rows are scored at positions t with prompt_len - 2 <= t <= len - 2 (t + 1 is the last prompt
    token or a response token, so step 0 predicts a response token). Data chains score step j while
    the context still has x_{t+1+j}; sampled chains extend past the context and score steps up to
    chain_tokens (0: every step)."""
    if chain not in CHAINS:
        raise ValueError(f"ttt chain must be one of {CHAINS}, got {chain!r}")
    if steps < 1:
        raise ValueError(f"ttt steps must be >= 1, got {steps}")
    if chain_tokens < 0:
        raise ValueError(f"ttt chain_tokens must be >= 0 (0: steps - 1), got {chain_tokens}")
    chain_tokens = min(chain_tokens or steps - 1, steps - 1)
    B, L = batch.ids.shape
    t = torch.arange(L - 1)[None]
    lengths, prompts = batch.lengths.cpu()[:, None], batch.prompt_lengths.cpu()[:, None]
    eligible = (t >= (prompts - 2).clamp(min=0)) & (t <= lengths - 2)
    sampled = torch.zeros_like(eligible)
    if chain != "data":
        sampled = eligible.clone()
        for row in range(B):
            where = eligible[row].nonzero().flatten()
            if 0 < anchors_per_row < len(where):
                pick = torch.randperm(len(where), generator=generators[row] if generators else None)
                sampled[row] = False
                sampled[row, where[pick[:anchors_per_row]]] = True
    # Data chains score step j while the context has x_{t+1+j}; `sampled` plans have none (even at
    # step 0, only their anchors are scored).
    data = eligible & ~sampled if chain != "sampled" else torch.zeros_like(eligible)
    valid = [(data & (t + 1 + j <= lengths - 1)) | (sampled & (j <= chain_tokens)) for j in range(steps)]
    device = batch.ids.device
    return TTTPlan(chain, sampled.to(device), [v.to(device) for v in valid], chain_tokens)


def sample_chain_tokens(logits: torch.Tensor, anchors: torch.Tensor, vocab, temperature: float,
                        generators: list[torch.Generator]) -> torch.Tensor:
    """One draft token (a target id) per anchor, from the head's draft-vocab logits [B, T, N], with
    each row's own generator (on the CPU, so any device draws the same tokens)."""
    drafted = torch.zeros(anchors.shape, dtype=torch.long)
    for row in range(anchors.shape[0]):
        rows = logits[row, anchors[row]].detach().float().cpu()
        if len(rows) == 0:
            continue
        q = (torch.softmax(rows / temperature, -1) if temperature > 0
             else F.one_hot(rows.argmax(-1), rows.shape[-1]).float())
        drafted[row, anchors[row].cpu()] = torch.multinomial(q, 1, generator=generators[row]).flatten()
    return vocab.draft_to_target(drafted.to(logits.device))


def chain_attention_mask(anchor_pos: torch.Tensor, context_len: int, chain_len: int, dtype) -> torch.Tensor:
    """Additive mask [B, 1, A * C, context_len + A * C] for the chain tokens (a, j), j = 1..C, laid
    out anchor by anchor after the context: (a, j) sees context positions <= anchor + 1 and the
    chain tokens (a, i <= j). Additive (0 / dtype min), so eager and SDPA attention read it alike."""
    B, A = anchor_pos.shape
    device = anchor_pos.device
    prefix = torch.arange(context_len, device=device)[None, None, :] <= anchor_pos[:, :, None] + 1  # [B, A, L]
    prefix = prefix[:, :, None, :].expand(B, A, chain_len, context_len).reshape(B, A * chain_len, context_len)
    own = torch.eye(A, dtype=torch.bool, device=device)[:, None, :, None] & \
        torch.ones(chain_len, chain_len, dtype=torch.bool, device=device).tril()[None, :, None, :]
    own = own.reshape(A * chain_len, A * chain_len)[None].expand(B, -1, -1)
    allowed = torch.cat([prefix, own], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def score_chains(target, past_key_values, anchor_pos: torch.Tensor, chain_tokens: torch.Tensor,
                 context_len: int) -> torch.Tensor:
    """The target's logits [B, A, C, V] at every chain token [B, A, C], one forward on the
    context's cache: chain token (a, j) sits at position anchor + 1 + j."""
    B, A, C = chain_tokens.shape
    positions = anchor_pos[:, :, None] + 1 + torch.arange(1, C + 1, device=anchor_pos.device)
    mask = chain_attention_mask(anchor_pos, context_len, C, next(target.parameters()).dtype)
    out = target(input_ids=chain_tokens.reshape(B, A * C), position_ids=positions.reshape(B, A * C),
                 attention_mask=mask, past_key_values=past_key_values, use_cache=True)
    return out.logits.reshape(B, A, C, -1)


@dataclass
class StepRows:
    """One TTT step's scored rows: the head's draft-vocab logits [M, N], the target's logits [M, V],
    each row's loss weight ([M], or None: all 1), and for inspection where they are ([M, 2]: row,
    position t) and the token the head ate at this step ([M]: x_{t+1} at step 0, the chain token c_j
    after). Rows whose teacher comes from the context come first, then the sampled chains' rows,
    each part in (row, t) order."""

    student: torch.Tensor
    teacher: torch.Tensor
    where: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor | None = None


def ttt_forward(head, target, batch: ContextBatch, plan: TTTPlan, temperature: float = 1.0,
                generators: list[torch.Generator] | None = None,
                features: FeatureCache | None = None,
                reach_weights: bool = False) -> tuple[list[StepRows], int]:
    """Target forward(s) + the head's TTT unroll; returns each step's scored rows and the number of
    tokens the target ran over (context + chain tokens).
    features: data chains only, the contexts' target features from this cache when it holds them
    (feature_cache.py); the result is the same, without the target's layers.
    reach_weights: weight each sampled row by the chance a decoder accepts its chain's earlier drafts."""
    ids = batch.ids
    B, L = ids.shape
    sampled = plan.chain != "data"
    if features is not None and sampled:
        raise ValueError("cached features serve data chains only: the target scores sampled chains on each "
                         "context's KV cache")
    with torch.no_grad():
        cached = features.context(target, ids, batch.lengths) if features is not None else None
        if cached is not None:
            (aux, target_logits), target_tokens = cached, 0
        else:
            attention = (torch.arange(L, device=ids.device)[None] < batch.lengths[:, None]).long()
            aux, out = target_aux_hidden_states(target, ids, head.aux_layer_ids, attention_mask=attention,
                                                use_cache=sampled and plan.chain_tokens > 0)
            target_logits, target_tokens = out.logits, int(batch.lengths.sum())
            if features is not None:  # the final states, after the final norm: lm_head of them is out.logits
                features.store(ids, batch.lengths, aux, out.hidden_states[-1])
    context_logits = target_logits[:, 1:]  # teacher of step 0 at t: the target at t + 1

    cache, vocab = head.new_cache(), head.vocab
    # Sampled chains alone score nothing past chain_tokens: the unroll stops there.
    unrolled = plan.chain_tokens + 1 if plan.chain == "sampled" else plan.steps
    logits, h = head(ids[:, 1:], head.fuse(aux[:, :-1]), cache)
    head_logits, head_tokens = [logits], [ids[:, 1:]]
    for j in range(1, unrolled):
        tokens = F.pad(ids[:, 1 + j:], (0, j))  # x_{t+1+j} (0 past the end: never scored)
        if sampled and j <= plan.chain_tokens:  # past it, a mixed anchor's unscored chain eats anything
            drafts = sample_chain_tokens(logits, plan.sampled, vocab, temperature, generators)
            tokens = torch.where(plan.sampled, drafts, tokens)
        logits, h = head(tokens, h, cache, step=j)
        head_logits.append(logits)
        head_tokens.append(tokens)

    # Rows whose teacher is the context's: every row of step 0, the data chains' rows after it
    # (the target at t + 1 + j, gathered row by row rather than copying the logits shifted).
    steps = []
    for j in range(plan.steps):
        if j >= unrolled:
            steps.append(StepRows(head_logits[0][:0], target_logits[0, :0], plan.valid[j][:0].nonzero(),
                                  ids[0, :0]))
            continue
        from_context = plan.valid[j] if j == 0 else plan.valid[j] & ~plan.sampled
        b, t = from_context.nonzero(as_tuple=True)
        steps.append(StepRows(head_logits[j][b, t], context_logits[b, t + j], torch.stack([b, t], -1),
                              head_tokens[j][b, t]))
    if not sampled or plan.chain_tokens == 0:
        return steps, target_tokens

    # Sampled chains: the target scores their first chain_tokens drafts in one forward. Anchors of
    # each row, ascending, padded to A with position 0 (their rows are dropped by `kept`).
    K = plan.chain_tokens
    per_row = plan.sampled.sum(1)
    A = int(per_row.max())
    order = torch.sort((~plan.sampled).long(), dim=1, stable=True).indices[:, :A]  # anchors first, by t
    kept = torch.arange(A, device=ids.device)[None] < per_row[:, None]
    anchor_pos = torch.where(kept, order, torch.zeros_like(order))
    chain = torch.stack([tokens.gather(1, anchor_pos) for tokens in head_tokens[1: K + 1]], dim=-1)  # [B, A, K]
    with torch.no_grad():
        chain_logits = score_chains(target, out.past_key_values, anchor_pos, chain, L)
    target_tokens += plan.chain_target_tokens()
    reach = chain_reach(head_logits, context_logits, chain_logits, anchor_pos, chain, vocab, temperature) \
        if reach_weights else None
    for j in range(1, K + 1):
        rows = steps[j]
        on_chain = plan.valid[j] & plan.sampled
        weights = None
        if reach is not None:
            ones = torch.ones(len(rows.student), dtype=reach.dtype, device=ids.device)
            weights = torch.cat([ones, reach[:, :, j - 1][kept]])
        steps[j] = StepRows(torch.cat([rows.student, head_logits[j][on_chain]]),
                            torch.cat([rows.teacher, chain_logits[:, :, j - 1][kept]]),
                            torch.cat([rows.where, on_chain.nonzero()]),
                            torch.cat([rows.tokens, head_tokens[j][on_chain]]), weights)
    return steps, target_tokens


@torch.no_grad()
def chain_reach(head_logits: list[torch.Tensor], context_logits: torch.Tensor, chain_logits: torch.Tensor,
                anchor_pos: torch.Tensor, chain: torch.Tensor, vocab, temperature: float) -> torch.Tensor:
    """[B, A, K]: for each sampled chain and step j = 1..K, the chance that a decoder sampling at
    `temperature` accepts the chain's drafts c_1..c_j, prod_i min(1, p_{i-1}(c_i) / q_{i-1}(c_i))
    (greedy, temperature 0: whether each c_i is the target's argmax). Padding anchors (position 0
    beyond a row's count) get values that the caller drops."""
    B, A, K = chain.shape
    accept = []
    for i in range(1, K + 1):
        c = chain[:, :, i - 1]
        student = head_logits[i - 1].gather(1, anchor_pos[:, :, None].expand(B, A, head_logits[i - 1].shape[-1]))
        teacher = context_logits.gather(1, anchor_pos[:, :, None].expand(B, A, context_logits.shape[-1])) \
            if i == 1 else chain_logits[:, :, i - 2]
        if temperature > 0:
            p = torch.softmax(teacher.float() / temperature, -1).gather(-1, c[..., None])[..., 0]
            drafted = vocab.target_to_draft(c).clamp_min(0)  # padding anchors may hold tokens outside it
            q = torch.softmax(student.float() / temperature, -1).gather(-1, drafted[..., None])[..., 0]
            accept.append(torch.clamp(p / q.clamp_min(1e-30), max=1.0))
        else:
            accept.append((teacher.argmax(-1) == c).float())
    return torch.stack(accept, -1).cumprod(-1)


def step_loss(rows: StepRows, vocab, loss_fn, temperature: float = 1.0) -> torch.Tensor:
    """Sum over the step's rows of the divergence between the target restricted to the draft
    vocabulary and the head, times each row's weight; rows whose target argmax is outside the
    vocabulary count 0."""
    if rows.student.shape[0] == 0:
        return rows.student.sum() * 0.0
    keep = vocab.loss_mask(rows.teacher)
    teacher = vocab.restrict_logits(rows.teacher)
    if rows.weights is None:
        return loss_fn(rows.student, teacher, keep, temperature=temperature, reduction="sum")
    per_row = loss_fn(rows.student, teacher, keep, temperature=temperature, reduction="none")
    return (per_row * rows.weights).sum()


@torch.no_grad()
def step_acceptance(rows: StepRows, vocab) -> tuple[float, float]:
    """Sums over the step's rows of the simulated acceptance at T=1, alpha = sum over the draft
    vocabulary of min(p, q) with p the target's full distribution, and of greedy agreement."""
    if rows.student.shape[0] == 0:
        return 0.0, 0.0
    p = torch.softmax(rows.teacher.float(), -1)
    q = torch.softmax(rows.student.float(), -1)
    alpha = torch.minimum(vocab.restrict_logits(p), q).sum(-1)
    agree = vocab.draft_to_target(rows.student.argmax(-1)) == rows.teacher.argmax(-1)
    return float(alpha.sum()), float(agree.sum())


def simulated_tau(alpha_per_position: list[float | None], gamma: int) -> float:
    """Expected tokens per target call of a chain of `gamma` drafts with these conditional
    acceptance rates (the decoder's tau is this function of its measured alpha per position); a
    position whose rate is unknown (None) and those after it add nothing."""
    tau, reach = 1.0, 1.0
    for alpha in alpha_per_position[:gamma]:
        if alpha is None:
            break
        reach *= alpha
        tau += reach
    return tau
