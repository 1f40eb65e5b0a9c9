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
