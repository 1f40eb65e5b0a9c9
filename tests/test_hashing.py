"""Teacher identity: the full hash of every weight file, and the memo that hashes each file once."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hpd_tools import hashing
from hpd_tools.errors import HPDError
from hpd_tools.hashing import memo_path, model_hash

SIZE = 3 << 20
OLD = 1_700_000_000_000_000_000  # a fixed mtime in the past (ns): not "just written"


def make_model(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "_name_or_path": str(root), "transformers_version": "4.0"}))
    weights = np.frombuffer(hashlib.shake_256(f"weights {seed}".encode()).digest(SIZE), dtype=np.uint8)
    save_file({"w": weights}, str(root / "model.safetensors"))
    os.utime(root / "model.safetensors", ns=(OLD, OLD))
    return root


def between_samples(size: int) -> int:
    """An offset the former sampled hash (16 blocks of 64 KB plus the safetensors header) never
    read: after the 8th block. That hash kept its value when this byte changed."""
    step = size // 16
    return 8 * step + (1 << 16) + 1000


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def memo_files() -> dict:
    return json.loads(memo_path().read_text())["files"]


def test_a_byte_between_the_former_sample_points_changes_the_hash(tmp_path):
    model = make_model(tmp_path / "m")
    weights = model / "model.safetensors"
    before = model_hash(model)
    flip(weights, between_samples(weights.stat().st_size))
    os.utime(weights, ns=(OLD + 10**9, OLD + 10**9))  # a new mtime, as any real write gives
    changed = model_hash(model)
    assert changed != before
    flip(weights, between_samples(weights.stat().st_size))  # the same bytes again: the same identity
    os.utime(weights, ns=(OLD + 2 * 10**9, OLD + 2 * 10**9))
    assert model_hash(model) == before


def test_the_memo_remembers_each_file_by_path_size_mtime_and_inode(tmp_path):
    model = make_model(tmp_path / "m")
    weights = model / "model.safetensors"
    first = model_hash(model)
    entry = memo_files()[os.path.realpath(weights)]
    st = weights.stat()
    assert entry["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (entry["size"], entry["mtime_ns"], entry["inode"]) == (st.st_size, st.st_mtime_ns, st.st_ino)

    # The memo's contract: an edit that keeps the size and restores the mtime on the
    # same inode is not noticed (the file is not read again), as with make or rsync.
    flip(weights, between_samples(weights.stat().st_size))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_hash(model) == first

    # A changed mtime is noticed: the file is read again and its entry replaced.
    os.utime(weights, ns=(OLD + 10**9, OLD + 10**9))
    second = model_hash(model)
    assert second != first
    assert memo_files()[os.path.realpath(weights)]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    # A file replaced by another of the same size and mtime has a new inode: noticed too.
    replacement = tmp_path / "replacement"
    shutil.copyfile(tmp_path / "m" / "model.safetensors", replacement)
    flip(replacement, 10)
    os.utime(replacement, ns=(OLD + 10**9, OLD + 10**9))
    os.replace(replacement, weights)
    assert model_hash(model) not in (first, second)


def test_a_just_written_file_is_hashed_but_not_remembered(tmp_path):
    model = make_model(tmp_path / "m")
    os.utime(model / "model.safetensors")  # mtime now: it may change again within the same tick
    assert model_hash(model) == model_hash(make_model(tmp_path / "copy"))
    assert os.path.realpath(model / "model.safetensors") not in memo_files()


def test_same_content_in_two_folders_gives_the_same_hash(tmp_path):
    a = make_model(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    os.utime(b / "model.safetensors", ns=(OLD + 5, OLD + 5))
    config = json.loads((b / "config.json").read_text())
    config["_name_or_path"] = "somewhere/else"
    (b / "config.json").write_text(json.dumps(config))
    assert model_hash(a) == model_hash(b)
    assert len(memo_files()) == 2
    assert model_hash(a) != model_hash(make_model(tmp_path / "c", seed=1))
    config["hidden_size"] = 16
    (b / "config.json").write_text(json.dumps(config))
    assert model_hash(a) != model_hash(b)


def test_a_weight_file_renamed_changes_the_hash(tmp_path):
    a = make_model(tmp_path / "a")
    before = model_hash(a)
    os.rename(a / "model.safetensors", a / "pytorch_model.bin")
    assert model_hash(a) != before


def test_concurrent_writers_keep_the_memo_whole(tmp_path):
    folders = [make_model(tmp_path / f"m{i}", seed=i) for i in range(4)]
    code = "import sys; from hpd_tools.hashing import model_hash; print(model_hash(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(f)], stdout=subprocess.PIPE, text=True) for f in folders]
    hashes = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert hashes == [model_hash(f) for f in folders]
    files = memo_files()  # parses: never a torn file; entries a racing writer lost are recomputed
    assert os.path.realpath(folders[-1] / "model.safetensors") in files
    assert not [p for p in memo_path().parent.iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_memo_costs_a_rehash_only(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HPD_CACHE_HOME", str(blocker / "root"))  # under a file: cannot be created
    model = make_model(tmp_path / "m")
    with caplog.at_level(logging.WARNING, logger="hpd_tools.hashing"):
        assert model_hash(model) == model_hash(model)
    assert "could not remember weight hashes" in caplog.text


def test_a_corrupt_memo_is_rewritten(tmp_path):
    model = make_model(tmp_path / "m")
    memo_path().parent.mkdir(parents=True)
    memo_path().write_text('{"version": 1, "files": {')
    expected = model_hash(make_model(tmp_path / "fresh"))
    assert model_hash(model) == expected
    assert os.path.realpath(model / "model.safetensors") in memo_files()


def test_long_hashing_shows_progress_and_says_it_is_remembered(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hashing, "_PROGRESS_BYTES", 0)  # the real threshold is a few GB
    model = make_model(tmp_path / "m")
    with caplog.at_level(logging.INFO):
        model_hash(model)
    assert "hashing 1 weight file(s)" in caplog.text
    assert f"remembered in {memo_path()}" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_weight_file_is_one_line(tmp_path):
    model = make_model(tmp_path / "m")
    (model / "model.safetensors").chmod(0)
    with pytest.raises(HPDError, match="cannot read this weight file"):
        model_hash(model)
