"""A call that finds the store wanting (the job's UNAVAILABLE: a model or payload the store
should hold and does not; or the store's own error) marks the aggregator unhealthy: health
says NOT_SERVING and the job is rebuilt from the store before it answers again. The call
itself is UNAVAILABLE, which sites retry. (Fake calls, no gRPC.)"""

from __future__ import annotations

import asyncio

import pytest

from aggregator.job import INVALID_ARGUMENT, UNAVAILABLE, ServiceError
from aggregator.service import Core
from aggregator.store import StoreError
from tests.fake_calls import Aborted, FakeContext, fake_service


@pytest.mark.parametrize(("error", "unhealthy"), [
    (ServiceError(UNAVAILABLE, "the store lacks a model it refers to"), True),
    (StoreError("store unreachable: simulated"), True),
    (ServiceError(INVALID_ARGUMENT, "a site's bad message"), False),
])
def test_a_call_that_finds_the_store_wanting_marks_the_aggregator_unhealthy(
        error: Exception, unhealthy: bool) -> None:
    async def main() -> bool:
        core = Core(asyncio.get_running_loop())
        service = fake_service(core)
        core.healthy = True

        def fails(job: object) -> None:
            raise error

        with pytest.raises(Aborted, match="UNAVAILABLE" if unhealthy else "INVALID_ARGUMENT"):
            await service._call(FakeContext(1), fails)
        core.executor.shutdown()
        return core.healthy

    assert asyncio.run(main()) is not unhealthy


def test_a_raw_database_error_is_logged_by_its_type_not_its_text(
        caplog: pytest.LogCaptureFixture) -> None:
    """A database error the store did not wrap quotes its statement and parameters (a
    chunk's bytes, a message's fields) in its text: the log names its type only."""
    import logging

    from sqlalchemy.exc import OperationalError

    canary = "payload-canary-7f3a"
    error = OperationalError("INSERT INTO chunks VALUES (:data)", {"data": canary},
                             Exception(canary))

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = fake_service(core)

        def fails(job: object) -> None:
            raise error

        with pytest.raises(Aborted, match="UNAVAILABLE"):
            await service._call(FakeContext(1), fails)
        core.executor.shutdown()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    logged = [(r.getMessage(), getattr(r, "reason", "")) for r in caplog.records]
    assert ("store error", "OperationalError") in logged
    assert canary not in repr(logged) and canary not in caplog.text


def test_a_chunk_whose_store_fails_after_its_stream_was_refused_marks_unhealthy() -> None:
    """Chunk 1 is still being stored when chunk 2's bytes, not matching its id, refuse the
    stream; the store then fails chunk 1. Its outcome, read after the stream ended, marks
    the aggregator unhealthy (the job reloads), as a failure the stream saw would."""
    import hashlib
    import types

    from aggregator.service import add_service
    from secagg.v1 import service_pb2
    from tests.unit.test_refused_calls_let_go import _Requests, _Server

    async def main() -> bool:
        core = Core(asyncio.get_running_loop())
        service = fake_service(core, store=types.SimpleNamespace(missing=lambda ids: list(ids)),
                               current_round=1, upload_limit=lambda site: 1 << 40,
                               stored_uploads=(None, {}), generation=1)
        stored = asyncio.Event()

        async def put(store: object, row: object) -> bool:
            await stored.wait()
            raise StoreError("store unreachable: simulated")

        service.writer.put = put  # type: ignore[method-assign]
        server = _Server()
        add_service(service, server)
        good = b"chunk one"
        requests = _Requests(
            service_pb2.Chunk(chunk_id=hashlib.sha256(good).digest(), data=good),
            service_pb2.Chunk(chunk_id=hashlib.sha256(b"other").digest(), data=b"chunk two"))
        with pytest.raises(Aborted, match="INVALID_ARGUMENT"):
            await server.handlers["PutChunks"].stream_unary(requests, FakeContext(1))
        assert core.healthy  # (refused for the bad chunk; chunk 1 still being stored)
        stored.set()
        for _ in range(20):
            await asyncio.sleep(0.01)
        core.executor.shutdown()
        core.hashers.shutdown()
        return core.healthy

    assert asyncio.run(main()) is False
