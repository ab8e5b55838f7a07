"""Command-line options for the decoder's draft shape, shared by `draftdistill eval` and `serve embedded`."""
from __future__ import annotations

import click

from .tree import TreeConfig


def tree_options(command):
    """--tree-depth/--tree-top-k/--tree-max-nodes: draft EAGLE-2 trees instead of chains."""
    command = click.option("--tree-max-nodes", default=TreeConfig.max_nodes, show_default=True, type=click.IntRange(min=1),
                           help="Tree decoding: draft tokens per tree at most (EAGLE-2's total_tokens).")(command)
    command = click.option("--tree-top-k", default=TreeConfig.top_k, show_default=True, type=click.IntRange(min=1),
                           help="Tree decoding: children per expanded node, and nodes expanded per depth.")(command)
    return click.option("--tree-depth", default=0, show_default=True, type=click.IntRange(min=0),
                        help="Draft an EAGLE-2 dynamic tree this deep per round instead of a chain of --gamma "
                             "tokens (0: chain). Lossless for greedy and sampled decoding alike.")(command)


def tree_config(depth: int, top_k: int, max_nodes: int) -> TreeConfig | None:
    return TreeConfig(depth=depth, top_k=top_k, max_nodes=max_nodes) if depth > 0 else None
