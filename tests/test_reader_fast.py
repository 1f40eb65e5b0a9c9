"""The compact training path: trained rows in stored dtypes, decoded on the device.

Every comparison is against the dense path (every position in int64 ids and
float32 log-probs, ``dense_targets``), which the losses were tested on: the
compact path must give the same tensors to the bit and the same losses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields

import numpy as np
import pytest
import torch

from conftest import train_records, write_jsonl
from hpd_tools import CacheConfig, build_cache
from hpd_tools.cache.reader import CacheReader
from hpd_tools.losses import LOSSES, compute_loss
from hpd_tools.stream import CacheStream, StepStream, batch_targets, dense_targets


@pytest.fixture(scope="module")
def caches(teacher, tmp_path_factory):
    """Two caches of the tiny teacher (uint16 ids), many units, and one of a teacher
    whose logits are 65,544 wide (int32 ids, top-k ids past 65,535)."""
    from test_vocab_width import widen

    root = tmp_path_factory.mktemp("reader-fast")
    records = train_records()
    out = {}
    for name, part in (("a", records[:40]), ("b", records[40:70])):
        data = write_jsonl(root / f"{name}.jsonl", part)
        out[name] = build_cache(CacheConfig(teacher=str(teacher), data=str(data), engine="hf", top_k=8, max_length=512, chunk_tokens=512, out=str(root / name))).location
    wide = widen(teacher, root / "wide-teacher", 65544 - 1024, head_scale=3.0)
    data = write_jsonl(root / "w.jsonl", records[70:80])
    out["wide"] = build_cache(CacheConfig(teacher=str(wide), data=str(data), engine="hf", top_k=8, max_length=512, chunk_tokens=2048, out=str(root / "wide"))).location
    return out


def assert_same_targets(dense_batch, compact_batch) -> None:
    assert_equal(dense_targets(dense_batch, "cpu"), batch_targets(compact_batch, "cpu"))


def assert_equal(a, b) -> None:
    (ia, ta), (ib, tb) = a, b
    assert ia.keys() == ib.keys()
    for key in ia:
        if isinstance(ia[key], torch.Tensor):
            assert ia[key].dtype == ib[key].dtype and torch.equal(ia[key], ib[key]), key
    for f in fields(ta):
        a, b = getattr(ta, f.name), getattr(tb, f.name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), f.name


@pytest.mark.parametrize("packed", [False, True])
def test_compact_batches_give_the_dense_targets_to_the_bit(caches, packed):
    dense = CacheStream([caches["a"], caches["b"]], weights=[2.0, 1.0], batch_tokens=700, seed=3, packed=packed, compact=False)
    compact = CacheStream([caches["a"], caches["b"]], weights=[2.0, 1.0], batch_tokens=700, seed=3, packed=packed)
    for _ in range(40):  # past an epoch of cache b
        a, b = dense.next_batch(), compact.next_batch()
        for name in ("indices", "lengths", "input_ids", "loss_mask", "position_ids", "sources"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert b.payload is not None
        assert_same_targets(a, b)
    assert compact.sources[1].epoch >= 1


def test_losses_agree_on_both_paths(caches):
    dense = CacheStream([caches["a"]], batch_tokens=1024, seed=0, compact=False).next_batch()
    compact = CacheStream([caches["a"]], batch_tokens=1024, seed=0).next_batch()
    (_, ta), (_, tb) = dense_targets(dense, "cpu"), batch_targets(compact, "cpu")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(ta.labels.shape[0], 1024, generator=gen, dtype=torch.float64).float() * 3
    ta.noise = tb.noise = torch.rand(ta.labels.shape[0], generator=gen)
    for name in LOSSES:
        la, lb = compute_loss(name, logits, ta), compute_loss(name, logits, tb)
        assert la.n_tokens == lb.n_tokens > 0
        assert float(lb.loss_sum) == pytest.approx(float(la.loss_sum), rel=1e-6, abs=1e-6), name
        for key in la.stats:
            assert float(lb.stats[key]) == pytest.approx(float(la.stats[key]), rel=1e-6, abs=1e-6), (name, key)


def test_int32_ids(caches):
    reader = CacheReader(caches["wide"])
    assert reader.store.array("topk_ids").dtype == np.int32
    dense = CacheStream([caches["wide"]], batch_tokens=2048, seed=0, compact=False).next_batch()
    compact = CacheStream([caches["wide"]], batch_tokens=2048, seed=0).next_batch()
    assert compact.payload.segments["topk_ids"][1] == np.int32
    assert_same_targets(dense, compact)


def test_uint16_ids_above_32767_and_float32_labels():
    """The device reads uint16 as int16 and widens: ids up to 65,535 must come back
    as they are (the tiny teacher's ids stay below 1,024)."""
    from hpd_tools.cache import codec
    from hpd_tools.cache.reader import _UnitRows, assemble

    rng = np.random.default_rng(0)
    n, k = 40, 4
    mask = rng.random(n) < 0.6
    mask[[19, 39]] = False  # each sequence's last position trains nothing
    rows = np.flatnonzero(mask)
    unit = _UnitRows(first=0, starts=np.array([0, 20, 40]), trained=np.searchsorted(rows, [0, 20, 40]),
                     tokens=rng.integers(0, 65536, n).astype(np.int32), loss_mask=mask,
                     label_logprob=-rng.random(len(rows)).astype(np.float32), topk_head=-rng.random(len(rows)).astype(np.float16),
                     topk_ids=rng.integers(32000, 65536, (len(rows), k)).astype(np.uint16), topk_codes=np.sort(rng.integers(0, 256, (len(rows), k)), axis=1).astype(np.uint8),
                     example_ids=np.arange(2, dtype=np.uint64))
    batch = assemble([unit.sequence(0), unit.sequence(1)], k)
    _, t = batch_targets(batch, "cpu")
    np.testing.assert_array_equal(t.topk_ids.numpy(), unit.topk_ids.astype(np.int64))
    np.testing.assert_array_equal(t.label_logprob.numpy(), unit.label_logprob)
    np.testing.assert_array_equal(t.topk_logprobs.numpy(), codec.decode_logprobs(unit.topk_head, unit.topk_codes))
    np.testing.assert_array_equal(t.labels.numpy(), np.concatenate([unit.tokens[1:20], [0], unit.tokens[21:40], [0]])[np.flatnonzero(mask)])


def test_what_a_batch_ships(caches):
    dense = CacheStream([caches["a"]], batch_tokens=1024, seed=1, compact=False).next_batch()
    batch = CacheStream([caches["a"]], batch_tokens=1024, seed=1).next_batch()
    p = batch.payload
    trained = int(batch.loss_mask.sum())
    assert p.n_rows == trained and p.segments["topk_ids"][1] == np.uint16 and p.segments["topk_codes"][1] == np.uint8
    assert p.segments["topk_ids"][2] == (trained, 8)
    # About 3 bytes per top-k entry of a trained position, against 12 at every position.
    dense_bytes = sum(x.nbytes for x in (dense.input_ids, dense.loss_mask, dense.label_logprob, dense.topk_ids, dense.topk_logprobs))
    assert p.nbytes < dense_bytes / 4
    assert p.nbytes < trained * (3 * 8 + 8) + batch.input_ids.size * 4 + 7 * 16


def test_dense_fields_of_a_compact_batch(caches):
    dense = CacheStream([caches["a"]], batch_tokens=1024, seed=2, compact=False).next_batch()
    compact = CacheStream([caches["a"]], batch_tokens=1024, seed=2).next_batch()
    m = dense.loss_mask
    for name in ("topk_ids", "topk_logprobs", "label_logprob"):
        got = getattr(compact, name)
        assert got.shape == getattr(dense, name).shape and got.dtype == getattr(dense, name).dtype
        np.testing.assert_array_equal(got[m], getattr(dense, name)[m])
        assert not got[~m].any()  # positions that do not train hold 0
    # Arrays given explicitly replace the payload: they are what trains.
    zeros = np.zeros_like(dense.topk_logprobs)
    replaced = dataclasses.replace(compact, topk_logprobs=zeros)
    assert replaced.payload is None
    _, t = batch_targets(replaced, "cpu")
    assert not t.topk_logprobs.any()


def test_small_cache_shares_units_by_sequence(caches):
    """More slots than units: every slot takes its share of the sequences, the shares
    are disjoint and cover the epoch, and a slot's batches do not depend on which
    process holds it."""
    path = caches["wide"]
    reader = CacheReader(path)
    assert reader.store.n_units < 4
    orders = [CacheReader(path, seed=5, rank=r, world_size=4).order(0) for r in range(4)]
    assert all(len(o) for o in orders)
    assert sorted(np.concatenate(orders).tolist()) == list(range(len(reader)))
    one = StepStream([path], slots=[0, 1, 2, 3], n_slots=4, batch_tokens=512, seed=5)
    halves = [StepStream([path], slots=[0, 1], n_slots=4, batch_tokens=512, seed=5), StepStream([path], slots=[2, 3], n_slots=4, batch_tokens=512, seed=5)]
    for _ in range(6):
        got = halves[0].next_batch() + halves[1].next_batch()
        for want, b in zip(one.next_batch(), got):
            np.testing.assert_array_equal(want.indices, b.indices)
            assert_equal(batch_targets(want, "cpu"), batch_targets(b, "cpu"))


def test_more_slots_than_sequences_is_refused(caches):
    from hpd_tools.errors import HPDError

    n = len(CacheReader(caches["wide"]))
    with pytest.raises(HPDError, match=f"{n} sequences for {n + 1} data slots"):
        StepStream([caches["wide"]], slots=[0], n_slots=n + 1, batch_tokens=512)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_from_pinned_memory(caches):
    dense = CacheStream([caches["a"]], batch_tokens=1024, seed=0, compact=False).next_batch()
    batch = CacheStream([caches["a"]], batch_tokens=1024, seed=0).next_batch()
    assert batch.payload.buffer.is_pinned()
    (ia, ta), (ib, tb) = dense_targets(dense, "cpu"), batch_targets(batch, torch.device("cuda"))
    for f in fields(ta):
        a, b = getattr(ta, f.name), getattr(tb, f.name)
        assert b.is_cuda and torch.equal(a, b.cpu()), f.name
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(ia[key], ib[key].cpu())


def test_a_units_tail_is_read_once(caches):
    """A unit whose last sequence spills into the next chunk gets that tail from the
    next unit's read when the next unit comes first: fewer reads of spilled rows,
    the same rows."""
    reader = CacheReader(caches["a"], seed=0)
    spans: list[tuple[int, int]] = []
    rows = reader._rows
    reader._rows = lambda lo, hi, teacher, what: (spans.append((lo, hi)), rows(lo, hi, teacher, what))[1]  # count, then read
    compact = list(reader.sequences(0, form="compact"))
    dense = list(CacheReader(caches["a"], seed=0).sequences(0))
    # Each spilling unit's tail: rows from the next chunk's start to its last sequence's end.
    offsets = reader.offsets
    tails = set()
    for u in range(reader.store.n_units):
        start, end = reader.store.unit_range(u)
        first, last = np.searchsorted(offsets, [start, end])
        if first < last and offsets[last] > end:
            tails.add((end, int(offsets[last])))
    read_alone = [span for span in spans if span in tails]
    assert len(tails) >= 3 and len(read_alone) < len(tails)
    for c, d in zip(compact, dense):
        assert c.index == d.index
        np.testing.assert_array_equal(c.tokens, d.tokens)
        np.testing.assert_array_equal(c.unit.topk_ids[c.a : c.b], d.topk_ids[d.loss_mask])
