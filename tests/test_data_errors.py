"""Bad data files: encodings, binary garbage, corrupt Parquet, damaged `datasets`
folders, unreadable paths and files with nothing in them.

Every whole-file problem is one line naming the file (exit 2 from the CLI, no
traceback); a BOM and UTF-16/32 text read as UTF-8 does; a line that is not
valid UTF-8 is a bad row like a line of malformed JSON. Files are real files,
read by the real reader with the tiny tokenizer from conftest; a handful run
through the installed CLI.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import run_cli, train_records
from hpd_tools.data import _iter_rows, check_data_path, read_examples
from hpd_tools.errors import DataError

BIG = 4096
RECORDS = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in train_records(4)]
LINES = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
JSONL_TEXT = "".join(line + "\n" for line in LINES)
LATIN1_RECORD = {"prompt": "Un café, s'il vous plaît.", "response": "Voilà."}


@pytest.fixture(scope="module")
def tok(teacher):
    return AutoTokenizer.from_pretrained(teacher)


@pytest.fixture(scope="module")
def reference(tok, tmp_path_factory):
    """The records read from a plain UTF-8 file: what every other encoding must give."""
    path = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    path.write_text(JSONL_TEXT, encoding="utf-8")
    examples, report = read_examples(path, tok, max_length=BIG)
    assert report.kept == len(RECORDS)
    return examples


def same_examples(a, b) -> None:
    assert [e.example_id for e in a] == [e.example_id for e in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.response, y.response)


def one_line_error(path: Path, tok, **kw) -> str:
    with pytest.raises(DataError) as info:
        read_examples(path, tok, max_length=BIG, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# --- encodings that read -----------------------------------------------------------------

TEXT_ENCODINGS = {
    "utf8-bom.jsonl": lambda: codecs.BOM_UTF8 + JSONL_TEXT.encode(),
    "utf8-bom.json": lambda: codecs.BOM_UTF8 + json.dumps(RECORDS, ensure_ascii=False).encode(),
    "utf8-bom-crlf.jsonl": lambda: codecs.BOM_UTF8 + JSONL_TEXT.replace("\n", "\r\n").encode(),
    "utf16-bom.jsonl": lambda: JSONL_TEXT.encode("utf-16"),
    "utf16-bom.json": lambda: json.dumps(RECORDS, ensure_ascii=False).encode("utf-16"),
    "utf16be-bom.jsonl": lambda: codecs.BOM_UTF16_BE + JSONL_TEXT.encode("utf-16-be"),
    "utf16le-no-bom.jsonl": lambda: JSONL_TEXT.encode("utf-16-le"),
    "utf32-bom.jsonl": lambda: JSONL_TEXT.encode("utf-32"),
    # Files concatenated with `cat`, each keeping its BOM.
    "concatenated-boms.jsonl": lambda: b"".join(codecs.BOM_UTF8 + (line + "\n").encode() for line in LINES),
}


@pytest.mark.parametrize("name", list(TEXT_ENCODINGS))
def test_bom_and_utf16_32_read_every_record(tmp_path, tok, reference, name):
    path = tmp_path / name
    path.write_bytes(TEXT_ENCODINGS[name]())
    examples, report = read_examples(path, tok, max_length=BIG)
    assert report.rows == report.kept == len(RECORDS) and not report.skipped
    same_examples(examples, reference)  # the first record is kept, and equal to its UTF-8 reading
    assert examples[0].row == (1 if name.endswith(".jsonl") else 0)


# --- lines that are not UTF-8: bad rows --------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_latin1_line_is_a_bad_row_named_by_line_and_byte_offset(tmp_path, tok, reference, newline):
    bad = json.dumps(LATIN1_RECORD, ensure_ascii=False).encode("latin-1")
    lines = [(LINES[0] + newline).encode(), bad + newline.encode(), *((line + newline).encode() for line in LINES[1:])]
    data = codecs.BOM_UTF8 + b"".join(lines)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(data)
    examples, report = read_examples(path, tok, max_length=BIG)
    assert report.rows == len(RECORDS) + 1 and report.kept == len(RECORDS)
    assert report.skipped == {"not valid UTF-8": 1} and report.first_rows == {"not valid UTF-8": [2]}
    same_examples(examples, reference)
    assert [e.row for e in examples] == [1, 3, 4, 5]
    msg = one_line_error(path, tok, strict=True)
    offset = data.index(b"\xe9")  # the first byte that is not UTF-8, counted from the file's start (BOM included)
    assert msg.startswith(f"{path} line 2: not valid UTF-8 (byte 0xe9 at byte offset {offset} of the file; re-encode the file as UTF-8)")


def garbage(n: int = 8192, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(n)
    return b"\x80" + data[1:]  # not a signature, not a BOM: read as UTF-8


def test_binary_garbage_jsonl_is_no_usable_records_not_zero_silently(tmp_path, tok):
    path = tmp_path / "garbage.jsonl"
    path.write_bytes(garbage())
    msg = one_line_error(path, tok)
    assert "no usable records, nothing to cache" in msg and "not valid UTF-8" in msg and "re-encode it as UTF-8" in msg
    assert one_line_error(path, tok, strict=True).startswith(f"{path} line 1: not valid UTF-8 (byte 0x80 at byte offset 0 ")


# --- whole-file errors: table ------------------------------------------------------------


def _saved_dataset(tmp_path: Path, damage) -> Path:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(folder))
    damage(folder)
    return folder


def _arrow(folder: Path) -> Path:
    return next(folder.glob("*.arrow"))


def _parquet(tmp_path: Path, cut=None, rows=RECORDS) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist(rows) if rows else pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())})
    pq.write_table(table, path)
    if cut is not None:
        path.write_bytes(cut(path.read_bytes()))
    return path


def _write(name: str, data: bytes):
    def build(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return build


def _symlink(name: str, target: str):
    def build(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.symlink_to(target)
        return path

    return build


def _under_file(tmp_path: Path) -> Path:
    (tmp_path / "file.jsonl").write_text(JSONL_TEXT)
    return tmp_path / "file.jsonl" / "x.jsonl"


def _folder_named_jsonl(tmp_path: Path) -> Path:
    (tmp_path / "x.jsonl").mkdir()
    (tmp_path / "x.jsonl" / "part-0.txt").write_text(JSONL_TEXT)  # a folder of .jsonl files is a dataset repository (tests/test_datasets_input.py)
    return tmp_path / "x.jsonl"


# (id, build(tmp_path) -> path, fragments the one-line message must hold)
BAD_FILES = [
    ("empty.jsonl", _write("e.jsonl", b""), ["no usable records, nothing to cache", "empty (0 bytes)"]),
    ("empty.json", _write("e.json", b""), ["nothing to cache", "empty (0 bytes)"]),
    ("empty.parquet", _write("e.parquet", b""), ["nothing to cache", "empty (0 bytes)"]),
    ("blank-lines.jsonl", _write("b.jsonl", b"\n \n\r\n\t\n"), ["nothing to cache", "only blank lines"]),
    ("zero-row.parquet", lambda t: _parquet(t, rows=[]), ["nothing to cache", "no rows"]),
    ("latin1.json", _write("l.json", json.dumps([RECORDS[0], LATIN1_RECORD], ensure_ascii=False).encode("latin-1")),
     ["line 1: not valid UTF-8 (byte 0xe9 at byte offset", "re-encode the file as UTF-8"]),
    ("garbage.json", _write("g.json", garbage()), ["not valid UTF-8", "byte offset 0", "re-encode"]),
    ("utf16-broken.jsonl", _write("u.jsonl", JSONL_TEXT.encode("utf-16") + "\ud800".encode("utf-16-le", "surrogatepass") + b"{\x00"),
     [f"line {len(LINES) + 1}: not valid UTF-16", "re-encode the file as UTF-8"]),
    ("gzip.jsonl", _write("z.jsonl", gzip.compress(JSONL_TEXT.encode())), ["gzip-compressed, not JSON text", "gunzip"]),
    ("parquet-named.jsonl", lambda t: _write("p.jsonl", _parquet(t).read_bytes())(t), ["a Parquet file, not JSON text", ".parquet"]),
    ("garbage.parquet", _write("g.parquet", garbage()), ["not a readable Parquet file", "write the file again"]),
    ("half.parquet", lambda t: _parquet(t, cut=lambda b: b[: len(b) // 2]), ["not a readable Parquet file"]),
    ("footer-cut.parquet", lambda t: _parquet(t, cut=lambda b: b[:-3]), ["not a readable Parquet file"]),
    ("jsonl-named.parquet", _write("j.parquet", JSONL_TEXT.encode()), ["not a readable Parquet file"]),
    ("folder named x.jsonl", _folder_named_jsonl, ["a folder, but not a saved `datasets` folder"]),
    ("broken symlink", _symlink("gone.jsonl", "/nonexistent/data.jsonl"), ["a broken symbolic link (to /nonexistent/data.jsonl)"]),
    ("symlink loop", _symlink("loop.jsonl", "loop.jsonl"), ["a broken symbolic link"]),
    ("path under a file", _under_file, ["file.jsonl is a file, not a folder"]),
    ("datasets: arrow truncated", lambda t: _saved_dataset(t, lambda d: _arrow(d).write_bytes(_arrow(d).read_bytes()[:100])),
     ["saved `datasets` folder is damaged (ArrowInvalid", "save the dataset again"]),
    ("datasets: arrow missing", lambda t: _saved_dataset(t, lambda d: _arrow(d).unlink()), ["damaged (FileNotFoundError"]),
    ("datasets: arrow is garbage", lambda t: _saved_dataset(t, lambda d: _arrow(d).write_bytes(garbage(700))), ["saved `datasets` folder is damaged ("]),
    ("datasets: state.json malformed", lambda t: _saved_dataset(t, lambda d: (d / "state.json").write_text("{oops")), ["damaged (JSONDecodeError"]),
    ("datasets: state.json not UTF-8", lambda t: _saved_dataset(t, lambda d: (d / "state.json").write_bytes(b"\xff\xfe\x00x")), ["damaged (UnicodeDecodeError"]),
    ("datasets: state.json lacks keys", lambda t: _saved_dataset(t, lambda d: (d / "state.json").write_text("{}")), ["damaged (KeyError"]),
    ("datasets: info of wrong shape", lambda t: _saved_dataset(t, lambda d: (d / "dataset_info.json").write_text("[1]")), ["damaged (AttributeError"]),
]
if Path("/proc/self/clear_refs").exists():
    # A file even root cannot read: reading it fails with EINVAL.
    BAD_FILES.append(("unreadable (EINVAL)", _symlink("proc.jsonl", "/proc/self/clear_refs"), ["cannot read the file (Invalid argument)"]))


@pytest.mark.parametrize("build,fragments", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_file_is_one_line_naming_it(tmp_path, tok, build, fragments):
    path = build(tmp_path)
    for strict in (False, True):
        msg = one_line_error(path, tok, strict=strict)
        for fragment in fragments:
            assert fragment in msg, msg


def _read_as_nobody(paths: list[str]) -> dict[str, str | None]:
    """Each path's DataError message (None: it read), from a forked child that is nobody when we are root.

    A fork, not a new interpreter: the interpreter lives under /root, which nobody cannot enter.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only file system calls and the reader, then _exit
        code = 1
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            out: dict[str, str | None] = {}
            for p in paths:
                try:
                    check_data_path(Path(p))
                    list(_iter_rows(Path(p)))
                    out[p] = None
                except DataError as exc:
                    out[p] = str(exc)
            os.write(w, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data
    return json.loads(data)


def test_permission_denied_is_one_line(tmp_path):
    """chmod does not stop root: as root, the reader runs as nobody in a forked child."""
    top = Path(tempfile.mkdtemp(prefix="hpd-perm-"))  # not under pytest's 0700 folder, so nobody can reach it
    try:
        top.chmod(0o755)
        locked_file = top / "locked.jsonl"
        locked_file.write_text(JSONL_TEXT)
        locked_file.chmod(0)
        locked_parquet = top / "locked.parquet"
        locked_parquet.write_bytes(b"PAR1")
        locked_parquet.chmod(0)
        (top / "closed").mkdir()
        (top / "closed" / "d.jsonl").write_text(JSONL_TEXT)
        (top / "closed").chmod(0o700 if os.geteuid() == 0 else 0)
        (top / "unlisted").mkdir(mode=0o311)
        cases = {
            str(locked_file): "cannot read the file (Permission denied)",
            str(locked_parquet): "cannot read the file (Permission denied)",
            str(top / "closed" / "d.jsonl"): "cannot be reached (Permission denied)",
            str(top / "unlisted"): "cannot list the folder (Permission denied)",
        }
        got = _read_as_nobody(list(cases))
        for path, fragment in cases.items():
            assert got[path] is not None and path in got[path] and fragment in got[path] and "\n" not in got[path], (path, got[path])
    finally:
        for p in (top / "closed", top / "unlisted"):
            p.chmod(0o700)
        subprocess.run(["rm", "-rf", str(top)], check=True)


# --- the CLI: exit 2, one line, no traceback, nothing written ------------------------------

# The CLI on every bad file of BAD_FILES (exit 2, one line, no output left) and on a BOM file is tests/test_fuzz.py's
# 'bad data files' group, in one driver process; generate is run here.


def test_cli_generate_refuses_a_bad_file_in_one_line(tmp_path, teacher):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(garbage(4096))
    proc = run_cli("generate", "--engine", "hf", "--teacher", str(teacher), "--data", str(bad), "--out", str(tmp_path / "g.jsonl"), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"error: {bad}: not a readable Parquet file")
    assert not (tmp_path / "g.jsonl").exists()
