"""How teacher log-probs are stored: the quantised top-k code and the Zarr codecs.

Top-k log-probs are sorted by rank, so each row is stored as its top-1
log-prob (``topk_head``, float16) plus one byte per entry that encodes the
distance below the top-1, ``delta >= 0`` nats, on a companded scale::

    code  = A * log1p(delta / B)                      (rounded, see below)
    delta = B * expm1(code / A),   A = 255 / log1p(MAX_DELTA / B)
    topk_logprobs[i, j] = topk_head[i] - delta(code[i, j])

With B = 0.5 and MAX_DELTA = 24 nats the steps are 0.008 nats next to the
top-1 and grow with the distance, where the probabilities and their weight in
any KL are small. Entries more than 24 nats below the top-1 saturate at code
255 (they decode as exactly 24 nats below it).

Rounding is mass-preserving: along each row, in rank order, each code is
rounded down or up, whichever keeps the running probability-weighted error
``sum_j p_j (log p_j - log p_hat_j)`` nearest zero. Every entry stays within
one step of the teacher's value, and a row's forward KL and top-k mass come
out right rather than drifting by the sum of independent roundings (on the
bundled data: mean |KL distortion| 5e-5 nats instead of 1.1e-3 with
round-to-nearest, for the same bytes; benchmarks/codec_choice.py).

How the arrays are compressed (cache format 3; benchmarks/codec_choice.py has
the measured trade-off, docs/performance.md the table). Ids are the entropy bottleneck.

- ``topk_ids``: :class:`TopkIdsCodec` (``hpd_tools.topk_ids``). Each chunk's ids
  are renumbered by how often they occur in that chunk (its ``HEAD`` most
  frequent ids become 0, 1, ...; every other id keeps its order after them),
  byte-shuffled and Zstd-compressed; the chunk carries its own renumbering.
  Renumbering puts the ids' skew into the high bytes, where Zstd's order-0
  coder can use it (the low bytes are near uniform either way): on real
  teacher output it brings Zstd from ~108 to ~101 B per response token at
  k=64, close to LZMA's 102 and to the ids' unigram entropy (11.8 bits per
  id), while decoding ~40x faster than LZMA (~1 GB/s). Rows of zeros (prompt
  positions) are not stored, only flagged. Rank order is kept as written.
- ``topk_logprobs``: :class:`RankDeltaCodec` (``hpd_tools.rank_delta``): the
  codes never decrease along a row, so each is stored as its step from the
  previous rank (small numbers), then Zstd; decoding is a prefix sum done
  eight ranks per 64-bit multiply. (Delta along the row: ~19% fewer bytes
  than Zstd on the codes themselves, and below LZMA's.)
- Format 1 and 2 caches used LZMA for both; zarr reads them from each
  array's metadata, so they read as before.

Both codecs are registered with zarr (``zarr.registry.register_codec`` on
import and the ``zarr.codecs`` entry points in pyproject.toml), so a format-3
cache opens with plain ``zarr.open_group`` wherever hpd-tools is installed.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numcodecs import Shuffle, Zstd
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.codecs.numcodecs import LZMA
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec

CODEC_VERSION = "compand8-ef-v1"
KNOWN_CODECS = (CODEC_VERSION,)  # codecs this version decodes
B = 0.5
MAX_DELTA = 24.0
MAX_CODE = 255
A = MAX_CODE / np.log1p(MAX_DELTA / B)

# numcodecs' LZMA is not in the Zarr v3 core spec; zarr-python (with numcodecs,
# a dependency) reads it, which is all a cache reader needs.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def _delta(codes: np.ndarray) -> np.ndarray:
    return B * np.expm1(codes.astype(np.float64) / A)


def encode_logprobs(topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, k] rank-sorted log-probs -> (head float16 [n], codes uint8 [n, k])."""
    lp = topk_logprobs.astype(np.float64)
    head = np.minimum(topk_logprobs[:, 0], 0).astype(np.float16)
    h = head.astype(np.float64)
    x = A * np.log1p(np.maximum(h[:, None] - lp, 0) / B)
    p = np.exp(lp)
    n, k = lp.shape
    codes = np.empty((n, k), dtype=np.uint8)
    error = np.zeros(n)
    prev = np.zeros(n, dtype=np.int64)
    for j in range(k):
        # Ranks are sorted, so codes never decrease along a row.
        lo = np.minimum(np.maximum(np.floor(x[:, j]).astype(np.int64), prev), MAX_CODE)
        hi = np.minimum(np.maximum(np.ceil(x[:, j]).astype(np.int64), prev), MAX_CODE)
        err_lo = error + p[:, j] * (lp[:, j] - (h - _delta(lo)))
        err_hi = error + p[:, j] * (lp[:, j] - (h - _delta(hi)))
        take_lo = np.abs(err_lo) <= np.abs(err_hi)
        prev = np.where(take_lo, lo, hi)
        error = np.where(take_lo, err_lo, err_hi)
        codes[:, j] = prev
    return head, codes


def decode_logprobs(head: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_logprobs`: float32 [n, k]."""
    return (head.astype(np.float64)[:, None] - _delta(codes)).astype(np.float32)


def error_bound(codes: np.ndarray) -> np.ndarray:
    """Largest |decoded - exact| an entry with this code can have (one step of the
    scale at that code, plus the float16 rounding of the top-1); inf where the
    code saturated (the exact value is then anywhere below the decoded one)."""
    c = codes.astype(np.float64)
    step = B * (np.expm1((c + 1) / A) - np.expm1(c / A))
    return np.where(codes >= MAX_CODE, np.inf, step + 1e-3)


def kl_distortion(exact: np.ndarray, decoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, float64 [n] each, over the top-k:

    - |sum_v p(v) (log p(v) - log p_hat(v))|: what forward KL computed from the
      stored log-probs gets wrong, in nats;
    - sum_v p(v) |log p(v) - log p_hat(v)|: the probability-weighted absolute
      error, which no cancellation between entries can hide.
    """
    exact = exact.astype(np.float64)
    weighted = np.exp(exact) * (exact - decoded.astype(np.float64))
    return np.abs(weighted.sum(axis=1)), np.abs(weighted).sum(axis=1)


IDS_CODEC = "hpd_tools.topk_ids"
DELTA_CODEC = "hpd_tools.rank_delta"
IDS_LEVEL = 3  # Zstd level of the ids (benchmarks/codec_choice.py: 9 and 19 gain < 1%, encode 2-25x slower)
CODES_LEVEL = 9  # Zstd level of the code steps (3: +6% bytes; 19: -12% bytes but encodes at ~2 MB/s)
HEAD = 4096  # ids renumbered by frequency per chunk; the rest keep their order
# An id joins the head only if it occurs this often in the chunk: listing it costs
# ~2 bytes, more than renumbering saves on fewer occurrences (small units).
HEAD_MIN_COUNT = 4
_MAGIC = b"HPI1"
_HEADER = struct.Struct("<4sBII")  # magic, id byte width, head length, table size


def _table(head: np.ndarray, size: int) -> np.ndarray:
    """stored value -> id: the head ids first, then every other id below ``size`` in order."""
    rest = np.ones(size, dtype=bool)
    rest[head] = False
    return np.concatenate([head, np.flatnonzero(rest).astype(head.dtype)])


def encode_ids(ids: np.ndarray, level: int = IDS_LEVEL, head: int = HEAD) -> bytes:
    """uint16 or int32 ids [..., k] -> one chunk's bytes (see :class:`TopkIdsCodec`)."""
    ids = np.ascontiguousarray(ids)
    dtype = ids.dtype
    if dtype not in (np.dtype(np.uint16), np.dtype(np.int32)):
        raise TypeError(f"{IDS_CODEC} stores uint16 or int32 ids, not {dtype}")
    rows = ids.reshape(-1, ids.shape[-1] if ids.ndim > 1 else 1)
    kept = rows.any(axis=1)  # all-zero rows (prompt positions) are not stored
    flat = rows[kept].reshape(-1)
    if flat.size and int(flat.min()) < 0:
        raise ValueError(f"{IDS_CODEC} stores ids >= 0, got {int(flat.min())}")
    size = int(flat.max()) + 1 if flat.size else 1
    counts = np.bincount(flat, minlength=size)
    top = np.argsort(-counts, kind="stable")[:head]
    top = top[counts[top] >= HEAD_MIN_COUNT].astype(dtype)
    table = _table(top, size)
    inverse = np.empty(size, dtype=dtype)
    inverse[table] = np.arange(size, dtype=dtype)
    body = Shuffle(elementsize=dtype.itemsize).encode(np.concatenate([top, inverse[flat]]))
    frame = np.concatenate([np.packbits(kept), np.frombuffer(body, dtype=np.uint8)])
    return _HEADER.pack(_MAGIC, dtype.itemsize, len(top), size) + bytes(Zstd(level=level).encode(frame))


def decode_ids(raw: bytes | memoryview | np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`encode_ids`: ids of ``dtype`` and ``shape``."""
    dtype = np.dtype(dtype)
    raw = memoryview(raw).cast("B")
    if len(raw) < _HEADER.size:
        raise ValueError(f"{IDS_CODEC}: chunk of {len(raw)} bytes is shorter than its header")
    magic, width, n_head, size = _HEADER.unpack_from(raw)
    if magic != _MAGIC or width != dtype.itemsize or n_head > size or size > np.iinfo(dtype).max + 1:
        raise ValueError(f"{IDS_CODEC}: chunk header is not one this version writes ({bytes(magic)!r}, width {width}, head {n_head}, table {size})")
    try:
        frame = np.frombuffer(Zstd().decode(raw[_HEADER.size:]), dtype=np.uint8)
    except RuntimeError as exc:  # numcodecs' Zstd reports bad input so
        raise ValueError(f"{IDS_CODEC}: chunk does not decompress ({exc})") from None
    k = shape[-1] if len(shape) > 1 else 1
    n = int(np.prod(shape)) // k if k else 0
    n_mask = -(-n // 8)
    kept = np.unpackbits(frame[:n_mask], count=n).view(bool) if len(frame) >= n_mask else None
    n_kept = int(kept.sum()) if kept is not None else -1
    planes = frame[n_mask:]
    if kept is None or len(planes) != (n_head + n_kept * k) * width:
        raise ValueError(f"{IDS_CODEC}: chunk of {len(frame)} bytes does not hold {n} rows of {k} ids")
    if width == 2:
        # Un-shuffling two planes by shift-or is faster here than numcodecs' Shuffle.
        lo, hi = planes.reshape(2, -1)
        body = hi.astype(np.uint16)
        body <<= 8
        body |= lo
    else:
        body = np.frombuffer(Shuffle(elementsize=width).decode(planes), dtype=dtype)
    head = body[:n_head]
    if n_head and int(head.max()) >= size:
        raise ValueError(f"{IDS_CODEC}: chunk renumbering names id {int(head.max())} beyond its table of {size}")
    values = body[n_head:]
    if width == 2:
        # Over the whole uint16 range the renumbering is a permutation: every value decodes.
        table = _table(head, 1 << 16)
    else:
        if values.size and int(values.max()) >= size:
            raise ValueError(f"{IDS_CODEC}: chunk holds value {int(values.max())} beyond its table of {size}")
        table = _table(head, size)
    if n_kept == n:
        return np.take(table, values, mode="wrap").reshape(shape)
    out = np.zeros((n, k), dtype=dtype)
    out[kept] = np.take(table, values, mode="wrap").reshape(n_kept, k)
    return out.reshape(shape)


class _NumpyCodec(ArrayBytesCodec):
    """The zarr plumbing the codecs below share: each chunk goes to ``encode_array``
    as a little-endian numpy array and comes back from ``decode_array``; zarr's async
    entry points call the sync ones (the work is numpy and Zstd)."""

    def encode_array(self, values: np.ndarray) -> bytes | np.ndarray:
        raise NotImplementedError

    def decode_array(self, raw: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: "ArraySpec") -> NDBuffer:
        values = self.decode_array(chunk_bytes.as_numpy_array(), chunk_spec.dtype.to_native_dtype(), tuple(chunk_spec.shape))
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(values)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: "ArraySpec") -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: "ArraySpec") -> Buffer | None:
        values = np.asarray(chunk_array.as_numpy_array())
        if values.dtype.byteorder == ">":
            values = values.astype(values.dtype.newbyteorder("<"))
        out = self.encode_array(values)
        if isinstance(out, np.ndarray):
            return chunk_spec.prototype.buffer.from_array_like(out)
        return chunk_spec.prototype.buffer.from_bytes(out)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: "ArraySpec") -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: "ArraySpec") -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class TopkIdsCodec(_NumpyCodec):
    """Zarr v3 array -> bytes codec for top-k ids [..., k] (uint16 or int32):
    a 13-byte header (magic ``HPI1``, id width, head length h, table size T), then
    one Zstd frame: a bitmap of the rows stored (``numpy.packbits``; rows of zeros,
    the prompt positions, are not), then the byte-shuffled little-endian ids
    ``head[0:h] ++ stored rows``. A stored value v decodes to ``table[v]``, table
    = head followed by the ids 0..T-1 not in head, ascending (for uint16, by all
    of 0..65535); head is the chunk's most frequent ids (those seen at least
    HEAD_MIN_COUNT times, at most HEAD), most frequent first."""

    is_fixed_size = False
    level: int = IDS_LEVEL
    head: int = HEAD

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TopkIdsCodec":
        config = data.get("configuration") or {}
        return cls(level=int(config.get("level", IDS_LEVEL)), head=int(config.get("head", HEAD)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": IDS_CODEC, "configuration": {"level": self.level, "head": self.head}}

    def decode_array(self, raw: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return decode_ids(raw, dtype, shape)

    def encode_array(self, values: np.ndarray) -> bytes:
        return encode_ids(values, self.level, self.head)


_BYTE_PREFIX = np.uint64(0x0101010101010101)


def rank_steps(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [..., k], never decreasing along the last axis -> steps from the previous rank."""
    steps = codes.copy()
    steps[..., 1:] -= codes[..., :-1]
    return steps


def from_rank_steps(steps: np.ndarray, monotone: bool = True) -> np.ndarray:
    """Inverse of :func:`rank_steps`. Where the codes never decrease (``monotone``)
    every prefix sum is a code (<= 255), so eight steps sum without carries in one
    64-bit multiply by 0x0101...01; otherwise a plain cumulative sum modulo 256."""
    n, k = int(np.prod(steps.shape[:-1])), steps.shape[-1]
    if not monotone or k % 8:
        return np.cumsum(steps, axis=-1, dtype=np.uint8)
    words = np.ascontiguousarray(steps).reshape(n, k).view(np.uint64) * _BYTE_PREFIX
    totals = words >> np.uint64(56)  # each word's last byte: the sum of its eight steps
    words += (np.cumsum(totals, axis=1) - totals) * _BYTE_PREFIX
    return words.view(np.uint8).reshape(steps.shape)


@dataclass(frozen=True)
class RankDeltaCodec(_NumpyCodec):
    """Zarr v3 array -> bytes codec for uint8 codes [..., k] that never decrease along
    the last axis: one flag byte (1: every row is non-decreasing, 0: not), then
    code[..., j] - code[..., j-1] modulo 256 (code[..., 0] as is), row-major.
    Decoding takes the prefix sum (the fast one when the flag is 1). Any uint8
    array round-trips; a writer bug that unsorts a row is left to ``verify``."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RankDeltaCodec":
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": DELTA_CODEC}

    def decode_array(self, raw: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        raw = raw.view(np.uint8)
        count = int(np.prod(shape))
        if len(raw) != count + 1 or raw[0] > 1:
            raise ValueError(f"{DELTA_CODEC}: chunk of {len(raw)} bytes (flag {raw[0] if len(raw) else None}), expected {count + 1} with flag 0 or 1")
        return from_rank_steps(raw[1:].reshape(shape), monotone=bool(raw[0]))

    def encode_array(self, codes: np.ndarray) -> np.ndarray:
        if codes.dtype != np.uint8:
            raise TypeError(f"{DELTA_CODEC} stores uint8 codes, not {codes.dtype}")
        monotone = codes.shape[-1] < 2 or not (codes[..., 1:] < codes[..., :-1]).any()
        out = np.empty(codes.size + 1, dtype=np.uint8)
        out[0] = monotone
        out[1:] = rank_steps(codes).reshape(-1)
        return out

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: "ArraySpec") -> int:
        return input_byte_length + 1


RAGGED_CODEC = "hpd_tools.ragged"
RAGGED_KINDS = ("plain", "ids", "steps")
_RAGGED_MAGIC = b"HPR1"
_RAGGED_HEADER = struct.Struct("<4sBBBII")  # magic, kind, value width, monotone flag, head length, table size


def row_lengths(rows: np.ndarray, fill: int) -> np.ndarray:
    """int64 [n]: entries of each row of ``rows`` [n, k] up to its last one that is not ``fill``."""
    n, k = rows.shape
    other = rows != fill
    last = k - np.argmax(other[:, ::-1], axis=1)
    return np.where(other.any(axis=1), last, 0).astype(np.int64)


def encode_ragged(values: np.ndarray, kind: str, fill: int = 0, level: int = CODES_LEVEL, head: int = HEAD) -> bytes:
    """[..., k] values -> one chunk's bytes, each row stored up to its last entry that is
    not ``fill`` (see :class:`RaggedCodec`). Lossless: the trailing ``fill`` entries a row
    loses are what decoding puts back."""
    values = np.ascontiguousarray(values)
    dtype = values.dtype
    k = values.shape[-1] if values.ndim > 1 else 1
    rows = values.reshape(-1, k)
    lengths = row_lengths(rows, fill)
    keep = np.arange(k) < lengths[:, None]
    monotone, n_head, size = 1, 0, 0
    if kind == "steps":
        if dtype != np.uint8:
            raise TypeError(f"{RAGGED_CODEC} kind steps stores uint8 codes, not {dtype}")
        monotone = int(not ((rows[:, 1:] < rows[:, :-1]) & keep[:, 1:]).any())
        body = rank_steps(rows)[keep]
    elif kind == "ids":
        if dtype not in (np.dtype(np.uint16), np.dtype(np.int32)):
            raise TypeError(f"{RAGGED_CODEC} kind ids stores uint16 or int32 ids, not {dtype}")
        flat = rows[keep]
        if flat.size and int(flat.min()) < 0:
            raise ValueError(f"{RAGGED_CODEC} stores ids >= 0, got {int(flat.min())}")
        size = int(flat.max()) + 1 if flat.size else 1
        counts = np.bincount(flat, minlength=size)
        top = np.argsort(-counts, kind="stable")[:head]
        top = top[counts[top] >= HEAD_MIN_COUNT].astype(dtype)
        n_head = len(top)
        inverse = np.empty(size, dtype=dtype)
        inverse[_table(top, size)] = np.arange(size, dtype=dtype)
        body = np.frombuffer(Shuffle(elementsize=dtype.itemsize).encode(np.concatenate([top, inverse[flat]])), dtype=np.uint8)
    elif kind == "plain":
        body = rows[keep]
    else:
        raise ValueError(f"{RAGGED_CODEC}: kind {kind!r} is not one of {', '.join(RAGGED_KINDS)}")
    frame = np.concatenate([lengths.astype(np.uint8 if k <= 255 else np.uint16).view(np.uint8), np.ascontiguousarray(body).view(np.uint8).reshape(-1)])
    header = _RAGGED_HEADER.pack(_RAGGED_MAGIC, RAGGED_KINDS.index(kind), dtype.itemsize, monotone, n_head, size)
    return header + bytes(Zstd(level=level).encode(frame))


def decode_ragged(raw: bytes | memoryview | np.ndarray, dtype: np.dtype, shape: tuple[int, ...], kind: str, fill: int = 0) -> np.ndarray:
    """Inverse of :func:`encode_ragged`: values of ``dtype`` and ``shape``."""
    dtype = np.dtype(dtype)
    raw = memoryview(raw).cast("B")
    if len(raw) < _RAGGED_HEADER.size:
        raise ValueError(f"{RAGGED_CODEC}: chunk of {len(raw)} bytes is shorter than its header")
    magic, kind_i, width, monotone, n_head, size = _RAGGED_HEADER.unpack_from(raw)
    if magic != _RAGGED_MAGIC or kind_i >= len(RAGGED_KINDS) or RAGGED_KINDS[kind_i] != kind or width != dtype.itemsize or monotone > 1:
        raise ValueError(f"{RAGGED_CODEC}: chunk header is not one this version writes for {kind} {dtype} ({bytes(magic)!r}, kind {kind_i}, width {width})")
    try:
        frame = np.frombuffer(Zstd().decode(raw[_RAGGED_HEADER.size:]), dtype=np.uint8)
    except RuntimeError as exc:  # numcodecs' Zstd reports bad input so
        raise ValueError(f"{RAGGED_CODEC}: chunk does not decompress ({exc})") from None
    k = shape[-1] if len(shape) > 1 else 1
    n = int(np.prod(shape)) // k if k else 0
    length_dtype = np.dtype(np.uint8 if k <= 255 else np.uint16)
    n_len = n * length_dtype.itemsize
    lengths = frame[:n_len].view(length_dtype).astype(np.int64) if len(frame) >= n_len else None
    if lengths is None or (lengths > k).any():
        raise ValueError(f"{RAGGED_CODEC}: chunk of {len(frame)} bytes does not hold the lengths of {n} rows of {k}")
    n_kept = int(lengths.sum())
    body = frame[n_len:]
    expect = (n_head + n_kept) * width
    if len(body) != expect:
        raise ValueError(f"{RAGGED_CODEC}: chunk holds {len(body)} bytes of entries, its {n} row lengths need {expect}")
    keep = np.arange(k) < lengths[:, None]
    out = np.full((n, k), fill, dtype=dtype)
    if kind == "steps":
        steps = np.zeros((n, k), dtype=np.uint8)
        steps[keep] = body
        out = from_rank_steps(steps, monotone=bool(monotone))
        out[~keep] = fill
    elif kind == "ids":
        planes = np.frombuffer(Shuffle(elementsize=width).decode(body), dtype=dtype) if width > 1 else body.view(dtype)
        top, stored = planes[:n_head], planes[n_head:]
        if (n_head and int(top.max()) >= size) or (stored.size and int(stored.max()) >= max(size, 1)):
            raise ValueError(f"{RAGGED_CODEC}: chunk holds values beyond its table of {size}")
        out[keep] = np.take(_table(top, max(size, 1)), stored)
    else:
        out[keep] = body.view(dtype)
    return out.reshape(shape)


@dataclass(frozen=True)
class RaggedCodec(_NumpyCodec):
    """Zarr v3 array -> bytes codec for rows [..., k] of which only a prefix holds data
    (sampled caches: each position's distinct drawn ids, their codes and counts; the
    rest is padding). Each row is stored up to its last entry that is not ``fill``.

    Bytes: a 16-byte header (magic ``HPR1``, kind 0/1/2 = plain/ids/steps, value width,
    monotone flag, head length h, table size T), then one Zstd frame: the rows' lengths
    (uint8 when k <= 255, else uint16 little-endian), then the entries, row-major:
    ``plain`` as they are; ``ids`` renumbered by frequency and byte-shuffled as
    :class:`TopkIdsCodec` does (``head[0:h] ++ entries``); ``steps`` as each code's step
    from the one before it in its row (:func:`rank_steps`, modulo 256; the flag says
    whether every stored row is non-decreasing). Decoding puts ``fill`` in the rest."""

    is_fixed_size = False
    kind: str = "plain"
    fill: int = 0
    level: int = CODES_LEVEL

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RaggedCodec":
        config = data.get("configuration") or {}
        kind = str(config.get("kind", "plain"))
        if kind not in RAGGED_KINDS:
            raise ValueError(f"{RAGGED_CODEC}: kind {kind!r} is not one of {', '.join(RAGGED_KINDS)}")
        return cls(kind=kind, fill=int(config.get("fill", 0)), level=int(config.get("level", CODES_LEVEL)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": RAGGED_CODEC, "configuration": {"kind": self.kind, "fill": self.fill, "level": self.level}}

    def decode_array(self, raw: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return decode_ragged(raw, dtype, shape, self.kind, self.fill)

    def encode_array(self, values: np.ndarray) -> bytes:
        return encode_ragged(values, self.kind, self.fill, self.level)


register_codec(IDS_CODEC, TopkIdsCodec)
register_codec(DELTA_CODEC, RankDeltaCodec)
register_codec(RAGGED_CODEC, RaggedCodec)


# Sampled caches' row arrays: (RaggedCodec kind, Zstd level).
SAMPLED_RAGGED = {"topk_ids": ("ids", IDS_LEVEL), "topk_logprobs": ("steps", CODES_LEVEL), "sample_counts": ("plain", CODES_LEVEL)}


def zarr_codecs(name: str, format_version: int = 3) -> dict[str, Any]:
    """serializer/filters/compressors for each cache array, chosen for its data.
    ``format_version`` 2 gives what format 2 wrote (LZMA), for fixtures and tests;
    4 (sampled caches) stores the rows of drawn entries ragged (:class:`RaggedCodec`:
    padding is not stored; padding codes are 0, like the rows of prompt positions)."""
    if format_version >= 4 and name in SAMPLED_RAGGED:
        kind, level = SAMPLED_RAGGED[name]
        return {"serializer": RaggedCodec(kind=kind, fill=0, level=level), "compressors": None}
    if name == "topk_ids":
        return {"serializer": TopkIdsCodec(), "compressors": None} if format_version >= 3 else {"compressors": [LZMA(preset=6)]}
    if name == "topk_logprobs":
        return {"serializer": RankDeltaCodec(), "compressors": [ZstdCodec(level=CODES_LEVEL)]} if format_version >= 3 else {"compressors": [LZMA(preset=6)]}
    if name in ("label_logprob", "topk_head"):
        return {"compressors": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=2)]}
    return {"compressors": [ZstdCodec(level=5)]}


def describe() -> dict[str, Any]:
    """The codec as recorded in a cache's attributes: enough to decode without hpd-tools."""
    return {
        "version": CODEC_VERSION,
        "topk_logprobs": "uint8 code c: topk_head - B * expm1(c / A), A = 255 / log1p(MAX_DELTA / B)",
        "B": B,
        "MAX_DELTA": MAX_DELTA,
        "rounding": "mass-preserving (error feedback along each row)",
        "topk_ids": f"{IDS_CODEC}: per-chunk frequency renumbering, byte shuffle, Zstd-{IDS_LEVEL} (codec.py)",
        "topk_logprobs_compression": f"{DELTA_CODEC} (steps between ranks), Zstd-{CODES_LEVEL}",
        "label_logprob": "float16",
        "topk_head": "float16",
    }
