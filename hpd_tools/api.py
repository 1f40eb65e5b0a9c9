"""The cache and losses inside another trainer (HF ``Trainer``, TRL, torchtune, a loop of your own).

Three pieces, the same ones ``hpd-tools distill`` runs:

- :class:`CacheDataset`, a ``torch.utils.data.IterableDataset`` of micro-batches
  (whole batches of at most ``batch_tokens`` tokens, not examples), the ones
  ``distill`` trains on for the same caches, weights, seed, ``batch_tokens``
  and slots (``world_size x grad_accum``), in the same order, each with the HPD
  sampler's noise distill would draw for it. Rank-aware (reads
  ``torch.distributed`` or RANK/WORLD_SIZE, or takes them) and resumable
  (``state_dict`` / ``load_state_dict``, JSON-serialisable).
- :class:`CacheCollator`: a micro-batch to ``{"inputs", "loss_mask", "targets",
  ...}``, decoded on the training device (hpd_tools.stream.batch_targets).
- :func:`distill_loss`: the student's forward and the chunked loss
  (hpd_tools.training.student.chunked_loss), the loss per response token; the
  [rows, vocab] logits exist one chunk of ``chunk_tokens`` rows at a time.

A training step::

    dataset = CacheDataset([cache], batch_tokens=4096, seed=0, grad_accum=1, tokenizer=tokenizer)
    collate = CacheCollator(device)
    for item in dataset:
        batch = collate(item)
        loss = distill_loss(model, batch["inputs"], batch["loss_mask"], batch["targets"], loss="hpd")
        loss.backward(); optimizer.step(); optimizer.zero_grad()

Read it with ``DataLoader(dataset, batch_size=None, collate_fn=collate)`` (no
workers: the dataset reads ahead in a thread of its own, and its position
lives in this process). Under torchrun, hand each rank its own loader rather
than letting a library re-shard it (accelerate's ``prepare`` would read every
rank's batches on each, or dispatch rank 0's): the dataset partitions the
caches by rank already. examples/hf_trainer.py does this with
``transformers.Trainer``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .cache.reader import Batch
from .errors import HPDError
from .losses import LOSSES, Targets
from .stream import Prefetcher, StepStream
from .training.config import DistillConfig
from .training.state import noise_generator
from .training.student import check_caches, chunked_loss, to_targets

__all__ = ["CacheCollator", "CacheDataset", "MicroBatch", "distill_loss"]


@dataclass
class MicroBatch:
    """One micro-batch as :class:`CacheDataset` yields it."""

    batch: Batch  # the stream's batch (compact: trained rows only, in the cache's dtypes)
    slot: int  # the data slot it came from (rank * grad_accum + its place in the step)
    noise: torch.Tensor  # float32 [trained rows], CPU: the uniform draws for y' (hpd, rkl), distill's for this slot


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:  # torchrun sets these before the process group exists
        found = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)


class CacheDataset(torch.utils.data.IterableDataset):
    """Micro-batches from one or more caches, mixed by weight, endless (epoch
    after epoch), this rank's share.

    A run has ``world_size x grad_accum`` data slots; this rank reads slots
    ``rank*grad_accum .. (rank+1)*grad_accum - 1`` and yields, per optimizer
    step, one micro-batch of each in slot order: ``grad_accum`` must be the
    trainer's gradient-accumulation steps. ``rank``/``world_size`` default to
    ``torch.distributed``'s (or RANK/WORLD_SIZE). ``tokenizer``: when given,
    every cache is checked as distill checks it (complete, made with this
    tokenizer, chunk files present). ``packed``/``pack_width``: distill's
    ``--pack``/``--pack-width``. ``pin_memory``: pinned payloads for
    asynchronous copies (default: when CUDA is available).
    """

    def __init__(
        self,
        caches: Sequence[str],
        *,
        batch_tokens: int,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        grad_accum: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        tokenizer: Any = None,
        packed: bool = False,
        pack_width: int | None = None,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        caches = [str(c) for c in caches]
        if not caches:
            raise HPDError("CacheDataset: give at least one cache")
        if batch_tokens < 2:
            raise HPDError(f"CacheDataset batch_tokens={batch_tokens}: must be at least 2 (a token and the next token it is trained to predict)")
        if grad_accum < 1:
            raise HPDError(f"CacheDataset grad_accum={grad_accum}: must be at least 1")
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise HPDError(f"CacheDataset rank={self.rank} world_size={self.world_size}: the rank must be in [0, world_size)")
        if tokenizer is not None:
            check_caches(caches, tokenizer)
        self.seed = seed
        self.slots = list(range(self.rank * grad_accum, (self.rank + 1) * grad_accum))
        self.stream = StepStream(caches, slots=self.slots, n_slots=self.world_size * grad_accum, weights=weights or None, batch_tokens=batch_tokens,
                                 seed=seed, packed=packed, pack_width=pack_width, pin_memory=pin_memory)
        self.k = self.stream.k
        self.noise = {j: noise_generator(seed, j) for j in self.slots}
        self._prefetch: Prefetcher | None = None
        self._step: list[Batch] = []  # the current step's micro-batches
        self._step_state: dict[str, Any] | None = None  # the stream's position before them
        self._taken = 0  # of them yielded

    def __iter__(self) -> Iterator[MicroBatch]:
        """Continues from the dataset's position (an iterator does not restart it)."""
        info = torch.utils.data.get_worker_info()
        if info is not None:
            raise HPDError("CacheDataset in a DataLoader worker: give the DataLoader num_workers=0 "
                           "(the dataset reads ahead in a thread of its own, and its position must live in the training process)")
        while True:
            yield self.next()

    def next(self) -> MicroBatch:
        if self._taken == len(self._step):
            if self._prefetch is None:
                self._prefetch = Prefetcher(self.stream)
            self._step_state = self._prefetch.state()
            self._step, self._taken = self._prefetch.next_batch(), 0
        batch, slot = self._step[self._taken], self.slots[self._taken]
        self._taken += 1
        noise = torch.rand(int(batch.loss_mask.sum()), generator=self.noise[slot])
        return MicroBatch(batch, slot, noise)

    def state_dict(self) -> dict[str, Any]:
        """The position after the last micro-batch yielded, keyed by slot (JSON-serialisable)."""
        if self._step_state is None:  # nothing yielded yet
            stream = self._prefetch.state() if self._prefetch is not None else self.stream.state()
            taken = 0
        else:
            stream, taken = self._step_state, self._taken
        return {"stream": stream, "taken_in_step": taken,
                "noise": {str(j): g.get_state().tolist() for j, g in self.noise.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s position; call it before iterating."""
        self.close()
        if int(state["stream"]["n_slots"]) != self.stream.n_slots:
            raise HPDError(f"CacheDataset.load_state_dict: the state has {state['stream']['n_slots']} data slots, this dataset {self.stream.n_slots} "
                           "(world_size x grad_accum); resume with the slot count it was saved with")
        self.stream.load_state(state["stream"])
        for j, g in self.noise.items():
            g.set_state(torch.tensor(state["noise"][str(j)], dtype=torch.uint8))
        self._step, self._taken, self._step_state = [], 0, None
        skip = int(state["taken_in_step"])
        if skip:  # re-read the interrupted step; its first micro-batches were yielded (and their noise drawn) already
            self._prefetch = Prefetcher(self.stream)
            self._step_state = self._prefetch.state()
            self._step, self._taken = self._prefetch.next_batch(), skip

    def close(self) -> None:
        """Stops the read-ahead thread; iterating again restarts it where the
        dataset stands (the step read ahead is read again)."""
        if self._prefetch is not None:
            ahead = self._prefetch.state()
            self._prefetch.close()
            self._prefetch = None
            self.stream.load_state(ahead)


class CacheCollator:
    """A :class:`MicroBatch` (or a list of one, as ``DataLoader(batch_size=1)``
    hands it) to the dict a training step takes, on ``device``:

    - ``inputs``: the student's keyword arguments (``input_ids`` and an
      ``attention_mask``, or ``position_ids`` when packed);
    - ``loss_mask``: bool [B, T], the positions that train;
    - ``targets``: hpd_tools.losses.Targets of those positions, flat, with the
      batch's noise;
    - ``labels`` and ``shift_labels``: ``targets.labels`` again, under the
      names ``transformers.Trainer`` looks for (the first) and counts (the
      second) for ``num_items_in_batch``: the step's response tokens, over
      accumulation and ranks.

    The compact payload travels in one copy and is decoded on ``device``."""

    def __init__(self, device: Any = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def __call__(self, item: MicroBatch | list[MicroBatch]) -> dict[str, Any]:
        if isinstance(item, (list, tuple)):
            if len(item) != 1:
                raise HPDError(f"CacheCollator: got {len(item)} items; each is a whole batch already: give the DataLoader batch_size=None or 1")
            item = item[0]
        inputs, targets = to_targets(item.batch, self.device)
        targets.noise = item.noise.to(self.device, non_blocking=True)
        mask = torch.from_numpy(item.batch.loss_mask).to(self.device, non_blocking=True)
        return {"inputs": inputs, "loss_mask": mask, "targets": targets, "labels": targets.labels, "shift_labels": targets.labels}


def _core(model: Any) -> Any:
    """The Hugging Face model under a DDP (or similar) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def distill_loss(
    model: Any,
    inputs: dict[str, Any],
    loss_mask: torch.Tensor,
    targets: Targets,
    loss: str = "hpd",
    *,
    loss_options: dict[str, Any] | None = None,
    chunk_tokens: int = 1024,
    num_tokens: Any = None,
    return_stats: bool = False,
) -> Any:
    """The student's loss per response token on one micro-batch:
    ``sum_t loss_t / num_tokens`` (default: this batch's response tokens),
    ``loss_t`` the hpd_tools.losses function ``loss`` with ``loss_options``.

    ``model``: a Hugging Face causal LM, or a DDP wrapper of one. Its forward
    runs through ``model`` (so DDP's gradient hooks take part) with
    ``logits_to_keep=1``; the final hidden states of the trained positions meet
    the LM head ``chunk_tokens`` rows at a time inside checkpointed calls, so
    [batch, length, vocab] logits never exist, under the autocast the forward
    ran under (mixed precision that wraps only the model's forward, as
    accelerate's does, reaches the head too). ``num_tokens``: the count to
    divide by when a step accumulates micro-batches or ranks (distill divides
    by the step's global count; ``transformers.Trainer`` passes it to
    ``compute_loss`` as ``num_items_in_batch``). ``return_stats``: also the
    loss's diagnostic sums (detached float64, e.g. hpd's ``frac_mf``).
    """
    if loss not in LOSSES:
        raise HPDError(f"distill_loss loss={loss!r}: choose one of {', '.join(LOSSES)}")
    options = dict(loss_options or {})  # names and values are checked by the loss itself (hpd_tools.losses.compute_loss)
    core = _core(model)
    decoder = core.get_decoder() if hasattr(core, "get_decoder") else core.base_model
    captured: list[tuple[torch.Tensor, Any]] = []

    def grab(_module: Any, _args: Any, out: Any) -> None:
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        kind = hidden.device.type
        # The autocast the forward runs under: a trainer may apply it to the model's
        # forward alone (accelerate does), and the head should compute as distill's does.
        captured.append((hidden, torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None))

    handle = decoder.register_forward_hook(grab)
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    hidden, autocast_dtype = captured[0]
    hidden = hidden[loss_mask]
    config = DistillConfig(caches=[], student="", out="", loss=loss, loss_options=options, loss_chunk_tokens=chunk_tokens)
    kind = hidden.device.type
    outer = autocast_dtype is not None and not torch.is_autocast_enabled(kind)
    with torch.autocast(kind, dtype=autocast_dtype) if outer else contextlib.nullcontext():
        total, stats = chunked_loss(core, hidden, targets, config)
    count = num_tokens if num_tokens is not None else max(int(targets.labels.shape[0]), 1)
    value = total / count
    return (value, stats) if return_stats else value
