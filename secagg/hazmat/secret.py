"""Bytes that are a secret: shown nowhere, not even in a traceback's locals.

A key file's bytes held in a plain ``bytes`` local were printed whole by every tool that shows
a failing frame's locals (``pytest -l``, rich's and IPython's verbose tracebacks, error trackers
that record locals by default) when loading a site's or the aggregator's keys failed, the
"this key is readable by others" refusal included. Held in a :class:`SecretBytes`, a frame shows
only ``<secret: N bytes>``; the bytes themselves exist only as a temporary in the call that
needs them (``serialization.load_pem_private_key(s.reveal(), None)``).
"""

from __future__ import annotations

import hmac
from typing import NoReturn


class SecretBytes:
    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray):
            raise TypeError("SecretBytes holds bytes")
        self._data = bytes(data)

    def reveal(self) -> bytes:
        """The bytes: pass them straight to the call that needs them, never into a local."""
        return self._data

    def __len__(self) -> int:
        return len(self._data)

    # defence: hazmat.secret.repr-redacts
    def __repr__(self) -> str:
        return f"<secret: {len(self._data)} bytes>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretBytes):
            return NotImplemented
        return hmac.compare_digest(self._data, other._data)

    def __hash__(self) -> int:
        # by length only (equal secrets hash alike): a SiteKit, a frozen dataclass holding
        # one, stayed hashable; a hash of the bytes would be a value derived from the key
        return hash((SecretBytes, len(self._data)))

    # defence: hazmat.secret.no-pickle
    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes holds a secret and cannot be pickled")


def reveal(data: bytes | SecretBytes) -> bytes:
    """``data``'s bytes, whichever of the two it is."""
    return data.reveal() if isinstance(data, SecretBytes) else data
