"""Kernel tests: the Triton kernels run on CPU tensors through Triton's interpreter, so CI needs
no GPU (on a machine with CUDA and TRITON_INTERPRET unset they run on the GPU instead).

Triton picks interpreter or compiler when a kernel is decorated, i.e. when draftdistill.kernels'
modules are first imported; this file is imported at collection, before any test runs, so the
variable is set in time. Nothing in draftdistill imports the kernels at import time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def reference_only(monkeypatch):
    """A divergence added to the registry (for this test only) without a kernel: 'half_tvd',
    0.5 x TVD by default (parameter `weight`). Its name is returned."""
    from draftdistill.losses import DIVERGENCES, make_divergence, tvd

    def half_tvd(student_logits, teacher, mask=None, temperature=1.0, reduction="mean",
                 weight: float = 0.5):
        return weight * tvd(student_logits, teacher, mask=mask, temperature=temperature,
                            reduction=reduction)

    monkeypatch.setitem(DIVERGENCES, "half_tvd", make_divergence("half_tvd", half_tvd, "full"))
    return "half_tvd"
