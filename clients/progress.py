"""Progress for long work (encryption, masking stages, transfers): callbacks and adapters.

A progress callback is ``callback(what, done, total)``. :func:`tqdm_progress` shows one tqdm
bar per ``what``; pass it to ``Site.connect(..., progress=tqdm_progress())``. It may be called
from a thread of gRPC's (an upload's progress is reported as the request stream is read), and
an exception it raises is logged once and stops the reports: it never costs the round.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

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
                _log.warning("the progress callback raised %s (%s); progress is no longer "
                             "reported", type(e).__name__, str(e).splitlines()[0][:200]
                             if str(e) else "")

    return report


def tqdm_progress(**tqdm_kwargs: Any) -> Progress:
    """A callback that drives one tqdm bar per kind of work (``what``)."""
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def update(what: str, done: int, total: int) -> None:
        bar = bars.get(what)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = bars[what] = tqdm(total=total, desc=what, leave=False, **tqdm_kwargs)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bars.pop(what, None)

    return update
