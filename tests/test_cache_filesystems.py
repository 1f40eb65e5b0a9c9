"""The cache stage on filesystems that say no: full, read-only, a file in the way.

Real filesystems: small tmpfs mounts made here (root can mount; without that
permission these tests are skipped, saying so). Root ignores permission bits, so
chmod could not make a read-only folder; a read-only mount can.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, train_records, write_jsonl
from hpd_tools import CacheConfig, CacheReader, build_cache, verify_cache
from hpd_tools.errors import CacheError


@contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); these tests need root with mount permission")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("fs") / "train.jsonl", train_records(60))


def cfg(teacher: Path, data: Path, out: Path, **kw) -> CacheConfig:
    return CacheConfig(teacher=str(teacher), data=str(data), engine="hf", top_k=16, max_length=512, chunk_tokens=256, out=str(out), **kw)


def test_disk_full_mid_run_is_one_line_and_the_rerun_finishes(teacher, data, tmp_path):
    """The disk fills after some units: one line naming the unit, the finished units
    kept; with space again, the same command finishes and equals an uninterrupted run."""
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, "600k"):
        with pytest.raises(CacheError, match=r"writing unit \d+ failed \(no space left on the device\).*units already written are kept") as caught:
            build_cache(cfg(teacher, data, mnt / "c"))
        assert "\n" not in str(caught.value)
        kept = len(list((mnt / "c" / "progress").glob("unit-*.json")))
        assert kept > 0
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        done = build_cache(cfg(teacher, data, mnt / "c"))
        assert done.complete and done.units_computed == done.units_total - kept
        verify_cache(mnt / "c")
        whole = build_cache(cfg(teacher, data, tmp_path / "whole"))
        for a, b in zip(CacheReader(mnt / "c", shuffle=False).sequences(), CacheReader(whole.location, shuffle=False).sequences()):
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
            np.testing.assert_array_equal(a.label_logprob, b.label_logprob)


def test_disk_full_while_creating_leaves_nothing_behind(teacher, data, tmp_path):
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, "260k"):
        result = run_cli("cache", "--engine", "hf", "--teacher", str(teacher), "--data", str(data), "--top-k", "16", "--max-length", "512",
                         "--chunk-tokens", "256", "--out", str(mnt / "c"))
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no space left on the device" in errors[0], result.stderr
        assert "Traceback" not in result.stderr and "Task was destroyed" not in result.stderr
        assert list(mnt.iterdir()) == []  # no .c.tmp-* folder left


def test_read_only_filesystem_is_refused_before_the_teacher_loads(teacher, data, tmp_path):
    mnt = tmp_path / "ro"
    with tmpfs(mnt, "1m", read_only=True):
        result = run_cli("cache", "--engine", "hf", "--teacher", str(teacher), "--data", str(data), "--out", str(mnt / "c"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --out") and "read-only" in result.stderr
    assert "Traceback" not in result.stderr and "starting teacher" not in result.stderr


def test_out_under_a_file_is_refused(teacher, data, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    with pytest.raises(CacheError, match=r"--out .*notes.txt is a file, not a folder"):
        build_cache(cfg(teacher, data, blocker / "c"))
    assert blocker.read_text() == "mine"
