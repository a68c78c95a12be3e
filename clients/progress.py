"""Progress for long work (encryption, masking stages, transfers): callbacks and adapters.

A progress callback is ``callback(what, done, total)``. :func:`tqdm_progress` shows one tqdm
bar per ``what``; pass it to ``Site.connect(..., progress=tqdm_progress())``. It may be called
from a thread of gRPC's (an upload's progress is reported as the request stream is read), and
an exception it raises is logged once and stops the reports: it never costs the round.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

from secagg.errors import ConfigurationError

Progress = Callable[[str, int, int], None]

_log = logging.getLogger("clients")


def guarded(callback: Progress | None) -> Progress | None:
    """``callback``, made unable to cost a round: the first exception it raises is logged (a
    warning naming its class) and no report follows. Raised on gRPC's request-stream thread
    it failed the upload as "Exception iterating requests!" (UNKNOWN, blamed on the
    aggregator); raised in a stage, the round was refused as the aggregator's doing and
    spent, and the other sites waited out the stage's deadline."""
    if callback is None:
        return None
    # (the factory passed for the callback, or something not callable, failed at every
    # report: a warning, and no progress, for a slip Site.connect can name)
    # defence: sdk.progress-callback-checked
    if callback is tqdm_progress:  # type: ignore[comparison-overlap]
        raise ConfigurationError("progress=tqdm_progress makes a callback: pass "
                                 "progress=tqdm_progress()")
    if not callable(callback):
        raise ConfigurationError(f"progress must be a callable (what, done, total), got "
                                 f"{type(callback).__name__}")
    broken = threading.Event()

    def report(what: str, done: int, total: int) -> None:
        if broken.is_set():
            return
        # defence: sdk.progress-callback-guarded
        try:
            callback(what, done, total)
        except Exception as e:  # (KeyboardInterrupt still stops the script)
            if not broken.is_set():
                broken.set()
                try:  # (an exception whose str() raised escaped the guard)
                    text = str(e).splitlines()[0][:200] if str(e) else ""
                except Exception:
                    text = "?"
                _log.warning("the progress callback raised %s (%s); progress is no longer "
                             "reported", type(e).__name__, text)

    return report


def tqdm_progress(*, desc: str | None = None, leave: bool = False,
                  **tqdm_kwargs: Any) -> Progress:
    """A callback that drives one tqdm bar per kind of work (``what``). ``desc``: a prefix
    to each bar's description (the kind of work); ``leave``: keep finished bars; the other
    keyword arguments go to tqdm. A bar's ``total`` is its work's own: not a keyword."""
    from tqdm.auto import tqdm
    from tqdm.std import tqdm as std_tqdm

    # (desc, total or leave reached tqdm twice: a TypeError at the first report, logged once
    # as a warning, and no bar ever after: the script never heard of it)
    # defence: sdk.tqdm-keywords-checked
    if "total" in tqdm_kwargs:
        raise ConfigurationError("tqdm_progress sets each bar's total to its work's size: "
                                 "do not pass total")
    # (a misspelt keyword, ncol=80, was tqdm's error at the first bar, mid-submit: logged
    # once, and no bar ever shown)
    # defence: sdk.tqdm-unknown-keywords-refused
    # (tqdm.auto's class takes **kwargs and hands them to tqdm.std's, which names them all;
    # tqdm.notebook's, which tqdm.auto is in a notebook, takes display as well)
    known = set(inspect.signature(std_tqdm.__init__).parameters) - {
        "self", "kwargs", "iterable", "total"}
    if any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__):
        known.add("display")
    unknown = sorted(set(tqdm_kwargs) - known)
    if unknown:
        raise ConfigurationError(f"tqdm_progress: tqdm takes no keyword {unknown[0]!r:.60}")
    bars: dict[str, Any] = {}
    prefix = "" if desc is None else f"{desc}: "

    def update(what: str, done: int, total: int) -> None:
        bar = bars.get(what)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = bars[what] = tqdm(total=total, desc=prefix + what, leave=leave,
                                    **tqdm_kwargs)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bars.pop(what, None)

    return update
