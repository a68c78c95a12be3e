"""The gRPC health service reports the real state: NOT_SERVING while the aggregator recovers
its job from the store and while the store does not answer; SERVING otherwise. (The
aggregator runs in this process here, on a store whose answers the test controls.)"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.service import serve
from aggregator.store import Store, StoreError
from secagg.federation.kit import SiteKit
from secagg.v1 import service_pb2, service_pb2_grpc
from tests.service_kit import make_federation


class ControlledStore(Store):
    gate = threading.Event()
    down = threading.Event()

    def rounds(self):  # type: ignore[no-untyped-def]
        assert self.gate.wait(timeout=30)  # recovery waits until the test lets it go on
        return super().rounds()

    def ping(self, timeout: float = 1.0) -> None:
        if self.down.is_set():
            raise StoreError("store unreachable: simulated")
        super().ping(timeout)


def test_health_is_not_serving_while_recovering_or_while_the_store_is_down(
        tmp_path: Path) -> None:
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ports: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(fed.aggregator_config, store=str(tmp_path / "a.db"),
                                      ready=ports.append, stop_event=stop,
                                      store_factory=ControlledStore))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while not ports:
            time.sleep(0.02)
        kit = SiteKit.load(fed.site_dir(1))
        channel = grpc.secure_channel(f"localhost:{ports[0]}", grpc.ssl_channel_credentials(
            kit.ca_pem, kit.key_pem, kit.cert_pem))
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            reply = health.Check(health_pb2.HealthCheckRequest(service="secagg.v1.Aggregation"),
                                 timeout=5)
            return int(reply.status)

        def eventually(expected: int) -> None:
            end = time.monotonic() + 10
            while status() != expected:
                assert time.monotonic() < end, f"health stayed {status()}, not {expected}"
                time.sleep(0.1)

        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        serving = health_pb2.HealthCheckResponse.SERVING
        assert status() == not_serving  # recovering: the job is not loaded yet
        # and every call says UNAVAILABLE (which sites retry), not an internal error
        stub = service_pb2_grpc.AggregationStub(channel)  # type: ignore[no-untyped-call]
        for method, request in (("GetRound", service_pb2.GetRoundRequest()),
                                ("Submit", service_pb2.SubmitRequest(
                                    round_id="r", masked_input=service_pb2.MaskedInputRef())),
                                ("Receive", service_pb2.ReceiveRequest()),
                                ("MissingChunks", service_pb2.ChunkIds()),
                                ("GetChunks", service_pb2.ChunkIds(chunk_ids=[b"\0" * 32]))):
            with pytest.raises(grpc.RpcError) as caught:
                reply = getattr(stub, method)(request, timeout=5)
                if method == "GetChunks":
                    list(reply)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, method
        ControlledStore.gate.set()
        eventually(serving)
        ControlledStore.down.set()
        eventually(not_serving)
        # while the store is down the job does not answer from memory (what it holds may be
        # ahead of what was committed): UNAVAILABLE, which sites retry
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetRound(service_pb2.GetRoundRequest(after_round=0, wait_ms=0), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        ControlledStore.down.clear()
        eventually(serving)
        channel.close()
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)


def test_an_aggregator_waits_for_its_database_and_says_when_it_stops_answering(
        tmp_path: Path, postgres_url: str) -> None:
    """A real PostgreSQL behind a TCP proxy. Started while the database refuses connections
    (down, rebooting), the aggregator waits NOT_SERVING (it exited, status 2) and serves once
    the database is back. Then the network freezes (connections open, nothing answers): health
    says NOT_SERVING within seconds (the ping ran on the job's thread, queued behind the hung
    store call, and health said SERVING for as long as the store hung); thawed, it serves."""
    import sqlalchemy as sa

    from tests.tcp_proxy import Proxy

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    real = sa.engine.make_url(postgres_url)
    proxy = Proxy(real.port or 5432)
    proxy.refusing = True
    url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ports: list[int] = []
    exit_status: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        exit_status.append(loop.run_until_complete(serve(
            fed.aggregator_config, store=url, ready=ports.append, stop_event=stop)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while not ports:
            time.sleep(0.02)
        kit = SiteKit.load(fed.site_dir(1))
        channel = grpc.secure_channel(f"localhost:{ports[0]}", grpc.ssl_channel_credentials(
            kit.ca_pem, kit.key_pem, kit.cert_pem))
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return int(health.Check(health_pb2.HealthCheckRequest(
                service="secagg.v1.Aggregation"), timeout=5).status)

        def eventually(expected: int, within: float) -> None:
            end = time.monotonic() + within
            while status() != expected:
                assert time.monotonic() < end, f"health stayed {status()}, not {expected}"
                time.sleep(0.1)

        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        serving = health_pb2.HealthCheckResponse.SERVING
        time.sleep(3.0)
        assert thread.is_alive() and not exit_status, "the aggregator exited: no database"
        assert status() == not_serving
        proxy.refusing = False
        eventually(serving, within=20)
        proxy.frozen = True
        eventually(not_serving, within=12)
        proxy.frozen = False
        eventually(serving, within=20)
        channel.close()
    finally:
        proxy.frozen = proxy.refusing = False
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=60)
        proxy.close()
    assert exit_status == [0]
