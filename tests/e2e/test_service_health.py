"""The gRPC health service reports the real state: NOT_SERVING while the aggregator recovers
its job from the store and while the store does not answer; SERVING otherwise. (The
aggregator runs in this process here, on a store whose answers the test controls.)"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

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

    def ping(self, timeout: float = 1.0, *, write: bool = False) -> None:
        if self.down.is_set():
            raise StoreError("store unreachable: simulated")
        super().ping(timeout, write=write)


class _MetricsPort(logging.Handler):
    """Takes the metrics port from the aggregator's metrics_listening log line."""

    def __init__(self) -> None:
        super().__init__()
        self.port: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "metrics_listening":
            self.port = int(str(record.__dict__["peer"]).rsplit(" -> ", 1)[1])


def _probe(port: int, path: str) -> int:
    """The HTTP status the metrics port answers a probe with (no client certificate)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_health_is_not_serving_while_recovering_or_while_the_store_is_down(
        tmp_path: Path) -> None:
    """Also on the metrics port, for probes with no client certificate: /readyz is 503
    while NOT_SERVING and 200 while SERVING (secagg_serving 0 and 1), /livez always 200."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ports: list[int] = []
    metrics = _MetricsPort()
    logger = logging.getLogger("secagg.aggregator")
    level = logger.level
    logger.setLevel(logging.INFO)  # (the metrics_listening line is info)
    logger.addHandler(metrics)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(fed.aggregator_config, store=str(tmp_path / "a.db"),
                                      ready=ports.append, stop_event=stop,
                                      store_factory=ControlledStore,
                                      metrics_listen="127.0.0.1:0"))

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
            assert metrics.port is not None
            assert _probe(metrics.port, "/readyz") == (200 if expected == serving else 503)
            assert _probe(metrics.port, "/livez") == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics",
                                        timeout=5) as r:
                assert f"secagg_serving {1.0 if expected == serving else 0.0}" in (
                    r.read().decode().splitlines())

        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        serving = health_pb2.HealthCheckResponse.SERVING
        assert status() == not_serving  # recovering: the job is not loaded yet
        assert metrics.port is not None and _probe(metrics.port, "/readyz") == 503
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
        logger.removeHandler(metrics)
        logger.setLevel(level)
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)


class _Running:
    """The aggregator in this process, in a thread, with a health stub and a site stub."""

    def __init__(self, fed: Any, store: str, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.exit_status: list[int] = []
        ports: list[int] = []

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.exit_status.append(self.loop.run_until_complete(serve(
                fed.aggregator_config, store=store, ready=ports.append, stop_event=self.stop,
                **kwargs)))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        while not ports:
            time.sleep(0.02)
        kit = SiteKit.load(fed.site_dir(1))
        self.channel = grpc.secure_channel(f"localhost:{ports[0]}", grpc.ssl_channel_credentials(
            kit.ca_pem, kit.key_pem, kit.cert_pem))
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.stub = service_pb2_grpc.AggregationStub(self.channel)  # type: ignore[no-untyped-call]

    def status(self) -> int:
        return int(self.health.Check(health_pb2.HealthCheckRequest(
            service="secagg.v1.Aggregation"), timeout=5).status)

    def eventually(self, expected: int, within: float) -> None:
        end = time.monotonic() + within
        while self.status() != expected:
            assert time.monotonic() < end, f"health stayed {self.status()}, not {expected}"
            time.sleep(0.1)

    def holds(self, expected: int, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert self.status() == expected, "health flapped"
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=60)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
    agg = _Running(fed, url)
    try:
        time.sleep(3.0)
        assert agg.thread.is_alive() and not agg.exit_status, "exited: no database"
        assert agg.status() == NOT_SERVING
        proxy.refusing = False
        agg.eventually(SERVING, within=20)
        proxy.frozen = True
        agg.eventually(NOT_SERVING, within=12)
        proxy.frozen = False
        agg.eventually(SERVING, within=20)
    finally:
        proxy.frozen = proxy.refusing = False
        agg.close()
        proxy.close()
    assert agg.exit_status == [0]


class ReadOnlyStore(Store):
    """A SQLite store that turns read-only (as on a full disk or a remounted filesystem)
    while ``read_only`` is set: every write fails, every read answers."""

    read_only = threading.Event()

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        import sqlalchemy as sa

        def checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            on = 1 if self.read_only.is_set() else 0
            dbapi_connection.execute(f"PRAGMA query_only = {on}")

        for engine in (self.engine, self.bulk):
            sa.event.listen(engine, "checkout", checkout)


def test_a_store_that_refuses_writes_keeps_health_not_serving(tmp_path: Path) -> None:
    """The store answers reads and refuses writes: the job's first failed write makes the
    aggregator NOT_SERVING, and it stays so (it flapped back to SERVING every second, as the
    read ping answered) until a write commits again."""
    import hashlib

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = _Running(fed, str(tmp_path / "a.db"), store_factory=ReadOnlyStore)
    try:
        agg.eventually(SERVING, within=20)
        ReadOnlyStore.read_only.set()
        data = b"a chunk the store cannot take"
        with pytest.raises(grpc.RpcError) as caught:
            agg.stub.PutChunks(iter([service_pb2.Chunk(chunk_id=hashlib.sha256(data).digest(),
                                                       data=data)]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        agg.eventually(NOT_SERVING, within=5)
        agg.holds(NOT_SERVING, seconds=4)
        ReadOnlyStore.read_only.clear()
        agg.eventually(SERVING, within=10)
    finally:
        ReadOnlyStore.read_only.clear()
        agg.close()


def test_a_postgresql_that_turns_read_only_is_not_serving(tmp_path: Path,
                                                          postgres_url: str) -> None:
    """A failover leaves the aggregator on a hot standby, or an operator makes the database
    read-only: health says NOT_SERVING without waiting for a write to fail, and SERVING once
    the database takes writes again."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    read_only = _ReadOnlySwitch(postgres_url)
    agg = _Running(fed, postgres_url)
    try:
        agg.eventually(SERVING, within=20)
        read_only(True)
        agg.eventually(NOT_SERVING, within=10)
        read_only(False)
        agg.eventually(SERVING, within=15)
    finally:
        agg.close()
        read_only.close()


class _ReadOnlySwitch:
    """Makes a PostgreSQL database read-only, or writable again, for every session (as a
    failover to a hot standby does), ending the sessions that were open."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        from aggregator.store import normalize_url

        self.name = sa.engine.make_url(url).database
        self.admin = sa.create_engine(normalize_url(url), isolation_level="AUTOCOMMIT")

    def __call__(self, on: bool) -> None:
        with self.admin.connect() as c:
            c.exec_driver_sql("SET default_transaction_read_only = off")
            c.exec_driver_sql(f"ALTER DATABASE {self.name} SET default_transaction_read_only = "
                              f"{'on' if on else 'off'}")
            c.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                              "datname = current_database() AND pid <> pg_backend_pid()")

    def close(self) -> None:
        self.admin.dispose()


def test_an_aggregator_started_on_a_read_only_postgresql_waits_for_it(
        tmp_path: Path, postgres_url: str) -> None:
    """Started while its database is read-only (a failover under way), the aggregator's
    first writes fail with PostgreSQL's read-only error (an InternalError to the driver):
    it waits NOT_SERVING and serves once the database takes writes (it exited, status 2)."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    Store(postgres_url).close()  # the schema exists: the job's first writes are what fail
    read_only = _ReadOnlySwitch(postgres_url)
    read_only(True)
    agg = _Running(fed, postgres_url)
    try:
        time.sleep(2.0)
        assert agg.thread.is_alive() and not agg.exit_status, "serve ended"
        assert agg.status() == NOT_SERVING
        read_only(False)
        agg.eventually(SERVING, within=20)
    finally:
        read_only(False)
        agg.close()
        read_only.close()
    assert agg.exit_status == [0]


def test_sigterm_stops_the_aggregator_while_a_store_call_hangs(tmp_path: Path,
                                                               postgres_url: str) -> None:
    """The database accepts and never answers (a frozen network, a stuck pooler) while a
    site's chunks are being stored: SIGTERM still stops the aggregator, status 0, within
    seconds (it waited for the hung thread forever, and exited neither on SIGTERM nor at
    all)."""
    import hashlib
    import os

    import sqlalchemy as sa

    from tests.service_kit import Aggregator
    from tests.tcp_proxy import Proxy

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    real = sa.engine.make_url(postgres_url)
    proxy = Proxy(real.port or 5432)
    url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    agg = Aggregator(fed, url, tmp_path / "aggregator.log")
    agg.start()
    try:
        kit = SiteKit.load(fed.site_dir(1))
        channel = grpc.secure_channel(f"localhost:{fed.port}", grpc.ssl_channel_credentials(
            kit.ca_pem, kit.key_pem, kit.cert_pem))
        stub = service_pb2_grpc.AggregationStub(channel)  # type: ignore[no-untyped-call]
        proxy.frozen = True
        data = os.urandom(1000)
        call = stub.PutChunks.future(iter([service_pb2.Chunk(
            chunk_id=hashlib.sha256(data).digest(), data=data)]), timeout=60)
        time.sleep(2.0)  # the chunk is on its way to the frozen database
        assert not call.done()
        began = time.monotonic()
        assert agg.stop() == 0, agg.tail()
        assert time.monotonic() - began < 18
        assert any(e.get("event") == "shutdown_stuck" for e in agg.read()), agg.tail()
        channel.close()
    finally:
        proxy.frozen = False
        agg.stop()
        proxy.close()


def test_sigterm_stops_an_aggregator_waiting_for_a_silent_database(
        tmp_path: Path, postgres_url: str) -> None:
    """Started against a database that accepts connections and never answers, the aggregator
    waits (NOT_SERVING); SIGTERM stops it at once, not after the connection attempt's
    timeout (or never, for a call that hangs)."""
    import sqlalchemy as sa

    from tests.service_kit import Aggregator
    from tests.tcp_proxy import Proxy

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    real = sa.engine.make_url(postgres_url)
    proxy = Proxy(real.port or 5432)
    proxy.frozen = True
    url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    agg = Aggregator(fed, url, tmp_path / "aggregator.log")
    agg.start(wait=False)
    try:
        agg.wait_for(lambda e: e.get("event") == "listening")
        time.sleep(1.0)  # the first connection attempt is under way (it times out at 10 s)
        began = time.monotonic()
        status = agg.stop()
        took = time.monotonic() - began
        assert status == 0, agg.tail()
        events = [e.get("event") for e in agg.read()]
        # it stopped during the attempt, not after it (store_unreachable) or never
        assert "shutdown" in events and "store_unreachable" not in events, agg.tail()
        assert took < 9.0, took
    finally:
        proxy.frozen = False
        agg.stop()
        proxy.close()


class FlakyRecoveryStore(Store):
    """The database stops answering right after the store opened: the job's first reads
    fail (as psycopg's would on a connection reset) ``failures`` times, or hang while ``hang``
    is set."""

    failures = 0
    hang = threading.Event()
    release = threading.Event()

    def rounds(self):  # type: ignore[no-untyped-def]
        import sqlalchemy as sa

        if self.hang.is_set():
            self.release.wait(timeout=60)
        if FlakyRecoveryStore.failures > 0:
            FlakyRecoveryStore.failures -= 1
            raise sa.exc.OperationalError("SELECT ...", {}, ConnectionResetError("reset"))
        return super().rounds()


def test_a_database_that_stops_answering_during_recovery_is_waited_for(tmp_path: Path) -> None:
    """Between the store's opening and the job's first reads the database stops answering:
    the aggregator waits NOT_SERVING and serves once it answers (it raised the driver's error
    out of serve: a traceback, and an exit)."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    FlakyRecoveryStore.failures = 2
    agg = _Running(fed, str(tmp_path / "a.db"), store_factory=FlakyRecoveryStore)
    try:
        time.sleep(1.5)
        assert agg.thread.is_alive() and not agg.exit_status, "serve ended"
        assert agg.status() == NOT_SERVING
        agg.eventually(SERVING, within=15)
        assert FlakyRecoveryStore.failures == 0
        reply = agg.stub.GetRound(service_pb2.GetRoundRequest(after_round=0, wait_ms=0),
                                  timeout=5)
        assert reply.round == 1 and reply.round_id
    finally:
        agg.close()
    assert agg.exit_status == [0]


def test_sigterm_stops_an_aggregator_whose_recovery_hangs(tmp_path: Path) -> None:
    """The database stops answering during the job's first reads and the read hangs: the stop
    still ends serve, status 0, within seconds (the read ran on the event loop's thread or was
    awaited without the stop, and the aggregator did not stop)."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    FlakyRecoveryStore.failures = 0
    FlakyRecoveryStore.hang.set()
    try:
        agg = _Running(fed, str(tmp_path / "a.db"), store_factory=FlakyRecoveryStore)
        time.sleep(1.0)
        assert agg.thread.is_alive() and not agg.exit_status
        began = time.monotonic()
        agg.loop.call_soon_threadsafe(agg.stop.set)
        agg.thread.join(timeout=15)
        assert not agg.thread.is_alive(), "the aggregator did not stop"
        assert agg.exit_status == [0]
        assert time.monotonic() - began < 12
        agg.channel.close()
    finally:
        FlakyRecoveryStore.hang.clear()
        FlakyRecoveryStore.release.set()


class BlinkingStore(Store):
    """A store whose database stops answering pings while ``down`` is set (a blip)."""

    down = threading.Event()

    def ping(self, timeout: float = 1.0, *, write: bool = False) -> None:
        if self.down.is_set():
            raise StoreError("store unreachable: simulated")
        super().ping(timeout, write=write)


class _OpenUpload:
    """A PutChunks stream kept open; ``send()`` puts one random chunk on it."""

    def __init__(self, agg: _Running) -> None:
        import queue

        self._chunks: queue.Queue[service_pb2.Chunk | None] = queue.Queue()

        def stream() -> Any:
            while (chunk := self._chunks.get()) is not None:
                yield chunk

        self.call = agg.stub.PutChunks.future(stream(), timeout=60)

    def send(self) -> None:
        import hashlib
        import os

        data = os.urandom(1000)
        self._chunks.put(service_pb2.Chunk(chunk_id=hashlib.sha256(data).digest(), data=data))

    def end(self) -> None:
        self._chunks.put(None)

    def refused_as_reloading(self) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            self.call.result(timeout=20)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "reloading" in (caught.value.details() or "")


def test_an_upload_stream_open_across_a_reload_ends_unavailable(tmp_path: Path) -> None:
    """A site's upload stream stays open while the database blinks and the job is reloaded
    from the store: its next chunk ends it UNAVAILABLE (the site resumes on a new stream).
    Kept open, it charged the older job, and taking turns with a stream on the reloaded job
    reset the site's upload budget at every switch."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = _Running(fed, str(tmp_path / "a.db"), store_factory=BlinkingStore)
    upload: _OpenUpload | None = None
    try:
        agg.eventually(SERVING, within=20)
        upload = _OpenUpload(agg)
        upload.send()
        time.sleep(0.5)
        BlinkingStore.down.set()
        agg.eventually(NOT_SERVING, within=10)
        BlinkingStore.down.clear()
        agg.eventually(SERVING, within=10)  # the job was reloaded from the store
        assert not upload.call.done()
        upload.send()
        upload.refused_as_reloading()
    finally:
        if upload is not None:
            upload.end()
        BlinkingStore.down.clear()
        agg.close()


def test_an_upload_stream_ends_when_the_store_fails(tmp_path: Path) -> None:
    """The database fails while a site's upload stream is open: its next chunk ends it
    UNAVAILABLE, before the job is reloaded (it stored on while the reloaded job took its
    snapshot of the site's uploads, and those chunks were never charged)."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = _Running(fed, str(tmp_path / "a.db"), store_factory=BlinkingStore)
    upload: _OpenUpload | None = None
    try:
        agg.eventually(SERVING, within=20)
        upload = _OpenUpload(agg)
        upload.send()
        time.sleep(0.5)
        BlinkingStore.down.set()
        agg.eventually(NOT_SERVING, within=10)
        upload.send()
        upload.refused_as_reloading()
    finally:
        if upload is not None:
            upload.end()
        BlinkingStore.down.clear()
        agg.close()


def test_health_watches_are_bounded_per_certificate_and_by_name_length(
        tmp_path: Path) -> None:
    """One site opened thousands of health Watch streams (outside the service's per-site
    call limits; ~25 KB each, ~3 GB at the connection limit), each of a service name of its
    choosing and up to the message limit long. Now a name over the cap is INVALID_ARGUMENT,
    a Watch of a service the aggregator does not serve streams SERVICE_UNKNOWN (the health
    protocol), a certificate holds a few at most (RESOURCE_EXHAUSTED beyond), another site
    still gets its own, and Check, what probes use, is answered throughout."""
    from aggregator.service import MAX_HEALTH_SERVICE_NAME, MAX_HEALTH_WATCHES_PER_CALLER
    from tests.service_kit import start_aggregator

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = start_aggregator(fed, tmp_path)
    channels, calls = [], []
    try:
        def stub(site: int) -> Any:
            kit = SiteKit.load(fed.site_dir(site))
            channel = grpc.secure_channel(f"localhost:{fed.port}",
                                          grpc.ssl_channel_credentials(
                                              kit.ca_pem, kit.key_pem, kit.cert_pem))
            channels.append(channel)
            return health_pb2_grpc.HealthStub(channel)

        def first(call: Any) -> Any:
            return next(iter(call))

        one = stub(1)
        long = one.Watch(health_pb2.HealthCheckRequest(
            service="x" * (MAX_HEALTH_SERVICE_NAME + 1)), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            first(long)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        calls.append(one.Watch(health_pb2.HealthCheckRequest(
            service="x" * MAX_HEALTH_SERVICE_NAME), timeout=30))
        assert first(calls[-1]).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        for _ in range(MAX_HEALTH_WATCHES_PER_CALLER - 1):
            calls.append(one.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30))
            assert first(calls[-1]).status == SERVING
        extra = one.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            first(extra)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert one.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == SERVING
        two = stub(2)
        calls.append(two.Watch(health_pb2.HealthCheckRequest(service="secagg.v1.Aggregation"),
                               timeout=30))
        assert first(calls[-1]).status == SERVING
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
        agg.stop()


def test_closed_health_watches_give_back_their_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Open Watch streams are counted against MAX_HEALTH_WATCHES over all callers. Without a
    closed one given back, MAX_HEALTH_WATCHES watches in the aggregator's life (probes that
    reconnect, sites that restart) left every later Watch RESOURCE_EXHAUSTED for good. (The
    health servicer runs here against fake calls, no gRPC.)"""
    from aggregator import service as svc

    monkeypatch.setattr(svc, "MAX_HEALTH_WATCHES", 2)

    class Refused(Exception):
        pass

    class Call:
        def __init__(self, cert: bytes) -> None:
            self.cert = cert
            self.written: list[Any] = []

        def auth_context(self) -> dict[str, list[bytes]]:
            return {"x509_pem_cert": [self.cert]}

        async def write(self, message: Any) -> None:
            self.written.append(message)

        async def abort(self, code: Any, details: str) -> None:
            raise Refused(f"{code}: {details}")

    async def main() -> None:
        health = svc.BoundedHealth()
        for i in range(3 * svc.MAX_HEALTH_WATCHES):
            call = Call(b"site certificate %d" % i)
            watch = asyncio.ensure_future(
                health.Watch(health_pb2.HealthCheckRequest(service=""), call))
            await asyncio.sleep(0.01)
            assert not watch.done(), f"watch {i} refused: {watch.exception()!r}"
            assert call.written[0].status == SERVING
            watch.cancel()  # the watcher goes away
            with pytest.raises(asyncio.CancelledError):
                await watch

    asyncio.run(main())


def test_the_probes_fail_once_the_event_loop_stops_beating() -> None:
    """The probes are answered on the metrics thread: an aggregator whose event loop stalled
    (gRPC health timing out) still answered 200 to both, and was never restarted. They need
    the loop's heartbeat, fresh within HEARTBEAT_STALE_SECONDS."""
    import time as clock

    from aggregator.metrics import HEARTBEAT_STALE_SECONDS, Metrics, serve_metrics

    metrics = Metrics()
    server, port = serve_metrics(metrics, "127.0.0.1:0")
    try:
        metrics.is_serving = True
        metrics.beat = clock.monotonic()
        assert (_probe(port, "/readyz"), _probe(port, "/livez")) == (200, 200)
        metrics.beat = clock.monotonic() - HEARTBEAT_STALE_SECONDS - 1
        assert (_probe(port, "/readyz"), _probe(port, "/livez")) == (503, 503)
        metrics.is_serving, metrics.beat = False, clock.monotonic()
        assert (_probe(port, "/readyz"), _probe(port, "/livez")) == (503, 200)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGTERM"])
def test_a_hangup_stops_the_aggregator_as_sigterm_does(tmp_path: Path, sig: str) -> None:
    """SIGHUP (systemd's default reload, a closed terminal, log rotation) killed the
    aggregator at once, without a line in its log. It now stops it gracefully, as SIGTERM
    does: the signal and the shutdown are logged, and the status is 0."""
    import signal

    from tests.service_kit import start_aggregator

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = start_aggregator(fed, tmp_path)
    assert agg.process is not None
    try:
        agg.wait_for(lambda e: e.get("event") == "serving")
        agg.process.send_signal(getattr(signal, sig))
        assert agg.process.wait(timeout=30) == 0
    finally:
        agg.stop()
    events = agg.read()
    assert {"event": "signal", "reason": sig} in [
        {k: e.get(k) for k in ("event", "reason")} for e in events]
    assert any(e.get("event") == "shutdown" for e in events)
