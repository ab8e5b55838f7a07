"""Acceptance harness, the HF assisted-generation peer, and plots."""
from .acceptance import evaluate_drafter
from .plots import plot_alpha_per_position

__all__ = ["evaluate_drafter", "plot_alpha_per_position"]
