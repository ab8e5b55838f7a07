"""EAGLE-3 heads through the drafter specs: ``eagle3`` builds one, an exported directory loads one
(for `draftdistill eval --drafter ...`, serving, configs), trainers of causal-LM drafters refuse one."""
import json

import pytest
import torch
from click.testing import CliRunner

from draftdistill.cli import main
from draftdistill.models import TokenizerMismatchError, load_drafter, require_lm_drafter
from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import Eagle3Head, build_eagle3_head
from draftdistill.export import export_sglang_eagle3
from tiny import WORDS, make_llama, make_tokenizer, save_model_dir


def test_eagle3_spec_builds_a_full_vocab_head_on_sglang_default_layers():
    target, tok = make_llama(layers=8), make_tokenizer()
    head = load_drafter("eagle3", target, tok)
    assert isinstance(head, Eagle3Head)
    assert head.aux_layer_ids == [1, 3, 4] and head.target_hidden_indices == [2, 4, 5]  # SGLang: [2, N//2, N-3]
    assert head.vocab == DraftVocab.full(32)
    with pytest.raises(ValueError, match="aux layer ids"):
        load_drafter("eagle3", make_llama(layers=3), tok)  # too shallow for the default low/mid/high
    with pytest.raises(ValueError, match="TTT"):
        require_lm_drafter(head, "draftdistill train")
    require_lm_drafter(make_llama(layers=1), "draftdistill train")  # a causal LM passes


def test_exported_directory_loads_as_drafter_after_the_tokenizer_check(tmp_path):
    target, tok = make_llama(layers=6), make_tokenizer()
    head = build_eagle3_head(target, DraftVocab([0, 2, 3, 7, 11, 30], 32), aux_layer_ids=[0, 2, 4], seed=3)
    out = export_sglang_eagle3(tmp_path / "eagle3", head, tokenizer=tok)
    loaded = load_drafter(str(out), target, tok)
    assert isinstance(loaded, Eagle3Head) and not any(p.requires_grad for p in loaded.parameters())
    ids, aux = torch.tensor([[4, 5, 6]]), torch.randn(1, 3, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, loaded.fuse(aux))[0], head(ids, head.fuse(aux))[0])
    other = make_tokenizer(WORDS[:3] + [f"x{i}" for i in range(29)])
    with pytest.raises(TokenizerMismatchError):
        load_drafter(str(out), target, other)
    # a checkpoint without a tokenizer (SGLang takes the target's): loaded on the vocab-size check alone
    bare = export_sglang_eagle3(tmp_path / "bare", head)
    assert isinstance(load_drafter(str(bare), target, other), Eagle3Head)
    with pytest.raises(ValueError, match="vocab"):
        load_drafter(str(bare), make_llama(vocab_size=40, layers=6), tok)


def test_eval_cli_with_an_eagle3_drafter(tmp_path):
    target_dir = save_model_dir(tmp_path / "target", layers=6, seed=0)
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(target_dir)
    export_sglang_eagle3(tmp_path / "eagle3", build_eagle3_head(target, aux_layer_ids=[0, 2, 4]),
                         tokenizer=make_tokenizer())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(2)))
    out = tmp_path / "r.json"
    for drafter in (str(tmp_path / "eagle3"), "eagle3"):
        result = CliRunner().invoke(main, ["eval", "--target", str(target_dir), "--drafter", drafter, "--prompts",
                                           str(prompts), "--max-new-tokens", "10", "--gamma", "3", "--json", str(out)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        # greedy: the same tokens as the target alone, so the same lengths
        assert report["target_only"]["new_tokens"] == report["speculative"]["new_tokens"] > 0
        assert 1.0 <= report["speculative"]["tau"] <= 4.0
