"""What checking every chunk's CRC-32C costs a reader (cache format 2).

    HPD_CACHE_HOME=... python benchmarks/checksum_cost.py [--cache DIR] [--teacher smollm2-135m-instruct]
        [--data data/instructions/train.jsonl] [--epochs 5] [--json out.json]

Reads one cache (built once into ``--cache`` with the transformers engine at
top-k 64, the demo's shape) in full ``--epochs`` times through ``CacheReader``,
with the checks on (as every reader runs) and off (the baseline: the store's
recorded checksums ignored, as for a format 1 cache), alternating on/off/on/off
in the same run and keeping the best of two of each. Also times CRC-32C alone
over the cache's chunk files, the work the check adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def read_all(location: str, epochs: int, checked: bool) -> dict[str, float]:
    from hpd_tools import CacheReader

    start = time.perf_counter()
    tokens = 0
    for epoch in range(epochs):
        reader = CacheReader(location, seed=epoch)
        reader.store.checked = checked  # False: recorded checksums are not consulted (the baseline)
        for seq in reader.sequences(epoch):
            tokens += len(seq.tokens)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hpd-checksum-cache"))
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/instructions/train.jsonl")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from hpd_tools import CacheConfig, build_cache, cache_info
    from hpd_tools.cache import integrity
    from hpd_tools.models import resolve_teacher

    cache = build_cache(CacheConfig(teacher=resolve_teacher(args.teacher), data=args.data, engine="hf", top_k=64, out=args.cache, reuse=False))
    info = cache_info(cache.location)
    rows = []
    for checked in (True, False, True, False):
        r = read_all(cache.location, args.epochs, checked)
        rows.append({"checks": "on" if checked else "off (baseline)", **r})
        print(f"checks {'on' if checked else 'off'}: {r['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
    files = [f for f in Path(cache.location).rglob("*") if f.is_file() and "/c/" in f.as_posix()]
    blobs = [f.read_bytes() for f in files]
    total = sum(len(b) for b in blobs)
    t0 = time.perf_counter()
    for _ in range(20):
        for b in blobs:
            integrity.crc(b)
    crc_rate = 20 * total / (time.perf_counter() - t0)

    best = {}
    for r in rows:
        if r["checks"] not in best or r["tokens_per_s"] > best[r["checks"]]["tokens_per_s"]:
            best[r["checks"]] = r
    base = best["off (baseline)"]["tokens_per_s"]
    print(f"\ncache: {info['sequences']} sequences, {info['tokens']:,} tokens, k {info['k']}, {info['units_total']} units, "
          f"{info['bytes_on_disk'] / 1e6:.2f} MB; {args.epochs} epochs per row, best of 2; CRC-32C alone over its {len(files)} chunk files: "
          f"{crc_rate / 1e9:.2f} GB/s\n")
    print("| checksums | tokens/s | vs baseline |")
    print("|---|---:|---:|")
    for key, r in best.items():
        print(f"| {key} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.3f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cache": {k: info[k] for k in ("sequences", "tokens", "k", "units_total", "bytes_on_disk")},
                                               "crc32c_bytes_per_s": crc_rate, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
