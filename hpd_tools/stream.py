"""The training stream: batches from one or more caches, mixed by weight, resumable.

Each draw picks a cache with probability proportional to its weight (a seeded
generator), then that cache's next sequence in its epoch order (CacheReader:
chunk-level shuffle plus a shuffle buffer, this rank's partition). Batches are
padded to their longest sequence and hold at most ``batch_tokens`` padded
tokens, or packed (``packed=True``): sequences end to end in rows of
``pack_width`` tokens (default ``batch_tokens``: one row; wider when a
sequence is longer), rows x width at most ``batch_tokens`` (a sequence longer
than that is a batch of its own).
``state()`` captures the exact position (per cache: epoch and sequences
taken; the mixing generator; the sequence that overflowed the last batch), so
a resumed run sees the same batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .cache.reader import Batch, CachedSequence, CacheReader, collate, pack, pack_rows
from .errors import HPDError


@dataclass
class _Source:
    reader: CacheReader
    weight: float
    epoch: int = 0
    taken: int = 0
    it: Iterator[CachedSequence] | None = None

    def next(self) -> CachedSequence:
        while True:
            if self.it is None:
                self.it = self.reader.sequences(self.epoch, start=self.taken)
            try:
                seq = next(self.it)
            except StopIteration:
                self.epoch, self.taken, self.it = self.epoch + 1, 0, None
                continue
            self.taken += 1
            return seq


class CacheStream:
    def __init__(
        self,
        paths: Sequence[str],
        *,
        weights: Sequence[float] | None = None,
        batch_tokens: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_sequences: int = 256,
        packed: bool = False,
        pack_width: int | None = None,
    ):
        weights = list(weights) if weights else [1.0] * len(paths)
        if len(weights) != len(paths):
            raise ValueError("one weight per cache")
        self.sources = [
            _Source(CacheReader(p, seed=seed + i, rank=rank, world_size=world_size, buffer_sequences=buffer_sequences), float(w))
            for i, (p, w) in enumerate(zip(paths, weights))
        ]
        self.probs = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.rng = np.random.default_rng([seed, 7, rank])
        self.batch_tokens = batch_tokens
        self.packed = packed
        self.pack_width = min(pack_width or batch_tokens, batch_tokens)
        self.carry: tuple[int, CachedSequence] | None = None
        self.k = self.sources[0].reader.k

    def _draw(self) -> tuple[int, CachedSequence]:
        i = int(self.rng.choice(len(self.sources), p=self.probs)) if len(self.sources) > 1 else 0
        return i, self.sources[i].next()

    def next_batch(self) -> Batch:
        items: list[tuple[int, CachedSequence]] = []
        width = 0
        while True:
            item = self.carry if self.carry is not None else self._draw()
            self.carry = None
            n = len(item[1].tokens)
            # The budget: the batch tensor's positions, padding included: longest x
            # count, or, packed, longest x the rows the sequences fill at that width.
            w = max(width, n, self.pack_width) if self.packed else max(width, n)
            rows = len(pack_rows([len(s.tokens) for _, s in items] + [n], w)) if self.packed else len(items) + 1
            if items and w * rows > self.batch_tokens:
                self.carry = item
                break
            items.append(item)
            width = w
            # Padded: full once longest x count reaches the budget. Packed: rows may
            # still have room; the next sequence that does not fit ends the batch.
            if not self.packed and width * rows >= self.batch_tokens:
                break
        seqs = [s for _, s in items]
        batch = pack(seqs, self.k, width) if self.packed else collate(seqs, self.k)
        order = batch.order if self.packed else range(len(items))  # pack() groups the sequences by row
        batch.sources = np.array([items[i][0] for i in order])  # type: ignore[attr-defined]
        return batch

    def state(self) -> dict[str, Any]:
        return {
            "sources": [{"epoch": s.epoch, "taken": s.taken} for s in self.sources],
            "rng": self.rng.bit_generator.state,
            "carry": None if self.carry is None else [self.carry[0], self.carry[1].index],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for source, st in zip(self.sources, state["sources"]):
            source.epoch, source.taken, source.it = int(st["epoch"]), int(st["taken"]), None
        self.rng.bit_generator.state = state["rng"]
        carry = state.get("carry")
        self.carry = None if carry is None else (int(carry[0]), self.sources[int(carry[0])].reader.read_sequence(int(carry[1])))


class StepStream:
    """One step's micro-batches: this rank's data slots, one CacheStream each.

    A run has ``n_slots`` (processes x grad_accum) slots; slot j reads partition
    j of every cache's units, so slots never share data and the batches a step
    sees depend on ``n_slots`` only, not on which process owns which slot.
    ``state()`` is keyed by slot: the union of all ranks' states restores the
    run on any world size with the same slot count.
    """

    def __init__(self, paths: Sequence[str], *, slots: Sequence[int], n_slots: int, weights: Sequence[float] | None = None, batch_tokens: int, seed: int = 0, packed: bool = False, pack_width: int | None = None):
        self.slots, self.n_slots = list(slots), n_slots
        self.streams = [CacheStream(paths, weights=weights, batch_tokens=batch_tokens, seed=seed, rank=j, world_size=n_slots, packed=packed, pack_width=pack_width) for j in self.slots]
        for path, source in zip(paths, self.streams[0].sources):
            if source.reader.store.n_units < n_slots:
                raise HPDError(
                    f"--cache {path}: {source.reader.store.n_units} units (chunks) for {n_slots} data slots (processes x --grad-accum); "
                    "each slot reads its own units: use fewer processes or a smaller --grad-accum, or rebuild the cache with a smaller --chunk-tokens"
                )
        self.k = self.streams[0].k

    def next_batch(self) -> list[Batch]:
        return [stream.next_batch() for stream in self.streams]

    def state(self) -> dict[str, Any]:
        return {"n_slots": self.n_slots, "slots": {str(j): s.state() for j, s in zip(self.slots, self.streams)}}

    def load_state(self, state: dict[str, Any]) -> None:
        for j, stream in zip(self.slots, self.streams):
            stream.load_state(state["slots"][str(j)])


class Prefetcher:
    """Reads the next batch in a background thread while the current one trains.

    ``state()`` is the position before the batch waiting in the prefetch slot,
    so a checkpoint records exactly the batches handed out (the prefetched one
    is read again after a resume).
    """

    def __init__(self, stream: CacheStream | StepStream):
        import concurrent.futures

        self.stream = stream
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpd-prefetch")
        self._next = self._pool.submit(self._read)

    def _read(self) -> tuple[dict[str, Any], Any]:
        state = self.stream.state()
        return state, self.stream.next_batch()

    def next_batch(self) -> Any:
        _, batch = self._next.result()
        self._next = self._pool.submit(self._read)
        return batch

    def state(self) -> dict[str, Any]:
        return self._next.result()[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
