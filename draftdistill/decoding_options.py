"""Command-line options for the decoder's draft shape, shared by `draftdistill eval` and `serve embedded`.

Kept apart from draftdistill.spec so that building the CLI (and `--help`) does not import torch."""
from __future__ import annotations

import click


def tree_options(command):
    """--tree-depth/--tree-top-k/--tree-max-nodes: draft EAGLE-2 trees instead of chains."""
    # Defaults are TreeConfig's (draftdistill/spec/tree.py); tests/test_cli.py checks that they agree.
    command = click.option("--tree-max-nodes", default=24, show_default=True, type=click.IntRange(min=1),
                           help="Tree decoding: draft tokens per tree at most (EAGLE-2's total_tokens).")(command)
    command = click.option("--tree-top-k", default=4, show_default=True, type=click.IntRange(min=1),
                           help="Tree decoding: children per expanded node, and nodes expanded per depth.")(command)
    return click.option("--tree-depth", default=0, show_default=True, type=click.IntRange(min=0),
                        help="Draft an EAGLE-2 dynamic tree this deep per round instead of a chain of --gamma "
                             "tokens (0: chain). Lossless for greedy and sampled decoding alike.")(command)


def tree_config(depth: int, top_k: int, max_nodes: int):
    """The TreeConfig the options ask for, or None for chain drafting."""
    from draftdistill.spec import TreeConfig

    return TreeConfig(depth=depth, top_k=top_k, max_nodes=max_nodes) if depth > 0 else None
