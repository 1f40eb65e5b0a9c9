"""On-policy rounds against a real vLLM OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from hpd_tools.distill import train
from test_distill import config
from test_server_engine import VLLMServer

HERE = Path(__file__).parent


def test_server_and_in_process_vllm_score_rollouts_alike(setup, trained_teacher, vllm_server, tmp_path):
    out = tmp_path / "scores.npz"
    proc = subprocess.run([sys.executable, str(HERE / "onpolicy_parity.py"), str(trained_teacher), str(setup["student"]), vllm_server.url, str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    z = np.load(out)
    for i in range(int(z["n"])):
        np.testing.assert_allclose(z[f"a{i}_label"], z[f"b{i}_label"], atol=1e-4)
        np.testing.assert_allclose(z[f"a{i}_lp"], z[f"b{i}_lp"], atol=1e-4)
        gaps = np.abs(np.diff(z[f"a{i}_lp"], axis=1)) < 1e-4
        tied = np.zeros_like(gaps, shape=z[f"a{i}_ids"].shape)
        tied[:, :-1] |= gaps
        tied[:, 1:] |= gaps
        assert ((z[f"a{i}_ids"] == z[f"b{i}_ids"]) | tied).all()


def test_server_killed_mid_run_leaves_the_run_alive(setup, trained_teacher, tmp_path, caplog):
    srv = VLLMServer(trained_teacher, tmp_path)
    out = tmp_path / "run"

    def kill_after_first_round() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and "onpolicy/rkl" in metrics.read_text():
                srv.kill()
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_round, daemon=True)
    killer.start()
    try:
        with caplog.at_level(logging.WARNING):
            last = train(config(setup, out, max_steps=8, online_teacher=srv.url, sample_every=2, sample_prompts=4, sample_max_new_tokens=12,
                                online_engine_args={"retries": 1, "backoff": 0.1, "timeout": 5}))
    finally:
        killer.join(timeout=5)
        srv.stop()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "onpolicy/rkl" in r]
    skipped = [r for r in rows if r.get("onpolicy/teacher_unavailable") == 1]
    assert len(scored) >= 1 and len(skipped) >= 1 and len(scored) + len(skipped) == 4
    assert sum(1 for r in rows if "loss" in r) == 8 and np.isfinite(last["loss"])
    assert (out / "final" / "config.json").exists()
    assert any("on-policy round skipped" in rec.getMessage() and srv.url in rec.getMessage() for rec in caplog.records)
    # Rollouts from the round that worked keep being trained on after the server died.
    assert any("onpolicy/loss" in r and r["step"] > scored[-1]["step"] + 1 for r in rows)
