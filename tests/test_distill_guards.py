"""distill's guards: --out is new, empty or an earlier run of distill, never an
input, a model or a cache; --resume continues the same run or refuses; every
option is checked for range before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli, run_cli_rows, train_records, write_jsonl
from hpd_tools import CacheConfig, build_cache
from hpd_tools.config import build
from hpd_tools.distill import RESUME_MAY_CHANGE, RUN_MARKER, DistillConfig, train
from hpd_tools.errors import HPDError
from test_distill import config, make_student


@pytest.fixture(scope="module")
def setup(teacher, tmp_path_factory):
    """Two small caches of the (untrained) tiny teacher and a student: the guards
    need real inputs, not a good teacher."""
    root = tmp_path_factory.mktemp("guards")
    records = train_records(16)
    common = dict(teacher=str(teacher), engine="hf", top_k=8, max_length=256, chunk_tokens=512)
    train_cache = build_cache(CacheConfig(data=str(write_jsonl(root / "train.jsonl", records[:12])), out=str(root / "train-cache"), **common)).location
    eval_cache = build_cache(CacheConfig(data=str(write_jsonl(root / "eval.jsonl", records[12:])), out=str(root / "eval-cache"), **common)).location
    return {"train": train_cache, "eval": eval_cache, "student": make_student(teacher, root / "student"), "root": root}


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` by its content hash (folders listed too)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


def refused(proc: subprocess.CompletedProcess, option: str) -> str:
    """Exit 2 with one `error:` line naming ``option``, no traceback; the line."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: {option}"), errors[0]
    return errors[0]


# -- through the CLI ----------------------------------------------------------------------

def test_cli_refuses_inputs_as_out_and_bad_options_leaving_inputs_intact(setup, tmp_path):
    student, cache = Path(setup["student"]), Path(setup["train"])
    before = {"student": tree(student), "cache": tree(cache)}
    base = ["distill", "--cache", str(cache), "--student", str(student), "--max-steps", "1", "--batch-tokens", "1024"]
    # The console script once; the other command lines in one process (run_cli_rows: a start costs seconds).
    line = refused(run_cli(*base, "--out", str(student)), "--out")
    assert "--student folder" in line
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("eval_batches: -1\n")
    to_cache, under_file, lr, option, unknown, from_recipe = run_cli_rows([
        [*base, "--out", str(cache)],
        [*base, "--out", str(blocker / "run")],
        [*base, "--out", str(out), "--lr", "nan"],
        [*base, "--out", str(out), "--loss-option", "tail"],
        [*base, "--out", str(out), "--loss", "fkl", "--loss-option", "nope=1"],
        [*base, "--out", str(out), "--config", str(recipe)],
    ], tmp_path / "rows", protected=[str(student), str(cache), str(blocker)])
    assert "cache" in refused(to_cache, "--out")
    assert "which is a file" in refused(under_file, "--out")
    assert "positive finite" in refused(lr, "--lr nan")
    assert "KEY=VALUE" in refused(option, "--loss-option")
    assert "its options: tail" in refused(unknown, "--loss-option nope")
    refused(from_recipe, "--eval-batches -1")
    assert not out.exists() and blocker.read_text() == "x"
    assert {"student": tree(student), "cache": tree(cache)} == before


# -- --out, by calling train ------------------------------------------------------------

def test_out_must_not_be_an_input_a_model_or_a_cache(setup, teacher, tmp_path):
    student, cache, eval_cache = Path(setup["student"]), Path(setup["train"]), Path(setup["eval"])
    before = [tree(student), tree(cache), tree(teacher)]
    missing = str(tmp_path / "no-student")  # the guard runs before the student is loaded: a missing one is never reached
    cases = [
        (dict(out=str(student)), r"--out .*: is the --student folder"),
        (dict(out=str(student / "sub")), r"--out .*: is inside the --student folder"),
        (dict(out=str(cache), student=missing), r"--out .*: is the --cache folder"),
        (dict(out=str(eval_cache), student=missing, eval_cache=str(eval_cache)), r"--out .*: is the --eval-cache folder"),
        (dict(out=str(teacher), student=missing), r"--out .*: holds a model \(config.json, model.safetensors\)"),
        (dict(out=str(cache / "x"), caches=[str(eval_cache)], student=missing), r"--out .*: is inside the hpd-tools cache"),
        (dict(out=str(teacher), student=missing, online_teacher=str(teacher), sample_every=2), r"--out .*: is the --online-teacher folder"),
        (dict(out=str(cache), student=missing, prompt_cache=str(cache), caches=[str(eval_cache)]), r"--out .*: is the --prompt-cache folder"),
        (dict(out=str(tmp_path), student=str(tmp_path / "inner" / "student")), r"--student .*: is inside --out"),
        (dict(out="s3://bucket/run", student=missing), r"--out s3://bucket/run: the run folder must be a local path"),
    ]
    for kw, message in cases:
        with pytest.raises(HPDError, match=message):
            out = kw.pop("out")
            train(dataclasses.replace(config(setup, Path("unused"), **kw), out=out))  # a str: Path would fold s3:// to s3:/
    assert [tree(student), tree(cache), tree(teacher)] == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(HPDError, match=rf"--out .*: not empty \(todo.txt\) and not a distill run \(no {RUN_MARKER}\)"):
        train(config(setup, other, student=missing))
    (tmp_path / "file").write_text("x")
    with pytest.raises(HPDError, match="--out .*: a file, not a folder"):
        train(config(setup, tmp_path / "file", student=missing))
    bad_marker = tmp_path / "bad-marker"
    bad_marker.mkdir()
    (bad_marker / RUN_MARKER).write_text("{}")
    with pytest.raises(HPDError, match="is not a distill run marker"):
        train(config(setup, bad_marker, student=missing))
    assert not (tmp_path / "inner").exists() and not list(tmp_path.glob(".hpd-write-probe*"))
    assert (other / "todo.txt").read_text() == "mine" and [p.name for p in other.iterdir()] == ["todo.txt"]
    # An empty folder is a new run (it gets past the guard: the missing student is next).
    (tmp_path / "empty").mkdir()
    with pytest.raises(HPDError, match="--student .*: no such folder"):
        train(config(setup, tmp_path / "empty", student=missing))


def test_out_on_a_read_only_filesystem(setup, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({done.stderr.strip()}): needs root and mount")
    try:
        for out in (mount, mount / "run"):
            with pytest.raises(HPDError, match=r"--out .*: cannot write in .*ro \(Read-only file system\); choose a writable folder"):
                train(config(setup, out, student=str(tmp_path / "no-student")))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# -- validate ---------------------------------------------------------------------------

BAD = [
    ("lr", float("nan"), "--lr nan"), ("lr", float("inf"), "--lr inf"), ("lr", -1e-3, "--lr -0.001"), ("lr", 0.0, "--lr 0.0"),
    ("batch_tokens", 1, "--batch-tokens 1"), ("batch_tokens", 0, "--batch-tokens 0"), ("max_steps", 0, "--max-steps 0"),
    ("save_every", -1, "--save-every -1"), ("eval_every", -1, "--eval-every -1"), ("eval_batches", -1, "--eval-batches -1"),
    ("log_every", 0, "--log-every 0"), ("grad_accum", 0, "--grad-accum 0"), ("loss_chunk_tokens", 0, "--loss-chunk-tokens 0"),
    ("warmup_steps", -1, "--warmup-steps -1"), ("warmup_steps", 7, "--warmup-steps 7"), ("seed", -1, "--seed -1"),
    ("min_lr_ratio", 1.5, "--min-lr-ratio 1.5"), ("min_lr_ratio", -0.1, "--min-lr-ratio -0.1"), ("min_lr_ratio", float("nan"), "--min-lr-ratio nan"),
    ("weight_decay", -0.1, "--weight-decay -0.1"), ("weight_decay", float("nan"), "--weight-decay nan"),
    ("max_grad_norm", 0.0, "--max-grad-norm 0.0"), ("max_grad_norm", float("nan"), "--max-grad-norm nan"),
    ("betas", (0.9, 1.0), "--betas 0.9 1.0"), ("betas", (-0.1, 0.9), "--betas -0.1 0.9"), ("betas", (float("nan"), 0.9), "--betas nan 0.9"),
    ("sample_temperature", float("nan"), "--sample-temperature nan"), ("sample_temperature", 0.0, "--sample-temperature 0.0"),
    ("sample_prompts", 0, "--sample-prompts 0"), ("sample_max_new_tokens", 0, "--sample-max-new-tokens 0"),
    ("sample_every", -2, "--sample-every -2"), ("onpolicy_buffer", 0, "--onpolicy-buffer 0"),
    ("onpolicy_weight", float("nan"), "--onpolicy-weight nan"), ("onpolicy_weight", 1.5, "--onpolicy-weight 1.5"),
    ("cache_weights", [float("nan")], "--cache-weight nan"), ("cache_weights", [float("inf")], "--cache-weight inf"), ("cache_weights", [0.0], "--cache-weight 0.0"),
    ("pack_width", -1, "--pack-width -1"),
    ("loss_options", {"tail_estimate": "median"}, "--loss-option tail_estimate=median"),
    ("loss_options", {"beta": 0.5}, "--loss-option beta: --loss hpd has no such option; its options: tail_estimate, forward, tail"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_validate_names_the_option(name, value, message):
    values = {"caches": ["c"], "student": "s", "out": "o", "max_steps": 6, name: value}
    with pytest.raises(HPDError, match="^" + re.escape(message)):
        DistillConfig(**values).validate()


@pytest.mark.parametrize("loss,options,message", [
    ("jsd", {"beta": "abc"}, "--loss-option beta=abc: expected a finite number"),
    ("jsd", {"beta": 2}, r"--loss-option beta=2: .*must be in \[0, 1\]"),
    ("akl", {"mu": 0}, r"--loss-option mu=0: .*must be in \(0, 1\]"),
    ("fkl", {"tail": "x"}, "--loss-option tail=x: .*not one of bucket, renormalize, ignore"),
])
def test_loss_option_values_are_checked_before_training(loss, options, message):
    with pytest.raises(HPDError, match=message):
        DistillConfig(caches=["c"], student="s", out="o", loss=loss, loss_options=options).validate()
    good = {"jsd": {"beta": 0.3}, "akl": {"mu": 0.7}, "fkl": {"tail": "ignore"}}[loss]
    DistillConfig(caches=["c"], student="s", out="o", loss=loss, loss_options=good).validate()


def test_recipe_values_go_through_validate():
    for values, message in [({"lr": float("nan")}, "--lr nan"), ({"batch_tokens": 1}, "--batch-tokens 1"), ({"eval_batches": -1}, "--eval-batches -1")]:
        with pytest.raises(HPDError, match=message):
            build(DistillConfig, {"caches": ["c"], "student": "s", "out": "o", **values}).validate()
    for values in ({"max_steps": 2.5}, {"max_steps": float("inf")}, {"save_every": True}):
        with pytest.raises(HPDError, match="expected an integer"):
            build(DistillConfig, {"caches": ["c"], "student": "s", "out": "o", **values})


def test_every_option_is_compared_on_resume_or_listed_as_free():
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    assert set(RESUME_MAY_CHANGE) <= names
    assert {"loss", "loss_options", "lr", "seed", "batch_tokens", "caches", "cache_weights", "dtype", "betas", "pack"}.isdisjoint(RESUME_MAY_CHANGE)


# -- runs, the marker and resume --------------------------------------------------------

def test_resume_checks_its_run(setup, tmp_path):
    run = tmp_path / "run"
    common = dict(max_steps=2, save_every=1, warmup_steps=1, min_lr_ratio=0.25)
    train(config(setup, run, **common))
    marker = json.loads((run / RUN_MARKER).read_text())
    assert marker["format"] == "hpd-tools distill run" and marker["format_version"] == 1 and marker["config"]["loss"] == "hpd"
    assert not (run / "config.json").exists()  # a run folder never looks like a model folder
    meta = json.loads((run / "step-000002" / "meta.json").read_text())
    assert meta["schedule_steps"] == 2 and meta["run_id"] == marker["run_id"] and len(meta["cache_keys"]["caches"]) == 1
    before = tree(run)

    with pytest.raises(HPDError, match="holds an earlier run; pass --resume"):
        train(config(setup, run, **common))
    with pytest.raises(HPDError, match=r"^--resume .*step-000002: the checkpoint was trained with --loss hpd, this run asks for --loss sft; "):
        train(config(setup, run, resume=True, **{**common, "loss": "sft"}))
    with pytest.raises(HPDError, match=r"trained with --lr 0\.002, this run asks for --lr 0\.001;"):
        train(config(setup, run, resume=True, **{**common, "lr": 1e-3}))
    with pytest.raises(HPDError, match=r"trained with --loss hpd --batch-tokens 1024 --seed 0, this run asks for --loss fkl --batch-tokens 512 --seed 1;"):
        train(config(setup, run, resume=True, **{**common, "loss": "fkl", "seed": 1, "batch_tokens": 512}))
    with pytest.raises(HPDError, match=r"--loss-option tail_estimate=kth, this run asks for --loss-option tail_estimate=uniform"):
        train(config(setup, run, resume=True, **common, loss_options={"tail_estimate": "uniform"}))
    with pytest.raises(HPDError, match=r"--max-steps 1: the checkpoint .* is at step 2"):
        train(config(setup, run, resume=True, **{**common, "max_steps": 1}))
    assert tree(run) == before  # refused before anything was written

    # The same run: its loss options spelt out, the cache moved (same key), more steps, other intervals.
    moved = tmp_path / "moved-cache"
    shutil.copytree(setup["train"], moved)
    train(config(setup, run, resume=True, **{**common, "max_steps": 4, "save_every": 0, "caches": [str(moved)]}, loss_options={"tail_estimate": "kth"}))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "loss" in r}
    assert sorted(lrs) == [1, 2, 3, 4]
    # The schedule keeps the first run's horizon (2 steps): after it, the final learning rate.
    assert lrs[1] == pytest.approx(2e-3) and lrs[3] == lrs[4] == pytest.approx(2e-3 * 0.25)
    again = json.loads((run / RUN_MARKER).read_text())
    assert again["run_id"] == marker["run_id"] and again["config"]["max_steps"] == 4


def test_run_from_before_the_marker_is_resumed_and_marked(setup, tmp_path):
    run = tmp_path / "old"
    train(config(setup, run, max_steps=1, save_every=1))
    marker = json.loads((run / RUN_MARKER).read_text())
    (run / RUN_MARKER).unlink()
    (run / "config.json").write_text(json.dumps(marker["config"]))  # what earlier versions wrote
    meta_path = run / "step-000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("cache_keys", "schedule_steps", "run_id"):
        meta.pop(key)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(HPDError, match="holds an earlier run; pass --resume"):
        train(config(setup, run, max_steps=1))
    with pytest.raises(HPDError, match=r"trained with --lr 0\.002, this run asks for --lr 0\.01"):
        train(config(setup, run, max_steps=2, resume=True, lr=1e-2))
    train(config(setup, run, max_steps=2, resume=True))
    assert json.loads((run / RUN_MARKER).read_text())["config"]["max_steps"] == 2
