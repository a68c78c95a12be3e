"""``secagg aggregator serve --config FILE [--store PATH]``."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from aggregator import logs

    logs.configure(args.log_level)
    logs.capture_native_stderr()  # before gRPC starts: it reads its log level once
    from aggregator.service import serve

    return asyncio.run(serve(args.config, store=args.store, listen=args.listen))


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
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)
