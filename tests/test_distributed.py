"""distill under torchrun: 2 gloo processes on the CPU against 1 process.

The global batch is world_size x grad_accum micro-batches (data slots), so 1
process with --grad-accum 2 and 2 processes with --grad-accum 1 must reach the
same parameters, with DDP and with FSDP2, and a checkpoint written by one
layout resumes under the other.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, train_records, write_jsonl
from hpd_tools import CacheConfig, build_cache
from test_distill import make_student

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill_args(setup, out: Path, *extra: str) -> list[str]:
    return ["distill", "--cache", setup["cache"], "--eval-cache", setup["cache"], "--student", str(setup["student"]), "--out", str(out),
            "--loss", "hpd", "--max-steps", str(STEPS), "--batch-tokens", "512", "--lr", "2e-3", "--loss-chunk-tokens", "128",
            "--save-every", "2", "--seed", "3", *extra]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = TORCHRUN + ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "hpd_tools", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def params(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    worst = max(float((pa[k] - pb[k]).abs().max()) for k in pa)
    assert worst < 2e-4, f"parameters differ by up to {worst}"
    # The training cannot match by standing still: the parameters moved far more.
    student = load_file(Path(json.loads((a / "hpd-run.json").read_text())["config"]["student"]) / "model.safetensors")
    moved = max(float((pa[k] - student[k]).abs().max()) for k in pa)
    assert moved > 50 * max(worst, 1e-6)
    ma = [r for r in metrics(a) if "loss" in r]
    mb = [r for r in metrics(b) if "loss" in r]
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, STEPS + 1))
    for ra, rb in zip(ma, mb):
        assert rb["response_tokens"] == ra["response_tokens"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-5)
        assert rb["hpd/nll"] == pytest.approx(ra["hpd/nll"], rel=1e-4)
    ea = [r for r in metrics(a) if "eval/fkl_topk" in r][-1]
    eb = [r for r in metrics(b) if "eval/fkl_topk" in r][-1]
    assert eb["eval/tokens"] == ea["eval/tokens"]
    assert eb["eval/fkl_topk"] == pytest.approx(ea["eval/fkl_topk"], rel=1e-4)


@pytest.fixture(scope="module")
def setup(trained_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(root / "train.jsonl", train_records(24))
    cache = build_cache(CacheConfig(data=str(data), teacher=str(trained_teacher), out=str(root / "cache"), engine="hf", top_k=16, max_length=512, chunk_tokens=512)).location
    return {"cache": cache, "student": make_student(trained_teacher, root / "student"), "root": root}


@pytest.fixture(scope="module")
def reference(setup):
    """One process, --grad-accum 2: the run the 2-process runs must reproduce."""
    out = setup["root"] / "single"
    result = run_cli(*distill_args(setup, out, "--grad-accum", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, reference, mode, tmp_path):
    out = tmp_path / mode
    result = torchrun(*distill_args(setup, out, *(["--fsdp"] if mode == "fsdp" else [])))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(out / "final")]  # reported once, by rank 0
    assert_same_run(reference, out)
    meta = json.loads((out / "step-000002" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["n_slots"] == 2 and sorted(meta["slots"]) == ["0", "1"]
    # Metrics are written once (rank 0), not once per rank.
    assert len([r for r in metrics(out) if "loss" in r]) == STEPS


def test_checkpoint_resumes_across_world_sizes(setup, reference, tmp_path):
    # The single process's step-2 checkpoint, continued by 2 processes with FSDP2 ...
    out = tmp_path / "resumed-fsdp"
    shutil.copytree(reference, out)
    shutil.rmtree(out / f"step-{STEPS:06d}")
    shutil.rmtree(out / "final")
    result = torchrun(*distill_args(setup, out, "--fsdp", "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert_same_run(reference, out)
    # ... and a checkpoint whose slot count differs is refused, naming both counts.
    other = tmp_path / "mismatch"
    shutil.copytree(reference, other)
    result = run_cli(*distill_args(setup, other, "--resume", "--grad-accum", "1"))
    assert result.returncode == 2
    assert "2 data slots" in result.stderr and "this run has 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_more_slots_than_sequences_is_a_clear_error(setup, tmp_path):
    # More slots than units is fine (slots share units by sequence: tests/test_stream.py); more than sequences is not.
    n = json.loads(run_cli("info", setup["cache"]).stdout)["sequences"]
    result = run_cli(*distill_args(setup, tmp_path / "run", "--grad-accum", str(n + 1)))
    assert result.returncode == 2
    assert f"{n} sequences" in result.stderr and f"{n + 1} data slots" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_onpolicy_rounds_resume_exactly(setup, trained_teacher, tmp_path, mode):
    """Each rank samples its own prompts and scores them with its online teacher;
    the rollouts' tokens count in the global normalisation, and every rank's
    rollout buffer and prompt position are in the checkpoint. Under FSDP2 the
    ranks decode in lockstep (every forward is a collective)."""
    onpolicy = ["--online-teacher", str(trained_teacher), "--online-engine", "hf", "--sample-every", "2", "--sample-prompts", "2",
                "--sample-max-new-tokens", "6", "--onpolicy-weight", "0.5", *(["--fsdp"] if mode == "fsdp" else [])]
    ref = tmp_path / "ref"
    result = torchrun(*distill_args(setup, ref, *onpolicy))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(ref)
    rounds = [r for r in rows if "onpolicy/rkl" in r]
    assert [r["step"] for r in rounds] == [0, 2]  # logged once per round, not once per rank
    steps = [r for r in rows if "onpolicy/loss" in r]
    assert len(steps) == STEPS and all(r["onpolicy/weight"] == 0.5 for r in steps)
    assert (ref / "step-000002" / "onpolicy-rank0.npz").exists() and (ref / "step-000002" / "onpolicy-rank1.npz").exists()
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    for name in (f"step-{STEPS:06d}", "final"):
        shutil.rmtree(cut / name)
    result = torchrun(*distill_args(setup, cut, *onpolicy, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    key = lambda rows: [(r["step"], round(r.get("loss", r.get("onpolicy/rkl", 0.0)), 5)) for r in rows if "loss" in r or "onpolicy/rkl" in r]  # noqa: E731
    assert key(metrics(cut)) == key(rows)
