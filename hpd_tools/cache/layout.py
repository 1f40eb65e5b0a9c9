"""The on-disk layout of a cache: arrays, attributes, units of work and their markers.

A cache is one Zarr v3 group with a flat token axis (DESIGN.md section 3)::

    tokens         [N]     int32    token ids of all sequences, concatenated
    offsets        [S+1]   int64    sequence s is tokens[offsets[s]:offsets[s+1]]
    loss_mask      [N]     bool     position i trains on token i+1 (a response token)
    label_logprob  [N]     float16  teacher log-prob of token i+1 given tokens <= i
    topk_ids       [N, k]  uint16   teacher's top-k ids at position i, by rank
    topk_logprobs  [N, k]  uint8    quantised code (codec.py): head - code * step
    topk_head      [N]     float16  the top-1 log-prob each code row is relative to
    example_id     [S]     uint64   hash of the source record

Position convention: everything stored at position i is about the token at
i+1 of the same sequence. The last position of a sequence has no next token:
its loss_mask is False and its teacher arrays are zero. Top-k entries are
stored where loss_mask is True and are zero elsewhere (prompt positions carry
no training signal; zeros cost nothing compressed). label_logprob is stored
for every position but the last.

The token axis is split into units of ``chunk_tokens`` positions, one Zarr
chunk of every token-axis array each. A unit is the unit of work, crash
safety and sharding: its chunks are written whole, then the marker
``progress/unit-XXXXXXXX.json`` records it as done. A unit without a marker is
recomputed from scratch, so a killed writer never leaves half a unit as data.
Writers sharing a cache own disjoint units (unit u belongs to shard u mod N).
Within a shard, a writer claims each unit before computing it
(``progress/unit-XXXXXXXX.claim``, created exclusively); a second command on
the same cache and shard skips units a live writer holds, then waits for
their markers, so two identical commands started at once share the work. A
claim whose process is gone (same host) is taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from ..errors import CacheError
from . import codec

FORMAT_VERSION = 1
ATTR = "hpd_cache"
TEACHER_ARRAYS = ("label_logprob", "topk_ids", "topk_logprobs", "topk_head")
SEQUENCE_CHUNK = 1 << 16


def cache_root() -> Path:
    """Where caches live without --out: $HPD_CACHE_HOME, else the user cache dir."""
    env = os.environ.get("HPD_CACHE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hpd-tools"


@dataclass(frozen=True)
class Plan:
    """What a cache will hold, known before any teacher work: tokens and layout."""

    tokens: np.ndarray  # int32 [N]
    offsets: np.ndarray  # int64 [S+1]
    loss_mask: np.ndarray  # bool [N]
    example_ids: np.ndarray  # uint64 [S]
    chunk_tokens: int

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_units(self) -> int:
        return max(1, -(-self.n_tokens // self.chunk_tokens))

    def unit_range(self, unit: int) -> tuple[int, int]:
        start = unit * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def sequences_in(self, start: int, end: int) -> range:
        """Sequences that own at least one position in [start, end)."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, end, side="left"))
        return range(max(first, 0), last)


def unit_marker(unit: int) -> str:
    return f"progress/unit-{unit:08d}.json"


class CacheStore:
    """A cache on local disk: its group, attributes, arrays and unit markers."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r+")
        except Exception:
            raise CacheError(f"{self.path}: not an hpd-tools cache (no Zarr group there); give the folder that `hpd-tools cache` printed or that `hpd-tools list` shows") from None
        self.attrs: dict[str, Any] = dict(self.group.attrs.get(ATTR) or {})
        if not self.attrs:
            raise CacheError(f"{self.path}: a Zarr group but not an hpd-tools cache (no '{ATTR}' attributes)")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{self.path}: cache format {self.attrs.get('format_version')} is not supported by this version (expects {FORMAT_VERSION})")

    # -- identity ---------------------------------------------------------
    @property
    def key(self) -> str:
        return self.attrs["key"]

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def k(self) -> int:
        return int(self.attrs["top_k"])

    @property
    def n_units(self) -> int:
        return int(self.attrs["n_units"])

    @property
    def chunk_tokens(self) -> int:
        return int(self.attrs["chunk_tokens"])

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def unit_range(self, unit: int) -> tuple[int, int]:
        start = unit * self.chunk_tokens
        return start, min(start + self.chunk_tokens, int(self.attrs["counts"]["tokens"]))

    # -- progress ---------------------------------------------------------
    def done_units(self) -> set[int]:
        folder = self.path / "progress"
        if not folder.is_dir():
            return set()
        return {int(p.name[5:13]) for p in folder.glob("unit-*.json")}

    def is_done(self, unit: int) -> bool:
        return (self.path / unit_marker(unit)).exists()

    def read_marker(self, unit: int) -> dict[str, Any]:
        return json.loads((self.path / unit_marker(unit)).read_text())

    def claim(self, unit: int) -> bool:
        """Take unit ``unit`` for this process, unless a live writer on this host
        holds it. A claim left by a dead process (a killed writer) is taken over."""
        path = self.path / "progress" / f"unit-{unit:08d}.claim"
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    host, pid = path.read_text().split()
                except (OSError, ValueError):
                    return False  # being written by its owner right now
                if host != socket.gethostname() or _alive(int(pid)):
                    return False
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return True
        return False

    def release(self, unit: int) -> None:
        (self.path / "progress" / f"unit-{unit:08d}.claim").unlink(missing_ok=True)

    def write_unit(self, unit: int, arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> None:
        """Write one unit's teacher arrays, make them durable, then mark it done."""
        start, end = self.unit_range(unit)
        for name, values in arrays.items():
            self.group[name][start:end] = values
        for name in arrays:
            chunk = self.path / name / "c" / str(unit)
            if self.group[name].ndim == 2:
                chunk = chunk / "0"
            _fsync(chunk)
        _write_atomic(self.path / unit_marker(unit), json.dumps(stats).encode())

    def finish_if_done(self) -> bool:
        """Mark the cache complete when every unit is done. Idempotent: any writer
        that finishes last does it, and all of them would write the same thing."""
        if self.complete:
            return True
        done = self.done_units()
        if len(done) < self.n_units:
            return False
        markers = [self.read_marker(u) for u in range(self.n_units)]
        distortion_sum = sum(m["distortion_sum"] for m in markers)
        topk_rows = sum(m["topk_rows"] for m in markers)
        attrs = dict(self.attrs)
        attrs["complete"] = True
        attrs["quality"] = {
            "mean_abs_kl_distortion": distortion_sum / max(topk_rows, 1),
            "max_abs_kl_distortion": max((m["distortion_max"] for m in markers), default=0.0),
            "mean_weighted_abs_logprob_error": sum(m["weighted_abs_error_sum"] for m in markers) / max(topk_rows, 1),
            "topk_rows": topk_rows,
        }
        attrs["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.group.attrs[ATTR] = attrs
        self.attrs = attrs
        return True

    # -- sizes --------------------------------------------------------------
    def bytes_on_disk(self, names: Iterable[str] | None = None) -> dict[str, int]:
        names = list(names) if names is not None else [p.name for p in self.path.iterdir() if (p / "zarr.json").exists()]
        sizes = {}
        for name in names:
            sizes[name] = sum(f.stat().st_size for f in (self.path / name).rglob("*") if f.is_file())
        return sizes


def create_cache(path: Path, plan: Plan, attrs: dict[str, Any], vocab_size: int) -> CacheStore:
    """Create a cache whose static arrays (tokens, offsets, mask, ids) are in place.

    The group is built under a temporary name and renamed into place, so a
    concurrent writer either sees no cache or a whole one; when two race, the
    loser discards its copy and joins the winner's.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        group = zarr.open_group(str(tmp), mode="w")
        n, s, k, c = plan.n_tokens, len(plan.example_ids), attrs["top_k"], plan.chunk_tokens

        def make(name: str, shape: tuple, chunks: tuple, dtype: Any) -> zarr.Array:
            return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, **codec.zarr_codecs(name))

        make("tokens", (n,), (c,), np.int32)[:] = plan.tokens
        make("loss_mask", (n,), (c,), bool)[:] = plan.loss_mask
        make("offsets", (s + 1,), (SEQUENCE_CHUNK,), np.int64)[:] = plan.offsets
        make("example_id", (s,), (SEQUENCE_CHUNK,), np.uint64)[:] = plan.example_ids
        make("label_logprob", (n,), (c,), np.float16)
        make("topk_head", (n,), (c,), np.float16)
        make("topk_ids", (n, k), (c, k), codec.ids_dtype(vocab_size))
        make("topk_logprobs", (n, k), (c, k), np.uint8)
        group.attrs[ATTR] = attrs
        (tmp / "progress").mkdir()
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "zarr.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return CacheStore(path)


def is_cache(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return ATTR in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # an all-zero chunk that zarr chose not to write
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
