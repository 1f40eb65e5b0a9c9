"""prune, import-gguf, generate and pipeline never write what they did not make:
an output that is a teacher, a cache, a data file, a model or an unrelated
folder is refused in one line before any model loads, and nothing changes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import run_cli, train_records, write_jsonl
from hpd_tools import CacheConfig, build_cache
from hpd_tools.errors import HPDError
from hpd_tools.generate import GenerateConfig, generate_responses
from hpd_tools.models import import_gguf, prune_layers


def tree(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def owned(teacher, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("owned")
    data = write_jsonl(root / "prompts.jsonl", [{"prompt": r["messages"][0]["content"]} for r in train_records(4)])
    notes = root / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("do not touch")
    cache = build_cache(CacheConfig(teacher=str(teacher), data=str(write_jsonl(root / "train.jsonl", train_records(6))), engine="hf", top_k=4,
                                    max_length=256, out=str(root / "cache"))).location
    return {"teacher": teacher, "data": data, "notes": notes, "cache": Path(cache)}


def _unchanged(owned: dict):
    return {name: tree(Path(path)) for name, path in owned.items()}


@pytest.mark.parametrize("target, pattern", [
    ("teacher", r"--out .*: is the --teacher input"),
    ("notes", r"--out .*: not empty \(mine.txt\) and not an earlier output of this command \(no hpd_prune.json\)"),
    ("cache", r"--out .*: is the hpd-tools cache"),
    ("cache/sub", r"--out .*: is inside the hpd-tools cache"),
    ("notes/mine.txt/x", r"--out .*: under .*mine.txt, which is a file"),
])
def test_prune_refuses_outputs_it_did_not_make(owned, target, pattern):
    before = _unchanged(owned)
    base, _, rest = target.partition("/")
    out = owned[base] / rest if rest else owned[base]
    with pytest.raises(HPDError, match=pattern):
        prune_layers(owned["teacher"], out, [0])
    assert _unchanged(owned) == before


def test_prune_reruns_into_its_own_output(owned, tmp_path):
    out = prune_layers(owned["teacher"], tmp_path / "student", [1])
    again = prune_layers(owned["teacher"], out, [0])
    assert (again / "hpd_prune.json").is_file() and (again / "config.json").is_file()


def test_generate_never_overwrites_its_data_or_writes_into_a_model(owned, tmp_path):
    before = _unchanged(owned)
    for out, pattern in ((owned["data"], r"--out .*: is the --data input"), (owned["notes"], r"--out .*: is a folder"),
                         (owned["teacher"] / "more.jsonl", r"--out .*: is inside the --teacher folder"),
                         (owned["cache"] / "x.jsonl", r"--out .*: is inside the hpd-tools cache")):
        with pytest.raises(HPDError, match=pattern):
            generate_responses(GenerateConfig(teacher=str(owned["teacher"]), data=str(owned["data"]), out=str(out), engine="hf", max_new_tokens=4))
    assert _unchanged(owned) == before


def test_import_gguf_never_replaces_a_model_folder(owned, tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")  # refused before it is read
    before = _unchanged(owned)
    with pytest.raises(HPDError, match=r"--out .*: holds a model \(config.json"):
        import_gguf(gguf, owned["teacher"])
    assert _unchanged(owned) == before


def test_cli_prune_and_pipeline_refuse_in_one_line(owned):
    before = _unchanged(owned)
    for args in (("prune", "--teacher", str(owned["teacher"]), "--keep", "0", "--out", str(owned["teacher"])),
                 ("pipeline", "--out", str(owned["notes"]))):
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--out" in errors[0] and "Traceback" not in result.stderr
    assert _unchanged(owned) == before
