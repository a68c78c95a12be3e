"""secagg.hazmat.secret.scrubs_locals refuses what it cannot protect."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from secagg.hazmat.secret import scrubs_locals


def test_a_generator_or_coroutine_function_is_refused() -> None:
    """Its body runs after the call returns: wrapped, it was protected by nothing."""
    def gen() -> Iterator[int]:
        yield 1

    async def coro() -> None:
        return None

    for fn in (gen, coro):
        with pytest.raises(TypeError, match="runs after the call returns"):
            scrubs_locals(fn)


_SECRET = "".join(reversed("terces-laer-eht"))  # (computed: no source line shows it)


def _holding(where: str) -> None:
    secret = _SECRET + "-" + where  # noqa: F841 (the local a crash report would show)
    raise ValueError(where)


def _chained(how: str) -> None:
    """An exception whose secrets sit in the frames of what it was raised from (``cause``),
    raised while handling (``context``), or grouped (``group``)."""
    if how == "group":
        caught: list[Exception] = []
        for where in ("first", "second"):
            try:
                _holding(where)
            except ValueError as e:
                caught.append(e)
        raise ExceptionGroup("both failed", caught)
    if how == "cause":  # (raised from it after handling it: a cause and no context)
        try:
            _holding(how)
        except ValueError as e:
            first = e
        raise RuntimeError("failed") from first
    try:
        _holding(how)
    except ValueError:
        secret = _SECRET + "-handler"  # noqa: F841
        raise RuntimeError("failed")  # noqa: B904 (the context is the point)


@pytest.mark.parametrize("how", ["cause", "context", "group"])
def test_the_frames_of_a_chained_or_grouped_exception_are_cleared_too(how: str) -> None:
    """A crash report prints the exceptions an exception was raised from or while handling
    ("The above exception was the direct cause...", "During handling...") and a group's
    members, each with its frames' locals: those frames are cleared as the top one's are.
    (Rendered by the standard library's own walk, not the one scrub_locals uses.)"""
    import traceback

    entry = scrubs_locals(_chained)
    with pytest.raises(BaseException) as caught:
        entry(how)
    report = "".join(traceback.TracebackException.from_exception(
        caught.value, capture_locals=True).format())
    assert "_holding" in report  # (the chained frames are in the report)
    assert _SECRET not in report
    # and the same report of an unprotected call shows the secrets: the test can fail
    with pytest.raises(BaseException) as bare:
        _chained(how)
    assert _SECRET in "".join(traceback.TracebackException.from_exception(
        bare.value, capture_locals=True).format())
