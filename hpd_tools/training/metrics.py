"""metrics.jsonl (one JSON object per logged step) and TensorBoard when it is installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Metrics:
    """Rows of metrics.jsonl; on resume (``keep_rows``), the rows logged after the
    checkpoint are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, out: Path, keep_rows: int | None):
        self.path = out / "metrics.jsonl"
        self.rows = 0
        if keep_rows is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from.
            kept = [line for line in self.path.read_text().splitlines() if line][:keep_rows]
            self.path.write_text("".join(line + "\n" for line in kept))
            self.rows = len(kept)
        self.file = self.path.open("a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        self.rows += 1
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
