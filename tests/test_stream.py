"""The training stream: weighted mixing of caches and exact resumption."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import train_records, write_jsonl
from hpd_tools import CacheConfig, build_cache
from hpd_tools.stream import CacheStream


@pytest.fixture(scope="module")
def two_caches(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    records = train_records()
    out = []
    for name, part in (("a", records[:60]), ("b", records[60:120])):
        data = write_jsonl(root / f"{name}.jsonl", part)
        out.append(build_cache(CacheConfig(teacher=str(teacher), data=str(data), engine="hf", top_k=8, max_length=512, chunk_tokens=512, out=str(root / name))).location)
    return out


def test_batches_respect_the_token_budget(two_caches):
    stream = CacheStream(two_caches[:1], batch_tokens=600, seed=0)
    for _ in range(20):
        batch = stream.next_batch()
        b, t = batch.input_ids.shape
        assert b * t <= 600 or b == 1


def test_weights_set_the_mix(two_caches):
    stream = CacheStream(two_caches, weights=[3.0, 1.0], batch_tokens=400, seed=0)
    sources = np.concatenate([stream.next_batch().sources for _ in range(150)])
    share = (sources == 0).mean()
    assert 0.68 < share < 0.82  # 0.75 expected


def test_state_resumes_the_exact_sequence_of_batches(two_caches):
    a = CacheStream(two_caches, weights=[1.0, 2.0], batch_tokens=500, seed=4)
    for _ in range(70):  # into a second epoch
        a.next_batch()
    state = a.state()
    expected = [a.next_batch() for _ in range(25)]
    b = CacheStream(two_caches, weights=[1.0, 2.0], batch_tokens=500, seed=4)
    b.load_state(state)
    for want in expected:
        got = b.next_batch()
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.sources, want.sources)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
    assert state["sources"][0]["epoch"] >= 1 or state["sources"][1]["epoch"] >= 1


def test_every_sequence_once_per_epoch(two_caches):
    stream = CacheStream(two_caches[:1], batch_tokens=800, seed=1)
    seen = []
    while stream.sources[0].epoch == 0:
        seen.extend(stream.next_batch().indices.tolist())
    first_epoch = seen[: 60]
    assert sorted(first_epoch) == list(range(60))


@pytest.mark.parametrize("width", [None, 250])
def test_packed_batches_fill_the_budget_and_resume_exactly(two_caches, width):
    padded = CacheStream(two_caches, batch_tokens=600, seed=2)
    stream = CacheStream(two_caches, batch_tokens=600, seed=2, packed=True, pack_width=width)
    seen, fill, padded_fill = [], [], []
    while stream.sources[0].epoch == 0:
        batch = stream.next_batch()
        rows, width = batch.input_ids.shape
        assert rows * width <= 600 or len(batch.lengths) == 1
        at = 0
        for r in range(rows):  # each row: its sequences end to end, positions restarting at each
            starts = np.flatnonzero(batch.position_ids[r] == 0)
            for start in starts:
                end = starts[starts > start][0] if (starts > start).any() else width
                n = end - start
                if at < len(batch.lengths) and batch.lengths[at] == n and batch.loss_mask[r, start:end].any():
                    assert not batch.loss_mask[r, end - 1]  # no target crosses into the next sequence
                    at += 1
        assert at == len(batch.lengths)
        assert len(batch.sources) == len(batch.indices)
        seen.extend((int(s), int(i)) for s, i in zip(batch.sources, batch.indices) if s == 0)
        fill.append(batch.n_tokens / batch.input_ids.size)
        b = padded.next_batch()
        padded_fill.append(b.n_tokens / b.input_ids.size)
    assert {i for _, i in seen} == set(range(60))  # cache 0's epoch, all of it
    if width is None:  # one row: only the row's end is padding
        assert np.mean(fill) > np.mean(padded_fill)
    state = stream.state()
    expected = [stream.next_batch() for _ in range(10)]
    again = CacheStream(two_caches, batch_tokens=600, seed=2, packed=True, pack_width=width)
    again.load_state(state)
    for want in expected:
        got = again.next_batch()
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.sources, want.sources)


@pytest.fixture(scope="module")
def two_unit_cache(trained_teacher, tmp_path_factory):
    """A cache of 2 units, for runs with 4 data slots."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("small")
    records = train_records(16)
    tok = AutoTokenizer.from_pretrained(trained_teacher)
    n = sum(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in records)
    data = write_jsonl(root / "train.jsonl", records)
    cache = build_cache(CacheConfig(data=str(data), teacher=str(trained_teacher), out=str(root / "cache"), engine="hf", top_k=16, max_length=512,
                                    chunk_tokens=(n // 2 + 16) // 16 * 16)).location
    from hpd_tools.cache.layout import CacheStore

    assert CacheStore(cache).n_units == 2
    from test_distill import make_student

    return {"cache": cache, "student": make_student(trained_teacher, root / "student"), "root": root}


def test_small_cache_on_four_slots_two_processes_match_one(two_unit_cache, tmp_path):
    """2 units, 4 data slots: slots share the units by sequence, and 2 processes x
    --grad-accum 2 take the same steps as 1 process x --grad-accum 4."""
    import json

    from safetensors.torch import load_file

    from conftest import run_cli
    from test_distributed import torchrun

    def args(out, accum):
        return ["distill", "--cache", two_unit_cache["cache"], "--student", str(two_unit_cache["student"]), "--out", str(out), "--loss", "hpd",
                "--max-steps", "2", "--batch-tokens", "512", "--lr", "2e-3", "--loss-chunk-tokens", "128", "--seed", "3", "--grad-accum", str(accum)]

    one, two = tmp_path / "one", tmp_path / "two"
    result = run_cli(*args(one, 4))
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(*args(two, 2))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x] for run in (one, two)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2]
    for a, b in zip(*rows):
        assert a["response_tokens"] == b["response_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    pa, pb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    start = load_file(two_unit_cache["student"] / "model.safetensors")
    worst = max(float((pa[k] - pb[k]).abs().max()) for k in pa)
    moved = max(float((pa[k] - start[k]).abs().max()) for k in pa)
    assert worst < 2e-4 and moved > 50 * max(worst, 1e-6)
