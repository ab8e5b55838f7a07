"""Shared inputs and the kernel-vs-reference comparison for tests/kernels."""

import pytest
import torch

triton = pytest.importorskip("triton")

from draftdistill.kernels import fused_divergence  # noqa: E402
from draftdistill.kernels._common import INTERPRET  # noqa: E402
from draftdistill.losses import DIVERGENCES, kernel_divergences  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("kernels imported without TRITON_INTERPRET and no GPU", allow_module_level=True)

# The interpreter warns (numpy) on log(0), e.g. an empty top-k tail; that -inf is intended.
IGNORE_LOG0 = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


def kernel_variants(edge_cases=(), needs=None):
    """(name, params) for the kernel tests: every registry divergence with a kernel (taking
    teacher form `needs`, when given) at its defaults, then the edge cases listed for those.
    Reference-only divergences (no kernel) are left out."""
    names = kernel_divergences(needs)
    return [(n, {}) for n in names] + [(n, p) for n, p in edge_cases if n in names]


def variant_id(name, params):
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def rand(*shape, scale=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def mask_of(lead, seed=0):
    """Some positions dropped (never all)."""
    g = torch.Generator().manual_seed(seed + 100)
    keep = torch.rand(lead, generator=g) > 0.3
    keep.view(-1)[0] = True
    return keep.to(DEVICE)


def logits_pair(lead, V, dtype=torch.float32, seed=0, special=True):
    """Student and teacher logits [*lead, V] with the awkward values the reference handles:
    -inf entries (filtered vocabulary) in both, and NaN / inf garbage in dropped positions."""
    s, t = rand(*lead, V, seed=seed, dtype=dtype), rand(*lead, V, seed=seed + 1, dtype=dtype)
    mask = mask_of(lead, seed)
    if special:
        s.view(-1, V)[0, 3] = float("-inf")
        t.view(-1, V)[0, 5] = float("-inf")
        t.view(-1, V)[0, 3] = float("-inf")
        drop = ~mask.view(-1)
        s.view(-1, V)[drop, 0] = float("nan")
        t.view(-1, V)[drop, 1] = float("inf")
    return s, t, mask


def tolerances(dtype):
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-5)
    return dict(rtol=2e-2, atol=1e-4)  # both gradients are float32 rounded to 16 bits


def compare(name, student, teacher, mask=None, temperature=1.0, reduction="mean",
            block_size=None, **params):
    """Fused and reference: same loss, and the same gradient under a non-trivial grad_output."""
    a = student.detach().clone().requires_grad_(True)
    b = student.detach().clone().requires_grad_(True)
    ours = fused_divergence(name, a, teacher, mask, temperature, reduction,
                            block_size=block_size, **params)
    ref = DIVERGENCES[name].fn(b, teacher, mask=mask, temperature=temperature,
                               reduction=reduction, **params)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    weight = torch.rand(ref.shape, generator=torch.Generator().manual_seed(7)).to(ref.device) \
        if reduction == "none" else torch.tensor(2.5, device=ref.device)
    (ours * weight).sum().backward()
    (ref * weight).sum().backward()
    assert a.grad.dtype == b.grad.dtype == student.dtype
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tolerances(student.dtype))
    return ours, a.grad
