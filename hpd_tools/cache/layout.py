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
    sample_counts  [N, k]  uint8    sampled caches (format 4) only: the count of each
                                    drawn id among the N = k draws (0: padding)

A sampled cache (attributes ``signal: "sampled"``, ``samples: N``, ``seed``, top_k
= N, format 4) holds in topk_ids / topk_logprobs each position's distinct drawn ids
ordered by teacher log-prob (so the rank code applies unchanged), then padding (id 0,
code 0, count 0), which is not stored on disk (codec.RaggedCodec). Readers mask
padding by ``sample_counts == 0``.

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
(``progress/unit-XXXXXXXX.claim``); a second command on the same cache and
shard skips units another writer holds, then waits for their markers, and
computes any whose claim goes stale, so two identical commands started at
once share the work. Claims only avoid waste: a unit's content is
deterministic and written whole before its marker, so a unit computed twice
is written twice with the same bytes.

A cache is a local folder or an fsspec URL such as ``s3://bucket/prefix``
(storage.py; the endpoint and credentials come from fsspec's and the cloud
SDK's usual configuration: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, an AWS profile, FSSPEC_S3_* variables). The two need
different protocols for the same guarantees:

- local folder: the group is built under a temporary name and renamed into
  place; chunks and markers are fsync-ed, markers renamed into place; claims
  are created exclusively (O_EXCL) and name the writer's host and pid, and a
  claim whose process is gone (same host) is taken over at once.
- object store, which has no rename and no exclusive create, but where each
  put is atomic and a read after a finished put sees it: the group is built
  in a local temporary folder and uploaded with the group's ``zarr.json``
  (which holds the ``hpd_cache`` attributes) last, so the cache exists for
  ``is_cache``, ``list`` and readers only once its static arrays are all
  there. What is uploaded before is a function of the cache key and
  --chunk-tokens, so two creators put the same bytes, and creation never
  deletes (``verify`` checks each array's chunking against the attributes,
  which catches two creators that raced with different --chunk-tokens). A
  unit's chunks are put before its marker, and ``complete`` (one put of
  ``zarr.json``) only after every marker exists, so a reader that sees
  ``complete`` sees every unit. A claim is a lease: its holder re-puts it
  every lease/4 seconds, and a claim not put for a lease
  (``HPD_CLAIM_LEASE_SECONDS``, default 60) is stale and may be taken over.
  Ages are read on the store's clock (the time stamps of the objects it
  keeps), never by comparing hosts' clocks or looking at pids. Without
  exclusive create, two writers can both take a unit in a narrow race (a
  claimant re-reads its claim after a short pause and yields to a later one);
  that only duplicates work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from ..errors import CacheCorruptError, CacheError
from . import codec, integrity
from .integrity import FILL, STATIC_ARRAYS, STATIC_FILE, UNITS_FILE, UNKNOWN, ChecksummedStore
from .storage import Location, as_location, fsync_dir, os_problem
from .storage import _write_atomic as write_atomic

log = logging.getLogger(__name__)

# 2: every chunk's CRC-32C recorded and checked on read (integrity.py). Format 1
# caches (no checksums) are still read, with the checks verify makes on values.
# 3: topk_ids and topk_logprobs in hpd-tools' Zstd-based codecs instead of LZMA
# (codec.py: 2% fewer bytes, ~40x faster to decode); checksums as in format 2.
FORMAT_VERSION = 3
# 4: sampled caches (attribute signal "sampled"): the top-k arrays hold each position's
# distinct drawn ids, plus sample_counts; the rows are stored ragged (codec.RaggedCodec).
# Top-k caches stay format 3, so their keys and bytes do not change.
SAMPLED_FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
ATTR = "hpd_cache"
ARRAYS = ("tokens", "offsets", "loss_mask", "example_id", "label_logprob", "topk_head", "topk_ids", "topk_logprobs")
TEACHER_ARRAYS = ("label_logprob", "topk_ids", "topk_logprobs", "topk_head")
SAMPLE_COUNTS = "sample_counts"  # [N, k] uint8, sampled caches only: each drawn id's count (0: padding)
ALL_ARRAYS = (*ARRAYS, SAMPLE_COUNTS)
_MARKER_FIELDS = ("distortion_sum", "distortion_max", "weighted_abs_error_sum", "topk_rows")
SEQUENCE_CHUNK = 1 << 16
# Pause between putting a claim and reading it back (object stores): a rival
# put that lands within it wins, so both claimants agree on one owner.
CLAIM_SETTLE = 0.05


def claim_lease() -> float:
    """Seconds after its last heartbeat that an object-store claim goes stale."""
    return float(os.environ.get("HPD_CLAIM_LEASE_SECONDS") or 60)


def cache_root() -> Path:
    """The local hpd-tools folder: $HPD_CACHE_HOME when it is a folder, else the
    user cache dir. Files that must be local (imported teachers) live here."""
    env = os.environ.get("HPD_CACHE_HOME")
    if env and ("://" not in env or env.startswith("file://")):
        return Path(env.removeprefix("file://")).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hpd-tools"


def cache_home() -> Location:
    """Where caches live without --out: $HPD_CACHE_HOME (a folder or a URL), else the user cache dir."""
    env = os.environ.get("HPD_CACHE_HOME")
    return Location(env) if env else Location(cache_root())


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


def unit_claim(unit: int) -> str:
    return f"progress/unit-{unit:08d}.claim"


def _read_attrs(location: Location) -> dict[str, Any] | None:
    """The hpd_cache attributes from the group's zarr.json; None when there is no
    group, {} for a Zarr group that is not a cache. A zarr.json that does not parse
    (a damaged cache) raises CacheCorruptError."""
    meta = location.read("zarr.json")
    if meta is None:
        return None
    try:
        group_attrs = json.loads(meta).get("attributes", {})
        if ATTR not in group_attrs:
            return {}
        attrs = group_attrs[ATTR]
    except (ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(f"{location}: zarr.json does not parse ({type(exc).__name__}); the cache is damaged: delete it and rerun `hpd-tools cache`") from None
    if not isinstance(attrs, dict) or not attrs:
        raise CacheCorruptError(f"{location}: the '{ATTR}' attributes in zarr.json are {'empty' if attrs == {} else 'not a mapping'}; the cache is damaged: delete it and rerun `hpd-tools cache`")
    return dict(attrs)


# Attributes every reader, writer, info and list depend on: (dotted key, types).
_REQUIRED_ATTRS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("key", (str,)),
    ("compat", (str,)),
    ("top_k", (int,)),
    ("max_length", (int,)),
    ("chunk_tokens", (int,)),
    ("n_units", (int,)),
    ("counts.sequences", (int,)),
    ("counts.tokens", (int,)),
    ("counts.response_tokens", (int,)),
    ("complete", (bool,)),
    ("tokenizer_hash", (str,)),
    ("teacher.name", (str,)),
    ("data.path", (str,)),
    ("codec", (str,)),
)


def check_attrs(where: Any, attrs: dict[str, Any]) -> None:
    """Every attribute the code depends on is present, typed and consistent; else a
    CacheCorruptError naming the first one that is not."""
    def fail(message: str) -> None:
        raise CacheCorruptError(f"{where}: {message}; the cache is damaged: delete it and rerun `hpd-tools cache`")

    for dotted, types in _REQUIRED_ATTRS:
        value: Any = attrs
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                fail(f"attribute '{dotted}' is missing")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            fail(f"attribute '{dotted}' is {value!r}, expected {' or '.join(t.__name__ for t in types)}")
    if attrs["top_k"] < 1 or attrs["chunk_tokens"] < 1 or attrs["max_length"] < 2:
        fail(f"attributes top_k {attrs['top_k']}, chunk_tokens {attrs['chunk_tokens']}, max_length {attrs['max_length']} are out of range")
    counts = attrs["counts"]
    if min(counts["sequences"], counts["tokens"], counts["response_tokens"]) < 0 or counts["response_tokens"] > counts["tokens"]:
        fail(f"attribute 'counts' {counts} is inconsistent")
    units = max(1, -(-counts["tokens"] // attrs["chunk_tokens"]))
    if attrs["n_units"] != units:
        fail(f"attribute 'n_units' is {attrs['n_units']}, but {counts['tokens']} tokens in units of {attrs['chunk_tokens']} make {units}")
    sampled = attrs.get("signal", "topk") == "sampled"
    if attrs.get("signal", "topk") not in ("topk", "sampled"):
        fail(f"attribute 'signal' is {attrs.get('signal')!r}, expected 'topk' or 'sampled'")
    if sampled != (attrs.get("format_version") == SAMPLED_FORMAT_VERSION):
        fail(f"attribute 'signal' {attrs.get('signal', 'topk')!r} does not go with format {attrs.get('format_version')} (sampled caches are format {SAMPLED_FORMAT_VERSION})")
    if sampled:
        samples = attrs.get("samples")
        if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= 255 or samples != attrs["top_k"]:
            fail(f"attribute 'samples' is {samples!r}, expected an integer in 1..255 equal to top_k ({attrs['top_k']})")
        if not isinstance(attrs.get("seed"), int) or isinstance(attrs.get("seed"), bool):
            fail(f"attribute 'seed' is {attrs.get('seed')!r}, expected the draws' integer seed")
    if attrs["codec"] not in codec.KNOWN_CODECS:
        fail(f"codec '{attrs['codec']}' is not one this version reads ({', '.join(codec.KNOWN_CODECS)})")
    if attrs.get("format_version", 0) >= 2:
        sums = attrs.get("checksums")
        if not isinstance(sums, dict) or sums.get("algorithm") != integrity.ALGORITHM or not isinstance(sums.get("static"), str):
            fail("attribute 'checksums' is missing or malformed")
        if attrs["complete"] and not isinstance(sums.get("units"), str):
            fail("marked complete but attribute 'checksums.units' is missing")


class CacheStore:
    """A cache, on local disk or object storage: its group, attributes, arrays and unit markers."""

    def __init__(self, path: str | os.PathLike | Location):
        self.location = as_location(path)
        # For messages and callers that print it: the folder, or the URL.
        self.path: Path | str = self.location.local if self.location.local is not None else self.location.url
        attrs = _read_attrs(self.location)
        if attrs is None:
            raise CacheError(f"{self.path}: not an hpd-tools cache (no Zarr group there); give the folder or URL that `hpd-tools cache` printed or that `hpd-tools list` shows")
        if not attrs:
            raise CacheError(f"{self.path}: a Zarr group but not an hpd-tools cache (no '{ATTR}' attributes)")
        if attrs.get("format_version") not in READABLE_VERSIONS:
            raise CacheError(f"{self.path}: cache format {attrs.get('format_version')} is not supported by this version (reads {', '.join(map(str, READABLE_VERSIONS))})")
        check_attrs(self.path, attrs)
        self.attrs: dict[str, Any] = attrs
        self.checked = int(attrs["format_version"]) >= 2  # chunks carry checksums (integrity.py)
        self._tables: dict[str, np.ndarray] = {}  # array -> CRC-32C per chunk
        self._sizes: dict[str, np.ndarray] = {}  # array -> bytes per chunk
        self._unit_sums: dict[int, dict[str, int]] = {}
        if self.checked:
            self._load_table(STATIC_FILE, attrs["checksums"]["static"])
            if self.complete:
                self._load_table(UNITS_FILE, attrs["checksums"]["units"])
        self.zstore: ChecksummedStore | None = None
        try:
            self.group = self.location.open_group("r+", wrap=self._wrap)
        except CacheError:
            raise
        except Exception:
            raise CacheError(f"{self.path}: not an hpd-tools cache (no Zarr group there); give the folder or URL that `hpd-tools cache` printed or that `hpd-tools list` shows") from None
        self._arrays: dict[str, zarr.Array] = {}
        self.owner = uuid.uuid4().hex  # names this writer's claims on object storage
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._clock: tuple[float, float] | None = None

    # -- checksums (integrity.py) -------------------------------------------
    def _wrap(self, store: Any) -> ChecksummedStore:
        self.zstore = ChecksummedStore(store, self._expected, self._describe, str(self.path))
        return self.zstore

    def _load_table(self, rel: str, sha: str) -> None:
        raw = self.location.read(rel)
        if raw is None:
            raise CacheCorruptError(f"{self.path}: {rel} is missing; the cache is damaged: delete it and rerun `hpd-tools cache`")
        if integrity.digest(raw) != sha:
            raise CacheCorruptError(f"{self.path}: {rel} does not match its SHA-256 in the attributes; the cache is damaged: delete it and rerun `hpd-tools cache`")
        sums, sizes = integrity.decode_table(raw, f"{self.path}: {rel}")
        self._tables.update(sums)
        self._sizes.update(sizes)

    def check_chunk_files(self) -> None:
        """Every chunk the checksum tables record is there with its recorded size, and
        no other: a listing, no data read (one listing per array; on object storage a
        paginated list). Finds deleted, truncated, resized or extra chunk files before
        training starts; changed bytes are found when each chunk is read. Format 2,
        complete caches; a no-op otherwise."""
        if not (self.checked and self.complete):
            return
        for name, sizes in sorted(self._sizes.items()):
            found = self.location.chunk_sizes(name)
            for chunk in np.flatnonzero(sizes != FILL).tolist():
                got = found.get(chunk)
                if got is None:
                    raise CacheCorruptError(f"{self.path}: array '{name}' {self._describe(name, chunk)}: the chunk file is missing; the cache is damaged: delete it and rerun `hpd-tools cache`")
                if got != sizes[chunk]:
                    raise CacheCorruptError(f"{self.path}: array '{name}' {self._describe(name, chunk)}: the chunk file has {got} bytes, {int(sizes[chunk])} were written; the cache is damaged: delete it and rerun `hpd-tools cache`")
            extra = sorted(c for c in found if c >= len(sizes) or sizes[c] == FILL)
            if extra:
                raise CacheCorruptError(f"{self.path}: array '{name}' has a chunk file where none was written ({self._describe(name, extra[0])}); the cache is damaged: delete it and rerun `hpd-tools cache`")

    def _expected(self, name: str, chunk: int) -> int:
        """The recorded checksum of a chunk, or UNKNOWN (format 1, a unit in progress)."""
        if not self.checked:
            return UNKNOWN
        table = self._tables.get(name)
        if table is not None:
            return int(table[chunk]) if 0 <= chunk < len(table) else UNKNOWN
        sums = self._unit_sums.get(chunk)
        return sums.get(name, UNKNOWN) if sums is not None else UNKNOWN

    def _describe(self, name: str, chunk: int) -> str:
        if name in ("offsets", "example_id"):
            return f"chunk {chunk} (sequences {chunk * SEQUENCE_CHUNK}-{(chunk + 1) * SEQUENCE_CHUNK})"
        start, end = chunk * self.chunk_tokens, (chunk + 1) * self.chunk_tokens
        return f"unit {chunk} (positions {start}-{end})"

    def load_unit_checksums(self, units: Iterable[int]) -> None:
        """Read the checksums of finished units from their markers, so reads of an
        incomplete cache (verify) are checked too."""
        if not self.checked or self.complete:
            return
        wanted = [u for u in units if u not in self._unit_sums]
        for unit, marker in zip(wanted, self.read_markers(wanted)):
            self._unit_sums[unit] = marker["checksums"]

    # -- identity ---------------------------------------------------------
    @property
    def key(self) -> str:
        return self.attrs["key"]

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def k(self) -> int:
        """Entries per row: the top-k, or a sampled cache's draws (its rows' width)."""
        return int(self.attrs["top_k"])

    @property
    def signal(self) -> str:
        return str(self.attrs.get("signal") or "topk")

    @property
    def teacher_arrays(self) -> tuple[str, ...]:
        """The arrays each unit writes (and its marker vouches for)."""
        return (*TEACHER_ARRAYS, SAMPLE_COUNTS) if self.signal == "sampled" else TEACHER_ARRAYS

    @property
    def n_units(self) -> int:
        return int(self.attrs["n_units"])

    @property
    def chunk_tokens(self) -> int:
        return int(self.attrs["chunk_tokens"])

    def array(self, name: str) -> zarr.Array:
        # Kept open: on object storage each open is a round trip for its metadata.
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def unit_range(self, unit: int) -> tuple[int, int]:
        start = unit * self.chunk_tokens
        return start, min(start + self.chunk_tokens, int(self.attrs["counts"]["tokens"]))

    # -- progress ---------------------------------------------------------
    def done_units(self) -> set[int]:
        return {int(name[5:13]) for name in self.location.listdir("progress") if name.startswith("unit-") and name.endswith(".json")}

    def claimed_units(self) -> set[int]:
        """Units with a claim (being written, or left by a writer that stopped)."""
        return {int(name[5:13]) for name in self.location.listdir("progress") if name.startswith("unit-") and name.endswith(".claim")}

    def is_done(self, unit: int) -> bool:
        return self.location.read(unit_marker(unit)) is not None

    def read_marker(self, unit: int) -> dict[str, Any]:
        return self.read_markers([unit])[0]

    def read_markers(self, units: list[int]) -> list[dict[str, Any]]:
        """The markers of finished units, parsed and checked; a damaged one is a
        CacheCorruptError that says how to recompute its unit."""
        out = []
        for unit, raw in zip(units, self.location.read_many([unit_marker(u) for u in units])):
            rel = unit_marker(unit)
            fix = f"delete {rel} and rerun the `hpd-tools cache` command to recompute the unit"
            try:
                marker = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise CacheCorruptError(f"{self.path}: the marker {rel} does not parse; {fix}") from None
            if not isinstance(marker, dict) or marker.get("unit") != unit:
                raise CacheCorruptError(f"{self.path}: the marker {rel} is not unit {unit}'s; {fix}")
            for name in _MARKER_FIELDS:
                if not isinstance(marker.get(name), (int, float)) or isinstance(marker.get(name), bool):
                    raise CacheCorruptError(f"{self.path}: the marker {rel} lacks '{name}'; {fix}")
            if self.checked:
                for field in ("checksums", "sizes"):
                    sums = marker.get(field)
                    if not isinstance(sums, dict) or any(not isinstance(sums.get(name), int) or isinstance(sums.get(name), bool) for name in self.teacher_arrays):
                        raise CacheCorruptError(f"{self.path}: the marker {rel} lacks the {field} of its chunks; {fix}")
            out.append(marker)
        return out

    def claim(self, unit: int) -> bool:
        """Take unit ``unit`` for this process unless another writer holds it.

        Local: an exclusive file naming host and pid; one left by a dead
        process (a killed writer) is taken over. Object store: a lease kept
        alive by a heartbeat and taken over once stale (module docstring).
        """
        if self.location.local is None:
            return self._claim_lease(unit)
        path = self.location.local / unit_claim(unit)
        # The claim appears whole or not at all: written under a private name, then
        # hard-linked into place (link fails if the claim exists), so a writer
        # killed at any point never leaves an empty claim behind.
        mine = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        mine.write_text(f"{socket.gethostname()} {os.getpid()}")
        try:
            for _ in range(2):
                try:
                    os.link(mine, path)
                    self._hold(unit)
                    return True
                except FileExistsError:
                    if not self._stale_local_claim(path):
                        return False
                    path.unlink(missing_ok=True)
            return False
        finally:
            mine.unlink(missing_ok=True)

    def _stale_local_claim(self, path: Path) -> bool:
        """A claim whose process on this host is gone; one from another host (a node
        of a shared NFS/Lustre folder) not renewed for a lease, on the filesystem's
        clock; or one that does not parse (left by an older version killed while
        writing it) and is over 10 s old."""
        try:
            host, pid = path.read_text().split()
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            try:
                return time.time() - path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        if host == socket.gethostname():
            return not _alive(int(pid)) if pid.isdigit() else True
        stamp = self.location.modified(str(path.relative_to(self.location.local)))  # type: ignore[arg-type]
        return stamp is None or self._store_now() - stamp > claim_lease()

    def claim_holder(self, unit: int) -> str:
        """Who holds a unit's claim and how fresh it is, for a waiting writer's message."""
        rel = unit_claim(unit)
        body = (self.location.read(rel) or b"").decode(errors="replace").strip()
        if self.location.local is None:
            try:
                info = json.loads(body)
                body = f"{info.get('host')} {info.get('pid')}"
            except ValueError:
                pass
        stamp = self.location.modified(rel)
        age = f", renewed {self._store_now() - stamp:.0f} s ago" if stamp is not None else ""
        return f"{body or 'unknown'}{age}"

    def release(self, unit: int) -> None:
        with self._lock:
            self._held.discard(unit)
        self.location.delete(unit_claim(unit))

    def _claim_lease(self, unit: int) -> bool:
        rel = unit_claim(unit)
        stamp = self.location.modified(rel)
        if stamp is not None and self._store_now() - stamp < claim_lease():
            return self._owner(rel) == self.owner
        with self._lock:
            self.location.write(rel, self._claim_body())
        time.sleep(CLAIM_SETTLE)
        if self._owner(rel) != self.owner:
            return False  # a rival claimed it in the same moment, after this writer
        self._hold(unit)
        return True

    def _hold(self, unit: int) -> None:
        """Keep a claim alive while this process works on it (the heartbeat)."""
        with self._lock:
            self._held.add(unit)
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name="hpd-claim-heartbeat", daemon=True)
                self._heartbeat.start()

    def _claim_body(self) -> bytes:
        # Host and pid are for people reading the claim; only the owner id counts.
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid()}).encode()

    def _owner(self, rel: str) -> str | None:
        body = self.location.read(rel)
        try:
            return json.loads(body)["owner"] if body else None
        except (ValueError, KeyError, TypeError):
            return None

    def _store_now(self) -> float:
        """The store's clock now: the time stamp of an object this process puts,
        advanced by the local monotonic clock, re-read every lease."""
        lease = claim_lease()
        if self._clock is None or time.monotonic() - self._clock[1] > lease:
            rel = f"progress/clock-{self.owner}"
            sent = time.monotonic()
            self.location.write(rel, b"")
            stamp = self.location.modified(rel)
            self.location.delete(rel)
            self._clock = (stamp if stamp is not None else time.time(), sent)
        return self._clock[0] + (time.monotonic() - self._clock[1])

    def _beat(self) -> None:
        """Renew this process's claims every lease/4 seconds while it holds any: re-put
        them (object store) or touch them (local: the mtime is set by the filesystem)."""
        while True:
            time.sleep(claim_lease() / 4)
            with self._lock:
                if not self._held:
                    self._heartbeat = None
                    return
                for unit in sorted(self._held):
                    try:
                        if self.location.local is not None:
                            os.utime(self.location.local / unit_claim(unit))
                        else:
                            self.location.write(unit_claim(unit), self._claim_body())
                    except Exception as exc:  # a missed beat only risks a duplicated unit
                        log.debug("claim heartbeat for unit %d failed: %s", unit, exc)

    def write_unit(self, unit: int, arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> None:
        """Write one unit's teacher arrays, make them durable, then mark it done; the
        marker records each chunk's checksum as written."""
        start, end = self.unit_range(unit)
        assert self.zstore is not None
        for name in arrays:
            self.zstore.take_written(name, unit)  # forget an earlier, unfinished write of this unit
        try:
            with self.location.guard("writing unit chunks") if self.location.local is None else contextlib.nullcontext():
                for name, values in arrays.items():
                    self.array(name)[start:end] = values
            written = {name: self.zstore.take_written(name, unit) for name in arrays}
            if self.location.local is not None:
                for name in arrays:
                    chunk = self.location.local / name / "c" / str(unit)
                    if self.array(name).ndim == 2:
                        chunk = chunk / "0"
                    _fsync(chunk)
                    fsync_dir(chunk.parent)  # the chunk's name is durable before the marker vouches for it
        except OSError as exc:
            settle_zarr_writes()
            raise CacheError(f"{self.path}: writing unit {unit} failed ({os_problem(exc)}); fix that and rerun the same command: the units already written are kept") from None
        sums = {name: crc for name, (crc, _) in written.items()}
        sizes = {name: size for name, (_, size) in written.items()}
        marker = json.dumps({**stats, "checksums": sums, "sizes": sizes}).encode()
        if self.location.local is None:
            self.location.write(unit_marker(unit), marker)
            return
        try:  # one message for the unit whichever of its files fails: with write threads, others fill the disk between a unit's chunks and its marker
            write_atomic(self.location.local / unit_marker(unit), marker)
        except OSError as exc:
            raise CacheError(f"{self.path}: writing unit {unit} failed ({os_problem(exc)}); fix that and rerun the same command: the units already written are kept") from None

    def finish_if_done(self) -> bool:
        """Mark the cache complete when every unit is done. Idempotent: any writer
        that finishes last does it, and all of them would write the same thing."""
        if self.complete:
            return True
        done = self.done_units()
        if len(done) < self.n_units:
            return False
        markers = self.read_markers(list(range(self.n_units)))
        distortion_sum = sum(m["distortion_sum"] for m in markers)
        topk_rows = sum(m["topk_rows"] for m in markers)
        attrs = dict(self.attrs)
        if self.checked:
            # All units' checksums in one object, so a reader needs one read, not one per marker.
            table = {name: np.array([m["checksums"][name] for m in markers], dtype=np.int64) for name in self.teacher_arrays}
            sizes = {name: np.array([m["sizes"][name] for m in markers], dtype=np.int64) for name in self.teacher_arrays}
            raw = integrity.encode_table(table, sizes)
            self.location.write(UNITS_FILE, raw)
            attrs["checksums"] = {**attrs["checksums"], "units": integrity.digest(raw)}
            self._tables.update(table)
            self._sizes.update(sizes)
        attrs["complete"] = True
        attrs["quality"] = {
            "mean_abs_kl_distortion": distortion_sum / max(topk_rows, 1),
            "max_abs_kl_distortion": max((m["distortion_max"] for m in markers), default=0.0),
            "mean_weighted_abs_logprob_error": sum(m["weighted_abs_error_sum"] for m in markers) / max(topk_rows, 1),
            "topk_rows": topk_rows,
            "mean_topk_mass_past_tokenizer": sum(float(m.get("mass_past_tokenizer_sum") or 0.0) for m in markers) / max(topk_rows, 1),
        }
        if self.signal == "sampled":  # over every response position, rows reused from donors included
            rows = sum(int(m.get("sampled_rows") or 0) for m in markers)
            attrs["quality"]["mean_distinct_ids"] = sum(int(m.get("distinct_sum") or 0) for m in markers) / max(rows, 1)
        attrs["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self.location.guard("writing attributes"):
            self.group.attrs[ATTR] = attrs
        self.attrs = attrs
        return True

    # -- sizes --------------------------------------------------------------
    def bytes_on_disk(self, names: Iterable[str] | None = None) -> dict[str, int]:
        names = list(names) if names is not None else [n for n in self.location.listdir() if n in ALL_ARRAYS]
        return {name: self.location.size(name) for name in names}


def _build_group(path: Path, plan: Plan, attrs: dict[str, Any], vocab_size: int) -> None:
    """Write a new group with its static arrays (tokens, offsets, mask, ids) at
    ``path``, their chunks' checksums, then the attributes that vouch for them."""
    from zarr.storage import LocalStore

    store = ChecksummedStore(LocalStore(str(path)))
    group = zarr.open_group(store, mode="w")
    n, s, k, c = plan.n_tokens, len(plan.example_ids), attrs["top_k"], plan.chunk_tokens

    def make(name: str, shape: tuple, chunks: tuple, dtype: Any) -> zarr.Array:
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, **codec.zarr_codecs(name, attrs.get("format_version", FORMAT_VERSION)))

    make("tokens", (n,), (c,), np.int32)[:] = plan.tokens
    make("loss_mask", (n,), (c,), bool)[:] = plan.loss_mask
    make("offsets", (s + 1,), (SEQUENCE_CHUNK,), np.int64)[:] = plan.offsets
    make("example_id", (s,), (SEQUENCE_CHUNK,), np.uint64)[:] = plan.example_ids
    make("label_logprob", (n,), (c,), np.float16)
    make("topk_head", (n,), (c,), np.float16)
    make("topk_ids", (n, k), (c, k), codec.ids_dtype(vocab_size))
    make("topk_logprobs", (n, k), (c, k), np.uint8)
    if attrs.get("signal") == "sampled":
        make(SAMPLE_COUNTS, (n, k), (c, k), np.uint8)
    chunks = {"tokens": c, "loss_mask": c, "offsets": SEQUENCE_CHUNK, "example_id": SEQUENCE_CHUNK}
    lengths = {"tokens": n, "loss_mask": n, "offsets": s + 1, "example_id": s}
    entries = {name: [store.written.get((name, i), (FILL, FILL)) for i in range(max(1, -(-lengths[name] // chunks[name])))] for name in STATIC_ARRAYS}
    table = {name: np.array([e[0] for e in rows], dtype=np.int64) for name, rows in entries.items()}
    sizes = {name: np.array([e[1] for e in rows], dtype=np.int64) for name, rows in entries.items()}
    raw = integrity.encode_table(table, sizes)
    (path / "checksums").mkdir(exist_ok=True)
    (path / STATIC_FILE).write_bytes(raw)
    attrs["checksums"] = {"algorithm": integrity.ALGORITHM, "static": integrity.digest(raw)}
    group.attrs[ATTR] = attrs


def create_cache(path: str | os.PathLike | Location, plan: Plan, attrs: dict[str, Any], vocab_size: int) -> CacheStore:
    """Create a cache whose static arrays (tokens, offsets, mask, ids) are in place.

    A concurrent writer either sees no cache or a whole one. Local: the group
    is built under a temporary name and renamed into place; when two race,
    the loser discards its copy and joins the winner's. Object store: the
    group is built locally and uploaded, its zarr.json last; when two race,
    both upload the same objects and the second keeps the first's zarr.json.
    """
    location = as_location(path)
    if location.local is None:
        with tempfile.TemporaryDirectory(prefix="hpd-cache-") as tmp:
            staged = Path(tmp) / "cache"
            _build_group(staged, plan, attrs, vocab_size)
            location.upload(staged, skip=("zarr.json",))
            if not is_cache(location):  # else another writer created it first: keep its attributes
                location.write("zarr.json", (staged / "zarr.json").read_bytes())
        return CacheStore(location)
    path = location.local
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _build_group(tmp, plan, attrs, vocab_size)
        (tmp / "progress").mkdir()
        _fsync_tree(tmp)  # every static chunk durable before the cache appears under its name
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "zarr.json").exists():
                raise
        fsync_dir(path.parent)
    except OSError as exc:
        settle_zarr_writes()
        raise CacheError(f"{path}: creating the cache failed ({os_problem(exc)}); nothing was left behind: fix that and rerun the same command") from None
    finally:
        _remove_tree(tmp)
    return CacheStore(location)


def settle_zarr_writes(timeout: float = 30.0) -> None:
    """Wait for Zarr writes still in flight. Zarr writes a region's chunks
    concurrently in its event loop; when one fails (a full disk) the others go on,
    and would recreate files after a cleanup, or warn at exit."""
    import asyncio

    from zarr.core.sync import sync

    async def drain() -> None:
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        if others:
            await asyncio.wait(others, timeout=timeout)

    try:
        sync(drain())
    except Exception as exc:  # only a cleanup aid; the original error is what the user sees
        log.debug("waiting for Zarr writes failed: %s", exc)


def _remove_tree(path: Path) -> None:
    for _ in range(40):
        if not path.exists():
            return
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            time.sleep(0.05)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        fsync_dir(Path(folder))


def is_cache(path: str | os.PathLike | Location) -> bool:
    """Whether ``path`` holds a cache, a damaged one included (its zarr.json does not parse)."""
    try:
        return bool(_read_attrs(as_location(path)))
    except CacheCorruptError:
        return True
    except OSError:
        return False


def caches_under(root: str | os.PathLike | Location) -> list[Location]:
    """The caches directly under a folder or URL, by name."""
    root = as_location(root)
    return [root / name for name in root.listdir() if is_cache(root / name)]


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
