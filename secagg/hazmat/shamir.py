"""Shamir secret sharing over the prime field GF(2**521 - 1).

The field is larger than every secret we share (256-bit seeds and X25519 private keys), so a
secret is one field element. x-coordinates are site ids (distinct, non-zero, < p).

Guarantees (tested as properties): any ``threshold`` shares reconstruct the secret; fewer
reveal nothing about it (every secret is consistent with them). Coefficients come from the
``secrets`` CSPRNG. Lagrange coefficients at zero are cached per set of x-coordinates, since the
server reconstructs many secrets from the same responders.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

PRIME = 2**521 - 1  # a Mersenne prime
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_xs(xs: Iterable[int]) -> list[int]:
    out = list(xs)
    # defence: hazmat.shamir.distinct-xs
    if len(set(out)) != len(out):
        raise ValueError("share x-coordinates must be distinct")
    for x in out:
        # defence: hazmat.shamir.x-is-an-int
        if not isinstance(x, int) or isinstance(x, bool):
            raise ValueError(f"share x-coordinate must be an int, got {type(x).__name__}")
        # defence: hazmat.shamir.x-nonzero, hazmat.shamir.x-below-prime
        if not 0 < x < PRIME:
            raise ValueError(f"share x-coordinate must be in [1, p), got {x}")
    return out


def split(secret: int, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of a random degree ``threshold - 1`` polynomial with f(0) = secret."""
    xs = _check_xs(xs)
    # defence: hazmat.shamir.split-ints
    # (a float secret made float "shares" that reconstruct nothing; a str one a deep TypeError)
    if not (_is_int(secret) and _is_int(threshold)):
        raise ValueError(f"secret and threshold must be ints, got {type(secret).__name__} and "
                         f"{type(threshold).__name__}")
    # defence: hazmat.shamir.secret-in-field
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be a field element")
    # defence: hazmat.shamir.threshold-positive, hazmat.shamir.threshold-at-most-holders
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    # defence: hazmat.shamir.uniform-coefficients, hazmat.shamir.csprng-coefficients
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


@lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    coefficients = []
    for i, xi in enumerate(xs):
        num = 1
        den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        coefficients.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(coefficients)


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) from at least ``threshold`` shares (the ``threshold`` lowest x-coordinates are used)."""
    # defence: hazmat.shamir.reconstruct-threshold-positive
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise ValueError(f"threshold must be a positive int, got {threshold!r}")
    # defence: hazmat.shamir.reconstruct-takes-a-mapping
    # (a list of (x, y) pairs raised IndexError from inside; items() was read as x-coordinates)
    if not isinstance(shares, Mapping):
        raise ValueError(f"shares must be a mapping of x to y, got {type(shares).__name__}")
    # defence: hazmat.shamir.enough-shares
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    xs = tuple(sorted(_check_xs(shares))[:threshold])
    # defence: hazmat.shamir.reconstruct-shares-in-field
    if not all(isinstance(y := shares[x], int) and not isinstance(y, bool) and 0 <= y < PRIME
               for x in xs):
        raise ValueError("a share is not a field element")
    lambdas = _lagrange_at_zero(xs)
    return sum(lam * shares[x] for lam, x in zip(lambdas, xs, strict=True)) % PRIME


def secret_from_bytes(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def secret_to_bytes(secret: int, length: int) -> bytes:
    """Inverse of :func:`secret_from_bytes`; a value too large means a failed reconstruction."""
    # defence: hazmat.shamir.secret-fits, hazmat.shamir.secret-to-bytes-ints
    if not (_is_int(secret) and _is_int(length) and length >= 0
            and 0 <= secret < 1 << (8 * length)):
        raise ValueError("reconstructed value does not fit the secret's length")
    return secret.to_bytes(length, "big")


def share_to_bytes(y: int) -> bytes:
    # defence: hazmat.shamir.share-to-bytes-in-field
    # (PRIME itself fits in 66 bytes: its encoding would be refused by the receiver)
    if not (_is_int(y) and 0 <= y < PRIME):
        raise ValueError("share is not a field element")
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(raw: bytes) -> int:
    # defence: hazmat.shamir.share-length
    if len(raw) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    y = int.from_bytes(raw, "big")
    # defence: hazmat.shamir.share-canonical
    if y >= PRIME:
        raise ValueError("share is not a field element")
    return y
