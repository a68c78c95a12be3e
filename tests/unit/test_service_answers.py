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
        service = fake_service(core, round_info=lambda after, site=0: seen.append(after))
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


@pytest.mark.parametrize("code", ["ABORTED", "NOT_FOUND", "FAILED_PRECONDITION",
                                  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"])
def test_a_job_refusal_keeps_its_status_code_on_the_call(code: str) -> None:
    """The job names its refusals as gRPC names its status codes, and the call ends with that
    code: one the service does not map ends INTERNAL, which no site acts on (ABORTED is how
    a site learns its round's abort reason; NOT_FOUND makes it fetch the round again)."""
    from aggregator.job import ServiceError

    async def main(core: Core) -> None:
        service = fake_service(core)

        def refuses(job: object) -> None:
            raise ServiceError(code, "refused")

        with pytest.raises(Aborted, match=rf"StatusCode\.{code}: refused"):
            await service._call(FakeContext(1), refuses)

    _run(main)


def test_a_poll_until_the_round_finishes_is_not_answered_with_the_running_round() -> None:
    """GetRound with until_finished waits while the round runs: within its wait, the answer
    is an empty RoundInfo (ask again), never the running round, which a site waiting for a
    round's result would take for the finished one."""
    running = service_pb2.RoundInfo(round=1, round_id="hospitals/1/1",
                                    status=service_pb2.ROUND_STATUS_RUNNING)

    async def main(core: Core) -> tuple[Any, Any]:
        service = fake_service(core, round_info=lambda after, site=0: running)
        waited = await service.GetRound(service_pb2.GetRoundRequest(
            after_round=0, until_finished=True, wait_ms=0), FakeContext(1))
        plain = await service.GetRound(service_pb2.GetRoundRequest(after_round=0, wait_ms=0),
                                       FakeContext(1))
        return waited, plain

    waited, plain = _run(main)
    assert waited.round == 0 and not waited.round_id
    assert plain.round == 1


@pytest.mark.parametrize("call", ["round_end", "stage"])
def test_a_poll_that_runs_out_while_the_round_waits_for_its_sites_says_so(call: str) -> None:
    """A site that sent its message waits for the round's end or a stage's answer; while
    the round waits for its sites the job says so, and a poll that runs out must carry it
    (the bare "not yet" left a site that came early to give the round up at its patience,
    while the round still waited for the others). Once under way, it says nothing."""
    said = [service_pb2.RoundWaiting(sites_asking=2, sites_needed=3)]

    def info(after: int, site: int = 0) -> service_pb2.RoundInfo:
        running = service_pb2.RoundInfo(round=1, round_id="hospitals/1/1",
                                        status=service_pb2.ROUND_STATUS_RUNNING)
        if said[0] is not None:
            running.waiting.CopyFrom(said[0])
        return running

    def receive(site: int, round_id: str, stage: int) -> service_pb2.ReceiveResponse:
        return service_pb2.ReceiveResponse(ready=False, waiting=said[0])

    async def main(core: Core) -> list[Any]:
        service = fake_service(core, round_info=info, receive=receive)
        answers = []
        for _ in range(2):
            if call == "round_end":
                answers.append(await service.GetRound(service_pb2.GetRoundRequest(
                    after_round=0, until_finished=True, wait_ms=0), FakeContext(1)))
            else:
                answers.append(await service.Receive(service_pb2.ReceiveRequest(
                    round_id="hospitals/1/1", stage=1, wait_ms=0), FakeContext(1)))
            said[0] = None  # (under way)
        return answers

    waiting, under_way = _run(main)
    assert waiting.HasField("waiting")
    assert (waiting.waiting.sites_asking, waiting.waiting.sites_needed) == (2, 3)
    assert not under_way.HasField("waiting")


def test_a_store_failing_to_look_up_missing_chunks_is_unavailable() -> None:
    """MissingChunks reads the store off the job's thread: a store that fails there ends
    the call UNAVAILABLE (the SDK retries), not UNKNOWN with the store's error."""
    import hashlib
    import types

    from aggregator.store import StoreError

    def missing(ids: list[bytes]) -> list[bytes]:
        raise StoreError("looking up chunks failed: OperationalError")

    async def main(core: Core) -> None:
        service = fake_service(core, store=types.SimpleNamespace(missing=missing),
                               current_stage=(1, 3))
        request = service_pb2.ChunkIds(chunk_ids=[hashlib.sha256(b"a chunk").digest()])
        with pytest.raises(Aborted, match=r"UNAVAILABLE.*store is unavailable"):
            await service.MissingChunks(request, FakeContext(1))

    _run(main)
