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
    native.budget.stamp -= 1.0  # a second later
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
        assert threading.active_count() - before <= metrics.METRICS_CONNECTIONS_PER_HOST + 1
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
