"""Packed against padded batches: the same distill run with and without --pack.

    HPD_CACHE_HOME=... python benchmarks/packing.py [--cache DIR] [--keep-layers 0 6 12 18 24 29]
        [--batch-tokens 2048] [--steps 10] [--loss hpd] [--json out.json]

Rows, each a real ``hpd-tools distill`` run (same student, same cache, same
``--batch-tokens`` budget, one process): padded batches (the budget counts
longest x count, padding included) and packed ones (the budget counts real
tokens; sequences end to end in one row with position ids, each attending to
itself only). Reported: real tokens per second (median over steps 3+), real
tokens and response tokens per step, the share of the forward pass that is
padding, and peak RSS. The padded run is the baseline of the same run.

The student is the teacher depth-pruned to ``--keep-layers``; the cache is the
one benchmarks/distributed_distill.py builds (SmolLM2, bundled data, k 64).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_throughput import prune  # noqa: E402
from distributed_distill import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/instructions/train.jsonl")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hpd-distributed-cache"))
    parser.add_argument("--keep-layers", type=int, nargs="+", default=[0, 6, 12, 18, 24, 29])
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loss", default="hpd")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpd_tools import CacheConfig, build_cache
    from hpd_tools.models import resolve_teacher
    from hpd_tools.stream import CacheStream

    teacher = resolve_teacher(args.teacher)
    cache = build_cache(CacheConfig(teacher=teacher, data=args.data, engine="hf", top_k=64, out=args.cache, chunk_tokens=2048, reuse=False))
    work = Path(tempfile.mkdtemp(prefix="hpd-pack-bench-"))
    student = work / "student"
    prune(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), args.keep_layers).save_pretrained(student)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(student)

    def padding_share(**kw) -> float:
        """Share of the batch tensors' positions that are padding, over the run's steps."""
        stream = CacheStream([cache.location], batch_tokens=args.batch_tokens, seed=0, **kw)
        real = size = 0
        for _ in range(args.steps):
            b = stream.next_batch()
            real, size = real + b.n_tokens, size + b.input_ids.size
        return 1 - real / size

    shares = [padding_share(), padding_share(packed=True, pack_width=512), padding_share(packed=True)]

    common = [sys.executable, "-m", "hpd_tools", "distill", "--cache", cache.location, "--student", str(student), "--loss", args.loss,
              "--max-steps", str(args.steps), "--batch-tokens", str(args.batch_tokens), "--loss-chunk-tokens", "512", "--lr", "1e-4"]
    rows = []
    for name, extra in (("padded", []), ("packed, rows of 512", ["--pack", "--pack-width", "512"]), (f"packed, one row of {args.batch_tokens}", ["--pack"])):
        out = work / name.replace(" ", "_").replace(",", "")
        wall, peak = run([*common, *extra, "--out", str(out)], work / f"{out.name}.log")
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in steps if "tokens_per_s" in m]
        rate = statistics.median(m["tokens_per_s"] for m in steps[2:])
        rows.append({"row": name, "padding_share": shares[len(rows)], "tokens_per_s": rate, "wall_s": wall, "peak_rss_gb": peak,
                     "response_tokens_per_step": statistics.mean(m["response_tokens"] for m in steps)})
        print(f"{name}: {rate:,.0f} tok/s", file=sys.stderr, flush=True)

    base = rows[0]["tokens_per_s"]
    print(f"\n{args.loss}, {args.steps} steps of --batch-tokens {args.batch_tokens}, one process, attention: the student's default (sdpa on CPU)\n")
    print("| batches | padding share | real tokens/s (median, steps 3+) | vs padded | response tokens per step | wall s | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['row']} | {r['padding_share']:.0%} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | {r['response_tokens_per_step']:,.0f} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} GB |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
