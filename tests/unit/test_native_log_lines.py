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
