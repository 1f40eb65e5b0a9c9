"""How to store a top-k row: bytes per response token and forward-KL distortion of
candidate encodings, measured on one teacher's exact top-k over one dataset.

    python benchmarks/codec_choice.py [--teacher smollm2-135m-instruct] [--data data/instructions/train.jsonl] [--k 64]

The exact top-k comes from the transformers engine (float32). Each candidate
compresses the same rows in chunks of --chunk rows, as the cache does. The row
marked "cache" is the codec hpd-tools writes (hpd_tools/cache/codec.py).
"""

from __future__ import annotations

import argparse
import lzma
import time
from pathlib import Path

import numpy as np
from numcodecs import LZMA, Blosc, Zstd


def exact_topk(teacher: str, data: str, k: int, save: Path) -> dict[str, np.ndarray]:
    if save.exists():
        return dict(np.load(save))
    from transformers import AutoTokenizer

    from hpd_tools.cache.writer import make_plan
    from hpd_tools.data import read_examples
    from hpd_tools.engines.hf import HFTeacher

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    examples, _ = read_examples(data, tokenizer, max_length=2048)
    plan = make_plan(examples, 1 << 14)
    engine = HFTeacher(teacher, batch_tokens=4096)
    ids, lps = [], []
    for e, start in zip(examples, plan.offsets[:-1]):
        sc = engine.score([e.tokens], k)[0]
        mask = plan.loss_mask[start : start + len(e.tokens) - 1]
        ids.append(sc.topk_ids[mask])
        lps.append(sc.topk_logprobs[mask])
    out = {"ids": np.concatenate(ids).astype(np.int64), "logprobs": np.concatenate(lps).astype(np.float32)}
    np.savez(save, **out)
    return out


def compressed_size(array: np.ndarray, compressor, chunk: int) -> int:
    return sum(len(compressor.encode(np.ascontiguousarray(array[i : i + chunk]))) for i in range(0, len(array), chunk))


def distortion(exact: np.ndarray, decoded: np.ndarray) -> tuple[float, float]:
    """(mean |forward-KL distortion|, mean probability-weighted |log-prob error|) per token."""
    from hpd_tools.cache.codec import kl_distortion

    kl, weighted = kl_distortion(exact, decoded)
    return float(kl.mean()), float(weighted.mean())


def uniform_code(lp: np.ndarray, step: float, dtype=np.uint8):
    head = np.minimum(lp[:, 0].astype(np.float16), 0)
    top = np.iinfo(dtype).max
    codes = np.clip(np.rint((head.astype(np.float32)[:, None] - lp) / step), 0, top).astype(dtype)
    codes = np.maximum.accumulate(codes, axis=1)
    return head, codes, head.astype(np.float32)[:, None] - codes * step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/instructions/train.jsonl")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16384)
    parser.add_argument("--exact", default="benchmarks/results/exact_topk.npz", help="where the exact top-k is kept between runs")
    args = parser.parse_args()
    from hpd_tools.models import resolve_teacher

    save = Path(args.exact)
    save.parent.mkdir(parents=True, exist_ok=True)
    d = exact_topk(resolve_teacher(args.teacher), args.data, args.k, save)
    ids, lp = d["ids"], d["logprobs"]
    n = len(ids)
    print(f"{n} response tokens, k={args.k}, vocab ids max {ids.max()}")
    ids16 = ids.astype(np.uint16)
    rows = []

    def add(name: str, nbytes: int, dist: tuple[float, float] | None = None, secs: float | None = None) -> None:
        rows.append((name, nbytes / n, dist, secs))

    for name, comp in [
        ("ids uint16 LZMA-6", LZMA(preset=6)),
        ("ids uint16 LZMA-9e", LZMA(preset=9 | lzma.PRESET_EXTREME)),
        ("ids uint16 Zstd-19", Zstd(level=19)),
        ("ids uint16 Blosc-zstd-9 shuffle", Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE)),
    ]:
        t = time.time()
        add(name, compressed_size(ids16, comp, args.chunk), secs=time.time() - t)
    t = time.time()
    add("ids uint16 transposed LZMA-6", sum(len(LZMA(preset=6).encode(np.ascontiguousarray(ids16[i : i + args.chunk].T))) for i in range(0, n, args.chunk)), secs=time.time() - t)
    # Ids renumbered by how often they occur in this cache's top-k (frequent ids small).
    values, counts = np.unique(ids, return_counts=True)
    rank_of = np.zeros(ids.max() + 1, dtype=np.uint16)
    rank_of[values[np.argsort(-counts)]] = np.arange(len(values), dtype=np.uint16)
    remapped = rank_of[ids]
    t = time.time()
    add("ids freq-remapped uint16 LZMA-6", compressed_size(remapped, LZMA(preset=6), args.chunk), secs=time.time() - t)
    t = time.time()
    add("ids freq-remapped transposed LZMA-6", sum(len(LZMA(preset=6).encode(np.ascontiguousarray(remapped[i : i + args.chunk].T))) for i in range(0, n, args.chunk)), secs=time.time() - t)
    p = counts / counts.sum()
    print(f"unigram entropy of top-k ids: {-(p * np.log2(p)).sum():.2f} bits/id = {-(p * np.log2(p)).sum() * args.k / 8:.1f} B/token")

    for step in (1 / 8, 1 / 16, 1 / 32):
        head, codes, dec = uniform_code(lp, step)
        add(f"logprobs uint8 step 1/{round(1 / step)} LZMA-6 (+head f16)", compressed_size(codes, LZMA(preset=6), args.chunk) + compressed_size(head, Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE, typesize=2), args.chunk), distortion(lp, dec))
    add("logprobs float16 Blosc-zstd shuffle", compressed_size(lp.astype(np.float16), Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE), args.chunk), distortion(lp, lp.astype(np.float16).astype(np.float32)))
    from hpd_tools.cache import codec

    head = np.minimum(lp[:, 0], 0).astype(np.float16)
    nearest = np.clip(np.rint(codec.A * np.log1p(np.maximum(head.astype(np.float64)[:, None] - lp, 0) / codec.B)), 0, 255).astype(np.uint8)
    nearest = np.maximum.accumulate(nearest, axis=1)
    add("logprobs companded, round-to-nearest (+head)", compressed_size(nearest, LZMA(preset=6), args.chunk) + compressed_size(head, Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE, typesize=2), args.chunk), distortion(lp, codec.decode_logprobs(head, nearest)))
    t = time.time()
    head, codes = codec.encode_logprobs(lp)
    encode_s = time.time() - t
    add("cache: " + codec.CODEC_VERSION + " logprobs (+head)", compressed_size(codes, LZMA(preset=6), args.chunk) + compressed_size(head, Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE, typesize=2), args.chunk), distortion(lp, codec.decode_logprobs(head, codes)), encode_s)

    print(f"\n{'encoding':<48} {'B/resp token':>12} {'mean|dKL|':>10} {'mean sum p|e|':>14} {'seconds':>8}")
    for name, b, dist, secs in rows:
        kl, weighted = ("", "") if dist is None else (f"{dist[0]:.2e}", f"{dist[1]:.2e}")
        print(f"{name:<48} {b:>12.1f} {kl:>10} {weighted:>14} {'' if secs is None else f'{secs:.2f}':>8}")


if __name__ == "__main__":
    main()
