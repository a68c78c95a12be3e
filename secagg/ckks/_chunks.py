"""Encrypting rows of slots into serialised ciphertexts (our canonical format, see
:mod:`secagg.ckks._seal`), in this process or in workers.

TenSEAL's bindings hold the GIL and are single-threaded, so parallel encryption means several
processes; each gets the context as bytes over a pipe (never a file) and encrypts a block of
rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tenseal import sealapi

from secagg.ckks import _seal


class ChunkEncryptor:
    """Encode + encrypt + serialise rows. ``secret_key`` given: seeded symmetric encryption
    (kind SEEDED); otherwise public-key encryption (kind FULL)."""

    def __init__(self, seal_context: Any, scale: float, *, public_key: Any = None,
                 secret_key: Any = None) -> None:
        if (public_key is None) == (secret_key is None):
            raise ValueError("give exactly one of public_key and secret_key")
        self._context = seal_context
        self._scale = scale
        self._encoder = sealapi.CKKSEncoder(seal_context)
        self._seeded = secret_key is not None
        self._encryptor = sealapi.Encryptor(seal_context, secret_key if self._seeded
                                            else public_key)

    @classmethod
    def for_context(cls, context: Any, seeded: bool) -> ChunkEncryptor:
        """From a KeyHolder (seeded or not) or a PublicContext (public-key only)."""
        scale = context.preset.scale
        if seeded:
            return cls(context.seal_context, scale, secret_key=context.secret_key)
        return cls(context.seal_context, scale, public_key=context.public_key)

    def encrypt_row(self, row: np.ndarray) -> bytes:
        plain = sealapi.Plaintext()
        self._encoder.encode(row, self._scale, plain)
        if self._seeded:
            # The Serializable form keeps the second polynomial as a PRNG seed: half the bytes.
            return _seal.dump_ciphertext(self._encryptor.encrypt_symmetric(plain), self._context,
                                         scale=self._scale)
        ct = sealapi.Ciphertext(self._context)
        self._encryptor.encrypt(plain, ct)
        return _seal.dump_ciphertext(ct, self._context, scale=self._scale)


_worker: ChunkEncryptor | None = None


def worker_init(context_bytes: bytes, seeded: bool) -> None:
    """Process-pool initialiser: load the context this worker encrypts under."""
    from secagg.ckks.keys import KeyHolder, PublicContext

    global _worker
    context = (KeyHolder.from_secret_context(context_bytes) if seeded
               else PublicContext.load(context_bytes))
    _worker = ChunkEncryptor.for_context(context, seeded)


def worker_encrypt(rows: np.ndarray) -> list[bytes]:
    assert _worker is not None, "worker_init did not run"
    return [_worker.encrypt_row(r) for r in rows]
