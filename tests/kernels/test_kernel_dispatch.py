"""Registration into the losses registry, fallbacks, and GPU-free build checks."""

import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import IGNORE_LOG0, compare, fused_divergence, logits_pair, rand

from draftdistill.kernels.dispatch import register
from draftdistill.losses import DIVERGENCES, FUSED_KERNELS, TeacherTopK

pytestmark = IGNORE_LOG0


def test_register_fills_every_divergence_and_keeps_user_kernels():
    saved = dict(FUSED_KERNELS)
    try:
        FUSED_KERNELS.clear()
        mine = FUSED_KERNELS["tvd"] = lambda *a, **k: None
        register()
        assert set(FUSED_KERNELS) == set(DIVERGENCES)
        assert FUSED_KERNELS["tvd"] is mine
        # The registered functions have the reference signature and results.
        s, t, mask = logits_pair((4,), 33, seed=1)
        a = s.clone().requires_grad_(True)
        ours = FUSED_KERNELS["jsd"](a, t, mask, 1.0, "mean", beta=0.2)
        ref = DIVERGENCES["jsd"].fn(s, t, mask=mask, beta=0.2)
        torch.testing.assert_close(ours, ref)
    finally:
        FUSED_KERNELS.clear()
        FUSED_KERNELS.update(saved)


def test_float64_goes_to_the_reference_exactly():
    s, t, mask = logits_pair((3,), 20, dtype=torch.float64, seed=2)
    ours = fused_divergence("rkl", s, t, mask)
    assert ours.equal(DIVERGENCES["rkl"].fn(s, t, mask=mask))


def test_invalid_inputs_raise_the_reference_errors():
    s, t = rand(2, 8), rand(2, 8, seed=1)
    with pytest.raises(TypeError, match="use 'topk_tail'"):
        fused_divergence("fkl", s, TeacherTopK(torch.zeros(2, 1, dtype=torch.long), t[:, :1]))
    with pytest.raises(ValueError, match="beta"):
        fused_divergence("jsd", s, t, beta=2.0)
    with pytest.raises(ValueError, match="unknown parameter"):
        fused_divergence("fkl", s, t, beta=0.5)
    with pytest.raises(ValueError, match="reduction"):
        fused_divergence("fkl", s, t, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        fused_divergence("fkl", s, t, temperature=0.0)
    with pytest.raises(ValueError, match="teacher shape|teacher vocabulary"):
        fused_divergence("fkl", s, rand(2, 9))


def test_grad_output_scales_in_place_once():
    s, t, mask = logits_pair((5,), 40, seed=3)
    compare("lk", s, t, mask, 1.0, "sum", block_size=16)  # grad_output 2.5


def test_importing_draftdistill_does_not_import_triton():
    code = ("import sys, draftdistill.losses, draftdistill.kernels, draftdistill.cli; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter runs the kernels as Python; the compiler is stricter. Compile the bf16
    # variants with Triton's CUDA backend and ptxas, as a launch on an H100 would.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "draftdistill.kernels.compile_check",
                           "--dtypes", "bf16"], env=env, capture_output=True, text=True)
    if "ptxas" in done.stderr and "not found" in done.stderr:  # pragma: no cover
        pytest.skip("no ptxas in this Triton install")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "local-memory" not in done.stdout  # no register spills at the default tile
