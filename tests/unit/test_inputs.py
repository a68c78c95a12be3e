"""The shared boundary checks on what a site hands to a protocol role."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from secagg._inputs import check_site, check_update
from secagg.hazmat.quantize import Quantizer
from secagg.hazmat.signing import IdentityKey


@pytest.mark.parametrize(("update", "weight", "error", "match"), [
    (np.zeros(15), 0.5, ValueError, "shape"),
    (np.zeros((4, 4)), 0.5, ValueError, "flat"),
    (np.array([True, False] * 8), 0.5, TypeError, "numeric"),
    (np.zeros(16, dtype=np.complex128), 0.5, TypeError, "numeric"),
    (np.array(["1.0"] * 16), 0.5, TypeError, "numeric"),
    (np.full(16, np.inf), 0.5, ValueError, "NaN or infinity"),
    (np.zeros(16), 0.0, ValueError, "weight"),
    (np.zeros(16), -0.5, ValueError, "weight"),
    (np.zeros(16), 1.5, ValueError, "weight"),
    (np.zeros(16), "heavy", TypeError, "weight"),
    (np.zeros(16, dtype="timedelta64[s]"), 0.5, TypeError, "numeric"),
    (np.zeros(16), "0.5", TypeError, "weight must be a number, got str"),
    (np.zeros(16), True, TypeError, "weight must be a number, got bool"),
    (np.zeros(16), np.True_, TypeError, "weight must be a number, got bool"),
    (np.ma.masked_array(np.r_[np.zeros(15), 1e6], mask=[False] * 15 + [True]), 0.5,
     TypeError, "masked array"),
], ids=["short", "2d", "bool", "complex", "str", "inf", "weight-0", "weight-negative",
        "weight-above-max", "weight-str", "timedelta", "weight-numeric-str", "weight-true",
        "weight-numpy-true", "masked-array"])
def test_check_update_refuses_naming_the_parameter(update: np.ndarray, weight: object,
                                                   error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_update(update, weight, max_weight=1.0, length=16)


def test_check_update_accepts_the_boundaries() -> None:
    arr, w = check_update(np.arange(16, dtype=np.int64), 1, max_weight=1.0, length=16)
    assert arr.shape == (16,) and w == 1.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int32])
def test_narrow_updates_encode_within_the_documented_bound(dtype: type) -> None:
    """Kept in their own type, numpy multiplied float16 updates by the quantiser's scale in
    float16 (every element inf: a silently wrong average) and float32 ones in float32 (an
    error 40 times the documented bound)."""
    q = Quantizer(clip=1.0, max_weight=1.0, max_sites=3)
    update = np.array([0.001, 0.004, 0.35, 0.0, -0.7, 1.0] if dtype != np.int32
                      else [0, 1, -1, 0, 1, -1], dtype=dtype)
    weighted, weight = q.decode_sum(q.encode(update, 0.75), 1)
    exact = update.astype(np.float64) * 0.75
    assert np.max(np.abs(weighted - exact)) <= q.error_bound(1)[0]
    assert weight == pytest.approx(0.75, abs=q.error_bound(1)[1])
    arr, _ = check_update(update, 0.75, max_weight=1.0)
    assert arr.dtype == np.float64


def test_check_update_accepts_real_number_weights() -> None:
    for weight in (1, np.float32(0.5), np.int64(1), Fraction(1, 2), Decimal("0.5")):
        _, w = check_update(np.zeros(2), weight, max_weight=1.0)
        assert type(w) is float
    with pytest.raises(ValueError, match="weight is beyond the float range"):
        check_update(np.zeros(2), Fraction(10**400, 3), max_weight=1.0)


def test_check_site_refuses_unknown_site_and_foreign_identity() -> None:
    mine, other = IdentityKey.generate(), IdentityKey.generate()
    roster = {1: mine.public_bytes, 2: other.public_bytes}
    check_site(roster, 1, mine)
    with pytest.raises(ValueError, match="not on the round's roster"):
        check_site(roster, 3, mine)
    with pytest.raises(ValueError, match="does not match the roster"):
        check_site(roster, 1, other)


@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max,
                    reason="longdouble is float64 here")
def test_a_longdouble_update_beyond_float64_becomes_infinity_without_a_warning() -> None:
    """A finite longdouble beyond float64's range becomes +-inf, which the clip takes to
    +-clip: quietly (a site's script that turns warnings into errors crashed mid-submit)."""
    import warnings

    update = np.array([np.longdouble("1e400"), -np.longdouble("1e400"), 1], np.longdouble)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr, w = check_update(update, 0.5, max_weight=1.0)
    assert arr.dtype == np.float64 and arr.tolist() == [np.inf, -np.inf, 1.0] and w == 0.5
