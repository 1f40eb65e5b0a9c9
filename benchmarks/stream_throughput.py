"""Streaming a cache for training: the dense path against the compact one, local disk against S3 (moto).

    HPD_CACHE_HOME=... python benchmarks/stream_throughput.py [--cache DIR] [--teacher smollm2-135m-instruct]
        [--data data/instructions/train.jsonl] [--chunk-tokens 16384] [--batch-tokens 4096] [--epochs 10]
        [--no-s3] [--reuse] [--json out.json]

The first table reads the local cache through the training stream
(``StepStream`` + ``Prefetcher``, one data slot) both ways: "dense", every
position in int64 ids and float32 log-probs (the path before the compact
one), and "compact", the trained rows in their stored dtypes in one buffer
per batch; each with and without the conversion to the loss's tensors on the
CPU (``dense_targets`` / ``batch_targets``: on a GPU the compact batch is
decoded by the GPU, so the reader's own rate is the "reader only" row), and
the compact path's assembly alone from units already decoded in memory (what
is left when the codec costs nothing). "After the first batch" leaves out the
start-up (opening the cache, the first unit's read). Bytes per token: what a
batch ships to the device per token it holds.

Rows, each reading the same cache in full ``--epochs`` times through the
training stream (``StepStream`` + ``Prefetcher``, as ``distill`` does; one
data slot): decoded response and total tokens per second, and the time to the
first batch. The baseline is the local copy, measured in the same run. The S3
copy is uploaded to a moto server started here: this measures the client path
(s3fs, Zarr's FsspecStore, one request per chunk) with no network in between,
so a real object store adds its own latency per request on top; and the moto
server is a Python process on the same cores, whose CPU use is printed (on a
2-core machine it takes a large share of them).

The cache (built once into ``--cache``, engine hf, top-k 64) is the SmolLM2
demo-sized one unless given.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit("moto server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dense_bytes(batch) -> int:
    """What the dense path copies to the device: every position's int64 ids and float32 log-probs."""
    arrays = [batch.input_ids, batch.loss_mask, batch.label_logprob, batch.topk_ids, batch.topk_logprobs]
    return sum(a.nbytes for a in arrays) + (batch.position_ids.nbytes if batch.position_ids is not None else 0)


def read_all(location: str, batch_tokens: int, epochs: int, compact: bool = True, convert: bool = False) -> dict[str, float]:
    from hpd_tools.stream import Prefetcher, StepStream, batch_targets, dense_targets

    start = time.perf_counter()
    stream = StepStream([location], slots=[0], n_slots=1, batch_tokens=batch_tokens, seed=0, compact=compact)
    batches = Prefetcher(stream)
    first = None
    tokens = response = shipped = first_tokens = 0
    source = stream.streams[0].sources[0]
    while source.epoch < epochs:
        (batch,) = batches.next_batch()
        if first is None:
            first, first_tokens = time.perf_counter() - start, batch.n_tokens
        tokens += batch.n_tokens
        response += int(batch.loss_mask.sum())
        shipped += batch.payload.nbytes if compact else dense_bytes(batch)
        if convert:
            (batch_targets if compact else dense_targets)(batch, "cpu")
    batches.close()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "response_tokens_per_s": response / seconds, "first_batch_s": first,
            "steady_tokens_per_s": (tokens - first_tokens) / (seconds - first), "bytes_per_token": shipped / tokens}


def assembly_only(location: str, batch_tokens: int, epochs: int) -> dict[str, float]:
    """The compact path's batches from one epoch's units decoded beforehand: the
    reader's cost when the codec costs nothing."""
    from hpd_tools.cache.reader import CacheReader, assemble

    reader = CacheReader(location, seed=0)
    seqs = list(reader.sequences(0, form="compact"))
    start = time.perf_counter()
    tokens = response = shipped = 0
    for _ in range(epochs):
        pending: list = []
        width = 0
        for seq in seqs + [None]:
            n = 0 if seq is None else seq.q - seq.p
            if pending and (seq is None or max(width, n) * (len(pending) + 1) > batch_tokens):
                batch = assemble(pending, reader.k)
                tokens, response, shipped = tokens + batch.n_tokens, response + int(batch.loss_mask.sum()), shipped + batch.payload.nbytes
                pending, width = [], 0
            if seq is not None:
                pending.append(seq)
                width = max(width, n)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "response_tokens_per_s": response / seconds, "first_batch_s": None,
            "steady_tokens_per_s": tokens / seconds, "bytes_per_token": shipped / tokens}


def path_table(location: str, batch_tokens: int, epochs: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # the CPU conversions on one core, as a reader process beside a GPU trainer would have
    rows = []
    for name, fn in (("dense, reader only", lambda: read_all(location, batch_tokens, epochs, compact=False)),
                     ("dense + dense_targets on the CPU", lambda: read_all(location, batch_tokens, epochs, compact=False, convert=True)),
                     ("compact, reader only", lambda: read_all(location, batch_tokens, epochs)),
                     ("compact + batch_targets on the CPU", lambda: read_all(location, batch_tokens, epochs, convert=True)),
                     ("compact, assembly only (units decoded)", lambda: assembly_only(location, batch_tokens, epochs))):
        best = max((fn() for _ in range(2)), key=lambda r: r["tokens_per_s"])
        rows.append({"row": name, **best})
        print(f"{name}: {best['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hpd-distributed-cache"))
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/instructions/train.jsonl")
    parser.add_argument("--chunk-tokens", type=int, default=16384, help="the cache's units (the cache stage's default)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-s3", action="store_true", help="only the dense/compact table")
    parser.add_argument("--reuse", action="store_true", help="read a complete cache already at --cache as it is (its format, its units) instead of building it")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from hpd_tools import CacheConfig, build_cache, cache_info
    from hpd_tools.models import resolve_teacher

    from hpd_tools.cache.layout import CacheStore, is_cache

    if args.reuse and is_cache(args.cache) and CacheStore(args.cache).complete:
        location = args.cache
    else:
        location = build_cache(CacheConfig(teacher=resolve_teacher(args.teacher), data=args.data, engine="hf", top_k=64, out=args.cache,
                                           chunk_tokens=args.chunk_tokens, reuse=False)).location
    info = cache_info(location)
    codecs = {name: str(cache_codec(location, name)) for name in ("topk_ids", "topk_logprobs")}
    paths = path_table(location, args.batch_tokens, args.epochs)
    print(f"\ncache: {info['sequences']} sequences, {info['tokens']:,} tokens ({info['response_tokens']:,} response), k {info['k']}, "
          f"{info['units_total']} units of {args.chunk_tokens} tokens, {info['bytes_on_disk'] / 1e6:.1f} MB, ids {codecs['topk_ids']}, codes {codecs['topk_logprobs']}; "
          f"{args.epochs} epochs, {args.batch_tokens}-token batches, one data slot, best of 2\n")
    print("| path (local disk) | tokens/s | after the first batch | response tokens/s | vs dense | bytes per token shipped |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in paths:
        print(f"| {r['row']} | {r['tokens_per_s']:,.0f} | {r['steady_tokens_per_s']:,.0f} | {r['response_tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / paths[0]['tokens_per_s']:.2f}x | {r['bytes_per_token']:,.0f} |")
    if args.no_s3:
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "cache": {k: info[k] for k in ("sequences", "tokens", "response_tokens", "k", "units_total", "bytes_on_disk")},
                                                   "codecs": codecs, "paths": paths}, indent=2))
        return
    server, endpoint = moto()
    try:
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        t0 = time.perf_counter()
        fs.put(location.rstrip("/") + "/", "bench/cache", recursive=True)
        upload = time.perf_counter() - t0
        remote = "s3://bench/cache"
        rows = []
        for name, where in (("local disk", location), ("S3 (moto, 127.0.0.1)", remote), ("local disk (again)", location), ("S3 (again)", remote)):
            server_cpu = cpu_seconds(server.pid)
            r = read_all(where, args.batch_tokens, args.epochs)
            r["server_cpu_share"] = (cpu_seconds(server.pid) - server_cpu) / r["seconds"]
            rows.append({"row": name, **r})
            print(f"{name}: {r['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
    finally:
        server.kill()

    best = {}
    for r in rows:
        key = r["row"].split(" (again)")[0].split(" (moto")[0]
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    base = best["local disk"]["tokens_per_s"]
    print(f"\ncache: {info['sequences']} sequences, {info['tokens']:,} tokens ({info['response_tokens']:,} response), k {info['k']}, "
          f"{info['units_total']} units, {info['bytes_on_disk'] / 1e6:.1f} MB; uploaded to moto in {upload:.1f} s; {args.epochs} epochs, "
          f"{args.batch_tokens}-token batches, best of 2\n")
    print("| source | tokens/s | response tokens/s | vs local | first batch | S3 server's CPU (cores busy) |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, r in best.items():
        server = f"{r['server_cpu_share']:.2f}" if key.startswith("S3") else ""
        print(f"| {key} | {r['tokens_per_s']:,.0f} | {r['response_tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | {r['first_batch_s']:.2f} s | {server} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cache": {k: info[k] for k in ("sequences", "tokens", "response_tokens", "k", "units_total", "bytes_on_disk")},
                                               "codecs": codecs, "paths": paths, "upload_s": upload, "rows": rows}, indent=2))


def cache_codec(location: str, name: str) -> object:
    """The compressors of one array, as its Zarr metadata records them (whatever the cache format is)."""
    from hpd_tools.cache.layout import CacheStore

    array = CacheStore(location).array(name)
    codecs = ([] if type(array.serializer).__name__ == "BytesCodec" else [array.serializer]) + list(array.compressors)
    return "+".join(getattr(c, "codec_name", type(c).__name__).split(".")[-1] for c in codecs)


if __name__ == "__main__":
    main()
