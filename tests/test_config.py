"""YAML recipes load strictly onto the config dataclasses; CLI options override them."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_cli, train_records, write_jsonl
from hpd_tools.cache import CacheConfig
from hpd_tools.config import build, load_yaml
from hpd_tools.errors import HPDError


def test_bundled_recipe_loads():
    config = build(CacheConfig, load_yaml(ROOT / "recipes" / "smollm2-135m" / "cache.yaml"))
    assert config.top_k == 64 and config.engine == "vllm" and config.fields.messages == "messages"
    assert config.teacher == "smollm2-135m-instruct" and config.shard == (0, 1)


def test_unknown_key_names_itself():
    with pytest.raises(HPDError, match="unknown key 'topk'"):
        build(CacheConfig, {"teacher": "t", "data": "d", "topk": 5}, where="r.yaml")
    with pytest.raises(HPDError, match="unknown key 'msgs'"):
        build(CacheConfig, {"teacher": "t", "data": "d", "fields": {"msgs": "m"}})


def test_values_are_checked_against_field_types():
    with pytest.raises(HPDError, match="config.top_k: expected an integer"):
        build(CacheConfig, {"teacher": "t", "data": "d", "top_k": "many"})
    with pytest.raises(HPDError, match="config.strict: expected true or false"):
        build(CacheConfig, {"teacher": "t", "data": "d", "strict": "yes"})
    assert build(CacheConfig, {"teacher": "t", "data": "d", "shard": "1/4"}).shard == (1, 4)


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("top_k: [1,\n")
    with pytest.raises(HPDError, match="not valid YAML"):
        load_yaml(bad)
    with pytest.raises(HPDError, match="no such file"):
        load_yaml(tmp_path / "missing.yaml")


def test_cli_options_override_the_recipe(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(4))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {teacher}\ndata: {data}\nengine: hf\ntop_k: 8\nmax_length: 256\nchunk_tokens: 128\n")
    proc = run_cli("cache", "--config", str(recipe), "--top-k", "12", "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run_cli("info", str(tmp_path / "c")).stdout)
    assert info["k"] == 12 and info["attributes"]["max_length"] == 256 and info["attributes"]["chunk_tokens"] == 128
    recipe.write_text(recipe.read_text() + "top_kk: 3\n")
    proc = run_cli("cache", "--config", str(recipe))
    assert proc.returncode == 2 and "unknown key 'top_kk'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["distill-hpd.yaml", "distill-fkl.yaml"])
def test_distill_recipes_load(name):
    from hpd_tools.distill import DistillConfig

    values = load_yaml(ROOT / "recipes" / "smollm2-135m" / name)
    config = build(DistillConfig, {**values, "caches": ["c"], "student": "s", "eval_cache": "e"})
    config.validate()
    assert config.loss in ("hpd", "fkl") and config.max_steps > 0
    with pytest.raises(HPDError, match="unknown key 'learning_rate'"):
        build(DistillConfig, {**values, "caches": ["c"], "student": "s", "learning_rate": 1})

