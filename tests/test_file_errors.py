"""Files a user gives that cannot be read raise a ValueError naming the file (and the line where
there is one), which the CLI prints as one error line; weights in pickle form are refused before
anything is unpickled. (Checkpoints: tests/test_checkpoint_safety.py.)"""
import json
import os
import pickle
import shlex

import pytest

from draftdistill.data import PromptFileError, read_prompt_file
from draftdistill.models import load_drafter, load_model, load_target, resolve_model_source
from draftdistill.models.loading import ModelFileError, PickleWeightsError
from draftdistill.train.feature_cache import FeatureCache
from tiny import save_model_dir


def evil_pickle(path, marker):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    path.write_bytes(pickle.dumps(Evil()))


@pytest.fixture
def model_dir(tmp_path):
    return save_model_dir(tmp_path / "model")


def test_a_truncated_model_safetensors_is_named(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for spec in (model_dir, weights):
        with pytest.raises(ModelFileError, match=rf"{weights}: unreadable safetensors file, truncated"):
            load_target(str(spec), device="cpu")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_an_invalid_json_file_is_named_with_line_and_column(model_dir, name):
    text = (model_dir / name).read_text()
    (model_dir / name).write_text(text[: len(text) // 2])  # cut mid-way
    with pytest.raises(ModelFileError, match=rf"{model_dir / name}:\d+:\d+: invalid {name}"):
        load_target(str(model_dir), device="cpu")


def test_a_config_that_is_not_an_object_or_not_utf8_is_named(model_dir):
    (model_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match=rf"{model_dir / 'config.json'}: expected a JSON object"):
        resolve_model_source(str(model_dir))
    (model_dir / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ModelFileError, match=r"config.json: config.json is not UTF-8"):
        resolve_model_source(str(model_dir))


def test_a_drafter_with_a_broken_config_is_named(tmp_path, model_dir):
    target, tokenizer = load_target(str(model_dir), device="cpu")
    drafter = save_model_dir(tmp_path / "drafter", layers=1)
    (drafter / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ModelFileError, match=rf"{drafter / 'config.json'}:1:\d+: invalid config.json"):
        load_drafter(str(drafter), target, tokenizer)


def test_pickle_weights_are_refused_before_anything_is_unpickled(tmp_path, model_dir):
    marker = tmp_path / "pwned"
    (model_dir / "model.safetensors").unlink()
    evil_pickle(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(PickleWeightsError) as error:
        load_target(str(model_dir), device="cpu")
    message = str(error.value)
    assert str(model_dir / "pytorch_model.bin") in message and "safetensors" in message
    assert "weights_only=False" not in message and not marker.exists()
    with pytest.raises(PickleWeightsError, match=r"evil\.pt: weights in pickle form are refused"):
        evil_pickle(tmp_path / "evil.pt", marker)
        resolve_model_source(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_a_pickle_beside_safetensors_weights_is_never_read(tmp_path, model_dir):
    marker = tmp_path / "pwned"
    evil_pickle(model_dir / "pytorch_model.bin", marker)
    model = load_model(resolve_model_source(str(model_dir)))
    assert model.config.num_hidden_layers == 2 and not marker.exists()


def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    rows = [json.dumps({"prompt": f"question {i}"}).encode() for i in range(3)]
    rows[2] = b'{"prompt": "caf\xe9"}'  # Latin-1
    for suffix, data, line in ((".jsonl", b"\n".join(rows) + b"\n", 3),
                               (".txt", b"first\nsecond\n\xff third\n", 3),
                               (".json", b'[\n {"prompt": "ok"},\n {"prompt": "\xe9"}\n]', 3)):
        path = tmp_path / f"p{suffix}"
        path.write_bytes(data)
        with pytest.raises(PromptFileError, match=rf"{path}:{line}: not UTF-8 text"):
            read_prompt_file(path)
    bom = tmp_path / "bom.jsonl"  # a byte-order mark is UTF-8, and is dropped
    bom.write_bytes(b"\xef\xbb\xbf" + rows[0] + b"\n")
    assert read_prompt_file(bom)[0].messages[0]["content"] == "question 0"


def test_an_unreadable_feature_cache_identity_is_named(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "meta.json").write_text('{"target": ')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'cache' / 'meta.json'}:1:\d+: unreadable"):
        FeatureCache(tmp_path / "cache", {"target": "t"})


def test_a_truncated_eagle3_head_is_named(tmp_path):
    """An EAGLE-3 directory whose model.safetensors is cut short: the error names the file."""
    import pytest

    from draftdistill.models.eagle3 import load_eagle3_head
    from draftdistill.models.loading import ModelFileError

    head_dir = tmp_path / "head"
    head_dir.mkdir()
    (head_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", '
                                          '"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, '
                                          '"num_key_value_heads": 1, "intermediate_size": 32, "num_hidden_layers": 1}')
    (head_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    target = type("T", (), {"config": type("C", (), {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 4})()})()
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_eagle3_head(head_dir, target)
