"""Canonical, unambiguous byte encodings for everything that is hashed, signed or bound as AD.

Each field is length-prefixed (8-byte big-endian), so no two different field lists encode to
the same bytes. A domain label and format version lead every encoding.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

FORMAT_VERSION = b"secagg/v1"


def _field(value: bytes | bytearray | memoryview | str | int) -> bytes:
    if isinstance(value, str):
        raw = value.encode("utf-8")
    elif isinstance(value, int):
        # defence: encoding.ints-fixed-width
        raw = value.to_bytes(8, "big", signed=True)
    else:
        raw = bytes(value)
    # defence: encoding.length-prefix
    return struct.pack(">Q", len(raw)) + raw


def encode(label: str, *fields: bytes | str | int | Iterable[int]) -> bytes:
    """Encode ``fields`` under a domain ``label``. An iterable of ints encodes as one field."""
    # defence: encoding.format-version, encoding.domain-label
    parts = [_field(FORMAT_VERSION), _field(label)]
    for f in fields:
        if isinstance(f, bytes | bytearray | memoryview | str | int):
            parts.append(_field(f))
        else:
            ints = list(f)
            # defence: encoding.fixed-width-int-lists
            parts.append(_field(b"".join(i.to_bytes(8, "big", signed=True) for i in ints)))
    return b"".join(parts)


def digest(label: str, *fields: bytes | str | int | Iterable[int]) -> bytes:
    """SHA-256 over :func:`encode`."""
    return hashlib.sha256(encode(label, *fields)).digest()


PAYLOAD_CHUNK_BYTES = 1 << 20
_PARALLEL_MIN_BYTES = 2 * PAYLOAD_CHUNK_BYTES
_hash_pool: ThreadPoolExecutor | None = None


def _sha256(data: memoryview | bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _digests(parts: Sequence[memoryview | bytes]) -> list[bytes]:
    """SHA-256 of each part; large totals on two threads (hashlib releases the GIL)."""
    global _hash_pool
    if sum(len(p) for p in parts) < _PARALLEL_MIN_BYTES or len(parts) < 2:
        return [_sha256(p) for p in parts]
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1),
                                        thread_name_prefix="secagg-hash")
    return list(_hash_pool.map(_sha256, parts))


def payload_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest signed for a bulk payload: SHA-256 over its length and the SHA-256 of each
    1 MiB chunk. A streaming receiver computes it chunk by chunk as the chunks arrive; here
    large payloads hash their chunks on two threads."""
    view = memoryview(data).cast("B")
    n = len(view)
    # defence: encoding.payload-digest-every-chunk
    parts = [view[i : i + PAYLOAD_CHUNK_BYTES] for i in range(0, n, PAYLOAD_CHUNK_BYTES)]
    return payload_digest_of(n, _digests(parts))


def payload_digest_of(length: int, chunk_digests: Sequence[bytes]) -> bytes:
    """:func:`payload_digest` of a ``length``-byte payload from its 1 MiB chunks' SHA-256
    digests, in order (for a receiver that hashed them as they came)."""
    return digest("payload", length, b"".join(chunk_digests))


def parts_digest(parts: Sequence[bytes]) -> bytes:
    """The digest signed for a payload sent as a sequence of parts (e.g. ciphertext chunks)."""
    # defence: encoding.parts-digest-every-part
    return digest("parts", len(parts), b"".join(_digests(parts)))
