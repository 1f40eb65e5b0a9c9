"""How to store a top-k row: bytes per response token and forward-KL distortion of
candidate encodings, measured on one teacher's exact top-k over one dataset;
and, with --cache, the compressors' trade-off (bytes, encode and decode speed).

    python benchmarks/codec_choice.py [--teacher smollm2-135m-instruct] [--data data/instructions/train.jsonl] [--k 64]
    python benchmarks/codec_choice.py --cache DIR [--reps 5]

The exact top-k comes from the transformers engine (float32). Each candidate
compresses the same rows in chunks of --chunk rows, as the cache does. The row
marked "cache" is the codec hpd-tools writes (hpd_tools/cache/codec.py).

--cache DIR takes a cache's stored ids and codes (every position, chunked by its
units, prompt rows zero, as on disk) and prints, per candidate: bytes on disk
per response token, and encode / decode speed in MB/s of the uncompressed array
(uint16 ids: 2 bytes per id; codes: 1 byte), decode being everything from the
stored bytes back to the array. One thread; decode is the best of --reps passes,
encode the best of two. The rows marked "format 2" and "format 3" are what those
cache formats write.
"""

from __future__ import annotations

import argparse
import lzma
import time
from pathlib import Path

import numpy as np
from numcodecs import LZMA, Blosc, Shuffle, Zstd


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


def _timed(f, reps: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def trade_off(cache: str, reps: int) -> None:
    """Bytes and speed of each compressor on one cache's stored ids and codes."""
    import zarr

    from hpd_tools.cache import codec

    group = zarr.open_group(cache, mode="r")
    ids, codes, mask = group["topk_ids"][:], group["topk_logprobs"][:], group["loss_mask"][:]
    chunk = group["topk_ids"].chunks[0]
    responses = int(mask.sum())
    print(f"{cache}: {len(ids)} positions, {responses} response tokens, k={ids.shape[1]}, ids {ids.dtype}, chunks of {chunk}")

    def plain(compressor):
        return (lambda a: compressor.encode(a), lambda raw, like: np.frombuffer(compressor.decode(raw), like.dtype).reshape(like.shape))

    def shuffled(compressor):
        sh = Shuffle(elementsize=2)
        return (lambda a: compressor.encode(sh.encode(a)), lambda raw, like: np.frombuffer(sh.decode(compressor.decode(raw)), like.dtype).reshape(like.shape))

    def renumbered(level):
        return (lambda a: codec.encode_ids(a, level), lambda raw, like: codec.decode_ids(raw, like.dtype, like.shape))

    def steps(compressor):
        def encode(a):
            return compressor.encode(codec.rank_steps(a))

        def decode(raw, like):
            return codec.from_rank_steps(np.frombuffer(compressor.decode(raw), np.uint8).reshape(like.shape))
        return encode, decode

    candidates = {
        "ids": [
            ("LZMA-6 (format 2)", *plain(LZMA(preset=6))),
            ("Zstd-3", *plain(Zstd(level=3))),
            ("Zstd-19", *plain(Zstd(level=19))),
            ("Blosc-zstd-5 shuffle", *plain(Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE))),
            ("byte shuffle + Zstd-3", *shuffled(Zstd(level=3))),
            ("byte shuffle + Zstd-19", *shuffled(Zstd(level=19))),
            ("renumber + shuffle + Zstd-3 (format 3)", *renumbered(3)),
            ("renumber + shuffle + Zstd-9", *renumbered(9)),
            ("renumber + shuffle + Zstd-19", *renumbered(19)),
        ],
        "codes": [
            ("LZMA-6 (format 2)", *plain(LZMA(preset=6))),
            ("Zstd-3", *plain(Zstd(level=3))),
            ("Zstd-19", *plain(Zstd(level=19))),
            ("Delta (flat) + Zstd-9", *plain(_FlatDelta(Zstd(level=9)))),
            ("rank steps + Zstd-3", *steps(Zstd(level=3))),
            ("rank steps + Zstd-9 (format 3)", *steps(Zstd(level=9))),
            ("rank steps + Zstd-19", *steps(Zstd(level=19))),
            ("rank steps + LZMA-6", *steps(LZMA(preset=6))),
        ],
    }
    try:
        candidates["ids"].append(("ANS, unigram model (constriction)", *_ans_unigram(ids)))
    except ImportError:
        print("(constriction not installed: no entropy-coder row)")
    print(f"\n{'array':<6} {'encoding':<40} {'B/resp token':>12} {'encode MB/s':>12} {'decode MB/s':>12}")
    for name, array in (("ids", ids), ("codes", codes)):
        parts = [np.ascontiguousarray(array[i : i + chunk]) for i in range(0, len(array), chunk)]
        for label, encode, decode in candidates[name]:
            slow = "LZMA" in label or "ANS" in label or "-19" in label
            t_enc, blobs = _timed(lambda: [encode(p) for p in parts], 1 if slow else 2)
            t_dec, back = _timed(lambda: [decode(b, p) for b, p in zip(blobs, parts)], 1 if slow else reps)
            assert all(np.array_equal(x, p) for x, p in zip(back, parts)), label
            size = sum(len(b) for b in blobs)
            print(f"{name:<6} {label:<40} {size / responses:>12.1f} {array.nbytes / t_enc / 1e6:>12.0f} {array.nbytes / t_dec / 1e6:>12.0f}", flush=True)
    print("\nbytes on disk per response token, every array, this cache's arrays written with each format's codecs:")
    import tempfile

    totals = {}
    with tempfile.TemporaryDirectory() as tmp:
        for version in (2, 3):
            out = zarr.open_group(f"{tmp}/v{version}", mode="w")
            for name in group.array_keys():
                source = group[name]
                out.create_array(name, shape=source.shape, chunks=source.chunks, dtype=source.dtype, fill_value=0, **codec.zarr_codecs(name, version))[:] = source[:]
            totals[version] = {name: sum(f.stat().st_size for f in Path(tmp, f"v{version}", name).rglob("*") if f.is_file()) for name in group.array_keys()}
    print(f"  {'array':<14} {'format 2':>9} {'format 3':>9}")
    for name in sorted(totals[2]):
        print(f"  {name:<14} {totals[2][name] / responses:>9.1f} {totals[3][name] / responses:>9.1f}")
    print(f"  {'total':<14} {sum(totals[2].values()) / responses:>9.1f} {sum(totals[3].values()) / responses:>9.1f}  (array metadata included; the cache's checksum tables and markers add ~0.3)")


class _FlatDelta:
    """numcodecs' Delta over the flattened chunk, then a compressor."""

    def __init__(self, compressor):
        from numcodecs import Delta

        self.delta, self.compressor = Delta(dtype="u1"), compressor

    def encode(self, a):
        return self.compressor.encode(self.delta.encode(a))

    def decode(self, raw):
        return self.delta.decode(self.compressor.decode(raw))


def _ans_unigram(ids: np.ndarray):
    """An ANS coder over the cache's unigram id frequencies (the model is not counted in the bytes)."""
    import constriction

    counts = np.bincount(ids.reshape(-1), minlength=int(ids.max()) + 1).astype(np.float64) + 1e-3
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)

    def encode(a):
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(a.reshape(-1).astype(np.int32), model)
        return coder.get_compressed().tobytes()

    def decode(raw, like):
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(raw, np.uint32).copy())
        return coder.decode(model, like.size).astype(like.dtype).reshape(like.shape)
    return encode, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/instructions/train.jsonl")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16384)
    parser.add_argument("--exact", default="benchmarks/results/exact_topk.npz", help="where the exact top-k is kept between runs")
    parser.add_argument("--cache", help="a cache folder: print the compressors' bytes / encode / decode trade-off on its stored ids and codes instead")
    parser.add_argument("--reps", type=int, default=5, help="decode passes per candidate with --cache (the best counts)")
    args = parser.parse_args()
    if args.cache:
        trade_off(args.cache, args.reps)
        return
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
    add("cache: " + codec.CODEC_VERSION + " logprobs (+head)", compressed_size(codec.rank_steps(codes), Zstd(level=codec.CODES_LEVEL), args.chunk) + compressed_size(head, Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE, typesize=2), args.chunk), distortion(lp, codec.decode_logprobs(head, codes)), encode_s)

    print(f"\n{'encoding':<48} {'B/resp token':>12} {'mean|dKL|':>10} {'mean sum p|e|':>14} {'seconds':>8}")
    for name, b, dist, secs in rows:
        kl, weighted = ("", "") if dist is None else (f"{dist[0]:.2e}", f"{dist[1]:.2e}")
        print(f"{name:<48} {b:>12.1f} {kl:>10} {weighted:>14} {'' if secs is None else f'{secs:.2f}':>8}")


if __name__ == "__main__":
    main()
