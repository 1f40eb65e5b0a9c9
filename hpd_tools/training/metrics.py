"""Where a run's metrics go: metrics.jsonl always (one JSON object per logged
step; ``hpd-tools plot`` reads it), and the dashboards ``--report-to`` names:
TensorBoard event files in ``--out``/tensorboard, Weights & Biases (the run
named after --out, resumed under the same id; offline unless the user has
logged in or set WANDB_MODE, so a run never stops to ask for a key)."""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from ..errors import HPDError

log = logging.getLogger("hpd_tools.distill")

REPORTERS = ("tensorboard", "wandb", "none")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(report_to: list[str]) -> None:
    """Each name known, ``none`` alone, and the package of each installed (before anything loads)."""
    for name in report_to:
        if name not in REPORTERS:
            raise HPDError(f"--report-to {','.join(report_to)}: unknown {name!r}; choose from {', '.join(REPORTERS)} (comma-separated)")
    if "none" in report_to and len(report_to) > 1:
        raise HPDError(f"--report-to {','.join(report_to)}: 'none' goes alone")
    for name in report_to:
        package = _PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise HPDError(f"--report-to {name}: the {package} package is not installed; pip install 'hpd-tools[{package}]' or leave {name} out of --report-to")


def _wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class Metrics:
    """Rows of metrics.jsonl; on resume (``keep_rows``), the rows logged after the
    checkpoint are dropped first, so the file reads as one uninterrupted run
    (TensorBoard and W&B get them again: both plot by the logged step)."""

    def __init__(self, out: Path, keep_rows: int | None, report_to: list[str] | tuple[str, ...] = ("tensorboard",),
                 run_id: str | None = None, config: dict[str, Any] | None = None):
        self.path = out / "metrics.jsonl"
        self.rows = 0
        if keep_rows is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from.
            kept = [line for line in self.path.read_text().splitlines() if line][:keep_rows]
            self.path.write_text("".join(line + "\n" for line in kept))
            self.rows = len(kept)
        self.file = self.path.open("a")
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            mode = _wandb_mode()
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "hpd-tools"), name=out.name, id=run_id, resume="allow",
                                    dir=str(out), config=config, mode=mode)
            # Plotted by the run's step, not W&B's own counter: a resumed run logs
            # steps after the checkpoint again, which W&B's counter would drop.
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")
            if mode == "offline":
                log.info("--report-to wandb: offline (not logged in); `wandb sync %s` uploads the run", out / "wandb")

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        self.rows += 1
        scalars = {name: value for name, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log({"step": step, **scalars})

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
