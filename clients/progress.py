"""Progress for long work (encryption, masking stages, transfers): callbacks and adapters.

A progress callback is ``callback(what, done, total)``. :func:`tqdm_progress` shows one tqdm
bar per ``what``; pass it to ``Site.connect(..., progress=tqdm_progress())``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Progress = Callable[[str, int, int], None]


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
