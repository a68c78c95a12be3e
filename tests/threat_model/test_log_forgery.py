"""Adversary: whoever can reach the aggregator's ports, writing into the operator's log.

The log is what an operator trusts in an incident: a peer must not be able to forge an entry
of the aggregator's or of gRPC core's (an outsider's TLS SNI name is logged by the core, a
newline in it included), move a counter the dashboards read, flood it, or turn it into raw
tracebacks (one bad request to the metrics port, one refused upload stream). One real
aggregator process; each check reads its whole log: JSON lines only.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from aggregator import logs
from secagg.federation.kit import SiteKit
from secagg.v1 import masking_pb2, service_pb2, service_pb2_grpc
from tests.service_kit import Aggregator, Federation, make_federation, start_aggregator

FORGED_SNI = ("x\nE1203 16:40:00.000000    4242 store.cc:1] STORE CORRUPT. Restore it. secagg "
              "aggregator restore --backup /tmp/evil.db\nI1203 16:40:00.000000    4242 ssl.cc:1] "
              "Handshake failed. OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, Aggregator]]:
    tmp = tmp_path_factory.mktemp("log-forgery")
    fed = make_federation(tmp, 3, "masking", rounds=1, open_s=300.0)
    agg = start_aggregator(fed, tmp)
    agg.wait_for(lambda e: e.get("event") == "round_opened")
    yield fed, agg
    agg.stop()


def _metrics(agg: Aggregator, accept: str | None = None) -> tuple[int, str]:
    agg.wait_for(lambda e: e.get("event") == "metrics_listening")
    event = next(e for e in agg.read() if e.get("event") == "metrics_listening")
    port = int(event["peer"].rsplit(" -> ", 1)[1])
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 (http, loopback)
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _only_json(agg: Aggregator) -> list[dict[str, Any]]:
    entries = agg.read()
    raw = [e["raw"] for e in entries if "raw" in e]
    assert not raw, raw[:20]
    assert not [e for e in entries if "never retrieved" in e.get("message", "")]
    return entries


def _stub(fed: Federation, site: int) -> Any:
    kit = SiteKit.load(fed.site_dir(site))
    creds = grpc.ssl_channel_credentials(root_certificates=kit.ca_pem,
                                         private_key=kit.key_pem, certificate_chain=kit.cert_pem)
    channel = grpc.secure_channel(f"localhost:{fed.port}", creds)
    return service_pb2_grpc.AggregationStub(channel)  # type: ignore[no-untyped-call]


def test_an_outsiders_sni_name_forges_no_log_entry_and_no_refusal_count(
        served: tuple[Federation, Aggregator]) -> None:
    fed, agg = served
    before = len([e for e in agg.read() if e.get("event") == "tls_refused"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    for _ in range(5):  # no certificate: each handshake is refused, once
        with (socket.create_connection(("localhost", fed.port), timeout=10) as s,
              contextlib.suppress(ssl.SSLError, OSError)):
            context.wrap_socket(s, server_hostname=FORGED_SNI).close()
    agg.wait_for(lambda e: e.get("event") == "tls_refused", count=before + 5)
    time.sleep(0.5)
    entries = _only_json(agg)
    assert not [e for e in entries if e.get("reason") in ("store.cc", "ssl.cc")
                or e.get("message", "").startswith("STORE CORRUPT")]
    refused = [e["reason"] for e in entries if e.get("event") == "tls_refused"][before:]
    assert refused == ["PEER_DID_NOT_RETURN_A_CERTIFICATE"] * 5
    status, text = _metrics(agg)
    assert status == 200
    assert 'reason="SSLV3_ALERT_CERTIFICATE_EXPIRED"' not in text


def test_a_bad_request_to_the_metrics_port_is_a_400_and_no_traceback(
        served: tuple[Federation, Aggregator]) -> None:
    _, agg = served
    for accept in ("text/plain; version=abc", "application/openmetrics-text; version=x"):
        status, _ = _metrics(agg, accept)
        assert status == 400
    assert _metrics(agg)[0] == 200  # and the scraper is still served
    time.sleep(0.3)
    _only_json(agg)


def test_refused_upload_streams_leave_no_traceback_in_the_log(
        served: tuple[Federation, Aggregator]) -> None:
    """A chunk whose bytes do not hash to its id, then an empty chunk: the stream is refused
    while the first chunk is still being hashed; its outcome must still be read."""
    fed, agg = served
    stub = _stub(fed, 1)
    bad = service_pb2.Chunk(chunk_id=hashlib.sha256(b"other").digest(), data=b"x" * 65536)
    empty = service_pb2.Chunk(chunk_id=bytes(32), data=b"")
    for _ in range(30):
        with pytest.raises(grpc.RpcError) as caught:
            stub.PutChunks(iter([bad, empty]), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(1.0)
    _only_json(agg)


def test_a_flood_of_refusals_from_one_site_is_rate_limited_in_the_log(
        served: tuple[Federation, Aggregator]) -> None:
    """Site 2 sending as site 3, 300 times: a burst of lines, then one a second; the line
    after the flood says how many were dropped."""
    fed, agg = served
    stub = _stub(fed, 2)
    info = stub.GetRound(service_pb2.GetRoundRequest(after_round=0, wait_ms=0), timeout=10)
    as_three = service_pb2.SubmitRequest(round_id=info.round_id,
                                         advertise_keys=masking_pb2.AdvertiseKeys(site_id=3))

    def refused_lines() -> list[dict[str, Any]]:
        return [e for e in _only_json(agg)
                if e.get("event") == "identity_refused" and e.get("site_id") == 2]

    started = time.monotonic()
    for _ in range(300):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Submit(as_three, timeout=10)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    took = time.monotonic() - started
    time.sleep(0.5)
    flood = len(refused_lines())
    assert flood <= logs.PEER_LINES_BURST + took + 2, (flood, took)  # a burst, then 1/s
    time.sleep(1.5)
    with pytest.raises(grpc.RpcError):
        stub.Submit(as_three, timeout=10)
    time.sleep(0.5)
    lines = refused_lines()
    assert "dropped" in lines[-1]
    # every refusal is either a line or counted in the next line's "dropped"
    assert len(lines) + sum(e.get("dropped", 0) for e in lines) == 301
