"""Seeded draws from a teacher's full distribution, for sampled caches.

A sampled cache stores, at every response position, the distinct ids among N
draws with replacement from the teacher's distribution p (temperature 1), each
with its count and its exact teacher log-prob (DESIGN.md section 8:
``p_hat(v) = count_v / N`` is unbiased for ``p(v)``).

The draws are a pure function of (record seed, position, draw index) and the
teacher's log-probs, whatever the batching, the engine or the device:

- :func:`record_seed` turns the cache's seed and a record's example id into a
  63-bit seed (host side, once per record).
- :func:`uniforms` makes the ``[rows, N]`` uniforms from (seed, position, j) by
  a counter-based hash (SplitMix64's finaliser in int64 arithmetic, which wraps
  the same way on CPUs and GPUs), on the positions' device: no generator state,
  no host round trip. 24 bits of resolution (2^-24 ~ 6e-8, the resolution of a
  float32 cumulative sum near 1).
- :func:`draw` inverts the CDF: ``searchsorted(cumsum(exp(lp)), u * total)``.
- :func:`distinct` reduces ``[rows, N]`` draws to the distinct ids with their
  counts and teacher log-probs, ordered by teacher log-prob (descending; ties by
  id), padded to width N with id 0, log-prob -inf and count 0.

So the transformers engine and vLLM draw the same tokens up to float
differences at CDF boundaries. Cost per row: one cumulative sum over the
vocabulary plus N binary searches; at 30k rows/s and a 152k vocabulary that is
~36 GB/s of memory traffic on a GPU (~1% of an H100's), in chunks of at most
``LOGPROB_CHUNK_ROWS`` rows ([rows, V] float32: 1.2 GB at 2,048 x 152k).
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
UNIFORM_BITS = 24
MAX_SAMPLES = 255  # counts are stored as uint8


def _signed(x: int) -> int:
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _splitmix_int(x: int) -> int:
    z = (x + _GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def record_seed(cache_seed: int, example_id: int) -> int:
    """A record's draw seed (signed 63-bit int) from the cache's seed and its example id."""
    return _splitmix_int(_splitmix_int(int(cache_seed) & MASK64) ^ (int(example_id) & MASK64)) >> 1


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix(z: Tensor) -> Tensor:
    z = z + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def uniforms(seed: int, positions: Tensor, n: int) -> Tensor:
    """float32 [rows, n] in (0, 1): draw j at position ``positions[r]`` of the record
    with ``seed``, on ``positions``' device. Pure in its inputs."""
    base = _signed(_splitmix_int(int(seed) & MASK64))
    counter = positions.to(torch.int64).reshape(-1, 1) * n + torch.arange(n, device=positions.device, dtype=torch.int64)
    z = _splitmix(counter + base)
    bits = _shr(z, 64 - UNIFORM_BITS).to(torch.float32)
    return (bits + 0.5) * (1.0 / (1 << UNIFORM_BITS))


def draw(logprobs: Tensor, u: Tensor) -> Tensor:
    """long [rows, n]: for each uniform, the first id whose cumulative probability
    (float32, from ``logprobs`` [rows, V]) exceeds ``u * total``; clamped to V-1."""
    cdf = logprobs.float().exp().cumsum_(-1)
    target = u.to(cdf.device, torch.float32) * cdf[:, -1:]
    return torch.searchsorted(cdf, target.contiguous(), right=True).clamp_(max=logprobs.shape[-1] - 1)


def distinct(ids: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct ids of each row of ``ids`` [rows, n] with their counts and teacher
    log-probs (gathered from ``logprobs`` [rows, V]).

    Returns ``(ids long [rows, n], logprobs float32 [rows, n], counts int32 [rows, n])``,
    each row's entries ordered by teacher log-prob, descending (ties by id), then
    padding: id 0, log-prob -inf, count 0. Counts of a row sum to n.
    """
    rows, n = ids.shape
    s, _ = ids.sort(dim=1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.to(torch.int64).cumsum_(1) - 1
    counts = torch.zeros((rows, n), dtype=torch.int32, device=ids.device).scatter_add_(1, group, torch.ones_like(s, dtype=torch.int32))
    uid = torch.zeros_like(s).scatter_(1, group, s)
    valid = counts > 0
    lp = logprobs.float().gather(1, uid).masked_fill_(~valid, float("-inf"))
    order = lp.argsort(dim=1, descending=True, stable=True)
    uid = uid.gather(1, order).masked_fill_(~valid.gather(1, order), 0)
    return uid, lp.gather(1, order), counts.gather(1, order)


def sample_rows(logprobs: Tensor, seed: int, positions: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`draw` then :func:`distinct` for one record's rows: ``logprobs`` [rows, V]
    at ``positions`` [rows] of the record with ``seed``; ``n`` draws per row."""
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"samples must be in 1..{MAX_SAMPLES}, got {n}")
    u = uniforms(seed, positions.to(logprobs.device), n)
    return distinct(draw(logprobs, u), logprobs)
