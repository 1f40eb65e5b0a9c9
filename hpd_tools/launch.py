"""``hpd-tools cache --workers W``: start W shard writers of one cache and wait.

Writer w runs the same command with ``--shard I*W+w/N*W`` (``--shard I/N`` is
this node's part; default 0/1, the whole cache) and, when GPUs are visible, its
own ``--gpus-per-worker`` of them in CUDA_VISIBLE_DEVICES, so a node with 8
GPUs runs 8 vLLM engines (or 4 with tensor parallelism 2). Their progress lines
reach stderr prefixed with the writer's number. The cache is complete when the
last writer of every node has finished; no further command is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import IO

from .errors import HPDError


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch or no driver: CPU writers
        return []


def _strip(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` and their values."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in names:
            skip = True
            continue
        if any(arg.startswith(name + "=") for name in names):
            continue
        out.append(arg)
    return out


def _pump(stream: IO[str], prefix: str, sink: IO[str] | None, keep: list[str]) -> None:
    for line in stream:
        keep.append(line)
        if sink is not None:
            sink.write(prefix + line)
            sink.flush()


def launch_writers(argv: list[str], workers: int, shard: tuple[int, int], gpus_per_worker: int | None) -> str:
    """Run ``hpd-tools cache argv`` as ``workers`` shard writers; returns the cache location."""
    index, count = shard
    gpus = _visible_gpus()
    per = gpus_per_worker or 1
    if gpus and len(gpus) < workers * per:
        raise HPDError(f"--workers {workers} x --gpus-per-worker {per}: needs {workers * per} GPUs, {len(gpus)} visible")
    base = [sys.executable, "-m", "hpd_tools", "cache", *_strip(argv, ("--workers", "--shard", "--gpus-per-worker"))]
    procs, outs, errs, pumps = [], [], [], []
    for w in range(workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[w * per : (w + 1) * per])
        cmd = base + ["--shard", f"{index * workers + w}/{count * workers}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        out: list[str] = []
        err: list[str] = []
        pumps += [threading.Thread(target=_pump, args=(proc.stdout, "", None, out), daemon=True),
                  threading.Thread(target=_pump, args=(proc.stderr, f"[writer {w}] ", sys.stderr, err), daemon=True)]
        procs.append(proc)
        outs.append(out)
        errs.append(err)
    for t in pumps:
        t.start()
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    for t in pumps:
        t.join()
    failed = [(w, c) for w, c in enumerate(codes) if c != 0]
    if failed:
        w, c = failed[0]
        last = next((line.strip() for line in reversed(errs[w]) if line.strip()), "").removeprefix("error: ")
        raise HPDError(f"--workers: writer {w} (--shard {index * workers + w}/{count * workers}) exited with {c}: {last}")
    location = next((lines[-1].strip() for lines in outs if lines), "")
    return location
