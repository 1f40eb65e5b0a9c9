"""Corrupted caches: every damage a disk, a copy or a person can do to a cache is
found by `verify`, by the reader `distill` streams, and by reuse, in one line
that names the cache and what is damaged; nothing trains on it, and a new cache
never copies its rows.

A table of corruptions (delete, truncate, flip and swap chunks; remove or garble
markers; edit attributes; drop checksum tables) is applied to copies of one
small cache built here with the transformers engine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, train_records, write_jsonl
from hpd_tools import CacheConfig, CacheReader, build_cache, cache_info, list_caches, verify_cache
from hpd_tools.cache.layout import ATTR
from hpd_tools.errors import CacheCorruptError

CHUNK = 256


@pytest.fixture(scope="module")
def pristine(teacher, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corruption")
    data = write_jsonl(root / "train.jsonl", train_records(24))
    common = dict(teacher=str(teacher), engine="hf", top_k=8, max_length=256, chunk_tokens=CHUNK)
    built = build_cache(CacheConfig(data=str(data), out=str(root / "cache"), **common))
    assert built.complete and built.units_total >= 4
    return {"root": root, "cache": Path(built.location), "data": data, "common": common, "units": built.units_total}


def _chunk(cache: Path, name: str, unit: int) -> Path:
    f = cache / name / "c" / str(unit)
    return f / "0" if f.is_dir() else f


def _flip(path: Path, at: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * at)
    raw[i] ^= 0x10
    path.write_bytes(bytes(raw))


def _swap(a: Path, b: Path) -> None:
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(rb)
    b.write_bytes(ra)


def _edit_attrs(cache: Path, edit) -> None:
    meta = json.loads((cache / "zarr.json").read_text())
    edit(meta["attributes"][ATTR])
    (cache / "zarr.json").write_text(json.dumps(meta))


def _response_unit(cache: Path) -> int:
    """A unit whose teacher chunks hold data (not only zeros)."""
    for u in range(100):
        if _chunk(cache, "topk_ids", u).exists():
            return u
    raise AssertionError("no unit with top-k data")


# (name, corruption, message pattern). Each takes the cache folder.
CORRUPTIONS = [
    ("delete label_logprob chunk", lambda c: _chunk(c, "label_logprob", 1).unlink(), r"label_logprob.*unit 1.*missing"),
    ("delete tokens chunk", lambda c: _chunk(c, "tokens", 2).unlink(), r"tokens.*unit 2.*missing"),
    ("delete loss_mask chunk", lambda c: _chunk(c, "loss_mask", 0).unlink(), r"loss_mask.*unit 0.*missing"),
    ("delete topk_head chunk", lambda c: _chunk(c, "topk_head", 1).unlink(), r"topk_head.*unit 1.*missing"),
    ("delete topk_ids chunk", lambda c: _chunk(c, "topk_ids", _response_unit(c)).unlink(), r"topk_ids.*missing"),
    ("delete offsets chunk", lambda c: _chunk(c, "offsets", 0).unlink(), r"offsets.*missing"),
    ("delete example_id chunk", lambda c: _chunk(c, "example_id", 0).unlink(), r"example_id.*missing"),
    ("flip a byte of label_logprob", lambda c: _flip(_chunk(c, "label_logprob", 1)), r"label_logprob.*unit 1.*checksum"),
    ("flip a byte of topk_logprobs", lambda c: _flip(_chunk(c, "topk_logprobs", _response_unit(c)), 0.9), r"topk_logprobs.*checksum"),
    ("flip a byte of tokens", lambda c: _flip(_chunk(c, "tokens", 0), 0.3), r"tokens.*unit 0.*checksum"),
    ("flip a byte of example_id", lambda c: _flip(_chunk(c, "example_id", 0)), r"example_id.*checksum"),
    ("truncate topk_ids", lambda c: _chunk(c, "topk_ids", 1).write_bytes(_chunk(c, "topk_ids", 1).read_bytes()[:17]), r"topk_ids.*unit 1.*(checksum|bytes, \d+ were written)"),
    ("empty label_logprob file", lambda c: _chunk(c, "label_logprob", 0).write_bytes(b""), r"label_logprob.*unit 0.*(checksum|bytes, \d+ were written)"),
    ("swap two label_logprob chunks", lambda c: _swap(_chunk(c, "label_logprob", 0), _chunk(c, "label_logprob", 1)), r"label_logprob.*(checksum|bytes, \d+ were written)"),
    ("swap two tokens chunks", lambda c: _swap(_chunk(c, "tokens", 1), _chunk(c, "tokens", 2)), r"tokens.*(checksum|bytes, \d+ were written)"),
    ("swap topk_ids chunks", lambda c: _swap(_chunk(c, "topk_ids", 0), _chunk(c, "topk_ids", 1)), r"topk_ids.*(checksum|bytes, \d+ were written)"),
    ("units checksum table deleted", lambda c: (c / "checksums" / "units.json").unlink(), r"checksums/units.json is missing"),
    ("units checksum table edited", lambda c: _flip(c / "checksums" / "units.json", 0.7), r"checksums/units.json does not match"),
    ("static checksum table deleted", lambda c: (c / "checksums" / "static.json").unlink(), r"checksums/static.json is missing"),
    ("attribute counts removed", lambda c: _edit_attrs(c, lambda a: a.pop("counts")), r"attribute 'counts.sequences' is missing"),
    ("attribute top_k garbled", lambda c: _edit_attrs(c, lambda a: a.__setitem__("top_k", "eight")), r"attribute 'top_k'"),
    ("attribute n_units wrong", lambda c: _edit_attrs(c, lambda a: a.__setitem__("n_units", a["n_units"] + 3)), r"attribute 'n_units'"),
    ("unknown codec", lambda c: _edit_attrs(c, lambda a: a.__setitem__("codec", "zip-v9")), r"codec 'zip-v9'"),
    ("checksums attribute removed", lambda c: _edit_attrs(c, lambda a: a.pop("checksums")), r"attribute 'checksums'"),
    ("zarr.json garbled", lambda c: (c / "zarr.json").write_bytes(b"{\"attributes\": {\"hpd_cache\": [1, 2"), r"zarr.json does not parse"),
    ("array metadata deleted", lambda c: (c / "topk_head" / "zarr.json").unlink(), r"topk_head"),
]
# Damage only verify can see (the data a reader streams is intact).
VERIFY_ONLY = [
    ("every marker removed", lambda c: [p.unlink() for p in (c / "progress").glob("unit-*.json")], r"marked complete but only 0/"),
    ("garbage marker", lambda c: (c / "progress" / "unit-00000001.json").write_bytes(b"\x00\xff garbage"), r"unit-00000001.json does not parse"),
    ("marker of another unit", lambda c: shutil.copy(c / "progress" / "unit-00000000.json", c / "progress" / "unit-00000002.json"), r"unit-00000002.json is not unit 2"),
    ("marker checksum edited", lambda c: _edit_marker(c, 1), r"unit 1 and checksums/units.json disagree"),
]


def _edit_marker(cache: Path, unit: int) -> None:
    path = cache / "progress" / f"unit-{unit:08d}.json"
    marker = json.loads(path.read_text())
    marker["checksums"]["label_logprob"] ^= 1
    path.write_text(json.dumps(marker))


@pytest.fixture
def damaged(pristine, tmp_path, request) -> Path:
    _, corrupt, _ = request.param
    copy = tmp_path / "cache"
    shutil.copytree(pristine["cache"], copy)
    corrupt(copy)
    return copy


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("damaged", CORRUPTIONS + VERIFY_ONLY, indirect=True, ids=[c[0] for c in CORRUPTIONS + VERIFY_ONLY])
def test_verify_names_the_damage(damaged, request):
    pattern = request.node.callspec.params["damaged"][2]
    with pytest.raises(CacheCorruptError, match=pattern) as caught:
        verify_cache(damaged)
    assert str(damaged) in _one_line(caught.value)


@pytest.mark.parametrize("damaged", CORRUPTIONS, indirect=True, ids=[c[0] for c in CORRUPTIONS])
def test_reader_never_yields_damaged_data(damaged, request):
    """The stream distill trains from stops with the same one-line error before any
    batch built from damaged chunks is handed out."""
    pattern = request.node.callspec.params["damaged"][2]
    with pytest.raises(CacheCorruptError, match=pattern) as caught:
        reader = CacheReader(damaged, shuffle=False)
        for _ in reader.batches(1024):
            pass
    _one_line(caught.value)


def test_intact_copy_reads_and_verifies(pristine, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(pristine["cache"], copy)
    report = verify_cache(copy)
    assert report.complete and report.units_checked == pristine["units"] and report.checksums == "crc32c"
    assert sum(len(s.tokens) for s in CacheReader(copy, shuffle=False).sequences()) == cache_info(copy)["tokens"]


def test_list_shows_a_damaged_cache_and_the_rest(pristine, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(pristine["cache"], root / "good")
    shutil.copytree(pristine["cache"], root / "bad")
    _edit_attrs(root / "bad", lambda a: a.pop("counts"))
    rows = {Path(r["location"]).name: r for r in list_caches(root)}
    assert not rows["good"]["damaged"] and rows["good"]["complete"]
    assert rows["bad"]["damaged"] and "counts" in rows["bad"]["data"]
    with pytest.raises(CacheCorruptError, match="attribute 'counts.sequences' is missing"):
        cache_info(root / "bad")
    listed = run_cli("list", "--root", str(root))
    assert listed.returncode == 0 and "damaged" in listed.stdout and "complete" in listed.stdout
    shown = run_cli("info", str(root / "bad"))
    assert shown.returncode == 2 and "Traceback" not in shown.stderr and shown.stderr.startswith("error:") and shown.stderr.strip().count("\n") == 0


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_reuse_never_copies_rows_from_a_damaged_donor(pristine, teacher, tmp_path, monkeypatch):
    """A new cache over more records finds the old one as a donor; with one of the
    donor's chunks flipped, the rows it would have given are scored again, so the new
    cache equals one built without reuse."""
    home = tmp_path / "home"
    monkeypatch.setenv("HPD_CACHE_HOME", str(home))
    common = pristine["common"]
    first = build_cache(CacheConfig(data=str(pristine["data"]), **common))
    donor = Path(first.location)
    _flip(_chunk(donor, "label_logprob", 1))
    before = _tree_digest(donor)
    more = write_jsonl(tmp_path / "more.jsonl", train_records(30))
    grown = build_cache(CacheConfig(data=str(more), **common))
    assert grown.complete
    assert _tree_digest(donor) == before  # the donor is never written
    fresh = build_cache(CacheConfig(data=str(more), out=str(tmp_path / "fresh"), reuse=False, **common))
    a, b = CacheReader(grown.location, shuffle=False), CacheReader(fresh.location, shuffle=False)
    for x, y in zip(a.sequences(), b.sequences()):
        np.testing.assert_array_equal(x.label_logprob, y.label_logprob)
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
    verify_cache(grown.location)


# verify and distill through the CLI on every corruption (exit codes, one line, nothing written, nothing trained)
# are rows of tests/test_fuzz.py, one driver process for all.


def _as_format_1(cache: Path) -> None:
    """What a cache written before checksums looks like: format 1, no tables, markers without checksums."""
    shutil.rmtree(cache / "checksums")
    _edit_attrs(cache, lambda a: (a.pop("checksums"), a.__setitem__("format_version", 1)))
    for marker in (cache / "progress").glob("unit-*.json"):
        body = json.loads(marker.read_text())
        body.pop("checksums")
        body.pop("sizes")
        marker.write_text(json.dumps(body))


def test_format_1_caches_still_read_with_the_checks_they_can_have(pristine, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(pristine["cache"], old)
    _as_format_1(old)
    report = verify_cache(old)
    assert report.complete and report.checksums.startswith("none (format 1")
    new = [s.label_logprob for s in CacheReader(pristine["cache"], shuffle=False).sequences()]
    assert all(np.array_equal(a, b) for a, b in zip(new, (s.label_logprob for s in CacheReader(old, shuffle=False).sequences())))
    # A chunk that no longer decodes is one line naming array and unit; so are missing markers.
    _chunk(old, "topk_ids", 1).write_bytes(b"\x00garbage" * 8)
    with pytest.raises(CacheCorruptError, match=r"array 'topk_ids' unit 1 \(positions 256-512\) cannot be read"):
        list(CacheReader(old, shuffle=False).sequences())
    (old / "progress" / "unit-00000000.json").unlink()
    with pytest.raises(CacheCorruptError, match=r"marked complete but only \d+/\d+ units have markers"):
        CacheReader(old)
