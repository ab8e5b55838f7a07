"""Build or load a drafter for a target.

Specs (CLI and YAML):
- ``pruned:K``: a layer-pruned copy of the target: embeddings, its first K decoder layers, the
  final norm and the (shared) head. Starts close to the target at no training cost.
- ``small:layers=2,hidden=256,heads=4,kv_heads=2,intermediate=768``: a small random-init Llama
  over the target's tokenizer (any key may be left out).
- ``eagle3``: a fresh EAGLE-3 head (models/eagle3.py) over the whole target vocabulary, reading
  SGLang's default aux layers; untrained, so only good for trying the pipeline.
- a path or builtin name: a separately trained drafter, checked against the target's tokenizer
  before its weights are loaded. A directory whose config.json names LlamaForCausalLMEagle3 (our
  SGLang export, or a SpecForge checkpoint) loads as an EAGLE-3 head.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .eagle3 import ARCHITECTURE as EAGLE3_ARCHITECTURE
from .eagle3 import Eagle3Head, build_eagle3_head, load_eagle3_head
from .loading import load_model, load_tokenizer, resolve_model_source
from .tokenizer_check import TokenizerMismatchError, check_tokenizers_match


def build_pruned_drafter(target: nn.Module, num_layers: int) -> nn.Module:
    """Copy of ``target`` keeping only its first ``num_layers`` decoder layers."""
    total = target.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"pruned drafter needs 1 <= layers <= {total}, got {num_layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    from transformers import AutoModelForCausalLM

    param = next(target.parameters())
    drafter = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    # Layer i of the drafter is layer i of the target, so the state-dict keys line up one to one.
    kept = {k: v for k, v in target.state_dict().items() if k in drafter.state_dict()}
    drafter.load_state_dict(kept, strict=True)
    return drafter.to(param.device).eval()


SMALL_DEFAULTS = {"layers": 2, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 768}


def build_small_drafter(target: nn.Module, seed: int = 0, **sizes: int) -> nn.Module:
    """A small random-init Llama with the target's vocabulary, special ids and rope settings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    unknown = set(sizes) - set(SMALL_DEFAULTS)
    if unknown:
        raise ValueError(f"small drafter: unknown keys {sorted(unknown)}; known: {sorted(SMALL_DEFAULTS)}")
    s = {**SMALL_DEFAULTS, **sizes}
    t = target.config
    config = LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_parameters=getattr(t, "rope_parameters", None),
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
        tie_word_embeddings=True,
    )
    param = next(target.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drafter = LlamaForCausalLM(config).to(param.dtype)
    return drafter.to(param.device).eval()


def parse_drafter_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``"pruned:2"`` -> ("pruned", {"layers": 2}); ``"small:layers=2,hidden=128"`` -> ("small", {...})."""
    kind, _, rest = spec.partition(":")
    if kind == "pruned":
        if not rest.isdigit():
            raise ValueError(f"drafter spec {spec!r}: expected pruned:K with K a number of layers")
        return "pruned", {"layers": int(rest)}
    if kind == "small":
        sizes = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not value.strip().isdigit():
                raise ValueError(f"drafter spec {spec!r}: expected key=int items, got {item!r}")
            sizes[key.strip()] = int(value)
        return "small", sizes
    if spec == "eagle3":
        return "eagle3", {}
    return "path", {}


def load_drafter(spec: str, target: nn.Module, target_tokenizer) -> nn.Module:
    """Build (pruned/small) or load (path/builtin) a drafter compatible with ``target``."""
    kind, params = parse_drafter_spec(spec)
    if kind == "pruned":
        return build_pruned_drafter(target, params["layers"])
    if kind == "small":
        return build_small_drafter(target, **params)
    if kind == "eagle3":
        return build_eagle3_head(target)
    source = resolve_model_source(spec)
    if _is_eagle3_dir(source):
        if any((source.directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            check_tokenizers_match(target_tokenizer, load_tokenizer(source))
        head = load_eagle3_head(source.directory, target)  # checks vocab and hidden sizes
        head.requires_grad_(False)
        return head
    # Tokenizers first: a mismatched pair is refused before any weight is read.
    check_tokenizers_match(target_tokenizer, load_tokenizer(source))
    param = next(target.parameters())
    drafter = load_model(source, dtype=param.dtype, device=param.device)
    check_vocab_sizes(target, drafter)
    drafter.requires_grad_(False)
    return drafter


def is_eagle3_drafter(spec: str) -> bool:
    """``eagle3``, or a directory holding an EAGLE-3 head (read without loading anything)."""
    kind, _ = parse_drafter_spec(spec)
    return kind == "eagle3" if kind != "path" else _names_eagle3(Path(spec))


def _is_eagle3_dir(source) -> bool:
    return not (source.gguf_file or source.weights_file) and _names_eagle3(source.directory)


def _names_eagle3(directory: Path) -> bool:
    """Whether `directory`/config.json names SGLang's EAGLE-3 architecture."""
    config = directory / "config.json"
    return config.is_file() and EAGLE3_ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or [])


def require_lm_drafter(drafter: nn.Module, what: str) -> None:
    """Refuse an EAGLE-3 head where a causal-LM drafter is trained (the head needs TTT on target features)."""
    if isinstance(drafter, Eagle3Head):
        raise ValueError(f"{what} trains causal-LM drafters; an EAGLE-3 head is trained with TTT on the target's "
                         "hidden states, which this loop does not do (it can be evaluated and served)")


def check_vocab_sizes(target: nn.Module, drafter: nn.Module) -> None:
    vt, vd = target.config.vocab_size, drafter.config.vocab_size
    if vt != vd:
        raise TokenizerMismatchError(f"logit sizes differ: target vocab_size {vt}, drafter vocab_size {vd}")
