"""How teacher log-probs are stored: the quantised top-k code and the Zarr codecs.

Top-k log-probs are sorted by rank, so each row is stored as its top-1
log-prob (``topk_head``, float16) plus one byte per entry that encodes the
distance below the top-1, ``delta >= 0`` nats, on a companded scale::

    code  = A * log1p(delta / B)                      (rounded, see below)
    delta = B * expm1(code / A),   A = 255 / log1p(MAX_DELTA / B)
    topk_logprobs[i, j] = topk_head[i] - delta(code[i, j])

With B = 0.5 and MAX_DELTA = 24 nats the steps are 0.008 nats next to the
top-1 and grow with the distance, where the probabilities and their weight in
any KL are small. Entries more than 24 nats below the top-1 saturate at code
255 (they decode as exactly 24 nats below it).

Rounding is mass-preserving: along each row, in rank order, each code is
rounded down or up, whichever keeps the running probability-weighted error
``sum_j p_j (log p_j - log p_hat_j)`` nearest zero. Every entry stays within
one step of the teacher's value, and a row's forward KL and top-k mass come
out right rather than drifting by the sum of independent roundings (on the
bundled data: mean |KL distortion| 5e-5 nats instead of 1.1e-3 with
round-to-nearest, for the same bytes; benchmarks/codec_choice.py).

Ids are the entropy bottleneck (~12 bits per id after compression, the codes
~3 bits). LZMA on uint16 ids beats Zstd/Blosc by ~8% on this data.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.codecs.numcodecs import LZMA

CODEC_VERSION = "compand8-ef-v1"
KNOWN_CODECS = (CODEC_VERSION,)  # codecs this version decodes
B = 0.5
MAX_DELTA = 24.0
MAX_CODE = 255
A = MAX_CODE / np.log1p(MAX_DELTA / B)

# numcodecs' LZMA is not in the Zarr v3 core spec; zarr-python (with numcodecs,
# a dependency) reads it, which is all a cache reader needs.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def _delta(codes: np.ndarray) -> np.ndarray:
    return B * np.expm1(codes.astype(np.float64) / A)


def encode_logprobs(topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, k] rank-sorted log-probs -> (head float16 [n], codes uint8 [n, k])."""
    lp = topk_logprobs.astype(np.float64)
    head = np.minimum(topk_logprobs[:, 0], 0).astype(np.float16)
    h = head.astype(np.float64)
    x = A * np.log1p(np.maximum(h[:, None] - lp, 0) / B)
    p = np.exp(lp)
    n, k = lp.shape
    codes = np.empty((n, k), dtype=np.uint8)
    error = np.zeros(n)
    prev = np.zeros(n, dtype=np.int64)
    for j in range(k):
        # Ranks are sorted, so codes never decrease along a row.
        lo = np.minimum(np.maximum(np.floor(x[:, j]).astype(np.int64), prev), MAX_CODE)
        hi = np.minimum(np.maximum(np.ceil(x[:, j]).astype(np.int64), prev), MAX_CODE)
        err_lo = error + p[:, j] * (lp[:, j] - (h - _delta(lo)))
        err_hi = error + p[:, j] * (lp[:, j] - (h - _delta(hi)))
        take_lo = np.abs(err_lo) <= np.abs(err_hi)
        prev = np.where(take_lo, lo, hi)
        error = np.where(take_lo, err_lo, err_hi)
        codes[:, j] = prev
    return head, codes


def decode_logprobs(head: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_logprobs`: float32 [n, k]."""
    return (head.astype(np.float64)[:, None] - _delta(codes)).astype(np.float32)


def error_bound(codes: np.ndarray) -> np.ndarray:
    """Largest |decoded - exact| an entry with this code can have (one step of the
    scale at that code, plus the float16 rounding of the top-1); inf where the
    code saturated (the exact value is then anywhere below the decoded one)."""
    c = codes.astype(np.float64)
    step = B * (np.expm1((c + 1) / A) - np.expm1(c / A))
    return np.where(codes >= MAX_CODE, np.inf, step + 1e-3)


def kl_distortion(exact: np.ndarray, decoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, float64 [n] each, over the top-k:

    - |sum_v p(v) (log p(v) - log p_hat(v))|: what forward KL computed from the
      stored log-probs gets wrong, in nats;
    - sum_v p(v) |log p(v) - log p_hat(v)|: the probability-weighted absolute
      error, which no cancellation between entries can hide.
    """
    exact = exact.astype(np.float64)
    weighted = np.exp(exact) * (exact - decoded.astype(np.float64))
    return np.abs(weighted.sum(axis=1)), np.abs(weighted).sum(axis=1)


def zarr_codecs(name: str) -> dict[str, Any]:
    """compressors/filters for each cache array, chosen for its data."""
    if name == "topk_ids":
        return {"compressors": [LZMA(preset=6)]}
    if name == "topk_logprobs":
        return {"compressors": [LZMA(preset=6)]}
    if name in ("label_logprob", "topk_head"):
        return {"compressors": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=2)]}
    return {"compressors": [ZstdCodec(level=5)]}


def describe() -> dict[str, Any]:
    """The codec as recorded in a cache's attributes: enough to decode without hpd-tools."""
    return {
        "version": CODEC_VERSION,
        "topk_logprobs": "uint8 code c: topk_head - B * expm1(c / A), A = 255 / log1p(MAX_DELTA / B)",
        "B": B,
        "MAX_DELTA": MAX_DELTA,
        "rounding": "mass-preserving (error feedback along each row)",
        "topk_ids": "LZMA(preset=6)",
        "label_logprob": "float16",
        "topk_head": "float16",
    }
