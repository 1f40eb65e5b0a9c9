"""Cache format 3: the ids' and codes' codecs round-trip real teacher rows, a
format-3 cache verifies and opens with plain zarr, damage to its chunks is
caught in one line, and format 2 caches written by the previous code still read.

Fixtures in tests/data: ``smollm2-top64-rows.npz`` holds 800 positions of
SmolLM2-135M-Instruct's top-64 from the demo cache (format 2, as stored:
prompt rows zero); ``format2-cache`` is a cache written by format 2's code
(tiny teacher of conftest, hf engine, k=8, 3 units), with its rows as that
code decoded them in ``format2-cache.expected.npz``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import run_cli, train_records, write_jsonl
from hpd_tools import CacheConfig, CacheReader, build_cache, verify_cache
from hpd_tools.cache import codec
from hpd_tools.cache.layout import ATTR, FORMAT_VERSION
from hpd_tools.errors import CacheCorruptError

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    return dict(np.load(DATA / "smollm2-top64-rows.npz"))


def _store(path: Path, arrays: dict[str, np.ndarray], version: int, chunk: int = 256) -> zarr.Group:
    group = zarr.open_group(str(path), mode="w")
    for name, values in arrays.items():
        group.create_array(name, shape=values.shape, chunks=(chunk, *values.shape[1:]), dtype=values.dtype, fill_value=0, **codec.zarr_codecs(name, version))[:] = values
    return group


def _bytes(path: Path, name: str) -> int:
    return sum(f.stat().st_size for f in (path / name / "c").rglob("*") if f.is_file())


def test_real_teacher_rows_round_trip_in_fewer_bytes_than_format_2(rows, tmp_path):
    arrays = {"topk_ids": rows["topk_ids"], "topk_logprobs": rows["topk_logprobs"]}
    v3 = _store(tmp_path / "v3", arrays, 3)
    _store(tmp_path / "v2", arrays, 2)
    for name, values in arrays.items():
        back = zarr.open_group(str(tmp_path / "v3"), mode="r")[name][:]
        assert back.dtype == values.dtype and np.array_equal(back, values), name
    assert [c.to_dict()["name"] for c in v3["topk_ids"].metadata.codecs] == [codec.IDS_CODEC]
    # Even in chunks of 256 rows (a cache's units hold 16k), which carry their renumbering.
    assert _bytes(tmp_path / "v3", "topk_ids") <= 1.02 * _bytes(tmp_path / "v2", "topk_ids")
    assert _bytes(tmp_path / "v3", "topk_logprobs") < _bytes(tmp_path / "v2", "topk_logprobs")


def test_ids_codec_on_wide_vocabularies_and_edge_chunks(rows):
    ids = rows["topk_ids"]
    wide = ids.astype(np.int32) * 3 + 7  # ids past 65535: a 152k vocabulary stores int32
    assert wide.max() > 65535
    for values in (ids, wide, ids[:1], np.zeros((5, 64), np.uint16), np.full((3, 8), 65535, np.uint16)):
        back = codec.decode_ids(codec.encode_ids(values), values.dtype, values.shape)
        assert back.dtype == values.dtype and np.array_equal(back, values)
    raw = codec.encode_ids(ids)
    with pytest.raises(ValueError, match="hpd_tools.topk_ids"):
        codec.decode_ids(raw[:-7], ids.dtype, ids.shape)
    with pytest.raises(ValueError, match="header"):
        codec.decode_ids(b"XXXX" + raw[4:], ids.dtype, ids.shape)


def test_code_steps_round_trip_sorted_and_unsorted_rows(rows):
    codes = rows["topk_logprobs"]
    assert np.array_equal(codec.from_rank_steps(codec.rank_steps(codes)), codes)
    unsorted = codes.copy()
    unsorted[3, 1], unsorted[3, 5] = 200, 2
    assert np.array_equal(codec.from_rank_steps(codec.rank_steps(unsorted), monotone=False), unsorted)


def test_a_format_3_store_opens_with_plain_zarr(rows, tmp_path):
    _store(tmp_path / "v3", {"topk_ids": rows["topk_ids"]}, 3)
    np.save(tmp_path / "ids.npy", rows["topk_ids"])
    script = (
        "import sys, numpy as np, zarr\n"
        "assert 'hpd_tools' not in sys.modules\n"
        f"ids = zarr.open_group({str(tmp_path / 'v3')!r}, mode='r')['topk_ids'][:]\n"
        f"assert np.array_equal(ids, np.load({str(tmp_path / 'ids.npy')!r}))\n"
    )
    # From another folder: a checkout's stale hpd_tools.egg-info in the working directory would shadow the installed entry points.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def fresh(teacher, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("format3")
    data = write_jsonl(root / "train.jsonl", train_records(6))
    built = build_cache(CacheConfig(data=str(data), out=str(root / "cache"), teacher=str(teacher), engine="hf", top_k=8, max_length=256, chunk_tokens=256))
    assert built.complete and built.units_total == 3
    return Path(built.location)


def test_a_fresh_cache_is_format_3_and_verifies(fresh):
    attrs = json.loads((fresh / "zarr.json").read_text())["attributes"][ATTR]
    assert FORMAT_VERSION == 3 and attrs["format_version"] == 3
    assert codec.IDS_CODEC in attrs["codec_spec"]["topk_ids"]
    report = verify_cache(fresh)
    assert report.format_version == 3 and report.checksums == "crc32c" and report.units_checked == 3
    group = zarr.open_group(str(fresh), mode="r")
    assert [c.to_dict()["name"] for c in group["topk_logprobs"].metadata.codecs][0] == codec.DELTA_CODEC


def test_format_3_holds_the_rows_format_2_held(fresh, tmp_path):
    """The same teacher, data and options as the format-2 fixture: the same rows
    (teacher floats within what another CPU's kernels may change)."""
    expected = np.load(DATA / "format2-cache.expected.npz")
    reader = CacheReader(fresh, shuffle=False)
    seqs = [s for u in range(reader.store.n_units) for s in reader.read_unit(u)]
    assert np.array_equal(np.concatenate([s.tokens for s in seqs]), expected["tokens"])
    assert np.array_equal(np.concatenate([s.loss_mask for s in seqs]), expected["loss_mask"])
    np.testing.assert_allclose(np.concatenate([s.label_logprob for s in seqs]), expected["label_logprob"], atol=2e-3)
    np.testing.assert_allclose(np.concatenate([s.topk_logprobs for s in seqs]), expected["topk_logprobs"], atol=0.05)
    assert (np.concatenate([s.topk_ids for s in seqs]) == expected["topk_ids"]).mean() > 0.99


def test_format_2_cache_written_by_format_2_code_still_reads(tmp_path):
    cache = tmp_path / "format2-cache"
    shutil.copytree(DATA / "format2-cache", cache)
    assert json.loads((cache / "zarr.json").read_text())["attributes"][ATTR]["format_version"] == 2
    report = verify_cache(cache)
    assert report.format_version == 2 and report.checksums == "crc32c" and report.units_checked == 3
    expected = np.load(DATA / "format2-cache.expected.npz")
    reader = CacheReader(cache, shuffle=False)
    seqs = [s for u in range(reader.store.n_units) for s in reader.read_unit(u)]
    assert [s.index for s in seqs] == expected["index"].tolist()
    for name in ("tokens", "loss_mask", "label_logprob", "topk_ids", "topk_logprobs"):
        assert np.array_equal(np.concatenate([getattr(s, name) for s in seqs]), expected[name]), name


@pytest.mark.parametrize("name", ["topk_ids", "topk_logprobs"])
def test_a_damaged_format_3_chunk_is_one_line(fresh, tmp_path, name):
    cache = tmp_path / "cache"
    shutil.copytree(fresh, cache)
    chunk = cache / name / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptError, match=rf"array '{name}' unit 1.*checksum mismatch"):
        verify_cache(cache)
    with pytest.raises(CacheCorruptError, match="checksum mismatch"):
        CacheReader(cache, shuffle=False).read_unit(1)
    if name == "topk_ids":
        done = run_cli("verify", str(cache))  # exit 1: a violation found (cli.py)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        failed = [line for line in done.stderr.splitlines() if "verify failed" in line]  # after the progress line
        assert len(failed) == 1 and failed[0].startswith("verify failed:") and "'topk_ids' unit 1" in failed[0] and "checksum mismatch" in failed[0]


def test_verify_refuses_format_3_ids_in_another_codec(fresh, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(fresh, cache)
    meta_path = cache / "topk_ids" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 3, "checksum": False}}]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheCorruptError, match="format 3 stores it with hpd_tools.topk_ids"):
        verify_cache(cache)
