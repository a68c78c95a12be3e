"""At shutdown the aggregator closes its store only once no store call is in progress
(``_drained``): every thread of every pool that calls the store must be free, not only one."""

from __future__ import annotations

import asyncio
import threading

import pytest

from aggregator import service
from aggregator.service import Core


@pytest.mark.parametrize("pool", ["executor", "bulk", "readers", "pinger"])
def test_a_store_call_stuck_on_any_thread_is_seen(pool: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One reader thread hangs in a store call while the other is free: the two checks ran
    one after the other on the free thread and the store was closed under the stuck call."""
    monkeypatch.setattr(service, "SHUTDOWN_STORE_SECONDS", 0.5)
    release = threading.Event()

    async def main() -> tuple[bool, bool]:
        core = Core(asyncio.get_running_loop())
        try:
            idle = await service._drained(core)
            started = threading.Event()

            def stuck() -> None:
                started.set()
                release.wait(timeout=30)

            getattr(core, pool).submit(stuck)
            assert started.wait(timeout=5)
            busy = await service._drained(core)
            return idle, busy
        finally:
            release.set()
            for executor in (core.executor, core.hashers, core.bulk, core.readers, core.pinger):
                executor.shutdown(wait=True)

    idle, busy = asyncio.run(main())
    assert idle and not busy
