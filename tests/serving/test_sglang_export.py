"""draftdistill/export/hf.py: a standalone drafter as a plain HF dir (SGLang --speculative-algorithm STANDALONE)."""
import pytest
import torch


def tiny(vocab=32, layers=1, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]


def test_export_reloads_with_same_outputs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftdistill.export import export_standalone_drafter

    drafter, target, tok = tiny(), tiny(layers=2, seed=1), tokenizer(WORDS)
    out = export_standalone_drafter(tmp_path / "draft", drafter, tok, target=target, target_tokenizer=tok)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, drafter(ids).logits)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
    half = export_standalone_drafter(tmp_path / "draft16", drafter, tok, dtype=torch.bfloat16)
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16
    assert next(drafter.parameters()).dtype == torch.float32  # the trained model is untouched


def test_export_refuses_what_standalone_refuses(tmp_path):
    from draftdistill.export import export_standalone_drafter

    tok = tokenizer(WORDS)
    with pytest.raises(ValueError, match="vocab_size"):
        export_standalone_drafter(tmp_path / "d", tiny(vocab=32), tok, target=tiny(vocab=48))
    other = tokenizer(WORDS[:3] + [f"x{i}" for i in range(29)])
    with pytest.raises(ValueError, match="tokenizer"):
        export_standalone_drafter(tmp_path / "d", tiny(), tok, target_tokenizer=other)
    assert not (tmp_path / "d").exists()
