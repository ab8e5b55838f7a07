#!/usr/bin/env python
"""The package's import graph, read from the source (nothing is imported): fails on a cycle and on
an arrow that points the wrong way.

    python scripts/check_imports.py        # prints the cycles and forbidden arrows; exit 1 if any

Every import counts, at module level or inside a function: a lazy import hides a cycle from the
interpreter, not from a reader. Importing `a.b.c` also runs `a/__init__` and `a/b/__init__`, so
those edges are in the graph too. The rules (DESIGN.md, "the trainer layer"):
- no cycle anywhere;
- train/ never imports serving/, and the lower layers (models, losses, spec, data, eval, export,
  kernels) import neither train/, opd/ nor serving/;
- no trainer imports another (train/drafter.py, train/eagle3.py, opd/trainer.py, serving/online.py).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Installed names of the source folders (pyproject's package-dir).
PACKAGES = {"draftdistill": ROOT / "draftdistill", "draftdistill.kernels": ROOT / "kernels",
            "draftdistill.serving": ROOT / "serving"}
LOWER = ("models", "losses", "spec", "data", "eval", "export", "kernels")
TRAINERS = ("draftdistill.train.drafter", "draftdistill.train.eagle3", "draftdistill.opd.trainer",
            "draftdistill.serving.online")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if path.name == "__init__.py" or name not in found:
                found[name] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies in."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    base = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                stem = f"{anchor}.{node.module}" if node.module else anchor
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        for name in names:
            target = resolve(name, known)
            if target is None or target == module or module.startswith(target + "."):
                continue  # a module's own packages are already running when it is imported
            targets.add(target)
            parent = target.rpartition(".")[0]
            while parent:  # importing a.b.c runs a/__init__ and a/b/__init__
                if parent in known and parent != module and not module.startswith(parent + "."):
                    targets.add(parent)
                parent = parent.rpartition(".")[0]
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def forbidden(edges: dict[str, set[str]]) -> list[str]:
    def inside(module: str, area: str) -> bool:
        return module == f"draftdistill.{area}" or module.startswith(f"draftdistill.{area}.")

    wrong = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if inside(source, "train") and inside(target, "serving"):
                wrong.append(f"{source} -> {target}: train/ never imports serving/")
            if any(inside(source, low) for low in LOWER) \
                    and any(inside(target, up) for up in ("train", "opd", "serving")) \
                    and target != "draftdistill.train.distributed" \
                    and not target.startswith("draftdistill.train.distributed"):
                wrong.append(f"{source} -> {target}: a lower layer imports a trainer layer")
            if source in TRAINERS and target in TRAINERS:
                wrong.append(f"{source} -> {target}: a trainer imports another trainer")
    return wrong


def main() -> int:
    edges = graph()
    problems = [" <-> ".join(c) for c in cycles(edges)] + forbidden(edges)
    for line in problems:
        print(line)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports: "
          f"{'no cycle, no forbidden arrow' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
