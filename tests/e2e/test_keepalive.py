"""A site's connection through a middlebox that drops idle connections silently (a NAT or
firewall that forgets the mapping while the site trains): the SDK's channel pings after a
long idle and redials. The channel and server
here take the SDK's and the aggregator's own keepalive options (insecure: TLS plays no part
in keepalive), through a relay the test can make forget its connections."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aggregator.service import SERVER_KEEPALIVE_OPTIONS
from clients import transport


class _Relay:
    """Forwards connections to ``port``; ``forget()`` makes it drop the ones it holds
    silently (no RST, no FIN), as a NAT that forgot them; new connections still pass."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.links: list[dict[str, bool]] = []
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, link: dict[str, bool]) -> None:
        try:
            while data := a.recv(65536):
                if not link["dead"]:
                    b.sendall(data)
        except OSError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            link = {"dead": False}
            with self.lock:
                self.links.append(link)
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b, link), daemon=True).start()

    def forget(self) -> None:
        with self.lock:
            for link in self.links:
                link["dead"] = True

    def connections(self) -> int:
        with self.lock:
            return len(self.links)


@pytest.fixture
def relay() -> Iterator[_Relay]:
    server = grpc.server(futures.ThreadPoolExecutor(2), options=SERVER_KEEPALIVE_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    r = _Relay(port)
    try:
        yield r
    finally:
        r.listener.close()
        with r.lock:
            for sock in r.sockets:
                sock.close()
        server.stop(grace=None)


def _check(channel: Any, timeout: float) -> None:
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)


@pytest.mark.slow  # (minutes: the SDK's own period, idle twice over, then its 60 s timeout)
def test_a_connection_dropped_while_the_site_trains_is_redialled(
        relay: _Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without keepalive every call on the dead connection ended DEADLINE_EXCEEDED, call
    after call (the relay, like a NAT, keeps the socket open), so the site's retries ran out
    and its round was lost. With it, a ping unanswered within its timeout closes the dead
    connection and a retry goes out on a new one. (Python's blocking channel pings only
    while a call waits: calls are made as a site's retries make them.)"""
    channel = grpc.insecure_channel(relay.address, options=transport.keepalive_options())
    try:
        _check(channel, 5)
        relay.forget()  # the site trains; the middlebox forgets the connection
        time.sleep(transport.KEEPALIVE_SECONDS * 2)  # longer than the ping's period
        # the site calls again: the channel pings (the link idle for longer than the period),
        # no answer comes, and the connection is closed; a retry goes out on a new one
        began = time.monotonic()
        codes = []
        while True:
            try:
                _check(channel, 10)
                break
            except grpc.RpcError as e:
                codes.append(e.code())
            assert time.monotonic() - began < 240, f"the dead connection was kept: {codes}"
        assert relay.connections() >= 2  # (the call that passed went on a new connection)
    finally:
        channel.close()


def test_the_sites_channel_is_made_with_keepalive(tmp_path: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from secagg.federation.kit import SiteKit
    from tests.service_kit import make_federation

    made: list[dict[str, Any]] = []
    real = grpc.secure_channel

    def capture(target: str, credentials: Any, options: Any = None, **kwargs: Any) -> Any:
        made.append(dict(options or []))
        return real(target, credentials, options=options, **kwargs)

    monkeypatch.setattr(grpc, "secure_channel", capture)
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    transport.Connection(SiteKit.load(fed.site_dir(1)), retry_seconds=1).close()
    assert len(made) == 1
    assert made[0]["grpc.keepalive_time_ms"] == transport.KEEPALIVE_SECONDS * 1000
    assert made[0]["grpc.keepalive_timeout_ms"] == transport.KEEPALIVE_TIMEOUT_SECONDS * 1000
