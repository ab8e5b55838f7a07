"""`draftdistill export SRC OUT --format hf|sglang|vllm` (draftdistill/export/convert.py): every kind of
source we train or load, converted to what a server loads, on tiny models.

- ours -> sglang -> vllm -> sglang keeps every tensor bit for bit, and the vllm step equals the
  trainer-side speculators export of the same head;
- a SpecForge checkpoint (midlayer.* names, embedding included, no eagle_config) and a speculators
  checkpoint (to_diff_dict layer config, no d2t/t2d, training-only verifier_* tensors) convert to
  SGLang heads whose logits equal the original head's;
- a training run's OUT_DIR exports its checkpoint's weights (architecture from OUT_DIR/best);
- pickles, DCP checkpoints, unknown layouts and wrong format/kind pairs are refused with a message
  that names the file and what was seen.
"""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import eagle3_target, make_llama, make_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from draftdistill.cli import main
from draftdistill.export import export_hf, export_sglang_eagle3, export_speculators_eagle3
from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import build_eagle3_head, load_eagle3_head

V, H, LAYERS = 48, 32, 6


def run(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def refused(*args, match: str):
    result = run(*args)
    assert result.exit_code != 0, result.output
    assert match in result.output, result.output
    assert "Traceback" not in result.output
    return result.output


def target_llama(seed=0):
    return eagle3_target(V, H, LAYERS, seed)


def jitter(module, seed):
    """Move every float weight off its initial value, so a tensor landing in the wrong slot shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "embed_tokens" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    target = target_llama()
    target.save_pretrained(root / "target")
    head = jitter(build_eagle3_head(target, DraftVocab([0, 1, 2, 5, 8, 13, 21, 34, 40, 47], V), seed=1), 2)
    return root, target, head


def tensors_of(directory):
    return load_file(str(directory / "model.safetensors"))


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def logits(head, seed=0):
    ids = torch.tensor([[1, 5, 7, 9, 11, 40]])
    aux = torch.randn(1, 6, 3 * H, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return head(ids, head.fuse(aux))[0]


# ---------------------------------------------------------------- EAGLE-3 round trips

def test_ours_to_sglang_to_vllm_to_sglang_keeps_every_tensor(tmp_path, setup):
    root, target, head = setup
    ours = export_sglang_eagle3(tmp_path / "ours", head, tokenizer=make_tokenizer())
    ok(ours, tmp_path / "sglang", "--format", "sglang")
    out = ok(tmp_path / "sglang", tmp_path / "vllm", "--format", "vllm", "--target", root / "target").output
    assert "(sglang)" in out and "\"method\": \"eagle3\"" in out
    ok(tmp_path / "vllm", tmp_path / "back", "--format", "sglang")

    for directory in (tmp_path / "sglang", tmp_path / "back"):
        assert_same_tensors(tensors_of(directory), tensors_of(ours))
        assert config_of(directory) == config_of(ours)
    # the vllm step is exactly the trainer-side speculators export of the same head
    direct = export_speculators_eagle3(tmp_path / "direct", head, str(root / "target"),
                                       verifier_architectures=["LlamaForCausalLM"])
    assert_same_tensors(tensors_of(tmp_path / "vllm"), tensors_of(direct))
    assert config_of(tmp_path / "vllm") == config_of(direct)
    vllm = config_of(tmp_path / "vllm")
    assert vllm["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in head.aux_layer_ids]
    assert vllm["norm_before_residual"] is False
    assert torch.equal(tensors_of(tmp_path / "vllm")["embed_tokens.weight"], target.get_input_embeddings().weight)

    reloaded = load_eagle3_head(tmp_path / "back", target)
    torch.testing.assert_close(logits(reloaded), logits(head), rtol=0, atol=0)
    for directory in ("sglang", "vllm", "back"):  # the tokenizer travels along (load_drafter checks it)
        copied = (tmp_path / directory / "tokenizer_config.json").read_text()
        assert copied == (ours / "tokenizer_config.json").read_text()


def test_vllm_export_without_an_embedding_needs_the_target(tmp_path, setup):
    _, _, head = setup
    ours = export_sglang_eagle3(tmp_path / "ours", head)
    refused(ours, tmp_path / "vllm", "--format", "vllm", "--verifier", "org/target", match="--target")
    assert not (tmp_path / "vllm").exists()


def test_specforge_checkpoint_converts_to_a_head_with_the_same_logits(tmp_path, setup):
    root, target, head = setup
    src = tmp_path / "specforge"
    src.mkdir()
    # SpecForge (specforge/modeling/draft/llama3_eagle.py): the layer is "midlayer", the embedding may
    # be saved, eagle_config may be absent (SGLang's default capture = this head's [1, 2, 2]).
    state = {k.replace("layers.0.", "midlayer."): v.contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(src / "model.safetensors"))
    config = head.config.to_dict()
    config.pop("eagle_config")
    config["torch_dtype"] = "float32"
    (src / "config.json").write_text(json.dumps(config))
    (src / "training_state.pt").write_bytes(b"not a pickle: never opened")  # SpecForge's optimizer state

    out = ok(src, tmp_path / "sglang", "--format", "sglang").output
    assert "(specforge)" in out
    converted = tensors_of(tmp_path / "sglang")
    assert "embed_tokens.weight" not in converted and not any(k.startswith("midlayer.") for k in converted)
    assert "eagle_config" not in config_of(tmp_path / "sglang")  # still SGLang's default capture
    reloaded = load_eagle3_head(tmp_path / "sglang", target)
    assert reloaded.aux_layer_ids == head.aux_layer_ids and reloaded.vocab == head.vocab
    torch.testing.assert_close(logits(reloaded), logits(head), rtol=0, atol=0)

    # with the target, the default capture is written out; and its own embedding serves the vllm export
    ok(src, tmp_path / "explicit", "--format", "sglang", "--target", root / "target")
    assert config_of(tmp_path / "explicit")["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 2]
    ok(src, tmp_path / "vllm", "--format", "vllm", "--verifier", "org/target", "--dtype", "bfloat16")
    vllm = tensors_of(tmp_path / "vllm")
    assert vllm["fc.weight"].dtype == torch.bfloat16 and config_of(tmp_path / "vllm")["dtype"] == "bfloat16"
    assert "eagle_aux_hidden_state_layer_ids" not in config_of(tmp_path / "vllm")  # vLLM's default = SGLang's


def test_speculators_checkpoint_converts_to_a_head_with_the_same_logits(tmp_path, setup):
    root, target, _ = setup
    head = jitter(build_eagle3_head(target, aux_layer_ids=[0, 2, 4], seed=3), 4)  # whole vocabulary
    src = export_speculators_eagle3(tmp_path / "spec", head, "org/target")
    # as speculators itself saves it: no vocab mapping for a full-vocabulary draft, its training-only
    # copies of the verifier's head and norm, the layer config as a diff against Llama's defaults
    state = {k: v for k, v in tensors_of(src).items() if k not in ("d2t", "t2d")}
    state["verifier_lm_head.weight"] = torch.zeros(V, H)
    state["verifier_norm.weight"] = torch.ones(H)
    save_file(state, str(src / "model.safetensors"))
    config = config_of(src)
    layer = LlamaConfig(**config["transformer_layer_config"]).to_diff_dict()
    config["transformer_layer_config"] = layer
    (src / "config.json").write_text(json.dumps(config))

    out = ok(src, tmp_path / "sglang", "--format", "sglang").output
    assert "(speculators)" in out
    sglang = config_of(tmp_path / "sglang")
    assert sglang["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 4]  # speculators' ids - 1
    assert sglang["rms_norm_eps"] == head.config.rms_norm_eps
    reloaded = load_eagle3_head(tmp_path / "sglang", target)
    torch.testing.assert_close(logits(reloaded), logits(head), rtol=0, atol=0)
    # vllm -> vllm keeps the source's verifier and embedding
    ok(src, tmp_path / "again", "--format", "vllm")
    again = config_of(tmp_path / "again")
    assert again["speculators_config"]["verifier"]["name_or_path"] == "org/target"
    assert torch.equal(tensors_of(tmp_path / "again")["embed_tokens.weight"], head.embed_tokens.weight)


# ---------------------------------------------------------------- standalone drafters and runs

def test_hf_drafter_exports_with_its_tokenizer_and_same_logits(tmp_path):
    drafter = make_llama(32, layers=1, seed=5)
    drafter.save_pretrained(tmp_path / "drafter")
    make_tokenizer().save_pretrained(tmp_path / "drafter")
    make_llama(32, layers=2, seed=6).save_pretrained(tmp_path / "target")
    make_tokenizer().save_pretrained(tmp_path / "target")

    out = ok(tmp_path / "drafter", tmp_path / "hf", "--format", "hf", "--target", tmp_path / "target").output
    assert "STANDALONE" in out and "draft_model" in out
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, drafter(ids).logits, rtol=0, atol=0)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    ok(tmp_path / "drafter", tmp_path / "hf16", "--format", "hf", "--dtype", "bfloat16")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf16").dtype == torch.bfloat16


def write_run(run_dir, weights: dict, run_config: dict, fmt="safetensors"):
    (run_dir / "checkpoint").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(run_dir / "checkpoint" / "drafter.safetensors"))
    (run_dir / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": 4, "format": fmt}))
    (run_dir / "config.json").write_text(json.dumps(run_config))


def test_a_runs_checkpoint_exports_its_latest_weights(tmp_path):
    drafter = make_llama(32, layers=1, seed=5)
    export_hf(tmp_path / "run" / "best", drafter, make_tokenizer())  # written at the run's first evaluation
    trained = jitter(make_llama(32, layers=1, seed=5), 7)
    weights = {k: v for k, v in trained.state_dict().items() if k != "lm_head.weight"}  # tied: not stored
    write_run(tmp_path / "run", weights, {"target": "unused", "drafter": "pruned:1"})

    out = ok(tmp_path / "run", tmp_path / "hf", "--format", "hf").output
    assert "checkpoint (hf)" in out
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for name, tensor in trained.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    refused(tmp_path / "run", tmp_path / "x", "--format", "sglang", match="--format hf")


def test_an_eagle3_runs_checkpoint_exports_for_vllm_with_the_runs_target(tmp_path, setup):
    root, target, head = setup
    export_sglang_eagle3(tmp_path / "run" / "best", build_eagle3_head(target, head.vocab, seed=9))
    weights = {k: v for k, v in head.state_dict().items() if k != "embed_tokens.weight"}
    write_run(tmp_path / "run", weights, {"target": str(root / "target"), "drafter": "eagle3"})

    ok(tmp_path / "run" / "checkpoint", tmp_path / "vllm", "--format", "vllm")  # embedding + verifier: the run's target
    direct = export_speculators_eagle3(tmp_path / "direct", head, str(root / "target"),
                                       verifier_architectures=["LlamaForCausalLM"])
    assert_same_tensors(tensors_of(tmp_path / "vllm"), tensors_of(direct))
    assert config_of(tmp_path / "vllm") == config_of(direct)


# ---------------------------------------------------------------- refusals

def test_pickles_and_dcp_checkpoints_are_refused_never_loaded(tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code")
    assert "pytorch_model.bin" in refused(src, tmp_path / "out", "--format", "hf", match="pickle")
    refused(src / "pytorch_model.bin", tmp_path / "out", "--format", "hf", match="pickle")
    (tmp_path / "weights.pt").write_bytes(b"")
    refused(tmp_path / "weights.pt", tmp_path / "out", "--format", "sglang", match="refused")

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": 2, "format": "dcp"}))
    (run_dir / "checkpoint" / ".metadata").write_bytes(b"\x80\x04")
    refused(run_dir, tmp_path / "out", "--format", "hf", match="DCP")
    assert not (tmp_path / "out").exists()


def test_unknown_layouts_are_refused_naming_the_file_and_keys(tmp_path, setup):
    _, _, head = setup
    src = tmp_path / "odd"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["MysteryModel"]}))
    save_file({"encoder.block.weight": torch.zeros(2)}, str(src / "model.safetensors"))
    message = refused(src, tmp_path / "out", "--format", "sglang", match="unknown layout")
    assert "MysteryModel" in message and "encoder.block.weight" in message

    two_layers = tmp_path / "two"
    two_layers.mkdir()
    state = dict(head.state_dict())
    state["layers.1.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(two_layers / "model.safetensors"))
    (two_layers / "config.json").write_text(json.dumps(head.config.to_dict()))
    refused(two_layers, tmp_path / "out", "--format", "sglang", match="one-layer")

    missing = tmp_path / "missing"
    missing.mkdir()
    save_file({k: v.contiguous() for k, v in head.state_dict().items() if k != "fc.weight"},
              str(missing / "model.safetensors"))
    (missing / "config.json").write_text(json.dumps(head.config.to_dict()))
    message = refused(missing, tmp_path / "out", "--format", "sglang", match="missing ['fc.weight']")
    assert "model.safetensors" in message and "lm_head.weight" in message  # the file and the keys seen


def test_wrong_pairs_and_mismatches_are_refused(tmp_path, setup):
    root, target, head = setup
    ours = export_sglang_eagle3(tmp_path / "ours", head)
    refused(ours, tmp_path / "out", "--format", "hf", match="--format sglang")

    spec = export_speculators_eagle3(tmp_path / "spec", head, "org/target")
    config = config_of(spec)
    config["norm_before_residual"] = True
    (spec / "config.json").write_text(json.dumps(config))
    refused(spec, tmp_path / "out", "--format", "sglang", match="norm_before_residual")

    make_llama(32, layers=1).save_pretrained(tmp_path / "small-target")
    refused(ours, tmp_path / "out", "--format", "sglang", "--target", tmp_path / "small-target", match="vocab")
    make_tokenizer().save_pretrained(tmp_path / "small-target")
    refused(tmp_path / "small-target", tmp_path / "out", "--format", "vllm", match="--format hf")
    refused(tmp_path / "small-target", tmp_path / "out", "--format", "hf", "--target", root / "target",
            match="STANDALONE needs the draft vocab_size")  # SGLang's StandaloneWorker would refuse it

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    refused(ours, tmp_path / "taken", "--format", "sglang", match="--overwrite")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    ok(ours, tmp_path / "taken", "--format", "sglang", "--overwrite")
    assert not (tmp_path / "taken" / "keep.txt").exists()
    refused(ours, ours, "--format", "sglang", "--overwrite", match="is the source")
