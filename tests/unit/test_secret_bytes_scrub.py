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
