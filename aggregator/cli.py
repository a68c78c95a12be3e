"""``secagg aggregator serve --config FILE [--store PATH]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from aggregator import logs

    logs.configure(args.log_level)
    def count_tls_refusal(reason: str) -> None:  # (the metrics exist once serve has begun)
        from aggregator import service

        service._metrics.tls_refused.labels(reason).inc()

    # before gRPC starts: it reads its log level once
    logs.capture_native_stderr(on_tls_refused=count_tls_refusal)
    from aggregator.service import serve
    from aggregator.store import warn_secret_on_command_line

    warn_secret_on_command_line(args.store, lambda text: logging.getLogger(
        "secagg.aggregator").warning(text, extra={"event": "store_password_on_command_line"}))
    # ("OFF", " off": an operator's spelling, not a host named "OFF" to bind)
    # defence: cli.serve-metrics-off-any-case
    metrics = None if args.metrics.strip().lower() == "off" else args.metrics
    status = asyncio.run(serve(args.config, store=args.store, listen=args.listen,
                               metrics_listen=metrics))
    # a store call that never returned (serve logged it) would keep the interpreter from
    # exiting, as it joins every worker thread: exit without it
    ours = [t for t in threading.enumerate() if t.name.startswith("secagg-")]
    end = time.monotonic() + 2.0
    for t in ours:  # idle workers end at once; a stuck one does not
        t.join(timeout=max(0.0, end - time.monotonic()))
    # defence: cli.serve-exits-without-a-stuck-thread
    if any(t.is_alive() for t in ours):
        logging.shutdown()
        os._exit(status)
    return status


def _migrate(args: argparse.Namespace) -> int:
    from aggregator.store import migrate, not_served, redacted, sqlite_path

    _warn_secret(args.store)

    path = sqlite_path(args.store)
    new = path is not None and not path.exists()
    with not_served(args.store):
        before, after = migrate(args.store)
    if new:  # (a mistyped path made a new store, and said only "(empty) -> 0002")
        print(f"created a new store {path} (there was none): schema revision {after}")
    # defence: cli.store-output-redacted
    elif before == after:
        print(f"store {redacted(args.store)} is at schema revision {after}: nothing to do")
    else:
        print(f"store {redacted(args.store)}: schema revision {before or '(empty)'} -> {after}")
    return 0


def _backup(args: argparse.Namespace) -> int:
    from aggregator.store import backup, redacted

    _warn_secret(args.store)

    size = backup(args.store, args.out)
    print(f"backed up {redacted(args.store)} to {args.out} ({size:,} bytes)")
    return 0


def _warn_secret(store: str) -> None:
    from aggregator.store import warn_secret_on_command_line

    warn_secret_on_command_line(store, lambda text: print(f"secagg: warning: {text}",
                                                          file=sys.stderr))


def _restore(args: argparse.Namespace) -> int:
    from aggregator.store import redacted, restore

    _warn_secret(args.store)

    older = restore(args.backup, args.store)
    print(f"restored {args.backup} into {redacted(args.store)}")
    if older is not None:
        print(f"its schema is at revision {older}, older than this aggregator's: run `secagg "
              f"aggregator migrate --store {redacted(args.store)}` before serving it")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    agg = sub.add_parser("aggregator", help="run the aggregator service")
    agg_sub = agg.add_subparsers(dest="aggregator_command", required=True)
    serve = agg_sub.add_parser("serve", help="serve a federation's training job over mTLS")
    serve.add_argument("--config", required=True, type=Path,
                       help="the aggregator's federation.toml (beside its TLS files)")
    serve.add_argument("--store", default=None,
                       help="SQLite file or database URL (default: aggregator.db beside the "
                            "config)")
    serve.add_argument("--listen", default=None, help="address to bind (default: [::]:PORT)")
    # defence: cli.metrics-on-loopback-by-default
    serve.add_argument("--metrics", default="127.0.0.1:9464", metavar="HOST:PORT",
                       help="where Prometheus scrapes /metrics (default 127.0.0.1:9464, "
                            "loopback only; 'off' to disable; port 0 picks one, logged)")
    # (INFO, as operators copy the level names, was "invalid choice")
    serve.add_argument("--log-level", default="info", type=str.lower,
                       choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)
    migrate = agg_sub.add_parser(
        "migrate", help="bring a store to this aggregator's schema (back it up first)",
        description="Creates the schema in an empty store, or upgrades one an older aggregator "
                    "wrote. A store at a revision this aggregator does not know is refused.")
    migrate.add_argument("--store", required=True, help="SQLite file or database URL")
    migrate.set_defaults(func=_migrate)
    backup = agg_sub.add_parser(
        "backup", help="a consistent copy of the store, taken while the aggregator runs",
        description="SQLite: the online backup API (one file). PostgreSQL: pg_dump's custom "
                    "format (pg_dump must be on PATH).")
    backup.add_argument("--store", required=True, help="SQLite file or database URL")
    backup.add_argument("--out", required=True, type=Path, help="backup file to write")
    backup.set_defaults(func=_backup)
    restore = agg_sub.add_parser(
        "restore", help="restore a backup into an empty store (the aggregator stopped)",
        description="SQLite: copies the backup into a store file that does not exist yet. "
                    "PostgreSQL: pg_restore into an empty database (pg_restore on PATH).")
    restore.add_argument("--backup", required=True, type=Path, help="backup file to read")
    restore.add_argument("--store", required=True, help="SQLite file or database URL")
    restore.set_defaults(func=_restore)
