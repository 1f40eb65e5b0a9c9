"""The console script as a user runs it: summaries, info/list/verify, and bad input
that ends in a one-line error with exit code 2 and loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, train_records, write_jsonl

COMMON = ("--engine", "hf", "--top-k", "16", "--max-length", "512", "--chunk-tokens", "256")


def one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture
def messy(tmp_path) -> Path:
    good = train_records(6)
    long_response = {"messages": [{"role": "user", "content": "Say a lot."}, {"role": "assistant", "content": "word " * 400}]}
    return write_jsonl(
        tmp_path / "messy.jsonl",
        [
            good[0],
            "{not json",
            {"prompt": "only a prompt"},
            {"prompt": "p", "response": "   "},
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
            good[1],
            long_response,
            *good[2:],
        ],
    )


def test_cache_summary_counts_skips_and_truncation(teacher, messy, tmp_path):
    out = tmp_path / "c"
    proc = run_cli("cache", "--teacher", str(teacher), "--data", str(messy), "--out", str(out), *COMMON, "--max-length", "256")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    err = proc.stderr
    assert "rows read 11, kept 7, truncated 1" in err
    assert "skipped 1: malformed JSON (first rows [2])" in err
    assert "skipped 1: missing field 'response' (first rows [3])" in err
    assert "skipped 1: empty response (first rows [4])" in err
    assert "skipped 1: message 0 content is int, not a string (first rows [5])" in err
    assert "bytes/token" in err and "tokens/s" in err

    again = run_cli("cache", "--teacher", str(teacher), "--data", str(messy), "--out", str(out), *COMMON, "--max-length", "256")
    assert again.returncode == 0 and again.stdout.strip() == str(out)
    assert "already complete: no teacher work" in again.stderr and "starting teacher" not in again.stderr

    info = json.loads(run_cli("info", str(out)).stdout)
    assert info["complete"] and info["sequences"] == 7 and info["attributes"]["data"]["report"]["truncated"] == 1
    verify = run_cli("verify", str(out))
    assert verify.returncode == 0 and json.loads(verify.stdout)["complete"]


def test_strict_stops_at_first_bad_row(teacher, messy, tmp_path):
    proc = run_cli("cache", "--teacher", str(teacher), "--data", str(messy), "--out", str(tmp_path / "c"), *COMMON, "--strict")
    one_line_error(proc, str(messy), "line 2", "malformed JSON", "--strict")
    assert not (tmp_path / "c").exists()


def test_list_shows_caches_under_the_root(teacher, tmp_path, cache_home):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(4))
    location = run_cli("cache", "--teacher", str(teacher), "--data", str(data), *COMMON).stdout.strip()
    assert Path(location).parent == cache_home
    table = run_cli("list")
    assert table.returncode == 0 and Path(location).name in table.stdout and "complete" in table.stdout
    rows = json.loads(run_cli("list", "--json").stdout)
    assert rows[0]["location"] == location and rows[0]["teacher"] == teacher.name and rows[0]["k"] == 16


def test_teacher_that_does_not_exist(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(2))
    one_line_error(run_cli("cache", "--teacher", str(tmp_path / "nope"), "--data", str(data), *COMMON), "--teacher", "no such folder")


def test_top_k_larger_than_vocabulary(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(2))
    one_line_error(run_cli("cache", "--teacher", str(teacher), "--data", str(data), "--engine", "hf", "--top-k", "5000"), "--top-k 5000", "vocabulary (1024)")


def test_max_length_beyond_teacher_context(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(2))
    one_line_error(run_cli("cache", "--teacher", str(teacher), "--data", str(data), "--engine", "hf", "--max-length", "5000"), "--max-length 5000", "context is 4096")


def test_data_missing_unknown_or_malformed(teacher, tmp_path):
    one_line_error(run_cli("cache", "--teacher", str(teacher), "--data", str(tmp_path / "none.jsonl"), *COMMON), "none.jsonl", "no such file")
    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    one_line_error(run_cli("cache", "--teacher", str(teacher), "--data", str(txt), *COMMON), "d.txt", "unknown data format")
    bad_json = tmp_path / "d.json"
    bad_json.write_text('[{"prompt": "a", "response": "b"},\n {"prompt": ]')
    one_line_error(run_cli("cache", "--teacher", str(teacher), "--data", str(bad_json), *COMMON), "d.json", "line 2")
    nothing = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "response": ""}])
    one_line_error(run_cli("cache", "--teacher", str(teacher), "--data", str(nothing), *COMMON), "no usable records")


def test_output_that_is_not_a_cache(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(2))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    one_line_error(run_cli("cache", "--teacher", str(teacher), "--data", str(data), "--out", str(folder), *COMMON), "--out", "not an hpd-tools cache")
    one_line_error(run_cli("info", str(folder)), "not an hpd-tools cache")
    one_line_error(run_cli("verify", str(folder)), "not an hpd-tools cache")
    assert (folder / "keep.txt").read_text() == "precious"


def test_verify_cli_reports_corruption_with_exit_1(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(10))
    out = tmp_path / "c"
    assert run_cli("cache", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *COMMON).returncode == 0
    (out / "topk_ids" / "c" / "0" / "0").write_bytes(b"garbage")
    proc = run_cli("verify", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "topk_ids" in proc.stderr and "unit 0" in proc.stderr
