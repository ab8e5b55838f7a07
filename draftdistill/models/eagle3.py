"""The EAGLE-3 drafter head (Li et al. 2025), in plain PyTorch, laid out like SGLang's
LlamaForCausalLMEagle3 (python/sglang/srt/models/llama_eagle3.py) so its state dict is the checkpoint.

    target aux hidden states [B,T,3H] --fc--> [B,T,H] ----------------------------.
                                                   |                              |
    token embedding (the target's, frozen) --input_layernorm--. hidden_norm       | residual
                                                   cat [2H] <-----'               |
                                     one Llama layer: q/k/v(2H) -> attn -> o_proj + '
                                                      -> post_attention_layernorm -> mlp (+ residual)
                                                   = h (the head's own state, fed back at the next step)
                                     norm(h) -> lm_head -> logits over the REDUCED draft vocabulary

Position t at step 0 eats (token x_{t+1}, the target's aux states at t) and predicts x_{t+2}; step
j >= 1 eats (its own drafted token, its own h from step j-1) and continues the chain one position to
the right. The attention cache (`Eagle3Cache`) keeps the two kinds of keys apart:
  - prefix: positions fed with target features (step 0), attended causally;
  - chain:  one entry per later step, aligned with the last T prefix positions; the query of chain t
            at step j sees the prefix up to t and its own chain entries 1..j, nothing else.
That is EAGLE-3's training-time test (TTT) pattern (SpecForge, specforge/core/eagle3.py): in
training every position t starts a chain (T = sequence length); in decoding only the last one does
(T = 1). The same forward serves both, so a head trained with TTT drafts exactly what it learned.
Tree decoding (spec/tree.py) generalises the one chain to a tree hanging off the last prefix
position: `tree_step` feeds several nodes of one depth at once, each seeing the whole prefix, its
ancestors and itself; a node at depth j sits where chain step j would, so it computes what the chain
through its ancestors would.

Which target layers: ``aux_layer_ids`` are decoder-layer indices whose OUTPUT is captured, as in
SGLang's ``eagle_config.eagle_aux_hidden_state_layer_ids`` (models/llama.py,
set_eagle3_layers_to_capture: it captures at the input of layer id+1). The default is what SGLang
captures without an eagle_config and what SpecForge trains on: outputs of layers 1, N//2-1, N-4,
i.e. transformers' ``output_hidden_states`` entries 2, N//2, N-3 (entry 0 is the embeddings, entry i
the output of layer i-1; the last entry N is after the final norm, so layer N-1 is not available).
vLLM/speculators number the same states differently (the input of layer id): see
draftdistill/export/eagle3.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from .draft_vocab import DraftVocab

ARCHITECTURE = "LlamaForCausalLMEagle3"  # SGLang's class name; its loader keys on it


# ---------------------------------------------------------------- which target layers

def default_aux_layer_ids(num_layers: int) -> list[int]:
    """SGLang's default capture (low/mid/high) as output-of-layer indices: [1, N//2 - 1, N - 4]."""
    return [1, num_layers // 2 - 1, num_layers - 4]


def check_aux_layer_ids(aux_layer_ids: list[int], num_layers: int) -> list[int]:
    ids = [int(i) for i in aux_layer_ids]
    if not ids or any(not 0 <= i <= num_layers - 2 for i in ids):
        raise ValueError(f"aux layer ids must lie in [0, {num_layers - 2}] for a {num_layers}-layer target "
                         f"(transformers returns the last layer's output only after the final norm), got {ids}")
    return ids


def hidden_state_indices(aux_layer_ids: list[int]) -> list[int]:
    """transformers ``output_hidden_states`` index of each layer's output (index 0 is the embeddings)."""
    return [i + 1 for i in aux_layer_ids]


def target_aux_hidden_states(target, input_ids: torch.Tensor, aux_layer_ids: list[int], **kwargs):
    """Run `target` and return (aux [B, T, len(ids) * H] = the captured layer outputs concatenated in
    order, the model output). kwargs go to the target (attention_mask, past_key_values, ...)."""
    out = target(input_ids=input_ids, output_hidden_states=True, **kwargs)
    aux = torch.cat([out.hidden_states[i] for i in hidden_state_indices(aux_layer_ids)], dim=-1)
    return aux, out


# ---------------------------------------------------------------- config

def eagle3_config(target_config, draft_vocab_size: int, aux_layer_ids: list[int] | None = None,
                  intermediate_size: int | None = None) -> LlamaConfig:
    """The head's config from the target's: same width, heads, rope and vocabulary; one layer."""
    t = target_config
    n = t.num_hidden_layers
    ids = check_aux_layer_ids(aux_layer_ids if aux_layer_ids is not None else default_aux_layer_ids(n), n)
    config = LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=intermediate_size or t.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        hidden_act=getattr(t, "hidden_act", "silu"),
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_parameters=getattr(t, "rope_parameters", None),
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=getattr(t, "pad_token_id", None),
        tie_word_embeddings=False,  # SGLang would make lm_head the (full-vocab) embedding otherwise
    )
    config.architectures = [ARCHITECTURE]
    config.draft_vocab_size = int(draft_vocab_size)
    config.target_hidden_size = t.hidden_size
    config.eagle_config = {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True}
    return config


# ---------------------------------------------------------------- the attention cache

@dataclass
class Eagle3Cache:
    """Keys/values of the head's one layer, [B, kv_heads, *, head_dim]; see the module docstring."""

    k: torch.Tensor | None = None  # prefix: positions fed with target features
    v: torch.Tensor | None = None
    chain: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # steps 1.., [B, kvh, T, d]
    tree: tuple[torch.Tensor, torch.Tensor] | None = None  # tree nodes fed so far, [1, kvh, nodes, d]

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def crop(self, length: int) -> None:
        """Keep the first `length` prefix positions; drop the chain."""
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]
        self.end_chain()

    def end_chain(self) -> None:
        """Drop the chain (or tree) entries: the prefix is all that outlives a round."""
        self.chain.clear()
        self.tree = None


# ---------------------------------------------------------------- the model

class Eagle3Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        width = 2 * config.hidden_size  # q/k/v read [normed embedding, normed hidden]
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: Eagle3Cache | None, step: int | None,
                tree_visible: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if tree_visible is not None:
            out = self._tree(q, k, v, cache, tree_visible)
        else:
            out = self._prefix(q, k, v, cache) if step == 0 else self._chain(q, k, v, cache)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _expand(self, kv: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention: each kv head serves heads // kv_heads query heads."""
        return kv.repeat_interleave(self.heads // self.kv_heads, dim=1)

    def _prefix(self, q, k, v, cache):
        """Step 0: append to the prefix and attend causally over it."""
        past = 0 if cache is None else cache.length
        if cache is not None:
            if cache.chain or cache.tree is not None:
                raise ValueError("step 0 after chain or tree steps: call cache.end_chain() (or crop) first")
            cache.k = k if cache.k is None else torch.cat([cache.k, k], dim=2)
            cache.v = v if cache.v is None else torch.cat([cache.v, v], dim=2)
            k, v = cache.k, cache.v
        T = q.shape[2]
        mask = torch.arange(past + T, device=q.device)[None, :] <= past + torch.arange(T, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, self._expand(k), self._expand(v), attn_mask=mask)

    def _chain(self, q, k, v, cache):
        """Step j >= 1: query i continues the chain started at prefix position P - T + i; it sees the
        prefix up to there and the chain's entries of steps 1..j (this one included)."""
        T = q.shape[2]
        if cache is None or cache.length < T:
            raise ValueError("chain steps need a cache whose prefix holds the T positions they continue")
        P = cache.length
        cache.chain.append((k, v))
        dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32
        q = q.to(dtype) * self.head_dim ** -0.5
        start = P - T + torch.arange(T, device=q.device)
        prefix_scores = q @ self._expand(cache.k).to(dtype).transpose(-1, -2)  # [B, h, T, P]
        prefix_scores = prefix_scores.masked_fill(torch.arange(P, device=q.device)[None, :] > start[:, None],
                                                  float("-inf"))
        chain_scores = torch.stack([(q * self._expand(ck).to(dtype)).sum(-1) for ck, _ in cache.chain], -1)
        weights = torch.cat([prefix_scores, chain_scores], dim=-1).softmax(-1)  # [B, h, T, P + j]
        out = weights[..., :P] @ self._expand(cache.v).to(dtype)
        for i, (_, cv) in enumerate(cache.chain):
            out = out + weights[..., P + i, None] * self._expand(cv).to(dtype)
        return out.to(v.dtype)

    def _tree(self, q, k, v, cache, tree_visible):
        """Tree nodes of one depth: each query sees the whole prefix and the tree entries (earlier
        nodes, then these) marked in tree_visible [T, tree entries after appending these]."""
        if cache is None or cache.length == 0:
            raise ValueError("tree steps need a cache whose prefix holds the position the tree hangs off")
        cache.tree = (k, v) if cache.tree is None else (torch.cat([cache.tree[0], k], 2),
                                                        torch.cat([cache.tree[1], v], 2))
        keys, values = torch.cat([cache.k, cache.tree[0]], 2), torch.cat([cache.v, cache.tree[1]], 2)
        assert tree_visible.shape == (q.shape[2], cache.tree[0].shape[2]), "one row per node, one column per tree entry"
        mask = torch.cat([tree_visible.new_ones(q.shape[2], cache.length), tree_visible], dim=1)
        return F.scaled_dot_product_attention(q, self._expand(keys), self._expand(values), attn_mask=mask.to(q.device))


class Eagle3Layer(nn.Module):
    """The one decoder layer; weight names as in SGLang's/vLLM's Eagle3 layer (layers.0.*)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # for the embedding
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # for the hidden state
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, embeds, hidden, cos, sin, cache, step, tree_visible=None):
        # [embedding, hidden] in this order, and the residual is the UN-normalised hidden state:
        # SGLang llama_eagle3.py LlamaDecoderLayer.forward (residual = hidden_states; cat([embeds,
        # hidden_states])), vLLM with norm_before_residual=False, SpecForge's midlayer.
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, cos, sin, cache, step, tree_visible)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    """fc + one layer + norm + lm_head over the draft vocabulary; the embedding is the target's."""

    weights_from_target = ("embed_tokens.weight",)  # shared and frozen: checkpoints leave it out

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(len(self.aux_layer_ids) * config.target_hidden_size, H, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(config)])
        self.norm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)  # inv_freq is a non-persistent buffer
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.set_vocab(DraftVocab(torch.arange(config.draft_vocab_size), config.vocab_size))  # until set

    # ---- vocabulary and target layers ----
    @property
    def aux_layer_ids(self) -> list[int]:
        return list(self.config.eagle_config["eagle_aux_hidden_state_layer_ids"])

    @property
    def target_hidden_indices(self) -> list[int]:
        """Which entries of the target's ``output_hidden_states`` the head reads (concatenated)."""
        return hidden_state_indices(self.aux_layer_ids)

    @property
    def vocab(self) -> DraftVocab:
        return DraftVocab.from_d2t(self.d2t, self.config.vocab_size)

    def set_vocab(self, vocab: DraftVocab) -> None:
        if len(vocab) != self.config.draft_vocab_size or vocab.target_vocab_size != self.config.vocab_size:
            raise ValueError(f"vocab of {len(vocab)} over {vocab.target_vocab_size} tokens does not fit a head with "
                             f"draft_vocab_size {self.config.draft_vocab_size} over {self.config.vocab_size}")
        self.d2t.copy_(vocab.d2t)
        self.t2d.copy_(vocab.t2d)

    # ---- forward ----
    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """[B, T, 3 * H_target] target aux states -> [B, T, H], the hidden input of step 0."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, cache: Eagle3Cache | None = None,
                step: int = 0, num_logits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step over T positions; returns (draft-vocab logits [B, T or num_logits, N], h [B, T, H]).

        input_ids [B, T]: TARGET token ids (the token after each position).
        hidden [B, T, H]: ``fuse(aux)`` at step 0; at step j >= 1, h of step j-1 (its last T rows).
        cache: None for a one-off causal pass (step 0 only); steps j >= 1 need the cache of steps < j.
        Batches are right-padded: causal attention keeps real positions away from the padding.
        """
        past = 0 if cache is None else cache.length
        T = input_ids.shape[1]
        offset = past if step == 0 else past - T + step  # chain t at step j sits at position t + j
        positions = torch.arange(offset, offset + T, device=input_ids.device)[None]
        cos, sin = self.rotary_emb(hidden, positions)
        h = self.layers[0](self.embed_tokens(input_ids), hidden, cos, sin, cache, step)
        kept = h if num_logits is None else h[:, -num_logits:]
        return self.lm_head(self.norm(kept)), h

    def tree_step(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: list[int],
                  tree_visible: torch.Tensor, cache: Eagle3Cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed T tree nodes (decoding, batch 1): input_ids [1, T] their tokens, hidden [1, T, H] the h
        of each node's parent (the state its token was drafted from), positions their positions,
        tree_visible [T, tree entries so far + T] which tree entries each may see (its ancestors and
        itself). Returns (draft-vocab logits [1, T, N], h [1, T, H])."""
        cos, sin = self.rotary_emb(hidden, torch.tensor([positions], device=input_ids.device))
        h = self.layers[0](self.embed_tokens(input_ids), hidden, cos, sin, cache, None, tree_visible)
        return self.lm_head(self.norm(h)), h

    def new_cache(self) -> Eagle3Cache:
        return Eagle3Cache()


# ---------------------------------------------------------------- build / load

def build_eagle3_head(target, vocab: DraftVocab | None = None, aux_layer_ids: list[int] | None = None,
                      intermediate_size: int | None = None, seed: int = 0) -> Eagle3Head:
    """A fresh head for `target`: random layer and fc, the target's embedding shared (frozen), and
    lm_head/norm started from the target's head rows and final norm (a warm start for the logits).
    vocab: the draft vocabulary (default: the whole target vocabulary)."""
    vocab = vocab or DraftVocab.full(target.config.vocab_size)
    config = eagle3_config(target.config, len(vocab), aux_layer_ids, intermediate_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Eagle3Head(config)
    head.set_vocab(vocab)
    param = next(target.parameters())
    head.to(device=param.device, dtype=param.dtype)
    head.embed_tokens.weight = _frozen_share(target.get_input_embeddings().weight)
    with torch.no_grad():
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[vocab.draft_ids.to(param.device)])
        head.norm.weight.copy_(target.model.norm.weight)
    return head.eval()


def load_eagle3_head(directory: str | Path, target) -> Eagle3Head:
    """Load a head from an SGLang-format EAGLE-3 directory (ours, or SpecForge's ``midlayer.*``
    naming); the embedding comes from the checkpoint if it has one, else it is the target's (shared)."""
    from safetensors.torch import load_file

    from .loading import check_safetensors_file

    directory = Path(directory)
    config = LlamaConfig.from_pretrained(directory)
    if not getattr(config, "eagle_config", None):  # SGLang's default capture when none is given
        config.eagle_config = {
            "eagle_aux_hidden_state_layer_ids": default_aux_layer_ids(target.config.num_hidden_layers)}
    config.target_hidden_size = getattr(config, "target_hidden_size", None) or config.hidden_size
    if config.vocab_size != target.config.vocab_size or config.target_hidden_size != target.config.hidden_size:
        raise ValueError(f"{directory}: head for vocab {config.vocab_size} / hidden {config.target_hidden_size}, "
                         f"target has {target.config.vocab_size} / {target.config.hidden_size}")
    check_aux_layer_ids(config.eagle_config["eagle_aux_hidden_state_layer_ids"], target.config.num_hidden_layers)
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        check_safetensors_file(file)  # a truncated file is named, not a bare SafetensorError
        state.update({k.replace("midlayer.", "layers.0."): v for k, v in load_file(str(file)).items()})
    state["t2d"] = state["t2d"].bool()
    head = Eagle3Head(config)
    missing, unexpected = head.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"embed_tokens.weight"}:
        raise ValueError(f"{directory}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
    param = next(target.parameters())
    head.to(device=param.device, dtype=param.dtype)
    if missing:
        head.embed_tokens.weight = _frozen_share(target.get_input_embeddings().weight)
    return head.eval()


def _frozen_share(weight: torch.Tensor) -> nn.Parameter:
    """The target's embedding as the head's: same storage (no copy), never trained."""
    return nn.Parameter(weight.detach(), requires_grad=False)
