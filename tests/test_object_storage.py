"""Caches on object storage, against a real S3-compatible server (moto's server
mode, started here on 127.0.0.1) and real processes: write, list, read, verify,
concurrent writers, a killed writer, concurrent distill runs, and bad URLs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from conftest import train_records, write_jsonl  # noqa: E402
from hpd_tools import CacheReader, build_cache, list_caches, verify_cache  # noqa: E402
from hpd_tools.cache.layout import CacheStore  # noqa: E402
from hpd_tools.errors import CacheError  # noqa: E402
from test_cache import arrays, assert_same_content, config  # noqa: E402
from test_distill import make_student  # noqa: E402

CLI = str(Path(sys.executable).parent / "hpd-tools")
BUCKET = "hpd-tests"
COMMON = ("--engine", "hf", "--top-k", "16", "--max-length", "512", "--batch-tokens", "1024")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free port of 127.0.0.1, answering."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"moto server did not start on {endpoint}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3() -> str:
    """A moto S3 server on 127.0.0.1 with one bucket; its endpoint and test
    credentials are in the environment (for this process and its children)."""
    server, endpoint = start_moto()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem().mkdir(BUCKET)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def url(*parts: str) -> str:
    return "/".join([f"s3://{BUCKET}", *parts])


def cache_cmd(teacher: Path, data: Path, out: str | None, chunk_tokens: int = 256) -> list[str]:
    where = ["--out", out] if out else []
    return ["cache", "--teacher", str(teacher), "--data", str(data), *where, *COMMON, "--chunk-tokens", str(chunk_tokens)]


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start the console script; ``env`` entries override the environment (None removes one)."""
    full = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.Popen([CLI, *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def units_computed(stderr: str) -> tuple[int, int]:
    line = next(x for x in stderr.splitlines() if "units computed" in x)
    done, total = line.split("units computed ")[1].split(",")[0].split("/")
    return int(done), int(total)


def markers(location: str) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    try:
        return sum(1 for p in fs.ls(location.removeprefix("s3://") + "/progress", detail=False, refresh=True) if p.endswith(".json"))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def s3_cache(s3, teacher, tmp_path_factory):
    """A cache written to S3 by `hpd-tools cache --out s3://...`, and its data."""
    root = tmp_path_factory.mktemp("s3-cache")
    data = write_jsonl(root / "train.jsonl", train_records(24))
    location = url(uuid.uuid4().hex[:8], "c1")
    proc = finish(start(cache_cmd(teacher, data, location)))
    assert proc.returncode == 0, proc.stderr
    return {"url": location, "data": data, "stdout": proc.stdout, "stderr": proc.stderr}


def test_cache_on_s3_then_info_verify_list(s3_cache, teacher, tmp_path):
    location = s3_cache["url"]
    assert s3_cache["stdout"].strip() == location
    assert f"cache: complete at {location}" in s3_cache["stderr"]

    procs = [start(["info", location]), start(["verify", location]), start(["list", "--root", location.rsplit("/", 1)[0], "--json"])]
    info, checked, listed = (finish(p) for p in procs)
    assert info.returncode == 0, info.stderr
    meta = json.loads(info.stdout)
    assert meta["location"] == location and meta["complete"] and meta["units_done"] == meta["units_total"] > 1
    assert meta["bytes_on_disk"] > 0 and set(meta["bytes_by_array"]) == {"tokens", "offsets", "loss_mask", "example_id",
                                                                          "label_logprob", "topk_head", "topk_ids", "topk_logprobs"}
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["units_checked"] == meta["units_total"] and "ok:" in checked.stderr
    assert listed.returncode == 0, listed.stderr
    assert [(r["location"], r["key"], r["complete"]) for r in json.loads(listed.stdout)] == [(location, meta["key"], True)]

    local = build_cache(config(teacher, s3_cache["data"], out=str(tmp_path / "local")))
    assert local.key == meta["key"]
    assert_same_content(arrays(location), arrays(local.location), exact=True)
    reader = CacheReader(location, shuffle=False)
    assert [s.index for s in reader.sequences()] == list(range(local.sequences))


def test_reader_never_sees_a_half_written_cache(s3, teacher, tmp_path):
    """The default root is a URL here; the test process lists and opens the cache
    the whole time another process writes it."""
    data = write_jsonl(tmp_path / "d.jsonl", train_records(24))
    root = url(uuid.uuid4().hex[:8])
    log = (tmp_path / "writer.log").open("w")  # not a pipe: nobody reads it until the writer ends
    writer = subprocess.Popen([CLI, *cache_cmd(teacher, data, None)], env={**os.environ, "HPD_CACHE_HOME": root},
                              stdout=subprocess.PIPE, stderr=log, text=True)
    seen = []  # (listed, complete, units done, units total)
    refused = 0
    while True:
        finished = writer.poll() is not None
        rows = list_caches(root)
        if not rows:
            seen.append((False, False, 0, 0))
        else:
            store = CacheStore(rows[0]["location"])
            seen.append((True, rows[0]["complete"] or store.complete, len(store.done_units()), store.n_units))
            try:
                reader = CacheReader(rows[0]["location"])
            except CacheError as exc:
                assert "cache is incomplete" in str(exc)
                refused += 1
            else:
                assert len(reader.store.done_units()) == reader.store.n_units
        if finished:
            break
    stdout, _ = writer.communicate()
    log.close()
    assert writer.returncode == 0, (tmp_path / "writer.log").read_text()
    location = stdout.strip()
    assert location.startswith(root + "/") and seen[-1][1] and refused > 0
    # Whenever a reader saw it complete, every unit was done; and it was seen mid-write.
    assert all(done == total for _, complete, done, total in seen if complete)
    assert any(listed and not complete and 0 < done < total for listed, complete, done, total in seen), seen[:: max(len(seen) // 20, 1)]
    assert len(CacheReader(location)) == 24


def test_two_cache_commands_on_one_key_at_once(s3, teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(20))
    root = url(uuid.uuid4().hex[:8])
    procs = [start(cache_cmd(teacher, data, None), {"HPD_CACHE_HOME": root}) for _ in range(2)]
    results = [finish(p) for p in procs]
    for r in results:
        assert r.returncode == 0, r.stderr
    assert results[0].stdout == results[1].stdout
    location = results[0].stdout.strip()
    computed = [units_computed(r.stderr) for r in results]
    total = computed[0][1]
    # Every unit computed at least once; claims make duplicates rare (at most a race per unit).
    assert total <= computed[0][0] + computed[1][0] < 2 * total, computed
    report = verify_cache(location)
    assert report.complete and report.units_checked == total and report.units_claimed == 0
    assert not CacheStore(location).claimed_units()
    reference = build_cache(config(teacher, data, out=str(tmp_path / "ref"), reuse=False))
    assert_same_content(arrays(location), arrays(reference.location), exact=True)


def test_killed_writer_resumes(s3, teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", train_records(30))
    location = url(uuid.uuid4().hex[:8], "killed")
    env = {**os.environ, "HPD_CLAIM_LEASE_SECONDS": "3"}
    proc = subprocess.Popen([CLI, *cache_cmd(teacher, data, location)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while markers(location) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    store = CacheStore(location)
    done_before, total = len(store.done_units()), store.n_units
    assert 3 <= done_before < total and not store.complete
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(location)

    resumed = finish(start(cache_cmd(teacher, data, location), env))
    assert resumed.returncode == 0, resumed.stderr
    assert units_computed(resumed.stderr) == (total - done_before, total)
    report = verify_cache(location)
    assert report.complete and report.units_checked == total and report.units_claimed == 0
    reference = build_cache(config(teacher, data, out=str(tmp_path / "ref"), reuse=False))
    assert_same_content(arrays(location), arrays(reference.location), exact=True)


def test_claims_are_leases_kept_alive_by_a_heartbeat(s3_cache, monkeypatch):
    """A live writer's claim holds however long it works; once its process is
    killed the claim goes stale after the lease and another writer takes it."""
    location = s3_cache["url"]
    env = {**os.environ, "HPD_CLAIM_LEASE_SECONDS": "2"}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom hpd_tools.cache.layout import CacheStore\n"
                               f"print(CacheStore({location!r}).claim(0), flush=True)\ntime.sleep(120)"],
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        monkeypatch.setenv("HPD_CLAIM_LEASE_SECONDS", "2")
        rival = CacheStore(location)
        assert not rival.claim(0)
        time.sleep(3)  # past the lease: only the heartbeat keeps the claim
        assert not rival.claim(0) and 0 in rival.claimed_units()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while not rival.claim(0):
        assert time.time() < deadline, "a dead writer's claim was never taken over"
        time.sleep(0.5)
    rival.release(0)
    assert not rival.claimed_units()


def test_two_distill_runs_read_one_s3_cache(s3_cache, teacher, tmp_path):
    student = make_student(teacher, tmp_path / "student")
    procs = [start(["distill", "--cache", s3_cache["url"], "--student", str(student), "--out", str(tmp_path / f"run{i}"), "--max-steps", "3",
                    "--batch-tokens", "1024", "--loss-chunk-tokens", "256", "--lr", "1e-3"]) for i in range(2)]
    losses = []
    for i, result in enumerate(finish(p) for p in procs):
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == str(tmp_path / f"run{i}" / "final")
        rows = [json.loads(line) for line in (tmp_path / f"run{i}" / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if "loss" in r])
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_bad_urls_are_one_line_errors(s3, teacher, tmp_path):
    def one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and all(n in line for n in needles), line

    no_bucket = "s3://no-such-bucket-hpd/c"
    no_cache = url("nothing-here")
    offline = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    nobody = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None,  # and no credentials file
              "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    data = write_jsonl(tmp_path / "d.jsonl", train_records(4))
    cases = [
        (["info", "foo://bucket/c"], {}, ("foo://bucket/c", "not a storage URL")),
        (["list", "--root", no_bucket], {}, (no_bucket, "bucket does not exist")),
        (["verify", no_cache], {}, (no_cache, "not an hpd-tools cache")),
        (["info", no_cache], offline, (no_cache, "cannot reach the storage endpoint")),
        (["info", no_cache], nobody, (no_cache, "no usable credentials")),
        (cache_cmd(teacher, data, no_bucket), {}, (no_bucket, "bucket does not exist")),
    ]
    procs = [start(args, env) for args, env, _ in cases]
    for (_, _, needles), p in zip(cases, procs):
        one_line(finish(p), *needles)


def test_storage_lost_mid_training_is_a_one_line_error(s3, teacher, tmp_path):
    """The endpoint goes away while `distill` streams from it: the run stops with
    one line naming the URL and what failed, and keeps its last checkpoint."""
    import boto3

    server, endpoint = start_moto()
    try:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        location = url("lost")
        data = write_jsonl(tmp_path / "d.jsonl", train_records(24))
        made = finish(start(cache_cmd(teacher, data, location), env))
        assert made.returncode == 0, made.stderr
        student = make_student(teacher, tmp_path / "student")
        run = tmp_path / "run"
        proc = start(["distill", "--cache", location, "--student", str(student), "--out", str(run), "--max-steps", "1000",
                      "--batch-tokens", "512", "--loss-chunk-tokens", "256", "--save-every", "1"], env)
        deadline = time.time() + 120
        while not (run / "step-000002").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        server.kill()
        server.wait(10)
        result = finish(proc)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {location}: reading unit ") and "cannot reach the storage endpoint" in line, line
        assert (run / "step-000002" / "meta.json").exists()
    finally:
        server.kill()


def test_torchrun_ranks_stream_one_s3_cache(s3_cache, teacher, tmp_path):
    """Two DDP ranks read their partitions of one cache on S3 and take the steps
    one process with --grad-accum 2 takes on it."""
    from test_distributed import metrics, torchrun

    student = make_student(teacher, tmp_path / "student")
    args = ["distill", "--cache", s3_cache["url"], "--student", str(student), "--max-steps", "3", "--batch-tokens", "512",
            "--loss-chunk-tokens", "256", "--lr", "1e-3", "--loss", "fkl"]
    single = finish(start([*args, "--out", str(tmp_path / "one"), "--grad-accum", "2"]))
    assert single.returncode == 0, single.stderr[-2000:]
    ranks = torchrun(*args, "--out", str(tmp_path / "two"))
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    one = [r for r in metrics(tmp_path / "one") if "loss" in r]
    two = [r for r in metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 3
    assert [r["response_tokens"] for r in one] == [r["response_tokens"] for r in two]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
