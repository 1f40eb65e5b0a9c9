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

What a training step receives (``compact=True``, the default): batches whose
teacher rows stay in their stored dtypes and are limited to the positions that
train (hpd_tools.cache.reader.assemble), in pinned memory on CUDA machines.
:func:`batch_targets` copies one to the device in one transfer and decodes it
there (codes to log-probs, dtype widening), giving the same values the dense
path (:func:`dense_targets`, every position in int64 and float32) gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .cache import codec
from .cache.reader import Batch, CachedSequence, CacheReader, SequenceRows, assemble, collate, pack, pack_rows
from .errors import HPDError


@dataclass
class _Source:
    reader: CacheReader
    weight: float
    form: str = "compact"
    epoch: int = 0
    taken: int = 0
    it: Iterator[Any] | None = None

    def next(self) -> CachedSequence | SequenceRows:
        while True:
            if self.it is None:
                self.it = self.reader.sequences(self.epoch, start=self.taken, form=self.form)
            try:
                seq = next(self.it)
            except StopIteration:
                if self.taken == 0:  # a whole epoch without a sequence would loop here forever
                    r = self.reader
                    raise HPDError(f"--cache {r.store.path}: data slot {r.rank} of {r.world_size} gets no sequence "
                                   f"(its units hold none that start in them); use fewer processes or a smaller --grad-accum") from None
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
        compact: bool = True,
        pin_memory: bool | None = None,
        readahead: int | None = None,
    ):
        """``compact``: batches for :func:`batch_targets` (trained rows, stored
        dtypes); False: the dense batches of :func:`collate`/:func:`pack`.
        ``pin_memory`` (compact only; default: when CUDA is available) puts each
        batch's payload in page-locked memory. ``readahead``: units read ahead
        in background threads (CacheReader's default: 4 on object storage, none
        on local disk, where reading 1 or 2 ahead was measured slower on this
        2-core machine; the Prefetcher already decodes beside the training step)."""
        weights = list(weights) if weights else [1.0] * len(paths)
        if len(weights) != len(paths):
            raise ValueError("one weight per cache")
        self.compact = compact
        if pin_memory is None:
            pin_memory = compact and _cuda_available()
        self.pin_memory = bool(pin_memory)
        form = "compact" if compact else "dense"
        self.sources = []
        for i, (p, w) in enumerate(zip(paths, weights)):
            reader = CacheReader(p, seed=seed + i, rank=rank, world_size=world_size, buffer_sequences=buffer_sequences, readahead=readahead)
            self.sources.append(_Source(reader, float(w), form))
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
        if self.compact:
            batch = assemble(seqs, self.k, packed=self.packed, width=width if self.packed else None, pin=self.pin_memory)  # type: ignore[arg-type]
        else:
            batch = pack(seqs, self.k, width) if self.packed else collate(seqs, self.k)  # type: ignore[arg-type]
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
        self.carry = None if carry is None else (int(carry[0]), self.sources[int(carry[0])].reader.read_sequence(int(carry[1]), form=self.sources[int(carry[0])].form))


class StepStream:
    """One step's micro-batches: this rank's data slots, one CacheStream each.

    A run has ``n_slots`` (processes x grad_accum) slots; slot j reads partition
    j of every cache's units (of its sequences, when the cache has fewer units
    than slots), so slots never share data and the batches a step sees depend
    on ``n_slots`` only, not on which process owns which slot. ``state()`` is
    keyed by slot: the union of all ranks' states restores the run on any
    world size with the same slot count.
    """

    def __init__(self, paths: Sequence[str], *, slots: Sequence[int], n_slots: int, weights: Sequence[float] | None = None, batch_tokens: int, seed: int = 0,
                 packed: bool = False, pack_width: int | None = None, compact: bool = True, pin_memory: bool | None = None):
        self.slots, self.n_slots = list(slots), n_slots
        for path in paths:
            n = len(CacheReader(path, shuffle=False))
            if n < n_slots:
                raise HPDError(f"--cache {path}: {n} sequences for {n_slots} data slots (processes x --grad-accum); each slot needs sequences of its own: "
                               "use fewer processes or a smaller --grad-accum")
        self.streams = [CacheStream(paths, weights=weights, batch_tokens=batch_tokens, seed=seed, rank=j, world_size=n_slots, packed=packed, pack_width=pack_width,
                                    compact=compact, pin_memory=pin_memory) for j in self.slots]
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


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def dense_targets(batch: Batch, device: Any) -> tuple[dict[str, Any], Any]:
    """The student's inputs and the flat targets of the trained positions, from a
    batch's dense arrays (rollouts, evaluation batches, any batch without a payload).

    Position i is trained on token i+1 (the cache's convention), so hidden
    state [b, i] meets labels[b, i] = input_ids[b, i+1]. A padded batch gets an
    attention mask; a packed one position ids restarting at each sequence and no
    mask, from which transformers builds the block-diagonal causal mask (each
    sequence attends to itself only).
    """
    import torch

    from .losses import Targets

    ids = torch.from_numpy(batch.input_ids).to(device)
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if batch.position_ids is not None:
        inputs["position_ids"] = torch.from_numpy(batch.position_ids).to(device)
    else:
        attn = torch.zeros_like(ids)
        for i, n in enumerate(batch.lengths):
            attn[i, :n] = 1
        inputs["attention_mask"] = attn
    mask = torch.from_numpy(batch.loss_mask).to(device)
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    targets = Targets(
        labels=labels[mask],
        mask=torch.ones(int(mask.sum()), dtype=torch.bool, device=device),
        label_logprob=torch.from_numpy(batch.label_logprob).to(device)[mask],
        topk_ids=torch.from_numpy(batch.topk_ids).to(device)[mask],
        topk_logprobs=torch.from_numpy(batch.topk_logprobs).to(device)[mask],
        noise=torch.zeros(int(mask.sum()), device=device),
    )
    if batch.sample_counts is not None:
        _sampled(targets, torch.from_numpy(batch.sample_counts).to(device)[mask])
    return inputs, targets


def _sampled(targets: Any, counts: Any) -> None:
    """A sampled cache's rows: weights count/N (N the rows' width: the cache's
    ``samples``) and padding (count 0) at log-prob -inf, id 0. [rows, N] work on
    the targets' device."""
    import torch

    pad = counts == 0
    targets.sample_weights = counts.to(torch.float32) / counts.shape[-1]
    targets.topk_logprobs = targets.topk_logprobs.masked_fill(pad, float("-inf"))
    targets.topk_ids = targets.topk_ids.masked_fill(pad, 0)


_DELTAS: dict[Any, Any] = {}  # device -> float64 [256]: the codec's distance below the top-1 of each code


def _deltas(device: Any) -> Any:
    import torch

    key = str(device)
    if key not in _DELTAS:
        _DELTAS[key] = torch.from_numpy(codec._delta(np.arange(codec.MAX_CODE + 1))).to(device)
    return _DELTAS[key]


def batch_targets(batch: Batch, device: Any) -> tuple[dict[str, Any], Any]:
    """What :func:`dense_targets` returns, for any batch: a batch with a payload
    (the training stream's) goes to ``device`` as one buffer (asynchronously
    from pinned memory) and is decoded there, in float64 like
    ``codec.decode_logprobs``, so the values are the same to the bit. No
    host synchronisation: the row counts are known on the host."""
    payload = batch.payload
    if payload is None:
        return dense_targets(batch, device)
    import torch

    from .losses import Targets

    host = payload.buffer if isinstance(payload.buffer, torch.Tensor) else torch.from_numpy(payload.buffer)
    buf = host.to(device, non_blocking=host.is_pinned())

    def seg(name: str) -> torch.Tensor:
        at, dtype, shape = payload.segments[name]
        n = int(np.prod(shape)) * dtype.itemsize
        raw = buf[at : at + n]
        if dtype == np.uint16:  # torch's uint16 support is thin: read it as int16 and widen
            return (raw.view(torch.int16).to(torch.int64) & 0xFFFF).view(shape)
        return raw.view(torch.from_numpy(np.empty(0, dtype)).dtype).view(shape)

    b, t = payload.shape
    ids = seg("input_ids").to(torch.int64)
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if "position_ids" in payload.segments:
        inputs["position_ids"] = seg("position_ids").to(torch.int64)
    else:
        inputs["attention_mask"] = (torch.arange(t, device=ids.device)[None, :] < seg("lengths")[:, None]).to(torch.int64)
    n = payload.n_rows
    codes = seg("topk_codes").to(torch.int64)
    targets = Targets(
        labels=seg("labels").to(torch.int64),
        mask=torch.ones(n, dtype=torch.bool, device=ids.device),
        label_logprob=seg("label_logprob").to(torch.float32, copy=True),
        topk_ids=seg("topk_ids").to(torch.int64, copy=True),
        topk_logprobs=(seg("topk_head").to(torch.float64)[:, None] - _deltas(ids.device)[codes]).to(torch.float32),
        noise=torch.zeros(n, device=ids.device),
    )
    if "sample_counts" in payload.segments:
        _sampled(targets, seg("sample_counts"))
    return inputs, targets

