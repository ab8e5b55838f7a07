"""Kernel tests: the Triton kernels run on CPU tensors through Triton's interpreter, so CI needs
no GPU (on a machine with CUDA and TRITON_INTERPRET unset they run on the GPU instead).

Triton picks interpreter or compiler when a kernel is decorated, i.e. when draftdistill.kernels'
modules are first imported; this file is imported at collection, before any test runs, so the
variable is set in time. Nothing in draftdistill imports the kernels at import time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
