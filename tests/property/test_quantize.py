"""Quantisation: within its documented bound, unbiased, and never wraps at the maximum n."""

from __future__ import annotations

import warnings
from fractions import Fraction

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


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 1024])
def test_maximum_sum_never_wraps_for_powers_of_two_sites(n: int, bits: int) -> None:
    q = Quantizer(clip=1.0, max_weight=1.0, max_sites=n, word_bits=bits)
    top = q.encode(np.array([1.0]), 1.0)
    assert int(top[0]) == q.levels
    assert n * q.levels < 2**bits
    assert n * q.levels <= 2**53  # the decoded sum stays exact in float64


def test_two_encodings_of_the_same_update_round_differently() -> None:
    q = Quantizer(clip=1.0, max_weight=1.0, max_sites=2**20)
    update = np.full(1000, 0.3 / q.update_scale)  # between two grid points
    assert not np.array_equal(q.encode(update, 1.0), q.encode(update, 1.0))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"clip": float("inf")}, "clip must be a positive finite"),
    ({"clip": float("nan")}, "clip must be a positive finite"),
    ({"clip": -1.0}, "clip must be a positive finite"),
    ({"max_weight": 0.0}, "max_weight must be a positive finite"),
    ({"max_weight": float("inf")}, "max_weight must be a positive finite"),
    ({"max_sites": 0}, "max_sites"),
    ({"max_sites": 2.5}, "max_sites"),
    ({"clip": 1e308, "max_weight": 1e308}, "clip \\* max_weight"),
    ({"clip": 1e-320}, "clip \\* max_weight"),
    ({"clip": 1e-300, "max_weight": 1e-10}, "clip \\* max_weight"),
    ({"clip": 1e-296}, "clip \\* max_weight"),  # the range is normal, encode's factor is not
    ({"clip": "1"}, "clip must be a real number, got str"),
    ({"clip": None}, "clip must be a real number, got NoneType"),
    ({"clip": True}, "clip must be a real number, got bool"),
    ({"max_weight": 1j}, "max_weight must be a real number, got complex"),
    ({"word_bits": 32.0}, "word_bits must be the int 32 or 64"),
    ({"word_bits": "32"}, "word_bits must be the int 32 or 64"),
], ids=["clip-inf", "clip-nan", "clip-negative", "max_weight-0", "max_weight-inf",
        "max_sites-0", "max_sites-fraction", "range-overflows", "clip-subnormal",
        "range-subnormal", "encode-factor-overflows", "clip-str", "clip-none", "clip-bool",
        "max_weight-complex", "word_bits-float", "word_bits-str"])
def test_refuses_unsafe_parameters_naming_them(kwargs: dict[str, float], match: str) -> None:
    params = {"clip": 1.0, "max_weight": 1.0, "max_sites": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        Quantizer(**params)  # type: ignore[arg-type]


def test_other_real_numbers_are_taken_as_floats() -> None:
    q = Quantizer(clip=Fraction(1, 2), max_weight=np.float32(2.0), max_sites=np.int64(3))
    assert (type(q.clip), type(q.max_weight)) == (float, float)
    assert (q.clip, q.max_weight) == (0.5, 2.0)


def test_decoding_takes_an_int_count_and_the_word_dtype() -> None:
    """1.5 sites decoded to a silently wrong sum, and so did a float or wider array; a str
    array raised from inside numpy."""
    q = Quantizer(clip=1.0, max_weight=1.0, max_sites=3)
    summed = q.encode(np.zeros(4), 1.0)
    for n in (1.5, "1", None, True):
        with pytest.raises(ValueError, match="n_summed must be an int"):
            q.decode_sum(summed, n)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="n_summed must be an int"):
            q.error_bound(n)  # type: ignore[arg-type]
    for bad in (summed.astype(np.float64), summed.astype(np.int64), summed.astype(np.uint64),
                np.array(["a", "b"])):
        with pytest.raises(ValueError, match="summed must hold 32-bit unsigned words"):
            q.decode_sum(bad, 1)
    _, weight = q.decode_sum(summed, np.int64(1))
    assert weight == pytest.approx(1.0, abs=q.error_bound(1)[1])


def test_decoding_more_sites_than_configured_is_refused() -> None:
    q = Quantizer(clip=1.0, max_weight=1.0, max_sites=3)
    summed = q.encode(np.zeros(4), 1.0)
    with pytest.raises(ValueError, match="n_summed"):
        q.decode_sum(summed, 4)
    with pytest.raises(ValueError, match="n_summed"):
        q.decode_sum(summed, 0)


@pytest.mark.parametrize("bits", [32, 64])
def test_elements_beyond_the_clip_bound_encode_as_the_bound(bits: int) -> None:
    q = Quantizer(clip=1.0, max_weight=2.0, max_sites=8, word_bits=bits)
    with warnings.catch_warnings():  # (1e300 overflowed to inf, with numpy's RuntimeWarning)
        warnings.simplefilter("error")
        encoded = q.encode(np.array([-5.0, -1.0, 1.0, 5.0, -1e12, 1e12, -1e300, 1.7e308]),
                           2.0)[:-1]
    assert list(encoded) == [0, 0, q.levels, q.levels, 0, q.levels, 0, q.levels]
    weighted, _ = q.decode_sum(encoded.astype(word_dtype(bits)), 1)
    np.testing.assert_allclose(weighted[[0, 3]], [-2.0, 2.0], atol=q.error_bound(1)[0])


@pytest.mark.parametrize(("word_bits", "sites", "bits"), [(32, 3, 21), (32, 10_000, 32),
                                                           (64, 3, 0), (64, 4, 0), (64, 5, 1),
                                                           (64, 2**20, 18)])
def test_random_rounding_bits_are_what_the_docs_say(word_bits: int, sites: int,
                                                    bits: int) -> None:
    q = Quantizer(1.0, 1.0, sites, word_bits)
    assert q.rounding_bits == bits
    x = np.full(2000, 0.123456789)
    a, b = q.encode(x, 1.0), q.encode(x, 1.0)
    if bits == 0:  # a floor: deterministic, within one step below the exact value
        np.testing.assert_array_equal(a, b)
    else:
        assert len(set(a[:-1].tolist())) == 2  # both neighbouring steps occur


@pytest.mark.parametrize("summed", [np.zeros(0, np.uint32), np.zeros((2, 2), np.uint32), [1, 2]],
                         ids=["empty", "2-d", "list"])
def test_decoding_anything_but_a_vector_with_its_weight_is_a_clear_error(summed: object) -> None:
    q = Quantizer(clip=1.0, max_weight=1.0, max_sites=3)
    with pytest.raises(ValueError, match="1-D array"):
        q.decode_sum(summed, 1)  # type: ignore[arg-type]
