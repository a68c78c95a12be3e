"""Ed25519 identity keys: every message a site sends is signed with its long-term key.

``verify`` raises :class:`~secagg.errors.InvalidMessage`; it never returns a bool.
"""

from __future__ import annotations

from typing import NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secagg.errors import InvalidMessage

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityKey:
    """A site's long-term Ed25519 signing key. repr redacts; pickling refuses."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def __repr__(self) -> str:
        # defence: hazmat.signing.repr-redacts
        return f"IdentityKey(public={self.public_bytes.hex()[:16]}..., private=<redacted>)"

    # defence: hazmat.signing.no-pickle
    def __reduce__(self) -> NoReturn:
        raise TypeError("IdentityKey holds a secret and cannot be pickled")


def verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise :class:`InvalidMessage` unless ``signature`` is valid for ``message``."""
    # defence: hazmat.signing.malformed-opaque
    if (
        not isinstance(public_key, bytes)
        or len(public_key) != PUBLIC_KEY_BYTES
        or not isinstance(signature, bytes)
        or len(signature) != SIGNATURE_BYTES
    ):
        raise InvalidMessage("signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    # defence: hazmat.signing.verify-raises
    except (InvalidSignature, ValueError):
        raise InvalidMessage("signature") from None
