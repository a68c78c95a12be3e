"""The aggregator's durable state, with SQLAlchemy Core: SQLite by default (one file, nothing to
start), PostgreSQL with the same code.

What is stored, and why it is enough to survive ``kill -9``:
- ``chunks``: content-addressed payload chunks (masked inputs, ciphertexts, aggregates, models,
  released averages), each stored only after its bytes hash to its id;
- ``events``: every site message the round's role accepted, and every stage close, in order.
  A role is a deterministic function of these, so on restart the aggregator replays them into a
  fresh role and gets the same state, running sums included. A message is acknowledged only
  after its event row is committed; the unique key (round, kind, stage, site) makes a
  resubmitted message a no-op, never a second count;
- ``rounds``: each round's status, stage, model and result, ``models``: the global models,
  ``releases``: the released averages (the released history).

Nothing secret is stored: the aggregator never holds a key, and a stored masked input or
ciphertext is unreadable without secrets the aggregator does not have.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from secagg.errors import SecAggError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# The tables as the queries see them. The schema itself is made and changed only by the
# Alembic migrations in aggregator/migrations (tests/unit/test_store_schema.py checks that the
# migrated schema is exactly this one, on SQLite and on PostgreSQL).
metadata = sa.MetaData()

chunks = sa.Table(
    "chunks", metadata,
    sa.Column("chunk_id", sa.LargeBinary(32), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("round", sa.Integer, nullable=True, index=True),  # NULL: kept (models, releases)
    sa.Column("site", sa.Integer, nullable=False),  # uploader, 0 for the aggregator
)

rounds = sa.Table(
    "rounds", metadata,
    sa.Column("round", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("round_id", sa.String(200), nullable=False, unique=True),
    sa.Column("protocol", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("model_digest", sa.LargeBinary(32), nullable=False),
    sa.Column("result_digest", sa.LargeBinary(32), nullable=True),
    sa.Column("abort_reason", sa.String(200), nullable=True),
    sa.Column("survivors", sa.Text, nullable=True),
    sa.Column("opened_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
)

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("round", sa.Integer, nullable=False),
    # "waits" (the round opened waiting for its sites), "message", "close" or "under_way"
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("site", sa.Integer, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.UniqueConstraint("round", "kind", "stage", "site", name="one_event_per_site_stage"),
)

models = sa.Table(
    "models", metadata,
    sa.Column("digest", sa.LargeBinary(32), primary_key=True),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("blob", sa.Text, nullable=False),
)

releases = sa.Table(
    "releases", metadata,
    sa.Column("round", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("average", sa.Text, nullable=False),  # blob (chunk ids) of the float64 average
    sa.Column("weight_sum", sa.Float, nullable=False),
    sa.Column("sites", sa.Text, nullable=False),
    sa.Column("released_at", sa.Float, nullable=False),
)

job = sa.Table(
    "job", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # one row, id 1
    sa.Column("trust_root", sa.LargeBinary(32), nullable=False),  # the federation's
    sa.Column("job", sa.String(200), nullable=False),  # its round ids' prefix: name/job id
)


class StoreError(SecAggError):
    """The store is unreachable or does not hold what it should (the service says UNAVAILABLE
    or refuses to start)."""


class StoreOutdated(StoreError):
    """The store is one of ours at an older schema revision (``revision``): `secagg aggregator
    migrate` brings it to this aggregator's."""

    def __init__(self, message: str, revision: str) -> None:
        super().__init__(message)
        self.revision = revision


class StoreUnreachable(StoreError):
    """A database server did not answer (down, restarting, unreachable): the aggregator waits
    for it, NOT_SERVING, rather than exit."""


class StoreBusy(StoreUnreachable):
    """Another aggregator serves the store (it holds its lease: Store.take_lease). Waited
    for like a database that does not answer: this aggregator serves once the other stops
    (a standby), and never beside it."""


# What a database raises when it does not answer, as opposed to a store that answers wrongly:
# a connection refused, reset or timed out, a server restarting, a pool with no connection.
_UNREACHABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError,
                sa.exc.TimeoutError)


# ...and PostgreSQL's SQLSTATEs for a server that cannot take the job's work for now, whatever
# the driver's class: a read-only transaction (a hot standby during a failover, 25006), a
# connection exception (08), insufficient resources (53: a full disk, too many connections),
# an operator intervention (57P: shutting down, starting up), a serialization failure or
# deadlock (40).
_UNREACHABLE_SQLSTATES = ("25006", "08", "53", "57P", "40")


# what a driver's message says, for the causes an operator fixes by hand, as our own words
# (a driver's message is never passed on: it can quote statements and parameters)
_FULL_CAUSES = ((("database or disk is full",), "full"),)  # (SQLite's SQLITE_FULL)
_WRITE_CAUSES = (
    (("attempt to write a readonly database",), "the store's file cannot be written (its mode, "
                                                "its owner, an immutable file or a read-only "
                                                "mount)"),
    (("disk I/O error",), "the disk holding the store failed a read or a write (full, or "
                          "failing: check it)"),
)
DISK_FULL = ("the disk holding the store is full (free space on it: SQLite's write-ahead log "
             "can take the store's size again, up to 64 MB more, before it is trimmed)")

_KNOWN_CAUSES = (
    (("file is not a database",), "it is not a SQLite database (or its first page is damaged)"),
    (("database disk image is malformed",), "the SQLite file is damaged (restore a backup)"),
    (("database \"", "does not exist"), "the database does not exist (create it, or name "
                                        "another)"),
    (("password authentication failed",), "password authentication failed"),
    (("unable to open database file",), "SQLite cannot open the file (its directory is "
                                        "missing or not writable)"),
    (("no password supplied",), "no password was given (set PGPASSWORD, or a .pgpass file)"),
    # (a PostgreSQL set-up or URL the operator mends: each was "unreachable: OperationalError"
    # or "ProgrammingError", retried every few seconds for good; an outside operator)
    (("invalid connection option",), "the URL names a connection option libpq does not know "
                                     "(a misspelt one?)"),
    (("invalid sslmode value",), "the URL's sslmode is not one libpq knows (disable, allow, "
                                 "prefer, require, verify-ca or verify-full)"),
    (("server does not support SSL",), "the database server does not support SSL, which the "
                                       "URL's sslmode requires"),
    (("permission denied for database",), "the role may not connect to the database (GRANT "
                                          "CONNECT ON DATABASE to it)"),
    (("no pg_hba.conf entry",), "the database server's pg_hba.conf admits no connection of "
                                "this role to this database from this host"),
    (("permission denied for schema",), "the role may not create the store's tables (make it "
                                        "the database's owner, or GRANT CREATE ON SCHEMA "
                                        "public to it)"),
    (("role \"", "does not exist"), "the role does not exist"),
    *_WRITE_CAUSES,
    (("database or disk is full",), DISK_FULL),
)
# Why a database did not answer: the store stays unreachable (the service waits for it), the
# operator is told the reason (it was "unreachable: OperationalError", with none).
_UNREACHABLE_CAUSES = (
    (("Connection refused",), "the database server refused the connection (is it running, "
                              "on that host and port?)"),
    (("timeout expired",), "the database server did not answer within the connect timeout"),
    (("could not translate host name",), "the database host name does not resolve"),
    (("failed to resolve host",), "the database host name does not resolve"),  # (psycopg 3)
)


def _cause(e: BaseException, causes: tuple[tuple[tuple[str, ...], str], ...]) -> str | None:
    """The fixed text of the first of ``causes`` whose needles are all in the driver's
    message (a driver's own text may quote values: it is never shown)."""
    text = str(getattr(e, "orig", None) or "")
    return next((cause for needles, cause in causes if all(n in text for n in needles)), None)


def _unreachable(e: BaseException) -> str:
    """Why a database was unreachable: a fixed text, or the error's class."""
    return _cause(e, _UNREACHABLE_CAUSES) or type(e).__name__


def _known_cause(e: BaseException) -> str | None:
    return _cause(e, _KNOWN_CAUSES)


def _reset_timeout(c: sa.Connection, sqlite: bool) -> None:
    """Give a pooled connection back its usual lock wait (a ping shortens it)."""
    if sqlite:
        c.exec_driver_sql("PRAGMA busy_timeout=30000")
    else:
        c.exec_driver_sql("RESET statement_timeout")


def store_failure(e: BaseException, what: str) -> StoreError:
    """``what`` failed with ``e`` (a database error): StoreUnreachable when the database did
    not answer or cannot take work for now (the service waits for it, NOT_SERVING),
    StoreError otherwise. Only the error's class and SQLSTATE are kept: a driver's message
    can quote the statement and its parameters."""
    state = str(getattr(getattr(e, "orig", None), "sqlstate", None) or "")
    # defence: store.unreachable-told-apart
    unreachable = (isinstance(e, _UNREACHABLE)
                   or (state != "" and state.startswith(_UNREACHABLE_SQLSTATES)))
    kind = StoreUnreachable if unreachable else StoreError
    # a full disk was told as "OperationalError" alone (SQLite) and the operator had to
    # guess; it is named, in our words (a driver's message is never shown)
    # defence: store.full-disk-named
    full = (state == "53100" or _cause(e, _FULL_CAUSES) is not None)
    # and the other causes an operator mends on the machine, not in the store (an operator's
    # test: a store file made read-only was "unreachable: OperationalError" every second)
    # defence: store.write-failures-named
    named = DISK_FULL if full else _cause(e, _WRITE_CAUSES)
    return kind(f"{what}: {type(e).__name__}" + (f" (SQLSTATE {state})" if state else "")
                + (f": {named}" if named else ""))




# libpq settings for a PostgreSQL store, unless its URL sets them: a server that stops
# answering (a network partition, a host that died without closing its connections) must
# surface as an error within seconds, not hang the job's thread for the kernel's ~15 minutes.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms: data sent and not acknowledged
    "options": "-c statement_timeout=120000",  # ms: a statement the server never finishes
}


# defence: store.chunk-ids-batched
_ID_BATCH = 1000  # chunk ids per IN (...) query: PostgreSQL binds at most 65,535 parameters


@dataclass(frozen=True)
class BlobRef:
    chunk_ids: tuple[bytes, ...]
    size: int

    def to_json(self) -> str:
        return json.dumps({"chunks": [c.hex() for c in self.chunk_ids], "size": self.size})

    @classmethod
    def from_json(cls, text: str) -> BlobRef:
        data = json.loads(text)
        return cls(tuple(bytes.fromhex(c) for c in data["chunks"]), int(data["size"]))


@dataclass(frozen=True)
class Event:
    round: int
    kind: str
    stage: int
    site: int
    payload: bytes


def chunk_id(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def normalize_url(url: str) -> str:
    """A path is a SQLite file; ``postgresql://`` means the psycopg (3) driver."""
    # (an empty --store was SQLite's in-memory database: `aggregator migrate --store ""`
    # reported a migration of a store that is gone when it exits)
    # defence: store.empty-name-refused
    if not url.strip():
        raise StoreError("the store is empty: name a SQLite file or a database URL")
    if "://" not in url:
        # (a libpq connection string, "host=db user=agg password=...", was made a SQLite
        # file of that name, and the name, password and all, printed)
        # defence: store.libpq-string-refused
        if _LIBPQ_KEYWORD.search(url):
            raise StoreError("the store looks like a libpq connection string (key=value): "
                             "give a postgresql:// URL, with the password in PGPASSWORD or a "
                             "service file")
        # (a directory was opened as a store and reported as "unreachable: OperationalError")
        # defence: store.directory-named
        if Path(url).is_dir():
            raise StoreError(f"the store {url} is a directory: name a SQLite file in it")
        # (a FIFO or a device was "unreachable: OperationalError", or waited for a writer)
        # defence: store.special-file-named
        if Path(url).exists() and not Path(url).is_file():
            raise StoreError(f"the store {url} is not a regular file: name a SQLite file")
        # quoted: SQLAlchemy decodes %XX in a URL and takes '?' for its query, so the store
        # 'agg%41.db' was opened as 'aggA.db' and 'a?b.db' as 'a'
        # defence: store.path-quoted-in-url
        return "sqlite:///" + urllib.parse.quote(url, safe="/")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()  # (a URL's scheme is case-insensitive: POSTGRESQL:// was refused)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        url = "postgresql+psycopg://" + rest
        # (a port that is no number, as in "postgresql://user:password" with no host, raised
        # ValueError from SQLAlchemy, whose message quoted the "port": the password)
        try:
            port = sa.engine.make_url(url).port
        except (sa.exc.ArgumentError, ValueError):
            port = -1
        # defence: store.unparseable-url-named
        if port is not None and not 1 <= port <= 65535:
            raise StoreError("the store URL cannot be parsed: its port is not a number in "
                             "1-65535 (give postgresql://USER@HOST:PORT/DATABASE, the "
                             "password in PGPASSWORD or ~/.pgpass)")
        return url
    # (another database's URL reached SQLAlchemy, which answered "No module named
    # 'MySQLdb'" or "Can't load plugin: sqlalchemy.dialects:http"; the scheme is named only
    # when it is one: "PGPASSWORD=... postgresql" is not shown)
    # defence: store.other-kinds-named
    if scheme not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        kind = f"stores of kind {scheme!r} are" if _SCHEME.fullmatch(scheme) else \
            "this store URL's kind is"
        raise StoreError(f"{kind} not supported: name a SQLite file (or sqlite:///PATH) or a "
                         "postgresql:// URL")
    url = f"{scheme}://{rest}"
    if scheme.startswith("sqlite"):
        try:
            database = sa.engine.make_url(url).database
        except sa.exc.ArgumentError:
            raise StoreError("the store URL cannot be parsed") from None
        # defence: store.directory-named-in-a-url
        if database and database != ":memory:" and Path(database).is_dir():
            raise StoreError(f"the store {database} is a directory: name a SQLite file in it")
        # defence: store.special-file-named-in-a-url
        if database and database != ":memory:" and (Path(database).exists()
                                                     and not Path(database).is_file()):
            raise StoreError(f"the store {database} is not a regular file: name a SQLite file")
    return url


_LIBPQ_KEYWORD = re.compile(r"(?:^|\s)(?:host|hostaddr|port|dbname|user|password|passfile|"
                            r"sslmode|service)\s*=")
_SCHEME = re.compile(r"[a-z][a-z0-9_+.-]*")


def _engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` (normalised); a PostgreSQL one with PG_CONNECT_ARGS (those the
    URL does not set itself), whatever it is for: the store, a migration, a restore."""
    url = normalize_url(url)
    if url.startswith("postgresql"):
        query = sa.engine.make_url(url).query
        # defence: store.pg-timeouts
        kwargs["connect_args"] = {k: v for k, v in PG_CONNECT_ARGS.items() if k not in query}
    return sa.create_engine(url, **kwargs)


def _create_private(path: Path) -> None:
    """Create ``path`` (which must not exist) readable and writable by its owner only."""
    # defence: store.private-file
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


_LOOSE_WARNED: set[str] = set()  # store files whose loose mode was logged


def _private_sqlite_file(url: str, create: bool) -> None:
    """A new SQLite store is made 0600 before SQLite opens it (its -wal and -shm files take
    the database's mode): it holds every masked input, ciphertext and sealed share."""
    path = _sqlite_file(url)
    if not create or path is None:
        return
    try:
        _create_private(path)
    except FileExistsError:
        # a link to a store not made yet: its target is made private here (O_EXCL refuses
        # the link itself, and SQLite made the target with the umask's mode, 0644)
        # defence: store.private-file-through-a-link
        # (a link loop raised RuntimeError from resolve(): a traceback)
        try:
            if path.is_symlink() and not path.exists():
                with contextlib.suppress(FileExistsError):
                    _create_private(path.resolve())
        except (OSError, RuntimeError) as e:
            raise StoreError(f"cannot create store {path}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        # (a store file made beforehand, by touch or a restore by hand, kept its mode, and
        # SQLite gives the -wal and -shm files the same one)
        # defence: store.loose-mode-warned
        with contextlib.suppress(OSError):
            mode = path.stat().st_mode & 0o777
            # (a log event of its own, not a warning inside another line; once a process)
            if mode & 0o077 and str(path) not in _LOOSE_WARNED:
                _LOOSE_WARNED.add(str(path))
                logging.getLogger("secagg.aggregator").warning(
                    f"the store {path} can be read by others than its owner (mode {mode:o}); "
                    "chmod 600 it", extra={"event": "store_mode_loose"})
    except OSError as e:
        raise StoreError(f"cannot create store {path}: {e.strerror}") from None


# the PostgreSQL advisory lock a serving aggregator holds on its database (Store.take_lease)
_LEASE_KEY = int.from_bytes(hashlib.sha256(b"secagg aggregator lease").digest()[:8], "big",
                            signed=True)

# query parameters of a database URL that hold secrets (libpq's): masked like the password
_SECRET_PARAMETERS = frozenset({"password", "sslpassword", "passfile", "sslkey"})


def holds_secret(url: str) -> bool:
    """Whether a store URL holds a password (``user:password@``) or another secret in its
    query (``?password=``, ``sslpassword=``...)."""
    if "://" not in url:
        return False  # (an SQLite file path)
    if _userinfo_with_at(url):
        return True  # (or a user name holding '@' more than once: said all the same)
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        # (unparseable: a password may be there all the same, user:password@)
        return ":" in url.partition("://")[2].rpartition("@")[0]
    return bool(parsed.password) or any(k.lower() in ("password", "sslpassword")
                                        for k in parsed.query)


def warn_secret_on_command_line(url: str | None, warn: Callable[[str], None]) -> None:
    """Say (with ``warn``) that a store URL given on the command line holds a password: every
    local user reads a process's command line (``ps``, /proc). It is taken (refusing would
    stop a running deployment at its next restart), and said at every start."""
    # defence: store.password-on-the-command-line-warned
    if url is not None and holds_secret(url):
        warn(f"the store URL {redacted(url)} on the command line holds a password, which "
             "every local user can read (ps, /proc): give it in PGPASSWORD or ~/.pgpass "
             "instead")


def _userinfo_with_at(url: str) -> str | None:
    """``scheme://***`` if the URL holds more than one '@' anywhere (a password with a raw
    '@', which may hold '/' or '?' after it too: SQLAlchemy splits at the first '@', and the
    rest of the password read as the host or the database), else None. Nothing past the
    scheme can be shown as surely not the password."""
    if url.count("@") < 2:
        return None
    return f"{url.partition('://')[0]}://*** (hidden: it holds '@' more than once; write an "\
           "'@' in a password as %40)"


def redacted(url: str) -> str:
    """The URL without its password, or secrets in its query, for messages and logs."""
    if "://" not in url:
        url = normalize_url(url)
    # defence: store.url-password-with-at-redacted
    hidden = _userinfo_with_at(url)
    if hidden is not None:
        return hidden
    try:
        parsed = sa.engine.make_url(url)
        # defence: store.url-secrets-redacted
        secret = {k: "***" for k in parsed.query if k.lower() in _SECRET_PARAMETERS}
        return parsed.update_query_dict(secret).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):  # (ValueError: a port that is no number)
        return "<unparseable store URL>"


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


STORE_TABLES = frozenset({"chunks", "rounds", "events", "models", "releases"})  # (0001's)


@functools.cache
def _scripts() -> Any:
    """This aggregator's migrations (alembic's ScriptDirectory; they do not change while it
    runs)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config)


def known_revisions() -> frozenset[str]:
    """Every schema revision this aggregator's migrations define."""
    return frozenset(str(r.revision) for r in _scripts().walk_revisions())


def _is_store(revision: str | None, tables: set[str], where: str) -> None:
    """Refuse what is not an aggregator store: one of our schema revisions and our tables
    (another application's database managed by Alembic has a revision too)."""
    # defence: store.ours-by-revision-and-tables
    if revision not in known_revisions() or not tables >= STORE_TABLES:
        raise StoreError(f"{where} holds no aggregator store (its schema revision or tables "
                         "are not this aggregator's)")


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None
    return str(head)


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    # (two rows in alembic_version raised CommandError from inside alembic: a traceback)
    # defence: store.revision-row-checked
    try:
        return MigrationContext.configure(connection).get_current_revision()
    except CommandError:
        raise StoreError("the store's alembic_version table holds more than one schema "
                         "revision: not a store this aggregator wrote, or one changed by "
                         "hand; restore a backup") from None


def _transactional_ddl(engine: Engine) -> None:
    """Make SQLite run a migration's DDL in its one transaction (SQLAlchemy's recipe): the
    sqlite3 module starts a transaction only before DML, so CREATE TABLE committed one by one
    and a kill during a new store's first migration left tables without a schema revision, a
    store no aggregator would open again."""

    @sa.event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # defence: store.migration-atomic
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextlib.contextmanager
def not_served(url: str) -> Iterator[None]:
    """Holds the store's serving lease (Store.take_lease) while an operator's command changes
    it: StoreError if an aggregator serves it. `migrate` upgraded the schema of a store an
    aggregator was serving, which then ran on a store it does not understand (an operator's
    test; that step only added a table)."""
    url = normalize_url(url)
    busy = (f"an aggregator is serving the store {redacted(url)}: stop it (and its standby) "
            "first")
    if url.startswith("sqlite"):
        import fcntl

        path = _sqlite_file(url)
        if path is None or not path.exists():
            yield  # (a new store: nothing serves it)
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise StoreError(f"cannot lock the store {path}: {e.strerror}") from None
        try:
            try:
                # defence: store.maintenance-waits-for-no-aggregator
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(busy) from None
            yield
        finally:
            os.close(fd)
        return
    engine = _engine(url)
    try:
        try:
            conn = engine.connect()
            held = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"),
                                {"key": _LEASE_KEY}).scalar()
            conn.commit()
        except sa.exc.SQLAlchemyError as e:
            hint = _known_cause(e)
            if hint is not None:
                raise StoreError(f"store {redacted(url)} cannot be opened: {hint}") from None
            raise StoreUnreachable(f"store {redacted(url)} is unreachable: "
                                   f"{_unreachable(e)}") from None
        try:
            # defence: store.maintenance-waits-for-no-aggregator-postgresql
            if not held:
                raise StoreError(busy)
            yield
        finally:
            conn.close()  # (its session ends, and the lock with it)
    finally:
        engine.dispose()


def migrate(url: str) -> tuple[str | None, str]:
    """Bring the store at ``url`` to this aggregator's schema: (revision before, after).
    Refuses a store with tables that are not ours, or at a revision this aggregator does not
    know (written by a newer one)."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    engine = _engine(url)
    if engine.dialect.name == "sqlite":
        # (a store that migrate makes is as private as one serve makes: 0600)
        # defence: store.migrate-makes-a-private-file
        _private_sqlite_file(normalize_url(url), True)
        _transactional_ddl(engine)
    try:
        with engine.begin() as c:
            before = _current_revision(c)
            # defence: store.migrate-only-ours
            if before is None and sa.inspect(c).get_table_names():
                raise StoreError("the store holds tables but no schema revision: not ours")
            config = _alembic_config(c)
            if before is not None:
                # (an empty revision raised AssertionError from inside alembic: a traceback)
                # defence: store.migrate-revision-known
                script = ScriptDirectory.from_config(config)
                if before not in {r.revision for r in script.walk_revisions()}:
                    raise StoreError(f"the store is at schema revision {before!r}, which this "
                                     "aggregator does not know (a newer one wrote it)")
            try:
                command.upgrade(config, "head")
            except (sa.exc.SQLAlchemyError, CommandError) as e:
                # (a store whose tables are not at the revision it names failed here, and
                # was called unreachable)
                # defence: store.migrate-failure-named
                # (the class and SQLSTATE only, as store_failure says a store's errors: a
                # driver's message may quote values)
                cause = getattr(e, "orig", None) or e
                code = getattr(cause, "sqlstate", None)
                # (a cause the operator mends, named: a role without CREATE on a new
                # database was sent to restore a backup)
                # defence: store.migrate-failure-cause-named
                hint = _known_cause(e) if isinstance(e, sa.exc.SQLAlchemyError) else None
                raise StoreError(f"store {redacted(url)}: upgrading its schema from revision "
                                 f"{before or '(empty)'} failed ({type(cause).__name__}"
                                 f"{f', SQLSTATE {code}' if code else ''}); nothing was "
                                 "changed (the upgrade is one transaction): " + (
                                     hint or "restore a backup, or check the store's "
                                     "alembic_version row")) from None
            return before, head_revision()
    except sa.exc.SQLAlchemyError as e:
        hint = _known_cause(e)
        if hint is not None:
            raise StoreError(f"store {redacted(url)} cannot be opened: {hint}") from None
        kind = StoreError if engine.dialect.name == "sqlite" else StoreUnreachable
        raise kind(f"store {redacted(url)} is unreachable: {_unreachable(e)}") from None
    finally:
        engine.dispose()


def _pg_tool(tool: str, url: str | None, *args: str) -> bytes:
    """Run a libpq tool (pg_dump, pg_restore) on the database at ``url`` (None: on a file
    only); its output. The password goes in the environment (PGPASSWORD), the other
    connection parameters in a service file only this user reads: none is on the command
    line, which every user of the machine reads. The connection gets the store's timeouts
    (PG_CONNECT_ARGS, but no statement timeout: a dump's COPY of the chunks may take long),
    and a watchdog stops a tool whose I/O stalls, so a database that stops answering fails
    the tool within minutes instead of hanging it for good."""
    import shutil
    import tempfile

    executable = shutil.which(tool)
    if executable is None:
        raise StoreError(f"{tool} is not on PATH (install PostgreSQL's client tools)")
    env = dict(os.environ)
    command = [executable, *args]
    private: str | None = None
    if url is not None:
        parsed = sa.engine.make_url(url)
        # the password, wherever the URL holds it (user:password@, or ?password=), goes in
        # the environment: a command line is readable by every user of the machine (ps)
        # defence: store.pg-password-off-the-command-line
        query_password = parsed.query.get("password")
        if isinstance(query_password, tuple):
            query_password = query_password[-1]
        password = parsed.password or query_password
        if password:
            env["PGPASSWORD"] = str(password)
        parsed = parsed.difference_update_query(["password"])
        # defence: store.pg-tools-time-out
        timeouts = {k: str(v) for k, v in PG_CONNECT_ARGS.items()
                    if k != "options" and k not in parsed.query}
        # every other connection parameter goes in a service file only this user reads, for
        # the tool's run: the command line names the service alone (``sslpassword``, the
        # client key's passphrase, has no environment variable, and was on it)
        # defence: store.pg-parameters-off-the-command-line
        parameters = {"host": parsed.host, "port": parsed.port, "dbname": parsed.database,
                      "user": parsed.username, **timeouts,
                      **{k: v[-1] if isinstance(v, tuple) else v
                         for k, v in parsed.query.items()}}
        lines = [f"{k}={v}" for k, v in parameters.items() if v is not None and v != ""]
        # defence: store.pg-service-file-one-line-per-parameter
        if any(c in line for line in lines for c in "\r\n\0"):
            raise StoreError(f"a parameter of the store URL {redacted(url)} holds a line break")
        if "service" in parameters:
            # the URL names a service of the operator's own service file: a service file
            # cannot name another, so the tools get the operator's file and a command line
            # of the rest, none of them secret (those belong in that file)
            secret = sorted(k for k in parameters if k.lower() in _SECRET_PARAMETERS)
            if secret:
                raise StoreError(f"the store URL {redacted(url)} names a libpq service and "
                                 f"{', '.join(secret)}: put those in the service file")
            return _run_tool(tool, [*command, "--dbname", " ".join(
                f"{k}='{_conninfo_quoted(str(v))}'" for k, v in parameters.items()
                if v is not None and v != "")], env, f" on {redacted(url)}")
        private = tempfile.mkdtemp(prefix="secagg-pg-")  # 0700
        service_file = Path(private) / "pg_service.conf"
        fd = os.open(service_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("[secagg]\n" + "\n".join(lines) + "\n")
        env["PGSERVICEFILE"] = str(service_file)
        env.pop("PGSERVICE", None)
        command += ["--dbname", "service=secagg"]
    try:
        return _run_tool(tool, command, env, "" if url is None else f" on {redacted(url)}")
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _conninfo_quoted(value: str) -> str:
    """A value for a libpq conninfo string's single quotes."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _run_tool(tool: str, command: list[str], env: dict[str, str], where: str) -> bytes:
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            process = subprocess.Popen(command, stdout=out, stderr=err,  # noqa: S603
                                       env=env)
        except OSError as e:
            raise StoreError(f"{tool}{where} failed: {e}") from None
        # a database that stops answering mid-dump (a stuck backend or pooler: its TCP stack
        # still acknowledges) leaves the tool waiting to read, which no connection timeout
        # ends: it is stopped once its I/O has not moved for PG_TOOL_STALL_SECONDS
        # defence: store.pg-tools-stall-watchdog
        moved, last = time.monotonic(), _io_count(process.pid)
        while process.poll() is None:
            time.sleep(0.5)
            count = _io_count(process.pid)
            if count != last:
                moved, last = time.monotonic(), count
            elif count is not None and time.monotonic() - moved > PG_TOOL_STALL_SECONDS:
                process.kill()
                process.wait()
                raise StoreError(f"{tool}{where} made no progress for "
                                 f"{PG_TOOL_STALL_SECONDS:g} s (the database stopped "
                                 "answering): stopped")
        out.seek(0)
        err.seek(0)
        # defence: store.pg-tool-failure-named
        if process.returncode != 0:
            detail = err.read().decode(errors="replace").strip()[-300:]
            raise StoreError(f"{tool}{where} failed: "
                             f"{detail or f'exit status {process.returncode}'}")
        return out.read()


PG_TOOL_STALL_SECONDS = 120.0  # pg_dump/pg_restore with no I/O for this long are stopped


def _io_count(pid: int) -> int | None:
    """Bytes a process has read and written so far (sockets included), or None where the
    system does not say (not Linux)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def _partial(final: Path, what: str) -> Path:
    """A private name beside ``final`` to write to before it is complete: a backup or restore
    cut short (kill -9, a power cut) leaves this name, never ``final``, so a retry is never
    refused by its half-written file, and nothing half-written is ever taken for a store."""
    import secrets

    # defence: store.complete-files-only
    return final.with_name(f".{final.name}.{what}-{secrets.token_hex(4)}")


def _publish(partial: Path, final: Path) -> None:
    """Give the complete ``partial`` its ``final`` name, never over an existing file."""
    try:
        # defence: store.publish-never-overwrites
        os.link(partial, final)
    except FileExistsError:
        raise StoreError(f"{final} exists: never overwritten") from None
    except OSError as e:
        raise StoreError(f"cannot write {final}: {e.strerror}") from None


def _remove_sqlite_files(path: Path) -> None:
    for f in (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal"),
              path.with_name(path.name + "-shm")):
        f.unlink(missing_ok=True)


def backup(url: str, out: Path) -> int:
    """A consistent copy of the store at ``url`` in ``out`` (size in bytes). SQLite: the
    online backup API, safe while the aggregator writes. PostgreSQL: ``pg_dump -Fc``. Written
    under a temporary name beside ``out`` and given its name once complete."""
    import sqlite3

    url = normalize_url(url)
    out = Path(out)
    if out.exists():
        raise StoreError(f"{out} exists: a backup never overwrites a file")
    if not url.startswith(("sqlite", "postgresql")):
        raise StoreError(f"no backup for stores of kind {url.split(':', 1)[0]}")
    partial = _partial(out, "backup")
    try:
        # made 0600 before a byte is copied
        _create_private(partial)
    except OSError as e:
        raise StoreError(f"cannot write the backup {out}: {e.strerror}") from None
    try:
        if url.startswith("sqlite"):
            path = sa.engine.make_url(url).database
            if not path or not Path(path).is_file():
                raise StoreError(f"no SQLite store at {path}")
            # the path as a file: URI, escaped: a '#' or '%41' in it made SQLite open (and
            # create) another file, and the backup was an empty database
            # defence: store.backup-uri-escaped
            source_uri = Path(path).resolve().as_uri() + "?mode=ro"
            with sqlite3.connect(source_uri, uri=True) as source, \
                    sqlite3.connect(partial) as target:
                source.backup(target)
            target.close()
            # defence: store.backup-verified
            revision, tables = _sqlite_revision_and_tables(partial)
            if revision is None:
                raise StoreError(f"{path} holds no aggregator store: nothing backed up")
            _is_store(revision, tables, str(path))
        else:
            _pg_tool("pg_dump", url, "--format=custom", "--no-owner", "--lock-wait-timeout=60s",
                     "--file", str(partial))
            # the dump must hold an aggregator store: a database the URL named by mistake
            # (empty, or another application's) was backed up and said ok
            # defence: store.pg-backup-verified
            data = _pg_tool("pg_restore", None, "--data-only", "--table=alembic_version",
                            "--file=-", str(partial))
            found = re.search(rb"^COPY [\w.]*alembic_version \(version_num\) FROM stdin;\n"
                              rb"(?!\\\.\n)([^\n]+)\n", data, re.MULTILINE)
            if not found:
                raise StoreError(f"{redacted(url)} holds no aggregator store: nothing backed "
                                 "up")
            listing = _pg_tool("pg_restore", None, "--list", str(partial)).decode(
                errors="replace")
            tables = set(re.findall(r"^\d+; [\d ]+ TABLE \S+ (\S+)(?: |$)", listing,
                                    re.MULTILINE))
            _is_store(found.group(1).decode(errors="replace"), tables, redacted(url))
        _publish(partial, out)
    except sqlite3.Error as e:
        raise StoreError(f"cannot back up the store: {e}") from None
    finally:
        # defence: store.failed-backup-removed
        _remove_sqlite_files(partial)
    return out.stat().st_size


def _sqlite_revision_and_tables(path: Path, name: str | None = None
                                ) -> tuple[str | None, set[str]]:
    """The schema revision and tables of the SQLite file at ``path``, opened read-only
    (``name``: the file to name in an error, when ``path`` is a copy of it)."""
    import sqlite3

    try:
        with sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True) as check:
            tables = {r[0] for r in check.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            row = (check.execute("SELECT version_num FROM alembic_version").fetchone()
                   if "alembic_version" in tables else None)
        check.close()
    except sqlite3.Error as e:
        raise StoreError(f"{name or path.name} is not a SQLite store: {e}") from None
    return (None if row is None else str(row[0])), tables


def restore(backup_file: Path, url: str) -> str | None:
    """Restore ``backup_file`` into an empty store at ``url``; the result must be one of this
    aggregator's stores (its schema revision is checked). Returns None, or the older schema
    revision of the store restored (a backup taken before an upgrade): restored all the same,
    for `secagg aggregator migrate`."""
    import shutil

    url = normalize_url(url)
    if not Path(backup_file).exists():
        raise StoreError(f"no backup file {backup_file}")
    # (a directory raised IsADirectoryError from the copy)
    if not Path(backup_file).is_file():
        raise StoreError(f"the backup {backup_file} is not a file")
    if url.startswith("sqlite"):
        path = _sqlite_file(url)
        # (an in-memory store said "None exists", or made a file named ':memory:')
        if path is None:
            raise StoreError("restore into a store file: an in-memory store is gone at exit")
        if path.exists():
            raise StoreError(f"{path} exists: restore only into a new store file")
        # a -wal left by a killed aggregator would be replayed onto the restored file
        # defence: store.restore-refuses-leftover-wal
        leftovers = [f for f in (f"{path}-wal", f"{path}-shm", f"{path}-journal")
                     if Path(f).exists()]
        if leftovers:
            raise StoreError(f"{', '.join(leftovers)} exist (left by the store that was "
                             "there: they may hold committed data, and SQLite would replay "
                             "them onto the restored store): move them away first")
        partial = _partial(path, "restoring")
        older: str | None = None
        try:
            _create_private(partial)
            shutil.copyfile(backup_file, partial)
            # one of this aggregator's stores, at a revision it knows (an older one is
            # restored for `aggregator migrate`; another application's file is not)
            # defence: store.restore-only-ours
            _is_store(*_sqlite_revision_and_tables(partial, str(backup_file)),
                      str(backup_file))
            try:
                Store(str(partial), create=False).close()  # one this aggregator understands
            except StoreOutdated as e:
                older = e.revision  # restored all the same, for `aggregator migrate`
            _publish(partial, path)
        finally:
            _remove_sqlite_files(partial)
        # (an older store restored was exit status 2 and "needs migrate", as if it had not
        # been, and the retry was refused: the store existed)
        # defence: store.older-restore-is-a-restore
        return older
    elif url.startswith("postgresql"):
        engine = _engine(url)
        try:
            with engine.connect() as c:
                # defence: store.pg-restore-into-an-empty-database-only
                if sa.inspect(c).get_table_names():
                    raise StoreError("restore only into an empty database")
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"store {redacted(url)} is unreachable: {_unreachable(e)}"
                             ) from None
        finally:
            engine.dispose()
        # one transaction: a restore cut short (an error, kill -9) leaves the database empty,
        # never tables without their constraints that an aggregator would take for a store
        # defence: store.restore-all-or-nothing
        _pg_tool("pg_restore", url, "--no-owner", "--single-transaction", str(backup_file))
    else:
        raise StoreError(f"no restore for stores of kind {url.split(':', 1)[0]}")
    try:
        Store(url, create=False).close()  # the restored store is one this aggregator understands
    except StoreOutdated as e:
        return e.revision
    return None


class Store:
    def __init__(self, url: str, *, create: bool = True) -> None:
        url = normalize_url(url)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        elif url.startswith("postgresql"):
            kwargs["pool_pre_ping"] = True  # a restarted database server is reconnected
        try:
            self.engine: Engine = _engine(url, **kwargs)
            # Chunks are staged data, not acknowledged counts: they are written through a
            # second engine without a sync per commit (a chunk lost to a power cut is simply
            # asked for again by MissingChunks); events keep a sync per commit.
            self.bulk: Engine = _engine(url, **kwargs)
        except (sa.exc.ArgumentError, ImportError) as e:
            # defence: store.open-failure-redacted
            raise StoreError(f"cannot open store {redacted(url)}: {e}") from None
        if url.startswith("sqlite"):
            _private_sqlite_file(url, create)
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            sa.event.listen(self.bulk, "connect", _sqlite_bulk_pragmas)
        elif url.startswith("postgresql"):
            sa.event.listen(self.bulk, "connect", _pg_bulk_settings)
        self.url = url
        self._leased = False  # (take_lease: this store is held for a serving aggregator)
        self._lease: Connection | None = None
        self._lease_pid: int | None = None  # (the PostgreSQL backend holding the lease)
        self._lease_fd: int | None = None
        self.created = False  # (the store was empty: this aggregator gave it its schema)
        self._last_chunk_write = 0.0
        self._last_truncate = time.monotonic()
        try:
            self._check_schema(create)
        except sa.exc.SQLAlchemyError as e:
            self.close()
            hint = _known_cause(e)
            if hint is not None:
                raise StoreError(f"store {redacted(url)} cannot be opened: {hint}") from None
            kind = StoreError if url.startswith("sqlite") else StoreUnreachable
            # defence: store.unreachable-store-redacted
            raise kind(f"store {redacted(url)} is unreachable: {_unreachable(e)}") from None

    def _check_schema(self, create: bool) -> None:
        """An empty store is migrated to this aggregator's schema (if ``create``); any other
        store must be at exactly that revision: an aggregator never runs on a store it does
        not understand, and never changes one without the operator (`secagg aggregator
        migrate`)."""
        with self.engine.connect() as c:
            current = _current_revision(c)
            tables = sa.inspect(c).get_table_names()
        head = head_revision()
        if current is not None and current in known_revisions():
            _is_store(current, set(tables), "the database")
        if current is None:
            if tables:
                raise StoreError("the store holds tables but no schema revision: not ours")
            if not create:
                raise StoreError("the store is empty")
            migrate(self.url)
            self.created = True
            return
        if current != head:
            message = (f"the store is at schema revision {current}; this aggregator needs "
                       f"{head}: back it up, then run `secagg aggregator migrate --store URL` "
                       "(a revision it does not know is refused there too)")
            if current in known_revisions():
                raise StoreOutdated(message, current)
            raise StoreError(message)

    def ping(self, timeout: float = 1.0, *, write: bool = False) -> None:
        """Read the schema revision within ``timeout`` seconds, or StoreError. A PostgreSQL
        that would refuse writes (a hot standby after a failover, default_transaction_read_only)
        fails the ping too. ``write``: also prove a write commits (an update of the revision
        row to itself): what the service asks before it serves again after a failed write,
        so a store that reads but refuses writes (read-only, a full disk) stays NOT_SERVING
        instead of flapping back to SERVING every second."""
        sqlite = self.url.startswith("sqlite")
        try:
            with self.engine.connect() as c:
                if sqlite:
                    c.exec_driver_sql(f"PRAGMA busy_timeout={int(timeout * 1000)}")
                else:
                    c.exec_driver_sql(f"SET statement_timeout = {int(timeout * 1000)}")
                try:
                    c.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
                    # defence: store.ping-refuses-a-read-only-postgresql
                    if not sqlite and c.exec_driver_sql(
                            "SELECT current_setting('transaction_read_only') = 'on' "
                            "OR pg_is_in_recovery()").scalar():
                        raise StoreError("the store refuses writes (read-only)")
                    # that this aggregator still holds the store, every ping (a lease's
                    # session ended by a restart, a DBA's timeout or a network cut was
                    # noticed only after a failed write, and a second aggregator served
                    # beside this one meanwhile)
                    # defence: store.lease-checked-before-serving-again
                    self.check_lease()
                    if write:
                        # defence: store.ping-proves-a-write
                        c.exec_driver_sql("UPDATE alembic_version SET version_num = version_num")
                        c.commit()
                except BaseException:
                    # the failed transaction rolled back first: the reset below, on it, raised
                    # PendingRollbackError in place of the cause (a full disk was logged as
                    # "store unreachable: PendingRollbackError" every second: an operator's
                    # test); a connection that cannot be reset is not pooled again
                    # defence: store.ping-keeps-the-cause
                    try:
                        c.rollback()
                        _reset_timeout(c, sqlite)
                    except sa.exc.SQLAlchemyError:
                        c.invalidate()
                    raise
                _reset_timeout(c, sqlite)
        except sa.exc.SQLAlchemyError as e:
            raise store_failure(e, "store unreachable") from None

    def checkpoint(self) -> None:
        """Copy the SQLite write-ahead log into the database (PASSIVE: it waits for no one);
        the service calls it every second, off the job's thread. Once uploads pause (or at
        least every WAL_TRUNCATE_SECONDS), a log grown past WAL_SIZE_LIMIT is truncated
        (TRUNCATE waits at most 0.1 s for others).
        A no-op on PostgreSQL."""
        if not self.url.startswith("sqlite"):
            return
        with self.engine.connect() as c:
            c.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            wal = Path(f"{sa.engine.make_url(self.url).database}-wal")
            try:
                size = wal.stat().st_size
            except OSError:
                return
            now = time.monotonic()
            # uploads that never pause (a site trickling a chunk every few seconds) kept a
            # log grown by a burst at its largest: truncated after WAL_TRUNCATE_SECONDS anyway
            # defence: store.wal-truncated-under-a-trickle
            due = (now - self._last_chunk_write >= WAL_IDLE_SECONDS
                   or now - self._last_truncate >= WAL_TRUNCATE_SECONDS)
            if size > WAL_SIZE_LIMIT and due:
                self._last_truncate = now
                c.exec_driver_sql("PRAGMA busy_timeout=100")
                try:
                    # defence: store.wal-truncated
                    c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                # defence: store.checkpoint-gives-back-the-long-busy-timeout
                finally:
                    c.exec_driver_sql("PRAGMA busy_timeout=30000")

    # ---- one serving aggregator per store ------------------------------------------------------

    def take_lease(self) -> None:
        """Hold this store for one serving aggregator, or StoreError: two aggregators on one
        store (SQLite file or PostgreSQL database) each recovered the same round and then
        diverged, writing over each other's stage closes, and every site's round aborted.
        SQLite: an flock on the database file; PostgreSQL: a session advisory lock on a
        connection of its own. Both end with the process (a kill -9 leaves nothing to clean
        up). StoreBusy (a StoreUnreachable: waited for) if another aggregator holds it."""
        self._leased = True
        if self.url.startswith("sqlite"):
            self._lease_sqlite()
        else:
            self._lease_postgresql()

    def check_lease(self) -> None:
        """StoreError unless this aggregator still holds the store (called by every ping): a
        PostgreSQL restart, a network cut or a DBA ends the lease's session, and the lease
        is taken again, or StoreBusy if another aggregator took it meanwhile."""
        if not self._leased:
            return
        if self.url.startswith("sqlite"):
            self._check_sqlite_file()
            return
        if self._lease is not None:
            try:
                self._lease.exec_driver_sql("SELECT 1").scalar()
                self._lease.rollback()
                return
            except sa.exc.SQLAlchemyError:
                with contextlib.suppress(sa.exc.SQLAlchemyError):
                    self._lease.close()
                self._lease, self._lease_pid = None, None
        # (retaken, or StoreBusy on this ping and every next one until it is: a lease once
        # lost is never "not needed", which let an aggregator whose retake failed serve again)
        # defence: store.lost-lease-stays-lost
        self._lease_postgresql()

    def _check_sqlite_file(self) -> None:
        """StoreError if the store's file is no longer at its path (deleted, or replaced by
        another): the aggregator wrote on into a file no one could open again, all of it
        lost at the next start, and the lock no longer guarded the path, so a second
        aggregator served beside it from a new store (an operator's test)."""
        database = _sqlite_file(self.url)
        if self._lease_fd is None or database is None:
            return
        held = os.fstat(self._lease_fd)
        try:
            now = os.stat(database)
            moved = (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)
        except FileNotFoundError:
            moved = True
        # defence: store.sqlite-file-still-at-its-path
        if moved or held.st_nlink == 0:
            raise StoreError(f"the store {database} was deleted or replaced while this "
                             "aggregator ran: what it records from now on would be lost; "
                             "stop it and put the store back (or restore a backup)")

    def _lease_sqlite(self) -> None:
        database = _sqlite_file(self.url)
        if database is None:
            return
        import fcntl

        # an flock on the database file itself: a store named through a symlink, a hard link
        # or another path is the same file, and takes the same lock (a lock file beside it
        # was one per name). flock is apart from SQLite's own POSIX locks; the descriptor is
        # closed only after every connection (closing a descriptor of the file drops the
        # process's POSIX locks on it: Store.close).
        try:
            fd = os.open(database, os.O_RDONLY)
        except OSError as e:
            raise StoreError(f"cannot lock the store {database}: {e.strerror}") from None
        self._lease_fd = fd
        try:
            # defence: store.one-serving-aggregator
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusy(f"the store {database} is in use by another aggregator; this one "
                            "serves once that one stops") from None

    def _lease_postgresql(self) -> None:
        try:
            conn = self.engine.connect()
        except sa.exc.SQLAlchemyError as e:
            raise store_failure(e, "taking the store's lease failed") from None
        try:
            # the lease's session must outlive a DBA's idle timeouts (idle_session_timeout
            # ended it, silently), and end soon after this aggregator's host is lost (the
            # server's own keepalives, 2 hours by default, kept a dead host's lease and
            # refused its replacement): set for this session alone
            # defence: store.lease-session-settings
            for setting in ("idle_session_timeout = 0",
                            "idle_in_transaction_session_timeout = 0",
                            "tcp_keepalives_idle = 10", "tcp_keepalives_interval = 5",
                            "tcp_keepalives_count = 3", "tcp_user_timeout = 30000"):
                with (contextlib.suppress(sa.exc.ProgrammingError, sa.exc.DataError),
                      conn.begin_nested()):
                    conn.exec_driver_sql(f"SET {setting}")
            held = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"),
                                {"key": _LEASE_KEY}).scalar()
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            conn.commit()
        except sa.exc.SQLAlchemyError as e:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                conn.invalidate()  # (its session ends: a lock it may hold goes with it)
            raise store_failure(e, "taking the store's lease failed") from None
        # defence: store.one-serving-aggregator-postgresql
        if not held:
            conn.close()
            raise StoreBusy(f"the store {redacted(self.url)} is in use by another aggregator "
                            "(it holds the store's advisory lock); this one serves once that "
                            "one stops")
        self._lease, self._lease_pid = conn, int(pid or 0)

    def close(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._lease.close()
            self._lease = None
        self.engine.dispose()
        self.bulk.dispose()
        if self._lease_fd is not None:  # (after the connections: see _lease_sqlite)
            os.close(self._lease_fd)  # (the lock goes with it)
            self._lease_fd = None

    # ---- chunks ------------------------------------------------------------------------------

    def missing(self, ids: Sequence[bytes]) -> list[bytes]:
        if not ids:
            return []
        try:
            with self.engine.connect() as c:
                present = set(c.execute(sa.select(chunks.c.chunk_id)
                                        .where(chunks.c.chunk_id.in_(list(ids)))).scalars())
        except sa.exc.SQLAlchemyError as e:
            raise store_failure(e, "looking up chunks failed") from None
        return [i for i in ids if i not in present]

    def chunk_sizes(self, ids: Iterable[bytes]) -> dict[bytes, int]:
        """The stored size of each of ``ids`` that is present (no chunk data is read), in
        batches that stay below PostgreSQL's bind-parameter limit."""
        distinct = list(dict.fromkeys(ids))
        found: dict[bytes, int] = {}
        try:
            with self.engine.connect() as c:
                for i in range(0, len(distinct), _ID_BATCH):
                    rows = c.execute(sa.select(chunks.c.chunk_id, chunks.c.size).where(
                        chunks.c.chunk_id.in_(distinct[i:i + _ID_BATCH])))
                    found.update((bytes(cid), int(size)) for cid, size in rows)
        except sa.exc.SQLAlchemyError as e:
            raise store_failure(e, "looking up chunks failed") from None
        return found

    def put_chunks(self, items: Iterable[tuple[bytes, bytes]], *, round_number: int | None,
                   site: int) -> tuple[int, int]:
        """Store (id, data) pairs whose ids the caller has checked; (stored, already present)."""
        new = self.put_chunk_rows([(cid, data, round_number, site) for cid, data in items])
        return sum(new), len(new) - sum(new)

    def put_chunk_rows(self, rows: Sequence[tuple[bytes, bytes, int | None, int]]
                       ) -> list[bool]:
        """Store (id, data, round, uploader) rows whose ids the caller has checked, in one
        transaction; for each, True if it was new."""
        out = []
        try:
            with self.bulk.begin() as c:
                for cid, data, round_number, site in rows:
                    # a chunk two uploaders send at once is stored once: the second insert is
                    # a no-op (ON CONFLICT DO NOTHING on both databases), never an error
                    result = c.execute(self._insert_chunk().values(
                        chunk_id=cid, data=data, size=len(data), round=round_number, site=site
                    ).returning(chunks.c.chunk_id))
                    out.append(result.first() is not None)
        except sa.exc.SQLAlchemyError as e:
            raise store_failure(e, "storing chunks failed") from None
        self._last_chunk_write = time.monotonic()
        return out

    def claim_chunks(self, conn: Connection, ids: Sequence[bytes],
                     round_number: int | None) -> None:
        """In the caller's transaction: the chunks a counted message refers to belong to
        ``round_number`` (purged with it), or with None to nothing (kept for good). A chunk
        is otherwise labelled with the round current when it was stored, and an older
        round's purge would take the payload of a message this round counted."""
        distinct = list(dict.fromkeys(ids))
        for i in range(0, len(distinct), _ID_BATCH):
            query = chunks.update().where(chunks.c.chunk_id.in_(distinct[i:i + _ID_BATCH]))
            if round_number is not None:
                query = query.where(chunks.c.round.is_not(None))  # what is kept stays kept
            conn.execute(query.values(round=round_number))

    def _insert_chunk(self) -> Any:
        if self.url.startswith("postgresql"):
            from sqlalchemy.dialects import postgresql

            return postgresql.insert(chunks).on_conflict_do_nothing(index_elements=["chunk_id"])
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(chunks).on_conflict_do_nothing(index_elements=["chunk_id"])

    def get_chunk(self, cid: bytes) -> bytes | None:
        try:
            with self.engine.connect() as c:
                row = c.execute(sa.select(chunks.c.data).where(chunks.c.chunk_id == cid)
                                ).first()
        except sa.exc.SQLAlchemyError as e:
            raise store_failure(e, "reading a chunk failed") from None
        return None if row is None else bytes(row[0])

    def read_blob(self, blob: BlobRef) -> bytes:
        parts = []
        for cid in blob.chunk_ids:
            data = self.get_chunk(cid)
            # defence: store.read-blob-chunks-all-there
            if data is None:
                raise StoreError("a chunk of a referenced payload is missing")
            parts.append(data)
        out = b"".join(parts)
        # defence: store.read-blob-size-exact
        if len(out) != blob.size:
            raise StoreError("a referenced payload has the wrong size")
        return out

    def write_blob(self, data: bytes, *, chunk_bytes: int, round_number: int | None) -> BlobRef:
        """Store the aggregator's own payload (model, aggregate) as chunks."""
        items = [(chunk_id(p), p) for p in split_chunks(data, chunk_bytes)]
        self.put_chunks(items, round_number=round_number, site=0)
        with self.engine.begin() as c:  # keep: a model or release outlives its round
            # defence: store.kept-payload-unlabelled
            if round_number is None:
                c.execute(chunks.update().where(chunks.c.chunk_id.in_([i for i, _ in items]))
                          .values(round=None))
        return BlobRef(tuple(i for i, _ in items), len(data))

    def round_uploads(self, round_number: int) -> dict[int, tuple[int, int]]:
        """What each site stored for ``round_number`` and the store still holds: {site:
        (bytes, chunks)} (the aggregator's own payloads, site 0, are not uploads)."""
        with self.engine.connect() as c:
            # defence: store.recovered-uploads-of-that-round
            rows = c.execute(sa.select(chunks.c.site, sa.func.sum(chunks.c.size),
                                       sa.func.count()).where(chunks.c.round == round_number,
                                                              chunks.c.site != 0)
                             .group_by(chunks.c.site))
            return {int(site): (int(nbytes or 0), int(n)) for site, nbytes, n in rows}

    def purge_chunks_before(self, round_number: int) -> int:
        """Drop the uploads of the rounds before ``round_number``, all finished (what models
        and releases use has no round and is kept)."""
        # (a raw driver error: a full disk at shutdown's purge was a traceback)
        # defence: store.purge-errors-named
        try:
            with self.engine.begin() as c:
                result = c.execute(chunks.delete().where(chunks.c.round.is_not(None),
                                                         chunks.c.round < round_number))
                return int(result.rowcount or 0)
        except sa.exc.SQLAlchemyError as e:
            raise store_failure(e, "dropping finished rounds' uploads failed") from None

    # ---- events ------------------------------------------------------------------------------

    def record_event(self, conn: Connection, event: Event) -> bool:
        """Insert an event in the caller's transaction; False if it was already recorded."""
        # defence: store.event-duplicate-per-round-and-site
        exists = conn.execute(sa.select(events.c.id).where(
            events.c.round == event.round, events.c.kind == event.kind,
            events.c.stage == event.stage, events.c.site == event.site)).first()
        if exists is not None:
            return False
        conn.execute(events.insert().values(round=event.round, kind=event.kind,
                                            stage=event.stage, site=event.site,
                                            payload=event.payload, at=time.time()))
        return True

    def event_payload(self, round_number: int, kind: str, stage: int, site: int) -> bytes | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(events.c.payload).where(
                events.c.round == round_number, events.c.kind == kind, events.c.stage == stage,
                events.c.site == site)).first()
        return None if row is None else bytes(row[0])

    def events(self, round_number: int) -> Iterator[Event]:
        with self.engine.connect() as c:
            # defence: store.replay-reads-its-round-only
            rows = c.execute(sa.select(events).where(events.c.round == round_number)
                             .order_by(events.c.id)).all()
        for r in rows:
            yield Event(r.round, r.kind, r.stage, r.site, bytes(r.payload))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction of the job's; on a leased PostgreSQL store, fenced by the
        lease: it commits only while this aggregator's lease session still holds the lock
        (an aggregator paused past its lease's end, a VM frozen, wrote a stale round abort
        into the store the aggregator that took over was serving)."""
        with self.engine.begin() as c:
            self._fence(c)
            yield c

    def _fence(self, c: Connection) -> None:
        if not self._leased or self.url.startswith("sqlite"):
            return  # (SQLite's lock is the process's for life; an unleased store: tools)
        # defence: store.writes-fenced-by-the-lease
        if self._lease_pid is None or not c.execute(
                sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND granted AND pid = :pid"), {"pid": self._lease_pid}).scalar():
            raise StoreBusy("this aggregator's lease on the store ended (another may serve "
                            "it now): nothing is written until it is taken again")

    # ---- rounds, models, releases ---------------------------------------------------------

    def save_model(self, digest: bytes, spec: str, blob: BlobRef) -> None:
        with self.engine.begin() as c:
            # defence: store.model-saved-once
            if c.execute(sa.select(models.c.digest).where(models.c.digest == digest)).first():
                return
            c.execute(models.insert().values(digest=digest, spec=spec, blob=blob.to_json()))

    def load_model(self, digest: bytes) -> tuple[str, BlobRef] | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(models.c.spec, models.c.blob)
                            .where(models.c.digest == digest)).first()
        return None if row is None else (row.spec, BlobRef.from_json(row.blob))

    def open_round(self, round_number: int, round_id: str, protocol: str,
                   model_digest: bytes, *, first: Event | None = None) -> None:
        """Record the round as running, with ``first``, its first event, in one transaction."""
        with self.transaction() as c:
            c.execute(rounds.insert().values(round=round_number, round_id=round_id,
                                             protocol=protocol, status="running",
                                             model_digest=model_digest, opened_at=time.time()))
            if first is not None:
                self.record_event(c, first)

    def finish_round(self, conn: Connection, round_number: int, status: str, *,
                     result_digest: bytes | None = None, abort_reason: str | None = None,
                     survivors: Sequence[int] = ()) -> None:
        # defence: store.finish-round-its-row-only
        conn.execute(rounds.update().where(rounds.c.round == round_number).values(
            status=status, result_digest=result_digest, abort_reason=abort_reason,
            survivors=json.dumps(list(survivors)), finished_at=time.time()))

    def record_release(self, conn: Connection, round_number: int, average: BlobRef,
                       weight_sum: float, sites: Sequence[int]) -> None:
        conn.execute(releases.insert().values(round=round_number, average=average.to_json(),
                                              weight_sum=weight_sum,
                                              sites=json.dumps(list(sites)),
                                              released_at=time.time()))

    def job_binding(self) -> tuple[bytes, str] | None:
        """The (trust root, job) this store belongs to, if an aggregator has bound it."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(job.c.trust_root, job.c.job)
                            .where(job.c.id == 1)).first()
        return None if row is None else (bytes(row.trust_root), str(row.job))

    def bind_job(self, trust_root: bytes, name: str) -> tuple[bytes, str]:
        """Bind the store to (trust root, job) unless it is bound already; the binding it
        holds now (another aggregator's, if one bound it first)."""
        try:
            with self.engine.begin() as c:
                if c.execute(sa.select(job.c.id).where(job.c.id == 1)).first() is None:
                    c.execute(job.insert().values(id=1, trust_root=trust_root, job=name))
        except sa.exc.IntegrityError:
            pass  # (two first starts at once: the other's insert won; it is read below)
        bound = self.job_binding()
        assert bound is not None
        return bound

    def rounds(self) -> list[Any]:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(rounds).order_by(rounds.c.round)).all())

    def releases(self) -> list[Any]:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(releases).order_by(releases.c.round)).all())


# A write-ahead log larger than this is truncated once checkpointed (SQLite otherwise keeps it
# at its largest, until shutdown: a burst of uploads left gigabytes behind)...
WAL_SIZE_LIMIT = 64 << 20
WAL_IDLE_SECONDS = 5.0  # ...once no chunk was written for this long (mid-upload, regrowing
# the log from a truncated file cost the ingest rate; journal_size_limit did that)
WAL_TRUNCATE_SECONDS = 60.0  # ...or, if uploads never pause that long, this often


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA page_size=65536")  # a new store only: 1 MiB chunks in 16 pages
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed event (an acknowledged message) survives a crash of the machine too
    # defence: store.events-synced-every-commit
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_bulk_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA page_size=65536")  # a new store only: 1 MiB chunks in 16 pages
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # chunk writes never checkpoint (a checkpoint's syncs in the upload path halved the
    # ingest rate): Store.checkpoint does, on its own thread, through the FULL connection
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def _pg_bulk_settings(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("SET synchronous_commit = off")
    cursor.close()


def split_chunks(data: bytes, chunk_bytes: int) -> list[bytes]:
    """The aggregator's own payloads as chunks of ``chunk_bytes`` (an empty payload is one
    empty chunk)."""
    view = memoryview(data)
    return [bytes(view[i:i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)] or [b""]


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite store named by ``url`` (a path or sqlite:///), else None."""
    try:
        url = normalize_url(url)
    except StoreError:
        return None
    return _sqlite_file(url) if url.startswith("sqlite") else None


def _sqlite_file(url: str) -> Path | None:
    """The file of the SQLite store at ``url`` (normalised), or None (in memory)."""
    database = sa.engine.make_url(url).database
    return None if not database or database == ":memory:" else Path(database)


def _store_file(url: str) -> Path | None:
    """The file of the store at ``url`` (normalised), if it is a SQLite file."""
    return _sqlite_file(url) if url.startswith("sqlite") else None


def sqlite_url(path: str) -> str:
    return normalize_url(path)


def described(url: str) -> str:
    """The store as the log names it: a SQLite file's absolute path, and whether it is there
    yet (a relative --store given in another directory made a new store, and the job began
    again at round 1 with no word of where); another store's URL, redacted."""
    path = _store_file(url)
    if path is None:
        return redacted(url)
    try:
        there = path.exists()
    except OSError:
        there = True
    return f"{path.resolve()}" + ("" if there else " (new: the job starts at round 1)")


def check_store_location(url: str) -> None:
    """A SQLite store not made yet needs a directory to be made in. The aggregator checks
    this before it binds its port: it bound the port, said "listening", then exited."""
    path = _store_file(url)
    try:
        if path is None or path.exists() or path.is_symlink():
            return  # (a link's target is the store's own checks' to judge)
        # defence: store.location-checked-before-listening
        if not path.parent.is_dir():
            raise StoreError(f"cannot create store {path}: its directory {path.parent} does "
                             "not exist")
    except OSError as e:  # (a directory on the way it may not search)
        raise StoreError(f"cannot create store {path}: {e.strerror or e}") from None
