"""The whole CLI against a corpus of bad inputs and damaged caches, as one table.

Every row is one `hpd-tools` command line: bad data files (whole-file problems
from tests/test_data_errors.py's BAD_FILES plus records of the wrong shape),
bad options of `cache` and `distill`, bad output locations, and `verify`,
`info` and `distill` over copies of one small good cache damaged by
tests/test_corruption.py's CORRUPTIONS (plus a few more). For each row:

- the exit code is the documented one: 2 for a user error (`error: ...`,
  values click parses itself included), 1 for a cache
  `verify` finds damaged, 0 for the inputs that must work (a BOM file, a
  rerun of a complete cache, a run into a new folder);
- no traceback, no uncaught exception; the error is one line, the last on
  stderr, and says what it must;
- nothing outside the row's own output changed: every file of the teacher,
  student, caches, data files and pre-existing folders is hashed before the
  run and after every row;
- distill on a damaged cache trains nothing: no checkpoint, no final/, no
  metrics row with a loss.

The rows run inside one process (tests/fuzz_driver.py, the real click command
through CliRunner): starting the CLI costs seconds, a row far less. A row that
imports vLLM runs as its own `hpd-tools` process (the CLI ends such a process
with os._exit).
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import ROOT, run_cli, train_records, write_jsonl
from fuzz_driver import changed, digest_all
from test_corruption import CORRUPTIONS, VERIFY_ONLY, _chunk, _edit_attrs, _flip, _swap
from test_data_errors import BAD_FILES, JSONL_TEXT, RECORDS

DRIVER = Path(__file__).with_name("fuzz_driver.py")
EXIT = {"ok": 0, "error": 2, "verify": 1}


@dataclass
class Case:
    """One command line. ``argv`` items are templates: ``{name}`` is a path of the
    world built below, ``{out}`` the row's own output (a path under its own folder,
    which is also its $HPD_CACHE_HOME)."""

    id: str
    argv: list[str]
    expect: str  # ok | error | verify
    match: str = ""  # regex the error line must contain (re.search)
    fragments: tuple[str, ...] = ()  # literal pieces the error line must hold
    stdout: str = ""  # regex stdout must contain (ok rows)
    stderr: str = ""  # regex stderr must contain
    corrupt: bool = False  # distill on a damaged cache: nothing may be trained
    guard: tuple[str, ...] = ()  # world paths (outputs of earlier rows) this row must leave as they are
    own_process: bool = False  # imports vLLM: run as its own process
    xfail: str = ""  # a known bug: the reason


TEACHER = ["--teacher", "{teacher}"]
CACHE = ["cache", "--engine", "hf", *TEACHER, "--top-k", "8", "--max-length", "256", "--chunk-tokens", "256"]
GOOD_CACHE = [*CACHE, "--data", "{train}"]
DISTILL = ["distill", "--cache", "{cache}", "--student", "{student}", "--loss", "fkl", "--max-steps", "3", "--batch-tokens", "1024"]


# -- data files -------------------------------------------------------------------------

def _text(name: str, text: str):
    return lambda folder: _bytes(folder / name, text.encode())


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _lines(name: str, rows: list) -> Callable[[Path], Path]:
    return _text(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


PROMPT = RECORDS[0]["prompt"]
LATIN1 = "".join(json.dumps({"prompt": "café", "response": "déjà vu"}, ensure_ascii=False) + "\n" for _ in range(3)).encode("latin-1")
NOTHING = ("nothing to cache",)
# (id, build(folder) -> path, fragments of the error line)
SHAPES = [
    ("json: an object, not a list", _text("obj.json", json.dumps({"prompt": PROMPT, "response": "x"})), ("expected a JSON list of records",)),
    ("json: a number", _text("num.json", "42"), ("expected a JSON list of records",)),
    ("json: a list of numbers", _text("nums.json", "[1, 2, 3]"), NOTHING),
    ("jsonl: lines are lists", _lines("lists.jsonl", [[1, 2], ["a"]]), NOTHING),
    ("jsonl: malformed JSON", _lines("broken.jsonl", ['{"prompt": "a", "response": ', "{oops"]), NOTHING),
    ("jsonl: fields missing", _lines("nofields.jsonl", [{"question": PROMPT, "answer": "x"}]), NOTHING),
    ("jsonl: response missing", _lines("noresp.jsonl", [{"prompt": PROMPT}]), NOTHING),
    ("jsonl: content not a string", _lines("nonstr.jsonl", [{"prompt": 1, "response": 2}, {"prompt": ["a"], "response": {"b": 1}}]), NOTHING),
    ("jsonl: content null", _lines("null.jsonl", [{"prompt": None, "response": None}]), NOTHING),
    ("jsonl: empty responses", _lines("emptyresp.jsonl", [{"prompt": PROMPT, "response": ""}, {"prompt": PROMPT, "response": "   "}]), NOTHING),
    ("jsonl: messages without an assistant turn", _lines("noassist.jsonl", [{"messages": [{"role": "user", "content": PROMPT}]}]), NOTHING),
    ("jsonl: messages not a list", _lines("msgstr.jsonl", [{"messages": "hello"}]), NOTHING),
    ("jsonl: message without role", _lines("norole.jsonl", [{"messages": [{"content": PROMPT}, {"content": "x"}]}]), NOTHING),
    ("jsonl: all lines latin-1", lambda f: _bytes(f / "latin1.jsonl", LATIN1), ("nothing to cache", "not valid UTF-8")),
    ("missing file", lambda f: f / "no-such.jsonl", ("no-such.jsonl",)),
    ("an unknown suffix", _text("data.csv", "prompt,response\na,b\n"), ("data.csv",)),
    ("an empty folder", lambda f: (f / "empty-dir").mkdir() or f / "empty-dir", ("empty-dir",)),
]
GOOD_FILES = [
    ("utf8 BOM: every record kept", lambda f: _bytes(f / "bom.jsonl", codecs.BOM_UTF8 + JSONL_TEXT.encode())),
    ("utf16 with BOM reads", lambda f: _bytes(f / "utf16.jsonl", JSONL_TEXT.encode("utf-16"))),
]
DATA_FILES = ({f"data_{i}": b[1] for i, b in enumerate(BAD_FILES)} | {f"shape_{i}": s[1] for i, s in enumerate(SHAPES)}
              | {f"good_{i}": g[1] for i, g in enumerate(GOOD_FILES)})


def _cache_on(data: str, *extra: str) -> list[str]:
    return [*CACHE, *extra, "--data", data, "--out", "{out}"]


DATA_CASES = (
    [Case(f"data: {name}", _cache_on(f"{{data_{i}}}"), "error", fragments=tuple(frags)) for i, (name, _, frags) in enumerate(BAD_FILES)]
    + [Case(f"data: {name}", _cache_on(f"{{shape_{i}}}"), "error", fragments=frags) for i, (name, _, frags) in enumerate(SHAPES)]
    # With --strict the first bad row stops the run, named by the file.
    + [Case(f"data strict: {name}", _cache_on(f"{{shape_{i}}}", "--strict"), "error", fragments=(f"{{shape_{i}}}",))
       for i, (name, _, _) in enumerate(SHAPES) if name.startswith("jsonl: ") and name != "jsonl: all lines latin-1"]
    + [Case(f"data: {name}", _cache_on(f"{{good_{i}}}", "--json"), "ok", stdout=rf'"sequences": {len(RECORDS)},') for i, (name, _) in enumerate(GOOD_FILES)]
    + [
        Case("data: the teacher's folder", _cache_on("{teacher}"), "error", fragments=("not a saved `datasets` folder",)),
        Case("data: --messages-field that no record has", _cache_on("{train}", "--messages-field", "conversation"), "error", fragments=NOTHING),
    ]
)

# -- options ----------------------------------------------------------------------------

CACHE_OPTIONS = [
    (["--batch-tokens", "0"], "error", r"^error: --batch-tokens 0: must be at least 1"),
    (["--batch-tokens", "-5"], "error", r"^error: --batch-tokens -5"),
    (["--top-k", "0"], "error", r"^error: --top-k 0: must be at least 1"),
    (["--top-k", "-3"], "error", r"^error: --top-k -3"),
    (["--top-k", "5000"], "error", r"^error: --top-k 5000: larger than the teacher's vocabulary"),
    (["--max-length", "1"], "error", r"^error: --max-length 1: must be at least 2"),
    (["--max-length", "100000"], "error", r"^error: --max-length 100000: the teacher's context"),
    (["--chunk-tokens", "1"], "error", r"^error: --chunk-tokens 1: must be at least 16"),
    (["--chunk-tokens", "0"], "error", r"^error: --chunk-tokens 0"),
    (["--seed", "-1"], "error", r"^error: --seed -1"),
    (["--workers", "0"], "error", r"^error: --workers 0: must be at least 1"),
    (["--gpus-per-worker", "0"], "error", r"^error: --gpus-per-worker 0"),
    (["--vllm-arg", "enforce_eager=true"], "error", r"^error: --vllm-arg enforce_eager: the hf engine .* takes no engine options"),
    (["--vllm-arg", "no-equals-sign"], "error", r"^error: --vllm-arg 'no-equals-sign': expected KEY=VALUE"),
    (["--config", "{nowhere}.yaml"], "error", r"^error: .*nowhere\.yaml"),
    (["--config", "{bad_yaml}"], "error", r"^error: --config .*bad\.yaml line 2: not valid YAML"),
    (["--config", "{unknown_yaml}"], "error", r"^error: .*no_such_field"),
    # Values click itself parses: one line naming the option, exit 2, like every other user error.
    (["--shard", "3/2"], "error", r"'--shard'.*3/2"),
    (["--shard", "0/0"], "error", r"'--shard'"),
    (["--shard", "x"], "error", r"'--shard'"),
    (["--top-k", "abc"], "error", r"'--top-k'"),
    (["--engine", "tensorrt"], "error", r"'--engine'"),
    (["--dtype", "int4"], "error", r"'--dtype'"),
    (["--no-such-option"], "error", r"--no-such-option"),
]
TEACHERLESS = ["cache", "--engine", "hf", "--data", "{train}", "--out", "{out}", "--teacher"]
CACHE_OPTION_CASES = [Case(f"cache {' '.join(a)}", [*GOOD_CACHE, *a, "--out", "{out}"], expect, match=m) for a, expect, m in CACHE_OPTIONS] + [
    Case("cache --teacher missing", [*TEACHERLESS, "{nowhere}"], "error", match=r"^error: --teacher .*: no such folder"),
    Case("cache --teacher a folder without config.json", [*TEACHERLESS, "{notes}"], "error", match=r"^error: --teacher .*: no config.json"),
    Case("cache --teacher the cache", [*TEACHERLESS, "{cache}"], "error", match=r"^error: --teacher .*: no config.json"),
    # An unknown --vllm-arg with the vllm engine imports vLLM (a process of its own, seconds):
    # tests/test_engine_options.py runs that command line once, with these checks.
]

DISTILL_OPTIONS = [
    (["--lr", "nan"], r"^error: --lr nan: must be a positive finite number"),
    (["--lr", "inf"], r"^error: --lr inf"),
    (["--lr", "-1"], r"^error: --lr -1.0: must be a positive finite number"),
    (["--lr", "0"], r"^error: --lr 0.0"),
    (["--batch-tokens", "1"], r"^error: --batch-tokens 1: must be an integer of at least 2"),
    (["--batch-tokens", "0"], r"^error: --batch-tokens 0"),
    (["--save-every", "-1"], r"^error: --save-every -1"),
    (["--max-steps", "0"], r"^error: --max-steps 0"),
    (["--grad-accum", "0"], r"^error: --grad-accum 0"),
    (["--log-every", "0"], r"^error: --log-every 0"),
    (["--warmup-steps", "-1"], r"^error: --warmup-steps -1"),
    (["--warmup-steps", "9"], r"^error: --warmup-steps 9: must be between 0 and --max-steps 3"),
    (["--min-lr-ratio", "2"], r"^error: --min-lr-ratio 2.0"),
    (["--weight-decay", "nan"], r"^error: --weight-decay nan"),
    (["--max-grad-norm", "0"], r"^error: --max-grad-norm 0.0"),
    (["--betas", "0.9", "1.0"], r"^error: --betas 0.9 1.0"),
    (["--cache-weight", "nan"], r"^error: --cache-weight nan"),
    (["--cache-weight", "1", "--cache-weight", "2"], r"^error: --cache-weight: 2 weights for 1 caches"),
    (["--loss-chunk-tokens", "0"], r"^error: --loss-chunk-tokens 0"),
    (["--loss-option", "nonsense"], r"^error: --loss-option 'nonsense': expected KEY=VALUE"),
    (["--loss-option", "tail=bogus"], r"^error: --loss-option tail=bogus: .*not one of"),
    (["--loss-option", "nope=1"], r"^error: --loss-option nope: --loss fkl has no such option"),
    (["--eval-every", "5"], r"^error: --eval-every needs --eval-cache"),
    (["--eval-batches", "-1"], r"^error: --eval-batches -1"),
    (["--sample-every", "2"], r"^error: --sample-every needs --online-teacher"),
    (["--online-teacher", "{teacher}"], r"^error: --online-teacher needs --sample-every"),
    (["--sample-temperature", "0"], r"^error: --sample-temperature 0.0"),
    (["--onpolicy-weight", "1.5"], r"^error: --onpolicy-weight 1.5"),
    (["--pack-width", "64"], r"^error: --pack-width 64: give a positive width, with --pack"),
    (["--eval-cache", "{nowhere}"], r"^error: .*nowhere"),
    (["--config", "{unknown_yaml}"], r"^error: .*no_such_field"),
]
DISTILL_USAGE = [
    (["--loss", "nonsense"], r"'--loss'"),
    (["--lr", "fast"], r"'--lr'"),
    (["--max-steps", "1.5"], r"'--max-steps'"),
    (["--betas", "0.9"], r"--betas"),
    (["--dtype", "float8"], r"'--dtype'"),
]


def _distill(cache: str = "{cache}", student: str = "{student}") -> list[str]:
    return ["distill", "--cache", cache, "--student", student, "--max-steps", "3", "--out", "{out}"]


DISTILL_OPTION_CASES = (
    [Case(f"distill {' '.join(a)}", [*DISTILL, *a, "--out", "{out}"], "error", match=m) for a, m in DISTILL_OPTIONS]
    + [Case(f"distill {' '.join(a)}", [*DISTILL, *a, "--out", "{out}"], "error", match=m) for a, m in DISTILL_USAGE]
    + [
        Case("distill without --out", DISTILL, "error", match=r"^error: --out: required"),
        Case("distill without --cache", ["distill", "--student", "{student}", "--out", "{out}"], "error", match=r"^error: --cache: required"),
        Case("distill without --student", ["distill", "--cache", "{cache}", "--out", "{out}"], "error", match=r"^error: --student: required"),
        Case("distill --cache missing", _distill(cache="{nowhere}"), "error", match=r"^error: .*nowhere"),
        Case("distill --cache a data file", _distill(cache="{train}"), "error", match=r"^error: .*train\.jsonl"),
        Case("distill --cache a model folder", _distill(cache="{teacher}"), "error", match=r"^error: .*: not an hpd-tools cache"),
        Case("distill --student missing", _distill(student="{nowhere}"), "error", match=r"^error: --student .*: no such folder"),
        Case("distill --student a folder without a model", _distill(student="{notes}"), "error", match=r"^error: --student"),
        Case("distill --student of another tokenizer", _distill(student="{stranger}"), "error", match=r"^error: --cache .*tokenizer .*the student must share"),
    ]
)

# -- output locations -------------------------------------------------------------------

OUT = r"^error: --out .*: "
HOME_UNDER_FILE = "cache $HPD_CACHE_HOME under a file"
NOT_A_CACHE = OUT + "exists and is not an hpd-tools cache"
OUT_CASES = [
    Case("distill --out the student folder", [*DISTILL, "--out", "{student}"], "error", match=OUT + "is the --student folder"),
    Case("distill --out the cache folder", [*DISTILL, "--out", "{cache}"], "error", match=OUT + "is the --cache folder"),
    Case("distill --out inside the cache", [*DISTILL, "--out", "{cache}/run"], "error", match=OUT + "is inside the --cache folder"),
    Case("distill --out another cache", [*DISTILL, "--out", "{corrupt_root}/good"], "error", match=OUT + "is the hpd-tools cache"),
    Case("distill --out a non-empty unrelated folder", [*DISTILL, "--out", "{notes}"], "error", match=OUT + r"not empty \(todo.txt\) and not a distill run"),
    Case("distill --out under a regular file", [*DISTILL, "--out", "{blocker}/run"], "error", match=OUT + "under .*blocker.txt, which is a file"),
    Case("distill --out a regular file", [*DISTILL, "--out", "{blocker}"], "error", match=OUT + "a file, not a folder"),
    Case("distill --out a model folder", [*DISTILL, "--out", "{teacher}"], "error", match=OUT + "holds a model"),
    Case("distill --out the folder holding the inputs", [*DISTILL, "--out", "{inputs}"], "error", match=r"^error: --(out|student|cache) "),
    Case("distill --out a run folder with a bad marker", [*DISTILL, "--out", "{bad_marker}"], "error", match=OUT + "hpd-run.json is not a distill run marker"),
    Case("distill --out s3://", [*DISTILL, "--out", "s3://bucket/run"], "error", match=r"^error: --out s3://bucket/run: the run folder must be a local path"),
    Case("cache --out a non-empty unrelated folder", [*GOOD_CACHE, "--out", "{notes}"], "error", match=NOT_A_CACHE),
    Case("cache --out under a file", [*GOOD_CACHE, "--out", "{blocker}/c"], "error", match=r"^error: --out .*blocker.txt is a file, not a folder"),
    Case("cache --out a regular file", [*GOOD_CACHE, "--out", "{blocker}"], "error", match=r"^error: --out "),
    Case("cache --out the teacher folder", [*GOOD_CACHE, "--out", "{teacher}"], "error", match=NOT_A_CACHE),
    Case("cache --out the student folder", [*GOOD_CACHE, "--out", "{student}"], "error", match=NOT_A_CACHE),
    Case("cache --out another cache with other inputs", [*CACHE, "--data", "{other}", "--out", "{cache}"], "error", match=OUT + "holds a cache for other inputs"),
    Case("cache --out a damaged cache with other inputs", [*CACHE, "--data", "{other}", "--out", "{corrupt_0}"], "error", match=OUT + "holds a cache for other inputs"),
    Case("cache --out the same cache, same inputs (already complete)", [*GOOD_CACHE, "--out", "{cache}"], "ok", stderr=r"already complete: no teacher work"),
    Case(HOME_UNDER_FILE, ["--verbose", *GOOD_CACHE], "error",  # its env is set in _spec
         match=r"^error: the cache root .*blocker.txt/home \(\$HPD_CACHE_HOME\): .*is a file, not a folder"),
    Case("verify a folder that is not a cache", ["verify", "{notes}"], "error", match=r"^error: .*notes"),
    Case("verify a missing path", ["verify", "{nowhere}"], "error", match=r"^error: .*nowhere"),
    Case("info a missing path", ["info", "{nowhere}"], "error", match=r"^error: .*nowhere"),
    Case("list a root holding a damaged cache", ["list", "--root", "{corrupt_root}"], "ok", stdout=r"damaged"),
]

# -- runs: a good one, then what may not be done to it -------------------------------------


def _run(*extra: str, cache: str = "{cache}", loss: str = "fkl", steps: str = "2") -> list[str]:
    return ["distill", "--cache", cache, "--student", "{student}", "--loss", loss, "--max-steps", steps, "--batch-tokens", "1024", *extra,
            "--out", "{run_ok}"]


EARLIER = ("run_ok",)
RUN_CASES = [
    Case("distill a good run into a new folder", _run("--save-every", "1"), "ok", stdout=r"final"),
    Case("distill --out an earlier run without --resume", _run(), "error", match=OUT + "holds an earlier run; pass --resume", guard=EARLIER),
    Case("distill --resume with another --lr", _run("--resume", "--lr", "1e-3"), "error", match=r"^error: --resume .*--lr 0.001", guard=EARLIER),
    Case("distill --resume with another --loss", _run("--resume", loss="sft"), "error", match=r"^error: --resume .*--loss fkl.*--loss sft", guard=EARLIER),
    Case("distill --resume --max-steps below the checkpoint", _run("--resume", steps="1"), "error", match=r"^error: --max-steps 1", guard=EARLIER),
    Case("distill --resume on a damaged cache", _run("--resume", cache="{corrupt_0}", steps="4"), "error",
         match=r"^error: .*label_logprob.*unit 1.*missing", guard=EARLIER),
    # --resume with no checkpoint yet starts the run (a run killed before its first checkpoint reruns with the same command).
    Case("distill --resume into an empty folder starts the run", [*_run("--resume")[:-1], "{empty_out}"], "ok", stdout=r"final"),
]

# -- damaged caches ---------------------------------------------------------------------

EXTRA_CORRUPTIONS = [
    ("delete topk_logprobs chunk", lambda c: _chunk(c, "topk_logprobs", 0).unlink(), r"topk_logprobs.*missing"),
    ("flip a byte of loss_mask", lambda c: _flip(_chunk(c, "loss_mask", 1), 0.6), r"loss_mask.*checksum"),
    ("flip a byte of offsets", lambda c: _flip(_chunk(c, "offsets", 0), 0.5), r"offsets.*checksum"),
    ("flip a byte of topk_head", lambda c: _flip(_chunk(c, "topk_head", 0), 0.4), r"topk_head.*checksum"),
    ("truncate tokens to one byte", lambda c: _chunk(c, "tokens", 1).write_bytes(_chunk(c, "tokens", 1).read_bytes()[:1]), r"tokens.*unit 1"),
    ("swap loss_mask chunks", lambda c: _swap(_chunk(c, "loss_mask", 0), _chunk(c, "loss_mask", 2)), r"loss_mask.*(checksum|bytes, \d+ were written)"),
    ("topk_ids chunk replaced by label_logprob's", lambda c: shutil.copy(_chunk(c, "label_logprob", 0), _chunk(c, "topk_ids", 0)), r"topk_ids.*unit 0"),
    ("attribute complete set false", lambda c: _edit_attrs(c, lambda a: a.__setitem__("complete", False)), r"(?i)incomplete|complete"),
    ("attribute chunk_tokens edited", lambda c: _edit_attrs(c, lambda a: a.__setitem__("chunk_tokens", 100)),
     r"attribute 'n_units' is \d+, but \d+ tokens in units of 100"),
    ("attributes emptied", lambda c: _edit_attrs(c, lambda a: [a.pop(k) for k in list(a)]), r"attribute|not an hpd-tools cache"),
    ("checksums folder deleted", lambda c: shutil.rmtree(c / "checksums"), r"checksums"),
    ("tokens array deleted", lambda c: shutil.rmtree(c / "tokens"), r"tokens"),
]
DAMAGE = CORRUPTIONS + EXTRA_CORRUPTIONS
VERIFY_DAMAGE = DAMAGE + VERIFY_ONLY
ATTRIBUTE_DAMAGE = {"attribute counts removed", "attribute top_k garbled", "attribute n_units wrong", "unknown codec", "checksums attribute removed",
                    "zarr.json garbled", "attribute chunk_tokens edited", "attributes emptied"}
# A cache marked incomplete: verify checks what is written and says, as its last line, that it is incomplete (exit 1).
INCOMPLETE = {"attribute complete set false"}

CORRUPTION_CASES = (
    [Case(f"verify: {name}", ["verify", f"{{corrupt_{i}}}"], "verify", match=pattern) for i, (name, _, pattern) in enumerate(VERIFY_DAMAGE)]
    + [Case(f"distill: {name}", [*DISTILL[:2], f"{{corrupt_{i}}}", *DISTILL[3:], "--out", "{out}"], "error", match=pattern, corrupt=True)
       for i, (name, _, pattern) in enumerate(DAMAGE)]
    + [Case(f"info: {name}", ["info", f"{{corrupt_{i}}}"], "error", match=pattern) for i, (name, _, pattern) in enumerate(DAMAGE) if name in ATTRIBUTE_DAMAGE]
    # A new cache over more records finds the damaged donor in its cache root, scores its rows again, and verifies.
    + [Case("cache reusing rows from a damaged donor", [*CACHE, "--data", "{more}", "--out", "{donor_out}"], "ok", stdout=r"donor-out",
            stderr=r"not reusing rows from .*donor-home.*label_logprob' unit 1 .*checksum mismatch", guard=("donor",)),
       Case("verify the cache grown from a damaged donor", ["verify", "{donor_out}"], "ok", stderr=r"ok: \d+ units")]
)

GROUPS = {"bad data files": DATA_CASES, "bad options": CACHE_OPTION_CASES + DISTILL_OPTION_CASES, "bad output locations": OUT_CASES + RUN_CASES,
          "damaged caches": CORRUPTION_CASES}
CASES = [c for group in GROUPS.values() for c in group]
# Rows of the generated tables that find a bug: kept, marked, reported to the owner.
KNOWN_BUGS: dict[str, str] = {}
for _case in CASES:
    _case.xfail = KNOWN_BUGS.get(_case.id, _case.xfail)
assert set(KNOWN_BUGS) <= {c.id for c in CASES}
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# -- the world: inputs built once, damaged copies, the run ---------------------------------

@pytest.fixture(scope="module")
def world(teacher, tmp_path_factory) -> dict:
    from conftest import build_tiny_teacher
    from hpd_tools import CacheConfig, build_cache
    from test_distill import make_student

    root = tmp_path_factory.mktemp("fuzz")
    inputs, outs = root / "inputs", root / "outs"
    inputs.mkdir()
    outs.mkdir()
    p: dict[str, Path] = {"teacher": teacher, "inputs": inputs, "nowhere": root / "nowhere"}
    records = train_records(30)
    p["train"] = write_jsonl(inputs / "train.jsonl", records[:24])
    p["other"] = write_jsonl(inputs / "other.jsonl", records[24:])
    p["more"] = write_jsonl(inputs / "more.jsonl", records[:28])
    common = dict(teacher=str(teacher), engine="hf", top_k=8, max_length=256, chunk_tokens=256)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPD_CACHE_HOME", str(root / "setup-home"))
        built = build_cache(CacheConfig(data=str(p["train"]), out=str(inputs / "cache"), **common))
        assert built.complete and built.units_total >= 4
        p["cache"] = Path(built.location)
        # A donor in the cache root of the reuse row: complete, one chunk flipped.
        # (Outside the protected inputs: the row writes the teacher's hash memo into its cache root; the donor is guarded.)
        donor = build_cache(CacheConfig(data=str(p["train"]), out=str(root / "donor-home" / built.key), **common))
        _flip(_chunk(Path(donor.location), "label_logprob", 1))
    p["donor_home"], p["donor"] = root / "donor-home", Path(donor.location)
    p["donor_out"] = outs / "donor-out"
    p["student"] = make_student(teacher, inputs / "student")
    p["stranger"] = build_tiny_teacher(inputs / "stranger", vocab=600, seed=3, layers=1)  # another tokenizer
    p["notes"] = inputs / "notes"
    p["notes"].mkdir()
    (p["notes"] / "todo.txt").write_text("mine")
    p["blocker"] = inputs / "blocker.txt"
    p["blocker"].write_text("mine")
    p["bad_marker"] = inputs / "bad-marker"
    p["bad_marker"].mkdir()
    (p["bad_marker"] / "hpd-run.json").write_text("{}")
    p["bad_yaml"] = inputs / "bad.yaml"
    p["bad_yaml"].write_text("lr: [1, 2\n  : :")
    p["unknown_yaml"] = inputs / "unknown.yaml"
    p["unknown_yaml"].write_text("no_such_field: 3\n")
    p["run_ok"] = outs / "run-ok"
    p["empty_out"] = outs / "empty-out"
    p["empty_out"].mkdir()
    for key, build in DATA_FILES.items():
        folder = inputs / "data" / key
        folder.mkdir(parents=True)
        p[key] = build(folder)
    for i, (_, corrupt, _) in enumerate(VERIFY_DAMAGE):
        copy = inputs / "damaged" / str(i)
        shutil.copytree(p["cache"], copy)
        corrupt(copy)
        p[f"corrupt_{i}"] = copy
    p["corrupt_root"] = inputs / "root-with-damage"
    shutil.copytree(p["cache"], p["corrupt_root"] / "good")
    shutil.copytree(p["corrupt_root"] / "good", p["corrupt_root"] / "bad")
    _edit_attrs(p["corrupt_root"] / "bad", lambda a: a.pop("counts"))
    return {"root": root, "inputs": inputs, "outs": outs, "paths": {k: str(v) for k, v in p.items()}, "protected": [str(inputs), str(teacher)]}


def _spec(case: Case, index: int, world: dict) -> dict:
    own = Path(world["outs"]) / f"{index:03d}"
    values = {**world["paths"], "out": str(own / "out")}
    home = own / "home"
    env = {"HPD_CACHE_HOME": str(home)}
    if case.id == HOME_UNDER_FILE:
        env["HPD_CACHE_HOME"] = str(Path(world["paths"]["blocker"]) / "home")
    if case.id == "cache reusing rows from a damaged donor":
        env["HPD_CACHE_HOME"] = world["paths"]["donor_home"]
    return {"id": case.id, "argv": [a.format_map(values) for a in case.argv], "env": env, "guard": [values[g] for g in case.guard],
            "out": str(own / "out"), "values": values}


def _run_own_process(spec: dict, protected: list[str]) -> dict:
    before = digest_all(protected) | digest_all(spec["guard"])
    t0 = time.perf_counter()
    proc = run_cli(*spec["argv"], env=spec["env"], timeout=300)
    after = digest_all(protected) | digest_all(spec["guard"])
    return {"id": spec["id"], "exit_code": proc.returncode, "stdout": proc.stdout[-4000:], "stderr": proc.stderr[-8000:], "exception": None,
            "changed": changed(before, after), "seconds": round(time.perf_counter() - t0, 3)}


@pytest.fixture(scope="module")
def fuzz(world) -> dict:
    """Every row's result, by id: the in-process rows through one driver process
    (restarted after a row that ends it), then the own-process rows."""
    specs = [_spec(c, i, world) for i, c in enumerate(CASES)]
    by_id = {s["id"]: s for s in specs}
    protected = world["protected"]
    before = digest_all(protected)
    results: dict[str, dict] = {}
    pending = [s for s, c in zip(specs, CASES) if not c.own_process]
    work = Path(world["root"]) / "driver"
    work.mkdir()
    t0 = time.perf_counter()
    for attempt in range(len(pending) + 1):
        if not pending:
            break
        spec_path, results_path = work / f"spec-{attempt}.json", work / f"results-{attempt}.jsonl"
        spec_path.write_text(json.dumps({"protected": protected, "cases": pending}))
        proc = subprocess.run([sys.executable, str(DRIVER), str(spec_path), str(results_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
        started = None
        for line in results_path.read_text().splitlines() if results_path.exists() else []:
            row = json.loads(line)
            if "start" in row:
                started = row["start"]
            else:
                results[row["id"]] = row
                started = None
        ids = [s["id"] for s in pending]
        if started is not None:  # the process ended inside this row
            results[started] = {"id": started, "died": f"exit status {proc.returncode}; stderr: {proc.stderr[-3000:]}"}
        elif proc.returncode != 0:
            pytest.fail(f"the fuzz driver failed outside any case (exit {proc.returncode}): {proc.stderr[-3000:]}")
        pending = [by_id[i] for i in ids if i not in results]
    driver_seconds = time.perf_counter() - t0
    for spec, case in zip(specs, CASES):
        if case.own_process:
            results[case.id] = _run_own_process(spec, protected)
    return {"results": results, "specs": by_id, "unchanged": changed(before, digest_all(protected)), "driver_seconds": driver_seconds}


# -- the checks -------------------------------------------------------------------------

def problems(case: Case, result: dict | None, spec: dict) -> list[str]:
    """What is wrong with one row's result (empty: the row holds)."""
    if result is None:
        return ["no result: the driver never reached this row"]
    if "died" in result:
        return [f"the process ended during this row: {result['died']}"]
    found = []
    stderr = result["stderr"]
    if result["exception"]:
        found.append(f"uncaught exception:\n{result['exception']}")
    if "Traceback" in stderr:
        found.append("a traceback on stderr")
    want = EXIT[case.expect]
    if result["exit_code"] != want:
        found.append(f"exit {result['exit_code']}, expected {want}")
    lines = [line for line in stderr.splitlines() if line.strip()]
    expect = case.expect
    if case.id.startswith("verify: ") and case.id[8:] in INCOMPLETE:
        expect = "incomplete"
    if expect in ("error", "verify"):
        prefix = "error: " if expect == "error" else "verify failed: "
        messages = [line for line in lines if line.startswith(prefix)]
        if len(messages) != 1 or lines[-1] != messages[0]:
            found.append(f"expected one line starting {prefix!r}, the last on stderr")
        else:
            message = messages[0]
            if case.match and not re.search(case.match, message):
                found.append(f"the message does not match {case.match!r}")
            for fragment in case.fragments:
                fragment = fragment.format_map(spec["values"])
                if fragment not in message:
                    found.append(f"the message lacks {fragment!r}")
    elif expect == "incomplete":
        if not lines or not lines[-1].startswith("verify: cache is incomplete"):
            found.append("expected verify's last line to say the cache is incomplete")
    elif case.stdout and not re.search(case.stdout, result["stdout"]):
        found.append(f"stdout does not match {case.stdout!r}")
    if case.stderr and not re.search(case.stderr, stderr):
        found.append(f"stderr does not match {case.stderr!r}")
    if result["changed"]:
        found.append("changed outside its own output: " + "; ".join(result["changed"][:8]))
    if case.corrupt:
        run = Path(spec["out"])
        trained = [p.name for p in run.glob("step-*")] + (["final"] if (run / "final").exists() else [])
        metrics = run / "metrics.jsonl"
        if metrics.exists() and any("loss" in json.loads(line) for line in metrics.read_text().splitlines() if line.strip()):
            trained.append("metrics.jsonl rows with a loss")
        if trained:
            found.append(f"trained on a damaged cache: {', '.join(trained)}")
    if found:
        found.append(f"command: hpd-tools {' '.join(spec['argv'])}\nexit {result['exit_code']}\nstderr (tail):\n{stderr[-2500:]}")
    return found


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=pytest.mark.xfail(strict=True, reason=c.xfail) if c.xfail else ()) for c in CASES])
def test_row(fuzz, case):
    found = problems(case, fuzz["results"].get(case.id), fuzz["specs"][case.id])
    assert not found, "\n".join(found)


def test_summary(fuzz, capsys):
    """Every row ran; the rows that fail are exactly the known bugs; nothing under
    the protected trees changed over the whole run."""
    failing = {c.id for c in CASES if problems(c, fuzz["results"].get(c.id), fuzz["specs"][c.id])}
    known = {c.id for c in CASES if c.xfail}
    held = len(CASES) - len(failing)
    seconds = sum(r.get("seconds", 0) for r in fuzz["results"].values())
    by_group = ", ".join(f"{name} {sum(c.id not in failing for c in group)}/{len(group)}" for name, group in GROUPS.items())
    with capsys.disabled():
        print(f"\nfuzz: {len(CASES)} cases, {held} hold ({len(known)} known bugs marked xfail)\n  {by_group}; rows {seconds:.1f} s, driver {fuzz['driver_seconds']:.1f} s")
    assert set(fuzz["results"]) == {c.id for c in CASES}
    assert failing == known, f"failing but not marked: {sorted(failing - known)}; marked but holding: {sorted(known - failing)}"
    assert not fuzz["unchanged"], fuzz["unchanged"]


def test_the_checks_catch_what_they_must():
    """The checks themselves: each kind of failure a row can show is named."""
    error = Case("e", ["x"], "error", match=r"^error: --lr")
    spec = {"argv": ["x"], "out": "/nonexistent/out", "values": {}}
    good = {"exit_code": 2, "stdout": "", "stderr": "loading\nerror: --lr nan: bad\n", "exception": None, "changed": []}
    assert problems(error, good, spec) == []
    bad = [
        ({"exit_code": 1}, "exit 1, expected 2"),
        ({"exception": "Traceback (most recent call last):\nKeyError"}, "uncaught exception"),
        ({"stderr": "Traceback (most recent call last):\n  File x\nerror: --lr nan\n"}, "a traceback on stderr"),
        ({"stderr": "error: --lr nan\nerror: --lr again\n"}, "expected one line starting 'error: '"),
        ({"stderr": "error: --lr nan\nmore text after it\n"}, "expected one line starting 'error: '"),
        ({"stderr": "error: --seed -1\n"}, "does not match"),
        ({"changed": ["/inputs/student/config.json: changed"]}, "changed outside its own output"),
    ]
    for edit, what in bad:
        assert any(what in line for line in problems(error, {**good, **edit}, spec)), (edit, what)
    assert "no result" in problems(error, None, spec)[0] and "ended during this row" in problems(error, {"died": "exit 3"}, spec)[0]
