"""Helpers shared by the SGLang tests (imported by conftest.py and the test modules)."""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def sglang_paths() -> tuple[Path | None, Path | None, str]:
    """(venv python, sglang-cpu scripts dir, reason when unavailable)."""
    if os.environ.get("DRAFTDISTILL_SGLANG_TESTS", "1") == "0":
        return None, None, "DRAFTDISTILL_SGLANG_TESTS=0"
    venv = Path(os.environ.get("DRAFTDISTILL_SGLANG_VENV") or REPO / ".venv-sglang")
    scripts = Path(os.environ.get("DRAFTDISTILL_SGLANG_CPU") or REPO.parent / "shared" / "sglang-cpu")
    python = venv / "bin" / "python"
    if not python.exists():
        return None, None, f"no SGLang venv at {venv} (build it with shared/sglang-cpu/install.sh, " \
                           "or set DRAFTDISTILL_SGLANG_VENV)"
    if not (scripts / "serve.sh").exists():
        return None, None, f"no sglang-cpu scripts at {scripts} (set DRAFTDISTILL_SGLANG_CPU)"
    return python, scripts, ""


PLUGIN_SHIM = '''
"""Test shim: the draftdistill entry point, loading serving/plugin.py by path (the server venv
does not have draftdistill installed)."""
import importlib.util, sys
_spec = importlib.util.spec_from_file_location("draftdistill_test_plugin", {path!r})
_mod = importlib.util.module_from_spec(_spec)
sys.modules["draftdistill_test_plugin"] = _mod
_spec.loader.exec_module(_mod)
register = _mod.register
'''


def write_plugin_dist(root: Path) -> Path:
    """A directory that, on PYTHONPATH, makes importlib.metadata find a distribution with
    draftdistill's `sglang.srt.plugins` entry point (pointing at a shim that loads plugin.py)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "draftdistill_test_plugin_shim.py").write_text(PLUGIN_SHIM.format(path=str(REPO / "serving" / "plugin.py")))
    dist = root / "draftdistill_plugin_test-0.0.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: draftdistill-plugin-test\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[sglang.srt.plugins]\n"
                                           "draftdistill = draftdistill_test_plugin_shim:register\n")
    return root


def run_in_venv(python: Path, code: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` with the SGLang venv's python (cwd = repo), output captured."""
    return subprocess.run([str(python), "-c", textwrap.dedent(code)], cwd=str(REPO), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
