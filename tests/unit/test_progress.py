from __future__ import annotations

import io
import logging

import pytest

from clients.progress import guarded, tqdm_progress
from secagg.errors import ConfigurationError


def test_tqdm_adapter_shows_one_bar_per_kind_of_work_and_restarts_on_a_retry() -> None:
    out = io.StringIO()
    progress = tqdm_progress(file=out, mininterval=0)
    for done in range(0, 5):
        progress("upload", done, 4)
    progress("encrypt", 1, 2)
    progress("upload", 2, 4)  # a retry starts from what the aggregator already holds
    progress("upload", 4, 4)
    text = out.getvalue()
    assert "upload" in text and "encrypt" in text and "4/4" in text


def test_tqdm_adapter_starts_a_new_bar_when_the_work_changes_size() -> None:
    """The same kind of work reported with another total (the next round's upload, another
    size) is a new bar of that total, not the old bar counting on against the old one."""
    out = io.StringIO()
    progress = tqdm_progress(file=out, mininterval=0)
    progress("upload", 1, 4)
    progress("upload", 2, 10)
    assert "2/10" in out.getvalue() and "2/4" not in out.getvalue()


def test_a_progress_callback_cannot_cost_the_round_and_a_slip_is_named(
        caplog: pytest.LogCaptureFixture) -> None:
    """The guard logs a callback's first exception once (even one whose str() raises) and
    calls it no more; passing the factory (progress=tqdm_progress) or something not callable
    failed at every report, and is a ConfigurationError naming the fix."""
    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    calls = []

    def broken(what: str, done: int, total: int) -> None:
        calls.append(what)
        raise Odd()

    report = guarded(broken)
    assert report is not None
    with caplog.at_level(logging.WARNING, logger="clients"):
        report("upload", 1, 2)
        report("upload", 2, 2)
    assert calls == ["upload"]
    assert caplog.text.count("the progress callback raised Odd") == 1
    with pytest.raises(ConfigurationError, match=r"pass progress=tqdm_progress\(\)"):
        guarded(tqdm_progress)
    with pytest.raises(ConfigurationError, match="must be a callable"):
        guarded("bar")  # type: ignore[arg-type]


def test_the_tqdm_adapter_takes_a_description_prefix_and_leave_and_refuses_total() -> None:
    """tqdm_progress(desc=...) (or leave=, or total=) reached tqdm twice: a TypeError at the
    first report, logged once, and no bar ever after. desc prefixes each bar, leave keeps the
    finished ones, total (each bar's own) is refused where the adapter is made."""
    out = io.StringIO()
    progress = tqdm_progress(desc="site 3", leave=True, file=out, mininterval=0)
    progress("upload", 1, 2)
    progress("upload", 2, 2)
    text = out.getvalue()
    assert "site 3: upload" in text and "2/2" in text
    assert text.endswith("\n")  # (leave=True: the finished bar is kept)
    cleared = io.StringIO()
    progress = tqdm_progress(file=cleared, mininterval=0)  # (leave defaults to False)
    progress("upload", 2, 2)
    assert not cleared.getvalue().endswith("\n")  # (the finished bar is cleared)
    with pytest.raises(ConfigurationError, match="do not pass total"):
        tqdm_progress(total=5)


def test_the_tqdm_adapter_refuses_a_keyword_tqdm_does_not_take() -> None:
    """A misspelt keyword (ncol=80) was tqdm's error at the first bar, mid-submit: logged
    once as a warning, and no bar ever shown. Refused where the adapter is made, naming it;
    tqdm's own keywords are taken."""
    with pytest.raises(ConfigurationError, match="no keyword 'ncol'"):
        tqdm_progress(ncol=80)
    with pytest.raises(ConfigurationError, match="no keyword 'display'"):
        tqdm_progress(display=False)  # (tqdm.notebook's, and this is no notebook)
    out = io.StringIO()
    progress = tqdm_progress(ncols=60, unit="B", unit_scale=True, colour="green", file=out,
                             mininterval=0, disable=False, position=0, dynamic_ncols=False)
    progress("upload", 2, 2)
    assert "upload" in out.getvalue()
