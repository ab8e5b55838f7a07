"""Export an EAGLE-3 head for SGLang and for vLLM (speculators format).

SGLang:
    python -m sglang.launch_server --model-path TARGET --speculative-algorithm EAGLE3 \\
        --speculative-draft-model-path DRAFT_DIR --speculative-num-steps 3 \\
        --speculative-eagle-topk 1 --speculative-num-draft-tokens 4
vLLM:
    vllm serve TARGET --speculative-config '{"model": "DRAFT_DIR", "num_speculative_tokens": 3}'
    (a speculators-format directory is recognised by its speculators_model_type; or serve DRAFT_DIR
    directly, which names its verifier)

Both read the same safetensors, the head's state dict without the embedding:
    fc.weight [H, 3H]   layers.0.{input_layernorm,hidden_norm,post_attention_layernorm}.weight [H]
    layers.0.self_attn.{q,k,v}_proj.weight [heads*d | kv_heads*d, 2H]   layers.0.self_attn.o_proj.weight
    layers.0.mlp.{gate,up,down}_proj.weight   norm.weight [H]   lm_head.weight [N, H]
    d2t int64 [N]   t2d bool [V]
- SGLang (srt/models/llama_eagle3.py, LlamaForCausalLMEagle3.load_weights) stacks q/k/v and
  gate/up, prefixes "model." where needed, maps the legacy "midlayer" to "layers.0", turns d2t into
  hot_token_id = d2t + arange, skips t2d; its EAGLE worker (speculative/eagle_worker_v2.py,
  init_lm_head -> set_embed) then takes the embedding from the target, so it is left out.
- vLLM (model_executor/models/llama_eagle3.py, Eagle3LlamaForCausalLM.load_weights) prefixes
  "model." to everything but lm_head (so the names must NOT already carry it), loads d2t as
  draft_id_to_target_id, skips t2d, and shares the target's embedding when none is given.

Configs differ in one easily missed point, the aux layer ids (same target states, two numberings):
- SGLang ``eagle_config.eagle_aux_hidden_state_layer_ids`` = layer whose OUTPUT is captured
  (models/llama.py, set_eagle3_layers_to_capture: capture at the input of id + 1). This is the head's own.
- vLLM/speculators ``eagle_aux_hidden_state_layer_ids`` = layer whose INPUT is captured (vLLM
  models/llama.py appends hidden_states + residual before running layer idx; speculators' default
  [2, N//2, N-3] is SGLang's default capture). So the speculators export writes ids + 1.
And vLLM's speculators loader defaults ``norm_before_residual`` to True when it is absent
(transformers_utils/configs/speculators/algos.py, update_eagle3), unlike SGLang/SpecForge and this
head (residual = un-normalised hidden): the export writes false explicitly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from draftdistill.models.eagle3 import ARCHITECTURE, Eagle3Head


def eagle3_state_dict(head: Eagle3Head, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors both servers load (see the module docstring): floats cast to `dtype`, d2t int64,
    t2d bool, no embedding."""
    state = {}
    for name, tensor in head.state_dict().items():
        if name == "embed_tokens.weight":
            continue
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.to(dtype)
        state[name] = tensor.detach().to("cpu").contiguous()
    state["d2t"], state["t2d"] = state["d2t"].long(), state["t2d"].bool()
    return state


def sglang_eagle3_config(head: Eagle3Head, dtype: torch.dtype | None = None) -> dict:
    """config.json for SGLang: a Llama config with architectures [LlamaForCausalLMEagle3],
    num_hidden_layers 1, draft_vocab_size, target_hidden_size and eagle_config (aux layer ids)."""
    config = head.config.to_dict()
    config["architectures"] = [ARCHITECTURE]
    config["dtype"] = str(dtype or head.fc.weight.dtype).removeprefix("torch.")
    return config


def speculators_eagle3_config(head: Eagle3Head, verifier_name_or_path: str, speculative_tokens: int = 3,
                              verifier_architectures: list[str] | None = None,
                              dtype: torch.dtype | None = None) -> dict:
    """config.json in the speculators format (vLLM: transformers_utils/configs/speculators)."""
    dtype_name = str(dtype or head.fc.weight.dtype).removeprefix("torch.")
    layer = head.config.to_dict()
    for key in ("architectures", "draft_vocab_size", "target_hidden_size", "eagle_config"):
        layer.pop(key, None)  # top-level fields of the speculators config, not the layer's
    layer["dtype"] = dtype_name
    rope = layer.get("rope_parameters") or {}
    if "rope_theta" in rope:  # older transformers (and so older vLLM) read it at the top level
        layer.setdefault("rope_theta", rope["rope_theta"])
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer,
        "draft_vocab_size": head.config.draft_vocab_size,
        "target_hidden_size": head.config.target_hidden_size,
        "norm_before_residual": False,  # vLLM assumes True when absent; this head adds the raw hidden
        "norm_before_fc": False,
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in head.aux_layer_ids],  # vLLM: input of layer id
        "embed_requires_grad": False,
        "dtype": dtype_name,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_name_or_path, "architectures": list(verifier_architectures or [])},
        },
    }


def export_sglang_eagle3(directory: str | Path, head: Eagle3Head, tokenizer=None,
                         dtype: torch.dtype | None = None) -> Path:
    """Write `head` for ``--speculative-algorithm EAGLE3 --speculative-draft-model-path DIR``.
    The tokenizer (optional) lets ``load_drafter`` check it against a target's before loading."""
    return _write(directory, sglang_eagle3_config(head, dtype), eagle3_state_dict(head, dtype), tokenizer)


def export_speculators_eagle3(directory: str | Path, head: Eagle3Head, verifier_name_or_path: str,
                              speculative_tokens: int = 3, verifier_architectures: list[str] | None = None,
                              tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write `head` in the speculators format vLLM loads as method "eagle3"."""
    config = speculators_eagle3_config(head, verifier_name_or_path, speculative_tokens, verifier_architectures, dtype)
    return _write(directory, config, eagle3_state_dict(head, dtype), tokenizer)


def _write(directory: str | Path, config: dict, state: dict, tokenizer) -> Path:
    """config.json + model.safetensors (+ tokenizer), written atomically."""
    from safetensors.torch import save_file

    from draftdistill.train.checkpoint import atomic_directory  # here: serving need not import the trainers

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory
