"""Training loops: on-policy drafter distillation, checkpoints and resume."""
from .config import load_config
from .drafter_opd import DrafterOPDConfig, train_drafter

__all__ = ["load_config", "DrafterOPDConfig", "train_drafter"]
