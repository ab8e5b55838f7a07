"""Training metrics: one JSON line per record, mirrored to TensorBoard when it is installed."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """JSONL always; TensorBoard when it is installed. enabled=False (ranks other than 0 of a
    torchrun job, whose numbers are already summed over ranks) writes nothing."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, **values):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()
