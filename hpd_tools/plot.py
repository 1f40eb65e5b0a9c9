"""``hpd-tools plot``: the curves of one or several distill runs on one figure.

Each run's metrics.jsonl gives the panels: training loss, held-out forward KL
on the teacher's top-k (``eval/fkl_topk``), the student's held-out NLL of the
data tokens (the teacher's as a dotted reference), and, when a run has
on-policy rounds, the rollouts' reverse KL (``onpolicy/rkl``). Runs share
colours across panels and are labelled by folder and loss, so losses are
compared at a glance. Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import HPDError
from .outputs import check_output_file

# (metric, panel title, y label); a panel is drawn when some run logged its metric.
PANELS = [
    ("loss", "training loss", "loss per response token"),
    ("eval/fkl_topk", "held-out forward KL (teacher top-k)", "nats per token"),
    ("eval/full_fkl", "held-out forward KL (teacher's full distribution)", "nats per token"),
    ("eval/student_nll", "held-out NLL of the data tokens", "nats per token"),
    ("onpolicy/rkl", "on-policy reverse KL (rollouts)", "nats per token"),
]
FORMATS = (".png", ".pdf", ".svg")


def read_run(folder: str) -> tuple[str, list[dict[str, Any]]]:
    """A run's label (folder name and loss) and its metrics rows."""
    path = Path(folder).expanduser()
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise HPDError(f"{folder}: no metrics.jsonl there; give a distill --out folder (or its metrics.jsonl)")
    rows = []
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise HPDError(f"{metrics}: cannot be read ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):  # a run killed mid-write leaves a partial last line
                continue
            raise HPDError(f"{metrics}:{n}: not a JSON object; is this a distill metrics file?") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise HPDError(f"{metrics}:{n}: no integer 'step'; is this a distill metrics file?")
        rows.append(row)
    if not rows:
        raise HPDError(f"{metrics}: no rows yet; plot a run that has logged a step")
    run_dir = metrics.parent
    loss = None
    try:
        loss = json.loads((run_dir / "hpd-run.json").read_text())["config"]["loss"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    name = run_dir.resolve().name
    return (f"{name} ({loss})" if loss else name), rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(runs: list[str], out: str, title: str | None = None) -> Path:
    """Draw ``runs`` onto one figure at ``out`` (.png, .pdf or .svg); returns its path."""
    if not runs:
        raise HPDError("plot: give at least one run folder")
    if Path(out).suffix.lower() not in FORMATS:
        raise HPDError(f"--out {out}: give a file ending in {', '.join(FORMATS)}")
    check_output_file(out, "--out", inputs=[("RUN", r) for r in runs])
    loaded = [read_run(r) for r in runs]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in PANELS if any(_series(rows, p[0])[0] for _, rows in loaded)]
    cols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.2 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, panel_title, ylabel) in zip(axes.flat, panels):
        for i, (label, rows) in enumerate(loaded):
            colour = colours[i % len(colours)]
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, color=colour, label=label, marker="o" if len(steps) < 12 else None, markersize=3, linewidth=1.4)
            if key == "eval/student_nll":
                ref_steps, ref = _series(rows, "eval/teacher_nll")
                if ref_steps:
                    ax.plot(ref_steps, ref, color=colour, linestyle=":", linewidth=1.0)
        if key == "eval/student_nll":
            ax.plot([], [], color="grey", linestyle=":", linewidth=1.0, label="the teacher's NLL (dotted, same colour)")
            ax.legend(loc="best", fontsize="small", frameon=False)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False)
    fig.suptitle(title or ("distill: " + ", ".join(label for label, _ in loaded) if len(loaded) <= 3 else f"distill: {len(loaded)} runs"))
    fig.tight_layout(rect=(0, 0.06 + 0.02 * ((len(labels) - 1) // 3), 1, 1))
    target = Path(out).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{target.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(target)
    return target
