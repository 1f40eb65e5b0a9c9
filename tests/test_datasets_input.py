"""--data as users hold it: dataset repository folders (datasets.load_dataset), splits,
configurations, --max-records, OpenAI-style content parts and ShareGPT records.

Offline throughout (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 in the CLI runs);
records are the bundled training data, so every reading can be compared with
the plain JSONL of the same conversations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, train_records, write_jsonl
from hpd_tools.cache import CacheConfig, build_cache, cache_info
from hpd_tools.data import SHAREGPT_ROLES, read_examples
from hpd_tools.errors import DataError

BIG = 4096
SHAREGPT = {v: k for k, v in SHAREGPT_ROLES.items() if k in ("system", "human", "gpt", "tool")}


@pytest.fixture(scope="module")
def tok(teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A dataset repository as the Hub lays one out: data/<split>-*.jsonl, 6 train and 3 test records."""
    root = tmp_path_factory.mktemp("dataset-repo")
    (root / "data").mkdir()
    records = train_records(9)
    write_jsonl(root / "data" / "train-00000-of-00002.jsonl", records[:4])
    write_jsonl(root / "data" / "train-00001-of-00002.jsonl", records[4:6])
    write_jsonl(root / "data" / "test-00000-of-00001.jsonl", records[6:])
    (root / "README.md").write_text("# a dataset card without configs\n")
    return root


def _ids(examples) -> list[int]:
    return [e.example_id for e in examples]


def _plain(tok, tmp_path: Path, records: list) -> list[int]:
    return _ids(read_examples(write_jsonl(tmp_path / "plain.jsonl", records), tok, max_length=BIG)[0])


def test_repository_folder_splits_and_max_records(repo, tok, tmp_path):
    records = train_records(9)
    train, report = read_examples(repo, tok, max_length=BIG)
    assert report.split == "train" and report.rows == 6 and _ids(train) == _plain(tok, tmp_path, records[:6])
    test, report = read_examples(repo, tok, max_length=BIG, split="test")
    assert report.split == "test" and _ids(test) == _plain(tok, tmp_path, records[6:])
    first, report = read_examples(repo, tok, max_length=BIG, max_records=2)
    assert report.rows == 2 and _ids(first) == _ids(train)[:2]
    with pytest.raises(DataError, match=r"^--data-split validation: .* has no such split \(its splits: train, test\); choose one of them$"):
        read_examples(repo, tok, max_length=BIG, split="validation")
    with pytest.raises(DataError, match=r"^--data-config other: .* has no such configuration"):
        read_examples(repo, tok, max_length=BIG, data_config="other")
    with pytest.raises(DataError, match=r"^--data-split test: --data .*plain.jsonl is a single file, with no splits"):
        read_examples(tmp_path / "plain.jsonl", tok, max_length=BIG, split="test")
    # Folders of JSON that are not data: a model, a cache.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "zarr.json").write_text("{}")
    with pytest.raises(DataError, match=r"^--data .*cache: a Zarr store \(an hpd-tools cache\), not data"):
        read_examples(tmp_path / "cache", tok, max_length=BIG)


def test_repository_configurations_from_the_card(tok, tmp_path):
    """README.md's `configs:` (the Hub's way to name subsets), Parquet files, chat content as OpenAI-style text parts."""
    import pandas as pd

    records = train_records(5)
    root = tmp_path / "repo"
    for name, part in (("short", records[:2]), ("long", records[2:])):
        (root / name).mkdir(parents=True)
        parts = [{"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"][:7]}, {"type": "text", "text": m["content"][7:]}]}
                               for m in r["messages"]]} for r in part]
        pd.DataFrame(parts).to_parquet(root / name / "train-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: short\n  data_files: short/*.parquet\n"
                                    "- config_name: long\n  data_files: long/*.parquet\n---\n# card\n")
    long, _ = read_examples(root, tok, max_length=BIG, data_config="long")
    assert _ids(long) == _plain(tok, tmp_path, records[2:])  # parts joined: the same conversations, the same keys
    short, _ = read_examples(root, tok, max_length=BIG, data_config="short")
    assert _ids(short) == _plain(tok, tmp_path, records[:2])


def test_sharegpt_records_read_through_the_role_mapping(tok, tmp_path):
    records = [{"messages": [{"role": "system", "content": "Be brief."}, *r["messages"]]} for r in train_records(4)]
    sharegpt = [{"conversations": [{"from": SHAREGPT[m["role"]] if m["role"] != "user" else "human", "value": m["content"]} for m in r["messages"]]}
                for r in records]
    assert sharegpt[0]["conversations"][0]["from"] == "system" and sharegpt[0]["conversations"][2]["from"] == "gpt"
    got, report = read_examples(write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt), tok, max_length=BIG)
    plain, _ = read_examples(write_jsonl(tmp_path / "chat.jsonl", records), tok, max_length=BIG)
    assert report.kept == 4 and _ids(got) == _ids(plain)
    assert all((a.tokens == b.tokens).all() and (a.response == b.response).all() for a, b in zip(got, plain))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"conversations": [{"from": "bot", "value": "hi"}]}, sharegpt[0]])
    _, report = read_examples(odd, tok, max_length=BIG)
    assert report.kept == 1 and report.skipped == {"message 0 has unknown role 'bot'": 1}


def test_unknown_content_part_stops_the_run_naming_record_and_type(tok, tmp_path):
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    path = write_jsonl(tmp_path / "parts.jsonl", [train_records(1)[0], image])
    with pytest.raises(DataError) as info:  # even without --strict: a text teacher would score a conversation it never saw
        read_examples(path, tok, max_length=BIG)
    message = str(info.value)
    assert message.startswith(f"{path} line 2: message 0 has a content part of type 'image_url'; only text parts") and "\n" not in message


def test_cache_from_a_repository_split_offline(teacher, repo, cache_home):
    """The CLI with a dataset folder, a split and --max-records, offline: what was read is in the key and the attributes."""
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HPD_CACHE_HOME": str(cache_home)}
    proc = run_cli("cache", "--teacher", str(teacher), "--data", str(repo), "--data-split", "test", "--max-records", "2",
                   "--engine", "hf", "--top-k", "8", "--chunk-tokens", "256", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    attrs = cache_info(summary["location"])["attributes"]
    assert summary["sequences"] == 2 and attrs["data"]["split"] == "test" and attrs["data"]["max_records"] == 2
    assert attrs["data"]["path"] == str(repo.resolve())

    def key(**kw) -> str:
        return build_cache(CacheConfig(teacher=str(teacher), data=str(repo), engine="hf", top_k=8, chunk_tokens=256, **kw), dry_run=True).key

    assert key(data_split="test", max_records=2) == summary["key"]
    assert len({summary["key"], key(data_split="test"), key(), key(max_records=2)}) == 4


def test_uncached_hub_dataset_offline_is_one_line_and_writes_nothing(teacher, cache_home, tmp_path):
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HPD_CACHE_HOME": str(cache_home)}
    proc = run_cli("cache", "--teacher", str(teacher), "--data", "org/chats", "--engine", "hf", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --data org/chats: no such file or folder, and the Hub dataset org/chats is not in the datasets cache"), line
    assert not cache_home.exists() or not any(cache_home.iterdir())
