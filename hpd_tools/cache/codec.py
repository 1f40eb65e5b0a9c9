"""How teacher log-probs are stored: the quantised top-k code and the Zarr codecs.

Top-k log-probs are sorted by rank, so each row is stored as its top-1
log-prob (``topk_head``, float16) plus one byte per entry, the distance below
the top-1 in steps of ``LOGPROB_STEP`` nats::

    topk_logprobs[i, j] = topk_head[i] - code[i, j] * LOGPROB_STEP

Codes are rounded to the nearest step, so a decoded log-prob is within half a
step (1/16 nat) of the teacher's, and codes saturate at 255 (about 32 nats
below the top-1, far below anything that carries weight). The top-1, which
carries most of the probability mass, keeps float16 precision.

Ids are the entropy bottleneck (a top-64 row of ids is ~11 bits per id after
compression, the log-prob codes ~1.5 bits). LZMA on uint16 ids beats
Blosc/Zstd by ~15% on this data (benchmarks/codec_choice.py measures it).
"""

from __future__ import annotations

from typing import Any

import warnings

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.codecs.numcodecs import LZMA

CODEC_VERSION = "delta8-v1"
LOGPROB_STEP = 0.125
MAX_CODE = 255
# A decoded top-k log-prob is within this of the teacher's (half a step, plus the
# float16 rounding of the top-1, which is at most 2**-11 relative).
TOLERANCE = LOGPROB_STEP / 2

# numcodecs' LZMA is not in the Zarr v3 core spec; zarr-python (with numcodecs,
# a dependency) reads it, which is all a cache reader needs.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def encode_logprobs(topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, k] rank-sorted log-probs -> (head float16 [n], codes uint8 [n, k])."""
    head = topk_logprobs[:, 0].astype(np.float16)
    head = np.minimum(head, np.float16(0))
    delta = (head.astype(np.float32)[:, None] - topk_logprobs) / LOGPROB_STEP
    codes = np.clip(np.rint(delta), 0, MAX_CODE).astype(np.uint8)
    # Ranks are sorted, so codes must not decrease along a row even after rounding.
    codes = np.maximum.accumulate(codes, axis=1)
    return head, codes


def decode_logprobs(head: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_logprobs`: float32 [n, k]."""
    return head.astype(np.float32)[:, None] - codes.astype(np.float32) * LOGPROB_STEP


def kl_distortion(exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Per row |sum_v p(v) (log p(v) - log p_hat(v))| over the top-k: what forward KL
    computed from the stored log-probs gets wrong, in nats. float64 [n]."""
    exact = exact.astype(np.float64)
    return np.abs((np.exp(exact) * (exact - decoded.astype(np.float64))).sum(axis=1))


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
    """The codec as recorded in a cache's attributes."""
    return {
        "version": CODEC_VERSION,
        "topk_logprobs": f"uint8 code: topk_head - code * {LOGPROB_STEP}",
        "logprob_step": LOGPROB_STEP,
        "max_code": MAX_CODE,
        "topk_ids": "LZMA(preset=6)",
        "label_logprob": "float16",
    }
