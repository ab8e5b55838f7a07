"""Convert any drafter we train or load into the directory a server loads (``draftdistill export``).

Sources, told apart by their files (``detect``):
- ``hf``: a standalone causal-LM drafter, a plain HF directory (config.json + *.safetensors +
  tokenizer), e.g. a drafter trainer's OUT_DIR/best.
- ``sglang``: an EAGLE-3 head in SGLang's format (config architectures [LlamaForCausalLMEagle3],
  tensors fc / layers.0.* / norm / lm_head / d2t / t2d), e.g. the EAGLE-3 trainer's OUT_DIR/best.
- ``specforge``: a SpecForge EAGLE-3 checkpoint: the same config and tensors, but the decoder layer is
  named ``midlayer.*`` (specforge/modeling/draft/llama3_eagle.py, LlamaForCausalLMEagle3) and the
  embedding may be included. d2t/t2d follow the same convention (d2t[i] = target id - i, draft ids
  sorted; t2d a bool mask), eagle_config may be absent (SGLang's default capture).
- ``speculators``: vLLM's speculators format (config speculators_model_type "eagle3",
  transformer_layer_config, eagle_aux_hidden_state_layer_ids numbered as the INPUT of a layer, i.e.
  ours + 1; tensors as SGLang's plus embed_tokens, and no d2t/t2d when the draft vocabulary is the
  whole vocabulary).
- ``checkpoint``: a training run's OUT_DIR (or OUT_DIR/checkpoint): drafter.safetensors +
  trainer_state.json; the architecture and tokenizer come from OUT_DIR/best (or final), written at the
  run's first evaluation, and the run's config.json names the target.

Formats (``FORMATS``): ``hf`` for standalone drafters; ``sglang`` and ``vllm`` for EAGLE-3 heads.
Weights are read from safetensors only: pickle-based files (.bin, .pt, ...) and sharded DCP
checkpoints (whose metadata is pickled) are refused, never loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .eagle3 import (ARCHITECTURE, EMBED, LAYER, REQUIRED_TENSORS, VOCAB_TENSORS, Eagle3Checkpoint,
                     write_sglang_eagle3, write_speculators_eagle3)
from .files import (DTYPES, PICKLE_SUFFIXES, TOKENIZER_FILES, ExportError, load_one_tensor, load_tensors, read_json,
                    refuse_pickles, safetensors_files, tensor_names)
from .hf import _cast_copy, check_standalone_compatible, write_hf

FORMATS = {
    "hf": "a plain HF directory: SGLang --speculative-algorithm STANDALONE --speculative-draft-model-path OUT; "
          "vLLM speculative_config {\"method\": \"draft_model\", \"model\": OUT, ...}",
    "sglang": "SGLang's EAGLE-3 format: --speculative-algorithm EAGLE3 --speculative-draft-model-path OUT",
    "vllm": "vLLM's speculators format: speculative_config {\"method\": \"eagle3\", \"model\": OUT, ...}",
}
EAGLE3_KINDS = ("sglang", "specforge", "speculators")
EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight",
               "language_model.model.embed_tokens.weight")
IGNORED = ("verifier_lm_head.weight", "verifier_norm.weight")  # speculators' training-only copies of the target's


@dataclass
class Source:
    kind: str  # hf | sglang | specforge | speculators | checkpoint
    path: Path  # the directory holding config.json (for a checkpoint: the checkpoint directory)
    config: dict
    weight_files: list[Path]
    run_dir: Path | None = None  # checkpoint: the run's OUT_DIR
    skeleton: "Source | None" = None  # checkpoint: the exported directory giving its architecture


def _keys(names, limit: int = 40) -> str:
    names = sorted(names)
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------- detection

def detect(src: str | Path) -> Source:
    """What `src` is (see the module docstring), read from config.json and tensor names only."""
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ExportError(f"{path}: a pickle-based file ({path.suffix}); loading it could run arbitrary code, "
                              "so it is refused. Save the weights as .safetensors and export that")
        if path.suffix != ".safetensors":
            raise ExportError(f"{path}: expected a directory (config.json + *.safetensors) or a .safetensors file")
        path = path.parent
    checkpoint = _checkpoint_dir(path)
    if checkpoint is not None:
        return _detect_checkpoint(checkpoint)
    refuse_pickles(path)
    if not (path / "config.json").is_file():
        raise ExportError(f"{path}: no config.json (files: {_keys(p.name for p in path.iterdir())}); "
                          "expected an HF drafter, an EAGLE-3 head (SGLang, SpecForge or speculators format) "
                          "or a training run's OUT_DIR")
    config = read_json(path / "config.json")
    files = safetensors_files(path)
    if not files:
        raise ExportError(f"{path}: no .safetensors weights")
    names = tensor_names(files)
    architectures = config.get("architectures") or []
    if "speculators_model_type" in config:
        if config["speculators_model_type"] != "eagle3":
            raise ExportError(f"{path / 'config.json'}: speculators_model_type {config['speculators_model_type']!r}; "
                              "only EAGLE-3 (\"eagle3\") speculators convert")
        return Source("speculators", path, config, files)
    if any(_strip_model(n).startswith("midlayer.") for n in names):
        return Source("specforge", path, config, files)
    if ARCHITECTURE in architectures or any(n.endswith("hidden_norm.weight") for n in names):
        return Source("sglang", path, config, files)
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        return Source("hf", path, config, files)
    raise ExportError(f"{path}: unknown layout: config.json architectures {architectures}, tensors in "
                      f"{', '.join(f.name for f in files)}: {_keys(names)}. Expected an HF causal LM, or an EAGLE-3 "
                      "head (fc, layers.0.* or midlayer.*, norm, lm_head, d2t, t2d)")


def _checkpoint_dir(path: Path) -> Path | None:
    for candidate in (path / "checkpoint", path):
        if (candidate / "trainer_state.json").is_file():
            return candidate
    return None


def _detect_checkpoint(checkpoint: Path) -> Source:
    """As train/checkpoint.py writes it: trainer_state.json's "format" says safetensors or DCP (older
    states without it: safetensors when drafter.safetensors is there)."""
    run_dir = checkpoint.parent
    state = read_json(checkpoint / "trainer_state.json")
    fmt = state.get("format") or ("safetensors" if (checkpoint / "drafter.safetensors").is_file() else "dcp")
    if fmt != "safetensors":
        raise ExportError(f"{checkpoint}: a sharded torch.distributed.checkpoint (DCP), whose metadata is pickled, so "
                          f"it is refused here; export {run_dir / 'best'} instead (safetensors, written by every run)")
    weights = checkpoint / "drafter.safetensors"
    if not weights.is_file():
        raise ExportError(f"{checkpoint}: trainer_state.json but no drafter.safetensors")
    run_config = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    skeleton = None
    for candidate in _skeleton_candidates(run_dir, run_config):
        try:
            skeleton = detect(candidate)
            break
        except (ExportError, FileNotFoundError):
            continue
    if skeleton is None or skeleton.kind == "checkpoint":
        raise ExportError(f"{checkpoint}: cannot tell the drafter's architecture: it comes from OUT_DIR/best (or "
                          f"final), written at the run's first evaluation, and {run_dir} has none; the run config's "
                          "drafter (or student) is not a directory or builtin name either")
    return Source("checkpoint", checkpoint, run_config, [weights], run_dir=run_dir, skeleton=skeleton)


def _skeleton_candidates(run_dir: Path, run_config: dict) -> list[Path]:
    """OUT_DIR/best, OUT_DIR/final, then the run's starting drafter (or OPD student) when it is a directory
    or a builtin name (same architecture: training changes weights only)."""
    from draftdistill.models.builtin import BUILTIN_MODELS, ensure_builtin

    candidates = [run_dir / "best", run_dir / "final"]
    for key in ("drafter", "student"):
        value = run_config.get(key)
        if isinstance(value, str) and Path(value).expanduser().is_dir():
            candidates.append(Path(value).expanduser())
        elif value in BUILTIN_MODELS and not any(c.is_dir() for c in candidates):
            candidates.append(ensure_builtin(value))
    return [c for c in candidates if c.is_dir()]


# ---------------------------------------------------------------- EAGLE-3 readers

def _strip_model(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def eagle3_tensors(state: dict[str, torch.Tensor], where: str, config: dict) -> tuple[dict, torch.Tensor | None]:
    """Normalise an EAGLE-3 state dict to SGLang's names (midlayer.* -> layers.0.*, "model." prefixes
    dropped), check it and return (tensors, embedding or None)."""
    tensors, seen = {}, sorted(state)
    for name, tensor in state.items():
        name = _strip_model(name)
        if name.startswith("midlayer."):
            name = LAYER + name[len("midlayer."):]
        if name in IGNORED:
            continue
        tensors[name] = tensor
    embed = tensors.pop(EMBED, None)
    extra_layers = sorted({n.split(".")[1] for n in tensors if n.startswith("layers.") and not n.startswith(LAYER)})
    if extra_layers:
        raise ExportError(f"{where}: decoder layers {['0', *extra_layers]}; SGLang's LlamaForCausalLMEagle3 and this "
                          "exporter handle one-layer EAGLE-3 heads only")
    if "input_norm.weight" in tensors:
        raise ExportError(f"{where}: input_norm.weight (speculators' norm_before_fc); SGLang's EAGLE-3 head has no "
                          "norm before fc, so this head cannot be converted")
    unknown = sorted(set(tensors) - {*REQUIRED_TENSORS, *VOCAB_TENSORS})
    missing = [k for k in REQUIRED_TENSORS if k not in tensors]
    if unknown or missing:
        raise ExportError(f"{where}: not an EAGLE-3 head of the expected layout (missing {missing}, unexpected "
                          f"{unknown}); tensors seen: {_keys(seen)}")
    draft_vocab = tensors["lm_head.weight"].shape[0]
    vocab = config.get("vocab_size")
    if "d2t" not in tensors and "t2d" not in tensors:
        if vocab is not None and draft_vocab != vocab:
            raise ExportError(f"{where}: no d2t/t2d, yet lm_head has {draft_vocab} rows for a vocabulary of {vocab}")
        tensors["d2t"] = torch.zeros(draft_vocab, dtype=torch.long)  # the whole vocabulary, in order
        tensors["t2d"] = torch.ones(draft_vocab, dtype=torch.bool)
    elif "d2t" not in tensors or "t2d" not in tensors:
        raise ExportError(f"{where}: has only one of d2t and t2d")
    tensors["d2t"], tensors["t2d"] = tensors["d2t"].long(), tensors["t2d"].bool()
    return tensors, embed


def _sglang_like_config(config: dict, tensors: dict, where) -> dict:
    config = dict(config)
    missing = [k for k in ("vocab_size", "hidden_size") if not config.get(k)]
    if missing:
        raise ExportError(f"{where}: config.json has no {missing}")
    config["draft_vocab_size"] = config.get("draft_vocab_size") or tensors["lm_head.weight"].shape[0]
    config["target_hidden_size"] = config.get("target_hidden_size") or config["hidden_size"]
    return config


def _eagle3_config(source: Source) -> dict:
    """The SGLang config of an sglang / specforge / speculators directory (config.json only)."""
    if source.kind == "speculators":
        return _speculators_to_sglang(source)
    if source.kind in ("sglang", "specforge"):
        return source.config
    raise ExportError(f"{source.path}: a {source.kind} drafter, not an EAGLE-3 head")


def read_eagle3(source: Source) -> Eagle3Checkpoint:
    """An sglang / specforge / speculators directory, or a checkpoint of an EAGLE-3 run, as an Eagle3Checkpoint."""
    where = ", ".join(str(f) for f in source.weight_files)
    described = source.skeleton if source.kind == "checkpoint" else source  # config, tokenizer, verifier
    if described.kind not in EAGLE3_KINDS:
        raise ExportError(f"{source.path}: holds a {described.kind} drafter, not an EAGLE-3 head")
    config = _eagle3_config(described)
    tensors, embed = eagle3_tensors(load_tensors(source.weight_files), where, config)
    config = _sglang_like_config(config, tensors, described.path / "config.json")
    verifier = ((described.config.get("speculators_config") or {}).get("verifier") or {}) \
        if described.kind == "speculators" else {}
    ckpt = Eagle3Checkpoint(config, tensors, embed, verifier.get("name_or_path"),
                            list(verifier.get("architectures") or []), _tokenizer_dir(described.path))
    ckpt.check(where)
    return ckpt


def _speculators_to_sglang(source: Source) -> dict:
    """The speculators config as SGLang's: the layer config with the head fields beside it, aux layer
    ids moved to our numbering (output of layer = speculators' id - 1)."""
    from transformers import LlamaConfig

    config, where = source.config, source.path / "config.json"
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ExportError(f"{where}: no transformer_layer_config")
    if layer.get("model_type", "llama") != "llama":
        raise ExportError(f"{where}: a {layer['model_type']!r} decoder layer; SGLang's EAGLE-3 head is a Llama layer")
    if config.get("norm_before_residual"):
        raise ExportError(f"{where}: norm_before_residual is true (the residual is the normalised hidden state); "
                          "SGLang's and this head's residual is the raw hidden state, so it cannot be converted")
    if config.get("norm_before_fc"):
        raise ExportError(f"{where}: norm_before_fc is true; SGLang's EAGLE-3 head has no norm before fc")
    # speculators saves the layer as to_diff_dict (defaults left out): LlamaConfig restores them.
    out = LlamaConfig(**{k: v for k, v in layer.items() if k != "architectures"}).to_dict()
    out.pop("architectures", None)
    out["architectures"] = [ARCHITECTURE]
    out["num_hidden_layers"] = 1
    out["tie_word_embeddings"] = False
    out["draft_vocab_size"] = config.get("draft_vocab_size", out["vocab_size"])
    out["target_hidden_size"] = config.get("target_hidden_size") or out["hidden_size"]
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    if ids is not None:
        if any(int(i) < 1 for i in ids):
            raise ExportError(f"{where}: eagle_aux_hidden_state_layer_ids {ids} capture the input of layer 0 (the "
                              "embeddings), which SGLang's numbering (output of a layer) cannot express")
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [int(i) - 1 for i in ids],
                               "use_aux_hidden_state": True}
    return out


# ---------------------------------------------------------------- HF (standalone) readers

def read_hf(source: Source):
    """(model, tokenizer directory or None) for an hf source or a checkpoint of a standalone drafter."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if source.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(str(source.path), use_safetensors=True, dtype="auto")
        return model.eval(), _tokenizer_dir(source.path)
    if source.kind != "checkpoint" or source.skeleton.kind != "hf":
        kind = source.skeleton.kind if source.kind == "checkpoint" else source.kind
        raise ExportError(f"{source.path}: an EAGLE-3 head ({kind} format), not a standalone drafter: export it "
                          "with --format sglang or --format vllm")
    skeleton = source.skeleton.path
    config = AutoConfig.from_pretrained(str(skeleton))
    weights = load_tensors(source.weight_files)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(weights, assign=True, strict=False)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing or unexpected:
        raise ExportError(f"{source.weight_files[0]}: does not match the architecture of {skeleton} (missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]})")
    floats = [t.dtype for t in weights.values() if t.is_floating_point()]
    model.config.dtype = floats[0] if floats else torch.float32
    if (skeleton / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(skeleton))
    return model, _tokenizer_dir(skeleton)


def _tokenizer_dir(path: Path) -> Path | None:
    return path if any((path / f).is_file() for f in TOKENIZER_FILES) else None


# ---------------------------------------------------------------- the target

@dataclass
class Target:
    name_or_path: str  # what a server is told (a builtin name resolves to its directory)
    directory: Path
    config: dict
    weight_files: list[Path]

    def embedding(self) -> torch.Tensor:
        found = load_one_tensor(self.weight_files, EMBED_NAMES)
        if found is None:
            raise ExportError(f"target {self.directory}: no embedding among its tensors (looked for "
                              f"{list(EMBED_NAMES)}); "
                              f"it has {_keys(tensor_names(self.weight_files))}")
        return found[1]

    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config


def resolve_target(spec: str) -> Target:
    """A target given as a builtin name, an HF directory or a .safetensors file with config.json beside
    it; only its config, tokenizer files and embedding are ever read."""
    from draftdistill.models.loading import resolve_model_source

    source = resolve_model_source(spec)
    if source.gguf_file:
        raise ExportError(f"target {spec}: a GGUF file; pass an HF directory (safetensors) instead")
    refuse_pickles(source.directory)
    files = [source.weights_file] if source.weights_file else safetensors_files(source.directory)
    if not files:
        raise ExportError(f"target {spec}: no .safetensors weights in {source.directory}")
    is_path = Path(spec).expanduser().exists()
    return Target(spec if is_path else str(source.directory), source.directory,
                  read_json(source.directory / "config.json"), files)


# ---------------------------------------------------------------- convert

def convert(src: str | Path, out: str | Path, fmt: str, *, target: str | None = None, verifier: str | None = None,
            speculative_tokens: int = 3, dtype: str | torch.dtype | None = None, overwrite: bool = False) -> dict:
    """Read `src` (any kind above), write `out` in `fmt` (hf | sglang | vllm); returns a report
    {kind, format, out, serve}. `target` (optional; needed for vllm when the source has no embedding)
    supplies the embedding, the verifier name and compatibility checks."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    out = Path(out).expanduser()
    source = detect(src)
    if out.exists():
        if out.resolve() in (source.path.resolve(), (source.run_dir or source.path).resolve()):
            raise ExportError(f"{out}: is the source; write the export elsewhere")
        if not overwrite and (not out.is_dir() or any(out.iterdir())):
            raise ExportError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    tgt = resolve_target(target) if target else None
    kind = source.skeleton.kind if source.kind == "checkpoint" else source.kind

    if fmt == "hf":
        if kind in EAGLE3_KINDS:
            raise ExportError(f"{src}: an EAGLE-3 head ({kind} format); --format hf is for standalone drafters. "
                              "Use --format sglang (SGLang EAGLE3) or --format vllm (vLLM eagle3)")
        model, tokenizer_dir = read_hf(source)
        if tokenizer_dir is None and tgt is not None:
            tokenizer_dir = tgt.directory
        if tokenizer_dir is None:
            raise ExportError(f"{src}: no tokenizer files, which SGLang STANDALONE needs; pass --target to copy "
                              "the target's")
        if tgt is not None:
            _check_hf_against_target(model, tokenizer_dir, tgt)
        write_hf(out, _cast_copy(model, dtype), tokenizer_dir=tokenizer_dir)
    else:
        if kind not in EAGLE3_KINDS:
            raise ExportError(f"{src}: a standalone drafter (an HF causal LM); SGLang serves it as STANDALONE and vLLM "
                              "as draft_model, both from --format hf")
        ckpt = read_eagle3(source)
        if tgt is not None:
            _check_eagle3_against_target(ckpt, tgt)
        if fmt == "sglang":
            write_sglang_eagle3(out, ckpt, dtype=dtype)
        else:
            run_target = source.config.get("target") if source.kind == "checkpoint" else None
            if tgt is None and run_target and (ckpt.embed is None or not (verifier or ckpt.verifier)):
                tgt = resolve_target(run_target)  # the run's own target supplies the embedding and the name
                _check_eagle3_against_target(ckpt, tgt)
            name = verifier or (tgt.name_or_path if tgt is not None else None) or ckpt.verifier
            if not name:
                raise ExportError("the vLLM (speculators) format names its verifier (the target): pass --verifier "
                                  "NAME_OR_PATH or --target PATH")
            archs = ckpt.verifier_architectures
            if tgt is not None:
                archs = list(tgt.config.get("architectures") or archs)
            if ckpt.embed is None:
                if tgt is None:
                    raise ExportError(f"{src}: no embed_tokens.weight, which the vLLM (speculators) export carries: "
                                      "pass --target PATH to read the target's embedding")
                ckpt.embed = tgt.embedding()
                ckpt.check(f"{src} with the embedding of {tgt.directory}")
            write_speculators_eagle3(out, ckpt, name, speculative_tokens, archs, dtype=dtype)
    return {"kind": source.kind if source.kind != "checkpoint" else f"checkpoint ({kind})", "format": fmt,
            "out": str(out), "serve": FORMATS[fmt]}


def _check_hf_against_target(model, tokenizer_dir: Path, tgt: Target) -> None:
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    target_model = SimpleNamespace(config=SimpleNamespace(vocab_size=tgt.text_config().get("vocab_size")))
    target_tokenizer = _tokenizer_dir(tgt.directory)
    check_standalone_compatible(model, AutoTokenizer.from_pretrained(str(tokenizer_dir)), target_model,
                                AutoTokenizer.from_pretrained(str(target_tokenizer)) if target_tokenizer else None)


def _check_eagle3_against_target(ckpt: Eagle3Checkpoint, tgt: Target) -> None:
    t = tgt.text_config()
    c = ckpt.config
    if c["vocab_size"] != t.get("vocab_size") or c["target_hidden_size"] != t.get("hidden_size"):
        raise ExportError(f"head for vocab {c['vocab_size']} / hidden {c['target_hidden_size']}, target "
                          f"{tgt.directory} has {t.get('vocab_size')} / {t.get('hidden_size')}")
    ids, layers = ckpt.aux_layer_ids, t.get("num_hidden_layers")
    if ids is not None and layers is not None and any(not 0 <= i <= layers - 2 for i in ids):
        raise ExportError(f"aux layer ids {ids} do not fit a {layers}-layer target (outputs of layers 0..{layers - 2})")
    if ids is None and layers is not None:  # make SGLang's default capture explicit
        from draftdistill.models.eagle3 import default_aux_layer_ids

        c["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": default_aux_layer_ids(layers),
                             "use_aux_hidden_state": True}
