"""Training metrics: one JSON line per record, mirrored to TensorBoard when it is installed."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import write_atomically


class MetricsLog:
    """JSONL always; TensorBoard when it is installed. enabled=False (ranks other than 0 of a
    torchrun job, whose numbers are already summed over ranks) writes nothing.

    resume_step: the step of the checkpoint the run resumed from. Rows after it were written by the
    killed run for steps that will be run again, so they are dropped on open (the file is rewritten
    atomically; a torn last line goes too), and TensorBoard purges its events after it. None is a
    fresh start: a previous run's metrics.jsonl is emptied, never appended to."""

    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: int | None = None):
        out_dir = Path(out_dir)
        self.path = out_dir / "metrics.jsonl"
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            self._drop_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
        except ImportError:
            self.tb = None

    def _drop_after(self, resume_step: int) -> None:
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn last line of a killed write
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, (int, float)) and step <= resume_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            write_atomically(self.path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))

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
