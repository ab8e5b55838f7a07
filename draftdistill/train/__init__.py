"""Training: one shared loop (loop.py) and a config plus a step function per drafter trainer.

    drafter.py   a standalone drafter (DistillSpec-style on-policy distillation)
    eagle3.py    an EAGLE-3 head (training-time test with the target in the loop)
    (draftdistill/opd/trainer.py: a full LLM student; serving/online.py: the online distiller)
"""
from .config import ConfigError, TrainConfig, load_config
from .drafter import DrafterConfig, train_drafter
from .eagle3 import Eagle3Config, train_eagle3

__all__ = ["ConfigError", "TrainConfig", "load_config", "DrafterConfig", "train_drafter", "Eagle3Config",
           "train_eagle3"]
