"""A call that finds the store wanting (the job's UNAVAILABLE: a model or payload the store
should hold and does not; or the store's own error) marks the aggregator unhealthy: health
says NOT_SERVING and the job is rebuilt from the store before it answers again. The call
itself is UNAVAILABLE, which sites retry. (Fake calls, no gRPC.)"""

from __future__ import annotations

import asyncio
import re

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
    chunk's bytes, a message's fields) in its text: the log names its type only, and a
    known cause in our words (a full disk was logged as "OperationalError" alone: an
    operator's test)."""
    import logging
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from aggregator.store import DISK_FULL

    canary = "payload-canary-7f3a"
    errors = [OperationalError("INSERT INTO chunks VALUES (:data)", {"data": canary},
                               Exception(canary)),
              OperationalError("INSERT INTO chunks VALUES (:data)", {"data": canary},
                               sqlite3.OperationalError("database or disk is full"))]

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = fake_service(core)
        for error in errors:
            def fails(job: object, error: Exception = error) -> None:
                raise error

            core.healthy = True  # (as the watcher makes it once the store answers)
            with pytest.raises(Aborted, match="UNAVAILABLE"):
                await service._call(FakeContext(1), fails)
        core.executor.shutdown()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    logged = [(r.getMessage(), getattr(r, "reason", "")) for r in caplog.records]
    assert ("store error", "database: OperationalError") in logged
    assert ("store error", f"database: OperationalError: {DISK_FULL}") in logged
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


def test_a_full_disk_is_named_in_our_words_and_a_failed_purge_is_kept_for_the_next_try(
        tmp_path: pytest.TempPathFactory) -> None:
    """An operator whose SQLite volume filled saw "store unreachable: OperationalError" and
    "recovery failed: StoreError" each second, never why, and a shutdown on a full disk,
    purging finished rounds' uploads, ended in a raw SQLAlchemy traceback. A full disk
    (SQLITE_FULL, or PostgreSQL's SQLSTATE 53100) is named, in our words only; the purge's
    failure is a StoreError (what shutdown and the ticker handle), and the purge it failed
    is done at the next try rather than forgotten."""
    import sqlite3
    from pathlib import Path
    from types import SimpleNamespace

    import sqlalchemy as sa

    from aggregator import service
    from aggregator.store import DISK_FULL, Store, store_failure

    canary = "payload-canary-7f3a"
    full = sa.exc.OperationalError("DELETE FROM chunks WHERE x = :x", {"x": canary},
                                   sqlite3.OperationalError("database or disk is full"))
    told = store_failure(full, "storing chunks failed")
    assert str(told) == f"storing chunks failed: OperationalError: {DISK_FULL}"
    pg_full = sa.exc.OperationalError("INSERT", {}, Exception(canary))
    pg_full.orig.sqlstate = "53100"  # type: ignore[union-attr]
    assert DISK_FULL in str(store_failure(pg_full, "x")) and canary not in str(
        store_failure(pg_full, "x"))
    other = sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error"))
    assert DISK_FULL not in str(store_failure(other, "x"))
    assert service._failure(told) == str(told)  # (the log line's reason)
    assert service._failure(full) == "OperationalError"  # (a raw one: its class only)

    store = Store(f"sqlite:///{Path(str(tmp_path)) / 'agg.db'}")
    try:
        def refuses(*_: object, **__: object) -> None:
            raise full

        real = store.engine
        store.engine = SimpleNamespace(begin=refuses)  # type: ignore[assignment]
        try:
            with pytest.raises(StoreError, match="dropping finished rounds' uploads failed"):
                store.purge_chunks_before(3)
        finally:
            store.engine = real
    finally:
        store.close()

    from aggregator.job import Job

    job = Job.__new__(Job)
    calls: list[int] = []

    def purge_fails_once(before: int) -> int:
        calls.append(before)
        if len(calls) == 1:
            raise told
        return 0

    job.store = SimpleNamespace(purge_chunks_before=purge_fails_once)  # type: ignore[assignment]
    job._clock = lambda: 100.0
    from collections import deque
    job._purges = deque([(3, 50.0)])
    with pytest.raises(StoreError):
        job.purge()
    job.purge(now=False)  # (due: kept, with its time)
    assert calls == [3, 3] and not job._purges


def test_an_unhealthy_aggregator_answers_no_call_from_a_job_that_is_not_stale() -> None:
    """A tick that failed for a reason not the store's (a fault of ours) marks the aggregator
    unhealthy without making its job stale (only a store's failure, or a ping that times
    out, does): every call is UNAVAILABLE until the watcher has rebuilt the job from the
    store, whose memory may be ahead of what was committed; nothing runs on it."""
    ran: list[str] = []

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = fake_service(core, stale=False)
        core.healthy = False
        with pytest.raises(Aborted, match="UNAVAILABLE"):
            await service._call(FakeContext(1), lambda job: ran.append("ran"))
        core.executor.shutdown()

    asyncio.run(main())
    assert ran == []


def test_a_chunk_the_store_failed_to_write_is_never_acknowledged() -> None:
    """A chunk is acknowledged (counted in PutChunks' reply) only once its transaction has
    committed: a group commit that fails ends the upload UNAVAILABLE, the aggregator
    unhealthy, and the site sends the chunk again; acknowledged, the site would never send
    it again, and the message that refers to it could never be counted."""
    import hashlib
    import types

    from secagg.v1 import service_pb2

    def put_chunk_rows(rows: object) -> list[bool]:
        raise StoreError("storing chunks failed: OperationalError")

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = fake_service(core, store=types.SimpleNamespace(put_chunk_rows=put_chunk_rows),
                               current_round=1, upload_limit=lambda site: 1 << 40,
                               stored_uploads=(None, {}), generation=1)
        data = b"a chunk of a masked input"

        async def requests() -> object:
            yield service_pb2.Chunk(chunk_id=hashlib.sha256(data).digest(), data=data)

        try:
            with pytest.raises(Aborted, match="UNAVAILABLE"):
                await service.PutChunks(requests(), FakeContext(2))
            assert not core.healthy
        finally:
            core.executor.shutdown()

    asyncio.run(main())


def test_the_watcher_serves_the_job_it_rebuilt_from_the_store(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the store answers again, the watcher rebuilds the job from it and serves that
    job. Marked healthy while still holding the stale one, the aggregator said SERVING and
    answered every call UNAVAILABLE (each marking it unhealthy again): one store failure
    was an outage for good."""
    import types

    from aggregator import service as service_module

    rebuilt: list[object] = []

    class Rebuilt:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.recovered = False
            rebuilt.append(self)

        def recover(self) -> None:
            self.recovered = True

    monkeypatch.setattr(service_module, "Job", Rebuilt)

    async def set_health(name: str, status: object) -> None:
        pass

    async def main() -> tuple[bool, object]:
        core = Core(asyncio.get_running_loop())
        store = types.SimpleNamespace(ping=lambda timeout=1.0, write=False: None)
        core.job = types.SimpleNamespace(  # type: ignore[assignment]
            config=None, roster=None, store=store, _initial=None, metrics=None, stale=True)
        core.healthy = False
        watcher = asyncio.ensure_future(service_module._watch(
            core, types.SimpleNamespace(set=set_health)))
        try:
            for _ in range(50):
                if core.healthy:
                    break
                await asyncio.sleep(0.1)
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher
            core.executor.shutdown()
            core.pinger.shutdown()
        return core.healthy, core.job

    healthy, job = asyncio.run(main())
    assert healthy and len(rebuilt) == 1
    assert job is rebuilt[0] and rebuilt[0].recovered  # type: ignore[attr-defined]


def test_a_ping_whose_write_fails_tells_the_cause_and_the_connection_recovers(
        tmp_path: pytest.TempPathFactory) -> None:
    """A full disk failed the ping's commit, and the ping's clean-up, run on the failed
    transaction, raised PendingRollbackError in its place: "store unreachable:
    PendingRollbackError" every second, never the disk (an operator's test). The cause is
    told, and once the disk has room the next ping succeeds with the connection's usual
    lock wait. A file that cannot be written, or a disk failing writes, is named too."""
    import sqlite3
    from pathlib import Path

    import sqlalchemy as sa

    from aggregator.store import DISK_FULL, Store, store_failure

    store = Store(f"sqlite:///{Path(str(tmp_path)) / 'agg.db'}")
    try:
        real = store.engine.dialect.do_commit
        failing = [sqlite3.OperationalError("database or disk is full")]

        def do_commit(dbapi_connection: object) -> None:
            if failing:
                raise failing[0]
            real(dbapi_connection)

        store.engine.dialect.do_commit = do_commit  # type: ignore[method-assign]
        with pytest.raises(StoreError, match=f"store unreachable: OperationalError: "
                                             f"{re.escape(DISK_FULL)}"):
            store.ping(write=True)
        failing.clear()
        store.ping(write=True)
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        store.close()
    for text, named in (("attempt to write a readonly database", "cannot be written"),
                        ("disk I/O error", "failed a read or a write")):
        error = sa.exc.OperationalError("UPDATE", {}, sqlite3.OperationalError(text))
        assert named in str(store_failure(error, "x"))
