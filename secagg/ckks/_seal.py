"""In-memory (de)serialisation of SEAL objects through TenSEAL's ``sealapi``.

``sealapi`` saves and loads only through a file path. We give it the path of an anonymous
in-memory file (``memfd_create``), so nothing touches a disk, and we read the bytes back.
Every load is checked by SEAL against the context (parameters and sizes); any failure becomes
the opaque :class:`~secagg.errors.InvalidMessage`.
"""

from __future__ import annotations

import os
from typing import Any

from tenseal import sealapi

from secagg.errors import InvalidMessage


def save_bytes(obj: Any) -> bytes:
    """The SEAL serialisation of ``obj`` (anything with ``save(path)``)."""
    fd = os.memfd_create("secagg-seal", os.MFD_CLOEXEC)
    try:
        obj.save(f"/proc/self/fd/{fd}")
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def _load_into(obj: Any, context: Any, data: bytes) -> None:
    fd = os.memfd_create("secagg-seal", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        obj.load(context, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


SEAL_MAGIC = b"\x5e\xa1"  # 0xA15E, little-endian
_HEADER_BYTES = 16


def _check_header(data: bytes) -> None:
    """SEAL's 16-byte header: magic, header size, version, compression, reserved, and the
    total size (uint64 LE at offset 8). SEAL ignores bytes past that size; we refuse them, so
    one object has one encoding."""
    if (len(data) < _HEADER_BYTES or data[:2] != SEAL_MAGIC
            or int.from_bytes(data[8:16], "little") != len(data)):
        raise InvalidMessage("ciphertext")


def load_ciphertext(context: Any, data: bytes, *, scale: float) -> Any:
    """A fresh, add-ready ciphertext from ``data``, or :class:`InvalidMessage`.

    Refuses anything that is not a two-polynomial ciphertext at the context's first data
    level with the preset's scale (so that adding it can neither throw nor mix levels).
    """
    if not isinstance(data, bytes):
        raise InvalidMessage("ciphertext")
    _check_header(data)
    ct = sealapi.Ciphertext(context)
    try:
        _load_into(ct, context, data)
    except (RuntimeError, ValueError, TypeError, OSError):
        raise InvalidMessage("ciphertext") from None
    if ct.size() != 2 or ct.parms_id() != context.first_parms_id() or ct.scale != scale:
        raise InvalidMessage("ciphertext")
    return ct
