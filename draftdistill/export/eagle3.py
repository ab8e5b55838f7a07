"""EAGLE-3 heads for SGLang and for vLLM (speculators format).

SGLang:
    python -m sglang.launch_server --model-path TARGET --speculative-algorithm EAGLE3 \\
        --speculative-draft-model-path DRAFT_DIR --speculative-num-steps 3 \\
        --speculative-eagle-topk 1 --speculative-num-draft-tokens 4
vLLM:
    vllm serve TARGET --speculative-config '{"method": "eagle3", "model": "DRAFT_DIR", "num_speculative_tokens": 3}'
    (a speculators-format directory is recognised by its speculators_model_type; or serve DRAFT_DIR
    directly, which names its verifier)

Both read the same tensors (the head's state dict, SGLang's names):
    fc.weight [H, 3H]   layers.0.{input_layernorm,hidden_norm,post_attention_layernorm}.weight [H]
    layers.0.self_attn.{q,k,v}_proj.weight [heads*d | kv_heads*d, 2H]   layers.0.self_attn.o_proj.weight
    layers.0.mlp.{gate,up,down}_proj.weight   norm.weight [H]   lm_head.weight [N, H]
    d2t int64 [N] (draft id i -> target id i + d2t[i])   t2d bool [V]
- SGLang (srt/models/llama_eagle3.py, LlamaForCausalLMEagle3.load_weights) stacks q/k/v and
  gate/up, prefixes "model." where needed, maps the legacy "midlayer" to "layers.0", turns d2t into
  hot_token_id = d2t + arange, skips t2d; its EAGLE worker (speculative/eagle_worker_v2.py,
  init_lm_head -> set_embed) then takes the embedding from the target, so the SGLang export leaves
  it out.
- vLLM (model_executor/models/llama_eagle3.py, Eagle3LlamaForCausalLM.load_weights) prefixes
  "model." to everything but lm_head (so the names must NOT already carry it), loads d2t as
  draft_id_to_target_id and skips t2d. The speculators export also carries ``embed_tokens.weight``
  [V, H] (the target's embedding): speculators' own loader (Eagle3DraftModel, DraftVocabMixin)
  otherwise starts the embedding as NaN and fills it only when it can open the verifier.

Configs differ in one easily missed point, the aux layer ids (same target states, two numberings):
- SGLang ``eagle_config.eagle_aux_hidden_state_layer_ids`` = layer whose OUTPUT is captured
  (models/llama.py, set_eagle3_layers_to_capture: capture at the input of id + 1). This is the head's own.
- vLLM/speculators ``eagle_aux_hidden_state_layer_ids`` = layer whose INPUT is captured (vLLM
  models/llama.py appends hidden_states + residual before running layer idx; speculators' default
  [2, N//2, N-3] is SGLang's default capture). So the speculators export writes ids + 1.
And vLLM's speculators loader defaults ``norm_before_residual`` to True when it is absent
(transformers_utils/configs/speculators/algos.py, update_eagle3), unlike SGLang/SpecForge and this
head (residual = un-normalised hidden): the export writes false explicitly.

``Eagle3Checkpoint`` is the one in-memory form every reader (convert.py) produces and both writers
take, so a trained head and a converted checkpoint are written by the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import ExportError, atomic_directory, copy_tokenizer_files, dtype_name, write_json

ARCHITECTURE = "LlamaForCausalLMEagle3"  # SGLang's (and SpecForge's) class name; loaders key on it
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"
LAYER = "layers.0."
REQUIRED_TENSORS = ("fc.weight", "norm.weight", "lm_head.weight", *(LAYER + name for name in (
    "input_layernorm.weight", "hidden_norm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")))
VOCAB_TENSORS = ("d2t", "t2d")
EMBED = "embed_tokens.weight"
# Top-level fields of the SGLang config that are not the decoder layer's (speculators keeps them apart).
HEAD_FIELDS = ("architectures", "draft_vocab_size", "target_hidden_size", "eagle_config")


@dataclass
class Eagle3Checkpoint:
    """An EAGLE-3 head on its way to disk.

    config: the SGLang config as a dict (a Llama config with num_hidden_layers 1, draft_vocab_size,
        target_hidden_size and, when known, eagle_config.eagle_aux_hidden_state_layer_ids in the
        head's numbering: the layer whose output is captured).
    tensors: REQUIRED_TENSORS + d2t (int64) + t2d (bool), SGLang's names, no embedding.
    embed: the embedding [V, H] (the target's), when known; only the vLLM export writes it.
    verifier, verifier_architectures: the target a speculators checkpoint named, if any.
    tokenizer_dir: where tokenizer files to copy along live, if any.
    """

    config: dict
    tensors: dict[str, torch.Tensor]
    embed: torch.Tensor | None = None
    verifier: str | None = None
    verifier_architectures: list[str] = field(default_factory=list)
    tokenizer_dir: Path | None = None

    @property
    def aux_layer_ids(self) -> list[int] | None:
        ids = (self.config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        return None if ids is None else [int(i) for i in ids]

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["fc.weight"].dtype

    def check(self, where: str = "EAGLE-3 checkpoint") -> None:
        """Shapes agree with each other and with the config; raise ExportError naming what does not."""
        t, c = self.tensors, self.config
        missing = [k for k in (*REQUIRED_TENSORS, *VOCAB_TENSORS) if k not in t]
        missing_fields = [k for k in ("hidden_size", "draft_vocab_size", "vocab_size") if not c.get(k)]
        if missing or missing_fields:
            raise ExportError(f"{where}: missing tensors {missing}, config fields {missing_fields}")
        H, N, V = c["hidden_size"], c["draft_vocab_size"], c["vocab_size"]
        problems = []
        if tuple(t["lm_head.weight"].shape) != (N, H):
            problems.append(f"lm_head.weight {tuple(t['lm_head.weight'].shape)} != (draft_vocab_size {N}, hidden {H})")
        if tuple(t["d2t"].shape) != (N,) or tuple(t["t2d"].shape) != (V,):
            problems.append(f"d2t {tuple(t['d2t'].shape)} / t2d {tuple(t['t2d'].shape)} != ({N},) / ({V},)")
        elif int(t["t2d"].sum()) != N or not torch.equal(torch.nonzero(t["t2d"]).flatten(),
                                                          (t["d2t"].long() + torch.arange(N)).sort().values):
            problems.append("d2t and t2d name different draft vocabularies")
        if t["fc.weight"].shape[0] != H or t["fc.weight"].shape[1] % (c.get("target_hidden_size") or H):
            problems.append(f"fc.weight {tuple(t['fc.weight'].shape)} does not map k * target_hidden_size -> {H}")
        if t[LAYER + "self_attn.q_proj.weight"].shape[1] != 2 * H:
            width = t[LAYER + "self_attn.q_proj.weight"].shape[1]
            problems.append(f"q_proj reads {width} features, EAGLE-3 needs 2 * {H}")
        if self.embed is not None and tuple(self.embed.shape) != (V, H):
            problems.append(f"embed_tokens {tuple(self.embed.shape)} != (vocab {V}, hidden {H})")
        if problems:
            raise ExportError(f"{where}: " + "; ".join(problems))


def checkpoint_from_head(head) -> Eagle3Checkpoint:
    """A trained Eagle3Head (models/eagle3.py) as an Eagle3Checkpoint; the embedding is the head's
    (shared with the target)."""
    config = head.config.to_dict()
    config["architectures"] = [ARCHITECTURE]
    tensors = {k: v.detach() for k, v in head.state_dict().items() if k != EMBED}
    return Eagle3Checkpoint(config, tensors, embed=head.embed_tokens.weight.detach())


# ---------------------------------------------------------------- the two formats

def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.to(dtype)
        state[name] = tensor.detach().to("cpu").contiguous()
    state["d2t"], state["t2d"] = state["d2t"].long(), state["t2d"].bool()
    return state


def checkpoint_state_dict(ckpt: Eagle3Checkpoint, dtype: torch.dtype | None = None,
                          with_embed: bool = False) -> dict[str, torch.Tensor]:
    """The tensors to save: floats cast to `dtype`, d2t int64, t2d bool; the embedding only when asked."""
    tensors = dict(ckpt.tensors)
    if with_embed:
        if ckpt.embed is None:
            raise ExportError("the vLLM (speculators) export carries embed_tokens.weight, and this head has none: "
                              "pass the target (--target) so its embedding can be read")
        tensors[EMBED] = ckpt.embed
    return _cast(tensors, dtype)


def sglang_config(ckpt: Eagle3Checkpoint, dtype: torch.dtype | None = None) -> dict:
    """config.json for SGLang: the Llama config with architectures [LlamaForCausalLMEagle3],
    num_hidden_layers 1, tie_word_embeddings false, draft_vocab_size, target_hidden_size and
    eagle_config (when the aux layer ids are known; SGLang's default capture otherwise)."""
    config = dict(ckpt.config)
    config["architectures"] = [ARCHITECTURE]
    config["num_hidden_layers"] = 1
    config["tie_word_embeddings"] = False  # else SGLang makes lm_head the (full-vocabulary) embedding
    config.setdefault("target_hidden_size", config["hidden_size"])
    config["dtype"] = dtype_name(dtype or ckpt.dtype)
    if "torch_dtype" in config:  # older transformers' name for the same field
        config["torch_dtype"] = config["dtype"]
    return config


def speculators_config(ckpt: Eagle3Checkpoint, verifier_name_or_path: str, speculative_tokens: int = 3,
                       verifier_architectures: list[str] | None = None, dtype: torch.dtype | None = None) -> dict:
    """config.json in the speculators format (vLLM: transformers_utils/configs/speculators; speculators:
    models/eagle3/config.py Eagle3SpeculatorConfig)."""
    name = dtype_name(dtype or ckpt.dtype)
    layer = {k: v for k, v in ckpt.config.items() if k not in HEAD_FIELDS and k != "torch_dtype"}
    layer["dtype"] = name
    layer["num_hidden_layers"] = 1
    layer["tie_word_embeddings"] = False
    rope = layer.get("rope_parameters") or {}
    if "rope_theta" in rope:  # older transformers (and so older vLLM) read it at the top level
        layer.setdefault("rope_theta", rope["rope_theta"])
    config = {
        "architectures": [SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer,
        "draft_vocab_size": ckpt.config["draft_vocab_size"],
        "target_hidden_size": ckpt.config.get("target_hidden_size") or ckpt.config["hidden_size"],
        "norm_before_residual": False,  # vLLM assumes True when absent; this head adds the raw hidden
        "norm_before_fc": False,
        "embed_requires_grad": False,
        "dtype": name,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_name_or_path, "architectures": list(verifier_architectures or [])},
        },
    }
    if ckpt.aux_layer_ids is not None:  # absent: vLLM's default capture, which is SGLang's
        config["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in ckpt.aux_layer_ids]  # vLLM: input of layer id
    return config


def write_sglang_eagle3(directory: str | Path, ckpt: Eagle3Checkpoint, tokenizer=None,
                        dtype: torch.dtype | None = None) -> Path:
    ckpt.check()
    state = checkpoint_state_dict(ckpt, dtype)
    return _write(directory, sglang_config(ckpt, dtype), state, tokenizer, ckpt.tokenizer_dir)


def write_speculators_eagle3(directory: str | Path, ckpt: Eagle3Checkpoint, verifier_name_or_path: str,
                             speculative_tokens: int = 3, verifier_architectures: list[str] | None = None,
                             tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    ckpt.check()
    config = speculators_config(ckpt, verifier_name_or_path, speculative_tokens, verifier_architectures, dtype)
    state = checkpoint_state_dict(ckpt, dtype, with_embed=True)
    return _write(directory, config, state, tokenizer, ckpt.tokenizer_dir)


def _write(directory: str | Path, config: dict, state: dict, tokenizer, tokenizer_dir: Path | None) -> Path:
    """config.json + model.safetensors (+ tokenizer), written atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_json(tmp / "config.json", config)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)
    return directory


# ---------------------------------------------------------------- a trained head (the trainers' API)

def eagle3_state_dict(head, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors SGLang loads (see the module docstring): floats cast to `dtype`, d2t int64,
    t2d bool, no embedding."""
    return checkpoint_state_dict(checkpoint_from_head(head), dtype)


def sglang_eagle3_config(head, dtype: torch.dtype | None = None) -> dict:
    return sglang_config(checkpoint_from_head(head), dtype)


def speculators_eagle3_config(head, verifier_name_or_path: str, speculative_tokens: int = 3,
                              verifier_architectures: list[str] | None = None,
                              dtype: torch.dtype | None = None) -> dict:
    return speculators_config(checkpoint_from_head(head), verifier_name_or_path, speculative_tokens,
                              verifier_architectures, dtype)


def export_sglang_eagle3(directory: str | Path, head, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write `head` for ``--speculative-algorithm EAGLE3 --speculative-draft-model-path DIR``.
    The tokenizer (optional) lets ``load_drafter`` check it against a target's before loading."""
    return write_sglang_eagle3(directory, checkpoint_from_head(head), tokenizer, dtype)


def export_speculators_eagle3(directory: str | Path, head, verifier_name_or_path: str,
                              speculative_tokens: int = 3, verifier_architectures: list[str] | None = None,
                              tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write `head` in the speculators format vLLM loads as method "eagle3" (embedding included)."""
    return write_speculators_eagle3(directory, checkpoint_from_head(head), verifier_name_or_path, speculative_tokens,
                                    verifier_architectures, tokenizer, dtype)
