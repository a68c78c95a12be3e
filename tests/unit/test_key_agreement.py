"""Pairwise keys are bound to every field of their context; malformed keys are opaque errors."""

from __future__ import annotations

import pytest

from secagg.errors import InvalidMessage
from secagg.hazmat.key_agreement import (
    AgreementKey,
    derive_pair_key,
    exchange,
    private_key_from_bytes,
)

SECRET = bytes(range(32))
BASE = {"session_id": b"session", "purpose": "pairwise-mask-seed", "site_a": 3, "site_b": 9}


@pytest.mark.parametrize("change", [
    {"session_id": b"session2"},
    {"purpose": "share-encryption"},
    {"site_a": 4},  # the lower id of the pair
    {"site_b": 8},  # the higher id of the pair
    {"site_a": 9, "site_b": 10},
])
def test_pair_key_changes_with_every_field_of_its_context(change: dict[str, object]) -> None:
    base = derive_pair_key(SECRET, **BASE)  # type: ignore[arg-type]
    assert derive_pair_key(SECRET, **{**BASE, **change}) != base  # type: ignore[arg-type]


def test_both_ends_of_a_pair_derive_the_same_key() -> None:
    a, b = AgreementKey.generate(), AgreementKey.generate()
    k1 = derive_pair_key(a.exchange(b.public_bytes), session_id=b"s", purpose="p",
                         site_a=1, site_b=2)
    k2 = derive_pair_key(b.exchange(a.public_bytes), session_id=b"s", purpose="p",
                         site_a=2, site_b=1)
    assert k1 == k2


@pytest.mark.parametrize("peer", [None, "k" * 32, bytes(31), bytes(33)])
def test_malformed_peer_key_is_an_opaque_error(peer: object) -> None:
    with pytest.raises(InvalidMessage, match="public key"):
        AgreementKey.generate().exchange(peer)  # type: ignore[arg-type]


def test_low_order_peer_key_never_yields_a_shared_secret() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private = X25519PrivateKey.generate()
    # u = 0 and u = 1 are points of small order: X25519 with them is all zeros
    for u in (bytes(32), (1).to_bytes(32, "little")):
        with pytest.raises(InvalidMessage):
            exchange(private, u)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_private_key_of_the_wrong_length_is_an_opaque_error(size: int) -> None:
    with pytest.raises(InvalidMessage, match="private key"):
        private_key_from_bytes(bytes(size))


def test_a_point_in_another_encoding_is_refused_though_x25519_would_take_it() -> None:
    """Bit 255 set, or u >= p: X25519 would agree on the same secret as with the canonical
    encoding, so a copied key would pass a byte comparison as another key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private, peer = X25519PrivateKey.generate(), AgreementKey.generate()
    u = int.from_bytes(peer.public_bytes, "little")
    assert exchange(private, peer.public_bytes)
    for other in (u | 1 << 255, 9 + 2**255 - 19):
        with pytest.raises(InvalidMessage, match="public key"):
            exchange(private, other.to_bytes(32, "little"))


def test_keys_of_one_class_agree_on_every_secret_and_compare_equal() -> None:
    """P and P + T (T of small order; here (0, 0): u -> 1/u) are different canonical bytes
    but the same secrets with every clamped private key: key_class says they are one key,
    and tells two honest keys apart."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from secagg.hazmat.key_agreement import key_class

    a, b = AgreementKey.generate(), AgreementKey.generate()
    other = pow(int.from_bytes(a.public_bytes, "little"), -1, 2**255 - 19).to_bytes(32, "little")
    assert other != a.public_bytes
    private = X25519PrivateKey.generate()
    assert exchange(private, other) == exchange(private, a.public_bytes)
    assert key_class(other) == key_class(a.public_bytes) != key_class(b.public_bytes)
    with pytest.raises(InvalidMessage):
        key_class(bytes(32))
