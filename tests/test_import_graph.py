"""The import graph (scripts/check_imports.py): no cycle, train/ never imports serving/, the lower
layers never import a trainer, and no trainer imports another. Read from the source, nothing imported."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_imports.py"
spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
check_imports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_imports)


def test_the_package_has_no_import_cycle_and_no_forbidden_arrow():
    edges = check_imports.graph()
    assert "draftdistill.train.loop" in edges and "draftdistill.serving.online" in edges  # the folders were read
    assert check_imports.cycles(edges) == []
    assert check_imports.forbidden(edges) == []


def test_the_check_finds_a_cycle_and_a_wrong_arrow():
    """Negative controls: a hand-made cycle and a train -> serving arrow are reported."""
    edges = {"draftdistill.train.loop": {"draftdistill.serving.online"},
             "draftdistill.serving.online": {"draftdistill.train.loop"}, "draftdistill.losses": set()}
    assert check_imports.cycles(edges) == [["draftdistill.serving.online", "draftdistill.train.loop"]]
    assert any("train/ never imports serving/" in line for line in check_imports.forbidden(edges))
    trainers = {"draftdistill.train.eagle3": {"draftdistill.train.drafter"}}
    assert any("another trainer" in line for line in check_imports.forbidden(trainers))


def test_lazy_and_relative_imports_count(tmp_path, monkeypatch):
    """An import inside a function and a relative import are edges too (a lazy import hides a cycle
    from the interpreter, not from a reader); importing a.b.c adds a and a.b."""
    pkg = tmp_path / "draftdistill"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import one\n")
    (pkg / "sub" / "one.py").write_text("def f():\n    from .two import g\n")
    (pkg / "sub" / "two.py").write_text("from draftdistill.sub.one import f\n")
    monkeypatch.setattr(check_imports, "PACKAGES", {"draftdistill": pkg})
    edges = check_imports.graph()
    assert edges["draftdistill.sub.one"] == {"draftdistill.sub.two"}
    assert check_imports.cycles(edges) == [["draftdistill.sub.one", "draftdistill.sub.two"]]
