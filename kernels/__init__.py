"""Triton kernels that fuse softmax, divergence and gradient over large vocabularies.

Installed as ``draftdistill.kernels``. Every kernel sits beside its reference in
``draftdistill.losses``; the losses dispatch here on CUDA only.
"""
