"""``verify``: read every chunk of a cache and check it against the cache contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheCorruptError
from ..progress import Progress
from . import codec
from .layout import SAMPLE_COUNTS, SAMPLED_FORMAT_VERSION, CacheStore, unit_marker
from .reader import read_rows

# Mass-preserving rounding keeps a row's decoded top-k mass within second-order
# terms of the exact one (measured max excess on real data: < 1e-3).
MASS_SLACK = 0.01
_ARRAYS = ("tokens", "loss_mask", "label_logprob", "topk_head", "topk_ids", "topk_logprobs")


@dataclass
class VerifyReport:
    location: str
    units_checked: int = 0
    units_total: int = 0
    positions: int = 0
    label_in_topk: int = 0
    max_label_gap: float = 0.0
    complete: bool = False
    units_claimed: int = 0  # units without a marker that a writer holds (or held, if it stopped)
    checksums: str = ""
    format_version: int = 0
    signal: str = "topk"
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _fail(path: str | Path, message: str) -> None:
    raise CacheCorruptError(f"{path}: {message}; rebuild the affected cache (delete it and rerun `hpd-tools cache`)")


_DTYPES = {
    "tokens": ("int32",), "offsets": ("int64",), "loss_mask": ("bool",), "example_id": ("uint64",),
    "label_logprob": ("float16", "float32"), "topk_head": ("float16", "float32"), "topk_ids": ("uint16", "int32"), "topk_logprobs": ("uint8",),
    SAMPLE_COUNTS: ("uint8",),
}


# Format 3 stores these arrays with hpd-tools' own codecs (codec.py); another
# serializer there means the cache was not written by a format-3 writer.
_FORMAT3_SERIALIZERS = {"topk_ids": codec.IDS_CODEC, "topk_logprobs": codec.DELTA_CODEC}
# Format 4 (sampled caches) stores the rows of drawn entries ragged.
_FORMAT4_SERIALIZERS = {name: codec.RAGGED_CODEC for name in codec.SAMPLED_RAGGED}


def verify_cache(path: str | Path) -> VerifyReport:
    """Check attributes, arrays, markers, checksums and every stored value; raise
    CacheCorruptError on the first violation.

    An incomplete cache is checked as far as it is written; ``complete`` in
    the report says whether it is finished. Every token-axis array must be
    chunked by the attributes' ``chunk_tokens`` (two writers that created one
    cache at once with different --chunk-tokens would break this). On formats 2
    and 3 every chunk read is checked against its recorded CRC-32C (integrity.py);
    on format 3 the ids and codes must be in that format's codecs.

    Sampled caches (format 4): each response row's counts sum to N with padding
    (count 0) only at the row's end and holding id 0 and code 0; the drawn entries'
    ids are distinct and below the vocabulary, their log-probs sorted, finite and
    <= 0, their mass at most 1 (+ MASS_SLACK); where the data token was drawn, its
    entry agrees with label_logprob within the code's error bound.
    """
    store = CacheStore(path)  # attributes present, typed, consistent; checksum tables intact
    path = store.path
    attrs = store.attrs
    k, n_units = store.k, store.n_units
    n = int(attrs["counts"]["tokens"])
    s = int(attrs["counts"]["sequences"])
    vocab = int((attrs.get("teacher") or {}).get("vocab_size") or 0) or None

    expected = {
        "tokens": (n,), "loss_mask": (n,), "label_logprob": (n,), "topk_head": (n,),
        "topk_ids": (n, k), "topk_logprobs": (n, k), "offsets": (s + 1,), "example_id": (s,),
    }
    sampled = store.signal == "sampled"
    if sampled:
        expected[SAMPLE_COUNTS] = (n, k)
    serializers = _FORMAT4_SERIALIZERS if int(attrs["format_version"]) >= SAMPLED_FORMAT_VERSION else _FORMAT3_SERIALIZERS
    for name, shape in expected.items():
        try:
            array = store.array(name)
        except Exception:  # KeyError, or metadata that does not parse
            _fail(path, f"array '{name}' is missing or its metadata is damaged")
        if tuple(array.shape) != shape:
            _fail(path, f"array '{name}' has shape {tuple(array.shape)}, expected {shape}")
        if str(array.dtype) not in _DTYPES[name]:
            _fail(path, f"array '{name}' has dtype {array.dtype}, expected {' or '.join(_DTYPES[name])}")
        if int(attrs["format_version"]) >= 3 and name in serializers:
            names = [c.to_dict()["name"] for c in array.metadata.codecs]
            if serializers[name] not in names:
                _fail(path, f"array '{name}' is stored with codecs {names}, but format {attrs['format_version']} stores it with {serializers[name]}")
        chunk = array.chunks[0]
        if name not in ("offsets", "example_id") and chunk != store.chunk_tokens:
            _fail(path, f"array '{name}' is chunked by {chunk} positions, the attributes say {store.chunk_tokens}")
    offsets = read_rows(store, "offsets", slice(None), "the offsets")
    if offsets[0] != 0 or offsets[-1] != n:
        _fail(path, f"offsets run from {offsets[0]} to {offsets[-1]}, expected 0 to {n}")
    lengths = np.diff(offsets)
    if (lengths < 2).any():
        bad = int(np.flatnonzero(lengths < 2)[0])
        _fail(path, f"sequence {bad} has {lengths[bad]} tokens (offsets must increase by at least 2)")
    read_rows(store, "example_id", slice(None), "the example ids")  # every chunk present and, on format 2, intact
    last_positions = offsets[1:] - 1

    done = store.done_units()
    if any(u >= n_units for u in done):
        _fail(path, f"a marker names unit {max(done)}, but the cache has {n_units} units")
    if store.complete and len(done) < n_units:
        _fail(path, f"marked complete but only {len(done)}/{n_units} units have markers")
    markers = store.read_markers(sorted(done))  # each parses and names its unit (and its checksums, format 2)
    if store.checked and store.complete:
        for marker in markers:
            for name in store.teacher_arrays:
                if marker["checksums"][name] != store._expected(name, marker["unit"]):
                    _fail(path, f"the marker of unit {marker['unit']} and checksums/units.json disagree on array '{name}'")
    store.load_unit_checksums(sorted(done))
    store.check_chunk_files()
    report = VerifyReport(location=str(path), units_total=n_units, complete=store.complete, units_claimed=len(store.claimed_units() - done),
                          checksums="crc32c" if store.checked else "none (format 1: values checked only)", format_version=int(attrs["format_version"]), signal=store.signal)
    response_tokens = 0
    progress = Progress(total=n_units, unit="units", desc="verify")
    for unit in range(n_units):
        start, end = store.unit_range(unit)
        arrays = ((*_ARRAYS, SAMPLE_COUNTS) if sampled else _ARRAYS) if unit in done else ("tokens", "loss_mask")
        data = {name: read_rows(store, name, slice(start, end), f"unit {unit}, positions {start}-{end}") for name in arrays}
        response_tokens += int(data["loss_mask"].sum())
        if unit in done:
            _check_unit(path, unit, start, data, last_positions, k, vocab, report)
            report.units_checked += 1
            report.positions += end - start
        progress.update(1)
    progress.close()
    if response_tokens != int(attrs["counts"]["response_tokens"]):
        _fail(path, f"the loss mask holds {response_tokens} response tokens, the attributes say {attrs['counts']['response_tokens']}")
    return report


def _check_unit(path: str | Path, unit: int, start: int, d: dict[str, np.ndarray], last_positions: np.ndarray, k: int, vocab: int | None, report: VerifyReport) -> None:
    n = len(d["tokens"])
    where = lambda i: f"position {start + int(i)} (unit {unit})"  # noqa: E731
    is_last = np.zeros(n, dtype=bool)
    lp = last_positions[(last_positions >= start) & (last_positions < start + n)] - start
    is_last[lp] = True
    has_next = ~is_last

    tokens = d["tokens"]
    if vocab and ((tokens < 0) | (tokens >= vocab)).any():
        _fail(path, f"token id out of range at {where(np.flatnonzero((tokens < 0) | (tokens >= vocab))[0])}")
    mask = d["loss_mask"]
    if (mask & is_last).any():
        _fail(path, f"loss_mask is set on the last position of a sequence at {where(np.flatnonzero(mask & is_last)[0])}")

    label = d["label_logprob"].astype(np.float32)
    bad = has_next & (~np.isfinite(label) | (label > 1e-3))
    if bad.any():
        i = np.flatnonzero(bad)[0]
        _fail(path, f"label_logprob {label[i]} is not a finite value <= 0 at {where(i)}")

    head = d["topk_head"].astype(np.float32)
    codes = d["topk_logprobs"]
    ids = d["topk_ids"].astype(np.int64)
    counts = d.get(SAMPLE_COUNTS)
    off = ~mask
    if (head[off] != 0).any() or (codes[off] != 0).any() or (ids[off] != 0).any() or (counts is not None and (counts[off] != 0).any()):
        extra = (counts != 0).any(1) if counts is not None else False
        i = np.flatnonzero(off & ((head != 0) | (codes != 0).any(1) | (ids != 0).any(1) | extra))[0]
        _fail(path, f"top-k data at a position without a training signal, {where(i)}")
    rows = np.flatnonzero(mask)
    if not len(rows):
        return
    h, c, t = head[rows], codes[rows], ids[rows]
    drawn = np.ones(c.shape, dtype=bool)  # the entries that hold data (all of a top-k row)
    if counts is not None:
        n_rows = counts[rows].astype(np.int64)
        drawn = n_rows > 0
        total = n_rows.sum(1)
        if (total != k).any():
            j = np.flatnonzero(total != k)[0]
            _fail(path, f"sample counts sum to {total[j]}, not the cache's {k} draws, at {where(rows[j])}")
        late = drawn[:, 1:] & ~drawn[:, :-1]
        if late.any():
            j = np.flatnonzero(late.any(1))[0]
            _fail(path, f"a drawn entry follows padding (count 0) within the row at {where(rows[j])}")
        if ((~drawn) & ((t != 0) | (c != 0))).any():
            j = np.flatnonzero(((~drawn) & ((t != 0) | (c != 0))).any(1))[0]
            _fail(path, f"a padding entry (count 0) holds an id or code other than 0 at {where(rows[j])}")
    if (~np.isfinite(h) | (h > 0)).any():
        i = rows[np.flatnonzero(~np.isfinite(h) | (h > 0))[0]]
        _fail(path, f"top-1 log-prob {head[i]} is not a finite value <= 0 at {where(i)}")
    unsorted = (np.diff(c.astype(np.int16), axis=1) < 0) & drawn[:, 1:]
    if unsorted.any():
        i = rows[np.flatnonzero(unsorted.any(1))[0]]
        _fail(path, f"top-k log-probs are not sorted by rank at {where(i)}")
    if vocab and ((t < 0) | (t >= vocab)).any():
        i = rows[np.flatnonzero(((t < 0) | (t >= vocab)).any(1))[0]]
        _fail(path, f"top-k id out of range at {where(i)}")
    distinct_ids = np.where(drawn, t, -1 - np.arange(k))  # padding never counts as a repeat
    if k > 1 and (np.diff(np.sort(distinct_ids, axis=1), axis=1) == 0).any():
        i = rows[np.flatnonzero((np.diff(np.sort(distinct_ids, axis=1), axis=1) == 0).any(1))[0]]
        _fail(path, f"a top-k id repeats within one row at {where(i)}")
    decoded = codec.decode_logprobs(h, c)
    mass = np.where(drawn, np.exp(decoded.astype(np.float64)), 0).sum(1)
    if (mass > 1 + MASS_SLACK).any():
        i = np.flatnonzero(mass > 1 + MASS_SLACK)[0]
        _fail(path, f"top-k probability mass {mass[i]:.4f} exceeds 1 at {where(rows[i])}")
    # The label (token i+1) must agree with its own entry when it is in the top-k.
    next_tokens = np.append(tokens[1:], -1)[rows]
    hit = (t == next_tokens[:, None]) & drawn
    found = hit.any(1)
    if found.any():
        entry = decoded[found][hit[found]]
        bound = codec.error_bound(c[found][hit[found]])
        lab = label[rows][found]
        # A saturated entry only says the exact value is at or below it.
        gap = np.where(np.isinf(bound), np.maximum(lab - entry, 0), np.abs(entry - lab))
        tol = np.where(np.isinf(bound), 0, bound) + 2.0**-10 * (np.abs(lab) + np.abs(h[found])) + 1e-3
        if (gap > tol).any():
            j = np.flatnonzero(gap > tol)[0]
            _fail(path, f"label_logprob {lab[j]:.4f} disagrees with its top-k entry {entry[j]:.4f} at {where(rows[found][j])}")
        report.label_in_topk += int(found.sum())
        report.max_label_gap = max(report.max_label_gap, float(gap.max()))


__all__ = ["VerifyReport", "verify_cache", "unit_marker"]
