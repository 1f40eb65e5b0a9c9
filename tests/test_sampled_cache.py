"""Sampled teacher caches (`hpd-tools cache --signal sampled --samples N`): the cache side.

One sampled cache of the tiny teacher is built through the CLI and shared; the
other builds (a second one for determinism, a resumed one) are in-process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import run_cli, train_records, write_jsonl
from hpd_tools.cache import CacheConfig, CacheStore, build_cache, cache_info, verify_cache
from hpd_tools.errors import CacheCorruptError, HPDError

N = 16
ROWS = ("label_logprob", "topk_head", "topk_ids", "topk_logprobs", "sample_counts")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sampled-data") / "train.jsonl", train_records(24))


def _config(teacher: Path, data: Path, out: Path, **kw) -> CacheConfig:
    return CacheConfig(teacher=str(teacher), data=str(data), engine="hf", signal="sampled", samples=N, out=str(out), chunk_tokens=512, reuse=False, **kw)


@pytest.fixture(scope="module")
def built(teacher, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sampled") / "cache"
    proc = run_cli("cache", "--teacher", str(teacher), "--data", str(data), "--engine", "hf", "--signal", "sampled", "--samples", str(N),
                   "--out", str(out), "--chunk-tokens", "512", "--no-reuse")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    return out


def _arrays(location: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(location), mode="r")
    return {name: group[name][:] for name in ("tokens", "loss_mask", *ROWS)}


def _chunk_bytes(location: Path) -> dict[str, bytes]:
    return {str(p.relative_to(location)): p.read_bytes() for name in ROWS for p in sorted((location / name).rglob("*")) if p.is_file()}


def test_cli_builds_a_sampled_cache_that_verifies_and_info_describes(built):
    attrs = CacheStore(built).attrs
    assert (attrs["signal"], attrs["samples"], attrs["top_k"], attrs["seed"], attrs["format_version"]) == ("sampled", N, N, 0, 4)
    report = verify_cache(built)
    assert report.complete and report.signal == "sampled" and report.label_in_topk > 0
    proc = run_cli("info", str(built))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["signal"] == "sampled" and info["samples"] == N
    assert 1 <= info["mean_distinct_ids"] <= N
    assert info["bytes_by_array"]["sample_counts"] > 0 and info["bytes_per_response_token"] > 0


def test_counts_sum_to_n_on_response_rows_and_padding_is_not_stored(built):
    a = _arrays(built)
    mask, counts, ids = a["loss_mask"], a["sample_counts"].astype(np.int64), a["topk_ids"]
    assert (counts[mask].sum(1) == N).all()
    assert (counts[~mask] == 0).all()
    drawn = counts > 0
    assert not (drawn[:, 1:] & ~drawn[:, :-1]).any()  # padding only at a row's end
    assert (ids[~drawn] == 0).all()
    # Ragged on disk: the counts' chunks hold about one byte per drawn entry, not N per row.
    stored = sum(p.stat().st_size for p in (built / "sample_counts").rglob("*") if p.is_file())
    assert stored < 0.6 * mask.sum() * N


def test_two_builds_are_byte_identical_and_a_resumed_build_equals_them(built, teacher, data, tmp_path):
    again = tmp_path / "again"
    build_cache(_config(teacher, data, again))
    assert _chunk_bytes(again) == _chunk_bytes(built)
    # Resume: a writer of half the units stops; the full command continues from there.
    resumed = tmp_path / "resumed"
    first = build_cache(_config(teacher, data, resumed, shard=(0, 2)))
    assert not first.complete and 0 < first.units_computed < first.units_total
    rest = build_cache(_config(teacher, data, resumed))
    assert rest.complete and rest.units_computed == first.units_total - first.units_computed
    got, want = _arrays(resumed), _arrays(built)
    assert all(np.array_equal(got[name], want[name]) for name in want)


def test_drawn_frequencies_estimate_the_teachers_probabilities(teacher):
    """Over many positions, counts/N estimates p: the estimate of the entropy
    sum_v (c_v/N) (-log p_v) and of the top-1 probability agree with the exact
    values (full log-softmax of the same engine) within 4 standard errors of their
    mean (a false alarm rate of ~6e-5 per check if the draws are right)."""
    from hpd_tools.engines.hf import HFTeacher
    from hpd_tools.sampling import record_seed

    engine = HFTeacher(str(teacher), dtype="float32", batch_tokens=4096)
    V = engine.vocab_size
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, V, size=200) for _ in range(12)]
    exact = engine.score(seqs, V)  # every id by rank: the full distribution
    seeds = [record_seed(7, i) for i in range(len(seqs))]
    drawn = engine.score(seqs, 0, samples=64, seeds=seeds)
    h_hat, h, top_hat, top = [], [], [], []
    for e, d in zip(exact, drawn):
        full = np.full((len(e.label_logprob), V), -np.inf)
        np.put_along_axis(full, e.topk_ids, e.topk_logprobs, axis=1)
        counts = d.sample_counts
        assert (counts.sum(1) == 64).all()
        valid = counts > 0
        # The drawn entries carry the exact log-probs of their ids.
        np.testing.assert_allclose(d.topk_logprobs[valid], np.take_along_axis(full, d.topk_ids, 1)[valid], atol=1e-4)
        np.testing.assert_allclose(d.label_logprob, e.label_logprob, atol=1e-5)
        w = counts / 64
        h_hat.append((w * -np.where(valid, d.topk_logprobs, 0)).sum(1))
        h.append(-(np.exp(full) * np.where(np.isfinite(full), full, 0)).sum(1))
        top_id = e.topk_ids[:, :1]
        top_hat.append(np.where(d.topk_ids == top_id, w, 0).sum(1))
        top.append(np.exp(e.topk_logprobs[:, 0]))
    for est, true in ((np.concatenate(h_hat), np.concatenate(h)), (np.concatenate(top_hat), np.concatenate(top))):
        diff = est - true
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        assert abs(diff.mean()) < 4 * se + 1e-6, (diff.mean(), se)
    # Other batches and row chunks draw the same tokens (one sequence per batch, 7 rows per
    # chunk, against all together): the draws follow the records' seeds and positions.
    # (The log-probs may move in the last bits with the batch's shape; the draws would
    # only at a CDF boundary.)
    small = HFTeacher(str(teacher), dtype="float32", batch_tokens=200, chunk_rows=7).score(seqs[:3], 0, samples=64, seeds=seeds[:3])
    for a, b in zip(small, drawn[:3]):
        assert np.array_equal(a.topk_ids, b.topk_ids) and np.array_equal(a.sample_counts, b.sample_counts)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)


def _reseal(root: Path, name: str) -> None:
    """Record the current bytes of ``name``'s unit chunks as the written ones (checksum
    tables, markers, attributes), so that verify's value checks, not the CRCs, judge it."""
    from hpd_tools.cache import integrity
    from hpd_tools.cache.layout import ATTR, unit_marker

    meta = json.loads((root / "zarr.json").read_text())
    attrs = meta["attributes"][ATTR]
    sums, sizes = integrity.decode_table((root / integrity.UNITS_FILE).read_bytes(), "")
    for u in range(attrs["n_units"]):
        f = root / name / "c" / str(u) / "0"
        sums[name][u], sizes[name][u] = integrity.crc(f.read_bytes()), f.stat().st_size
        marker = json.loads((root / unit_marker(u)).read_text())
        marker["checksums"][name], marker["sizes"][name] = int(sums[name][u]), int(sizes[name][u])
        (root / unit_marker(u)).write_text(json.dumps(marker))
    raw = integrity.encode_table(sums, sizes)
    (root / integrity.UNITS_FILE).write_bytes(raw)
    attrs["checksums"]["units"] = integrity.digest(raw)
    (root / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (lambda c, r: c.__setitem__((r, 0), c[r, 0] + 1), "sum to 17"),
    (lambda c, r: c.__setitem__((r, slice(None)), np.r_[0, c[r, :-1]]), "follows padding"),
])
def test_verify_catches_a_corrupted_count_row(built, tmp_path, damage, message):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    array = zarr.open_group(str(copy), mode="r+")["sample_counts"]
    counts = array[:]
    row = int(np.flatnonzero(counts.sum(1) > 0)[5])
    damage(counts, row)
    array[:] = counts
    _reseal(copy, "sample_counts")
    with pytest.raises(CacheCorruptError, match=message):
        verify_cache(copy)


def test_key_differs_by_signal_and_n_and_seed_and_topk_keys_are_unchanged(teacher, data, tmp_path):
    from hpd_tools.cache import codec
    from hpd_tools.cache.layout import FORMAT_VERSION
    from hpd_tools.cache.writer import _load_tokenizer, make_plan
    from hpd_tools.data import read_examples
    from hpd_tools.hashing import chat_template_hash, hash_obj, model_hash, sha256_hex, tokenizer_hash

    def key(**kw) -> str:
        return build_cache(CacheConfig(teacher=str(teacher), data=str(data), engine="hf", out=str(tmp_path / "x"), **kw), dry_run=True).key

    topk = key()
    keys = {topk, key(signal="sampled", samples=N), key(signal="sampled", samples=N + 1), key(signal="sampled", samples=N, seed=1)}
    assert len(keys) == 4
    assert key(seed=1) == topk  # a top-k cache draws nothing: its seed is not in its key, as before
    # The top-k key is the one hpd-tools computed before sampled caches existed.
    tokenizer = _load_tokenizer(str(teacher))
    examples, _ = read_examples(str(data), tokenizer, max_length=2048)
    identity = {"format_version": FORMAT_VERSION, "teacher_hash": model_hash(teacher), "tokenizer_hash": tokenizer_hash(tokenizer),
                "chat_template_hash": chat_template_hash(tokenizer), "top_k": 64, "max_length": 2048, "dtype": "float32",
                "engine_name": "hf", "codec": codec.CODEC_VERSION}
    fingerprint = sha256_hex(make_plan(examples, 16384).example_ids.tobytes())
    assert topk == hash_obj({"compat": hash_obj(identity), "data": fingerprint})[:32]


def test_bad_sampled_options_are_one_line(teacher, data):
    proc = run_cli("cache", "--teacher", str(teacher), "--data", str(data), "--engine", "hf", "--signal", "sampled", "--samples", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --samples 0: must be in 1..255 (draws per position; counts are stored in one byte)"]
    for kw, message in (({"samples": 256}, "--samples 256: must be in 1..255"), ({"top_k": 8}, "--top-k 8 with --signal sampled"),
                        ({"signal": "topk", "samples": 8}, "--samples 8 with --signal topk"), ({"signal": "dense"}, "--signal dense: choose topk, sampled")):
        config = CacheConfig(teacher=str(teacher), data=str(data), engine="hf", **{"signal": "sampled", **kw})
        with pytest.raises(HPDError, match=message):
            config.validate()


def test_the_server_engine_refuses_samples_in_one_line():
    from hpd_tools.engines.server import ServerTeacher

    engine = ServerTeacher.__new__(ServerTeacher)  # the refusal comes before any request: no server needed
    engine.url = "http://127.0.0.1:1"
    with pytest.raises(HPDError, match="cannot draw samples"):
        engine.score([np.arange(4)], 8, samples=8, seeds=[1])
