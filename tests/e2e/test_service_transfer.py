"""Bulk transfer over the real service: a site whose connection is cut mid-upload resumes by
sending only the missing chunks; an idle upload stream is cut; payloads arrive intact."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from clients.errors import AggregatorRefused
from clients.transport import CHUNK_BYTES, Connection
from secagg.federation.kit import SiteKit
from secagg.v1 import service_pb2, service_pb2_grpc
from tests.service_kit import make_federation, start_aggregator
from tests.tcp_proxy import Proxy


def _site_connection(fed_dir: Path, site: int, port: int) -> Connection:
    kit = SiteKit.load(fed_dir / "sites" / f"site-{site}")
    kit = dataclasses.replace(kit, config=dataclasses.replace(
        kit.config, aggregator=f"localhost:{port}"))
    return Connection(kit, retry_seconds=60, call_timeout=20)


def test_upload_cut_mid_way_resumes_with_only_the_missing_chunks(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, 3, "masking", rounds=1, open_s=60.0)
    agg = start_aggregator(fed, tmp_path)
    cut_after = int(3.5 * CHUNK_BYTES)  # the connection is lost mid-upload, once
    proxy = Proxy(fed.port, cut_every=(cut_after, cut_after), max_cuts=1)
    connection = _site_connection(fed.directory, 1, proxy.port)
    sent: list[bytes] = []
    original = connection.stub.PutChunks

    def counting(chunks, **kwargs):  # type: ignore[no-untyped-def]
        def spy():  # type: ignore[no-untyped-def]
            for c in chunks:
                sent.append(bytes(c.chunk_id))
                yield c
        return original(spy(), **kwargs)

    connection.stub.PutChunks = counting
    progress: list[tuple[str, int, int]] = []
    data = os.urandom(8 * CHUNK_BYTES + 12345)  # 9 chunks
    try:
        blob = connection.upload(data, progress=lambda *a: progress.append(a))
        assert proxy.cuts == 1, "the connection was never cut"
        # the retry started from what the aggregator already held
        starts = [done for what, done, total in progress if what == "upload"]
        # within an attempt the count only grows; a retry starts again from what the
        # aggregator holds, at or below where the cut attempt had got to
        restart = next((i for i in range(1, len(starts)) if starts[i] <= starts[i - 1]), None)
        assert restart is not None, (starts, len(sent), proxy.cuts)
        assert 0 < starts[restart] < 9
        assert len(sent) < 9 + 9, "the whole payload was sent again"
        assert len(set(sent)) == 9
        missing = connection.stub.MissingChunks(service_pb2.ChunkIds(
            chunk_ids=list(blob.chunk_ids)), timeout=10)
        assert not missing.chunk_ids
    finally:
        connection.close()
        agg.stop()
    with sqlite3.connect(tmp_path / "aggregator.db") as db:
        stored = {bytes(k): bytes(v) for k, v in db.execute("SELECT chunk_id, data FROM chunks")}
    assert b"".join(stored[c] for c in blob.chunk_ids) == data


def test_idle_upload_stream_is_cut_after_the_inactivity_timeout(tmp_path: Path) -> None:
    from secagg.federation.config import Limits

    fed = make_federation(tmp_path, 3, "masking", rounds=1, open_s=60.0,
                          limits=Limits(stream_idle_seconds=1.0))
    agg = start_aggregator(fed, tmp_path)
    kit = SiteKit.load(fed.site_dir(1))
    channel = grpc.secure_channel(f"localhost:{fed.port}", grpc.ssl_channel_credentials(
        kit.ca_pem, kit.key_pem, kit.cert_pem))
    stub = service_pb2_grpc.AggregationStub(channel)  # type: ignore[no-untyped-call]

    def slow():  # type: ignore[no-untyped-def]
        data = b"x" * 1000
        yield service_pb2.Chunk(chunk_id=hashlib.sha256(data).digest(), data=data)
        time.sleep(4)  # one byte a second would do the same: the stream is idle
        yield service_pb2.Chunk(chunk_id=hashlib.sha256(b"y").digest(), data=b"y")

    try:
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.PutChunks(slow(), timeout=20)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - began < 4  # cut by the aggregator, not by the site
    finally:
        channel.close()
        agg.stop()


def test_refused_download_of_another_sites_payload_names_its_code(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, 3, "masking", rounds=1, open_s=60.0)
    agg = start_aggregator(fed, tmp_path)
    one = _site_connection(fed.directory, 1, fed.port)
    two = _site_connection(fed.directory, 2, fed.port)
    try:
        blob = one.upload(os.urandom(1000))
        with pytest.raises(AggregatorRefused) as caught:
            two.download(blob, max_size=1000)
        assert caught.value.code == "PERMISSION_DENIED"
    finally:
        one.close()
        two.close()
        agg.stop()


def test_a_site_of_another_federation_is_told_at_once_not_after_minutes(tmp_path: Path) -> None:
    """A site whose CA is not the aggregator's (the wrong aggregator address, another
    federation's directory) got "the aggregator stayed unavailable" after retry_seconds;
    a certificate failure is now a refusal at once."""
    import time

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fed = make_federation(tmp_path / "a", 3, "masking", rounds=1, open_s=60.0)
    other = make_federation(tmp_path / "b", 3, "masking", rounds=1, open_s=60.0)
    agg = start_aggregator(fed, tmp_path)
    conn = _site_connection(other.directory, 1, fed.port)
    conn.retry_seconds = 15
    try:
        began = time.monotonic()
        with pytest.raises(AggregatorRefused) as caught:
            conn.call("GetRound", service_pb2.GetRoundRequest(after_round=0, wait_ms=0))
        assert caught.value.code == "UNAUTHENTICATED"
        assert time.monotonic() - began < 10  # (retry_seconds is 15)
    finally:
        conn.close()
        agg.stop()


def test_a_reply_over_the_message_limit_is_refused_by_the_site(tmp_path: Path) -> None:
    """A lying aggregator answers GetRound with a 9 MiB message (the federation's limit is
    8 MiB): the site's channel refuses it (RESOURCE_EXHAUSTED) rather than taking in
    whatever size the aggregator sends."""
    from concurrent import futures

    from aggregator.service import load_server_files

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    files = load_server_files(fed.aggregator_config)

    class Huge(service_pb2_grpc.AggregationServicer):
        def GetRound(self, request: object, context: object) -> service_pb2.RoundInfo:
            return service_pb2.RoundInfo(round=1, result_signature=b"\0" * (9 << 20))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[
        ("grpc.max_send_message_length", 16 << 20)])
    service_pb2_grpc.add_AggregationServicer_to_server(Huge(), server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(files.server_key, files.server_cert)], root_certificates=files.ca_cert,
        require_client_auth=True))
    server.start()
    conn = _site_connection(fed.directory, 1, port)
    try:
        with pytest.raises(AggregatorRefused) as caught:
            conn.call("GetRound", service_pb2.GetRoundRequest(after_round=0, wait_ms=0))
        assert caught.value.code == "RESOURCE_EXHAUSTED"
    finally:
        conn.close()
        server.stop(grace=None)
