"""`draftdistill bench kernels`: arguments, the GPU-free smoke mode, the refusal without CUDA."""

import pytest
import torch
from click.testing import CliRunner

from draftdistill.cli import main

pytest.importorskip("triton")


def run(*args):
    return CliRunner().invoke(main, ["bench", "kernels", *args])


def test_help_documents_every_option():
    result = run("--help")
    assert result.exit_code == 0
    for option in ("--tokens", "--vocab", "--divergences", "--dtype", "--arms", "--repeats",
                   "--warmup", "--hidden", "--block-size", "--out-dir", "--interpret"):
        assert option in result.output


def test_interpret_smoke_checks_the_fused_path_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("--interpret", "--divergences", "fkl,lk,topk_tail,sampled_rkl")
    assert result.exit_code == 0, result.output
    for name in ("fkl", "lk", "topk_tail", "sampled_rkl", "fused_linear_jsd"):
        assert name in result.output
    assert "MISMATCH" not in result.output and "no timings" in result.output
    assert not any(tmp_path.iterdir())  # a smoke run writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_cuda(tmp_path):
    result = run("--out-dir", str(tmp_path))
    assert result.exit_code != 0 and "no GPU" in result.output and "--interpret" in result.output
    assert not any(tmp_path.iterdir())


def test_default_divergences_are_the_registry_kernels(monkeypatch, reference_only):
    """No --divergences: every registered divergence with a kernel goes to the smoke run (the
    reference-only one is not in the default)."""
    import subprocess

    from draftdistill.losses import kernel_divergences

    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, "ok\n", ""))
    result = run("--interpret")
    assert result.exit_code == 0, result.output
    cmd = seen[0]
    assert cmd[cmd.index("--divergences") + 1] == ",".join(kernel_divergences())
    assert reference_only not in cmd[cmd.index("--divergences") + 1]


def test_a_reference_only_divergence_is_accepted_and_has_nothing_to_check(reference_only):
    from draftdistill.eval.bench_kernels import make_arms, smoke

    result = run("--interpret", "--divergences", f"fkl,{reference_only}")
    assert result.exit_code == 0, result.output
    assert f"{reference_only}" in result.output and "reference only: no kernel" in result.output
    assert "fkl" in result.output and "MISMATCH" not in result.output
    # In process (TRITON_INTERPRET is set for tests/kernels): a row that says so, no fused arm.
    rows = smoke(["fkl", reference_only])
    assert {"divergence": reference_only, "reference_only": True} in rows
    assert set(make_arms(reference_only, ("fused", "eager"))) == {"eager"}
    assert set(make_arms("fkl", ("fused", "eager"))) == {"fused", "eager"}


def test_unknown_divergence_is_refused_naming_the_registry():
    result = run("--interpret", "--divergences", "fkl,kl")
    assert result.exit_code != 0
    assert "'kl'" in result.output and "known: fkl" in result.output
