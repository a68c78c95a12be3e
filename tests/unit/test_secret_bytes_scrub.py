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
    raised = ExceptionGroup if how == "group" else RuntimeError  # (what _chained raises)
    with pytest.raises(raised) as caught:
        entry(how)
    report = "".join(traceback.TracebackException.from_exception(
        caught.value, capture_locals=True).format())
    assert "_holding" in report  # (the chained frames are in the report)
    assert _SECRET not in report
    # and the same report of an unprotected call shows the secrets: the test can fail
    with pytest.raises(raised) as bare:
        _chained(how)
    assert _SECRET in "".join(traceback.TracebackException.from_exception(
        bare.value, capture_locals=True).format())


def test_a_suspended_generator_in_a_traceback_is_left_running() -> None:
    """A generator caught an exception and went on: its frame, suspended, is in that
    exception's traceback. Clearing it would close the generator under whoever iterates it
    (an error path that scrubs would silently end the caller's live generator)."""
    from secagg.hazmat.secret import scrub_locals

    caught: list[BaseException] = []

    def gen() -> Iterator[str]:
        try:
            raise ValueError("inside")
        except ValueError as e:
            caught.append(e)
        yield "first"
        yield "still alive"

    g = gen()
    assert next(g) == "first"
    scrub_locals(caught[0])
    assert next(g) == "still alive"


def test_secret_bytes_holds_bytes_only() -> None:
    """``SecretBytes(32)`` was ``bytes(32)``: 32 zero bytes, a key anyone knows."""
    from secagg.hazmat.secret import SecretBytes

    for wrong in (32, "k" * 32, [0] * 32, None):
        with pytest.raises(TypeError, match="holds bytes"):
            SecretBytes(wrong)  # type: ignore[arg-type]
    assert SecretBytes(bytearray(b"k" * 32)).reveal() == b"k" * 32


def test_secret_bytes_hash_and_compare_reveal_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its hash is its length's (a hash of the bytes is a value derived from the key, for
    anything that logs or orders by hash); equality is constant-time."""
    import secagg.hazmat.secret as secret

    a, b = secret.SecretBytes(b"\x01" * 32), secret.SecretBytes(b"\x02" * 32)
    assert hash(a) == hash(b) and hash(a) != hash(secret.SecretBytes(b"\x01" * 16))
    compared: list[tuple[bytes, bytes]] = []
    real = secret.hmac.compare_digest

    def spy(x: bytes, y: bytes) -> bool:
        compared.append((x, y))
        return real(x, y)

    monkeypatch.setattr(secret.hmac, "compare_digest", spy)
    assert a != b and a == secret.SecretBytes(b"\x01" * 32)
    assert len(compared) == 2
    assert (a == b"\x01" * 32) is False  # (bytes are not a secret of the same value)
