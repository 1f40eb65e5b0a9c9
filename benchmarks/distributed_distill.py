"""distill under torchrun against one process: step time, and memory per process.

    HPD_CACHE_HOME=... python benchmarks/distributed_distill.py
        [--teacher smollm2-135m-instruct] [--data data/instructions/train.jsonl]
        [--cache DIR] [--keep-layers 0 6 12 18 24 29] [--batch-tokens 1024]
        [--steps 8] [--nproc 2] [--json out.json]

Rows, each a real ``hpd-tools distill`` run (HPD loss, same student, same
cache, same global batch of ``nproc`` micro-batches of ``--batch-tokens``):

- ``1 process, --grad-accum N``: the baseline, measured in the same run;
- ``torchrun N, DDP``: N processes, one micro-batch each, gradients all-reduced;
- ``torchrun N, FSDP2``: the same with parameters, gradients and AdamW state
  sharded (``--fsdp``).

Step time is the median over the steps after the first two (from the run's
metrics.jsonl: tokens/s of each step, one per row). Peak RSS is the largest
resident set of any one process of the run (``getrusage`` of the children),
which for FSDP2 shows the sharded optimizer state. On a CPU machine with as
many cores as processes the processes split the cores the single process had,
so the ratio shows the cost of synchronisation and sharding, not a speed-up:
on GPUs each process has its own device.

The student is the teacher depth-pruned to ``--keep-layers`` (same tokenizer),
saved once; the cache is built once (engine hf, top-k 64) into ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_throughput import prune  # noqa: E402


_MEASURE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[1], 'w')).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)\n"
)


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` under a fresh parent; its wall seconds and the peak RSS (GB)
    of its largest process (torchrun's ranks included: they are waited for)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(log), *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kb, code = proc.stdout.split()
    if int(code) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return wall, int(peak_kb) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/instructions/train.jsonl")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hpd-distributed-cache"))
    parser.add_argument("--keep-layers", type=int, nargs="+", default=[0, 6, 12, 18, 24, 29])
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--loss", default="hpd")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpd_tools import CacheConfig, build_cache
    from hpd_tools.models import resolve_teacher

    teacher = resolve_teacher(args.teacher)
    cache = build_cache(CacheConfig(teacher=teacher, data=args.data, engine="hf", top_k=64, out=args.cache, chunk_tokens=2048, reuse=False))
    work = Path(tempfile.mkdtemp(prefix="hpd-dist-bench-"))
    student = work / "student"
    model = prune(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), args.keep_layers)
    model.save_pretrained(student)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(student)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    common = ["distill", "--cache", cache.location, "--student", str(student), "--loss", args.loss, "--max-steps", str(args.steps),
              "--batch-tokens", str(args.batch_tokens), "--loss-chunk-tokens", "512", "--lr", "1e-4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-addr", "127.0.0.1", "--master-port", "29533"]
    rows_spec = [
        (f"1 process, --grad-accum {args.nproc}", [sys.executable, "-m", "hpd_tools", *common, "--grad-accum", str(args.nproc)]),
        (f"torchrun {args.nproc}, DDP", [*torchrun, "-m", "hpd_tools", *common]),
        (f"torchrun {args.nproc}, FSDP2", [*torchrun, "-m", "hpd_tools", *common, "--fsdp"]),
    ]
    rows = []
    for name, cmd in rows_spec:
        out = work / name.replace(" ", "_").replace(",", "")
        wall, peak = run([*cmd, "--out", str(out)], work / f"{out.name}.log")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "tokens_per_s" in m]
        tokens = [m["response_tokens"] for m in steps]
        rates = [m["tokens_per_s"] for m in steps[2:]]
        losses = [round(m["loss"], 5) for m in steps]
        rows.append({"row": name, "median_tokens_per_s": statistics.median(rates), "wall_s": wall, "peak_rss_gb": peak, "losses": losses, "response_tokens": tokens})
        print(f"{name}: {statistics.median(rates):,.0f} tok/s, wall {wall:.0f} s, peak RSS {peak:.2f} GB", file=sys.stderr, flush=True)

    base = rows[0]["median_tokens_per_s"]
    print(f"\nstudent {n_params / 1e6:.1f}M params, {args.nproc} micro-batches of {args.batch_tokens} tokens per step, {args.steps} {args.loss} steps, {os.cpu_count()} CPU cores\n")
    print("| run | tokens/s (median, steps 3+) | vs 1 process | wall s | peak RSS of one process | same losses as 1 process |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        same = all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(r["losses"], rows[0]["losses"]))
        print(f"| {r['row']} | {r['median_tokens_per_s']:,.0f} | {r['median_tokens_per_s'] / base:.2f}x | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} GB | {'yes' if same else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "n_params": n_params, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
