"""The pipelined cache writer: the same cache as the serial path, each sequence
scored once, a write thread's failure in one line, and a SIGKILL with units in
flight resumed to the same cache.

Real stores and real engines: the tiny teacher through the transformers engine,
and a replay engine holding that teacher's rows (a TeacherEngine, so builds
compare exactly: the transformers engine's last bits may depend on how a call
was batched)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import train_records, write_jsonl
from hpd_tools import CacheConfig, build_cache, verify_cache
from hpd_tools.cache import codec
from hpd_tools.cache.layout import CacheStore
from hpd_tools.engines.base import Scored, TeacherEngine
from hpd_tools.engines.hf import HFTeacher
from hpd_tools.errors import CacheError
from test_cache import arrays, assert_same_content

HERE = Path(__file__).resolve().parent
CHUNK = 64  # small units: many sequences cross a boundary, some span three units


class ReplayTeacher(TeacherEngine):
    """The rows of a real teacher, recorded once for whole sequences, returned at once;
    a prefix of a recorded sequence gets that sequence's first rows. ``delay``
    seconds per call keep a run long enough to be killed mid-way."""

    name = "replay"
    version = "0"

    def __init__(self, rows_file: Path, delay: float = 0.0):
        with np.load(rows_file) as z:
            offsets, self.vocab_size = z["offsets"], int(z["vocab_size"])
            tokens, label, ids, lp = z["tokens"], z["label"], z["ids"], z["lp"]
        self.rows: dict[bytes, Scored] = {}
        for s in range(len(offsets) - 1):
            t0, t1 = int(offsets[s]), int(offsets[s + 1])
            r0, r1 = t0 - s, t1 - s - 1  # a sequence of m tokens has m-1 rows
            self.rows[tokens[t0:t1].tobytes()] = Scored(label[r0:r1], ids[r0:r1], lp[r0:r1])
        self.delay = delay
        self.calls = 0

    def score(self, sequences, k):
        self.calls += 1
        time.sleep(self.delay)
        out = []
        for seq in sequences:
            key = np.asarray(seq, dtype=np.int32).tobytes()
            sc = self.rows.get(key) or next(v for full, v in self.rows.items() if full.startswith(key))
            m = len(seq) - 1
            out.append(Scored(sc.label_logprob[:m], sc.topk_ids[:m, :k], sc.topk_logprobs[:m, :k]))
        return out

    def close(self) -> None:
        pass


class RecordingHF(HFTeacher):
    """The transformers engine, keeping every sequence it was asked to score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[list[bytes]] = []

    def score(self, sequences, k):
        self.asked.append([np.asarray(s, dtype=np.int32).tobytes() for s in sequences])
        return super().score(sequences, k)


def cfg(teacher: Path, data: Path, out: Path, **kw) -> CacheConfig:
    return CacheConfig(teacher=str(teacher), data=str(data), engine="hf", top_k=16, max_length=512, chunk_tokens=CHUNK, reuse=False, out=str(out), **kw)


@pytest.fixture(scope="module")
def setup(teacher, tmp_path_factory):
    """Data, the tiny teacher's rows for it (recorded once) and the serial path's cache."""
    root = tmp_path_factory.mktemp("pipeline")
    data = write_jsonl(root / "d.jsonl", train_records(30))
    from hpd_tools.cache.writer import _load_tokenizer, make_plan
    from hpd_tools.data import read_examples

    examples, _ = read_examples(str(data), _load_tokenizer(str(teacher)), max_length=512)
    engine = HFTeacher(str(teacher), dtype="float32")
    scores = engine.score([e.tokens for e in examples], 16)
    layout = make_plan(examples, CHUNK)
    rows = root / "rows.npz"
    np.savez(rows, offsets=layout.offsets, tokens=layout.tokens, vocab_size=engine.vocab_size,
             label=np.concatenate([s.label_logprob for s in scores]), ids=np.concatenate([s.topk_ids for s in scores]),
             lp=np.concatenate([s.topk_logprobs for s in scores]))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HPD_CACHE_HOME", str(root / "home"))
        serial = build_cache(cfg(teacher, data, root / "serial", write_threads=0, units_in_flight=1), teacher=ReplayTeacher(rows))
    assert serial.complete and serial.units_total == layout.n_units >= 12
    return {"data": data, "rows": rows, "serial": serial, "layout": layout, "root": root}


def markers(out: Path) -> dict[int, dict]:
    return {int(p.name[5:13]): json.loads(p.read_text()) for p in sorted((out / "progress").glob("unit-*.json"))}


def test_pipelined_cache_equals_serial(teacher, setup, tmp_path):
    replay = ReplayTeacher(setup["rows"])
    out = tmp_path / "pipelined"
    result = build_cache(cfg(teacher, setup["data"], out, write_threads=2, units_in_flight=4), teacher=replay)
    serial = Path(setup["serial"].location)
    assert result.complete and result.units_computed == result.units_total
    assert_same_content(arrays(out), arrays(serial), exact=True)
    assert markers(out).keys() == markers(serial).keys()
    for unit, marker in markers(out).items():  # the same statistics and chunk checksums, unit by unit
        assert marker == markers(serial)[unit]
    CacheStore(out).read_markers(list(range(result.units_total)))
    assert verify_cache(out).complete and verify_cache(serial).complete
    assert result.tokens_scored == setup["serial"].tokens_scored == int(setup["layout"].offsets[-1])
    assert replay.calls <= -(-result.units_total // 2) + 1  # one call per window of units_in_flight // 2 units
    assert not list((out / "progress").glob("*.claim"))


def test_sequence_across_three_units_is_scored_once(teacher, setup, tmp_path):
    layout = setup["layout"]
    engine = RecordingHF(str(teacher), dtype="float32")
    out = tmp_path / "hf"
    result = build_cache(cfg(teacher, setup["data"], out, write_threads=2, units_in_flight=6), teacher=engine)
    asked = [key for call in engine.asked for key in call]
    assert len(asked) == len(set(asked)) == len(layout.offsets) - 1  # every sequence once, none twice
    assert result.tokens_scored == sum(len(key) // 4 for key in asked) == int(layout.offsets[-1])
    units = [(int(layout.offsets[s]) // CHUNK, (int(layout.offsets[s + 1]) - 1) // CHUNK) for s in range(len(layout.offsets) - 1)]
    long = next(s for s, (first, last) in enumerate(units) if last - first >= 2)
    o0, o1 = int(layout.offsets[long]), int(layout.offsets[long + 1])
    assert layout.tokens[o0:o1].tobytes() in asked  # the whole sequence, in one request
    # A crossing sequence is scored alone by this engine (writer.py: calls), so its rows
    # are exactly those of scoring it by itself, split over its three units.
    alone = HFTeacher(str(teacher), dtype="float32").score([layout.tokens[o0:o1]], 16)[0]
    got = arrays(out)
    np.testing.assert_array_equal(got["label_logprob"][o0 : o1 - 1], alone.label_logprob.astype(np.float16))
    mask = layout.loss_mask[o0 : o1 - 1]
    assert mask.any()
    head, codes = codec.encode_logprobs(alone.topk_logprobs[mask])
    np.testing.assert_array_equal(got["topk_ids"][o0 : o1 - 1][mask], alone.topk_ids[mask])
    np.testing.assert_array_equal(got["topk_head"][o0 : o1 - 1][mask], head)
    np.testing.assert_array_equal(got["topk_logprobs"][o0 : o1 - 1][mask], codes)
    assert_same_content(got, arrays(setup["serial"].location), exact=False)
    assert verify_cache(out).complete


class BlockingReplay(ReplayTeacher):
    """Puts a folder where one unit's chunk file goes once the cache exists: a real
    filesystem failure (EISDIR) in the write thread that writes that unit."""

    def __init__(self, rows_file: Path, blocker: Path):
        super().__init__(rows_file)
        self.blocker = blocker

    def score(self, sequences, k):
        self.blocker.mkdir(parents=True, exist_ok=True)
        return super().score(sequences, k)


def test_write_thread_failure_is_one_line_and_keeps_finished_units(teacher, setup, tmp_path):
    out = tmp_path / "c"
    bad = 5
    blocker = out / "topk_ids" / "c" / str(bad) / "0"
    with pytest.raises(CacheError, match=rf"writing unit {bad} failed .*units already written are kept") as caught:
        build_cache(cfg(teacher, setup["data"], out, write_threads=2, units_in_flight=4), teacher=BlockingReplay(setup["rows"], blocker))
    assert "\n" not in str(caught.value)
    kept = markers(out)
    assert kept and bad not in kept
    assert set(range(bad)) <= set(kept)  # the units before it were written in the window before
    assert not list(out.rglob("*.partial")) and not list((out / "progress").glob("*.claim"))
    report = verify_cache(out)
    assert not report.complete and report.units_checked == len(kept)
    blocker.rmdir()
    again = build_cache(cfg(teacher, setup["data"], out, write_threads=2, units_in_flight=4), teacher=ReplayTeacher(setup["rows"]))
    assert again.complete and again.units_computed == again.units_total - len(kept)
    assert_same_content(arrays(out), arrays(setup["serial"].location), exact=True)


KILLED_WRITER = """
import sys
sys.path.insert(0, {here!r})
from test_write_pipeline import ReplayTeacher, cfg
from hpd_tools import build_cache
build_cache(cfg({teacher!r}, {data!r}, {out!r}, write_threads=2, units_in_flight=4), teacher=ReplayTeacher({rows!r}, delay=0.4))
"""


def test_sigkilled_writer_with_units_in_flight_resumes_to_identical_cache(teacher, setup, tmp_path):
    out = tmp_path / "killed"
    script = KILLED_WRITER.format(here=str(HERE), teacher=str(teacher), data=str(setup["data"]), out=str(out), rows=str(setup["rows"]))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    claimed: set[int] = set()
    while proc.poll() is None and time.time() < deadline:
        if (out / "progress").is_dir():
            done = markers(out)
            claimed = {int(p.name[5:13]) for p in (out / "progress").glob("unit-*.claim")}
            if len(done) >= 4 and claimed - set(done):
                break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    done_before = len(markers(out))
    total = setup["serial"].units_total
    assert 4 <= done_before < total and claimed, "the writer must be killed with units in flight"

    resumed = build_cache(cfg(teacher, setup["data"], out, write_threads=2, units_in_flight=4), teacher=ReplayTeacher(setup["rows"]))
    assert resumed.complete and resumed.units_computed == total - done_before
    assert_same_content(arrays(out), arrays(setup["serial"].location), exact=True)
    assert verify_cache(out).complete
