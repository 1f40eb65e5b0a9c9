"""Streaming a cache: sequence by sequence, chunk by chunk, shuffled and partitioned.

A sequence belongs to the unit (chunk) where it starts. Each epoch the units
are permuted with ``seed + epoch`` and dealt to ranks round-robin, so ranks
read disjoint data; within a rank a shuffle buffer of ``buffer_sequences``
mixes sequences across chunks. Only one unit's arrays (plus the buffer) are in
memory at a time. A cache with fewer units than ranks is shared by sequence
instead: every rank walks all units in the epoch's order and takes every
``world_size``-th sequence of the shuffled order (still disjoint, still from
the offsets alone).

Two ways to read a sequence: :class:`CachedSequence` (every row decoded into
int64 ids and float32 log-probs: inspection, evaluation, prompts), and
:class:`SequenceRows`, what training reads: the unit's arrays in their stored
dtypes (uint16 or int32 ids, uint8 codes, float16 head) and of the teacher
arrays only the rows that train (``loss_mask``). :func:`assemble` puts a
batch of them into one contiguous buffer (pinned on CUDA machines) that
``hpd_tools.stream.batch_targets`` ships to the device in one copy and
decodes there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import CacheCorruptError, CacheError
from . import codec
from .layout import CacheStore


@dataclass
class CachedSequence:
    """One cached sequence, decoded. Row i is about token i+1 (see layout.py)."""

    index: int
    example_id: int
    tokens: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # bool [L]
    label_logprob: np.ndarray  # float32 [L]
    topk_ids: np.ndarray  # int64 [L, k]
    topk_logprobs: np.ndarray  # float32 [L, k]; rows where loss_mask is False are 0; a sampled cache's padding (count 0) -inf
    sample_counts: np.ndarray | None = None  # uint8 [L, N] (a sampled cache: each drawn id's count, 0 = padding); None: top-k


class _Dense:
    """A dense teacher field of a :class:`Batch`. A batch from :func:`assemble`
    carries its trained rows only (``payload``); the dense array is built from
    them on first read (positions that do not train hold 0), so code that reads
    ``batch.topk_ids`` keeps working while training never pays for it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return None  # the dataclass default
        value = obj.__dict__.get(self.name)
        if value is None and obj.__dict__.get("payload") is not None:
            value = obj.__dict__[self.name] = obj.payload.dense(self.name, obj.loss_mask)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


@dataclass
class Batch:
    """Sequences right-padded to the longest (padded positions have loss_mask
    False), or packed (:func:`pack`): rows of sequences end to end, with
    ``position_ids`` restarting at 0 at each sequence.

    ``payload``, when set (:func:`assemble`), holds what training ships: the
    trained rows in their stored dtypes. A batch built with explicit dense
    teacher arrays (``dataclasses.replace(batch, topk_ids=...)``) drops it, so
    the arrays given are the ones that train."""

    indices: np.ndarray  # [B] sequence indices in the cache
    lengths: np.ndarray  # [B]
    input_ids: np.ndarray  # int64 [B, T]
    loss_mask: np.ndarray  # bool [B, T]
    label_logprob: np.ndarray = _Dense()  # type: ignore[assignment]  # float32 [B, T]
    topk_ids: np.ndarray = _Dense()  # type: ignore[assignment]  # int64 [B, T, k]
    topk_logprobs: np.ndarray = _Dense()  # type: ignore[assignment]  # float32 [B, T, k]
    position_ids: np.ndarray | None = None  # int64 [B, T] when packed
    payload: Payload | None = None
    sample_counts: np.ndarray | None = _Dense()  # type: ignore[assignment]  # uint8 [B, T, N]: a sampled cache's counts; None: top-k

    def __post_init__(self) -> None:
        if self.payload is not None and any(self.__dict__.get(n) is not None for n in ("label_logprob", "topk_ids", "topk_logprobs", "sample_counts")):
            self.payload = None

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


MAX_KEPT_TAILS = 64  # unit tails kept for a later read (hpd_tools.cache.reader.CacheReader.sequences)
_ALIGN = 16  # every segment of a payload starts on a 16-byte boundary, so the device can view it as any dtype


@dataclass
class Payload:
    """One batch's training data in one contiguous byte buffer, segments in
    their stored dtypes: ``input_ids`` int32 [B, T]; ``position_ids`` int32
    [B, T] (packed) or ``lengths`` int32 [B] (padded); and for the R trained
    positions in row-major order of ``loss_mask``: ``labels`` int32 [R],
    ``label_logprob`` [R] (float16 or float32, as stored), ``topk_head``
    float16 [R], ``topk_ids`` [R, k] (uint16 or int32), ``topk_codes`` uint8
    [R, k] (hpd_tools.cache.codec), and for a sampled cache ``sample_counts``
    uint8 [R, k] (0: padding, whose code decodes to no real entry).

    ``buffer`` is a numpy uint8 array, or a pinned torch tensor on CUDA machines
    (``host`` is then its numpy view)."""

    buffer: Any
    segments: dict[str, tuple[int, np.dtype, tuple[int, ...]]]  # name -> (byte offset, dtype, shape)
    shape: tuple[int, int]  # (B, T)
    n_rows: int  # R
    k: int

    @property
    def host(self) -> np.ndarray:
        return self.buffer if isinstance(self.buffer, np.ndarray) else self.buffer.numpy()

    def array(self, name: str) -> np.ndarray:
        at, dtype, shape = self.segments[name]
        n = int(np.prod(shape)) * dtype.itemsize
        return self.host[at : at + n].view(dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        return int(self.host.nbytes)

    def dense(self, name: str, loss_mask: np.ndarray) -> np.ndarray | None:
        """The dense [B, T(, k)] array of an old-style Batch field (None: sample_counts of a top-k batch)."""
        b, t = self.shape
        if name == "sample_counts":
            if name not in self.segments:
                return None
            out = np.zeros((b, t, self.k), dtype=np.uint8)
            out[loss_mask] = self.array("sample_counts")
        elif name == "label_logprob":
            out = np.zeros((b, t), dtype=np.float32)
            out[loss_mask] = self.array("label_logprob")
        elif name == "topk_ids":
            out = np.zeros((b, t, self.k), dtype=np.int64)
            out[loss_mask] = self.array("topk_ids")
        else:
            out = np.zeros((b, t, self.k), dtype=np.float32)
            out[loss_mask] = codec.decode_logprobs(self.array("topk_head"), self.array("topk_codes"))
            if "sample_counts" in self.segments:
                out[loss_mask] = np.where(self.array("sample_counts") == 0, -np.inf, out[loss_mask])
        return out


@dataclass
class _Rows:
    """Consecutive rows of the token axis: tokens and loss_mask of each, the
    teacher arrays of the trained ones (in row order)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    label_logprob: np.ndarray
    topk_head: np.ndarray
    topk_ids: np.ndarray
    topk_codes: np.ndarray
    sample_counts: np.ndarray  # uint8 [R, k] of a sampled cache; empty for a top-k one

    def split(self, n: int) -> tuple[_Rows, _Rows]:
        """The first ``n`` rows and the rest."""
        m = int(self.loss_mask[:n].sum()) if len(self.topk_ids) else 0
        teach = (self.label_logprob, self.topk_head, self.topk_ids, self.topk_codes, self.sample_counts)
        return (_Rows(self.tokens[:n].copy(), self.loss_mask[:n].copy(), *(x[:m].copy() for x in teach)),
                _Rows(self.tokens[n:], self.loss_mask[n:], *(x[m:] for x in teach)))

    def join(self, other: _Rows) -> _Rows:
        return _Rows(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in dataclasses.fields(self)))


@dataclass
class _UnitRows:
    """A unit's sequences in their stored dtypes: tokens and loss_mask of every
    row; of the teacher arrays only the rows where loss_mask is True (empty
    when read for tokens only)."""

    first: int  # index of the unit's first sequence
    starts: np.ndarray  # int64 [S+1]: sequence first+j is tokens[starts[j]:starts[j+1]]
    trained: np.ndarray  # int64 [S+1]: its trained rows are rows[trained[j]:trained[j+1]] of the teacher arrays
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]
    label_logprob: np.ndarray  # float16/float32 [R]
    topk_head: np.ndarray  # float16 [R]
    topk_ids: np.ndarray  # uint16/int32 [R, k]
    topk_codes: np.ndarray  # uint8 [R, k]
    example_ids: np.ndarray  # [S]
    sample_counts: np.ndarray | None = None  # uint8 [R, k]: a sampled cache's counts; None: top-k

    def sequence(self, index: int) -> SequenceRows:
        j = index - self.first
        return SequenceRows(index, self, int(self.starts[j]), int(self.starts[j + 1]), int(self.trained[j]), int(self.trained[j + 1]))


@dataclass(slots=True)
class SequenceRows:
    """One sequence as views into its unit's stored arrays (:meth:`CacheReader.sequences`
    with ``form="compact"`` or ``"tokens"``)."""

    index: int
    unit: _UnitRows
    p: int  # tokens[p:q] of the unit
    q: int
    a: int  # teacher rows[a:b] of the unit
    b: int

    @property
    def tokens(self) -> np.ndarray:
        return self.unit.tokens[self.p : self.q]

    @property
    def loss_mask(self) -> np.ndarray:
        return self.unit.loss_mask[self.p : self.q]



class CacheReader:
    def __init__(
        self,
        path: str | Path,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        buffer_sequences: int = 256,
        require_complete: bool = True,
        readahead: int | None = None,
    ):
        self.store = CacheStore(path)
        # Units read ahead in background threads while earlier ones are consumed:
        # on object storage each chunk is a request, so by default 4; none on local disk.
        self.readahead = readahead if readahead is not None else (4 if self.store.location.local is None else 0)
        if require_complete and not self.store.complete:
            done = len(self.store.done_units())
            raise CacheError(f"{path}: cache is incomplete ({done}/{self.store.n_units} units done); finish it by rerunning the `hpd-tools cache` command that made it")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.buffer_sequences = buffer_sequences
        self.offsets = self._read("offsets", slice(None), "the offsets")
        check_offsets(self.store, self.offsets)
        if require_complete and not self.store.checked:
            # Format 1 has no checksums: its markers are the only record that every unit was written.
            done = len(self.store.done_units())
            if done < self.store.n_units:
                raise CacheCorruptError(f"{path}: marked complete but only {done}/{self.store.n_units} units have markers; the cache is damaged: delete it and rerun `hpd-tools cache`")
        self.k = self.store.k
        self.signal = self.store.signal  # "topk" or "sampled" (whose rows carry sample_counts)
        self.sampled = self.signal == "sampled"
        self._example_ids = self.store.array("example_id")
        # Fewer units than ranks: ranks share units, each taking its share of the sequences.
        self.by_sequence = world_size > self.store.n_units

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _reading(self, what: str) -> Any:
        """On object storage, a failed read (endpoint gone, credentials expired)
        becomes a one-line CacheError naming the URL and what was being read."""
        location = self.store.location
        return location.guard(f"reading {what}") if location.local is None else contextlib.nullcontext()

    def _read(self, name: str, rows: slice, what: str) -> np.ndarray:
        """Rows of one array. Checksums are checked by the store (format 2); a chunk
        that does not decode (format 1, or a codec failure) is a CacheCorruptError."""
        return read_rows(self.store, name, rows, what)

    def units(self, epoch: int = 0) -> list[int]:
        """This rank's units, in this epoch's order (all of them when ranks share
        units by sequence)."""
        order = np.arange(self.store.n_units)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order.tolist() if self.by_sequence else order[self.rank :: self.world_size].tolist()

    def read_unit(self, unit: int) -> list[CachedSequence]:
        """The sequences that start in ``unit``, decoded."""
        start, end = self.store.unit_range(unit)
        first = int(np.searchsorted(self.offsets, start, side="left"))
        last = int(np.searchsorted(self.offsets, end, side="left"))
        if first >= last:
            return []
        lo, hi = int(self.offsets[first]), int(self.offsets[last])
        names = ("tokens", "loss_mask", "label_logprob", "topk_ids", "topk_logprobs", "topk_head") + (("sample_counts",) if self.sampled else ())
        a = {name: self._read(name, slice(lo, hi), f"unit {unit}") for name in names}
        ids = self._read("example_id", slice(first, last), f"unit {unit}")
        logprobs = codec.decode_logprobs(a["topk_head"], a["topk_logprobs"])
        if self.sampled:  # padding (count 0) is no entry: whatever its code decodes to, it reads -inf
            logprobs[a["sample_counts"] == 0] = -np.inf
        logprobs[~a["loss_mask"]] = 0.0
        counts = a.get("sample_counts")
        out = []
        for j, s in enumerate(range(first, last)):
            p, q = int(self.offsets[s]) - lo, int(self.offsets[s + 1]) - lo
            out.append(
                CachedSequence(
                    index=s,
                    example_id=int(ids[j]),
                    tokens=a["tokens"][p:q].astype(np.int64),
                    loss_mask=a["loss_mask"][p:q],
                    label_logprob=a["label_logprob"][p:q].astype(np.float32),
                    topk_ids=a["topk_ids"][p:q].astype(np.int64),
                    topk_logprobs=logprobs[p:q],
                    sample_counts=None if counts is None else counts[p:q],
                )
            )
        return out

    def read_unit_rows(self, unit: int, teacher: bool = True, spill: _Rows | None = None, keep_head: bool = False) -> tuple[_UnitRows, _Rows | None]:
        """The sequences that start in ``unit`` in their stored dtypes, teacher
        arrays (``teacher``; else left empty) at the trained rows only.

        The unit's last sequence usually ends in the next chunk, and reading its
        tail decodes that whole chunk again. So the rows can come from the other
        side: ``spill``, the tail as kept by the next unit's read; and with
        ``keep_head``, this read also returns the rows before its first sequence
        (the previous unit's tail: same chunk, no extra decoding), or None when
        they are not one whole tail."""
        start, end = self.store.unit_range(unit)
        first = int(np.searchsorted(self.offsets, start, side="left"))
        last = int(np.searchsorted(self.offsets, end, side="left"))
        lo, hi = (int(self.offsets[first]), int(self.offsets[last])) if first < last else (0, 0)
        ids = self._read("example_id", slice(first, last), f"unit {unit}")  # unused by training; read so that damage to it is found as the dense path finds it
        # The previous unit's tail is a whole tail when its sequence starts in the previous chunk.
        head = keep_head and first < last and first > 0 and lo > start and int(self.offsets[first - 1]) >= start - self.store.chunk_tokens
        rows = self._rows(start if head else lo, min(hi, end) if first < last else lo, teacher, f"unit {unit}")
        kept = None
        if head:
            kept, rows = rows.split(lo - start)
        if hi > end:
            rows = rows.join(spill if spill is not None else self._rows(end, hi, teacher, f"unit {unit}"))
        starts = (self.offsets[first : last + 1] - lo).astype(np.int64)
        trained = np.searchsorted(np.flatnonzero(rows.loss_mask), starts).astype(np.int64) if teacher else np.zeros(len(starts), dtype=np.int64)
        unit_rows = _UnitRows(first, starts, trained, rows.tokens, rows.loss_mask, rows.label_logprob, rows.topk_head, rows.topk_ids, rows.topk_codes, ids,
                              rows.sample_counts if self.sampled and teacher else None)
        return unit_rows, kept

    def _rows(self, lo: int, hi: int, teacher: bool, what: str) -> _Rows:
        names = ("tokens", "loss_mask") + (("label_logprob", "topk_head", "topk_ids", "topk_logprobs") if teacher else ()) + (("sample_counts",) if teacher and self.sampled else ())
        a = self._read_many({name: (name, slice(lo, hi)) for name in names}, what)
        no_counts = np.zeros((0, self.k), np.uint8)
        if not teacher:
            return _Rows(a["tokens"], a["loss_mask"], np.zeros(0, np.float32), np.zeros(0, np.float16), np.zeros((0, self.k), np.int32), np.zeros((0, self.k), np.uint8), no_counts)
        trained = np.flatnonzero(a["loss_mask"])
        counts = a["sample_counts"][trained] if self.sampled else no_counts
        return _Rows(a["tokens"], a["loss_mask"], *(a[name][trained] for name in names[2:6]), counts)

    def _read_many(self, reads: dict[str, tuple[str, slice]], what: str) -> dict[str, np.ndarray]:
        # One after another: issuing them from threads at once was measured no faster
        # here (zarr already decodes a read's chunks concurrently; 2 busy cores).
        return {key: self._read(name, rows, what) for key, (name, rows) in reads.items()}

    def order(self, epoch: int = 0) -> np.ndarray:
        """The sequence indices this rank yields in ``epoch``, in order.

        Computed from the offsets alone (no token data is read), so a stream
        can resume at any position of an epoch without replaying it.
        """
        units = self.units(epoch)
        seq_starts = self.offsets[:-1]
        starts = np.searchsorted(seq_starts, [self.store.unit_range(u)[0] for u in units], side="left")
        ends = np.searchsorted(seq_starts, [self.store.unit_range(u)[1] for u in units], side="left")
        per_unit = [np.arange(starts[i], ends[i]) for i in range(len(units))]
        flat = np.concatenate(per_unit) if per_unit else np.zeros(0, dtype=np.int64)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 1])
            out, buffer = [], []
            for s in flat.tolist():
                buffer.append(s)
                if len(buffer) >= self.buffer_sequences:
                    out.append(buffer.pop(int(rng.integers(len(buffer)))))
            while buffer:
                out.append(buffer.pop(int(rng.integers(len(buffer)))))
            flat = np.asarray(out, dtype=np.int64)
        # Shared units: one order for all ranks (nothing above depends on the rank), dealt by sequence.
        return flat[self.rank :: self.world_size] if self.by_sequence else flat

    def unit_of(self, index: int) -> int:
        """The unit (chunk) where sequence ``index`` starts."""
        return int(self.offsets[index]) // self.store.chunk_tokens

    def sequences(self, epoch: int = 0, start: int = 0, form: str = "dense") -> Iterator[Any]:
        """This rank's sequences for ``epoch`` from position ``start`` of :meth:`order`.

        ``form``: "dense" yields :class:`CachedSequence` (every row decoded);
        "compact" :class:`SequenceRows` with the trained rows of the teacher
        arrays in their stored dtypes (what training reads); "tokens" the same
        without teacher arrays (prompts).

        Units are read when first needed (``readahead`` of the next ones in
        background threads) and dropped once all their sequences have been
        yielded, so memory holds a few units, not the cache.
        """
        if form == "dense":
            def read(u: int) -> Any:
                return {seq.index: seq for seq in self.read_unit(u)}.__getitem__
        elif form in ("compact", "tokens"):
            # A unit read before the one in front of it keeps that unit's tail (the rows
            # before its own first sequence) so the chunk is not decoded twice. Only
            # without read-ahead threads; at most MAX_KEPT_TAILS tails (each at most one
            # sequence) wait at a time.
            tails: dict[int, _Rows] = {}

            def read(u: int) -> Any:
                keep = pool is None and len(tails) < MAX_KEPT_TAILS and position.get(u - 1, -1) > position[u]
                rows, kept = self.read_unit_rows(u, teacher=form == "compact", spill=tails.pop(u, None), keep_head=keep)
                if kept is not None:
                    tails[u - 1] = kept
                return rows.sequence
        else:
            raise ValueError(f"form {form!r}")
        order = self.order(epoch)[start:].tolist()
        remaining: dict[int, int] = {}
        for s in order:
            u = self.unit_of(s)
            remaining[u] = remaining.get(u, 0) + 1
        needed = list(remaining)  # units in the order they are first needed
        position = {u: i for i, u in enumerate(needed)}
        pool = concurrent.futures.ThreadPoolExecutor(self.readahead, thread_name_prefix="hpd-readahead") if self.readahead else None
        pending: dict[int, concurrent.futures.Future] = {}
        loaded: dict[int, Any] = {}
        next_unit = 0
        try:
            for s in order:
                u = self.unit_of(s)
                if u not in loaded:
                    if pool is not None:
                        while next_unit < len(needed) and next_unit <= position[u] + self.readahead:
                            pending[needed[next_unit]] = pool.submit(read, needed[next_unit])
                            next_unit += 1
                        loaded[u] = pending.pop(u).result()
                    else:
                        loaded[u] = read(u)
                yield loaded[u](s)
                remaining[u] -= 1
                if remaining[u] == 0:
                    del loaded[u]
        finally:
            # In-flight reads finish; queued ones are dropped. (Not at interpreter exit, where
            # a stream never drained is collected after the modules shutdown needs are gone.)
            if pool is not None and not sys.is_finalizing():
                pool.shutdown(wait=True, cancel_futures=True)

    def read_sequence(self, index: int, form: str = "dense") -> Any:
        """One sequence by its index (random access; reads the chunks it spans), in
        the ``form`` of :meth:`sequences`."""
        if form == "dense":
            return next(seq for seq in self.read_unit(self.unit_of(index)) if seq.index == index)
        return self.read_unit_rows(self.unit_of(index), teacher=form == "compact")[0].sequence(index)

    def batch_plan(self, batch_tokens: int, epoch: int = 0) -> list[list[int]]:
        """The sequence indices of each batch :meth:`batches` yields, from the
        offsets alone (no token data is read)."""
        lengths = np.diff(self.offsets)
        plan: list[list[int]] = []
        pending: list[int] = []
        width = 0
        for s in self.order(epoch).tolist():
            n = int(lengths[s])
            if pending and max(width, n) * (len(pending) + 1) > batch_tokens:
                plan.append(pending)
                pending, width = [], 0
            pending.append(s)
            width = max(width, n)
        if pending:
            plan.append(pending)
        return plan

    def batches(self, batch_tokens: int, epoch: int = 0, compact: bool = True) -> Iterator[Batch]:
        """Padded batches of at most ``batch_tokens`` (longest x count) tokens:
        compact (:func:`assemble`) or, ``compact=False``, dense (:func:`collate`)."""
        plan = iter(self.batch_plan(batch_tokens, epoch))
        wanted = next(plan, None)
        pending: list[Any] = []
        for seq in self.sequences(epoch, form="compact" if compact else "dense"):
            pending.append(seq)
            if wanted is not None and len(pending) == len(wanted):
                yield assemble(pending, self.k) if compact else collate(pending, self.k)
                pending, wanted = [], next(plan, None)


def read_rows(store: CacheStore, name: str, rows: slice, what: str) -> np.ndarray:
    """``store.array(name)[rows]``, with every failure a one-line CacheError: a
    checksum mismatch or missing chunk (CacheCorruptError from the store), a chunk
    that does not decode, storage that fails (object stores)."""
    location = store.location
    try:
        with location.guard(f"reading {what}") if location.local is None else contextlib.nullcontext():
            return store.array(name)[rows]
    except CacheError:
        raise
    except Exception as exc:  # codecs raise their own types (LZMAError, RuntimeError from zstd/blosc, ValueError)
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise CacheCorruptError(f"{store.path}: array '{name}' {_failing_chunk(store, name, rows) or f'({what})'} cannot be read ({type(exc).__name__}: {text}); "
                                "the cache is damaged: delete it and rerun `hpd-tools cache`") from None


def _failing_chunk(store: CacheStore, name: str, rows: slice) -> str | None:
    """Which chunk of a multi-chunk read fails to decode, for the message."""
    try:
        array = store.array(name)
    except Exception:  # the array's metadata itself is damaged
        return None
    size = array.chunks[0]
    start, stop, _ = rows.indices(array.shape[0])
    for chunk in range(start // size, max(stop - 1, start) // size + 1):
        try:
            array[chunk * size : (chunk + 1) * size]
        except Exception:
            return store._describe(name, chunk)
    return None


def check_offsets(store: CacheStore, offsets: np.ndarray) -> None:
    """Offsets that describe the cache's token axis: from 0 to its token count, each
    sequence at least 2 tokens (format 1 caches have no checksum to vouch for them)."""
    n = int(store.attrs["counts"]["tokens"])
    if len(offsets) != int(store.attrs["counts"]["sequences"]) + 1 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 2).any():
        raise CacheCorruptError(f"{store.path}: the offsets do not describe {n} tokens in sequences of at least 2; the cache is damaged: delete it and rerun `hpd-tools cache`")


def collate(seqs: list[CachedSequence], k: int) -> Batch:
    lengths = np.array([len(s.tokens) for s in seqs], dtype=np.int64)
    b, t = len(seqs), int(lengths.max())
    batch = Batch(
        indices=np.array([s.index for s in seqs], dtype=np.int64),
        lengths=lengths,
        input_ids=np.zeros((b, t), dtype=np.int64),
        loss_mask=np.zeros((b, t), dtype=bool),
        label_logprob=np.zeros((b, t), dtype=np.float32),
        topk_ids=np.zeros((b, t, k), dtype=np.int64),
        topk_logprobs=np.zeros((b, t, k), dtype=np.float32),
        sample_counts=_counts_like(seqs, (b, t, k)),
    )
    for i, s in enumerate(seqs):
        n = len(s.tokens)
        batch.input_ids[i, :n] = s.tokens
        batch.loss_mask[i, :n] = s.loss_mask
        batch.label_logprob[i, :n] = s.label_logprob
        batch.topk_ids[i, :n] = s.topk_ids
        batch.topk_logprobs[i, :n] = s.topk_logprobs
        if batch.sample_counts is not None:
            batch.sample_counts[i, :n] = s.sample_counts
    return batch


def _counts_like(seqs: list[Any], shape: tuple[int, ...]) -> np.ndarray | None:
    """A zero uint8 [B, T, k] for a batch of a sampled cache's sequences, None for top-k
    ones; a batch mixing the two is a bug (training refuses such caches up front)."""
    sampled = {getattr(s, "sample_counts", None) is not None if isinstance(s, CachedSequence) else s.unit.sample_counts is not None for s in seqs}
    if len(sampled) > 1:
        raise ValueError("a batch mixes sequences of a sampled and a top-k cache")
    return np.zeros(shape, dtype=np.uint8) if sampled == {True} else None


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the positions of ``lengths`` grouped into rows of at
    most ``width`` tokens (a length above ``width`` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def pack(seqs: list[CachedSequence], k: int, width: int | None = None) -> Batch:
    """Sequences end to end in rows of ``width`` tokens (default: one row of all
    of them), ``position_ids`` restarting at 0 at each sequence and at the
    padding that fills a row's end. Position i of a sequence still trains on
    its token i+1: a sequence's last position has loss_mask False (the cache
    contract), so no target crosses into the next sequence.

    Attention over a row costs width^2, so rows as wide as the longest
    sequence (what the training stream uses) drop most padding without the
    cross-sequence work of one long row, unless the attention kernel skips
    masked blocks (flash-attention's variable-length path on GPUs)."""
    lengths = [len(s.tokens) for s in seqs]
    width = width or sum(lengths)
    groups = pack_rows(lengths, width)
    t = max(width, max(lengths))
    b = len(groups)
    batch = Batch(
        indices=np.array([seqs[i].index for g in groups for i in g], dtype=np.int64),
        lengths=np.array([lengths[i] for g in groups for i in g], dtype=np.int64),
        input_ids=np.zeros((b, t), dtype=np.int64),
        loss_mask=np.zeros((b, t), dtype=bool),
        label_logprob=np.zeros((b, t), dtype=np.float32),
        topk_ids=np.zeros((b, t, k), dtype=np.int64),
        topk_logprobs=np.zeros((b, t, k), dtype=np.float32),
        position_ids=np.zeros((b, t), dtype=np.int64),
        sample_counts=_counts_like(seqs, (b, t, k)),
    )
    batch.order = np.array([i for g in groups for i in g], dtype=np.int64)  # type: ignore[attr-defined]  # seqs[i] by batch position
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            s, n = seqs[i], lengths[i]
            batch.input_ids[r, at : at + n] = s.tokens
            batch.loss_mask[r, at : at + n] = s.loss_mask
            batch.label_logprob[r, at : at + n] = s.label_logprob
            batch.topk_ids[r, at : at + n] = s.topk_ids
            batch.topk_logprobs[r, at : at + n] = s.topk_logprobs
            if batch.sample_counts is not None:
                batch.sample_counts[r, at : at + n] = s.sample_counts
            batch.position_ids[r, at : at + n] = np.arange(n)
            at += n
        batch.position_ids[r, at:] = np.arange(t - at)
    return batch


def assemble(seqs: list[SequenceRows], k: int, *, packed: bool = False, width: int | None = None, pin: bool = False) -> Batch:
    """A training batch of compact sequences: padded like :func:`collate`, or
    packed like :func:`pack` (``packed``, rows of ``width``), with the same
    ``indices``, ``lengths``, ``input_ids``, ``loss_mask`` and ``position_ids``
    as those give, and the teacher's trained rows in one :class:`Payload`
    (allocated in pinned memory when ``pin``, so the copy to a GPU is direct
    and asynchronous). Mixed caches take the wider of their dtypes."""
    lengths = [s.q - s.p for s in seqs]
    if packed:
        groups = pack_rows(lengths, width or sum(lengths))
        t = max(width or sum(lengths), max(lengths))
    else:
        groups = [[i] for i in range(len(seqs))]
        t = max(lengths)
    order = [i for g in groups for i in g]
    b, n_rows = len(groups), sum(seqs[i].b - seqs[i].a for i in order)
    units = {id(s.unit): s.unit for s in seqs}.values()
    ids_dtype = np.result_type(*(u.topk_ids.dtype for u in units))
    label_dtype = np.result_type(*(u.label_logprob.dtype for u in units))
    plan = [("input_ids", np.dtype(np.int32), (b, t)), ("position_ids", np.dtype(np.int32), (b, t)) if packed else ("lengths", np.dtype(np.int32), (b,)),
            ("labels", np.dtype(np.int32), (n_rows,)), ("label_logprob", label_dtype, (n_rows,)), ("topk_head", np.dtype(np.float16), (n_rows,)),
            ("topk_ids", ids_dtype, (n_rows, k)), ("topk_codes", np.dtype(np.uint8), (n_rows, k))]
    sampled = _counts_like(seqs, (0,)) is not None
    if sampled:
        plan.append(("sample_counts", np.dtype(np.uint8), (n_rows, k)))
    segments, at = {}, 0
    for name, dtype, shape in plan:
        segments[name] = (at, dtype, shape)
        at += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
    if pin:
        import torch

        buffer: Any = torch.empty(max(at, 1), dtype=torch.uint8, pin_memory=True)
    else:
        buffer = np.empty(max(at, 1), dtype=np.uint8)
    payload = Payload(buffer, segments, (b, t), n_rows, k)
    ids = payload.array("input_ids")
    ids[:] = 0
    mask = np.zeros((b, t), dtype=bool)
    head, label, top_ids, codes = (payload.array(n) for n in ("topk_head", "label_logprob", "topk_ids", "topk_codes"))
    counts = payload.array("sample_counts") if sampled else None
    positions = payload.array("position_ids") if packed else None
    steps = np.arange(t, dtype=np.int32)
    r = 0
    for row, group in enumerate(groups):
        x = 0
        for i in group:
            s, n = seqs[i], lengths[i]
            u, m = s.unit, s.b - s.a
            ids[row, x : x + n] = u.tokens[s.p : s.q]
            mask[row, x : x + n] = u.loss_mask[s.p : s.q]
            if positions is not None:
                positions[row, x : x + n] = steps[:n]
            top_ids[r : r + m] = u.topk_ids[s.a : s.b]
            codes[r : r + m] = u.topk_codes[s.a : s.b]
            head[r : r + m] = u.topk_head[s.a : s.b]
            label[r : r + m] = u.label_logprob[s.a : s.b]
            if counts is not None:
                counts[r : r + m] = u.sample_counts[s.a : s.b]
            r, x = r + m, x + n
        if positions is not None:
            positions[row, x:] = steps[: t - x]
    if not packed:
        payload.array("lengths")[:] = lengths
    # Position i trains on token i+1 of its row, exactly as the dense path builds labels.
    following = np.zeros_like(ids)
    following[:, :-1] = ids[:, 1:]
    payload.array("labels")[:] = following[mask]
    batch = Batch(
        indices=np.array([seqs[i].index for i in order], dtype=np.int64),
        lengths=np.array([lengths[i] for i in order], dtype=np.int64),
        input_ids=ids.astype(np.int64),
        loss_mask=mask,
        position_ids=positions.astype(np.int64) if positions is not None else None,
        payload=payload,
    )
    if packed:
        batch.order = np.array(order, dtype=np.int64)  # type: ignore[attr-defined]  # seqs[i] by batch position
    return batch
