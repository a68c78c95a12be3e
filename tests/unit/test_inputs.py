"""The shared boundary checks on what a site hands to a protocol role."""

from __future__ import annotations

import numpy as np
import pytest

from secagg._inputs import check_site, check_update
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
], ids=["short", "2d", "bool", "complex", "str", "inf", "weight-0", "weight-negative",
        "weight-above-max", "weight-str"])
def test_check_update_refuses_naming_the_parameter(update: np.ndarray, weight: object,
                                                   error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_update(update, weight, max_weight=1.0, length=16)


def test_check_update_accepts_the_boundaries() -> None:
    arr, w = check_update(np.arange(16, dtype=np.int64), 1, max_weight=1.0, length=16)
    assert arr.shape == (16,) and w == 1.0


def test_check_site_refuses_unknown_site_and_foreign_identity() -> None:
    mine, other = IdentityKey.generate(), IdentityKey.generate()
    roster = {1: mine.public_bytes, 2: other.public_bytes}
    check_site(roster, 1, mine)
    with pytest.raises(ValueError, match="not on the round's roster"):
        check_site(roster, 3, mine)
    with pytest.raises(ValueError, match="does not match the roster"):
        check_site(roster, 1, other)
