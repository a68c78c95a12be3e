"""Shamir over GF(2**521 - 1): any t of n reconstruct; t - 1 do not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secagg.hazmat import shamir


@st.composite
def sharing(draw: st.DrawFn) -> tuple[int, int, dict[int, int], list[int]]:
    n = draw(st.integers(2, 30))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    secret = draw(st.integers(0, 2**256 - 1))
    shares = shamir.split(secret, t, xs)
    subset = draw(st.permutations(xs))
    return secret, t, shares, list(subset)


@given(sharing())
def test_any_threshold_shares_reconstruct(case: tuple[int, int, dict[int, int], list[int]]) -> None:
    secret, t, shares, order = case
    chosen = {x: shares[x] for x in order[:t]}
    assert shamir.reconstruct(chosen, t) == secret


@given(sharing())
def test_fewer_than_threshold_shares_do_not_reconstruct(
    case: tuple[int, int, dict[int, int], list[int]],
) -> None:
    secret, t, shares, order = case
    if t < 2:
        return
    chosen = {x: shares[x] for x in order[: t - 1]}
    with pytest.raises(ValueError, match="need"):
        shamir.reconstruct(chosen, t)
    # Interpolating the t-1 points as if the polynomial had lower degree gives a value that is
    # uniformly random in the field, not the secret (fails with probability 1/p).
    assert shamir.reconstruct(chosen, t - 1) != secret


def test_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(5, 2, [1, 1, 2])
    with pytest.raises(ValueError, match="x-coordinate"):
        shamir.split(5, 2, [0, 1, 2])
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(5, 4, [1, 2, 3])
    with pytest.raises(ValueError, match="field element"):
        shamir.split(shamir.PRIME, 2, [1, 2, 3])
    with pytest.raises(ValueError, match="66 bytes"):
        shamir.share_from_bytes(b"\x00" * 65)
    with pytest.raises(ValueError, match="field element"):
        shamir.share_from_bytes(b"\xff" * 66)


def test_share_bytes_round_trip() -> None:
    shares = shamir.split(2**255 + 7, 3, [1, 2, 3, 4])
    for y in shares.values():
        assert shamir.share_from_bytes(shamir.share_to_bytes(y)) == y
