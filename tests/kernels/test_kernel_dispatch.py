"""Registration into the losses registry, fallbacks, and GPU-free build checks."""

import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import (DEVICE, IGNORE_LOG0, compare, fused_divergence, kernel_variants,
                            logits_pair, mask_of, rand)

from draftdistill.eval.bench_kernels import make_inputs
from draftdistill.kernels import compile_check, fused_linear_divergence, linear_divergence_reference
from draftdistill.kernels.dispatch import kernel_module, register
from draftdistill.kernels.fused_linear import TeacherHidden
from draftdistill.losses import (DIVERGENCES, FUSED_KERNELS, TeacherTopK, divergence_names,
                                 kernel_divergences)

pytestmark = IGNORE_LOG0


def test_register_fills_every_divergence_and_keeps_user_kernels():
    saved = dict(FUSED_KERNELS)
    try:
        FUSED_KERNELS.clear()
        mine = FUSED_KERNELS["tvd"] = lambda *a, **k: None
        register()
        assert set(FUSED_KERNELS) == set(kernel_divergences())
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


@pytest.mark.parametrize("name", kernel_divergences())
def test_every_kernel_divergence_matches_its_reference_at_defaults(name):
    """Whatever the registry declares a kernel for, in the teacher form it `needs`."""
    module = kernel_module(name)
    assert callable(module.supports) and callable(module.loss_and_grad)
    assert list(compile_check.variants(("bf16",), [name]))  # compile_check covers it
    s, t = make_inputs(name, 5, 40, torch.float32, DEVICE, seed=3)
    compare(name, s.detach(), t, mask_of((5,), seed=3), 0.9, "mean", block_size=16)


def test_a_reference_only_divergence_is_skipped_by_kernel_tests_dispatch_and_compile_check(
        reference_only):
    name = reference_only
    assert name in divergence_names() and name not in kernel_divergences()
    assert name not in [n for n, _ in kernel_variants([(name, {"weight": 0.1})])]
    assert kernel_module(name) is None
    saved = dict(FUSED_KERNELS)
    try:
        FUSED_KERNELS.clear()
        register()
        assert name not in FUSED_KERNELS and set(FUSED_KERNELS) == set(kernel_divergences())
    finally:
        FUSED_KERNELS.clear()
        FUSED_KERNELS.update(saved)
    # The fused entry points run its reference, exactly.
    s, t, mask = logits_pair((4,), 30, seed=6)
    ours = fused_divergence(name, s, t, mask, weight=0.2)
    assert ours.equal(DIVERGENCES[name].fn(s, t, mask=mask, weight=0.2))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 8, generator=g).to(DEVICE)
    w = torch.randn(30, 8, generator=g).to(DEVICE)
    teacher = TeacherHidden(torch.randn(4, 8, generator=g).to(DEVICE),
                            torch.randn(30, 8, generator=g).to(DEVICE))
    torch.testing.assert_close(fused_linear_divergence(name, h, w, teacher, chunk_size=2),
                               linear_divergence_reference(name, h, w, teacher))
    # compile_check compiles the kernels' launches only, and refuses to be asked for it.
    labels = [v[0] for v in compile_check.variants(("bf16",))]
    assert labels and len(labels) == len(set(labels))
    with pytest.raises(ValueError, match="reference-only"):
        list(compile_check.variants(("bf16",), [name]))


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
