"""Models named by Hub id (hpd_tools.hub), offline, from an HF_HOME laid out as huggingface_hub lays out its cache.

The tiny teacher is placed in ``$HF_HOME/hub/models--org--tiny-llama``: blobs
named by their SHA-256, ``snapshots/<commit>/`` of relative links to them, and
``refs/main`` / ``refs/v2`` naming two commits. Everything runs with
``HF_HUB_OFFLINE=1``; the ``--max-length`` default is checked on copies of the
teacher with a short context.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, train_records, write_jsonl
from hpd_tools.cache import CacheConfig, build_cache, cache_info
from hpd_tools.errors import HPDError
from hpd_tools.hub import hub_origin, resolve_model

REPO = "org/tiny-llama"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
COMMON = ("--engine", "hf", "--top-k", "8", "--chunk-tokens", "256")


def lay_into_hub_cache(model_dir: Path, hf_home: Path, repo: str, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """``model_dir`` as snapshot ``commit`` of ``repo`` in huggingface_hub's cache layout; returns the snapshot folder."""
    storage = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(model_dir.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(teacher, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    lay_into_hub_cache(teacher, home, REPO, COMMIT_A, ("main",))
    lay_into_hub_cache(teacher, home, REPO, COMMIT_B, ("v2",))
    return home


@pytest.fixture
def offline(hf_home, monkeypatch) -> Path:
    """The environment a user sets: HF_HOME and HF_HUB_OFFLINE (read at each call)."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return hf_home


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hub-data") / "d.jsonl", train_records(4))


def _snapshot(home: Path, commit: str) -> Path:
    return home / "hub" / "models--org--tiny-llama" / "snapshots" / commit


def test_resolve_ids_revisions_and_folders(offline, teacher):
    assert resolve_model(REPO) == (_snapshot(offline, COMMIT_A), COMMIT_A)
    assert resolve_model(REPO, "v2") == (_snapshot(offline, COMMIT_B), COMMIT_B)
    assert resolve_model(REPO, COMMIT_B)[1] == COMMIT_B
    # A snapshot folder given by path is the same model, at the same commit.
    assert resolve_model(str(_snapshot(offline, COMMIT_A)), "main") == (_snapshot(offline, COMMIT_A), COMMIT_A)
    assert hub_origin(_snapshot(offline, COMMIT_B)) == (REPO, COMMIT_B)
    assert resolve_model(str(teacher)) == (teacher, None) and hub_origin(teacher) is None


@pytest.mark.parametrize("name, revision, flag, fragments", [
    ("org/not-cached", None, "--teacher", ["--teacher org/not-cached: no such folder, and the Hub model org/not-cached is not in the Hugging Face cache",
                                           "HF_HUB_OFFLINE=1", "hf download org/not-cached"]),
    (REPO, "v3", "--teacher", ["--revision v3: org/tiny-llama has no such revision", "cached: main, v2"]),
    ("./no/such/folder", None, "--student", ["--student ./no/such/folder: no such folder, and not a Hugging Face Hub id (org/name)"]),
    ("{teacher}", "main", "--teacher", ["--revision main:", "is a local folder"]),
    ("{snapshot_a}", "v2", "--teacher", ["--revision v2:", "is the snapshot of org/tiny-llama at commit aaaaaaaaaaaa, not v2",
                                        "give --teacher org/tiny-llama --revision v2"]),
])
def test_refusals_are_one_line(offline, teacher, name, revision, flag, fragments):
    with pytest.raises(HPDError) as info:
        resolve_model(name.format(teacher=teacher, snapshot_a=_snapshot(offline, COMMIT_A)), revision, flag)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_cache_from_hub_id_offline_and_main_moving_on(offline, teacher, data, cache_home, tmp_path):
    env = {"HF_HOME": str(offline), "HF_HUB_OFFLINE": "1", "HPD_CACHE_HOME": str(cache_home)}
    proc = run_cli("cache", "--teacher", REPO, "--data", str(data), *COMMON, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    attrs = cache_info(summary["location"])["attributes"]
    assert attrs["teacher"]["name"] == REPO
    assert attrs["teacher"]["hub"] == {"repo_id": REPO, "commit": COMMIT_A, "revision": "main"}
    assert attrs["teacher_revision"] == COMMIT_A and attrs["max_length"] == 2048  # the tiny teacher's context is 4096

    def key(**kw) -> str:
        return build_cache(CacheConfig(data=str(data), engine="hf", top_k=8, chunk_tokens=256, **kw), dry_run=True).key

    # The Hub id, its snapshot folder and the commit all name one cache; a complete one at that.
    assert key(teacher=REPO) == key(teacher=str(_snapshot(offline, COMMIT_A))) == key(teacher=REPO, revision=COMMIT_A) == summary["key"]
    assert build_cache(CacheConfig(teacher=REPO, data=str(data), engine="hf", top_k=8, chunk_tokens=256), dry_run=True).complete
    # Another commit (same weights) is another cache, and so is `main` once it moves there.
    other = key(teacher=REPO, revision="v2")
    assert other != summary["key"]
    (offline / "hub" / "models--org--tiny-llama" / "refs" / "main").write_text(COMMIT_B)
    try:
        assert key(teacher=REPO) == other
    finally:
        (offline / "hub" / "models--org--tiny-llama" / "refs" / "main").write_text(COMMIT_A)
    # A plain folder keeps the key it always had: no revision in it.
    assert key(teacher=str(teacher)) not in (summary["key"], other)


def test_uncached_id_offline_writes_nothing(offline, data, cache_home):
    """The refusal in-process (the CLI prints HPDError as its one line, exit 2: tests/test_cli.py)."""
    with pytest.raises(HPDError, match=r"^--teacher org/elsewhere: no such folder, and the Hub model org/elsewhere is not in the Hugging Face cache"):
        build_cache(CacheConfig(teacher="org/elsewhere", data=str(data), engine="hf", top_k=8))
    assert not cache_home.exists() or not any(cache_home.iterdir())
    assert not (offline / "hub" / "models--org--elsewhere").exists()


def _with_config(teacher: Path, out: Path, config_edit=None, tokenizer_edit=None) -> Path:
    shutil.copytree(teacher, out)
    for name, edit in (("config.json", config_edit), ("tokenizer_config.json", tokenizer_edit)):
        if edit:
            values = json.loads((out / name).read_text())
            edit(values)
            (out / name).write_text(json.dumps(values))
    return out


def test_max_length_default_follows_the_teacher_context(teacher, data, tmp_path):
    def key(model: Path, max_length: int | None = None) -> str:
        return build_cache(CacheConfig(teacher=str(model), data=str(data), engine="hf", top_k=8, chunk_tokens=256, max_length=max_length), dry_run=True).key

    assert key(teacher) == key(teacher, 2048)  # context 4096: 2048
    short = _with_config(teacher, tmp_path / "short", config_edit=lambda c: c.update(max_position_embeddings=300))
    assert key(short) == key(short, 299) != key(short, 298)  # one position is kept for the engine
    with pytest.raises(HPDError, match=r"^--max-length 2048: the teacher's context is 300 positions .* use at most 299$"):
        key(short, 2048)
    # No max_position_embeddings: the tokenizer's model_max_length, when it is a real limit.
    by_tokenizer = _with_config(teacher, tmp_path / "tok", config_edit=lambda c: c.pop("max_position_embeddings"),
                                tokenizer_edit=lambda t: t.update(model_max_length=256))
    assert key(by_tokenizer) == key(by_tokenizer, 255)
    unset = _with_config(teacher, tmp_path / "unset", config_edit=lambda c: c.pop("max_position_embeddings"),
                         tokenizer_edit=lambda t: t.update(model_max_length=int(1e30)))
    assert key(unset) == key(unset, 2048)


def test_prune_student_and_generate_take_hub_ids(offline, tmp_path):
    from hpd_tools.generate import GenerateConfig, generate_responses
    from hpd_tools.models import prune_layers
    from hpd_tools.training.student import load_student

    out = prune_layers(REPO, tmp_path / "pruned", [1], revision="v2")
    meta = json.loads((out / "hpd_prune.json").read_text())
    assert meta["hub"] == {"repo_id": REPO, "commit": COMMIT_B} and meta["kept_layers"] == [1]

    model, tokenizer = load_student(REPO)
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == model.config.vocab_size

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hi."}, {"prompt": "Name a colour."}])
    summary = generate_responses(GenerateConfig(teacher=REPO, data=str(prompts), out=str(tmp_path / "gen.jsonl"), engine="hf", max_new_tokens=4))
    assert summary["prompts"] == 2
