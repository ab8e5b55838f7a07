"""draftdistill/export/eagle3.py: an EAGLE-3 head for SGLang (--speculative-algorithm EAGLE3) and for
vLLM (speculators format). Expected names, shapes and fields come from the loaders' sources:
- SGLang 0.5.23: python/sglang/srt/models/llama_eagle3.py (LlamaModel.__init__ lines 151-206:
  fc [H, 3H], layers.N with qkv over 2H and hidden_norm, norm, embed_tokens; load_weights lines
  325-378: q/k/v and gate/up stacked, "model." prefixed when needed, legacy "midlayer" -> "layers.0",
  d2t -> hot_token_id = d2t + arange, t2d skipped), speculative/eagle_worker_v2.py (init_lm_head:
  EAGLE3 calls set_embed, i.e. the embedding comes from the target), model_runner_components/
  spec_aux_hidden_state.py lines 185-196 (reads eagle_config["eagle_aux_hidden_state_layer_ids"]).
- vLLM: vllm/model_executor/models/llama_eagle3.py (Eagle3LlamaForCausalLM.load_weights: "t2d"
  skipped, "d2t" -> draft_id_to_target_id, "model." prefixed unless lm_head; LlamaModel.load_weights:
  "midlayer." -> "layers.0.", q/k/v -> qkv_proj, gate/up -> gate_up_proj),
  vllm/transformers_utils/configs/speculators/base.py (validate_speculators_config) and algos.py
  (update_eagle3: norm_before_residual defaults to True, eagle_aux_hidden_state_layer_ids forwarded).
The SGLang test at the end runs SGLang's own load_weights on the export, in the SGLang venv.
"""
import json
import socket

import pytest
import torch
from safetensors.torch import load_file
from sglang_test_support import run_in_venv, sglang_paths
from transformers import LlamaConfig, LlamaForCausalLM

from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import build_eagle3_head, load_eagle3_head
from draftdistill.export import export_sglang_eagle3, export_speculators_eagle3

V, H, LAYERS = 48, 32, 6


def target_llama(seed=0):
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def head_and_target():
    target = target_llama()
    vocab = DraftVocab([0, 1, 2, 5, 8, 13, 21, 34, 40, 47], V)
    return build_eagle3_head(target, vocab, seed=1), target  # default aux layers [1, 2, 2] for 6 layers


EXPECTED_SHAPES = {  # name -> shape for H=32, 4 heads x 8, 2 kv heads, intermediate 64, N=10 of V=48
    "fc.weight": (H, 3 * H),
    "layers.0.input_layernorm.weight": (H,),
    "layers.0.hidden_norm.weight": (H,),
    "layers.0.post_attention_layernorm.weight": (H,),
    "layers.0.self_attn.q_proj.weight": (32, 2 * H),
    "layers.0.self_attn.k_proj.weight": (16, 2 * H),
    "layers.0.self_attn.v_proj.weight": (16, 2 * H),
    "layers.0.self_attn.o_proj.weight": (H, 32),
    "layers.0.mlp.gate_proj.weight": (64, H),
    "layers.0.mlp.up_proj.weight": (64, H),
    "layers.0.mlp.down_proj.weight": (H, 64),
    "norm.weight": (H,),
    "lm_head.weight": (10, H),
    "d2t": (10,),
    "t2d": (V,),
}


def check_weights(state, float_dtype, embed=False):
    # SGLang takes the embedding from the target; the speculators export carries it (speculators' own
    # loader would otherwise start it as NaN). No "model." prefixes either way.
    expected = {**EXPECTED_SHAPES, "embed_tokens.weight": (V, H)} if embed else EXPECTED_SHAPES
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    assert all(v.dtype == float_dtype for k, v in state.items() if k not in ("d2t", "t2d"))
    assert (state["d2t"] + torch.arange(10)).tolist() == [0, 1, 2, 5, 8, 13, 21, 34, 40, 47]
    assert state["t2d"].sum() == 10 and state["t2d"][[0, 5, 47]].all() and not state["t2d"][[3, 46]].any()


def test_sglang_export_names_shapes_config_and_round_trip(tmp_path, head_and_target):
    head, target = head_and_target
    out = export_sglang_eagle3(tmp_path / "eagle3", head)
    check_weights(load_file(out / "model.safetensors"), torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False  # else lm_head = embedding
    assert config["vocab_size"] == V and config["draft_vocab_size"] == 10
    assert config["hidden_size"] == config["target_hidden_size"] == H  # equal: SGLang's set_embed shares the target's
    assert config["head_dim"] == 8 and config["num_key_value_heads"] == 2 and config["intermediate_size"] == 64
    # SGLang's default capture for 6 layers is layers [2, 3, 3] at their input = outputs of [1, 2, 2]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 2]
    assert config["dtype"] == "float32"

    reloaded = load_eagle3_head(out, target)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    aux = torch.randn(1, 5, 3 * H, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, reloaded.fuse(aux))[0], head(ids, head.fuse(aux))[0])
    assert reloaded.vocab == head.vocab and reloaded.aux_layer_ids == head.aux_layer_ids
    assert reloaded.embed_tokens.weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()

    half = export_sglang_eagle3(tmp_path / "eagle3-bf16", head, dtype=torch.bfloat16)
    check_weights(load_file(half / "model.safetensors"), torch.bfloat16)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert head.fc.weight.dtype == torch.float32  # the trained head is untouched


def test_speculators_export_config_and_vllm_name_mapping(tmp_path, head_and_target):
    head, target = head_and_target
    out = export_speculators_eagle3(tmp_path / "spec", head, "org/target-model", speculative_tokens=5,
                                    verifier_architectures=["LlamaForCausalLM"], dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    # vLLM SpeculatorsConfig.validate_speculators_config reads exactly these
    assert config["speculators_model_type"] == "eagle3"
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert config["speculators_config"]["default_proposal_method"] == "greedy"
    assert config["speculators_config"]["verifier"] == {"name_or_path": "org/target-model",
                                                        "architectures": ["LlamaForCausalLM"]}
    layer = config["transformer_layer_config"]
    assert isinstance(layer, dict) and layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1
    assert layer["vocab_size"] == V and layer["hidden_size"] == H and layer["head_dim"] == 8
    assert layer["rope_theta"] == layer["rope_parameters"]["rope_theta"]
    assert "draft_vocab_size" not in layer and "eagle_config" not in layer
    # update_eagle3 reads these top-level fields
    assert config["draft_vocab_size"] == 10 and config["target_hidden_size"] == H
    assert config["norm_before_residual"] is False  # vLLM's default when absent is True: the wrong layer
    assert config["norm_before_fc"] is False
    # vLLM captures the INPUT of layer id (llama.py: aux appended before layer idx): SGLang ids + 1
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3]

    state = load_file(out / "model.safetensors")
    check_weights(state, torch.bfloat16, embed=True)
    assert torch.equal(state["embed_tokens.weight"], target.get_input_embeddings().weight.to(torch.bfloat16))
    # vLLM's renaming (Eagle3LlamaForCausalLM.load_weights, then LlamaModel.load_weights) must land
    # every tensor on a parameter of its model; these are that model's parameters.
    vllm_params = {"model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight",
                   "draft_id_to_target_id",
                   "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                   "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                   "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                   "model.layers.0.hidden_norm.weight"}
    landed = set()
    for name in state:
        if "t2d" in name:
            continue
        if "d2t" in name:
            name = name.replace("d2t", "draft_id_to_target_id")
        elif "lm_head" not in name:
            name = "model." + name
        name = name.replace("midlayer.", "layers.0.")
        for shard in (".q_proj", ".k_proj", ".v_proj"):
            name = name.replace(shard, ".qkv_proj")
        for shard in (".gate_proj", ".up_proj"):
            name = name.replace(shard, ".gate_up_proj")
        landed.add(name)
    assert landed == vllm_params


SGLANG_LOAD = r"""
import json, os
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
for k, v in dict(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
    os.environ.setdefault(k, v)
import torch
from safetensors.torch import load_file
from transformers import AutoConfig
from sglang.srt.distributed import parallel_state
from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
from sglang.srt.server_args import ServerArgs

# a world of one process, as sglang/test/layer_ut_utils.py init_single_process_dist sets it up
init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
reset_context()
publish(ServerArgs(model_path="dummy", device="cpu"), role="test", ranks=SpawnRanks(world_rank=0))
get_parallel().override_permanently(world_group=parallel_state._WORLD)
initialize_model_parallel(backend="gloo")

from sglang.srt.models.registry import ModelRegistry
directory = os.environ["EAGLE3_DIR"]
config = AutoConfig.from_pretrained(directory)
cls, arch = ModelRegistry.resolve_model_cls(config.architectures)
model = cls(config).to(torch.float32)
embed_before = model.model.embed_tokens.weight.clone()
weights = load_file(os.path.join(directory, "model.safetensors"))
model.load_weights(iter(weights.items()))
p = dict(model.named_parameters())
w = {k: v.float() for k, v in weights.items() if v.is_floating_point()}
a = "layers.0.self_attn."
m = "layers.0.mlp."
n = config.draft_vocab_size
checks = {
    "qkv": torch.equal(p["model." + a + "qkv_proj.weight"], torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]])),
    "o": torch.equal(p["model." + a + "o_proj.weight"], w[a + "o_proj.weight"]),
    "gate_up": torch.equal(p["model." + m + "gate_up_proj.weight"], torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]])),
    "down": torch.equal(p["model." + m + "down_proj.weight"], w[m + "down_proj.weight"]),
    "fc": torch.equal(p["model.fc.weight"], w["fc.weight"]),
    "norms": all(torch.equal(p["model.layers.0." + k + ".weight"], w["layers.0." + k + ".weight"])
                 for k in ("input_layernorm", "hidden_norm", "post_attention_layernorm")),
    "final_norm": torch.equal(p["model.norm.weight"], w["norm.weight"]),
    "lm_head": torch.equal(p["lm_head.weight"][:n], w["lm_head.weight"]),
    # left for the target's (set_embed); uninitialised memory may hold NaNs, hence nan_to_num
    "embed_untouched": torch.equal(model.model.embed_tokens.weight.nan_to_num(), embed_before.nan_to_num()),
}
print(json.dumps({
    "arch": arch, "class": type(model).__name__, "checks": checks,
    "hot_token_id": model.get_hot_token_id().tolist(),
    "num_aux": model.model.num_aux_hidden_states, "fc_in": model.model.fc.in_features,
    "aux_ids": config.eagle_config["eagle_aux_hidden_state_layer_ids"],
    "load_lm_head_from_target": model.load_lm_head_from_target,
}))
"""  # noqa: E501  (the script's text is kept as it is)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sglang_loads_the_export_with_its_own_loader(tmp_path, head_and_target):
    """SGLang's LlamaForCausalLMEagle3, built from our config.json, loads our safetensors through
    its own load_weights: every parameter lands where SGLang expects it."""
    python, _, reason = sglang_paths()
    if python is None:
        pytest.skip(reason)
    head, _ = head_and_target
    out = export_sglang_eagle3(tmp_path / "eagle3", head)
    result = run_in_venv(python, SGLANG_LOAD, timeout=300,
                         env={"EAGLE3_DIR": str(out), "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["arch"] == "LlamaForCausalLMEagle3" and report["class"] == "LlamaForCausalLMEagle3"
    assert report["checks"] == {k: True for k in report["checks"]}, report["checks"]
    assert report["hot_token_id"] == head.vocab.draft_ids.tolist()  # draft id -> target id
    assert report["num_aux"] == 3 and report["fc_in"] == 3 * H
    assert report["aux_ids"] == head.aux_layer_ids
    assert report["load_lm_head_from_target"] is False  # it uses our draft-vocab lm_head
