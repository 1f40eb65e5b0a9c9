"""Crash safety and shared writing, with real processes: a writer killed with
SIGKILL and resumed, and several shard writers filling one cache."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import train_records, write_jsonl
from hpd_tools import build_cache, cache_info, verify_cache
from hpd_tools.cache.layout import CacheStore
from test_cache import arrays, assert_same_content, config

CLI = str(Path(sys.executable).parent / "hpd-tools")


def variants(n_copies: int) -> list[dict]:
    """Distinct records (distinct example ids) built from the bundled data."""
    out = []
    for copy in range(n_copies):
        for r in train_records():
            messages = [dict(m) for m in r["messages"]]
            messages[0]["content"] += f" (variant {copy})"
            out.append({"messages": messages})
    return out


def cache_cmd(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [CLI, "cache", "--engine", "hf", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--top-k", "16", "--max-length", "512", "--chunk-tokens", "512", "--batch-tokens", "1024", *extra]


def markers(out: Path) -> int:
    folder = out / "progress"
    return len(list(folder.glob("unit-*.json"))) if folder.is_dir() else 0


def test_killed_writer_resumes_to_identical_cache(teacher, tmp_path):
    data = write_jsonl(tmp_path / "big.jsonl", variants(4))
    out = tmp_path / "cache"
    proc = subprocess.Popen(cache_cmd(teacher, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while markers(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done_before = markers(out)
    total = cache_info(out)["units_total"]
    assert 3 <= done_before < total, "the writer must be killed mid-run"
    assert not cache_info(out)["complete"]

    resumed = subprocess.run(cache_cmd(teacher, data, out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(out)
    assert f"units computed {total - done_before}/{total}" in resumed.stderr

    reference = build_cache(config(teacher, data, out=str(tmp_path / "ref"), chunk_tokens=512, batch_tokens=1024, reuse=False))
    assert_same_content(arrays(out), arrays(reference.location), exact=True)
    report = verify_cache(out)
    assert report.complete and report.positions == reference.tokens


def test_concurrent_shard_writers_fill_one_cache(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", variants(1)[:80])
    out = tmp_path / "shared"
    procs = [subprocess.Popen(cache_cmd(teacher, data, out, "--shard", f"{i}/3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
        assert stdout.strip() == str(out)
    info = cache_info(out)
    assert info["complete"] and info["units_done"] == info["units_total"]
    reference = build_cache(config(teacher, data, out=str(tmp_path / "ref"), chunk_tokens=512, batch_tokens=1024, reuse=False))
    assert_same_content(arrays(out), arrays(reference.location), exact=True)
    assert verify_cache(out).complete


def test_shards_one_after_another_complete_with_the_last(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(40))
    out = str(tmp_path / "seq")
    first = build_cache(config(teacher, data, out=out, shard=(1, 2)))
    assert not first.complete and 0 < first.units_computed < first.units_total
    report = verify_cache(out)
    assert not report.complete and report.units_checked == first.units_computed
    second = build_cache(config(teacher, data, out=out, shard=(0, 2)))
    assert second.complete and first.units_computed + second.units_computed == second.units_total
    reference = build_cache(config(teacher, data, out=str(tmp_path / "ref"), reuse=False))
    assert_same_content(arrays(out), arrays(reference.location), exact=True)


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "x"])
def test_bad_shard_spec(teacher, tmp_path, spec):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(2))
    proc = subprocess.run(cache_cmd(teacher, data, tmp_path / "c", "--shard", spec), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--shard" in proc.stderr and "Traceback" not in proc.stderr


def test_two_identical_commands_share_the_work(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", variants(2))
    out = tmp_path / "same"
    procs = [subprocess.Popen(cache_cmd(teacher, data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    computed = []
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
        assert stdout.strip() == str(out)
        line = next(x for x in stderr.splitlines() if "units computed" in x)
        done, total = line.split("units computed ")[1].split(",")[0].split("/")
        computed.append(int(done))
    total = int(total)
    assert sum(computed) == total, computed  # every unit computed once, by one of them
    assert not list((out / "progress").glob("*.claim"))
    reference = build_cache(config(teacher, data, out=str(tmp_path / "ref"), chunk_tokens=512, batch_tokens=1024, reuse=False))
    assert_same_content(arrays(out), arrays(reference.location), exact=True)
    assert verify_cache(out).complete


def test_workers_launcher_fills_one_cache(teacher, tmp_path):
    """`--workers 2` on this node's `--shard 1/2`: writers 2/4 and 3/4 run as
    subprocesses; a second node's `--shard 0/2 --workers 2` completes the cache."""
    data = write_jsonl(tmp_path / "d.jsonl", variants(1)[:60])
    out = tmp_path / "launched"
    node1 = subprocess.run(cache_cmd(teacher, data, out, "--shard", "1/2", "--workers", "2"), capture_output=True, text=True, timeout=600)
    assert node1.returncode == 0, node1.stderr
    assert node1.stdout.strip() == str(out)
    assert "[writer 0] " in node1.stderr and "[writer 1] " in node1.stderr
    assert "cache shard 2/4" in node1.stderr and "cache shard 3/4" in node1.stderr
    info = cache_info(out)
    assert not info["complete"] and 0 < info["units_done"] < info["units_total"]
    node0 = subprocess.run(cache_cmd(teacher, data, out, "--shard", "0/2", "--workers", "2"), capture_output=True, text=True, timeout=600)
    assert node0.returncode == 0, node0.stderr
    assert "complete" in node0.stderr.splitlines()[-1]
    reference = build_cache(config(teacher, data, out=str(tmp_path / "ref"), chunk_tokens=512, batch_tokens=1024, reuse=False))
    assert_same_content(arrays(out), arrays(reference.location), exact=True)
    assert verify_cache(out).complete
    # A writer that fails is named, with its own error, in one line.
    bad = subprocess.run(cache_cmd(teacher, tmp_path / "missing.jsonl", tmp_path / "x", "--workers", "2"), capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --workers: writer ") and "missing.jsonl" in last


def test_claim_that_never_got_its_owner_is_taken_over(teacher, tmp_path):
    """An empty claim (an older writer killed between creating it and writing
    its owner) does not block the unit forever: once it is 10 s old it is stale."""
    data = write_jsonl(tmp_path / "d.jsonl", train_records(40))
    out = tmp_path / "c"
    first = build_cache(config(teacher, data, out=str(out), shard=(1, 2)))
    assert not first.complete
    claim = out / "progress" / "unit-00000000.claim"
    claim.write_text("")
    os.utime(claim, (time.time() - 60, time.time() - 60))
    second = build_cache(config(teacher, data, out=str(out), shard=(0, 2)))
    assert second.complete and first.units_computed + second.units_computed == second.units_total
    assert not claim.exists() and verify_cache(out).complete


def _on_another_host(code: str, lease: str) -> subprocess.Popen:
    """Python run under another hostname (its own UTS namespace): a writer on a second
    node of a shared folder, as NFS or Lustre gives it."""
    if subprocess.run(["unshare", "-u", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -u is not permitted here; needs root to give a process another hostname")
    script = f"hostname node-b && exec {sys.executable} -c {shlex.quote(code)}"
    return subprocess.Popen(["unshare", "-u", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HPD_CLAIM_LEASE_SECONDS": lease})


def test_claims_across_hosts_are_leases(teacher, tmp_path, monkeypatch):
    """On a shared filesystem a claim from another host cannot be judged by its pid:
    it is a lease, renewed by its holder (a touch every lease/4) and taken over once
    it is not renewed for a lease on the filesystem's clock, so a node that died
    never blocks its units forever, and a live one keeps them."""
    monkeypatch.setenv("HPD_CLAIM_LEASE_SECONDS", "2")
    data = write_jsonl(tmp_path / "d.jsonl", train_records(40))
    out = tmp_path / "c"
    first = build_cache(config(teacher, data, out=str(out), shard=(1, 2)))
    assert not first.complete
    holder = _on_another_host(f"import time\nfrom hpd_tools.cache.layout import CacheStore\nprint(CacheStore({str(out)!r}).claim(0), flush=True)\ntime.sleep(60)", "2")
    try:
        assert holder.stdout.readline().strip() == "True"
        assert (out / "progress" / "unit-00000000.claim").read_text().startswith("node-b ")
        time.sleep(5)  # over two leases: the live holder's heartbeat keeps its claim
        assert not CacheStore(out).claim(0)
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (its node died): no pid to look at from here; after a lease its claim is stale.
    started = time.monotonic()
    second = build_cache(config(teacher, data, out=str(out), shard=(0, 2)))
    assert second.complete and first.units_computed + second.units_computed == second.units_total
    assert time.monotonic() - started < 30
    assert verify_cache(out).complete
