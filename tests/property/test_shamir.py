"""Shamir over GF(2**521 - 1): any t of n reconstruct; t - 1 do not."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
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
    assume(t >= 2)  # (one share is the threshold itself; an early return passed silently)
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


def test_refuses_x_coordinates_congruent_to_zero_and_threshold_zero() -> None:
    # x = p is x = 0 in the field: its share would be the secret itself
    for xs in ([1, shamir.PRIME], [1, shamir.PRIME + 1], [1, -1]):
        with pytest.raises(ValueError, match="x-coordinate"):
            shamir.split(5, 2, xs)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(5, 0, [1, 2, 3])


def test_reconstruct_refuses_what_split_would_refuse() -> None:
    """A threshold of 0 "reconstructed" 0 and a negative one sliced the shares from the end;
    x = True or 1.0 passed as x = 1; a share outside the field was reduced silently."""
    shares = shamir.split(5, 2, [1, 2, 3])
    for threshold in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="threshold must be a positive int"):
            shamir.reconstruct(shares, threshold)  # type: ignore[arg-type]
    for x in (True, 1.0):
        with pytest.raises(ValueError, match="must be an int"):
            shamir.reconstruct({x: shares[1], 2: shares[2]}, 2)  # type: ignore[dict-item]
    for y in (shamir.PRIME + shares[1], -1, 1.0, True):
        with pytest.raises(ValueError, match="not a field element"):
            shamir.reconstruct({1: y, 2: shares[2]}, 2)  # type: ignore[dict-item]
    assert shamir.reconstruct(shares, 2) == 5


def test_coefficients_are_uniform_over_the_field() -> None:
    # threshold 2: the share at x = 1 minus the secret is the one random coefficient. Drawn
    # uniformly below p it is >= 2**256 except with probability 2**-265 per draw.
    draws = [(shamir.split(7, 2, [1, 2])[1] - 7) % shamir.PRIME for _ in range(64)]
    assert sum(d >= 2**256 for d in draws) / 64 > 0.9
    assert len(set(draws)) == 64  # and never repeat
    assert max(draws).bit_length() > 515  # they reach the top of the field


def test_share_encoding_is_canonical() -> None:
    with pytest.raises(ValueError, match="field element"):
        shamir.share_from_bytes(shamir.PRIME.to_bytes(shamir.SHARE_BYTES, "big"))
    assert shamir.share_from_bytes((shamir.PRIME - 1).to_bytes(66, "big")) == shamir.PRIME - 1


def test_reconstructed_value_too_large_for_the_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        shamir.secret_to_bytes(1 << 256, 32)
    assert shamir.secret_to_bytes((1 << 256) - 1, 32) == b"\xff" * 32


def test_split_takes_only_int_secret_and_threshold() -> None:
    """A float secret made float "shares" that reconstructed nothing; a str one, or a
    non-int threshold, raised TypeError from inside the polynomial arithmetic."""
    for secret, threshold in ((5.0, 2), ("5", 2), (True, 2), (5, 2.0), (5, "2"), (5, True)):
        with pytest.raises(ValueError, match="secret and threshold must be ints"):
            shamir.split(secret, threshold, [1, 2, 3])  # type: ignore[arg-type]
    assert shamir.reconstruct(shamir.split(5, 2, [1, 2, 3]), 2) == 5


def test_reconstruct_takes_only_a_mapping() -> None:
    shares = shamir.split(5, 2, [1, 2, 3])
    for bad in (list(shares.items()), shares.items(), None, [1, 2, 3]):
        with pytest.raises(ValueError, match="shares must be a mapping"):
            shamir.reconstruct(bad, 2)  # type: ignore[arg-type]


def test_encoders_refuse_values_outside_their_range() -> None:
    # PRIME fits in 66 bytes, but its encoding is not a share: refuse it where it is made
    for y in (shamir.PRIME, -1, 1.0):
        with pytest.raises(ValueError, match="not a field element"):
            shamir.share_to_bytes(y)  # type: ignore[arg-type]
    for secret in (-1, 1.0, True):
        with pytest.raises(ValueError, match="does not fit"):
            shamir.secret_to_bytes(secret, 32)  # type: ignore[arg-type]
    assert shamir.share_to_bytes(shamir.PRIME - 1) == (shamir.PRIME - 1).to_bytes(66, "big")
