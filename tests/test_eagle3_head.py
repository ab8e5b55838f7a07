"""draftdistill/models/eagle3.py: the EAGLE-3 head, its attention cache, and the target's aux states.

The key property: the training-time-test (TTT) pass, where every position starts a chain, and
chain decoding, where one position does, compute the same logits; and both equal a plain causal
pass over the "virtual" sequence the chain forms (prefix + its own entries), computed with
torch's SDPA instead of the head's chain attention.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import (
    Eagle3Head,
    build_eagle3_head,
    default_aux_layer_ids,
    hidden_state_indices,
    target_aux_hidden_states,
)

VOCAB = 40


def target_llama(layers=5, hidden=32, heads=4, kv_heads=2, seed=0):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float64).eval()


@pytest.fixture(scope="module")
def setup():
    target = target_llama()
    vocab = DraftVocab(sorted([*range(0, VOCAB, 2), 37]), VOCAB)  # 21 of 40 tokens
    head = build_eagle3_head(target, vocab, aux_layer_ids=[0, 1, 3], seed=1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        aux, _ = target_aux_hidden_states(target, ids, head.aux_layer_ids)
    return target, head, ids, aux


def test_aux_layer_ids_follow_sglang_capture():
    # SGLang models/llama.py set_eagle3_layers_to_capture: with no layer ids it captures at the
    # INPUT of layers [2, N//2, N-3]; with ids it captures at the input of id + 1. As outputs of
    # layers that is [1, N//2-1, N-4], and transformers' output_hidden_states[i] is layer i-1's output.
    assert default_aux_layer_ids(32) == [1, 15, 28]  # Llama-3.1-8B
    assert hidden_state_indices(default_aux_layer_ids(32)) == [2, 16, 29]
    target = target_llama(layers=5)
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in target.model.layers]
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        aux, out = target_aux_hidden_states(target, ids, [0, 1, 3])
    for h in hooks:
        h.remove()
    H = target.config.hidden_size
    for k, layer in enumerate([0, 1, 3]):
        torch.testing.assert_close(aux[..., k * H:(k + 1) * H], outputs[layer])  # the layer's own output
    torch.testing.assert_close(out.logits, target(ids).logits)
    with pytest.raises(ValueError, match="aux layer ids"):
        build_eagle3_head(target, aux_layer_ids=[0, 1, 4])  # the last layer's raw output is not exposed


def test_config_shapes_and_frozen_shared_embedding(setup):
    target, head, ids, aux = setup
    c = head.config
    assert c.architectures == ["LlamaForCausalLMEagle3"] and c.num_hidden_layers == 1
    assert c.draft_vocab_size == 21 and c.vocab_size == VOCAB and c.target_hidden_size == 32
    assert c.eagle_config["eagle_aux_hidden_state_layer_ids"] == [0, 1, 3] and not c.tie_word_embeddings
    assert head.fc.weight.shape == (32, 96)
    assert head.layers[0].self_attn.q_proj.weight.shape == (32, 64)  # 4 heads x 8, input 2H
    assert head.layers[0].self_attn.k_proj.weight.shape == (16, 64)  # 2 kv heads x 8
    assert head.lm_head.weight.shape == (21, 32)
    emb = head.embed_tokens.weight
    assert not emb.requires_grad and emb.data_ptr() == target.get_input_embeddings().weight.data_ptr()
    assert head.vocab == DraftVocab(sorted([*range(0, VOCAB, 2), 37]), VOCAB)
    torch.testing.assert_close(head.lm_head.weight, target.lm_head.weight[head.vocab.draft_ids])
    logits, h = head(ids, head.fuse(aux))
    assert logits.shape == (2, 9, 21) and h.shape == (2, 9, 32)
    last, _ = head(ids, head.fuse(aux), num_logits=2)
    torch.testing.assert_close(last, logits[:, -2:])


def test_incremental_prefix_equals_one_pass(setup):
    _, head, ids, aux = setup
    with torch.no_grad():
        full_logits, full_h = head(ids, head.fuse(aux))
        cache = head.new_cache()
        parts = [head(ids[:, a:b], head.fuse(aux[:, a:b]), cache) for a, b in [(0, 4), (4, 5), (5, 9)]]
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), full_logits)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], 1), full_h)
    cache.crop(5)
    with torch.no_grad():
        again, _ = head(ids[:, 5:], head.fuse(aux[:, 5:]), cache)
    torch.testing.assert_close(again, full_logits[:, 5:])


def ttt(head, ids, aux, chain_tokens, steps):
    """The TTT unroll a trainer runs: step 0 over all positions, then each position's own chain."""
    cache = head.new_cache()
    logits, h = head(ids, head.fuse(aux), cache)
    out = [logits]
    for j in range(1, steps + 1):
        logits, h = head(chain_tokens[j - 1], h, cache, step=j)
        out.append(logits)
    return out


def test_ttt_equals_chain_decoding_and_a_plain_causal_pass(setup):
    _, head, ids, aux = setup
    B, T, steps = ids.shape[0], ids.shape[1], 3
    chain_tokens = torch.randint(0, VOCAB, (steps, B, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        trained = ttt(head, ids, aux, chain_tokens, steps)
        for t in [0, 3, T - 1]:
            # decoding: the prefix up to t, then the chain of position t alone (T = 1 per step)
            cache = head.new_cache()
            logits, h = head(ids[:, : t + 1], head.fuse(aux[:, : t + 1]), cache, num_logits=1)
            decoded, hiddens = [logits[:, -1]], [head.fuse(aux[:, : t + 1])]
            h = h[:, -1:]
            chain_inputs = [h]
            for j in range(1, steps + 1):
                logits, h = head(chain_tokens[j - 1][:, t: t + 1], h, cache, step=j)
                decoded.append(logits[:, -1])
                chain_inputs.append(h)
            for j in range(steps + 1):
                torch.testing.assert_close(trained[j][:, t], decoded[j], rtol=1e-10, atol=1e-10)
            # reference: SDPA causal over the virtual sequence [prefix 0..t, chain entries 1..steps]
            virtual_ids = torch.cat([ids[:, : t + 1], chain_tokens[:, :, t].T], 1)
            virtual_hidden = torch.cat([hiddens[0]] + chain_inputs[:steps], 1)
            plain, _ = head(virtual_ids, virtual_hidden)
            for j in range(steps + 1):
                torch.testing.assert_close(plain[:, t + j], decoded[j], rtol=1e-10, atol=1e-10)


def test_ttt_gradients_reach_the_trainable_parts_only(setup):
    _, head, ids, aux = setup
    head = Eagle3Head(head.config).to(torch.float64)  # an independent copy with its own embedding
    head.embed_tokens.weight.requires_grad_(False)
    chain_tokens = torch.randint(0, VOCAB, (2, *ids.shape), generator=torch.Generator().manual_seed(5))
    loss = sum(0.8 ** j * lg.logsumexp(-1).mean() for j, lg in enumerate(ttt(head, ids, aux, chain_tokens, 2)))
    loss.backward()
    assert head.embed_tokens.weight.grad is None
    for name, p in head.named_parameters():
        if name != "embed_tokens.weight":
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_chain_steps_need_their_prefix(setup):
    _, head, ids, aux = setup
    cache = head.new_cache()
    with torch.no_grad():
        _, h = head(ids[:, :2], head.fuse(aux[:, :2]), cache)
        with pytest.raises(ValueError, match="prefix"):
            head(ids[:, :3], torch.cat([h, h[:, :1]], 1), cache, step=1)  # 3 chains, 2 prefix positions
        head(ids[:, :2], h, cache, step=1)
        with pytest.raises(ValueError, match="end_chain"):
            head(ids[:, :1], head.fuse(aux[:, 2:3]), cache)
