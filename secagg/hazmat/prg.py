"""Mask expansion: an AES-256-CTR keystream under a full 256-bit seed, read as words.

Guarantees:
- the seed is the whole AES-256 key (never folded or truncated);
- word ``i`` of the stream for a seed is the same whether the stream is generated from 0 or
  from any ``start_word`` (the stream is seekable by 16-byte block), so a shard or a dropout
  recovery can regenerate any index range alone;
- words are little-endian ``uint32`` or ``uint64`` and arithmetic on them wraps modulo 2**bits.

The hot path writes the keystream into a reused buffer (``update_into``) and adds it in place:
no per-call allocation of mask-sized arrays.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_BLOCK = 16
WORD_DTYPES: dict[int, type[np.unsignedinteger]] = {32: np.uint32, 64: np.uint64}


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes | bytearray):
        raise TypeError("seed must be bytes")
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")


_zeros = b""


def _zero_input(nbytes: int) -> memoryview:
    """A shared, read-only run of zero bytes: CTR encrypts it into the keystream."""
    global _zeros
    if len(_zeros) < nbytes:
        _zeros = bytes(nbytes)
    return memoryview(_zeros)[:nbytes]


def word_dtype(word_bits: int) -> type[np.unsignedinteger]:
    try:
        return WORD_DTYPES[word_bits]
    except KeyError:
        raise ValueError(f"word_bits must be 32 or 64, got {word_bits}") from None


class MaskExpander:
    """Expands seeds into mask words for one index range ``[start_word, start_word + length)``.

    One expander serves many seeds; it owns the scratch buffers so that expanding a mask
    allocates nothing. ``bytes_generated`` counts keystream bytes produced (for benchmarks).
    """

    def __init__(self, length: int, *, word_bits: int = 32, start_word: int = 0) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if start_word < 0:
            raise ValueError(f"start_word must be >= 0, got {start_word}")
        self.dtype = np.dtype(word_dtype(word_bits)).newbyteorder("<")
        self.length = length
        word_bytes = self.dtype.itemsize
        start_byte = start_word * word_bytes
        self._first_block = start_byte // _BLOCK
        self._skip = start_byte % _BLOCK
        self._nbytes = self._skip + length * word_bytes
        # update_into wants room for one block more than the input.
        self._buf = bytearray(self._nbytes + _BLOCK)
        self._words = np.frombuffer(self._buf, dtype=self.dtype, count=length, offset=self._skip)
        self.bytes_generated = 0

    def _fill(self, seed: bytes) -> np.ndarray:
        _check_seed(seed)
        counter = self._first_block.to_bytes(_BLOCK, "big")
        enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(counter)).encryptor()
        enc.update_into(_zero_input(self._nbytes), self._buf)
        self.bytes_generated += self._nbytes
        return self._words

    def words(self, seed: bytes) -> np.ndarray:
        """A fresh array of the mask words for ``seed`` (a copy; the scratch is reused)."""
        return self._fill(seed).copy()

    def view(self, seed: bytes) -> np.ndarray:
        """The mask words for ``seed`` in the expander's scratch: valid until its next use."""
        return self._fill(seed)

    def add_to(self, target: np.ndarray, seed: bytes) -> None:
        """``target += mask(seed)`` modulo 2**bits, in place."""
        np.add(target, self._fill(seed), out=target)

    def subtract_from(self, target: np.ndarray, seed: bytes) -> None:
        """``target -= mask(seed)`` modulo 2**bits, in place."""
        np.subtract(target, self._fill(seed), out=target)


def expand(seed: bytes, length: int, *, word_bits: int = 32, start_word: int = 0) -> np.ndarray:
    """The ``length`` mask words for ``seed`` starting at word ``start_word``."""
    return MaskExpander(length, word_bits=word_bits, start_word=start_word).words(seed)
