"""Checks of the store that the end-to-end tests did not notice missing (a mutation review):
what the aggregator keeps outlives a round's purge, an event of one round is never taken for
another's, a libpq tool that fails is said so, and a store URL cannot write lines of its own
into a tool's service file."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import aggregator.store as store_module
from aggregator.store import Event, Store, StoreError


def test_a_kept_payload_outlives_the_purge_of_a_round_that_uploaded_the_same_bytes(
        tmp_path: Path) -> None:
    """Chunks are content-addressed: a model (kept for good, round None) whose bytes a site
    had uploaded in round 1 is the same chunk, labelled round 1. write_blob must unlabel it,
    or the purge of round 1 takes the model's payload."""
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        data = b"model bytes a site uploaded too"
        store.put_chunks([(hashlib.sha256(data).digest(), data)], round_number=1, site=2)
        blob = store.write_blob(data, chunk_bytes=1 << 20, round_number=None)
        store.purge_chunks_before(5)
        assert store.read_blob(blob) == data
    finally:
        store.close()


def test_an_event_of_one_round_or_site_is_never_taken_for_another(tmp_path: Path) -> None:
    """record_event's duplicate check is per (round, kind, stage, site): a site's message at
    stage 0 of round 2 is recorded although it sent one at stage 0 of round 1 (else it is
    counted, never recorded, and a restart replays a different round)."""
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        with store.transaction() as c:
            assert store.record_event(c, Event(1, "message", 0, 3, b"round 1"))
            assert store.record_event(c, Event(2, "message", 0, 3, b"round 2"))
            assert store.record_event(c, Event(2, "message", 0, 4, b"site 4"))
            assert not store.record_event(c, Event(2, "message", 0, 4, b"again"))
        assert [e.payload for e in store.events(2)] == [b"round 2", b"site 4"]
        assert [e.payload for e in store.events(1)] == [b"round 1"]
        assert store.event_payload(2, "message", 0, 3) == b"round 2"
    finally:
        store.close()


def test_finishing_a_round_changes_that_round_only(tmp_path: Path) -> None:
    """A round's status, result and survivors are written to its own row: finishing round 2
    leaves round 1's result (the released history) as it was."""
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        for n in (1, 2):
            store.open_round(n, f"fed/job/round-{n}", "secagg", b"\x07" * 32)
        with store.transaction() as c:
            store.finish_round(c, 1, "completed", result_digest=b"\x01" * 32, survivors=[1, 2, 3])
        with store.transaction() as c:
            store.finish_round(c, 2, "aborted", abort_reason="too few sites")
        first, second = store.rounds()
        assert (first.status, bytes(first.result_digest), first.abort_reason,
                first.survivors) == ("completed", b"\x01" * 32, None, "[1, 2, 3]")
        assert (second.status, second.result_digest) == ("aborted", None)
    finally:
        store.close()


def test_a_libpq_tool_that_exits_nonzero_is_a_store_error(tmp_path: Path) -> None:
    """pg_dump or pg_restore failing (a dump cut short by a lost connection) is an error that
    names the tool and its message, never output taken for a complete backup or restore."""
    command = [sys.executable, "-c", "import sys; sys.stderr.write('dump cut short'); "
                                     "sys.exit(1)"]
    with pytest.raises(StoreError, match="pg_dump on db failed: dump cut short"):
        store_module._run_tool("pg_dump", command, {}, " on db")


def test_a_store_url_parameter_holding_a_line_break_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL parameter holding a line break would write a line of its own (another host, a
    passfile) into the service file the libpq tools read: refused before a tool runs."""
    ran: list[Any] = []
    monkeypatch.setattr(shutil, "which", lambda tool: "/usr/bin/" + tool)
    def recording(*a: Any) -> bytes:
        ran.append(a)
        return b""

    monkeypatch.setattr(store_module, "_run_tool", recording)
    url = "postgresql+psycopg://agg@db.example/store?application_name=a%0Ahost%3Devil.example"
    with pytest.raises(StoreError, match="line break"):
        store_module._pg_tool("pg_dump", url, "--format=custom")
    assert ran == []


def test_a_store_that_refuses_the_connection_is_named_without_its_password() -> None:
    """The error of a store that does not answer names it, its password masked (the message
    reaches the log and the terminal)."""
    from aggregator.store import StoreUnreachable

    secret = "pw-" + hashlib.sha256(b"not a real password").hexdigest()[:16]
    with pytest.raises(StoreUnreachable) as caught:
        Store(f"postgresql://agg:{secret}@127.0.0.1:1/store?connect_timeout=2")
    assert "unreachable" in str(caught.value)
    assert secret not in str(caught.value) and "***" in str(caught.value)
    # (a URL SQLAlchemy cannot make an engine of: the same)
    with pytest.raises(StoreError, match="cannot open store") as refused:
        Store(f"postgresql://agg:{secret}@127.0.0.1:1/store?plugin=no_such_plugin")
    assert secret not in str(refused.value) and "***" in str(refused.value)


def test_a_truncating_checkpoint_gives_its_connection_back_with_the_long_busy_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TRUNCATE checkpoint waits at most 0.1 s for others; the pooled connection then
    goes back to the 30 s wait, or the next event write behind a chunk write fails with
    'database is locked' instead of waiting."""
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        store.put_chunks([(hashlib.sha256(b"x").digest(), b"x")], round_number=1, site=2)
        monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT", 0)
        store._last_chunk_write = 0.0
        store.checkpoint()
        assert (tmp_path / "aggregator.db-wal").stat().st_size == 0
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        store.close()


def test_event_writes_sync_every_commit_and_chunk_writes_do_not(tmp_path: Path) -> None:
    """A message is acknowledged once its event commits: the connection that writes events
    syncs every commit (synchronous=FULL, in WAL mode), so an acknowledged count survives a
    power cut too; only chunk writes (asked for again if lost) skip it."""
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        with store.transaction() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        with store.bulk.connect() as c:
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        store.close()


def test_a_complete_backup_or_restore_is_never_published_over_an_existing_file(
        tmp_path: Path) -> None:
    """The last step of a backup or restore gives the complete file its name only if no file
    has it (one made since the first check: a store an aggregator has just created, another
    backup): refused, never replaced."""
    partial, final = tmp_path / ".store.db.restoring-1", tmp_path / "store.db"
    partial.write_bytes(b"the restored copy")
    final.write_bytes(b"a store made meanwhile")
    with pytest.raises(StoreError, match="exists: never overwritten"):
        store_module._publish(partial, final)
    assert final.read_bytes() == b"a store made meanwhile"


def test_a_postgresql_restore_into_a_database_holding_tables_is_refused_before_it_runs(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore goes into an empty database only: a database the URL names by mistake
    (another application's) never gets the store's tables mixed into its own."""
    import sqlalchemy as sa

    engine = sa.create_engine(store_module.normalize_url(postgres_url))
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE other_application (id integer)")
    engine.dispose()
    ran: list[Any] = []
    def recording(*a: Any) -> bytes:
        ran.append(a)
        return b""

    monkeypatch.setattr(store_module, "_pg_tool", recording)
    dump = tmp_path / "store.dump"
    dump.write_bytes(b"PGDMP")
    with pytest.raises(StoreError, match="restore only into an empty database"):
        store_module.restore(dump, postgres_url)
    assert ran == []


def test_more_chunk_ids_than_a_query_may_bind_are_looked_up_and_claimed_in_batches(
        postgres_url: str) -> None:
    """A payload may name more chunks than one PostgreSQL statement can bind (65,535
    parameters): its sizes are looked up, and its chunks claimed, in batches, never a
    StoreError that refuses an honest message (SQLite, built with a higher limit, takes
    them all at once)."""
    store = Store(postgres_url)
    try:
        ids = [i.to_bytes(32, "big") for i in range(70_000)]
        store.put_chunks([(ids[-1], b"last")], round_number=1, site=2)
        assert store.chunk_sizes(ids) == {ids[-1]: 4}
        with store.transaction() as c:
            store.claim_chunks(c, ids, 2)
        assert store.round_uploads(2) == {2: (4, 1)}
    finally:
        store.close()


def test_the_uploads_recovered_for_a_round_are_that_rounds_and_the_sites_only(
        tmp_path: Path) -> None:
    """At recovery each site's upload budget is charged with what it stored for the running
    round: never an earlier round's uploads (the site would be refused as over budget), nor the
    aggregator's own payloads (site 0)."""
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        store.put_chunks([(b"\x01" * 32, b"round one")], round_number=1, site=2)
        store.put_chunks([(b"\x02" * 32, b"two"), (b"\x03" * 32, b"2")], round_number=2, site=2)
        store.put_chunks([(b"\x04" * 32, b"own")], round_number=2, site=0)
        assert store.round_uploads(2) == {2: (4, 2)}
        assert store.round_uploads(1) == {2: (9, 1)}
    finally:
        store.close()


def test_a_model_saved_again_is_kept_once_not_an_error(tmp_path: Path) -> None:
    """A model is saved by its digest: a round whose result is a model the store already
    holds (a rerun, the initial model at every start) saves nothing new, never a
    primary-key error that stops the job."""
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        blob = store.write_blob(b"weights", chunk_bytes=1 << 20, round_number=None)
        digest = hashlib.sha256(b"weights").digest()
        store.save_model(digest, "spec", blob)
        store.save_model(digest, "spec", blob)
        assert store.load_model(digest) == ("spec", blob)
    finally:
        store.close()


def test_a_ping_reads_the_store_not_only_its_connection(tmp_path: Path) -> None:
    """The health ping reads the schema revision: a SQLite connection opens whatever the file
    holds, so a ping that only connected said SERVING for a store that no longer holds its
    schema (here its revision table dropped under the aggregator)."""
    import sqlite3

    path = tmp_path / "aggregator.db"
    store = Store(str(path))
    try:
        store.ping()
        with sqlite3.connect(path) as c:
            c.execute("DROP TABLE alembic_version")
        c.close()
        with pytest.raises(StoreError):
            store.ping()
    finally:
        store.close()


@pytest.mark.parametrize("call", ["put_chunk_rows", "get_chunk", "missing"])
def test_a_database_failing_under_a_chunk_call_is_a_store_error(tmp_path: Path,
                                                                call: str) -> None:
    """The chunk calls the service makes off the job's thread (uploads, downloads, the
    lookup of missing chunks) raise the store's own error when the database fails, never
    the driver's: the service answers StoreError UNAVAILABLE (and marks itself unhealthy
    for an upload); a raw driver error ended the call UNKNOWN, the aggregator still
    healthy, and the driver's text can quote a chunk's bytes."""
    import sqlalchemy as sa

    class Failing:
        def connect(self) -> Any:
            raise sa.exc.OperationalError("SELECT chunk_id FROM chunks", {},
                                          Exception("disk I/O error"))

        begin = connect

    store = Store(str(tmp_path / "aggregator.db"))
    engine, bulk = store.engine, store.bulk
    store.engine = store.bulk = Failing()  # type: ignore[assignment]
    cid = b"\x01" * 32
    try:
        with pytest.raises(StoreError):
            if call == "put_chunk_rows":
                store.put_chunk_rows([(cid, b"x", 1, 2)])
            elif call == "get_chunk":
                store.get_chunk(cid)
            else:
                store.missing([cid])
    finally:
        store.engine, store.bulk = engine, bulk
        store.close()
