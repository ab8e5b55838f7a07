"""Draft trees: EAGLE-2's dynamic tree, drafted by any drafter and verified losslessly.

A round drafts a tree instead of a chain. Node 0 is the root, the last committed token; every other
node is a draft token whose parent is an earlier node, so children follow their parents and
siblings sit in the order they were drafted. The target scores every node in ONE forward under a
tree attention mask (a node sees the committed prefix, its ancestors and itself), and verification
walks down from the root keeping the longest accepted path.

Growing the tree (EAGLE-2, Li et al. 2024): a node's score is the product of the drafter's q along
its path, the drafter's own estimate that the target keeps it. Depth by depth, the `top_k`
best-scoring nodes of the last depth are expanded with `top_k` children each (one drafter forward
per depth for all of them). How the children are picked decides what verification may assume:
  - greedy decoding: children are the top-k tokens of the drafter's softmax, and the grown tree is
    cut to the `max_nodes` best-scoring nodes (scores fall along a path, parents win ties, so the
    kept set is a tree). Any tree is lossless at temperature 0: a child is kept iff it is the
    target's argmax.
  - sampling: children are drawn WITHOUT replacement from q (Gumbel top-k), and no child is dropped
    after it was drawn, since keeping a candidate because of its own value would bias the output.
    Choosing which nodes to expand from their scores is safe: a node's children only matter once
    the node itself is accepted. The tree stops growing at `max_nodes` drafts (the last expanded
    node may get fewer children).

Verification at a node (recursive rejection sampling; SpecInfer, Miao et al. 2024, with draws
without replacement as in Jeon et al. 2024): with the target's p and the drafter's q at the node,
try the children x_1, x_2, ... in draw order. Accept x_i with probability min(1, p(x_i) / q(x_i))
and move down to it; otherwise p <- norm(max(p - q, 0)) and q <- q without x_i, renormalised. When
no child is accepted (or there is none), the next token is drawn from p. Each try is exact
speculative sampling for a candidate drawn from q, and the residual after a rejection does not
depend on which candidate was rejected, so by induction over the children the emitted token has
law exactly p, whatever the drafter, the tree's shape or the number of children.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import SamplingConfig, logits_to_probs


@dataclass(frozen=True)
class TreeConfig:
    depth: int = 5  # most draft tokens on one path (EAGLE-2's depth)
    top_k: int = 4  # children per expanded node, and nodes expanded per depth
    max_nodes: int = 24  # draft tokens per tree at most (EAGLE-2's total_tokens, root not counted)

    def __post_init__(self):
        if self.depth < 1 or self.top_k < 1 or self.max_nodes < 1:
            raise ValueError(f"tree depth, top_k and max_nodes must be >= 1, got {self}")


@dataclass
class DraftTree:
    """Nodes in creation order; node 0 is the root (the last committed token, never verified)."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    log_scores: list[float] = field(default_factory=lambda: [0.0])  # sum of log q along the path
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> q its children came from

    @classmethod
    def root(cls, token: int) -> "DraftTree":
        return cls(tokens=[token])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_drafts(self) -> int:
        return len(self.tokens) - 1

    def children(self, node: int) -> list[int]:
        return [i for i, parent in enumerate(self.parents) if parent == node]

    def add_children(self, node: int, q: torch.Tensor, tokens: list[int]) -> list[int]:
        """Attach `tokens` (drafted from q, in draw order) under `node`; returns their node ids."""
        self.draft_probs[node] = q
        log_q = q[tokens].log().tolist()  # one read for all of them (one device sync on a GPU)
        ids = []
        for token, log_p in zip(tokens, log_q):
            ids.append(len(self.tokens))
            self.tokens.append(token)
            self.parents.append(node)
            self.depths.append(self.depths[node] + 1)
            self.log_scores.append(self.log_scores[node] + log_p)
        return ids

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root's first child down to `node`."""
        path = []
        while node > 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def keep(self, nodes: list[int]) -> "DraftTree":
        """The subtree of `nodes` (must hold the root and every kept node's parent), renumbered in order."""
        nodes = sorted(set(nodes))
        new_id = {old: new for new, old in enumerate(nodes)}
        assert nodes[0] == 0 and all(self.parents[i] in new_id for i in nodes[1:]), "kept nodes must form a tree"
        return DraftTree(
            tokens=[self.tokens[i] for i in nodes],
            parents=[-1] + [new_id[self.parents[i]] for i in nodes[1:]],
            depths=[self.depths[i] for i in nodes],
            log_scores=[self.log_scores[i] for i in nodes],
            draft_probs={new_id[i]: q for i, q in self.draft_probs.items() if i in new_id},
        )


# ---------------------------------------------------------------- growing

def pick_children(q: torch.Tensor, k: int, greedy: bool, generator: torch.Generator | None) -> list[int]:
    """k children from q [V]: its top-k (greedy), or k draws without replacement (Gumbel top-k),
    never a token with q = 0. Returned in draw order (best first when greedy)."""
    q = q.to(generator.device if generator is not None else q.device, torch.float64)
    k = min(k, int((q > 0).sum()))
    if greedy:
        return q.topk(k).indices.tolist()
    # argmax of log q + Gumbel noise, taken k times without putting back: k ordered draws w/o replacement
    u = torch.rand(q.shape, generator=generator, device=q.device, dtype=torch.float64).clamp_min(1e-300)
    keys = q.log() - torch.log(-torch.log(u))
    return keys.topk(k).indices.tolist()


def nodes_to_expand(tree: DraftTree, depth: int, k: int, eos: set[int]) -> list[int]:
    """The k best-scoring nodes at `depth` (ties: the earlier node); eos ends a path."""
    frontier = [i for i, d in enumerate(tree.depths) if d == depth and (i == 0 or tree.tokens[i] not in eos)]
    return sorted(frontier, key=lambda i: (-tree.log_scores[i], i))[:k]


def cut_to_best(tree: DraftTree, max_nodes: int) -> DraftTree:
    """Keep the root and the max_nodes best-scoring drafts: a tree, as a child never outscores its
    parent and ties go to the earlier (parent) node. Greedy decoding only (see the module docstring)."""
    ranked = sorted(range(1, len(tree)), key=lambda i: (-tree.log_scores[i], i))
    return tree.keep([0] + ranked[:max_nodes])


def visibility_rows(tree: DraftTree, fed: list[int], new: list[int], prefix_len: int) -> torch.Tensor:
    """Attention rows for feeding `new` nodes to a model whose cache holds `prefix_len` committed
    entries then the `fed` nodes: [len(new), prefix_len + len(fed) + len(new)], True where a new
    node may look (the whole prefix, its fed ancestors, itself)."""
    column = {node: prefix_len + i for i, node in enumerate(fed + new)}
    rows = torch.zeros(len(new), prefix_len + len(fed) + len(new), dtype=torch.bool)
    rows[:, :prefix_len] = True
    for r, node in enumerate(new):
        for ancestor in tree.path_to(node):
            rows[r, column[ancestor]] = True
    return rows


def draft_distribution(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The q a tree's children come from: the sampling distribution, or for greedy decoding (whose
    one-hot would leave one child) the drafter's softmax, used to rank and score."""
    return logits.float().softmax(-1) if sampling.greedy else logits_to_probs(logits, sampling)


def grow_tree(root_token: int, root_logits: torch.Tensor, expand: Callable[[DraftTree, list[int]], torch.Tensor],
              cfg: TreeConfig, depth: int, sampling: SamplingConfig, generator, eos: set[int]) -> DraftTree:
    """EAGLE-2's expansion (module docstring). root_logits [V]: the drafter's logits after the root;
    expand(tree, nodes) feeds `nodes` (all at one depth) to the drafter in one forward and returns
    their logits [len(nodes), V]. depth: at most this many draft tokens on a path (<= cfg.depth)."""
    tree = DraftTree.root(root_token)
    if depth < 1:
        return tree
    greedy, k = sampling.greedy, cfg.top_k
    depth = min(depth, cfg.max_nodes)  # no kept path is longer than the budget: do not draft deeper
    first = k if greedy else min(k, cfg.max_nodes)  # sampling: never draw more than the budget
    q = draft_distribution(root_logits, sampling)
    tree.add_children(0, q, pick_children(q, first, greedy, generator))
    for d in range(1, depth):
        nodes = nodes_to_expand(tree, d, k, eos)
        # Sampling: as many children as the budget holds, the count fixed before any is drawn.
        budget = cfg.max_nodes - tree.num_drafts if not greedy else len(nodes) * k
        counts = [c for c in (min(k, budget - i * k) for i in range(len(nodes))) if c > 0]
        nodes = nodes[: len(counts)]
        if not nodes:
            break
        for node, count, logits in zip(nodes, counts, expand(tree, nodes)):
            q = draft_distribution(logits, sampling)
            tree.add_children(node, q, pick_children(q, count, greedy, generator))
    return cut_to_best(tree, cfg.max_nodes) if greedy else tree


# ---------------------------------------------------------------- verification

def verify_tree(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[list[int], int]:
    """Walk the tree with recursive rejection sampling (module docstring).

    target_probs [len(tree), V]: row i is the target's distribution of the token after node i.
    Returns (accepted node ids from the root down, the next token drawn from the target)."""
    assert target_probs.shape[0] == len(tree), "need one target row per node, root included"
    dev = generator.device if generator is not None else target_probs.device
    path, node = [], 0
    while True:
        p = target_probs[node].to(dev, torch.float64)
        accepted = None
        if tree.children(node):
            q = tree.draft_probs[node].to(dev, torch.float64).clone()
            for child in tree.children(node):
                x = tree.tokens[child]
                u = torch.rand((), generator=generator, device=dev, dtype=torch.float64)
                if u * q[x] < p[x]:  # u < p/q without dividing (see verify.py)
                    accepted = child
                    break
                residual = (p - q).clamp_min(0.0)
                if residual.sum() > 0:  # a sum of 0 means p == q, where rejection cannot happen
                    p = residual / residual.sum()
                q[x] = 0.0
                if q.sum() > 0:
                    q = q / q.sum()
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
        node = accepted
