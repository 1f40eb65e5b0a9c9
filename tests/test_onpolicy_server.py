"""On-policy rounds against a real vLLM OpenAI-compatible server on 127.0.0.1, and the
server engine against a server killed mid-run (one server start for both)."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest

from hpd_tools.distill import train
from hpd_tools.engines.server import ServerTeacher, TeacherUnavailable
from test_distill import config
from test_server_engine import VLLMServer


def test_server_and_in_process_vllm_score_rollouts_alike(vllm_scores, vllm_server):
    # Student rollouts and their in-process vLLM scores: conftest's session engine of the trained teacher.
    z = vllm_scores
    rollouts = [z[f"rollout_{i}"] for i in range(int(z["rollouts"]))]
    engine = ServerTeacher(vllm_server.url)
    try:
        served = engine.score(rollouts, 16)
    finally:
        engine.close()
    assert len(served) == len(rollouts) == 4
    for i, b in enumerate(served):
        np.testing.assert_allclose(z[f"rollout_{i}_label"], b.label_logprob, atol=1e-4)
        np.testing.assert_allclose(z[f"rollout_{i}_lp"], b.topk_logprobs, atol=1e-4)
        gaps = np.abs(np.diff(z[f"rollout_{i}_lp"], axis=1)) < 1e-4
        tied = np.zeros_like(gaps, shape=z[f"rollout_{i}_ids"].shape)
        tied[:, :-1] |= gaps
        tied[:, 1:] |= gaps
        assert ((z[f"rollout_{i}_ids"] == b.topk_ids) | tied).all()


def test_server_killed_mid_run_leaves_the_run_alive_and_raises_teacher_unavailable(setup, trained_teacher, tmp_path, caplog):
    """One server start (the slowest step here) for two views of a server that dies:
    the on-policy run lives on, and a server engine made before the kill raises
    TeacherUnavailable, within its retry budget, in one line."""
    srv = VLLMServer(trained_teacher, tmp_path)
    out = tmp_path / "run"
    seqs = [np.arange(3, 30) + i for i in range(4)]
    try:
        # A fresh server's first requests can take many seconds on a loaded machine;
        # score them with a patient client, then use a 2 s timeout for the kill.
        warm = ServerTeacher(srv.url, retries=2, backoff=0.2, timeout=120)
        assert len(warm.score(seqs, 4)) == 4
        warm.close()
        engine = ServerTeacher(srv.url, retries=2, backoff=0.2, timeout=2)
    except BaseException:
        srv.stop()
        raise

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

    # The server engine made before the kill: every attempt is refused, then TeacherUnavailable.
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailable) as err:
        engine.score(seqs, 4)
    elapsed = time.monotonic() - t0
    # 3 attempts of at most 2 s each plus 0.2 + 0.4 s of backoff.
    assert elapsed < 3 * 2 + 0.6 + 2
    message = str(err.value)
    assert "\n" not in message and srv.url in message and "3 attempt" in message
    assert "refused" in message.lower()
    engine.close()
