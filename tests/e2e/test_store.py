"""The aggregator's store on SQLite and on PostgreSQL: one schema, made by the Alembic
migrations; an aggregator never runs on a store it does not understand; backups restore."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from aggregator.store import (
    Event,
    Store,
    StoreBusy,
    StoreError,
    StoreUnreachable,
    backup,
    head_revision,
    metadata,
    migrate,
    normalize_url,
    restore,
)


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(normalize_url(url))


def test_the_migrated_schema_is_the_schema_the_queries_use(store_url: str) -> None:
    """Alembic's own comparison finds nothing between the migrations' result and the tables
    the code queries (columns, types, nullability, keys, indexes)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    Store(store_url).close()
    engine = _engine(store_url)
    try:
        with engine.connect() as c:
            diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}),
                                    metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_chunks_and_events_are_idempotent(store_url: str) -> None:
    store = Store(store_url)
    try:
        items = [(b"\x01" * 32, b"one"), (b"\x02" * 32, b"two")]
        assert store.put_chunks(items, round_number=1, site=2) == (2, 0)
        assert store.put_chunks(items, round_number=1, site=3) == (0, 2)  # a no-op
        assert store.missing([b"\x01" * 32, b"\x03" * 32]) == [b"\x03" * 32]
        event = Event(1, "message", 3, 2, b"payload")
        with store.transaction() as c:
            assert store.record_event(c, event)
        with store.transaction() as c:
            assert not store.record_event(c, event)  # a resubmission is never a second count
        assert [e.payload for e in store.events(1)] == [b"payload"]
    finally:
        store.close()


def test_an_aggregator_refuses_a_store_it_does_not_understand(store_url: str) -> None:
    Store(store_url).close()
    engine = _engine(store_url)
    try:
        with engine.begin() as c:  # as if a newer aggregator had migrated it
            c.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff_newer'")
        with pytest.raises(StoreError, match="needs " + head_revision()):
            Store(store_url)
        with pytest.raises(StoreError, match="does not know"):
            migrate(store_url)  # and migrate will not touch it either
        with engine.begin() as c:  # tables, but no revision at all: not ours
            c.exec_driver_sql("DROP TABLE alembic_version")
        with pytest.raises(StoreError, match="not ours"):
            Store(store_url)
    finally:
        engine.dispose()


def test_an_empty_store_is_created_only_when_asked(store_url: str) -> None:
    with pytest.raises(StoreError, match="empty"):
        Store(store_url, create=False)
    assert migrate(store_url) == (None, head_revision())
    assert migrate(store_url) == (head_revision(), head_revision())  # a no-op
    Store(store_url, create=False).close()


def _a_store_of_the_first_schema(store_url: str) -> None:
    """``store_url`` made a store at schema revision 0001, holding one model (b"m" * 32)."""
    from alembic import command

    from aggregator.store import _alembic_config

    engine = _engine(store_url)
    try:
        with engine.begin() as c:
            command.upgrade(_alembic_config(c), "0001")
            c.execute(sa.text("INSERT INTO models VALUES (:d, '[]', :b)"),
                      {"d": b"m" * 32, "b": '{"chunks": [], "size": 0}'})
    finally:
        engine.dispose()


def test_a_store_of_the_first_schema_migrates_and_is_bound_to_the_first_job(
        store_url: str) -> None:
    """0001 stores hold no job binding: `migrate` adds the table with its data kept, and
    the first aggregator to run on the store binds it; another federation's is then refused
    by the job (tests/e2e/test_job_start.py)."""
    _a_store_of_the_first_schema(store_url)
    with pytest.raises(StoreError, match="needs " + head_revision()):
        Store(store_url)
    assert migrate(store_url) == ("0001", head_revision())
    store = Store(store_url, create=False)
    try:
        assert store.load_model(b"m" * 32) is not None  # kept
        assert store.bind_job(b"\x01" * 32, "trial/job") == (b"\x01" * 32, "trial/job")
        assert store.bind_job(b"\x02" * 32, "other/job") == (b"\x01" * 32, "trial/job")
    finally:
        store.close()


def test_a_backup_taken_before_an_upgrade_is_restored_and_sent_to_migrate(
        store_url: str, tmp_path: Path, postgres_or_sqlite_target: str) -> None:
    """The README's upgrade: back up, then migrate. Gone wrong, the operator restores the
    backup with the new aggregator installed: the restore wrote the store, then said
    "the store is at schema revision 0001 ..." with status 2, and a retry was refused (the
    store existed). It is a restore: status 0, and the way on (migrate) is said."""
    _a_store_of_the_first_schema(store_url)
    out = tmp_path / "before-upgrade.bak"
    backup(store_url, out)
    proc = subprocess.run([sys.executable, "-m", "secagg.cli", "aggregator", "restore",
                           "--backup", str(out), "--store", postgres_or_sqlite_target],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "revision 0001" in proc.stdout and "aggregator migrate --store" in proc.stdout
    assert migrate(postgres_or_sqlite_target) == ("0001", head_revision())
    store = Store(postgres_or_sqlite_target, create=False)
    try:
        assert store.load_model(b"m" * 32) is not None  # all of it
    finally:
        store.close()


def test_backup_while_open_and_restore_into_a_new_store(store_url: str, tmp_path: Path,
                                                        postgres_or_sqlite_target: str) -> None:
    store = Store(store_url)
    try:
        store.put_chunks([(b"\x07" * 32, b"seven")], round_number=None, site=0)
        out = tmp_path / "store.backup"
        assert backup(store_url, out) > 0  # taken while the store is open
        assert out.stat().st_mode & 0o777 == 0o600
        with pytest.raises(StoreError, match="never overwrites"):
            backup(store_url, out)
    finally:
        store.close()
    if normalize_url(store_url).split(":")[0] != normalize_url(
            postgres_or_sqlite_target).split(":")[0]:
        pytest.skip("a backup restores into a store of its own kind")
    assert restore(out, postgres_or_sqlite_target) is None  # (at this aggregator's revision)
    restored = Store(postgres_or_sqlite_target, create=False)
    try:
        assert restored.get_chunk(b"\x07" * 32) == b"seven"
    finally:
        restored.close()
    with pytest.raises(StoreError):
        restore(out, postgres_or_sqlite_target)  # never over an existing store


@pytest.fixture
def postgres_or_sqlite_target(store_url: str, tmp_path: Path) -> object:
    """An empty store of the same kind as ``store_url`` to restore into."""
    if normalize_url(store_url).startswith("sqlite"):
        yield str(tmp_path / "restored.db")
    else:
        from tests.conftest import _postgres_database

        yield from _postgres_database()


def test_migrate_backup_and_restore_from_the_command_line(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "secagg.cli", "aggregator", *args],
                              capture_output=True, text=True, timeout=120)

    db = tmp_path / "agg.db"
    proc = cli("migrate", "--store", str(db))
    assert proc.returncode == 0 and head_revision() in proc.stdout
    assert "nothing to do" in cli("migrate", "--store", str(db)).stdout
    proc = cli("backup", "--store", str(db), "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    proc = cli("restore", "--backup", str(tmp_path / "b"), "--store", str(db))
    assert proc.returncode == 2 and "exists" in proc.stderr and "Traceback" not in proc.stderr


def _write_a_chunk_under_umask_022(path: Path) -> None:
    """A new store at ``path`` with one chunk written (so its -wal and -shm files exist),
    under the common umask that makes new files 0644."""
    import os

    old = os.umask(0o022)
    try:
        store = Store(str(path))
        try:
            store.put_chunks([(b"\x01" * 32, b"data")], round_number=1, site=1)
        finally:
            store.close()
    finally:
        os.umask(old)


def test_a_new_sqlite_store_and_its_wal_are_private_to_the_aggregator(tmp_path: Path) -> None:
    """The store holds every masked input, ciphertext and sealed share: 0600 from the start
    (it was 0644, and its -wal and -shm files with it)."""
    path = tmp_path / "agg.db"
    _write_a_chunk_under_umask_022(path)
    for f in [path, *tmp_path.glob("agg.db-*")]:
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_a_store_path_that_is_a_link_loop_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--store loop.db, a link to itself: RuntimeError ("Symlink loop") from inside pathlib,
    a traceback."""
    from secagg.cli import main

    (tmp_path / "loop.db").symlink_to(tmp_path / "loop.db")
    assert main(["aggregator", "migrate", "--store", str(tmp_path / "loop.db")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cannot create store" in err


def test_a_new_sqlite_store_reached_through_a_link_is_private_too(tmp_path: Path) -> None:
    """--store a symbolic link to a store not made yet: O_EXCL refused the link, and SQLite
    made its target 0644 (with its -wal and -shm files), readable by every local user."""
    (tmp_path / "data").mkdir()
    link = tmp_path / "agg.db"
    link.symlink_to(tmp_path / "data" / "store.db")
    _write_a_chunk_under_umask_022(link)
    made = list((tmp_path / "data").glob("store.db*"))
    assert tmp_path / "data" / "store.db" in made
    for f in made:
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_a_store_file_made_beforehand_with_a_loose_mode_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`touch agg.db` (0644) before the first start: the store kept that mode, and its -wal
    and -shm files took it, without a word. The aggregator says so, as a log event of its
    own (it was a Python warning printed inside another log line)."""
    import logging

    path = tmp_path / "agg.db"
    path.touch()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="secagg.aggregator"):
        Store(str(path)).close()
    loose = [r for r in caplog.records if getattr(r, "event", None) == "store_mode_loose"]
    assert len(loose) == 1 and "644" in loose[0].getMessage()
    assert "chmod 600" in loose[0].getMessage()
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="secagg.aggregator"):
        Store(str(path)).close()
    assert not [r for r in caplog.records if getattr(r, "event", None) == "store_mode_loose"]


def _burst_of_tiny_chunks(store: Store, path: Path) -> Path:
    """Store 512 three-byte chunks with random ids (each dirties a 64 KiB page of the log);
    the store's write-ahead log."""
    import hashlib
    import os

    for _ in range(32):
        batch = [os.urandom(3) for _ in range(16)]
        store.put_chunks([(hashlib.sha256(d).digest(), d) for d in batch],
                         round_number=1, site=1)
    return path.with_name(f"{path.name}-wal")


def test_the_write_ahead_log_is_truncated_once_checkpointed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks with random ids each dirty a 64 KiB page of the log: a burst of them grew
    the WAL by gigabytes, and SQLite kept the file at its largest until shutdown. Checkpointed
    (the service does it every second) once uploads pause, it is truncated."""
    import hashlib

    from aggregator import store as store_module

    monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT", 1 << 20)
    monkeypatch.setattr(store_module, "WAL_IDLE_SECONDS", 0.0)
    path = tmp_path / "agg.db"
    store = Store(str(path))
    try:
        wal = _burst_of_tiny_chunks(store, path)
        assert wal.stat().st_size > 2 << 20  # what the burst wrote
        store.checkpoint()
        store.put_chunks([(hashlib.sha256(b"x").digest(), b"x")], round_number=1, site=1)
        store.checkpoint()
        # defence check: the log is back under the limit, not kept at its largest
        assert wal.stat().st_size <= 1 << 20
    finally:
        store.close()


def test_the_write_ahead_log_is_truncated_under_a_trickle_of_uploads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a burst, a site trickles a chunk every few seconds, so uploads never pause: the
    log stayed at its largest for as long as the trickle went on. Truncated after
    WAL_TRUNCATE_SECONDS anyway."""
    import hashlib

    from aggregator import store as store_module

    monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT", 1 << 20)
    monkeypatch.setattr(store_module, "WAL_IDLE_SECONDS", 3600.0)  # never idle
    monkeypatch.setattr(store_module, "WAL_TRUNCATE_SECONDS", 0.5)
    path = tmp_path / "agg.db"
    store = Store(str(path))
    try:
        wal = _burst_of_tiny_chunks(store, path)
        assert wal.stat().st_size > 2 << 20
        for n in range(3):  # the trickle, a checkpoint after each chunk
            time.sleep(0.3)
            data = f"trickle {n}".encode()
            store.put_chunks([(hashlib.sha256(data).digest(), data)], round_number=1, site=1)
            store.checkpoint()
        assert wal.stat().st_size <= 1 << 20
    finally:
        store.close()


def test_the_write_ahead_log_is_not_truncated_in_the_midst_of_uploads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncating the log while chunks keep coming makes SQLite grow the file again from
    nothing, and the ingest rate fell: a log over its limit is truncated once uploads have
    paused for WAL_IDLE_SECONDS (or, under a trickle, once per WAL_TRUNCATE_SECONDS), not
    at every checkpoint. (The store's clock is a fake one here.)"""
    import types

    from aggregator import store as store_module

    clock = [1000.0]
    monkeypatch.setattr(store_module, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], time=time.time, sleep=time.sleep))
    monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT", 1 << 20)
    path = tmp_path / "agg.db"
    store = Store(str(path))
    try:
        wal = _burst_of_tiny_chunks(store, path)
        clock[0] += 100.0  # the uploads paused: truncated
        store.checkpoint()
        assert wal.stat().st_size <= 1 << 20
        _burst_of_tiny_chunks(store, path)  # uploads again, a second after it was truncated
        clock[0] += 1.0
        store.checkpoint()
        assert wal.stat().st_size > 2 << 20, "truncated in the midst of uploads"
    finally:
        store.close()


def test_a_failed_backup_or_restore_leaves_nothing_in_the_way_of_a_retry(tmp_path: Path) -> None:
    """A backup of something that is not a store, and a restore of a file that is not a
    backup, fail naming the cause and leave no file behind (the retry was refused: "exists")."""
    not_a_store = tmp_path / "notes.txt"
    not_a_store.write_text("not a database " * 100)
    out = tmp_path / "b.bak"
    with pytest.raises(StoreError):
        backup(str(not_a_store), out)
    assert not out.exists()
    target = tmp_path / "restored.db"
    with pytest.raises(StoreError):
        restore(not_a_store, str(target))
    assert not target.exists()
    good = tmp_path / "agg.db"
    Store(str(good)).close()
    assert backup(str(good), out) > 0 and out.stat().st_mode & 0o777 == 0o600
    restore(out, str(target))
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_first_migration_cut_short_leaves_a_store_that_opens(store_url: str) -> None:
    """The aggregator killed while it creates a new store's schema: on SQLite the sqlite3
    module committed each CREATE TABLE on its own, and the store was left with tables but no
    schema revision, which no aggregator (nor `migrate`, nor a restore of its backup) would
    open again. The migration is one transaction: cut short, it leaves nothing."""
    created = []

    def cut_short(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("CREATE TABLE"):
            created.append(statement)
            if len(created) == 3:
                raise KeyboardInterrupt  # (as a kill would, mid-migration)

    sa.event.listen(sa.Engine, "before_cursor_execute", cut_short)
    try:
        with pytest.raises(KeyboardInterrupt):
            Store(store_url)
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", cut_short)
    assert len(created) == 3
    store = Store(store_url)  # the aggregator started again: a whole schema, at head
    try:
        with store.engine.connect() as c:
            assert set(metadata.tables) <= set(sa.inspect(c).get_table_names())
    finally:
        store.close()


def test_a_backup_of_a_store_that_is_not_there_leaves_no_file_behind(tmp_path: Path) -> None:
    """A mistyped store path: the backup fails naming it, and leaves no empty 0600 file that
    would refuse the corrected retry ("exists")."""
    out = tmp_path / "b.bak"
    with pytest.raises(StoreError, match="no SQLite store"):
        backup(str(tmp_path / "no-such.db"), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "a failed backup left its temporary file behind"
    good = tmp_path / "agg.db"
    Store(str(good)).close()
    assert backup(str(good), out) > 0


def test_an_empty_store_name_is_refused_not_taken_for_an_in_memory_database() -> None:
    """`migrate --store ""` reported migrating SQLite's in-memory database, gone at exit."""
    with pytest.raises(StoreError, match="the store is empty"):
        migrate("")
    with pytest.raises(StoreError, match="the store is empty"):
        Store("  ")


def test_an_aggregator_never_started_on_another_applications_database_says_not_ours(
        tmp_path: Path) -> None:
    """`secagg aggregator run --store` pointed at another application's database, with or
    without leave to create the store: refused as not an aggregator store (not "empty",
    which sends the operator to `migrate`), and nothing of ours is created in it."""
    import sqlite3

    other = tmp_path / "other-app.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    for create in (False, True):
        with pytest.raises(StoreError, match="not ours"):
            Store(str(other), create=create)
    with sqlite3.connect(other) as c:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"patients"}


def test_migrate_refuses_a_database_that_is_not_an_aggregator_store(tmp_path: Path) -> None:
    """`secagg aggregator migrate --store` pointed at another application's database: refused,
    and nothing of ours is created in it."""
    import sqlite3

    other = tmp_path / "other-app.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(StoreError, match="not ours"):
        migrate(str(other))
    with sqlite3.connect(other) as c:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"patients"}


def test_a_postgresql_store_times_out_what_a_silent_server_would_hang(postgres_url: str) -> None:
    """Connections carry libpq's connect timeout, TCP keepalives and user timeout and a
    statement timeout (without them a partitioned server hung the job's thread for the
    kernel's ~15 minutes), still after a health ping (which sets a short one for itself); a
    URL that sets one keeps its own."""
    store = Store(postgres_url)
    try:
        store.ping()
        with store.engine.connect() as c:
            assert c.exec_driver_sql("SHOW statement_timeout").scalar() == "2min"
            params = c.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        for key in ("connect_timeout", "keepalives", "keepalives_idle", "tcp_user_timeout"):
            assert key in params, key
    finally:
        store.close()
    own = Store(postgres_url + "?connect_timeout=3", create=False)
    try:
        with own.bulk.connect() as c:
            params = c.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert params["connect_timeout"] == "3" and "keepalives_idle" in params
    finally:
        own.close()


_KILLED_MIDWAY = """
import os, shutil, sys
from pathlib import Path
from typing import Any
from aggregator import store

def copy_half_then_die(src, dst, **kw):
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: len(data) // 2])
    os._exit(9)  # kill -9 in the middle of the copy

real_create = store._create_private

def create_write_then_die(path):
    real_create(path)
    Path(path).write_bytes(b"SQLite format 3" + bytes(4000))
    os._exit(9)  # kill -9 while the backup is being written

if sys.argv[1] == "backup":
    store._create_private = create_write_then_die
    store.backup(sys.argv[2], Path(sys.argv[3]))
else:
    shutil.copyfile = copy_half_then_die
    store.restore(Path(sys.argv[2]), sys.argv[3])
"""


@pytest.mark.parametrize("operation", ["backup", "restore"])
def test_a_backup_or_restore_killed_midway_leaves_nothing_taken_for_complete(
        tmp_path: Path, operation: str) -> None:
    """kill -9 in the middle of a SQLite backup or restore: the file at the name asked for is
    never a half-written one (the retry was refused, "exists", and a half-restored store was
    opened and said "unreachable: DatabaseError"); the retry succeeds."""
    good = tmp_path / "agg.db"
    Store(str(good)).close()
    bak = tmp_path / "b.bak"
    target = tmp_path / "restored.db"
    if operation == "restore":
        assert backup(str(good), bak) > 0
        args = [str(bak), str(target)]
        final = target
    else:
        args = [str(good), str(bak)]
        final = bak
    killed = subprocess.run([sys.executable, "-c", _KILLED_MIDWAY, operation, *args],
                            cwd=Path(__file__).parents[2], capture_output=True)
    assert killed.returncode == 9, killed.stderr.decode()[-2000:]
    assert not final.exists(), "a file cut short holds the name of a complete one"
    if operation == "restore":
        restore(bak, str(target))
        Store(str(target), create=False).close()
    else:
        assert backup(str(good), bak) > 0
        restore(bak, str(target))


def test_a_postgresql_restore_that_fails_midway_leaves_the_database_empty(
        postgres_url: str, tmp_path: Path) -> None:
    """pg_restore cut short (here: a dump truncated after its schema) ran statement by
    statement, leaving tables without their constraints that an aggregator would open; in one
    transaction it leaves the database empty, and the retry restores."""
    import os

    from tests.conftest import _postgres_database

    store = Store(postgres_url)
    try:
        store.put_chunks([(os.urandom(32), os.urandom(200_000)) for _ in range(20)],
                         round_number=1, site=1)
    finally:
        store.close()
    bak = tmp_path / "pg.dump"
    backup(postgres_url, bak)
    cut = tmp_path / "cut.dump"
    cut.write_bytes(bak.read_bytes()[: bak.stat().st_size * 3 // 4])
    fresh = _postgres_database()
    url = next(fresh)
    try:
        with pytest.raises(StoreError):
            restore(cut, url)
        engine = _engine(url)
        try:
            with engine.connect() as c:
                assert sa.inspect(c).get_table_names() == []
        finally:
            engine.dispose()
        restore(bak, url)
        Store(url, create=False).close()
    finally:
        fresh.close()


@pytest.mark.parametrize("name", ["agg#1.db", "agg%41.db", "a?b.db"])
def test_a_backup_of_a_store_whose_path_looks_like_a_uri_copies_that_store(
        tmp_path: Path, name: str) -> None:
    """The store's path went into a file: URI unescaped: '#' began a fragment and '%41' was
    decoded, so SQLite opened (and created) another file, and the backup said it succeeded
    with an empty database in it. The path is escaped, and a backup that holds no store is
    refused, never published."""
    path = tmp_path / name
    store = Store(str(path))
    try:
        store.put_chunks([(b"\x07" * 32, b"seven")], round_number=None, site=0)
    finally:
        store.close()
    out = tmp_path / "b.bak"
    backup(str(path), out)
    # nothing but the store (with its -wal, -shm) and the backup: no other file was opened
    assert {p.name for p in tmp_path.iterdir()} <= {name, name + "-wal", name + "-shm",
                                                    "b.bak"}
    target = tmp_path / "restored.db"
    restore(out, str(target))
    restored = Store(str(target), create=False)
    try:
        assert restored.get_chunk(b"\x07" * 32) == b"seven"
    finally:
        restored.close()


def test_a_backup_of_an_empty_database_is_refused(tmp_path: Path) -> None:
    import sqlite3

    empty = tmp_path / "empty.db"  # a database, not an aggregator's store
    with sqlite3.connect(empty) as c:
        c.execute("CREATE TABLE notes (x)")
    c.close()
    out = tmp_path / "b.bak"
    with pytest.raises(StoreError, match="no aggregator store"):
        backup(str(empty), out)
    assert not out.exists()


def test_a_restore_beside_a_killed_stores_wal_is_refused(tmp_path: Path) -> None:
    """The aggregator was killed (its -wal and -shm stay), the operator removed agg.db and
    restores a backup there: SQLite would replay the old log onto the restored file, and the
    restore said ok with neither store in it. Refused, naming the files; the log is kept."""
    good = tmp_path / "src.db"
    Store(str(good)).close()
    bak = tmp_path / "b.bak"
    backup(str(good), bak)
    target = tmp_path / "agg.db"
    wal = tmp_path / "agg.db-wal"
    wal.write_bytes(b"committed data of the old store")
    with pytest.raises(StoreError, match=r"agg\.db-wal"):
        restore(bak, str(target))
    assert not target.exists() and wal.read_bytes() == b"committed data of the old store"
    wal.unlink()
    restore(bak, str(target))


def test_a_backup_of_a_postgresql_database_without_a_store_is_refused(
        tmp_path: Path, postgres_url: str) -> None:
    """The URL names another application's database (or an empty one): pg_dump succeeds, and
    the backup said ok with no store in it. Refused, and no file is left."""
    engine = sa.create_engine(normalize_url(postgres_url))
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE notes (x integer)")
    engine.dispose()
    out = tmp_path / "b.dump"
    with pytest.raises(StoreError, match="no aggregator store"):
        backup(postgres_url, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with engine.begin() as c:
        c.exec_driver_sql("DROP TABLE notes")
    engine.dispose()
    Store(postgres_url).close()  # the same database once it holds a store: backed up
    assert backup(postgres_url, out) > 0


def test_a_postgresql_backup_fails_rather_than_hangs_on_a_silent_database(
        tmp_path: Path, postgres_url: str) -> None:
    """The database accepts the connection and never answers (a frozen network, a stuck
    pooler): the backup fails within seconds, with a StoreError (pg_dump waited forever)."""
    import threading
    import time

    from tests.tcp_proxy import Proxy

    Store(postgres_url).close()
    real = sa.engine.make_url(postgres_url)
    proxy = Proxy(real.port or 5432)
    proxy.frozen = True
    url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    outcome: list[BaseException | int] = []

    def run() -> None:
        try:
            outcome.append(backup(url, tmp_path / "b.dump"))
        except BaseException as e:
            outcome.append(e)

    began = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        thread.join(timeout=40)
        assert outcome, "the backup hung"
        assert isinstance(outcome[0], StoreError), outcome
        assert time.monotonic() - began < 30
        assert not (tmp_path / "b.dump").exists()
    finally:
        proxy.frozen = False
        thread.join(timeout=30)
        proxy.close()


def test_another_alembic_applications_database_is_not_taken_for_a_store(
        store_url: str, tmp_path: Path) -> None:
    """A database of another application that Alembic manages too (its own tables, its own
    revision, or even one named like ours): a backup of it said ok, and the aggregator
    opened it as its store. Refused by both."""
    import sqlite3

    from aggregator.store import head_revision

    if store_url.startswith("postgresql"):
        engine = sa.create_engine(normalize_url(store_url))
        with engine.begin() as c:
            c.exec_driver_sql("CREATE TABLE invoices (id integer)")
            c.exec_driver_sql("CREATE TABLE alembic_version (version_num varchar(32) NOT NULL)")
            c.execute(sa.text("INSERT INTO alembic_version VALUES (:v)"), {"v": head_revision()})
        engine.dispose()
    else:
        with sqlite3.connect(store_url) as c:
            c.execute("CREATE TABLE invoices (id integer)")
            c.execute("CREATE TABLE alembic_version (version_num varchar(32) NOT NULL)")
            c.execute("INSERT INTO alembic_version VALUES (?)", (head_revision(),))
        c.close()
    out = tmp_path / "b.bak"
    with pytest.raises(StoreError, match="no aggregator store"):
        backup(store_url, out)
    assert not out.exists()
    with pytest.raises(StoreError, match="no aggregator store"):
        Store(store_url)


def test_a_postgresql_backup_stops_when_the_database_goes_silent_mid_dump(
        tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database stops answering after the dump has begun (a stuck backend or pooler whose
    TCP stack still acknowledges): pg_dump only waits to read, which no connection timeout
    ends, and the backup hung for good. Stopped once its I/O stalls; no file is left."""
    import os
    import threading
    import time

    from aggregator import store as store_module
    from aggregator.store import chunk_id
    from tests.tcp_proxy import Proxy

    monkeypatch.setattr(store_module, "PG_TOOL_STALL_SECONDS", 3.0)
    store = Store(postgres_url)
    for _ in range(24):
        data = os.urandom(1 << 20)
        store.put_chunks([(chunk_id(data), data)], round_number=1, site=1)
    store.close()
    real = sa.engine.make_url(postgres_url)
    proxy = Proxy(real.port or 5432)
    url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    out = tmp_path / "dump"
    out.mkdir()
    outcome: list[BaseException | int] = []

    def run() -> None:
        try:
            outcome.append(backup(url, out / "b.dump"))
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        began = time.monotonic()
        while not any(f.stat().st_size > 0 for f in out.iterdir()):  # the dump has begun
            assert time.monotonic() - began < 30 and not outcome, outcome
            time.sleep(0.005)
        proxy.frozen = True
        thread.join(timeout=30)
        assert outcome, "the backup hung"
        assert isinstance(outcome[0], StoreError) and "no progress" in str(outcome[0])
        assert list(out.iterdir()) == []
    finally:
        proxy.frozen = False
        thread.join(timeout=30)
        proxy.close()


def test_a_password_in_the_urls_query_stays_off_command_lines_and_messages(
        tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's password, given as user:password@ or as libpq's ``?password=``, went into
    pg_dump's --dbname, which any user of the machine reads with ps (SQLAlchemy's
    URL.set(password=None) keeps the password), and ``?password=`` into error messages. Now
    it goes in the environment, and messages mask it. ``?sslpassword=`` (the client key's
    passphrase: libpq has no environment variable for it) was on the command line too: the
    tools now get every parameter but the password from a service file only the aggregator's
    user reads, gone once they end; the password is in neither."""
    import os
    import stat
    import subprocess

    from aggregator.store import redacted

    real = sa.engine.make_url(postgres_url)
    secret = str(real.password)
    passphrase = "key-passphrase-" + os.urandom(6).hex()
    in_query = sa.engine.URL.create(real.drivername, username=real.username, host=real.host,
                                    port=real.port, database=real.database,
                                    query={"password": secret, "sslpassword": passphrase}
                                    ).render_as_string(hide_password=False)
    in_user = real.render_as_string(hide_password=False)
    Store(in_query).close()
    command_lines: list[list[str]] = []
    service_files: list[tuple[Path, str, int]] = []
    popen = subprocess.Popen

    def recording(args: Any, *a: Any, **k: Any) -> Any:
        command_lines.append([str(x) for x in args])
        if "PGSERVICEFILE" in k["env"]:  # (a tool reading a dump file connects nowhere)
            service = Path(k["env"]["PGSERVICEFILE"])
            service_files.append((service, service.read_text(), service.stat().st_mode))
        return popen(args, *a, **k)

    monkeypatch.setattr(subprocess, "Popen", recording)
    # (the test database's password may equal its user name: look for it as a password)
    leaks = (f"password={secret}", f":{secret}@", passphrase)
    for n, url in enumerate((in_query, in_user)):
        command_lines.clear()
        service_files.clear()
        assert backup(url, tmp_path / f"b{n}.dump") > 0
        assert command_lines
        assert not any(leak in x for line in command_lines for x in line for leak in leaks), (
            [x for line in command_lines for x in line if "postgres" in x])
        for service, text, mode in service_files:
            assert not any(leak in text for leak in leaks[:2]), "the password was written"
            assert stat.S_IMODE(mode) == 0o600 and not service.exists()
        assert service_files and (passphrase in service_files[0][1]) is (n == 0)
        assert not any(leak in redacted(url) for leak in leaks)
        with pytest.raises(StoreError) as caught:
            backup(url, tmp_path / f"b{n}.dump")  # exists: refused, naming the store
        assert not any(leak in str(caught.value) for leak in leaks)


def test_a_restore_of_another_applications_database_is_refused(tmp_path: Path) -> None:
    """A SQLite file of another application that Alembic manages, at a revision this
    aggregator does not know: its "run migrate" refusal was taken for an older store of ours,
    and the file was restored as the store. Refused; nothing is left."""
    import sqlite3

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE invoices (id integer)")
        c.execute("CREATE TABLE alembic_version (version_num varchar(32) NOT NULL)")
        c.execute("INSERT INTO alembic_version VALUES ('3f2a9c1d7e4b')")
    c.close()
    target = tmp_path / "agg.db"
    with pytest.raises(StoreError, match="no aggregator store"):
        restore(other, str(target))
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_a_store_url_naming_a_libpq_service_backs_up(
        tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's store URL names a service of their own libpq service file
    (``postgresql:///?service=NAME``): the aggregator connected, but the backup copied it
    into a service file of its own, and libpq refused the nested service. The tools now get
    the operator's file, and a secret beside the service name in the URL is refused with
    the advice to put it in that file."""
    real = sa.engine.make_url(postgres_url)
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[secagg-test]\nhost={real.host}\nport={real.port or 5432}\n"
                        f"dbname={real.database}\nuser={real.username}\n"
                        f"password={real.password}\n")
    services.chmod(0o600)
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    url = "postgresql:///?service=secagg-test"
    Store(url).close()
    assert backup(url, tmp_path / "b.dump") > 0
    with pytest.raises(StoreError, match="put those in the service file"):
        backup(url + "&sslpassword=passphrase", tmp_path / "c.dump")
    assert not (tmp_path / "c.dump").exists()


def test_one_store_serves_one_aggregator_at_a_time(store_url: str) -> None:
    """Two aggregators on one store each recovered the same round and diverged, writing over
    each other's stage closes: every site's round aborted. A serving aggregator holds the
    store (a lock beside the SQLite file; a PostgreSQL advisory lock): a second is refused,
    naming the cause, until the first lets go."""
    first = Store(store_url)
    second = Store(store_url, create=False)
    try:
        first.take_lease()
        with pytest.raises(StoreError, match="in use by another aggregator"):
            second.take_lease()
        if not store_url.startswith("postgresql"):  # the same file by other names
            import os

            link = Path(store_url).with_name("link.db")
            link.symlink_to(Path(store_url).name)
            (Path(store_url).parent / "elsewhere").mkdir()
            hard = Path(store_url).parent / "elsewhere" / "agg.db"
            os.link(store_url, hard)
            third = Store(str(link), create=False)
            try:
                with pytest.raises(StoreBusy, match="in use by another aggregator"):
                    third.take_lease()
            finally:
                third.close()
            # (the lock is the file's own, which a hard link shares: SQLite itself will not
            # open the store under that name beside the first, its -wal being another file)
            import fcntl

            fd = os.open(hard, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        first.close()
        second.take_lease()
        second.ping(write=True)
    finally:
        first.close()
        second.close()


def test_a_postgresql_lease_lost_with_its_session_is_taken_again_or_refused(
        postgres_url: str) -> None:
    """A PostgreSQL restart (or a network cut) ends the session that holds the lease; the
    aggregator noticed only after a failed write, and a second one served beside it
    meanwhile. Every ping (each second) now checks the lease: taken again, or StoreBusy
    (NOT_SERVING) if another aggregator took it meanwhile."""
    first = Store(postgres_url)
    other = Store(postgres_url, create=False)
    admin = _engine(postgres_url)
    kill = sa.text("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = "
                   "'advisory' AND granted AND database = (SELECT oid FROM pg_database "
                   "WHERE datname = current_database())")
    try:
        first.take_lease()
        with admin.connect() as c:
            c.execute(kill)
            c.commit()
        first.ping()  # taken again
        with pytest.raises(StoreBusy, match="in use by another aggregator"):
            other.take_lease()
        with admin.connect() as c:
            c.execute(kill)
            c.commit()
        other.take_lease()  # the other aggregator takes it while the first's session is gone
        with pytest.raises(StoreBusy, match="in use by another aggregator"):
            first.ping()
        # and on every ping after (a failed retake was then taken for "no lease needed", and
        # the first served again beside the other)
        with pytest.raises(StoreBusy, match="in use by another aggregator"):
            first.ping(write=True)
        # its writes are fenced too (a paused aggregator's stale timer wrote a round abort
        # into the store the other served)
        with pytest.raises(StoreBusy, match="lease on the store ended"), first.transaction():
            pass
        with other.transaction():
            pass
    finally:
        first.close()
        other.close()
        admin.dispose()


def test_a_postgresql_lease_outlives_a_dbas_idle_session_timeout(postgres_url: str) -> None:
    """A database whose sessions end after a second idle (idle_session_timeout, a common
    setting) ended the lease's session silently. The lease's session sets its own."""
    import time

    admin = _engine(postgres_url)
    name = sa.engine.make_url(normalize_url(postgres_url)).database
    with admin.connect() as c:
        c.execute(sa.text(f"ALTER DATABASE {name} SET idle_session_timeout = '1s'"))
        c.commit()
    first = Store(postgres_url)
    other = Store(postgres_url, create=False)
    try:
        first.take_lease()
        time.sleep(2.5)  # (the server ends sessions idle for 1 s)
        with pytest.raises(StoreBusy):
            other.take_lease()
    finally:
        first.close()
        other.close()
        admin.dispose()


def test_a_second_aggregator_on_a_served_store_waits_and_serves_once_the_first_stops(
        tmp_path: Path) -> None:
    """A second aggregator on a store another serves does not serve beside it (two diverged
    and aborted every round): it waits, NOT_SERVING, saying why, and serves once the first
    has stopped (a standby), from the store the first left."""
    from tests.service_kit import Aggregator, free_port, make_federation, start_aggregator

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    first = start_aggregator(fed, tmp_path)
    second = Aggregator(fed, tmp_path / "aggregator.db", tmp_path / "second.log")
    second.listen = f"127.0.0.1:{free_port()}"
    try:
        second.start(wait=False)
        second.wait_for(lambda e: e.get("event") == "store_busy")
        assert not any(e.get("event") == "serving" for e in second.read())
        assert first.stop() == 0
        second.wait_for(lambda e: e.get("event") == "serving", timeout=60)
    finally:
        first.stop()
        second.stop()


def test_a_store_made_by_migrate_is_private_too(tmp_path: Path) -> None:
    """`aggregator migrate --store new.db` made the file 0644 (serve and restore make 0600)."""
    import os

    old = os.umask(0o022)
    try:
        migrate(str(tmp_path / "new.db"))
    finally:
        os.umask(old)
    assert (tmp_path / "new.db").stat().st_mode & 0o777 == 0o600


def test_migrate_names_a_revision_it_does_not_know_and_an_upgrade_that_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store whose alembic_version row is empty raised AssertionError from inside alembic (a
    traceback); one relabelled to an older revision than its tables was "unreachable:
    OperationalError". Both are one line naming what is wrong, and the row is left as it
    was."""
    import sqlite3

    from secagg.cli import main

    path = tmp_path / "s.db"
    migrate(str(path))
    for row, said in (("", "at schema revision '', which this aggregator does not know"),
                      ("0001", "upgrading its schema from revision 0001 failed")):
        with sqlite3.connect(path) as c:
            c.execute("UPDATE alembic_version SET version_num = ?", (row,))
        c.close()
        assert main(["aggregator", "migrate", "--store", str(path)]) != 0
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        with sqlite3.connect(path) as c:
            assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [(row,)]
        c.close()
    # two rows: CommandError from inside alembic, for migrate and serve alike
    with sqlite3.connect(path) as c:
        c.execute("INSERT INTO alembic_version VALUES ('0002')")
    c.close()
    assert main(["aggregator", "migrate", "--store", str(path)]) != 0
    err = capsys.readouterr().err
    assert "holds more than one schema revision" in err and "Traceback" not in err


def test_a_store_that_is_not_a_database_is_named_so_not_unreachable(
        tmp_path: Path, postgres_url: str) -> None:
    """A truncated or foreign file was "unreachable: DatabaseError"; a PostgreSQL database
    that does not exist "unreachable: OperationalError" (and waited for as if it would
    come). Each is now one line naming the cause, and refused."""
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    bad.chmod(0o600)
    with pytest.raises(StoreError, match="not a SQLite database"):
        Store(str(bad))
    with pytest.raises(StoreError, match="not a SQLite database"):
        migrate(str(bad))
    missing = sa.engine.make_url(normalize_url(postgres_url)).set(
        database="secagg_no_such_database").render_as_string(hide_password=False)
    with pytest.raises(StoreError, match="does not exist") as refused:
        Store(missing)
    assert not isinstance(refused.value, StoreUnreachable)


@pytest.mark.parametrize(("query", "said"), [
    pytest.param("connect_timout=5", "a connection option libpq does not know", id="option"),
    pytest.param("sslmode=bogus", "sslmode is not one libpq knows", id="sslmode")])
def test_a_postgresql_url_mistake_is_named_and_refused_not_waited_for(
        postgres_url: str, query: str, said: str) -> None:
    """A misspelt connection option or sslmode was "unreachable: ProgrammingError" (or
    OperationalError), retried every few seconds for good, NOT_SERVING, with the cause
    never said (an outside operator). Named, and refused at once."""
    url = postgres_url + ("&" if "?" in postgres_url else "?") + query
    with pytest.raises(StoreError, match=said) as refused:
        Store(url)
    assert not isinstance(refused.value, StoreUnreachable)


@pytest.mark.parametrize(("driver_says", "said"), [
    ("connection to server failed: server does not support SSL, but SSL was required",
     "does not support SSL"),
    ('FATAL:  permission denied for database "x"', "may not connect to the database"),
    ('FATAL:  no pg_hba.conf entry for host "1.2.3.4", user "u", database "d"',
     "pg_hba.conf admits no connection"),
    ("permission denied for schema public", "GRANT CREATE ON SCHEMA public"),
    ('FATAL:  role "u" does not exist', "the role does not exist")])
def test_postgresql_set_up_mistakes_are_named_in_our_words(driver_says: str,
                                                          said: str) -> None:
    """What PostgreSQL's set-up refuses (pg_hba.conf, CONNECT, CREATE on a new database's
    schema: PostgreSQL 15 grants it to the owner alone) is named, never quoted."""
    from aggregator.store import _known_cause

    class Driver(Exception):
        pass

    error = sa.exc.OperationalError("SELECT 1", {}, Driver(driver_says))
    cause = _known_cause(error)
    assert cause is not None and said in cause and driver_says not in cause


def test_a_schema_upgrade_refused_for_a_cause_the_operator_mends_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new PostgreSQL 15 database owned by another role: the store's role may connect but
    not create tables, and its first start was "upgrading its schema ... failed
    (InsufficientPrivilege) ...: restore a backup", advice for a broken upgrade."""
    from alembic import command

    class Driver(Exception):
        pass

    def refused(*_a: object, **_k: object) -> None:
        raise sa.exc.ProgrammingError("CREATE TABLE", {}, Driver(
            "permission denied for schema public"))

    monkeypatch.setattr(command, "upgrade", refused)
    with pytest.raises(StoreError, match="GRANT CREATE ON SCHEMA public") as e:
        migrate(str(tmp_path / "new.db"))
    assert "restore a backup" not in str(e.value)


def test_a_second_aggregator_on_the_same_port_does_not_share_it(tmp_path: Path) -> None:
    """gRPC shares a port between processes by default (SO_REUSEPORT): a standby started
    with the same config answered "unavailable" to the sites whose connections landed on
    it, until they gave up. The port is not shared: the second one cannot listen, says so
    in one line, and the first serves on."""
    from tests.service_kit import Aggregator, make_federation, start_aggregator

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    first = start_aggregator(fed, tmp_path)
    second = Aggregator(fed, tmp_path / "other.db", tmp_path / "second.log")
    try:
        second.start(wait=False)
        assert second.process is not None and second.process.wait(timeout=60) == 2
        log = (tmp_path / "second.log").read_text()
        assert "cannot listen" in log and "Traceback" not in log
        assert first.process is not None and first.process.poll() is None
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("url", ["mysql://x@y/z", "http://x/y", "oracle+cx_oracle://h/d",
                                 "MySQL://x@y/z"])
def test_a_store_url_of_another_kind_is_refused_by_name(url: str) -> None:
    """Another database's URL reached SQLAlchemy, which answered "No module named 'MySQLdb'"
    or "Can't load plugin: sqlalchemy.dialects:http": an operator was told of modules."""
    kind = url.split(":", 1)[0].lower()
    for open_it in (Store, migrate):
        with pytest.raises(StoreError, match=re.escape(f"stores of kind '{kind}' are not")) as e:
            open_it(url)
        assert "Module" not in str(e.value) and "plugin" not in str(e.value)


def test_a_store_path_that_is_a_directory_is_named_as_one(tmp_path: Path) -> None:
    """--store DIR was warned about as a loose file, then called "unreachable:
    OperationalError"."""
    for open_it in (Store, migrate):
        for spelled in (str(tmp_path), f"sqlite:///{tmp_path}", f"SQLite:///{tmp_path}"):
            with pytest.raises(StoreError, match="is a directory"):
                open_it(spelled)
    assert list(tmp_path.iterdir()) == []


def test_a_store_in_a_missing_directory_is_refused_before_the_port_is_bound(
        tmp_path: Path) -> None:
    """The aggregator bound its port and said "listening", then exited: cannot create the
    store. It now refuses first, naming the directory (a site dialling in between found an
    aggregator that was never going to serve)."""
    import asyncio

    from aggregator.service import serve
    from tests.service_kit import make_federation

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    bound: list[int] = []
    for spelled in (f"{tmp_path}/gone/agg.db", f"sqlite:///{tmp_path}/gone/agg.db"):
        with pytest.raises(StoreError, match=f"its directory {tmp_path}/gone does not exist"):
            asyncio.run(serve(fed.aggregator_config, store=spelled, ready=bound.append))
        assert bound == []
    assert not (tmp_path / "gone").exists()


def test_a_store_path_that_is_a_fifo_or_a_device_is_named_as_one(tmp_path: Path) -> None:
    """--store FIFO was "unreachable: OperationalError" (or waited on the FIFO)."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for open_it in (Store, migrate):
        for spelled in (str(fifo), f"sqlite:///{fifo}", "/dev/null"):
            with pytest.raises(StoreError, match="is not a regular file"):
                open_it(spelled)


def test_a_refused_connection_is_said_as_one() -> None:
    """A PostgreSQL store nobody listens on was "unreachable: OperationalError", no reason."""
    with pytest.raises(StoreUnreachable, match="refused the connection") as e:
        Store("postgresql://secagg@127.0.0.1:1/db?connect_timeout=2")
    assert "127.0.0.1:1" in str(e.value)


def test_a_restore_of_a_file_that_is_no_database_names_that_file(tmp_path: Path) -> None:
    """The error named the restore's own temporary file (.agg.db.restoring-...), not the
    operator's backup."""
    bad = tmp_path / "text.db"
    bad.write_text("not a database, just text " * 200)
    with pytest.raises(StoreError) as e:
        restore(bad, str(tmp_path / "agg.db"))
    assert str(e.value).startswith(f"{bad} is not a SQLite store")
    assert "restoring" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.db"]


@pytest.mark.parametrize("store", ["host=db user=agg password={pw} dbname=agg",
                                   "dbname=agg password={pw}"])
def test_a_libpq_connection_string_is_refused_never_made_a_file(
        tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taken for a SQLite file name: a file of that name was made, and `migrate` printed it,
    password and all."""
    import secrets

    pw = secrets.token_hex(8)
    monkeypatch.chdir(tmp_path)
    for open_it in (Store, migrate):
        with pytest.raises(StoreError, match="libpq connection string") as e:
            open_it(store.format(pw=pw))
        assert pw not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_scheme_is_case_insensitive_and_a_non_scheme_is_not_shown() -> None:
    """POSTGRESQL:// was "not supported: name a postgresql:// URL"; a value with an
    assignment pasted before the URL had it shown as the store's kind."""
    assert normalize_url("POSTGRESQL://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("SQLite:///x.db") == "sqlite:///x.db"
    with pytest.raises(StoreError, match="this store URL's kind is not supported") as e:
        normalize_url("PGPASSWORD=s3cr3t postgresql://u@h/db")
    assert "s3cr3t" not in str(e.value)


def test_a_restore_into_no_file_or_from_a_directory_is_refused_by_name(tmp_path: Path) -> None:
    """Into 'sqlite://' it said "None exists"; into ':memory:' it made a file of that name;
    from a directory it raised IsADirectoryError from the copy."""
    good = tmp_path / "agg.db"
    Store(str(good)).close()
    out = tmp_path / "agg.bak"
    backup(str(good), out)
    for into in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(StoreError, match="restore into a store file"):
            restore(out, into)
    with pytest.raises(StoreError, match="is not a file"):
        restore(tmp_path, str(tmp_path / "new.db"))
    assert not (tmp_path / "new.db").exists() and not (tmp_path / ":memory:").exists()


def test_a_restore_from_a_backup_that_is_not_there_says_so(tmp_path: Path) -> None:
    """A mistyped backup path: "no backup file" naming it (not "is not a file", which reads
    as a directory or a device given by mistake), and no store is made."""
    missing = tmp_path / "agg.bak"
    with pytest.raises(StoreError, match=r"no backup file .*agg\.bak"):
        restore(missing, str(tmp_path / "new.db"))
    assert not (tmp_path / "new.db").exists()


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_sqlite_store_deleted_or_replaced_under_its_aggregator_stops_it_serving(
        tmp_path: Path, change: str) -> None:
    """The store's file removed (a clean-up job) or replaced while the aggregator ran: it
    served on, writing into a file no one could open again (all lost at its next start),
    and, the path's lock gone with the file, a second aggregator served beside it from a new
    store (an operator's test). The next ping fails, naming what happened, so health says
    NOT_SERVING."""
    import os

    path = tmp_path / "agg.db"
    store = Store(str(path))
    try:
        store.take_lease()
        store.ping(write=True)
        if change == "deleted":
            for p in tmp_path.glob("agg.db*"):
                p.unlink()
        else:
            other = Store(str(tmp_path / "other.db"))
            other.close()
            os.replace(tmp_path / "other.db", path)
        with pytest.raises(StoreError, match="deleted or replaced while this aggregator ran"):
            store.ping(write=True)
    finally:
        store.close()


def test_the_aggregator_names_its_store_and_whether_it_is_new(tmp_path: Path) -> None:
    """A relative --store given in another directory made a new store there, and the job
    began again at round 1 with no word of which store the aggregator used. Its log names
    the store's absolute path at start, and says when it is a new one."""
    from tests.service_kit import Aggregator, make_federation

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = Aggregator(fed, tmp_path / "agg.db", tmp_path / "agg.log")
    try:
        for _ in range(2):
            agg.start()
            assert agg.stop() == 0
    finally:
        agg.stop()
    said = [e["reason"] for e in agg.read() if e.get("event") == "store"]
    where = str((tmp_path / "agg.db").resolve())
    assert said == [f"{where} (new: the job starts at round 1)", where], said


def test_an_empty_store_of_either_kind_is_said_to_begin_the_job(store_url: str,
                                                                tmp_path: Path) -> None:
    """A PostgreSQL URL naming an existing, empty database (a name mistyped for the job's)
    began the job again at round 1 and said only the URL (SQLite said `new` for a new
    file). A store the aggregator gave its schema to is said as such, a warning, once."""
    from tests.service_kit import Aggregator, make_federation

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = Aggregator(fed, store_url, tmp_path / "agg.log")
    try:
        for _ in range(2):
            agg.start()
            agg.wait_for(lambda e: e.get("event") == "serving")
            assert agg.stop() == 0
    finally:
        agg.stop()
    events = [e for e in agg.read() if e.get("event") in ("store_new", "serving")]
    assert [(e["event"], e["level"]) for e in events] == [
        ("store_new", "warning"), ("serving", "info"), ("serving", "info")], events


def test_migrate_refuses_a_store_an_aggregator_serves(store_url: str, tmp_path: Path) -> None:
    """`migrate` upgraded the schema of a store an aggregator was serving (it exited 0, and
    the aggregator ran on, on a store it does not understand): refused while one serves,
    in one line; once it has stopped, the store migrates."""
    from tests.service_kit import Aggregator, make_federation

    def cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "secagg.cli", "aggregator", "migrate",
                               "--store", store_url], capture_output=True, text=True,
                              timeout=120)

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = Aggregator(fed, store_url, tmp_path / "agg.log")
    try:
        agg.start()
        agg.wait_for(lambda e: e.get("event") == "serving")
        proc = cli()
        assert proc.returncode == 2, proc
        assert "an aggregator is serving the store" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        agg.stop()
    proc = cli()
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc
