import pytest
import torch

from draftdistill.models import (TokenizerMismatchError, build_pruned_drafter, build_small_drafter,
                                 check_tokenizers_match, load_drafter, load_target, parse_drafter_spec,
                                 resolve_model_source)
from tiny import WORDS, make_llama, make_tokenizer, save_model_dir


def test_identical_tokenizers_pass():
    check_tokenizers_match(make_tokenizer(), make_tokenizer())


def test_mismatch_names_first_differing_id():
    swapped = list(WORDS)
    swapped[7], swapped[9] = swapped[9], swapped[7]
    with pytest.raises(TokenizerMismatchError, match=r"differ at id 7: target has 'w4', drafter has 'w6'"):
        check_tokenizers_match(make_tokenizer(), make_tokenizer(swapped))


def test_mismatch_in_vocab_size_names_first_missing_id():
    with pytest.raises(TokenizerMismatchError, match=r"differ at id 32: target has None, drafter has 'extra'"):
        check_tokenizers_match(make_tokenizer(), make_tokenizer(WORDS + ["extra"]))


def test_mismatch_in_special_tokens():
    with pytest.raises(TokenizerMismatchError, match="special token eos differs: target id 2, drafter id 3"):
        check_tokenizers_match(make_tokenizer(), make_tokenizer(eos="w0"))


def test_pruned_drafter_is_first_k_layers_of_target():
    target = make_llama(layers=4, seed=1)
    drafter = build_pruned_drafter(target, 2)
    assert drafter.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 4
    ids = torch.tensor([[1, 5, 9, 3, 17]])
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states[2]  # after layer 2
        expected = target.lm_head(target.model.norm(hidden))
        torch.testing.assert_close(drafter(ids).logits, expected)
    # A copy, not a view: training the drafter must never touch the target.
    assert drafter.model.embed_tokens.weight.data_ptr() != target.model.embed_tokens.weight.data_ptr()


def test_pruned_drafter_rejects_bad_depth():
    with pytest.raises(ValueError, match="1 <= layers <= 4"):
        build_pruned_drafter(make_llama(layers=4), 5)


def test_small_drafter_shares_vocab_and_ids():
    target = make_llama(layers=2)
    drafter = build_small_drafter(target, layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32)
    assert drafter.config.vocab_size == target.config.vocab_size
    assert drafter.config.eos_token_id == target.config.eos_token_id
    assert drafter(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)
    with pytest.raises(ValueError, match="unknown keys"):
        build_small_drafter(target, depth=3)


def test_parse_drafter_spec():
    assert parse_drafter_spec("pruned:2") == ("pruned", {"layers": 2})
    assert parse_drafter_spec("small:layers=2,hidden=128") == ("small", {"layers": 2, "hidden": 128})
    assert parse_drafter_spec("/some/dir") == ("path", {})
    with pytest.raises(ValueError, match="pruned:K"):
        parse_drafter_spec("pruned:two")


def test_load_target_and_drafter_from_directories(tmp_path):
    target_dir = save_model_dir(tmp_path / "target", layers=2, seed=0)
    drafter_dir = save_model_dir(tmp_path / "drafter", layers=1, seed=1)
    target, tok = load_target(str(target_dir), device="cpu")
    assert not any(p.requires_grad for p in target.parameters())
    drafter = load_drafter(str(drafter_dir), target, tok)
    assert drafter.config.num_hidden_layers == 1
    reference = make_llama(layers=1, seed=1)
    ids = torch.tensor([[1, 4, 6]])
    with torch.no_grad():
        torch.testing.assert_close(drafter(ids).logits, reference(ids).logits)


def test_load_from_safetensors_file(tmp_path):
    target_dir = save_model_dir(tmp_path / "target", layers=2, seed=3)
    source = resolve_model_source(str(target_dir / "model.safetensors"))
    assert source.weights_file == target_dir / "model.safetensors"
    model, _ = load_target(str(target_dir / "model.safetensors"), device="cpu")
    ids = torch.tensor([[1, 4, 6]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, make_llama(layers=2, seed=3)(ids).logits)


def test_mismatched_drafter_refused_before_weights_are_read(tmp_path):
    target_dir = save_model_dir(tmp_path / "target")
    swapped = list(WORDS)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    drafter_dir = save_model_dir(tmp_path / "drafter", words=swapped)
    (drafter_dir / "model.safetensors").write_bytes(b"not a safetensors file")  # never reached
    target, tok = load_target(str(target_dir), device="cpu")
    with pytest.raises(TokenizerMismatchError, match="differ at id 5"):
        load_drafter(str(drafter_dir), target, tok)


def test_missing_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_model_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_source(str(tmp_path / "empty"))
