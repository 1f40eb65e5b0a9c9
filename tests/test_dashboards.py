"""--report-to (TensorBoard event files and a W&B offline run, read back) and
``hpd-tools plot`` (a real PNG of two runs, looked at by its pixels)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from test_distill import config
from hpd_tools.distill import train
from hpd_tools.errors import HPDError


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """Two short runs (hpd and fkl) with eval, reporting to TensorBoard and W&B (offline)."""
    root = tmp_path_factory.mktemp("dashboards")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    try:
        out = {}
        for loss in ("hpd", "fkl"):
            out[loss] = root / f"run-{loss}"
            train(config(setup, out[loss], loss=loss, max_steps=4, eval_cache=setup["eval"], eval_every=2, eval_batches=1,
                         report_to=["tensorboard", "wandb"]))
    finally:
        mp.undo()
    return out


def test_tensorboard_events_hold_every_logged_scalar(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs["hpd"]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    rows = _rows(run)
    for name in ("loss", "grad_norm", "lr", "eval/fkl_topk"):
        logged = [(r["step"], r[name]) for r in rows if name in r]
        events = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in events] == [s for s, _ in logged], name
        np.testing.assert_allclose([v for _, v in events], [v for _, v in logged], rtol=1e-6)  # float32 on disk
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]


def test_wandb_offline_run_holds_the_logged_values(runs):
    run = runs["fkl"]
    marker = json.loads((run / "hpd-run.json").read_text())
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1 and files[0].endswith(f"run-{marker['run_id']}.wandb")  # the run's id: a resumed run continues it
    data = Path(files[0]).read_bytes()
    for row in _rows(run):  # every logged value, as W&B stores it (JSON in its history records)
        for name in ("loss", "eval/fkl_topk"):
            if name in row:
                assert name.encode() in data and json.dumps(row[name]).encode() in data, (name, row)


def test_plot_draws_two_runs_and_refuses_bad_input_in_one_line(runs, tmp_path):
    import matplotlib.image as mpimg

    png = tmp_path / "figs" / "curves.png"
    result = run_cli("plot", str(runs["hpd"]), str(runs["fkl"]), "--out", str(png))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(png)
    image = mpimg.imread(png)
    assert image.shape[0] > 400 and image.shape[1] > 1000  # two panels a row: loss, eval fkl / nll
    rgb = image[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3  # the curves' colours, not the greys of axes and text
    assert coloured.mean() > 0.002
    # Both runs' default colours (matplotlib's first two: blue, orange) are drawn.
    blue = (np.abs(rgb - np.array([0.12, 0.47, 0.71])).max(axis=-1) < 0.08).sum()
    orange = (np.abs(rgb - np.array([1.0, 0.50, 0.05])).max(axis=-1) < 0.08).sum()
    assert blue > 200 and orange > 200

    for args, message in [
        ((str(tmp_path),), "no metrics.jsonl there"),
        ((str(runs["hpd"]), "--out", str(tmp_path / "c.txt")), "give a file ending in .png"),
        ((str(runs["hpd"]), "--out", str(runs["hpd"] / "metrics.jsonl")), "--out"),
    ]:
        bad = run_cli("plot", *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, (args, bad.stderr)
    assert _rows(runs["hpd"])  # the refused --out (an input) is intact


@pytest.mark.parametrize("report_to, message", [
    (["tensorbord"], "unknown 'tensorbord'"),
    (["none", "wandb"], "'none' goes alone"),
])
def test_bad_report_to_is_one_line_before_anything_loads(setup, tmp_path, report_to, message):
    with pytest.raises(HPDError, match=message):
        train(config(setup, tmp_path / "run", report_to=report_to))
    assert not (tmp_path / "run").exists()
