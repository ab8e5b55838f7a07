"""Every export in one place: the files a server loads, written from a trained model or converted
from any drafter directory (``draftdistill export SRC OUT --format hf|sglang|vllm``).

- hf (hf.py): a standalone drafter as a plain HF directory.
    SGLang: --speculative-algorithm STANDALONE --speculative-draft-model-path OUT
    vLLM:   speculative_config={"method": "draft_model", "model": OUT, ...}
- sglang (eagle3.py): an EAGLE-3 head as SGLang's LlamaForCausalLMEagle3.
    SGLang: --speculative-algorithm EAGLE3 --speculative-draft-model-path OUT
- vllm (eagle3.py): an EAGLE-3 head in vLLM's speculators format (embedding included).
    vLLM:   speculative_config={"method": "eagle3", "model": OUT, ...}

convert.py reads our directories, SpecForge and speculators checkpoints and training runs' OUT_DIRs.
This package imports torch, transformers, safetensors and draftdistill.models only: the trainers
(train/, opd/) and serving/ import it, never the other way round.
"""
from .convert import FORMATS, Source, convert, detect, read_eagle3, read_hf, resolve_target
from .eagle3 import (Eagle3Checkpoint, checkpoint_from_head, eagle3_state_dict, export_sglang_eagle3,
                     export_speculators_eagle3, sglang_eagle3_config, speculators_eagle3_config, write_sglang_eagle3,
                     write_speculators_eagle3)
from .files import ExportError, atomic_directory
from .hf import check_standalone_compatible, export_hf, export_standalone_drafter, plain_copy, write_hf

__all__ = [
    "FORMATS", "Source", "convert", "detect", "read_eagle3", "read_hf", "resolve_target",
    "Eagle3Checkpoint", "checkpoint_from_head", "eagle3_state_dict", "export_sglang_eagle3",
    "export_speculators_eagle3",
    "sglang_eagle3_config", "speculators_eagle3_config", "write_sglang_eagle3", "write_speculators_eagle3",
    "ExportError", "atomic_directory",
    "check_standalone_compatible", "export_hf", "export_standalone_drafter", "plain_copy", "write_hf",
]
