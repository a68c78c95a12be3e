"""AES-256-GCM with mandatory associated data, for shares and key material in transit.

A sealed blob is ``nonce (12 bytes) || ciphertext || tag``. The nonce is random: each key
seals a handful of messages, far below GCM's random-nonce limit. Any failure to open is the
single opaque :class:`~secagg.errors.InvalidMessage`.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secagg.errors import InvalidMessage

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    # defence: hazmat.aead.key-length
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    # defence: hazmat.aead.random-nonce
    nonce = os.urandom(NONCE_BYTES)
    # defence: hazmat.aead.associated-data
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    # defence: hazmat.aead.key-length
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    # defence: hazmat.aead.short-input-opaque
    if not isinstance(sealed, bytes) or len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise InvalidMessage("sealed message")
    try:
        # defence: hazmat.aead.associated-data
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    # defence: hazmat.aead.failure-opaque
    except InvalidTag:
        raise InvalidMessage("sealed message") from None
