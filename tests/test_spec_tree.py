"""EAGLE-2 draft trees in the lossless decoder (spec/tree.py, spec/tree_decoder.py).

- tree attention: every node's logits from one masked forward (target: HF Llama; drafter: the
  EAGLE-3 head's tree_step) equal a plain causal forward over the prefix and the node's path;
- verify_tree alone: the first emitted token has law p and, once a child is accepted, the next has
  the law of the target at that child, for children drawn without replacement (chi-square over 20k
  trials); drawing the top-k instead is caught (negative control);
- the decoder: greedy outputs equal the target's greedy decoding for causal-LM drafters and EAGLE-3
  heads, trees of several shapes, budget cuts and eos; sampled outputs follow the target's exact law
  (the chi-square helpers of test_spec.py) for a random LM drafter, the target itself and a head
  over a reduced draft vocabulary; counters add up.
"""
import types

import pytest
import torch
from scipy.stats import chisquare
from test_spec import one_thread  # noqa: F401  (autouse: tiny models run on one thread)
from test_spec import T07_P08, T1, chi_square_pvalue, exact_distribution, hf_greedy, tiny_llama

import draftdistill.spec.tree as tree_module
from draftdistill.models.draft_vocab import DraftVocab
from draftdistill.models.eagle3 import build_eagle3_head, target_aux_hidden_states
from draftdistill.spec import SamplingConfig, SpecStats, TreeConfig, speculative_generate
from draftdistill.spec.kv import check_tree_capable, forward_masked, new_cache
from draftdistill.spec.tree import DraftTree, grow_tree, verify_tree, visibility_rows

PROMPT = torch.tensor([[3, 5, 7, 11]])
TREES = [TreeConfig(depth=1, top_k=1, max_nodes=1), TreeConfig(depth=3, top_k=2, max_nodes=5),
         TreeConfig(depth=5, top_k=4, max_nodes=24), TreeConfig(depth=4, top_k=3, max_nodes=40)]


def fixed_tree() -> DraftTree:
    """root -> a, b; a -> c, d; b -> e; c -> f (tokens 20..25), q uniform: shape only."""
    tree, q = DraftTree.root(11), torch.full((32,), 1 / 32)
    a, b = tree.add_children(0, q, [20, 21])
    c, _ = tree.add_children(a, q, [22, 23])
    tree.add_children(b, q, [24])
    tree.add_children(c, q, [25])
    return tree


def test_tree_bookkeeping():
    tree = fixed_tree()
    assert tree.parents == [-1, 0, 0, 1, 1, 2, 3] and tree.depths == [0, 1, 1, 2, 2, 2, 3]
    assert tree.path_to(6) == [1, 3, 6] and tree.children(1) == [3, 4]
    # node f, fed after the root (the committed prefix, 1 entry) and nodes 1..5: sees root, a, c, itself
    assert visibility_rows(tree, [1, 2, 3, 4, 5], [6], 1).nonzero()[:, 1].tolist() == [0, 1, 3, 6]
    # feeding nodes 3, 4 to a cache that holds 2 committed entries then nodes 1, 2
    rows = visibility_rows(tree, [1, 2], [3, 4], 2)
    assert rows.int().tolist() == [[1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1]]
    kept = tree.keep([0, 2, 5, 1])
    assert kept.tokens == [11, 20, 21, 24] and kept.parents == [-1, 0, 0, 2] and kept.children(1) == []
    with pytest.raises(AssertionError):
        tree.keep([0, 6])  # node 6 without its parents
    with pytest.raises(ValueError):
        TreeConfig(depth=0)


# ---------------------------------------------------------------- tree attention

def test_target_tree_forward_equals_causal_forward_along_each_path():
    target = tiny_llama(32, seed=0, layers=2)
    tree, prompt = fixed_tree(), PROMPT[0].tolist()
    cache = new_cache(target)
    with torch.inference_mode():
        forward_masked(target, cache, prompt[:2], [0, 1], torch.ones(2, 2).tril().bool(), "cpu", 1)  # a cached part
        nodes = list(range(1, len(tree)))
        causal = torch.arange(len(prompt) + len(nodes))[None, :] <= torch.arange(2, len(prompt))[:, None]
        visible = torch.cat([causal, visibility_rows(tree, [], nodes, len(prompt))])
        positions = [2, 3] + [len(prompt) - 1 + tree.depths[n] for n in nodes]
        logits, _ = forward_masked(target, cache, prompt[2:] + [tree.tokens[n] for n in nodes], positions, visible,
                                   "cpu", len(tree))
        for node in range(len(tree)):
            context = prompt + [tree.tokens[n] for n in tree.path_to(node)]
            fresh = target(torch.tensor([context])).logits[0, -1]
            torch.testing.assert_close(logits[node], fresh, rtol=1e-9, atol=1e-9)


def test_eagle3_tree_step_equals_the_chain_through_each_node():
    """Nodes fed depth by depth with tree_step compute what a chain through their ancestors computes."""
    target = tiny_llama(32, seed=0, layers=5)
    head = build_eagle3_head(target, aux_layer_ids=[0, 1, 3], seed=1).double()
    tree, ids = fixed_tree(), PROMPT
    with torch.inference_mode():
        aux, _ = target_aux_hidden_states(target, ids, head.aux_layer_ids)
        prefix = lambda cache: head(ids[:, 1:], head.fuse(aux[:, :-1]), cache, step=0)  # noqa: E731
        cache = head.new_cache()
        _, h0 = prefix(cache)
        state, fed, tree_logits = {0: h0[0, -1]}, [], {}
        P = cache.length
        for depth in (1, 2, 3):
            nodes = [n for n in range(1, len(tree)) if tree.depths[n] == depth]
            logits, h = head.tree_step(torch.tensor([[tree.tokens[n] for n in nodes]]),
                                       torch.stack([state[tree.parents[n]] for n in nodes])[None],
                                       [P - 1 + depth] * len(nodes), visibility_rows(tree, fed, nodes, 0), cache)
            fed += nodes
            state.update({n: h[0, i] for i, n in enumerate(nodes)})
            tree_logits.update({n: logits[0, i] for i, n in enumerate(nodes)})
        for node, got in tree_logits.items():
            chain_cache = head.new_cache()
            _, h = prefix(chain_cache)
            for step, n in enumerate(tree.path_to(node), start=1):
                logits, h = head(torch.tensor([[tree.tokens[n]]]), h[:, -1:], chain_cache, step=step)
            torch.testing.assert_close(got, logits[0, -1], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- verify_tree alone

def random_probs(g, V, zero=None):
    p = torch.rand(V, generator=g, dtype=torch.float64) ** 3
    if zero is not None:
        p[zero] = 0.0
    return p / p.sum()


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_verify_tree_emits_the_target_law_at_every_node(top_k):
    """Root and second-level rows are fixed random laws (q zero where p is not and vice versa): the
    first emitted token follows p_root, and after an accepted child x the next follows p[x]."""
    V, trials = 5, 20000
    g = torch.Generator().manual_seed(top_k)
    p_root, q_root = random_probs(g, V, zero=0), random_probs(g, V, zero=1)
    p_next = torch.stack([random_probs(g, V) for _ in range(V)])
    q_next = torch.stack([random_probs(g, V, zero=v) for v in range(V)])
    cfg = TreeConfig(depth=2, top_k=top_k, max_nodes=top_k * (top_k + 1))
    first, second = torch.zeros(V), torch.zeros(V, V)
    for _ in range(trials):
        tree = grow_tree(9, q_root.log(), lambda t, nodes: q_next[[t.tokens[n] for n in nodes]].log(), cfg, 2, T1, g,
                         set())
        rows = torch.stack([p_root] + [p_next[tree.tokens[n]] for n in range(1, len(tree))])
        path, token = verify_tree(tree, rows, g)
        emitted = [tree.tokens[n] for n in path] + [token]
        first[emitted[0]] += 1
        if path:
            second[emitted[0], emitted[1]] += 1
    assert chisquare(first[p_root > 0], trials * p_root[p_root > 0]).pvalue > 1e-3 and first[0] == 0
    for x in range(V):
        n, keep = second[x].sum(), p_next[x] > 0
        if n > 200:
            assert chisquare(second[x][keep], n * p_next[x][keep] / p_next[x][keep].sum()).pvalue > 1e-3


def test_verify_tree_greedy_follows_the_argmax():
    tree = fixed_tree()
    rows = torch.zeros(len(tree), 32)
    rows[0, 20] = rows[1, 22] = rows[3, 7] = 1  # root -> a (20) -> c (22) -> 7 is not a child of c
    assert verify_tree(tree, rows) == ([1, 3], 7)
    rows[3] = 0
    rows[3, 25] = rows[6, 4] = 1  # ... -> f (25), a leaf: bonus token 4
    assert verify_tree(tree, rows) == ([1, 3, 6], 4)


# ---------------------------------------------------------------- the decoder, greedy

@pytest.fixture(scope="module")
def lm_setup():
    target = tiny_llama(32, seed=0, layers=2)
    return target, {"self": target, "random": tiny_llama(32, seed=1, layers=1)}, hf_greedy(target, PROMPT, 40)


@pytest.mark.parametrize("cfg", TREES)
@pytest.mark.parametrize("drafter_name", ["self", "random"])
def test_greedy_equals_target_greedy_lm_drafter(lm_setup, drafter_name, cfg):
    target, drafters, reference = lm_setup
    for n in (40, 7):  # 7: the budget cuts the last tree short
        tokens, stats = speculative_generate(target, drafters[drafter_name], PROMPT, n, tree=cfg)
        assert tokens.tolist() == reference[:n] and stats.new_tokens == n
    if drafter_name == "self":
        assert stats.alpha == 1.0


def test_models_that_cannot_take_a_tree_mask_are_refused_before_any_forward(lm_setup):
    from test_spec import Adversarial  # its forward takes input_ids, past_key_values and use_cache only

    target, _, _ = lm_setup
    with pytest.raises(ValueError, match="attention_mask and position_ids"):
        speculative_generate(target, Adversarial(target), PROMPT, 8, tree=TREES[1])

    class FlashAttentionLM(torch.nn.Module):  # reads a 4D mask as a padding mask: the tree would be ignored
        config = types.SimpleNamespace(_attn_implementation="flash_attention_2")

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
            raise AssertionError("refused before any forward")

    with pytest.raises(ValueError, match="eager or sdpa"):
        check_tree_capable(FlashAttentionLM(), new_cache(target))


def test_greedy_stops_right_after_eos(lm_setup):
    target, drafters, reference = lm_setup
    eos = reference[10]
    stop = reference.index(eos) + 1
    tokens, _ = speculative_generate(target, drafters["self"], PROMPT, 40, tree=TREES[2], eos_token_id=eos)
    assert tokens.tolist() == reference[:stop]


@pytest.fixture(scope="module")
def eagle3_setup():
    from test_spec_eagle3 import train_head

    target = tiny_llama(32, seed=0, layers=5)
    reduced = DraftVocab(list(range(0, 32, 2)), 32)
    heads = {
        "random": build_eagle3_head(target, aux_layer_ids=[0, 1, 3], seed=1),
        "trained": train_head(build_eagle3_head(target, aux_layer_ids=[0, 1, 3], seed=3), target),
        "trained_reduced": train_head(build_eagle3_head(target, reduced, aux_layer_ids=[1, 2, 3], seed=4), target),
    }
    return target, heads, hf_greedy(target, PROMPT, 60)


@pytest.mark.parametrize("cfg", TREES[1:])
@pytest.mark.parametrize("head_name", ["random", "trained", "trained_reduced"])
def test_greedy_equals_target_greedy_eagle3(eagle3_setup, head_name, cfg):
    target, heads, reference = eagle3_setup
    tokens, stats = speculative_generate(target, heads[head_name], PROMPT, 60, tree=cfg)
    assert tokens.tolist() == reference
    if head_name == "trained":  # a real tree walk: accepted paths of several depths
        assert stats.accepted[0] > 0 and stats.accepted[1] > 0


def test_a_tree_keeps_more_tokens_per_forward_than_a_chain_on_a_trained_head(eagle3_setup):
    """On the trained head, a tree of the chain's depth with 4 children per node keeps more tokens per
    target forward than the chain."""
    target, heads, _ = eagle3_setup
    _, chain = speculative_generate(target, heads["trained"], PROMPT, 60, gamma=3)
    _, tree = speculative_generate(target, heads["trained"], PROMPT, 60,
                                   tree=TreeConfig(depth=3, top_k=4, max_nodes=30))
    assert tree.tau > chain.tau


# ---------------------------------------------------------------- the decoder, sampled

def tree_sample_counts(target, drafter, sampling, cfg, n, length=3, seed=1234, eos=None):
    generator = torch.Generator().manual_seed(seed)
    counts, total = {}, SpecStats()
    for _ in range(n):
        tokens, stats = speculative_generate(target, drafter, torch.tensor([[0, 2]]), length, sampling=sampling,
                                             generator=generator, tree=cfg, eos_token_id=eos)
        counts[tuple(tokens.tolist())] = counts.get(tuple(tokens.tolist()), 0) + 1
        total = total.merge(stats)
    return counts, total


@pytest.fixture(scope="module")
def dist_setup():
    target = tiny_llama(6, seed=3, hidden=16, heads=2, kv_heads=1, init=0.3)
    deep = tiny_llama(6, seed=3, layers=4, hidden=16, heads=2, kv_heads=1, init=0.3)
    return {
        "random": (target, tiny_llama(6, seed=4, hidden=16, heads=2, kv_heads=1, init=0.3)),
        "self": (target, target),
        "head_reduced": (deep, build_eagle3_head(deep, DraftVocab([0, 2, 3, 5], 6), aux_layer_ids=[0, 1, 2], seed=6)),
    }


@pytest.mark.parametrize("drafter_name, sampling, cfg, eos", [
    ("random", T1, TreeConfig(depth=2, top_k=2, max_nodes=6), None),
    ("random", T07_P08, TreeConfig(depth=2, top_k=3, max_nodes=5), None),  # budget: the second level is partial
    ("self", T1, TreeConfig(depth=2, top_k=2, max_nodes=4), None),
    ("head_reduced", T1, TreeConfig(depth=2, top_k=2, max_nodes=6), None),  # q = 0 on tokens 1 and 4
    ("random", T1, TreeConfig(depth=2, top_k=3, max_nodes=12), [1]),  # eos ends sequences; eos nodes get no children
])
def test_sampled_output_follows_target_distribution(dist_setup, drafter_name, sampling, cfg, eos):
    target, drafter = dist_setup[drafter_name]
    n = 3000
    exact = exact_distribution(target, [0, 2], 3, sampling, eos=eos or ())
    counts, stats = tree_sample_counts(target, drafter, sampling, cfg, n, eos=eos)
    assert sum(counts.values()) == n and stats.new_tokens == sum(len(s) * c for s, c in counts.items())
    assert chi_square_pvalue(counts, exact, n) > 1e-3
    assert 0.05 < stats.alpha < 1.0 or drafter_name == "self", stats  # accept and reject paths both ran
    if drafter_name == "self":
        assert stats.alpha_per_position[0] == 1.0  # the first child is drawn from q = p: always accepted


def test_chi_square_catches_top_k_children_under_sampling(dist_setup, monkeypatch):
    """Negative control: EAGLE-2's top-k children with sampling verification are biased (a child is
    tried because of its own q, not drawn from q), and the distribution test sees it."""
    target, drafter = dist_setup["random"]
    real_pick = tree_module.pick_children
    monkeypatch.setattr(tree_module, "pick_children", lambda q, k, greedy, g: real_pick(q, k, True, g))
    exact = exact_distribution(target, [0, 2], 3, T1)
    counts, _ = tree_sample_counts(target, drafter, T1, TreeConfig(depth=2, top_k=2, max_nodes=6), 1000)
    assert chi_square_pvalue(counts, exact, 1000) < 1e-6


# ---------------------------------------------------------------- stats

def test_stats_of_a_chain_shaped_tree(lm_setup):
    """top_k 1: a chain of `depth` drafts per round; with the target as drafter every one is kept."""
    target, drafters, reference = lm_setup
    tokens, stats = speculative_generate(target, drafters["self"], PROMPT, 3 * 4 + 2,
                                         tree=TreeConfig(depth=3, top_k=1, max_nodes=3))
    assert tokens.tolist() == reference[:14]
    assert stats.target_calls == 4 and stats.proposed == [4, 3, 3] and stats.accepted == stats.proposed
    assert stats.drafter_calls == 3 * 3 + 1  # one forward per depth: the root, then each expanded depth
    assert stats.drafts_scored == 3 * 3 + 1
    _, sampled = speculative_generate(target, drafters["random"], PROMPT, 20, sampling=SamplingConfig(temperature=1.0),
                                      tree=TREES[2], generator=torch.Generator().manual_seed(0))
    assert sampled.new_tokens == 20 and sum(sampled.accepted) + sampled.target_calls == 20
    assert sampled.target_calls < sampled.drafts_scored <= 24 * sampled.target_calls
