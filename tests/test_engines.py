"""vLLM against transformers on the tiny teachers, with real engines in subprocesses
(vLLM needs a __main__ guard and must not share the pytest process): conftest's
session engine (vllm_scores) and one CLI cache run."""

from __future__ import annotations

import json

import numpy as np

from conftest import run_cli, train_records, write_jsonl
from test_cache import arrays, assert_same_content


def test_vllm_matches_transformers_and_both_vllm_paths_agree(vllm_scores):
    a = vllm_scores  # conftest: one in-process vLLM engine of the trained tiny teacher, in a subprocess
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


def test_cli_vllm_cache_exits_cleanly_matches_hf_and_has_its_own_key(teacher, tmp_path):
    """One vLLM cache run (an engine start costs more than the rest) checks the CLI
    end to end, parity with transformers, and that the engine is in the cache key:
    an hf cache of the same teacher and data in the cache root gives it no rows."""
    from hpd_tools import CacheConfig, build_cache
    from hpd_tools.cache import verify_cache
    from hpd_tools.cache.layout import CacheStore

    data = write_jsonl(tmp_path / "d.jsonl", train_records(24))
    hf = build_cache(CacheConfig(teacher=str(teacher), data=str(data), engine="hf", top_k=16, max_length=512, chunk_tokens=512))
    assert hf.complete and hf.sequences_reused == 0
    # Reuse is on: the vLLM run finds the hf cache in its cache root, and takes none of its rows.
    proc = run_cli("cache", "--teacher", str(teacher), "--data", str(data), "--top-k", "16", "--max-length", "512", "--chunk-tokens", "512",
                   "--out", str(tmp_path / "v"), "--vllm-arg", "enforce_eager=true", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm = json.loads(proc.stdout)  # all of stdout, flushed before the process ends itself
    assert vllm["location"] == str(tmp_path / "v")
    assert "cache: complete" in proc.stderr
    assert vllm["complete"] and vllm["key"] != hf.key
    assert vllm["sequences_reused"] == 0 and vllm["units_computed"] == vllm["units_total"]
    attrs = CacheStore(vllm["location"]).attrs
    assert attrs["engine_name"] == "vllm" and attrs["compat"] != CacheStore(hf.location).attrs["compat"]
    assert_same_content(arrays(tmp_path / "v"), arrays(hf.location), exact=False)
    assert verify_cache(tmp_path / "v").complete  # in this process: a CLI start costs seconds; verify's CLI has its own tests
