"""Canonical, unambiguous byte encodings for everything that is hashed, signed or bound as AD.

Each field is length-prefixed (8-byte big-endian), so no two different field lists encode to
the same bytes. A domain label and format version lead every encoding.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

FORMAT_VERSION = b"secagg/v1"


def _field(value: bytes | bytearray | memoryview | str | int) -> bytes:
    if isinstance(value, str):
        raw = value.encode("utf-8")
    elif isinstance(value, int):
        raw = value.to_bytes(8, "big", signed=True)
    else:
        raw = bytes(value)
    return struct.pack(">Q", len(raw)) + raw


def encode(label: str, *fields: bytes | str | int | Iterable[int]) -> bytes:
    """Encode ``fields`` under a domain ``label``. An iterable of ints encodes as one field."""
    parts = [_field(FORMAT_VERSION), _field(label)]
    for f in fields:
        if isinstance(f, bytes | bytearray | memoryview | str | int):
            parts.append(_field(f))
        else:
            ints = list(f)
            parts.append(_field(b"".join(i.to_bytes(8, "big", signed=True) for i in ints)))
    return b"".join(parts)


def digest(label: str, *fields: bytes | str | int | Iterable[int]) -> bytes:
    """SHA-256 over :func:`encode`."""
    return hashlib.sha256(encode(label, *fields)).digest()
