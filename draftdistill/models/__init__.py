"""Load targets and drafters; refuse pairs whose tokenizers differ."""
from .builtin import BUILTIN_MODELS, ensure_builtin
from .drafters import (build_pruned_drafter, build_small_drafter, is_eagle3_drafter, load_drafter, parse_drafter_spec,
                       require_lm_drafter)
from .loading import default_device, load_model, load_target, load_tokenizer, resolve_model_source
from .tokenizer_check import TokenizerMismatchError, check_tokenizers_match

__all__ = [
    "BUILTIN_MODELS", "ensure_builtin", "build_pruned_drafter", "build_small_drafter", "is_eagle3_drafter",
    "load_drafter",
    "parse_drafter_spec", "require_lm_drafter", "default_device", "load_model", "load_target", "load_tokenizer",
    "resolve_model_source", "TokenizerMismatchError", "check_tokenizers_match",
]
