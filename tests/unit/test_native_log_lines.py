"""What reaches the aggregator's JSON log from gRPC core's own lines, which carry text a peer
chooses (an SNI name, an HTTP/2 GOAWAY's debug data), newlines included, and which anyone
who can reach the port can cause (a refused handshake needs no certificate)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aggregator import logs, metrics

FORGED = '{"time":"2026-12-02T00:00:00.000Z","level":"info","event":"round_completed"}'
HANDSHAKE = ("E1202 14:53:42.123456    1234 ssl_transport_security.cc:1653] Handshake failed "
             "with fatal error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:{}.")


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[tuple[logs.NativeLines, list[dict[str, Any]]]]:
    """A NativeLines whose log goes, formatted, into a list (as the aggregator's would)."""
    out: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(json.loads(logs.JsonFormatter().format(record)))

    logger = logging.getLogger("secagg.aggregator")
    handler = Collect()
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    yield logs.NativeLines(), out
    logger.removeHandler(handler)


def test_a_line_the_core_did_not_start_is_kept_only_inside_one_of_our_entries(
        lines: tuple[logs.NativeLines, list[dict[str, Any]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    native, out = lines
    native.feed("I1202 14:53:42.1  1 chttp2_transport.cc:1] GOAWAY received: debug data x")
    native.feed(FORGED)  # the rest of that line, after a newline the peer put in it
    assert FORGED not in capsys.readouterr().err  # never written as it is
    assert [e["event"] for e in out] == ["grpc_core"]
    assert out[0]["message"] == FORGED and out[0]["reason"] == "continuation"


def test_a_refused_handshake_is_logged_with_a_known_reason_or_other(
        lines: tuple[logs.NativeLines, list[dict[str, Any]]]) -> None:
    native, out = lines
    seen: list[str] = []
    native.on_tls_refused = seen.append
    native.feed(HANDSHAKE.format("CERTIFICATE_VERIFY_FAILED"))
    native.feed(HANDSHAKE.format("SPOOFED_BY_SITE_3"))
    assert [(e["event"], e["reason"]) for e in out] == [
        ("tls_refused", "CERTIFICATE_VERIFY_FAILED"), ("tls_refused", "other")]
    assert seen == ["CERTIFICATE_VERIFY_FAILED", "other"]  # the metric's label set is fixed


def test_a_flood_of_core_lines_is_rate_limited_and_what_was_dropped_is_counted(
        lines: tuple[logs.NativeLines, list[dict[str, Any]]]) -> None:
    native, out = lines
    for _ in range(2000):  # 600 unauthenticated connections made 900 lines in 0.9 s
        native.feed(HANDSHAKE.format("PEER_DID_NOT_RETURN_A_CERTIFICATE"))
    assert len(out) <= logs.NATIVE_LINES_BURST + 5
    native.tls_budget.stamp -= 1.0  # a second later
    native.feed(HANDSHAKE.format("PEER_DID_NOT_RETURN_A_CERTIFICATE"))
    summary = [e for e in out if e["event"] == "grpc_core_dropped"]
    assert summary and int(summary[0]["count"]) >= 2000 - logs.NATIVE_LINES_BURST - 5


def test_the_metrics_port_serves_a_bounded_number_of_connections_and_closes_idle_ones(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import http.client

    monkeypatch.setattr(metrics, "METRICS_IDLE_SECONDS", 2.0)
    server, port = metrics.serve_metrics(metrics.NoMetrics(), "127.0.0.1:0")
    idle = []

    def scrape(source: str) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                          source_address=(source, 0))
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read()
        finally:
            conn.close()

    try:
        before = threading.active_count()
        for _ in range(40):  # connections from one host that send nothing
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        assert threading.active_count() - before <= 5  # (4 a host, and the server's own)
        # the scraper, on another address, is still served while they hold theirs
        assert b"secagg_rounds_started" in scrape("127.0.0.2")
        time.sleep(2.5)  # idle ones are closed, quietly, and that host is served again
        assert b"secagg_rounds_started" in scrape("127.0.0.1")
        assert threading.active_count() - before <= 2
        assert "Traceback" not in capsys.readouterr().err
    finally:
        for s in idle:
            s.close()
        server.shutdown()


def test_the_metrics_port_holds_a_bounded_number_of_connections_over_all_hosts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many hosts, each within its own share, could still give the port a thread per idle
    connection: at most 64 are held over all hosts (and, at the default, an idle one goes
    within half a minute). A host whose connections closed is forgotten (each address
    that ever scraped left an entry behind)."""
    assert metrics.METRICS_IDLE_SECONDS <= 30
    monkeypatch.setattr(metrics, "METRICS_IDLE_SECONDS", 5.0)
    server, port = metrics.serve_metrics(metrics.NoMetrics(), "127.0.0.1:0")
    idle: list[socket.socket] = []
    try:
        before = threading.active_count()
        for host in range(2, 40):  # 38 hosts, 4 connections each
            for _ in range(4):
                idle.append(socket.create_connection(
                    ("127.0.0.1", port), timeout=5, source_address=(f"127.0.0.{host}", 0)))
        time.sleep(0.5)
        assert threading.active_count() - before <= 65
        assert server.open_total <= 64
    finally:
        for s in idle:
            s.close()
    try:
        for _ in range(50):
            if not server.open_by_host:
                break
            time.sleep(0.1)
        assert server.open_by_host == {} and server.open_total == 0
    finally:
        server.shutdown()


def test_a_log_line_holds_only_the_named_fields_and_an_exceptions_type() -> None:
    """Whatever a caller passes in ``extra`` beyond the named fields, and whatever an
    exception's message carries (a store error can quote a statement's parameters), stays
    out of the line: only the exception's type is written."""
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("secagg.aggregator", logging.ERROR, __file__, 1,
                               "store error", None, None)
    record.__dict__.update(event="store_error", site_id=3, masked_input="SECRET-INPUT",
                           share=b"SECRET-SHARE".hex())
    try:
        raise ValueError("INSERT ... parameters: SECRET-PARAMETER")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = json.loads(formatter.format(record))
    assert line["event"] == "store_error" and line["site_id"] == 3
    assert line["error"] == "ValueError"
    assert "SECRET" not in json.dumps(line)


def test_quiet_time_does_not_save_up_more_than_the_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an hour without a core line, a flood still gets only the burst, then the rate."""
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    budget = logs._LineBudget(rate=20.0, burst=100.0)
    clock[0] += 3600
    assert sum(budget.take() for _ in range(1000)) == 100


def test_core_lines_are_cut_to_500_characters(
        lines: tuple[logs.NativeLines, list[dict[str, Any]]]) -> None:
    """A peer can make gRPC core log text of its choosing (SNI, GOAWAY data): however long,
    a line is cut, as a continuation and as a core warning."""
    native, out = lines
    native.feed("x" * 10_000)
    native.feed("W0101 00:00:00.000000   123 chttp2_transport.cc:42] " + "y" * 10_000)
    assert len(out) == 2 and all(len(e["message"]) <= 500 for e in out)


SNI_FORGED = ("E1203 16:46:01.917898   16076 ssl_transport_security.cc:3238] No match found for "
              "server name: x\nE1203 16:40:00.000000    4242 store.cc:1] STORE CORRUPT. Restore "
              "it.\nI1203 16:40:00.000000    4242 ssl.cc:1] Handshake failed. "
              "OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED")


def test_text_a_peer_put_in_a_core_message_stays_inside_that_message(
        lines: tuple[logs.NativeLines, list[dict[str, Any]]]) -> None:
    """An SNI name of "x\\nE1203 ... store.cc:1] STORE CORRUPT ..." is one message of the
    core: one entry, the core's file as its reason; no forged error, no refusal counted."""
    native, out = lines
    seen: list[str] = []
    native.on_tls_refused = seen.append
    native.feed(SNI_FORGED)
    assert [(e["event"], e["reason"]) for e in out] == [
        ("grpc_core", "ssl_transport_security.cc")]
    assert out[0]["message"].startswith("No match found for server name: x\n")
    assert seen == []


def test_only_the_cores_own_handshake_line_counts_as_a_refusal(
        lines: tuple[logs.NativeLines, list[dict[str, Any]]]) -> None:
    """The words "Handshake failed" in a peer's SNI (logged by the same file, on one line)
    are not a refused handshake: the metric and the tls_refused event are the core's."""
    native, out = lines
    seen: list[str] = []
    native.on_tls_refused = seen.append
    native.feed("E1203 16:46:01.917898   16076 ssl_transport_security.cc:3238] No match found "
                "for server name: Handshake.failed.OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_"
                "EXPIRED")
    native.feed("I1203 16:40:00.000000    4242 ssl.cc:1] Handshake failed. "
                "OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED")
    assert seen == [] and not [e for e in out if e["event"] == "tls_refused"]
    native.feed(HANDSHAKE.format("CERTIFICATE_VERIFY_FAILED"))
    assert seen == ["CERTIFICATE_VERIFY_FAILED"]


def _run_logged(code: str, status: int = 0) -> list[str]:
    """Run ``code`` in a process whose logging the aggregator's CLI set up; its stderr (read
    to its end: until every process holding it, the fatal output's drain among them, has
    ended). ``status``: the exit status expected."""
    import subprocess
    import sys
    import textwrap

    from tests.service_kit import ROOT, env

    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    return done.stderr.splitlines()


def test_what_a_dying_aggregator_writes_to_fd_2_reaches_the_log() -> None:
    """gRPC core writes its fatal line to fd 2 and aborts; Python writes "Fatal Python
    error" there: with fd 2 a socket only the aggregator's own thread read, both were lost
    with the process (an operator saw it gone, and nothing said why). The reader is held
    here on its first message, so the rest is still unread when the process aborts."""
    err = _run_logged(f"""
        import os, time
        from aggregator import logs
        logs.NativeLines.feed = lambda self, message: time.sleep(3600)
        logs.configure()
        logs.capture_native_stderr()
        os.write(2, b"I1203 16:46:02.000000   1 chttp2_transport.cc:1] held by the reader\\n")
        time.sleep(0.3)
        os.write(2, b"I1203 16:46:02.000000   1 server.cc:1] an INFO line: not said\\n")
        os.write(2, b"F1203 16:46:02.000000   1 ev_epoll1.cc:1] assertion failed: x\\n")
        os.write(2, {(HANDSHAKE.format("SNI-CHOSEN-BY-A-PEER") + chr(10)).encode()!r})
        os.write(2, b"Fatal Python error: something\\n")
        os.abort()
        """, status=-6)
    entries = [json.loads(line) for line in err if line.startswith("{")]
    said = [(e["event"], e["level"], e["message"]) for e in entries
            if e.get("event") == "fatal_output"]
    assert said == [
        ("fatal_output", "critical",
         "F1203 16:46:02.000000   1 ev_epoll1.cc:1] assertion failed: x"),
        # (as the live reader has it: no text a peer chose)
        ("fatal_output", "error", "TLS handshake refused"),
        ("fatal_output", "critical", "Fatal Python error: something")], err


def test_an_aggregator_that_ends_well_says_no_fatal_output_and_leaves_no_process() -> None:
    """The drain of fd 2 writes nothing after a normal end (the reader read it all, and the
    core's INFO lines of a stop are not said) and ends with the process: stderr reaches its
    end (else this run waits out its timeout)."""
    err = _run_logged("""
        import os, time
        from aggregator import logs
        logs.configure()
        logs.capture_native_stderr()
        os.write(2, b"W1203 16:46:02.000000   1 chttp2_transport.cc:1] a warning\\n")
        time.sleep(0.3)
        os.write(2, b"I1203 16:46:02.000000   1 server.cc:1] shutting down\\n")
        """)
    entries = [json.loads(line) for line in err]  # JSON lines only
    assert [e["event"] for e in entries] == ["grpc_core"], entries


def test_what_a_normal_stop_left_unread_is_not_told_as_fatal() -> None:
    """A stop whose last warnings the reader had not read yet had them written as
    ``fatal_output``: a normal exit tells the drain so first, and they come as ``grpc_core``
    lines (the reader is held here on its first message, as in the test above)."""
    err = _run_logged("""
        import os, time
        from aggregator import logs
        logs.NativeLines.feed = lambda self, message: time.sleep(3600)
        logs.configure()
        logs.capture_native_stderr()
        os.write(2, b"I1203 16:46:02.000000   1 chttp2_transport.cc:1] held by the reader\\n")
        time.sleep(0.3)
        os.write(2, b"W1203 16:46:02.000000   1 server.cc:1] a last warning\\n")
        """)
    entries = [json.loads(line) for line in err]  # JSON lines only
    assert [(e["event"], e["level"]) for e in entries] == [("grpc_core", "warning")], entries


def test_a_crash_in_c_shows_every_threads_python_stack() -> None:
    """A segmentation fault (a C extension's bug) ended the aggregator without a word: the
    fault handler now writes each thread's Python stack to the real stderr."""
    err = _run_logged("""
        import faulthandler
        from aggregator import logs
        logs.configure()
        logs.capture_native_stderr()
        faulthandler._sigsegv()
        """, status=-11)
    text = "\\n".join(err)
    assert "Segmentation fault" in text, text
    assert "<string>" in text, text  # the crashing thread's stack, to the line


def test_one_write_of_the_core_is_read_as_one_message() -> None:
    """What the core writes in one go (one log message, a peer's newline inside) reaches the
    log as one entry: fd 2 keeps message boundaries, a pipe did not."""
    err = _run_logged(f"""
        import os, time
        from aggregator import logs
        logs.configure()
        logs.capture_native_stderr()
        os.write(2, {(SNI_FORGED + chr(10)).encode()!r})
        os.write(2, b"W1203 16:46:02.000000   16076 chttp2_transport.cc:1] after\\n")
        time.sleep(0.5)
        """)
    entries = [json.loads(line) for line in err]  # JSON lines only
    assert [(e["event"], e["reason"]) for e in entries] == [
        ("grpc_core", "ssl_transport_security.cc"), ("grpc_core", "chttp2_transport.cc")]
    assert "STORE CORRUPT" in entries[0]["message"]


def test_the_core_log_reader_outlives_a_message_it_cannot_decode_or_handle() -> None:
    """A peer's text in a core message (an SNI name, GOAWAY debug data) may be any bytes, and
    the refusal callback may fail (the service's metrics not made yet): either stopped the
    reader thread, after which fd 2 fills and the core's threads block writing to it."""
    err = _run_logged(f"""
        import os, time
        from aggregator import logs
        logs.configure()
        def fail(reason):
            raise RuntimeError("no metrics yet")
        logs.capture_native_stderr(on_tls_refused=fail)
        os.write(2, b"W1203 16:46:02.000000   1 chttp2_transport.cc:1] GOAWAY \\xff\\xfe\\n")
        os.write(2, {(HANDSHAKE.format("CERTIFICATE_VERIFY_FAILED") + chr(10)).encode()!r})
        os.write(2, b"W1203 16:46:02.000000   1 chttp2_transport.cc:1] after\\n")
        time.sleep(0.5)
        """)
    entries = [json.loads(line) for line in err]  # JSON lines only
    assert [e["event"] for e in entries] == ["grpc_core", "tls_refused", "grpc_core"]
    assert "\ufffd" in entries[0]["message"] and entries[2]["message"] == "after"


def test_every_logger_and_warning_is_a_json_line_without_a_traceback() -> None:
    """asyncio's "Task exception was never retrieved", another library's error, a Python
    warning: JSON lines with the exception's type only, never raw text or a traceback."""
    err = _run_logged("""
        import logging, warnings
        from aggregator import logs
        logs.configure()
        try:
            raise ValueError("SECRET-IN-A-MESSAGE")
        except ValueError:
            logging.getLogger("asyncio").error("Task exception was never retrieved",
                                               exc_info=True)
        logging.getLogger("sqlalchemy.pool").warning("pool trouble")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
        warnings.warn("a user warning", stacklevel=1)
        """)
    entries = [json.loads(line) for line in err]  # JSON lines only
    assert entries[0]["error"] == "ValueError" and "SECRET" not in err
    assert "Traceback" not in err and len(entries) >= 3


@pytest.mark.parametrize("event", ["identity_refused", "chunk_refused", "stream_idle",
                                   "call_refused"])
def test_refusals_a_peer_causes_are_rate_limited_per_site_and_counted(
        event: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 refused calls from one certificate wrote 336 KB of log in 2.3 s: each (event,
    site) gets a burst, then a line a second; the next line says how many were dropped, and
    another site's refusals are still logged. (A site causes each of these events at will:
    refused calls, refused chunks, streams left idle.)"""
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    budget = logs.PeerLineBudget()

    def record(site: int | None, event: str = event) -> logging.LogRecord:
        r = logging.LogRecord("secagg.aggregator", logging.WARNING, __file__, 1, "refused",
                              None, None)
        r.__dict__.update(event=event, site_id=site)
        return r

    passed = sum(budget.filter(record(99)) for _ in range(2000))
    assert passed <= logs.PEER_LINES_BURST
    assert budget.filter(record(3))  # another site
    assert all(budget.filter(record(99, "round_opened")) for _ in range(100))  # not a peer's
    clock[0] += 1.0
    later = record(99)
    assert budget.filter(later)
    line = json.loads(logs.JsonFormatter().format(later))
    assert line["dropped"] == 2000 - passed



def test_grpc_librarys_own_lines_a_site_causes_are_rate_limited(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A roster site's compressed messages refused past the size limit each made gRPC's
    Python library log "ExecuteBatchError raised in core by servicer method" at error, as
    often as the site liked (153 lines in one tester's run): its lines share one budget."""
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    budget = logs.PeerLineBudget()

    def record(name: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1,
                                 "ExecuteBatchError raised in core by servicer method "
                                 "[/secagg.v1.Aggregation/PutChunks]", None, None)

    passed = sum(budget.filter(record("grpc._cython.cygrpc")) for _ in range(2000))
    assert passed <= logs.PEER_LINES_BURST
    # another of the library's messages (a servicer's own exception: a fault of ours) has
    # a budget of its own, not the flood's
    fault = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1,
                              "Unexpected [%s] raised by servicer method [%s]",
                              ("ValueError", "/secagg.v1.Aggregation/Submit"), None)
    assert budget.filter(fault)
    assert all(budget.filter(record("asyncio")) for _ in range(100))  # not gRPC's
    assert all(budget.filter(record("grpcio_other")) for _ in range(100))
    clock[0] += 1.0
    assert budget.filter(record("grpc"))

def test_a_flood_of_core_errors_does_not_hide_refused_handshakes(
        lines: tuple[logs.NativeLines, list[dict[str, Any]]]) -> None:
    """A site can make the core log errors at will (a bad grpc-timeout header), and the
    core's lines name no peer: with one budget, that flood left outsiders' refused
    handshakes as a dropped count. Refused handshakes have their own."""
    native, out = lines
    for _ in range(1000):
        native.feed("E1203 17:00:00.000000   1 hpack_parser.cc:1] Error parsing 'grpc-timeout' "
                    "metadata: invalid value")
    native.feed(HANDSHAKE.format("PEER_DID_NOT_RETURN_A_CERTIFICATE"))
    assert [e for e in out if e["event"] == "tls_refused"]


def test_what_one_budget_dropped_is_said_with_a_line_of_the_other(
        lines: tuple[logs.NativeLines, list[dict[str, Any]]]) -> None:
    """After a flood of core errors, only refused handshakes followed: the count of the
    dropped core errors was never said."""
    native, out = lines
    for _ in range(1000):
        native.feed("E1203 17:00:00.000000   1 hpack_parser.cc:1] Error parsing 'grpc-timeout' "
                    "metadata: invalid value")
    native.feed(HANDSHAKE.format("PEER_DID_NOT_RETURN_A_CERTIFICATE"))
    summary = [e for e in out if e["event"] == "grpc_core_dropped"]
    assert summary and summary[0]["reason"] == "grpc_core" and summary[0]["count"] >= 800


def _refusals_from(sites: range) -> logs.PeerLineBudget:
    """A fresh budget filter that has seen one refusal from each of ``sites``."""
    budget = logs.PeerLineBudget()
    for site in sites:
        r = logging.LogRecord("secagg.aggregator", logging.WARNING, __file__, 1, "refused",
                              None, None)
        r.__dict__.update(event="identity_refused", site_id=site)
        budget.filter(r)
    return budget


def test_the_per_site_budgets_a_peer_makes_are_bounded_oldest_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each (event, site) seen gets a budget; refusals naming ever new site ids (a peer
    cannot choose its certificate's site, but refused calls name what they claim) must not
    grow the log filter's memory without bound: the oldest is forgotten first."""
    monkeypatch.setattr(logs, "PEER_BUDGETS", 8)
    budget = _refusals_from(range(100))
    assert len(budget.budgets) == 8
    assert ("identity_refused", 99) in budget.budgets
    assert ("identity_refused", 0) not in budget.budgets


def test_the_per_site_budgets_are_bounded_at_their_default_too() -> None:
    """(The test above sets the bound: this one holds the default to a few thousand.)"""
    budget = _refusals_from(range(5000))
    assert len(budget.budgets) <= 4096


def test_metrics_without_a_host_listen_on_loopback_only() -> None:
    """`--metrics :PORT` is the local host, never every interface: the port is for a
    monitoring agent, not for the network the sites reach."""
    server, _port = metrics.serve_metrics(metrics.NoMetrics(), ":0")
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()



def test_metrics_on_every_interface_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """`--metrics 0.0.0.0:PORT` served plain-HTTP metrics to every network the host is on
    without a word; it is allowed (a monitoring network may need it) and logged."""
    import logging

    for listen, warned in (("0.0.0.0:0", True), ("127.0.0.1:0", False), (":0", False),
                           ("0:0", True), ("[::0]:0", True), ("[::1]:0", False),
                           ("[::ffff:0.0.0.0]:0", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="secagg.aggregator"):
            server, port = metrics.serve_metrics(metrics.NoMetrics(), listen)
        server.shutdown()
        events = [r for r in caplog.records
                  if getattr(r, "event", None) == "metrics_on_every_interface"]
        assert len(events) == warned, listen
        if warned:
            assert f"127.0.0.1:{port}" in events[0].getMessage()


def test_a_grpc_library_flood_is_budgeted_by_its_message_not_its_text(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC's library lines share a budget by their format string: a flood of one of its
    messages whose arguments differ line to line (the method a site names, the error's
    class) is one flood, not a fresh budget for each text."""
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    budget = logs.PeerLineBudget()
    passed = sum(budget.filter(logging.LogRecord(
        "grpc._cython.cygrpc", logging.ERROR, __file__, 1,
        "Unexpected [%s] raised by servicer method [%s]",
        (f"Error{i}", f"/secagg.v1.Aggregation/Method{i}"), None)) for i in range(2000))
    assert passed <= logs.PEER_LINES_BURST


def test_core_errors_are_logged_as_errors_and_its_warnings_as_warnings(
        lines: tuple[logs.NativeLines, list[dict[str, Any]]]) -> None:
    """An operator alerts on level "error": the core's E and F lines are errors, its W lines
    warnings (all of them at warning, a core failure raised no alert)."""
    native, out = lines
    native.feed("E1203 17:00:00.000000   1 hpack_parser.cc:1] Error parsing metadata")
    native.feed("F1203 17:00:00.000000   1 tcp_server.cc:1] fatal: cannot bind")
    native.feed("W1203 17:00:00.000000   1 chttp2_transport.cc:1] keepalive watchdog")
    assert [(e["level"], e["reason"]) for e in out] == [
        ("error", "hpack_parser.cc"), ("error", "tcp_server.cc"),
        ("warning", "chttp2_transport.cc")]


def test_a_sites_flood_keeps_its_spent_budget_while_other_sites_come_and_go(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The budgets are forgotten least recently used first: forgotten in the order they were
    made, a site flooding all along lost its spent budget once PEER_BUDGETS other sites had
    been refused since its first line, and its flood got a new burst each time."""
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(logs, "PEER_BUDGETS", 8)
    budget = logs.PeerLineBudget()

    def record(site: int) -> logging.LogRecord:
        r = logging.LogRecord("secagg.aggregator", logging.WARNING, __file__, 1, "refused",
                              None, None)
        r.__dict__.update(event="identity_refused", site_id=site)
        return r

    assert sum(budget.filter(record(99)) for _ in range(100)) <= logs.PEER_LINES_BURST
    for other in range(1, 40):
        assert budget.filter(record(other))  # a site refused once: logged
        assert not budget.filter(record(99))  # the flood goes on: still held back


def test_a_log_lines_time_is_utc_whatever_the_hosts_time_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The time ends in Z: it is UTC, not the host's local time marked as UTC (an aggregator
    in another zone logged times hours off, and its lines sorted out of order with others)."""
    import time as time_module

    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time_module.tzset()
    try:
        record = logging.LogRecord("secagg.aggregator", logging.INFO, __file__, 1, "x", None,
                                   None)
        record.created, record.msecs = 86_400.25, 250.0
        line = json.loads(logs.JsonFormatter().format(record))
    finally:
        monkeypatch.undo()
        time_module.tzset()
    assert line["time"] == "1970-01-02T00:00:00.250Z"


def test_the_operators_log_level_is_taken() -> None:
    """`serve --log-level warning`: our info lines (one per stage and site) are left out."""
    err = _run_logged("""
        import logging
        from aggregator import logs
        logs.configure("warning")
        log = logging.getLogger("secagg.aggregator")
        log.info("INFO-LINE", extra={"event": "stage_closed"})
        log.warning("WARNING-LINE", extra={"event": "store_slow"})
        """)
    messages = [json.loads(line)["message"] for line in err]
    assert messages == ["WARNING-LINE"]


def test_the_core_is_asked_for_the_lines_that_name_refused_handshakes() -> None:
    """gRPC core logs a refused handshake at INFO; at its default verbosity (ERROR) none
    reached the log, and secagg_tls_refused_total stayed 0 whoever knocked."""
    _run_logged("""
        import os
        os.environ.pop("GRPC_VERBOSITY", None)
        from aggregator import logs
        logs.configure()
        logs.capture_native_stderr()
        assert os.environ.get("GRPC_VERBOSITY") == "INFO", os.environ.get("GRPC_VERBOSITY")
        """)


def _sample(m: metrics.Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_the_metrics_count_every_dropout_and_an_aborted_round_ends_its_stage() -> None:
    """Three sites missing when a stage closed are three dropouts, not one; a round that
    aborts leaves no stage running; after a restart the replayed round's place is said."""
    m = metrics.Metrics()
    m.round_opened("masking", 1, 1)
    m.stage_closed("masking", 2, 3, 0.5, 3)
    assert _sample(m, "secagg_dropouts_total", protocol="masking", stage="2") == 3
    assert _sample(m, "secagg_current_stage") == 3
    m.round_finished("masking", "TOO_FEW_SURVIVORS")
    assert _sample(m, "secagg_rounds_aborted_total", protocol="masking",
                   reason="TOO_FEW_SURVIVORS") == 1
    assert _sample(m, "secagg_current_stage") == 0
    restarted = metrics.Metrics()
    restarted.round_recovered(4, 3, 5)
    assert _sample(restarted, "secagg_current_round") == 4
    assert _sample(restarted, "secagg_current_stage") == 3
    assert _sample(restarted, "secagg_round_sites", stage="3") == 5


def test_store_latency_is_labelled_by_a_fixed_set_of_operations(tmp_path: Any) -> None:
    """The label is the statement's verb among select, insert, update, delete, else "other":
    never the statement's own first word (PRAGMA, CREATE, WITH, ...), a label set without
    bound."""
    import sqlalchemy as sa

    m = metrics.Metrics()
    engine = sa.create_engine(f"sqlite:///{tmp_path}/store.db")
    m.watch_engine(engine)
    try:
        with engine.begin() as c:
            c.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            c.exec_driver_sql("INSERT INTO t VALUES (1)")
            c.exec_driver_sql("PRAGMA user_version")
            c.exec_driver_sql("  SELECT x FROM t")
    finally:
        engine.dispose()
    labels = {s.labels["operation"] for family in m.registry.collect()
              if family.name == "secagg_store_latency_seconds"
              for s in family.samples if "operation" in s.labels}
    assert labels == {"insert", "select", "other"}
