"""The cache stage end to end with the transformers engine: layout, position
convention, reuse, incremental records, reader, info/list, verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM

from conftest import train_records, write_jsonl
from hpd_tools import CacheConfig, CacheReader, build_cache, cache_info, list_caches, verify_cache
from hpd_tools.cache import codec
from hpd_tools.errors import CacheCorruptError, CacheError, HPDError

ARRAYS = ("tokens", "offsets", "loss_mask", "example_id", "label_logprob", "topk_head", "topk_ids", "topk_logprobs")


def config(teacher: Path, data: Path, **kw) -> CacheConfig:
    base = dict(teacher=str(teacher), data=str(data), engine="hf", top_k=16, max_length=512, chunk_tokens=256, batch_tokens=2048)
    base.update(kw)
    return CacheConfig(**base)


def arrays(path: str | Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ARRAYS}


def assert_same_content(a: dict, b: dict, exact: bool = True) -> None:
    for name in ("tokens", "offsets", "loss_mask", "example_id"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    if exact:
        for name in ("label_logprob", "topk_head", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        return
    np.testing.assert_allclose(a["label_logprob"].astype(np.float32), b["label_logprob"].astype(np.float32), atol=2e-3, rtol=2e-3)
    da = codec.decode_logprobs(a["topk_head"], a["topk_logprobs"])
    db = codec.decode_logprobs(b["topk_head"], b["topk_logprobs"])
    tol = np.minimum(codec.error_bound(a["topk_logprobs"]), 1.0) + codec.error_bound(b["topk_logprobs"]).clip(max=1.0)
    assert (np.abs(da - db) <= tol + 1e-2).all()
    assert (a["topk_ids"] == b["topk_ids"]).mean() > 0.99


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", train_records(40))


@pytest.fixture
def built(teacher, data, tmp_path):
    result = build_cache(config(teacher, data, out=str(tmp_path / "c1")))
    return result


def test_layout_and_attributes(built, teacher):
    assert built.complete and built.units_computed == built.units_total > 1
    a = arrays(built.location)
    n, s = built.tokens, built.sequences
    assert a["tokens"].shape == (n,) and a["offsets"].shape == (s + 1,) and a["topk_ids"].shape == (n, 16)
    assert a["topk_ids"].dtype == np.uint16 and a["topk_logprobs"].dtype == np.uint8
    assert a["offsets"][0] == 0 and a["offsets"][-1] == n
    last = a["offsets"][1:] - 1
    assert not a["loss_mask"][last].any()
    # Prompt positions carry no top-k; response positions do.
    assert (a["topk_ids"][~a["loss_mask"]] == 0).all()
    assert (codec.decode_logprobs(a["topk_head"], a["topk_logprobs"])[a["loss_mask"]] < 0).all()
    attrs = zarr.open_group(built.location).attrs["hpd_cache"]
    for field in ("format_version", "teacher_hash", "tokenizer_hash", "chat_template_hash", "top_k", "max_length", "codec", "key", "complete"):
        assert attrs[field] is not None, field
    assert attrs["top_k"] == 16 and attrs["complete"] is True
    import transformers

    assert attrs["engine"] == {"name": "hf", "version": transformers.__version__} and attrs["engine_name"] == "hf"
    assert attrs["data"]["fingerprint"] and attrs["teacher"]["path"] == str(Path(teacher).resolve())
    assert 0 < attrs["quality"]["mean_abs_kl_distortion"] < 1e-2


def test_position_convention(built, teacher):
    """label_logprob[i] is the teacher's log-prob of token i+1 given tokens 0..i,
    computed here with a plain full-sequence forward pass (no padding, no batching)."""
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    a = arrays(built.location)
    for s in (0, 7, len(a["offsets"]) - 2):
        o0, o1 = a["offsets"][s], a["offsets"][s + 1]
        tokens = torch.from_numpy(a["tokens"][o0:o1].astype(np.int64))[None]
        with torch.no_grad():
            logprobs = model(tokens).logits[0].log_softmax(-1)
        expected = logprobs[:-1].gather(-1, tokens[0, 1:, None])[:, 0].numpy()
        stored = a["label_logprob"][o0 : o1 - 1].astype(np.float32)
        np.testing.assert_allclose(stored, expected, atol=1e-2, rtol=2e-3)
        mask = a["loss_mask"][o0 : o1 - 1]
        top = logprobs[:-1].topk(16, -1)
        np.testing.assert_array_equal(a["topk_ids"][o0 : o1 - 1][mask][:, :4], top.indices[torch.from_numpy(mask)][:, :4].numpy())
        assert a["label_logprob"][o1 - 1] == 0  # the last position has no next token


def test_rerun_reuses_without_teacher_work(built, teacher, data, tmp_path):
    again = build_cache(config(teacher, data, out=str(tmp_path / "c1")))
    assert again.already_complete and again.units_computed == 0 and again.tokens_scored == 0
    assert again.location == built.location and again.key == built.key


def test_default_location_is_the_key_under_the_cache_root(teacher, data, cache_home):
    first = build_cache(config(teacher, data))
    assert Path(first.location) == cache_home / first.key
    second = build_cache(config(teacher, data))
    assert second.already_complete and second.location == first.location
    rows = list_caches()
    assert [r["key"] for r in rows] == [first.key]
    assert rows[0]["k"] == 16 and rows[0]["tokens"] == first.tokens and rows[0]["complete"]


def test_key_depends_on_content_not_paths(teacher, tmp_path):
    a = build_cache(config(teacher, write_jsonl(tmp_path / "a.jsonl", train_records(5)), out=str(tmp_path / "a")))
    b = build_cache(config(teacher, write_jsonl(tmp_path / "b.jsonl", train_records(5)), out=str(tmp_path / "b")))
    c = build_cache(config(teacher, write_jsonl(tmp_path / "c.jsonl", train_records(6)), out=str(tmp_path / "c")))
    d = build_cache(config(teacher, tmp_path / "a.jsonl", out=str(tmp_path / "d"), top_k=8))
    assert a.key == b.key and len({a.key, c.key, d.key}) == 3


def test_added_records_compute_only_the_new_ones(teacher, tmp_path, cache_home):
    small = build_cache(config(teacher, write_jsonl(tmp_path / "v1.jsonl", train_records(30))))
    bigger = build_cache(config(teacher, write_jsonl(tmp_path / "v2.jsonl", train_records(36))))
    assert bigger.key != small.key and bigger.complete
    assert bigger.sequences_reused == 30
    fresh = build_cache(config(teacher, tmp_path / "v2.jsonl", out=str(tmp_path / "fresh"), reuse=False))
    # Only the 6 new records went through the teacher (a record that straddles a
    # unit boundary is scored once per unit, hence at most twice).
    offsets = arrays(fresh.location)["offsets"]
    new_tokens = int(offsets[36] - offsets[30])
    assert new_tokens <= bigger.tokens_scored <= 2 * new_tokens
    assert bigger.tokens_scored < fresh.tokens_scored / 3
    assert_same_content(arrays(bigger.location), arrays(fresh.location), exact=False)
    verify_cache(bigger.location)


def test_out_holding_other_inputs_is_refused_and_kept(built, teacher, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", train_records(3))
    with pytest.raises(HPDError, match="holds a cache for other inputs"):
        build_cache(config(teacher, other, out=built.location))
    assert verify_cache(built.location).complete


def test_out_that_is_not_a_cache(teacher, data, tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(HPDError, match="not an hpd-tools cache"):
        build_cache(config(teacher, data, out=str(folder)))
    assert (folder / "notes.txt").read_text() == "keep me"
    with pytest.raises(CacheError):
        cache_info(folder)


def test_reader_streams_every_sequence_once(built):
    reader = CacheReader(built.location, seed=1, buffer_sequences=8)
    a = arrays(built.location)
    seen = {}
    for seq in reader.sequences():
        o0, o1 = a["offsets"][seq.index], a["offsets"][seq.index + 1]
        np.testing.assert_array_equal(seq.tokens, a["tokens"][o0:o1])
        np.testing.assert_array_equal(seq.loss_mask, a["loss_mask"][o0:o1])
        assert seq.topk_logprobs.shape == (o1 - o0, 16) and seq.topk_logprobs.dtype == np.float32
        seen[seq.index] = seen.get(seq.index, 0) + 1
    assert sorted(seen) == list(range(built.sequences)) and set(seen.values()) == {1}


def test_reader_readahead_yields_the_same_stream(built):
    """Units read ahead in threads (the default on object storage) change nothing
    but timing, also for a stream resumed mid-epoch or dropped half-way."""
    plain = CacheReader(built.location, seed=2, buffer_sequences=8, readahead=0)
    ahead = CacheReader(built.location, seed=2, buffer_sequences=8, readahead=3)
    assert built.units_total > 4
    for start in (0, 7):
        a, b = list(plain.sequences(1, start=start)), list(ahead.sequences(1, start=start))
        assert [s.index for s in a] == [s.index for s in b]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)
            np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
    it = ahead.sequences(0)
    next(it)
    it.close()  # stops its read-ahead threads


def test_reader_shuffle_and_ranks(built):
    order = lambda **kw: [s.index for s in CacheReader(built.location, **kw).sequences()]  # noqa: E731
    assert order(seed=3) == order(seed=3)
    assert order(seed=3) != order(seed=4)
    assert order(shuffle=False) == list(range(built.sequences))
    parts = [order(seed=3, rank=r, world_size=3) for r in range(3)]
    assert all(parts)
    assert sorted(sum(parts, [])) == list(range(built.sequences))
    assert sum(len(p) for p in parts) == built.sequences


def test_reader_resumes_mid_epoch_without_replaying(built):
    reader = CacheReader(built.location, seed=5, buffer_sequences=8)
    full = [s.index for s in reader.sequences(epoch=2)]
    assert full == reader.order(epoch=2).tolist()
    tail = list(reader.sequences(epoch=2, start=17))
    assert [s.index for s in tail] == full[17:]
    np.testing.assert_array_equal(tail[0].tokens, reader.read_sequence(full[17]).tokens)
    assert reader.order(epoch=3).tolist() != full


def test_reader_batches_respect_budget(built):
    reader = CacheReader(built.location, seed=0)
    total = 0
    for batch in reader.batches(batch_tokens=1024):
        b, t = batch.input_ids.shape
        assert b * t <= 1024 or b == 1
        assert batch.topk_ids.shape == (b, t, 16)
        for i, n in enumerate(batch.lengths):
            assert not batch.loss_mask[i, n:].any()
        total += batch.n_tokens
    assert total == built.tokens


def test_reader_refuses_incomplete_cache(built):
    group = zarr.open_group(built.location, mode="r+")
    attrs = dict(group.attrs["hpd_cache"])
    attrs["complete"] = False
    group.attrs["hpd_cache"] = attrs
    Path(built.location, "progress", "unit-00000001.json").unlink()
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(built.location)


def test_info(built):
    info = cache_info(built.location)
    assert info["complete"] and info["sequences"] == built.sequences and info["tokens"] == built.tokens
    assert info["k"] == 16 and info["units_done"] == info["units_total"]
    assert info["bytes_on_disk"] == sum(info["bytes_by_array"].values()) > 0
    assert info["bytes_per_token"] == pytest.approx(info["bytes_on_disk"] / built.tokens, rel=1e-3)
    assert info["mean_abs_kl_distortion"] is not None
    json.dumps(info)


# -- verify -------------------------------------------------------------------

def test_verify_passes_a_good_cache(built):
    report = verify_cache(built.location)
    assert report.complete and report.units_checked == built.units_total
    assert report.positions == built.tokens and report.label_in_topk > 0
    assert report.max_label_gap <= 0.5


def test_verify_catches_a_garbage_chunk(built):
    chunk = Path(built.location, "topk_ids", "c", "1", "0")
    chunk.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(CacheCorruptError, match=r"topk_ids.*unit 1.*(checksum mismatch|400 bytes, \d+ were written)"):
        verify_cache(built.location)


def test_verify_catches_a_truncated_chunk(built):
    chunk = Path(built.location, "topk_logprobs", "c", "2", "0")
    chunk.write_bytes(chunk.read_bytes()[:20])
    with pytest.raises(CacheCorruptError, match=r"topk_logprobs.*unit 2.*(checksum mismatch|20 bytes, \d+ were written)"):
        verify_cache(built.location)


def _rewrite(location: str, name: str, edit, reseal: bool = True) -> None:
    """Rewrite an array through zarr, so the chunk decodes but its values are wrong.
    ``reseal``: also record the new chunks' checksums, as a writer with a bug would,
    so that the value checks (the only ones a format 1 cache has) are what fails."""
    array = zarr.open_group(location, mode="r+")[name]
    values = array[:]
    edit(values)
    array[:] = values
    if reseal:
        reseal_checksums(location)


def reseal_checksums(location: str | Path) -> None:
    """Recompute every chunk's CRC-32C from the files and rewrite the tables, markers
    and attributes that record them (a cache whose values, not bytes, are wrong)."""
    from hpd_tools.cache import integrity
    from hpd_tools.cache.layout import ATTR, STATIC_ARRAYS, TEACHER_ARRAYS, unit_marker

    root = Path(location)
    meta = json.loads((root / "zarr.json").read_text())
    attrs = meta["attributes"][ATTR]

    def sums(name: str) -> tuple[np.ndarray, np.ndarray]:
        table = integrity.decode_table((root / (integrity.STATIC_FILE if name in STATIC_ARRAYS else integrity.UNITS_FILE)).read_bytes(), "")[0][name]
        sizes = table.copy()
        for i in range(len(table)):
            f = root / name / "c" / str(i)
            f = f / "0" if f.is_dir() else f
            table[i] = integrity.crc(f.read_bytes()) if f.exists() else integrity.FILL
            sizes[i] = f.stat().st_size if f.exists() else integrity.FILL
        return table, sizes

    static = {name: sums(name) for name in STATIC_ARRAYS}
    units = {name: sums(name) for name in TEACHER_ARRAYS}
    static_raw = integrity.encode_table({n: v[0] for n, v in static.items()}, {n: v[1] for n, v in static.items()})
    (root / integrity.STATIC_FILE).write_bytes(static_raw)
    (root / integrity.UNITS_FILE).write_bytes(integrity.encode_table({n: v[0] for n, v in units.items()}, {n: v[1] for n, v in units.items()}))
    for u in range(attrs["n_units"]):
        marker = json.loads((root / unit_marker(u)).read_text())
        marker["checksums"] = {name: int(units[name][0][u]) for name in TEACHER_ARRAYS}
        marker["sizes"] = {name: int(units[name][1][u]) for name in TEACHER_ARRAYS}
        (root / unit_marker(u)).write_text(json.dumps(marker))
    static = static_raw
    attrs["checksums"].update(static=integrity.digest(static), units=integrity.digest((root / integrity.UNITS_FILE).read_bytes()))
    (root / "zarr.json").write_text(json.dumps(meta))


def test_checksums_catch_a_chunk_rewritten_with_valid_encoding(built):
    _rewrite(built.location, "label_logprob", lambda v: v.__setitem__(np.flatnonzero(v)[0], np.float16(-1.0)), reseal=False)
    with pytest.raises(CacheCorruptError, match="label_logprob.*unit 0.*checksum mismatch"):
        verify_cache(built.location)
    with pytest.raises(CacheCorruptError, match="label_logprob.*unit 0.*checksum mismatch"):
        list(CacheReader(built.location, shuffle=False).sequences())


def test_verify_catches_unsorted_logprobs(built):
    mask = arrays(built.location)["loss_mask"]
    row = int(np.flatnonzero(mask)[3])

    def edit(v):
        v[row, 1], v[row, 5] = 30, 2

    _rewrite(built.location, "topk_logprobs", edit)
    with pytest.raises(CacheCorruptError, match="not sorted by rank"):
        verify_cache(built.location)


def test_verify_catches_label_disagreeing_with_topk(built):
    a = arrays(built.location)
    next_tokens = np.append(a["tokens"][1:], -1)
    hit = (a["topk_ids"] == next_tokens[:, None]).any(1) & a["loss_mask"]
    row = int(np.flatnonzero(hit)[0])

    def edit(v):
        v[row] = np.float16(v[row] - 3.0)

    _rewrite(built.location, "label_logprob", edit)
    with pytest.raises(CacheCorruptError, match="disagrees with its top-k entry"):
        verify_cache(built.location)


def test_verify_catches_bad_offsets_and_positive_logprobs(built, tmp_path):
    _rewrite(built.location, "topk_head", lambda v: v.__setitem__(np.flatnonzero(v)[0], np.float16(0.5)))
    with pytest.raises(CacheCorruptError, match="not a finite value <= 0"):
        verify_cache(built.location)
    _rewrite(built.location, "offsets", lambda v: v.__setitem__(-1, v[-1] - 1))
    with pytest.raises(CacheCorruptError, match="offsets"):
        verify_cache(built.location)


def test_verify_catches_missing_marker_on_complete_cache(built):
    Path(built.location, "progress", "unit-00000000.json").unlink()
    with pytest.raises(CacheCorruptError, match="marked complete"):
        verify_cache(built.location)
