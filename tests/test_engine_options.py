"""The cache command's option checks (engine options against vLLM's EngineArgs, numbers
out of range), and reuse between two hf caches (the engine in the cache key is checked
by tests/test_engines.py, beside its one vLLM cache run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import run_cli, train_records, write_jsonl
from hpd_tools import CacheConfig, build_cache
from hpd_tools.engines import check_engine_args, make_teacher
from hpd_tools.errors import HPDError

# vLLM is imported in a subprocess: these tests must not load it into the pytest process.
VLLM_CASES = {
    "tensor_paralel_size=1": "--vllm-arg tensor_paralel_size=1: vLLM .* has no option 'tensor_paralel_size'; did you mean tensor_parallel_size",
    "max_num_seqs=many": '--vllm-arg max_num_seqs="many": vLLM .* expects an integer or null for max_num_seqs',
    "enforce_eager=1": "--vllm-arg enforce_eager=1: vLLM .* expects true or false for enforce_eager",
    "kv_cache_dtype=fp9": '--vllm-arg kv_cache_dtype="fp9": vLLM .* expects one of "auto"',
    "gpu_memory_utilization=high": "expects a number for gpu_memory_utilization",
    "dtype=bfloat16": "--vllm-arg dtype=\"bfloat16\": hpd-tools sets dtype itself; use --dtype",
    "model=/elsewhere": "sets model itself; use --teacher",
    "max_logprobs=5": "sets max_logprobs itself; use --top-k",
    # Accepted: EngineArgs fields, LLM's own keywords, values of the annotated types.
    "enforce_eager=true": None,
    "max_num_batched_tokens=128": None,
    "gpu_memory_utilization=0.5": None,
    "compilation_config={\"level\": 0}": None,
    "chat_template=x": None,
    "quantization=null": None,
}

CHECK = """
import json, sys
from hpd_tools.cli import _parse_engine_args
from hpd_tools.cache import CacheConfig
from hpd_tools.errors import HPDError
out = {}
for item in json.loads(sys.argv[1]):
    try:
        CacheConfig(teacher=sys.argv[2], data="unused", engine_args=_parse_engine_args((item,))).validate()
        out[item] = None
    except HPDError as exc:
        out[item] = str(exc)
print(json.dumps(out))
"""


def test_vllm_engine_options_are_checked_against_engine_args(teacher):
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(list(VLLM_CASES)), str(teacher)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for item, expected in VLLM_CASES.items():
        if expected is None:
            assert got[item] is None, (item, got[item])
        else:
            assert got[item] is not None and "\n" not in got[item], (item, got[item])
            assert re.search(expected, got[item]), (item, got[item])


def test_unknown_vllm_arg_is_one_line_before_the_data_is_read(teacher, tmp_path, cache_home):
    from fuzz_driver import changed, digest

    before = digest(teacher)
    # The data file does not exist: the engine option is refused before it is looked at.
    proc = run_cli("cache", "--teacher", str(teacher), "--data", str(tmp_path / "missing.jsonl"), "--top-k", "8", "--max-length", "256",
                   "--vllm-arg", "tensor_paralel_size=1", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    assert re.search(r"^error: --vllm-arg tensor_paralel_size=1: vLLM .*did you mean tensor_parallel_size", errors[0]), errors[0]
    assert "EngineArgs" in errors[0]
    assert not cache_home.exists() or not any(cache_home.iterdir())
    assert not (tmp_path / "out").exists()
    assert not changed(before, digest(teacher))


# Out-of-range cache options through the CLI (--batch-tokens 0, --seed -1, --workers 0, --gpus-per-worker 0,
# --top-k above the vocabulary, --vllm-arg with the hf engine) are rows of tests/test_fuzz.py, one driver process for all.


def test_validate_accepts_the_smallest_legal_values(teacher):
    CacheConfig(teacher=str(teacher), data="unused", batch_tokens=1, seed=0, top_k=1, engine="hf").validate()


def test_batch_tokens_smaller_than_a_sequence_scores_it_alone(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(3))
    small = build_cache(CacheConfig(teacher=str(teacher), data=str(data), engine="hf", top_k=4, max_length=256, batch_tokens=1, out=str(tmp_path / "a")))
    assert small.complete and small.tokens_scored > 0


def test_the_library_refuses_options_an_engine_does_not_take(teacher):
    with pytest.raises(HPDError, match="^engine_args enforce_eager: the hf engine"):
        make_teacher("hf", str(teacher), k=4, max_length=64, engine_args={"enforce_eager": True})
    # The server engine (the online teacher by URL) takes ServerTeacher's keywords.
    check_engine_args("server", {"retries": 1, "backoff": 0.1, "timeout": 5}, where="online_engine_args")
    with pytest.raises(HPDError, match="online_engine_args retry=1: the server engine has no option 'retry'; did you mean retries"):
        check_engine_args("server", {"retry": 1}, where="online_engine_args")
    with pytest.raises(HPDError, match='online_engine_args timeout="soon": the server engine expects a number'):
        check_engine_args("server", {"timeout": "soon"}, where="online_engine_args")


def test_a_second_hf_cache_takes_every_row_from_the_first(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(4))
    common = dict(teacher=str(teacher), data=str(data), top_k=8, max_length=256, chunk_tokens=256)
    hf = build_cache(CacheConfig(engine="hf", **common))
    assert hf.complete and hf.sequences_reused == 0
    # Reuse is on: a second hf cache elsewhere takes every record from the first. (A vLLM cache of the same
    # teacher and data takes none, the engine being in the key: tests/test_engines.py, with its one vLLM run.)
    again = build_cache(CacheConfig(engine="hf", out=str(tmp_path / "hf-copy"), **common))
    assert again.key == hf.key and again.sequences_reused == hf.sequences and again.tokens_scored == 0
