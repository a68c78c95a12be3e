"""What the service handlers answer before and around the job, by status (fake calls, no
gRPC): an empty Submit is INVALID_ARGUMENT before the job sees it; during a shutdown every
call, and a long poll already waiting, is UNAVAILABLE ("retry"), where a cut-off poll ended
CANCELLED and a call went on to a job being closed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aggregator.service import Core
from secagg.v1 import service_pb2
from tests.fake_calls import Aborted, FakeContext, fake_service


def _run(main: Any) -> Any:
    async def wrapped() -> Any:
        core = Core(asyncio.get_running_loop())
        try:
            return await main(core)
        finally:
            core.executor.shutdown()

    return asyncio.run(wrapped())


def test_an_empty_submission_is_refused_before_the_job() -> None:
    seen: list[object] = []

    async def main(core: Core) -> None:
        service = fake_service(core, submit=lambda site, request: seen.append(request))
        with pytest.raises(Aborted, match=r"INVALID_ARGUMENT.*empty submission"):
            await service.Submit(service_pb2.SubmitRequest(round_id="r"), FakeContext(1))

    _run(main)
    assert seen == []


def test_calls_during_a_shutdown_are_unavailable_not_served() -> None:
    seen: list[object] = []

    async def main(core: Core) -> None:
        service = fake_service(core, round_info=lambda after: seen.append(after))
        core.stopping = True
        with pytest.raises(Aborted, match=r"UNAVAILABLE.*shutting down"):
            await service.GetRound(service_pb2.GetRoundRequest(), FakeContext(1))

    _run(main)
    assert seen == []


def test_a_long_poll_waiting_at_a_shutdown_ends_unavailable_at_once() -> None:
    """The shutdown comes while the poll waits: it ends UNAVAILABLE then, without waiting
    for the job to change (up to a second a time) or asking it again."""
    asked: list[int] = []
    waited: list[int] = []

    class _Watched(asyncio.Event):
        async def wait(self) -> Any:
            waited.append(1)
            return await super().wait()

    async def main(core: Core) -> None:
        def receive(site: int, round_id: str, stage: int) -> service_pb2.ReceiveResponse:
            asked.append(site)
            core.stopping = True  # (the shutdown begins as the first answer is made)
            return service_pb2.ReceiveResponse(ready=False)

        service = fake_service(core, receive=receive)
        core.changed = _Watched()
        request = service_pb2.ReceiveRequest(round_id="r", stage=1, wait_ms=5_000)
        with pytest.raises(Aborted, match=r"UNAVAILABLE.*shutting down"):
            await service.Receive(request, FakeContext(1))

    _run(main)
    assert asked == [1] and waited == []


@pytest.mark.parametrize("value", ["[::1:50051", "::1]:50051", "host:", "host", "h:65536",
                                   "h:-1", "h:5x"])
def test_an_address_to_bind_that_is_not_host_port_is_refused_naming_the_flag(
        value: str) -> None:
    from aggregator.service import check_address
    from secagg.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="--listen must be HOST:PORT"):
        check_address(value, "--listen")
    for good in ("[::1]:50051", "127.0.0.1:0", "agg.example.org:65535"):
        check_address(good, "--listen")


def test_an_admission_wait_ends_a_second_before_the_callers_deadline() -> None:
    """Answered at its deadline, the answer arrives after the caller gave up
    (DEADLINE_EXCEEDED, and a slot granted to no one)."""
    from aggregator.service import MAX_ADMISSION_WAIT_SECONDS, _admission_wait

    assert _admission_wait(FakeContext(1, remaining=5.0)) == pytest.approx(4.0)
    assert _admission_wait(FakeContext(1, remaining=0.5)) == 0.0
    assert _admission_wait(FakeContext(1, remaining=None)) == MAX_ADMISSION_WAIT_SECONDS
    assert _admission_wait(FakeContext(1, remaining=1e6)) == MAX_ADMISSION_WAIT_SECONDS


@pytest.mark.parametrize("store_fails", [False, True])
def test_a_readable_chunk_the_store_lacks_is_not_found_and_a_failing_store_unavailable(
        store_fails: bool) -> None:
    """A chunk a site may read (the job says so) that the store does not hold is NOT_FOUND
    (the SDK refetches the round, not retries); a store failing to read it is UNAVAILABLE."""
    import hashlib
    import types

    from aggregator.store import StoreError

    cid = hashlib.sha256(b"a chunk").digest()

    def get_chunk(c: bytes) -> bytes | None:
        if store_fails:
            raise StoreError("store unreachable: simulated")
        return None

    async def main(core: Core) -> None:
        service = fake_service(core, may_read=lambda site, c: True, hot_chunk=lambda c: None,
                               store=types.SimpleNamespace(get_chunk=get_chunk))
        stream = service.GetChunks(service_pb2.ChunkIds(chunk_ids=[cid]), FakeContext(1))
        expected = r"UNAVAILABLE.*store is unavailable" if store_fails else r"NOT_FOUND"
        with pytest.raises(Aborted, match=expected):
            async for _ in stream:
                pass

    _run(main)
