"""JSON logs, one object per line: time, level, event, round id, site id, stage.

Callers pass only ids, stage numbers, counts and reasons in ``extra``; never a payload, key,
seed, share or plaintext (the fields below are the only ones copied into a line).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time

FIELDS = ("event", "round_id", "site_id", "stage", "reason", "code", "peer", "count")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = record.exc_info[0].__name__  # the type only: no payload in a trace
        return json.dumps(line, separators=(",", ":"))


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("secagg")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


_NATIVE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\] (.*)$")
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z_]+)")


def capture_native_stderr() -> None:
    """Route gRPC core's own log lines (written to fd 2 by C++) through the JSON logger.

    Refused TLS handshakes (no certificate, another CA, an expired certificate) never reach
    Python; gRPC core logs them at INFO. Each becomes a ``tls_refused`` warning with the TLS
    reason; other warnings and errors of the core become ``grpc_core`` events; the rest of
    the core's INFO chatter is dropped.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "INFO")
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = os.fdopen(os.dup(original), "w", buffering=1)
    for handler in logging.getLogger("secagg").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    log = logging.getLogger("secagg.aggregator")

    def pump() -> None:
        with os.fdopen(read_fd, "r", errors="replace") as lines:
            for raw in lines:
                line = raw.rstrip("\n")
                match = _NATIVE.match(line)
                if match is None:
                    if line.strip():
                        sys.stderr.write(line + "\n")
                    continue
                level, source, text = match.groups()
                if "Handshake failed" in text:
                    reason = _SSL_REASON.search(text)
                    log.warning("TLS handshake refused", extra={
                        "event": "tls_refused",
                        "reason": reason.group(1) if reason else "handshake failed"})
                elif level in ("W", "E", "F") and "not suitable for production" not in text:
                    log.log(logging.ERROR if level in ("E", "F") else logging.WARNING,
                            text[:500], extra={"event": "grpc_core", "reason": source})

    threading.Thread(target=pump, name="secagg-native-log", daemon=True).start()
