"""The companded uint8 code for rank-sorted top-k log-probs: accuracy per entry,
monotone codes, saturation, mass preservation and the KL distortion it causes."""

from __future__ import annotations

import numpy as np
import pytest

from hpd_tools.cache import codec
from hpd_tools.cache.codec import MAX_CODE, MAX_DELTA, decode_logprobs, encode_logprobs, error_bound, kl_distortion

K = 64
VOCAB = 2000


def topk_logprobs(seed: int, n: int = 500, *, temperature: float = 1.0, peak: float = 0.0, k: int = K) -> np.ndarray:
    """Rank-sorted top-k of log_softmax(logits / temperature), float32 [n, k]."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, VOCAB)) * 3.0 / temperature
    if peak:
        logits[np.arange(n), rng.integers(0, VOCAB, n)] += peak
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return (-np.sort(-lp, axis=1)[:, :k]).astype(np.float32)


CASES = [(0, 0.5, 0.0), (1, 1.0, 0.0), (2, 2.0, 0.0), (3, 1.0, 12.0)]


@pytest.mark.parametrize("seed,temperature,peak", CASES)
def test_every_entry_within_its_error_bound(seed, temperature, peak):
    x = topk_logprobs(seed, temperature=temperature, peak=peak)
    head, codes = encode_logprobs(x)
    d = decode_logprobs(head, codes)
    assert head.dtype == np.float16 and codes.dtype == np.uint8 and d.dtype == np.float32 and d.shape == x.shape
    err = np.abs(d.astype(np.float64) - x)
    bound = error_bound(codes) + 2**-10 * np.abs(x)
    assert (err <= bound).all(), (err - bound).max()
    # Next to the top-1 the scale is fine: steps of (B + delta) / A, under 0.025 nats within 1 nat.
    near = (x[:, :1] - x) < 1.0
    assert err[near].max() < 0.025
    assert (d <= 0).all() and (np.diff(d, axis=1) <= 0).all()


@pytest.mark.parametrize("seed,temperature,peak", CASES)
def test_codes_never_decrease_along_a_row(seed, temperature, peak):
    _, codes = encode_logprobs(topk_logprobs(seed, temperature=temperature, peak=peak))
    assert (np.diff(codes.astype(int), axis=1) >= 0).all()
    assert codes[:, 0].max() == 0


def test_saturation_far_below_the_top():
    x = np.array([[-0.1, -2.0, -MAX_DELTA - 5.0, -MAX_DELTA - 40.0]], dtype=np.float32)
    head, codes = encode_logprobs(x)
    assert codes[0, 2] == codes[0, 3] == MAX_CODE
    d = decode_logprobs(head, codes)
    np.testing.assert_allclose(d[0, 2:], head.astype(np.float32)[0] - MAX_DELTA, atol=1e-4)
    assert np.isinf(error_bound(codes)[0, 2:]).all() and np.isfinite(error_bound(codes)[0, :2]).all()


def test_positive_top1_is_clamped():
    head, _ = encode_logprobs(np.array([[1e-4, -1.0]], dtype=np.float32))
    assert head[0] == 0


@pytest.mark.parametrize("seed,temperature,peak", CASES)
def test_mass_and_kl_are_preserved(seed, temperature, peak):
    x = topk_logprobs(seed, temperature=temperature, peak=peak)
    head, codes = encode_logprobs(x)
    d = decode_logprobs(head, codes)
    mass, mass_hat = np.exp(x.astype(np.float64)).sum(1), np.exp(d.astype(np.float64)).sum(1)
    assert np.abs(mass_hat - mass).max() < 2e-3
    kl, weighted = kl_distortion(x, d)
    assert (kl >= 0).all() and (weighted >= kl - 1e-12).all()
    assert kl.mean() < 1e-4


def test_mass_preserving_rounding_beats_round_to_nearest():
    x = topk_logprobs(7, n=2000, temperature=2.0)
    head, codes = encode_logprobs(x)
    h = head.astype(np.float64)[:, None]
    nearest = np.clip(np.rint(codec.A * np.log1p((h - x) / codec.B)), 0, MAX_CODE)
    kl_ef, _ = kl_distortion(x, decode_logprobs(head, codes))
    kl_nearest, _ = kl_distortion(x, decode_logprobs(head, nearest.astype(np.uint8)))
    assert kl_ef.mean() < kl_nearest.mean() / 3


def test_kl_distortion_is_zero_for_exact_input():
    x = topk_logprobs(5, n=20)
    kl, weighted = kl_distortion(x, x)
    assert (kl == 0).all() and (weighted == 0).all()
    kl, weighted = kl_distortion(x, x - 0.01)
    np.testing.assert_allclose(kl, 0.01 * np.exp(x.astype(np.float64)).sum(1), rtol=1e-4)


def test_describe_names_the_version():
    spec = codec.describe()
    assert spec["version"] == codec.CODEC_VERSION and spec["B"] == codec.B and spec["MAX_DELTA"] == MAX_DELTA
