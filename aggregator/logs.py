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
from collections.abc import Callable

FIELDS = ("event", "round_id", "site_id", "stage", "reason", "code", "peer", "count")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        # defence: logs.only-named-fields
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            # defence: logs.exception-type-only
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
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)")
# the reasons a refused handshake is logged with; any other text (a peer can put its own into
# what gRPC core logs) is reported as "other"
TLS_REASONS = frozenset({
    "CERTIFICATE_VERIFY_FAILED", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_HANDSHAKE_FAILURE",
    "TLSV1_ALERT_DECRYPT_ERROR", "TLSV1_ALERT_PROTOCOL_VERSION", "TLSV1_ALERT_INTERNAL_ERROR",
    "WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL", "NO_SHARED_CIPHER",
    "DECODE_ERROR", "UNEXPECTED_MESSAGE", "UNEXPECTED_RECORD", "EXCESSIVE_MESSAGE_SIZE",
    "NO_SHARED_GROUP", "WRONG_SIGNATURE_TYPE", "BAD_SIGNATURE", "CERT_DECODE_ERROR"})
NATIVE_LINES_PER_SECOND = 20.0  # gRPC core lines logged at most (a burst of 100 first)
NATIVE_LINES_BURST = 100.0


class _LineBudget:
    """A token bucket: anyone who can reach the port can make gRPC core log (a refused
    handshake needs no certificate), so its lines are rate-limited and what is dropped is
    counted in one summary line."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens = rate, burst, burst
        self.stamp = time.monotonic()
        self.dropped = 0

    def take(self) -> bool:
        now = time.monotonic()
        # defence: logs.native-burst-capped
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


class NativeLines:
    """What capture_native_stderr does with each line gRPC core writes (see there)."""

    def __init__(self, on_tls_refused: Callable[[str], None] | None = None) -> None:
        self.on_tls_refused = on_tls_refused
        self.budget = _LineBudget(NATIVE_LINES_PER_SECOND, NATIVE_LINES_BURST)
        self.log = logging.getLogger("secagg.aggregator")

    def _emit(self, level: int, message: str, **extra: str) -> None:
        # defence: logs.native-rate-limited
        if not self.budget.take():
            return
        if self.budget.dropped:
            self.log.warning("gRPC core lines dropped by the rate limit", extra={
                "event": "grpc_core_dropped", "count": self.budget.dropped})
            self.budget.dropped = 0
        self.log.log(level, message, extra=extra)

    def feed(self, line: str) -> None:
        match = _NATIVE.match(line)
        if match is None:
            # a line the core did not start (the rest of a message with a newline in it):
            # kept, but only inside one of our own entries
            # defence: logs.native-lines-wrapped
            if line.strip():
                # defence: logs.native-lines-cut
                self._emit(logging.WARNING, line[:500], event="grpc_core", reason="continuation")
            return
        level, source, text = match.groups()
        if "Handshake failed" in text:
            found = _SSL_REASON.search(text)
            # defence: logs.tls-reason-known
            reason = found.group(1) if found and found.group(1) in TLS_REASONS else "other"
            if self.on_tls_refused is not None:
                self.on_tls_refused(reason)
            self._emit(logging.WARNING, "TLS handshake refused", event="tls_refused",
                       reason=reason)
        elif level in ("W", "E", "F") and "not suitable for production" not in text:
            self._emit(logging.ERROR if level in ("E", "F") else logging.WARNING, text[:500],
                       event="grpc_core", reason=source)


def capture_native_stderr(on_tls_refused: Callable[[str], None] | None = None) -> None:
    """Route gRPC core's own log lines (written to fd 2 by C++) through the JSON logger.

    Refused TLS handshakes (no certificate, another CA, an expired certificate) never reach
    Python; gRPC core logs them at INFO. Each becomes a ``tls_refused`` warning with the TLS
    reason (one of TLS_REASONS, else "other"; ``on_tls_refused`` is called with it); other
    warnings and errors of the core become ``grpc_core`` events; the rest of the core's INFO
    chatter is dropped. No line of the core reaches the log as it is: what a peer controls
    can appear in it (an SNI name, an HTTP/2 GOAWAY's debug data), newlines included, and a
    raw line could pass for one of ours. Lines are rate-limited (NATIVE_LINES_PER_SECOND).
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
    native = NativeLines(on_tls_refused)

    def pump() -> None:
        with os.fdopen(read_fd, "r", errors="replace") as lines:
            for raw in lines:
                native.feed(raw.rstrip("\n"))

    threading.Thread(target=pump, name="secagg-native-log", daemon=True).start()
