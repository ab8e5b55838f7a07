"""End to end on the real builtin target (SmolLM2-135M-Instruct from the PyPI wheel, converted once)."""
import pytest
import torch

from draftdistill.data import encode_prompt, load_prompts, stop_token_ids
from draftdistill.models import load_drafter, load_target
from draftdistill.spec import SamplingConfig, speculative_generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_target("smollm2-135m-instruct", device="cpu")


def test_builtin_target_shape_and_tokenizer(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152


def test_greedy_speculative_equals_target_greedy_on_smollm2(smollm2):
    model, tok = smollm2
    drafter = load_drafter("pruned:2", model, tok)
    ids = encode_prompt(tok, load_prompts("gsm8k:heldout", limit=1)[0])
    eos = stop_token_ids(tok, model)
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos[0])[0, ids.shape[1]:]
    tokens, stats = speculative_generate(model, drafter, ids, 24, gamma=4, sampling=SamplingConfig(0.0),
                                         eos_token_id=eos)
    assert tokens.tolist() == expected.tolist()
    assert stats.target_calls < len(expected)  # the pruned drafter gets some tokens accepted


def test_gguf_file_loads_directly_and_matches_the_converted_copy(smollm2):
    from draftdistill.models.builtin import builtin_gguf_path

    converted, _ = smollm2
    gguf_model, tok = load_target(str(builtin_gguf_path("smollm2-135m-instruct")), device="cpu")
    ids = torch.tensor([[1, 520, 9531, 198, 1780]])
    with torch.inference_mode():
        torch.testing.assert_close(gguf_model(ids).logits, converted(ids).logits)
    assert tok.eos_token == "<|im_end|>"
