"""Streaming a cache: sequence by sequence, chunk by chunk, shuffled and partitioned.

A sequence belongs to the unit (chunk) where it starts. Each epoch the units
are permuted with ``seed + epoch`` and dealt to ranks round-robin, so ranks
read disjoint data; within a rank a shuffle buffer of ``buffer_sequences``
mixes sequences across chunks. Only one unit's arrays (plus the buffer) are in
memory at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
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
    topk_logprobs: np.ndarray  # float32 [L, k]; rows where loss_mask is False are 0


@dataclass
class Batch:
    """Sequences right-padded to the longest (padded positions have loss_mask
    False), or packed (:func:`pack`): rows of sequences end to end, with
    ``position_ids`` restarting at 0 at each sequence."""

    indices: np.ndarray  # [B] sequence indices in the cache
    lengths: np.ndarray  # [B]
    input_ids: np.ndarray  # int64 [B, T]
    loss_mask: np.ndarray  # bool [B, T]
    label_logprob: np.ndarray  # float32 [B, T]
    topk_ids: np.ndarray  # int64 [B, T, k]
    topk_logprobs: np.ndarray  # float32 [B, T, k]
    position_ids: np.ndarray | None = None  # int64 [B, T] when packed

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


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
        self._example_ids = self.store.array("example_id")

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
        """This rank's units, in this epoch's order."""
        order = np.arange(self.store.n_units)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order[self.rank :: self.world_size].tolist()

    def read_unit(self, unit: int) -> list[CachedSequence]:
        """The sequences that start in ``unit``, decoded."""
        start, end = self.store.unit_range(unit)
        first = int(np.searchsorted(self.offsets, start, side="left"))
        last = int(np.searchsorted(self.offsets, end, side="left"))
        if first >= last:
            return []
        lo, hi = int(self.offsets[first]), int(self.offsets[last])
        a = {name: self._read(name, slice(lo, hi), f"unit {unit}") for name in ("tokens", "loss_mask", "label_logprob", "topk_ids", "topk_logprobs", "topk_head")}
        ids = self._read("example_id", slice(first, last), f"unit {unit}")
        logprobs = codec.decode_logprobs(a["topk_head"], a["topk_logprobs"])
        logprobs[~a["loss_mask"]] = 0.0
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
                )
            )
        return out

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
        if not self.shuffle:
            return flat
        rng = np.random.default_rng([self.seed, epoch, 1])
        out, buffer = [], []
        for s in flat.tolist():
            buffer.append(s)
            if len(buffer) >= self.buffer_sequences:
                out.append(buffer.pop(int(rng.integers(len(buffer)))))
        while buffer:
            out.append(buffer.pop(int(rng.integers(len(buffer)))))
        return np.asarray(out, dtype=np.int64)

    def unit_of(self, index: int) -> int:
        """The unit (chunk) where sequence ``index`` starts."""
        return int(self.offsets[index]) // self.store.chunk_tokens

    def sequences(self, epoch: int = 0, start: int = 0) -> Iterator[CachedSequence]:
        """This rank's sequences for ``epoch`` from position ``start`` of :meth:`order`.

        Units are read when first needed (``readahead`` of the next ones in
        background threads) and dropped once all their sequences have been
        yielded, so memory holds a few units, not the cache.
        """
        order = self.order(epoch)[start:].tolist()
        remaining: dict[int, int] = {}
        for s in order:
            u = self.unit_of(s)
            remaining[u] = remaining.get(u, 0) + 1
        needed = list(remaining)  # units in the order they are first needed
        position = {u: i for i, u in enumerate(needed)}
        pool = concurrent.futures.ThreadPoolExecutor(self.readahead, thread_name_prefix="hpd-readahead") if self.readahead else None
        pending: dict[int, concurrent.futures.Future] = {}
        loaded: dict[int, dict[int, CachedSequence]] = {}
        next_unit = 0
        try:
            for s in order:
                u = self.unit_of(s)
                if u not in loaded:
                    if pool is not None:
                        while next_unit < len(needed) and next_unit <= position[u] + self.readahead:
                            pending[needed[next_unit]] = pool.submit(self.read_unit, needed[next_unit])
                            next_unit += 1
                        seqs = pending.pop(u).result()
                    else:
                        seqs = self.read_unit(u)
                    loaded[u] = {seq.index: seq for seq in seqs}
                yield loaded[u][s]
                remaining[u] -= 1
                if remaining[u] == 0:
                    del loaded[u]
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)  # in-flight reads finish; queued ones are dropped

    def read_sequence(self, index: int) -> CachedSequence:
        """One sequence by its index (random access; reads the chunks it spans)."""
        return next(seq for seq in self.read_unit(self.unit_of(index)) if seq.index == index)

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

    def batches(self, batch_tokens: int, epoch: int = 0) -> Iterator[Batch]:
        """Padded batches of at most ``batch_tokens`` (longest x count) tokens."""
        plan = iter(self.batch_plan(batch_tokens, epoch))
        wanted = next(plan, None)
        pending: list[CachedSequence] = []
        for seq in self.sequences(epoch):
            pending.append(seq)
            if wanted is not None and len(pending) == len(wanted):
                yield collate(pending, self.k)
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
    )
    for i, s in enumerate(seqs):
        n = len(s.tokens)
        batch.input_ids[i, :n] = s.tokens
        batch.loss_mask[i, :n] = s.loss_mask
        batch.label_logprob[i, :n] = s.label_logprob
        batch.topk_ids[i, :n] = s.topk_ids
        batch.topk_logprobs[i, :n] = s.topk_logprobs
    return batch


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
            batch.position_ids[r, at : at + n] = np.arange(n)
            at += n
        batch.position_ids[r, at:] = np.arange(t - at)
    return batch
