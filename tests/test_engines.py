"""vLLM against transformers on the tiny teacher, with real engines in subprocesses
(vLLM needs a __main__ guard and must not share the pytest process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import run_cli, train_records, write_jsonl
from test_cache import arrays, assert_same_content

HERE = Path(__file__).parent


def test_vllm_matches_transformers_and_both_vllm_paths_agree(teacher, tmp_path):
    out = tmp_path / "scores.npz"
    proc = subprocess.run([sys.executable, str(HERE / "engine_parity.py"), str(teacher), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = np.load(out)
    assert bool(a["tensor_path"]), "the tensor fast path was not installed"
    for i, n in enumerate(a["lengths"]):
        fast = [a[f"fast_{i}_{x}"] for x in ("label", "ids", "lp")]
        flat = [a[f"flat_{i}_{x}"] for x in ("label", "ids", "lp")]
        hf = [a[f"hf_{i}_{x}"] for x in ("label", "ids", "lp")]
        assert fast[0].shape == (n - 1,) and fast[1].shape == (n - 1, 16)
        for x, y in zip(fast, flat):  # the tensor path is the public output, bit for bit
            np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(fast[0], hf[0], atol=1e-4)
        np.testing.assert_allclose(fast[2], hf[2], atol=1e-4)
        # Same ids by rank, except where two log-probs tie within float noise.
        tied = np.zeros_like(hf[1], dtype=bool)
        close = np.abs(np.diff(hf[2], axis=1)) < 1e-4
        tied[:, :-1] |= close
        tied[:, 1:] |= close
        assert ((fast[1] == hf[1]) | tied).all()


def test_cli_vllm_cache_exits_cleanly_and_matches_hf(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(24))
    common = ("--teacher", str(teacher), "--data", str(data), "--top-k", "16", "--max-length", "512", "--chunk-tokens", "512", "--no-reuse")
    proc = run_cli("cache", *common, "--out", str(tmp_path / "v"), "--vllm-arg", "enforce_eager=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(tmp_path / "v")
    assert "cache: complete" in proc.stderr
    hf = run_cli("cache", *common, "--out", str(tmp_path / "h"), "--engine", "hf")
    assert hf.returncode == 0, hf.stderr
    assert_same_content(arrays(tmp_path / "v"), arrays(tmp_path / "h"), exact=False)
    assert run_cli("verify", str(tmp_path / "v")).returncode == 0
