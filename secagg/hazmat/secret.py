"""Bytes that are a secret: shown nowhere, not even in a traceback's locals.

A key file's bytes held in a plain ``bytes`` local were printed whole by every tool that shows
a failing frame's locals (``pytest -l``, rich's and IPython's verbose tracebacks, error trackers
that record locals by default) when loading a site's or the aggregator's keys failed, the
"this key is readable by others" refusal included. Held in a :class:`SecretBytes`, a frame shows
only ``<secret: N bytes>``; the bytes themselves exist only as a temporary in the call that
needs them (``serialization.load_pem_private_key(s.reveal(), None)``).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import inspect
import sys
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import NoReturn, ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")
_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


class SecretBytes:
    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        # (SecretBytes(32) was bytes(32): a key of 32 zero bytes)
        # defence: hazmat.secret.holds-bytes-only
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
        # defence: hazmat.secret.constant-time-equality
        return hmac.compare_digest(self._data, other._data)

    def __hash__(self) -> int:
        # by length only (equal secrets hash alike): a SiteKit, a frozen dataclass holding
        # one, stayed hashable; a hash of the bytes would be a value derived from the key
        # defence: hazmat.secret.hash-by-length
        return hash((SecretBytes, len(self._data)))

    # defence: hazmat.secret.no-pickle
    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes holds a secret and cannot be pickled")


def reveal(data: bytes | SecretBytes) -> bytes:
    """``data``'s bytes, whichever of the two it is."""
    return data.reveal() if isinstance(data, SecretBytes) else data


def scrub_locals(error: BaseException, keep: BaseException | None = None) -> None:
    """Clear the local variables of every frame ``error`` has left (its traceback's, and
    those of the exceptions it was raised from or while handling, and of a group's members),
    so a tool that shows a traceback's locals shows none of them. The frames' code lines stay.

    A site interrupted mid-round (Ctrl-C, a SIGTERM handler's ``sys.exit``, a MemoryError, an
    exception from its own input provider) raised through frames holding its mask seeds, the
    Shamir shares other sites sealed to it and its quantised update: ``pytest -l``, rich's and
    IPython's verbose tracebacks and error trackers that record locals (Sentry's default)
    printed them. The frame the exception is being handled in, still running, is left as it
    is (whoever catches it holds it), and so are generators' and coroutines' frames (clearing
    a suspended one would close it). ``keep``, the exception the caller was handling when it
    called in (the context of anything raised inside), is left with its chain: those frames
    are the caller's own, and keep their values for its debugging."""
    for frame in exception_frames(error, keep):
        # defence: hazmat.secret.suspended-frames-left
        if not frame.f_code.co_flags & _SUSPENDABLE:
            with contextlib.suppress(RuntimeError):  # a frame still running (the
                frame.clear()                        # handler's own): left as it is


def exception_frames(error: BaseException, keep: BaseException | None = None,
                     ) -> Iterator[FrameType]:
    """Every frame of ``error``'s traceback, and of the exceptions it was raised from or
    while handling, and of a group's members (each exception once; ``keep`` and its chain
    left out)."""
    seen: set[int] = set() if keep is None else {id(keep)}
    pending: list[BaseException | None] = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        tb: TracebackType | None = e.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        # (a crash report prints them: "The above exception was the direct cause...",
        # "During handling...", a group's members, each frame with its locals)
        # defence: hazmat.secret.causes-scrubbed, hazmat.secret.contexts-scrubbed
        pending += [e.__cause__, e.__context__]
        # defence: hazmat.secret.group-members-scrubbed
        if isinstance(e, BaseExceptionGroup):
            pending += list(e.exceptions)


def scrubs_locals(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn``, whose exceptions leave with the locals of the frames below it cleared
    (:func:`scrub_locals`): for the entry points of code that holds secrets in its frames.
    Not for a generator or coroutine function: its body runs after this returns."""
    if inspect.isgeneratorfunction(fn) or inspect.iscoroutinefunction(fn) or (
            inspect.isasyncgenfunction(fn)):
        raise TypeError(f"scrubs_locals cannot wrap {fn.__qualname__}: its body runs after "
                        "the call returns")
    @functools.wraps(fn)
    def scrubbed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        handling = sys.exc_info()[1]  # the caller's, if it calls from an except block
        try:
            return fn(*args, **kwargs)
        # defence: hazmat.secret.exceptions-leave-no-locals
        except BaseException as e:
            scrub_locals(e, keep=handling)
            # this frame, still running, is in the traceback too: its arguments (a site's
            # trained state dict passed to submit) go before the exception leaves it
            # defence: hazmat.secret.wrapper-drops-its-arguments
            del args, kwargs
            raise

    return scrubbed
