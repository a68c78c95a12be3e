"""The server keeps a running sum: its peak memory is O(vector length), not O(sites x length)."""

from __future__ import annotations

import tracemalloc

import pytest

from secagg.masking.messages import MaskedInput
from tests.roundkit import Round

LENGTH = 200_000


def _server_peak(sites: int) -> int:
    r = Round(sites=sites, vector_length=LENGTH)
    r.advance()
    r.advance()
    masked = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    assert all(isinstance(m, MaskedInput) for m in masked.values())
    tracemalloc.start()
    try:
        for m in masked.values():
            r.server.handle(m)
        r.outgoing = r.server.close_stage()
        r.advance()
        r.advance()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("sites", [5, 30])
def test_server_peak_memory_does_not_grow_with_sites(sites: int) -> None:
    peak = _server_peak(sites)
    # the masked inputs alone would be sites * 4 * LENGTH bytes (24 MB for 30 sites)
    assert peak < 40 * LENGTH, f"server peak {peak / 1e6:.1f} MB"
