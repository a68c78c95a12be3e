"""AES-256-GCM sealing: fresh nonces, associated data bound, one opaque error, 256-bit keys."""

from __future__ import annotations

import os

import pytest

from secagg._encoding import encode
from secagg.errors import InvalidMessage
from secagg.hazmat import aead

KEY = bytes(range(32))
AD = encode("share-ad", b"session", 1, 2, "share-keys")


def test_seal_then_open_round_trips() -> None:
    assert aead.open_sealed(KEY, aead.seal(KEY, b"share", AD), AD) == b"share"


def test_two_seals_of_the_same_plaintext_use_different_nonces() -> None:
    a = aead.seal(KEY, b"the same share", AD)
    b = aead.seal(KEY, b"the same share", AD)
    assert a[: aead.NONCE_BYTES] != b[: aead.NONCE_BYTES]
    assert a[aead.NONCE_BYTES :] != b[aead.NONCE_BYTES :]


@pytest.mark.parametrize(("field", "other"), [
    ("session", encode("share-ad", b"sessioN", 1, 2, "share-keys")),
    ("sender", encode("share-ad", b"session", 3, 2, "share-keys")),
    ("receiver", encode("share-ad", b"session", 1, 3, "share-keys")),
    ("direction", encode("share-ad", b"session", 2, 1, "share-keys")),
    ("stage", encode("share-ad", b"session", 1, 2, "unmask")),
    ("empty", b""),
], ids=["session", "sender", "receiver", "direction", "stage", "empty"])
def test_opening_with_other_associated_data_fails(field: str, other: bytes) -> None:
    sealed = aead.seal(KEY, b"share", AD)
    with pytest.raises(InvalidMessage):
        aead.open_sealed(KEY, sealed, other)


def test_tampered_ciphertext_is_one_opaque_error() -> None:
    sealed = bytearray(aead.seal(KEY, b"share", AD))
    for i in (0, aead.NONCE_BYTES, len(sealed) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(sealed)
        tampered[i] ^= 1
        with pytest.raises(InvalidMessage) as caught:
            aead.open_sealed(KEY, bytes(tampered), AD)
        assert str(caught.value) == "invalid sealed message"
    with pytest.raises(InvalidMessage):
        aead.open_sealed(os.urandom(32), bytes(sealed), AD)


@pytest.mark.parametrize("length", [0, 1, 5, 7, 8, 11, 12, 27])
def test_short_or_truncated_input_is_the_same_opaque_error(length: int) -> None:
    sealed = aead.seal(KEY, b"", AD)[:length]
    with pytest.raises(InvalidMessage) as caught:
        aead.open_sealed(KEY, sealed, AD)
    assert str(caught.value) == "invalid sealed message"


@pytest.mark.parametrize("sealed", [None, "a sealed share", bytearray(64), 12345])
def test_input_that_is_not_bytes_is_the_same_opaque_error(sealed: object) -> None:
    """Not bytes at all (a parser's None, a str): the one opaque error, never a TypeError
    from deep inside the cipher naming what it was given."""
    with pytest.raises(InvalidMessage) as caught:
        aead.open_sealed(KEY, sealed, AD)  # type: ignore[arg-type]
    assert str(caught.value) == "invalid sealed message"


@pytest.mark.parametrize("size", [16, 24, 31, 33])
def test_refuses_keys_that_are_not_256_bits(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        aead.seal(bytes(size), b"share", AD)
    with pytest.raises(ValueError, match="32 bytes"):
        aead.open_sealed(bytes(size), aead.seal(KEY, b"share", AD), AD)
