"""X25519 key agreement and HKDF-SHA256 derivation of pairwise keys and seeds.

Every derived key is bound to the session, a purpose label, and the *ordered* pair of site ids
(the smaller id first), so the two ends of a pair derive the same value and no value can be
replayed in another session, for another purpose or between another pair.
"""

from __future__ import annotations

from typing import NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg._encoding import encode
from secagg.errors import InvalidMessage

PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
_FIELD_PRIME = 2**255 - 19  # Curve25519's: a canonical u-coordinate is below it


class AgreementKey:
    """A fresh X25519 key pair. The private half stays inside: repr redacts, pickling refuses."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public_bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> AgreementKey:
        return cls(X25519PrivateKey.generate())

    def exchange(self, peer_public: bytes) -> bytes:
        return exchange(self._private, peer_public)

    def export_private_bytes(self) -> bytes:
        """The raw private scalar. Only for Shamir-sharing it; never log or store it."""
        return self._private.private_bytes_raw()

    def __repr__(self) -> str:
        # defence: hazmat.key-agreement.repr-redacts
        return f"AgreementKey(public={self.public_bytes.hex()[:16]}..., private=<redacted>)"

    # defence: hazmat.key-agreement.no-pickle
    def __reduce__(self) -> NoReturn:
        raise TypeError("AgreementKey holds a secret and cannot be pickled")


def exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519(private, peer_public); a malformed or low-order peer key is InvalidMessage."""
    # defence: hazmat.key-agreement.malformed-peer-key
    if not isinstance(peer_public, bytes) or len(peer_public) != PUBLIC_KEY_BYTES:
        raise InvalidMessage("public key")
    # X25519 ignores bit 255 and reduces u mod p, so a point has other encodings than the
    # one every honest key has (u < p, bit 255 clear): with one, a copy of another site's key
    # would pass a byte comparison ("no two sites share a key") as a different key
    # defence: hazmat.key-agreement.canonical-peer-key
    if int.from_bytes(peer_public, "little") >= _FIELD_PRIME:
        raise InvalidMessage("public key")
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    # defence: hazmat.key-agreement.low-order-point
    except ValueError:  # all-zero shared secret: a low-order point
        raise InvalidMessage("public key") from None


_CLASS_PROBE = X25519PrivateKey.generate()  # this process's; classes compare within it


def key_class(peer_public: bytes) -> bytes:
    """What X25519 makes of ``peer_public`` with any clamped private key, as bytes to compare
    in this process: two keys of one class agree on every shared secret. X25519 clamps
    private keys to multiples of 8, so a point plus any of the curve's eight small-order
    points (P + T: another canonical encoding, e.g. 1/u) gives the same secrets as P: "no two
    sites share a key" must compare classes, not bytes. The class is the shared secret with a
    private probe key (equal for P and P + T; for two points of the prime-order subgroup,
    equal only if they are one point). InvalidMessage for a key ``exchange`` refuses."""
    # defence: hazmat.key-agreement.keys-compared-by-class
    return exchange(_CLASS_PROBE, peer_public)


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    # defence: hazmat.key-agreement.private-key-length
    if len(raw) != PRIVATE_KEY_BYTES:
        raise InvalidMessage("private key")
    return X25519PrivateKey.from_private_bytes(raw)


def derive_pair_key(
    shared_secret: bytes, *, session_id: bytes, purpose: str, site_a: int, site_b: int,
    length: int = 32,
) -> bytes:
    """HKDF-SHA256 over ``shared_secret`` with info = (session, purpose, min id, max id)."""
    low, high = sorted((site_a, site_b))
    # defence: hazmat.key-agreement.info-session, hazmat.key-agreement.info-purpose
    # defence: hazmat.key-agreement.info-low-id, hazmat.key-agreement.info-high-id
    info = encode("pair-key", session_id, purpose, low, high)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(
        shared_secret
    )
