"""The server engine against a real vLLM OpenAI-compatible server on the tiny teacher.

The session server (conftest's vllm_server) serves the parity and bad-request
tests; a killed server is tests/test_onpolicy_server.py's, whose on-policy run
loses its server mid-run (one server start for both checks). The retry tests for timeouts
and HTTP 5xx use small real servers from the standard library.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from hpd_tools.engines import make_teacher
from hpd_tools.engines.server import ServerTeacher, TeacherUnavailable
from hpd_tools.errors import HPDError

MAX_LOGPROBS = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` in its own process group."""

    def __init__(self, model_dir: Path, log_dir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"vllm-server-{self.port}.log"
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-logprobs", str(MAX_LOGPROBS), "--enforce-eager", "--max-model-len", "1024",
        ]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self._log_file = self.log.open("wb")
        self.t0 = time.monotonic()
        # Own session: the API server spawns an EngineCore process; killing the group kills both.
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.startup_s = self._wait_ready(300)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def _wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"vLLM server exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - self.t0
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"vLLM server not ready after {timeout:.0f} s:\n{self._tail()}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # the group: also any EngineCore left behind
        self._log_file.close()


@pytest.fixture
def server(vllm_server):
    return vllm_server  # conftest's session server (the trained tiny teacher)


def _greedy(model_dir: Path, prompt: np.ndarray, n: int) -> np.ndarray:
    """A sequence the teacher itself continues greedily, so the actual token is its top-1."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.as_tensor(prompt, dtype=torch.long)[None]
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0].numpy()


def test_server_scores_match_transformers(server, trained_teacher):
    teacher = trained_teacher
    from hpd_tools.engines.hf import HFTeacher

    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 1000, n).astype(np.int64) for n in (5, 40, 200)]
    seqs.append(_greedy(teacher, seqs[0], 30))  # actual token inside the top-k: listed once by the server
    seqs.append(np.array([7], dtype=np.int64))  # nothing to score
    engine = make_teacher("server", server.url, k=MAX_LOGPROBS, max_length=512)
    hf = HFTeacher(str(teacher))
    try:
        assert engine.name == "server" and engine.version
        assert engine.vocab_size == hf.vocab_size == 1024
        assert engine.model == str(teacher) and engine.max_model_len == 1024
        for k in (1, 16, MAX_LOGPROBS):
            got, want = engine.score(seqs, k), hf.score(seqs, k)
            for seq, g, w in zip(seqs, got, want):
                n = len(seq) - 1
                assert g.label_logprob.shape == (n,) and g.label_logprob.dtype == np.float32
                assert g.topk_ids.shape == (n, k) and g.topk_ids.dtype == np.int64
                assert g.topk_logprobs.shape == (n, k) and g.topk_logprobs.dtype == np.float32
                np.testing.assert_allclose(g.label_logprob, w.label_logprob, atol=1e-4)
                np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, atol=1e-4)
                # Same ids by rank, except where two log-probs tie within float noise.
                tied = np.zeros_like(w.topk_ids, dtype=bool)
                close = np.abs(np.diff(w.topk_logprobs, axis=1)) < 1e-4
                tied[:, :-1] |= close
                tied[:, 1:] |= close
                assert ((g.topk_ids == w.topk_ids) | tied).all()
        greedy = engine.score([seqs[3]], 4)[0]
        assert (greedy.topk_ids[4:, 0] == seqs[3][5:]).all()  # the generated part is the top-1
    finally:
        engine.close()
        hf.close()


def test_bad_request_raises_at_once(server):
    engine = ServerTeacher(server.url, retries=5, backoff=2.0, timeout=30)
    try:
        t0 = time.monotonic()
        with pytest.raises(HPDError) as err:
            engine.score([np.arange(3, 40), np.arange(3, 20)], MAX_LOGPROBS + 1)
        assert time.monotonic() - t0 < 5, "a 400 must not be retried"
        assert not isinstance(err.value, TeacherUnavailable)
        message = str(err.value)
        assert "\n" not in message and "HTTP 400" in message and server.url in message
        assert f"greater than max allowed: {MAX_LOGPROBS}" in message
        # Too long for the server's max_model_len (1024, one position kept for the generated token).
        with pytest.raises(HPDError, match="max_model_len"):
            engine.score([np.arange(1024) % 1000], 4)
        with pytest.raises(HPDError, match="max-model-len 1201"):
            ServerTeacher(server.url, max_length=1200)
        with pytest.raises(HPDError, match="no model 'other'"):
            ServerTeacher(server.url, model="other")
        # The engine still works after those errors.
        assert engine.score([np.arange(3, 10)], 2)[0].topk_ids.shape == (6, 2)
    finally:
        engine.close()


def test_unreachable_at_start_raises_teacher_unavailable():
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=f"127.0.0.1:{port}"):
        ServerTeacher(f"http://127.0.0.1:{port}", retries=1, backoff=0.1, timeout=1)
    assert time.monotonic() - t0 < 3


def test_timeouts_are_retried_then_unavailable():
    """A server that accepts connections but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailable, match="timed out"):
            ServerTeacher(url, retries=1, backoff=0.1, timeout=0.5)
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed < 3


def test_server_errors_are_retried_with_backoff():
    """HTTP 503 is retried ``retries`` times with exponential backoff, then TeacherUnavailable."""
    hits: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(time.monotonic())
            body = b'{"error": {"message": "engine is overloaded", "code": 503}}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(TeacherUnavailable, match="HTTP 503 on /v1/models: engine is overloaded"):
            ServerTeacher(url, retries=3, backoff=0.1, timeout=2)
        assert len(hits) == 4
        gaps = np.diff(hits)
        assert (gaps >= np.array([0.1, 0.2, 0.4]) - 0.02).all(), gaps
    finally:
        httpd.shutdown()
        httpd.server_close()
