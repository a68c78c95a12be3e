"""Quantisation: within its documented bound, unbiased, and never wraps at the maximum n."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from secagg.hazmat.prg import word_dtype
from secagg.hazmat.quantize import Quantizer

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@given(
    arrays(np.float64, st.integers(1, 50), elements=finite),
    st.integers(1, 40),
    st.sampled_from([32, 64]),
    st.floats(0.01, 100.0),
    st.floats(0.01, 1000.0),
)
def test_decoded_sum_within_bound(update: np.ndarray, n: int, bits: int, clip: float,
                                  max_weight: float) -> None:
    q = Quantizer(clip=clip, max_weight=max_weight, max_sites=n, word_bits=bits)
    rng = np.random.default_rng(0)
    weights = rng.uniform(0.001, 1.0, n) * max_weight
    total = np.zeros(update.shape[0] + 1, dtype=word_dtype(bits))
    exact = np.zeros(update.shape[0])
    for w in weights:
        total += q.encode(update, float(w))
        exact += np.clip(update, -clip, clip) * w
    weighted, weight_sum = q.decode_sum(total, n)
    bound_u, bound_w = q.error_bound(n)
    # float64 rounding in the encoder adds a few ulps of the range on top of the bound
    slack = 1e-12 * n * q.update_range
    assert np.all(np.abs(weighted - exact) <= bound_u + slack)
    assert abs(weight_sum - weights.sum()) <= bound_w + 1e-12 * n * max_weight


@given(st.integers(1, 2000), st.sampled_from([32, 64]))
def test_maximum_inputs_from_maximum_sites_never_wrap(n: int, bits: int) -> None:
    q = Quantizer(clip=1.0, max_weight=5.0, max_sites=n, word_bits=bits)
    top = q.encode(np.array([1.0, -1.0, 1e9]), 5.0)
    bottom = q.encode(np.array([-1.0, -1.0, -1e9]), 5.0)
    assert top[0] == q.levels and top[2] == q.levels and bottom[0] == 0
    # n copies of the largest encoding: the word sum must equal the integer sum (no wrap)
    total = top * np.array(n, dtype=top.dtype)  # wraps iff n * levels >= 2**bits
    assert int(total[0]) == n * q.levels
    weighted, weight_sum = q.decode_sum(total, n)
    assert weighted[0] == pytest.approx(n * 5.0, abs=q.error_bound(n)[0])
    assert weight_sum == pytest.approx(n * 5.0, abs=q.error_bound(n)[1])


def test_stochastic_rounding_is_unbiased() -> None:
    q = Quantizer(clip=1.0, max_weight=1.0, max_sites=2**20, word_bits=32)  # coarse steps
    x = 0.3 / q.update_scale  # puts the value between two grid points
    update = np.full(200_000, -1.0 + x * 1.37)
    encoded = q.encode(update, 1.0)[:-1].astype(np.float64)
    exact = (update[0] + q.update_range) * q.update_scale
    assert np.floor(exact) != exact
    assert set(np.unique(encoded)) == {np.floor(exact), np.floor(exact) + 1}
    assert abs(encoded.mean() - exact) < 0.01


@pytest.mark.parametrize(
    ("update", "weight", "error"),
    [
        (np.array([np.nan]), 1.0, "NaN"),
        (np.array([np.inf]), 1.0, "NaN or infinity"),
        (np.array([1.0]), 0.0, "weight"),
        (np.array([1.0]), 2.0, "weight"),
        (np.ones((2, 2)), 1.0, "flat"),
    ],
)
def test_encode_refuses_bad_input_naming_it(update: np.ndarray, weight: float, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Quantizer(clip=1.0, max_weight=1.0, max_sites=3).encode(update, weight)


def test_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="clip"):
        Quantizer(clip=0.0, max_weight=1.0, max_sites=3)
    with pytest.raises(ValueError, match="word_bits"):
        Quantizer(clip=1.0, max_weight=1.0, max_sites=3, word_bits=16)
    with pytest.raises(ValueError, match="precision"):
        Quantizer(clip=1.0, max_weight=1.0, max_sites=2**32, word_bits=32)
