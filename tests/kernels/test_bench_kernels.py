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
