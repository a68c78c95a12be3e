"""JSON logs, one object per line: time, level, event, round id, site id, stage.

Callers pass only ids, stage numbers, counts and reasons in ``extra``; never a payload, key,
seed, share or plaintext (the fields below are the only ones copied into a line).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

FIELDS = ("event", "round_id", "site_id", "stage", "reason", "code", "peer", "count", "dropped")


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


# what a peer can make us log as often as it likes (a refused certificate, message or chunk,
# an idle stream): each (event, site) may log a burst, then PEER_LINES_PER_SECOND
# defence: logs.every-peer-event-budgeted
PEER_EVENTS = frozenset({"identity_refused", "chunk_refused", "stream_idle", "call_refused"})
PEER_LINES_PER_SECOND = 1.0
PEER_LINES_BURST = 20.0
# defence: logs.peer-budgets-bounded-by-default
PEER_BUDGETS = 4096  # (event, site) pairs remembered; the oldest is forgotten first


class PeerLineBudget(logging.Filter):
    """Rate-limits the log lines a peer causes, per (event, site id): 2,000 refused calls
    from one off-roster certificate wrote 336 KB of log in 2.3 s. A line that follows
    dropped ones says how many in ``dropped`` (the refusals are all counted in the
    metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.budgets: OrderedDict[tuple[object, object], _LineBudget] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        event = record.__dict__.get("event")
        # gRPC's Python library logs at error what a roster site causes at will (each
        # compressed message refused past the size limit: "ExecuteBatchError raised in core
        # by servicer method"), naming no site: a budget for each of its messages (by the
        # library's format string, not the text: a flood of one kind must not drop its
        # "Exception calling application", a real fault of ours)
        # defence: logs.grpc-library-lines-budgeted
        if event is None and record.name.split(".", 1)[0] == "grpc":
            key: tuple[object, object] = ("grpc_library", str(record.msg)[:120])
        elif event not in PEER_EVENTS:
            return True
        else:
            key = (event, record.__dict__.get("site_id"))
        with self.lock:
            budget = self.budgets.get(key)
            if budget is None:
                budget = self.budgets[key] = _LineBudget(PEER_LINES_PER_SECOND,
                                                         PEER_LINES_BURST)
                # defence: logs.peer-budgets-bounded
                if len(self.budgets) > PEER_BUDGETS:
                    self.budgets.popitem(last=False)
            else:
                self.budgets.move_to_end(key)
            # defence: logs.peer-lines-rate-limited
            if not budget.take():
                return False
            if budget.dropped:
                record.dropped = budget.dropped
                budget.dropped = 0
        return True


def configure(level: str = "info") -> None:
    """JSON lines on stderr for ours (``secagg.*``, at ``level``) and, at WARNING, for every
    other logger and for Python warnings: asyncio's "Task exception was never retrieved" and
    other libraries' messages went through logging's last resort as raw text and tracebacks."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(PeerLineBudget())
    ours = logging.getLogger("secagg")
    ours.handlers[:] = [handler]
    ours.setLevel(level.upper())
    ours.propagate = False
    # defence: logs.every-logger-json
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


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
NATIVE_MESSAGE_BYTES = 1 << 16  # what is read of one message of the core (the rest is cut)


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
        # refused handshakes and the core's other lines have a budget each: a site's flood of
        # lines the core logs at error (a bad grpc-timeout header, say: the core's lines
        # name no peer) used up the one budget and hid outsiders' refused handshakes
        # defence: logs.native-budgets-apart
        self.budget = _LineBudget(NATIVE_LINES_PER_SECOND, NATIVE_LINES_BURST)
        self.tls_budget = _LineBudget(NATIVE_LINES_PER_SECOND, NATIVE_LINES_BURST)
        self.log = logging.getLogger("secagg.aggregator")

    def _emit(self, level: int, message: str, budget: _LineBudget | None = None,
              **extra: str) -> None:
        budget = budget or self.budget
        # defence: logs.native-rate-limited
        if not budget.take():
            return
        # what either budget dropped is said with the next line that passes either (a flood
        # of one kind followed by lines of the other only never said it)
        # defence: logs.native-dropped-said
        for kind, spent in (("grpc_core", self.budget), ("tls_refused", self.tls_budget)):
            if spent.dropped:
                self.log.warning("gRPC core lines dropped by the rate limit", extra={
                    "event": "grpc_core_dropped", "count": spent.dropped, "reason": kind})
                spent.dropped = 0
        self.log.log(level, message, extra=extra)

    def feed(self, message: str) -> None:
        """One message of the core: what it wrote in one go (its first line is the core's
        header; any further line is text of the same message, which a peer may have put
        there)."""
        first, _, rest = message.partition("\n")
        match = _NATIVE.match(first)
        if match is None:
            # not a message the core started (what a pipe split off a message after a
            # newline the peer put in it, or something else on fd 2): kept, but only inside
            # one of our own entries
            # defence: logs.native-lines-wrapped
            if message.strip():
                # defence: logs.native-lines-cut
                cut = message[:500]
                self._emit(logging.WARNING, cut, event="grpc_core", reason="continuation")
            return
        level, source, text = match.groups()
        text = f"{text}\n{rest}" if rest.strip() else text
        # only the core's own handshake line counts, never text that merely holds the words
        # (an SNI name is logged by the same file: "No match found for server name: ...")
        # defence: logs.tls-refusal-from-the-core-only
        if source == "ssl_transport_security.cc" and text.startswith("Handshake failed"):
            found = _SSL_REASON.search(text)
            # defence: logs.tls-reason-known
            reason = found.group(1) if found and found.group(1) in TLS_REASONS else "other"
            self._emit(logging.WARNING, "TLS handshake refused", self.tls_budget,
                       event="tls_refused", reason=reason)
            if self.on_tls_refused is not None:  # (after the line: a failing count loses it not)
                self.on_tls_refused(reason)
        elif level in ("W", "E", "F") and "not suitable for production" not in text:
            self._emit(logging.ERROR if level in ("E", "F") else logging.WARNING, text[:500],
                       event="grpc_core", reason=source)


# what the drain writes of fd 2's last messages once the aggregator has died: at most this
# many messages, each cut to FATAL_MESSAGE_CHARS
FATAL_MESSAGES = 200
FATAL_MESSAGE_CHARS = 500
_DRAIN = r"""
import json, os, re, signal, socket, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # (a terminal's Ctrl-C, a stop: it ends with its parent)
sock, alive, out, most, chars = (int(a) for a in sys.argv[1:])
clean = False  # (the aggregator said it is exiting normally: what is left is no fatal output)
while True:
    try:
        got = os.read(alive, 1)
    except InterruptedError:
        continue
    if not got:
        break
    clean = True
ours = socket.socket(fileno=sock)
ours.setblocking(False)
core = re.compile(r"[IDWEF]\d{4} \d\d:\d\d:\d\d")
said = 0
while True:
    try:
        raw = ours.recv(1 << 16)
    except OSError:
        break
    text = raw.decode(errors="replace").rstrip("\n")
    # the core's INFO and DEBUG chatter (a stop's last lines) is not said; its warnings and
    # errors are, at their level; any other text (Python's own fatal error) is critical
    level = "critical"
    if core.match(text):
        level = {"I": "", "D": "", "W": "warning", "E": "error"}.get(text[0], "critical")
        # as the live reader has them: a refused handshake without the peer's text (an SNI
        # name), and no word of gRPC's own "not suitable for production"
        if "ssl_transport_security.cc" in text and "Handshake failed" in text:
            text = "TLS handshake refused"
        elif "not suitable for production" in text:
            level = ""
    if not level or not text.strip():
        continue
    said += 1
    if said > most:
        continue
    now = time.time()
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + ".%03dZ" % (int(now * 1000) % 1000), "level": level,
            "message": text[:chars], "event": "grpc_core" if clean else "fatal_output"}
    os.write(out, (json.dumps(line, separators=(",", ":")) + "\n").encode())
if said > most:
    os.write(out, (json.dumps({"level": "critical", "message": "fatal output cut",
                               "event": "fatal_output", "dropped": said - most}) + "\n").encode())
"""


def _drain_at_exit(ours: socket.socket, original: int) -> None:
    """Start a small process that, once this one has ended however it ended, writes what
    is left unread on fd 2's socket to the real stderr as JSON lines (``fatal_output``).
    Whatever a dying process writes to fd 2 as it dies (gRPC core's fatal line before its
    abort, Python's "Fatal Python error") was lost with the reader thread: the socket is
    read by this process only. It waits on a pipe whose one write end this process holds
    (not inherited: the kernel closes it however this process ends), ignores the signals a
    terminal or a stop sends its group, and reads nothing while this process lives."""
    import subprocess

    alive_r, alive_w = os.pipe()
    try:
        # defence: logs.fatal-output-drained
        drain = subprocess.Popen(  # noqa: S603 (our own interpreter, a fixed script)
            [sys.executable, "-I", "-c", _DRAIN, str(ours.fileno()), str(alive_r),
             str(original), str(FATAL_MESSAGES), str(FATAL_MESSAGE_CHARS)],
            pass_fds=(ours.fileno(), alive_r, original), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=original)
    except OSError:
        os.close(alive_w)  # (no drain: the log works as before, fatal output is lost)
    else:
        # held until the process ends (and the drain's handle with it: not collected, and
        # warned about, while it runs); a normal exit says so first, so that lines the
        # reader had not read yet are not told as fatal
        _ALIVE.append((alive_w, drain))
        atexit.register(_exiting_normally, alive_w)
    finally:
        os.close(alive_r)


_ALIVE: list[tuple[int, object]] = []


def _exiting_normally(alive_w: int) -> None:
    with contextlib.suppress(OSError):
        os.write(alive_w, b"0")


def capture_native_stderr(on_tls_refused: Callable[[str], None] | None = None) -> None:
    """Route gRPC core's own log lines (written to fd 2 by C++) through the JSON logger.

    Refused TLS handshakes (no certificate, another CA, an expired certificate) never reach
    Python; gRPC core logs them at INFO. Each becomes a ``tls_refused`` warning with the TLS
    reason (one of TLS_REASONS, else "other"; ``on_tls_refused`` is called with it); other
    warnings and errors of the core become ``grpc_core`` events; the rest of the core's INFO
    chatter is dropped. No line of the core reaches the log as it is: what a peer controls
    can appear in it (an SNI name, an HTTP/2 GOAWAY's debug data), newlines included, and a
    raw line could pass for one of ours. Each message the core writes is read whole (one
    datagram), so text it carries never passes for a message of its own. Messages are
    rate-limited (NATIVE_LINES_PER_SECOND). What is still unread when the process dies is
    written as ``fatal_output`` lines by a drain process (:func:`_drain_at_exit`), and a fatal
    signal dumps every thread's Python stack on the real stderr.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "INFO")
    original = os.dup(2)
    # fd 2 is one end of a datagram socket pair, not a pipe: the core writes each message in
    # one write, and a datagram keeps it whole. Through a pipe, a message whose peer text
    # held a newline became two lines, the second of them (an SNI of "x\nE1203 ... ] STORE
    # CORRUPT") a line of the core's own format: a forged core error, and a forged
    # "Handshake failed" counted as a refusal.
    # defence: logs.native-messages-kept-whole
    ours: socket.socket | None = None
    theirs: socket.socket | None = None
    with contextlib.suppress(AttributeError, OSError):  # (else a pipe: a line a message)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    if theirs is not None:
        with contextlib.suppress(OSError):  # (room for bursts while the reader waits)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        os.dup2(theirs.fileno(), 2)
        theirs.close()
    else:
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
    if ours is not None:
        _drain_at_exit(ours, original)
    sys.stderr = os.fdopen(os.dup(original), "w", buffering=1)
    # a fatal signal (a crash in C, an abort) dumps every thread's Python stack on the real
    # stderr, not into fd 2's socket, which no one reads once the process is dying
    # defence: logs.fatal-stack-on-real-stderr
    faulthandler.enable(file=sys.stderr, all_threads=True)
    for name in ("secagg", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
    native = NativeLines(on_tls_refused)

    def feed(message: str) -> None:
        # the reader must outlive anything one message does to it: if it stopped, the
        # core's threads would block writing to fd 2 once its buffer is full
        # (nothing to log a failure with that could not fail the same way)
        # defence: logs.reader-outlives-a-failing-message
        with contextlib.suppress(Exception):
            native.feed(message)

    def pump() -> None:
        if ours is not None:
            with ours:
                # (any bytes: a peer's text in a message need not be UTF-8)
                # defence: logs.reader-decodes-any-bytes
                while True:
                    feed(ours.recv(NATIVE_MESSAGE_BYTES).decode(errors="replace")
                         .rstrip("\n"))
        with os.fdopen(read_fd, "r", errors="replace") as lines:
            for raw in lines:
                feed(raw.rstrip("\n"))

    threading.Thread(target=pump, name="secagg-native-log", daemon=True).start()
