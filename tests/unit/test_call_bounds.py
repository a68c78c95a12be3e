"""Bounds on what one site's calls can hold open at the aggregator: downloads in progress at
once, and how long one long poll waits, whatever the site asks for. (The service runs against
fake calls, no gRPC.)"""

from __future__ import annotations

import asyncio
import hashlib
import time
import types
from typing import Any

import pytest

from aggregator import service as svc
from aggregator.service import MAX_DOWNLOADS_PER_SITE, AggregationService, Core
from secagg.v1 import service_pb2
from tests.fake_calls import Aborted, FakeContext, fake_service

DATA = b"model bytes " * 100
CID = hashlib.sha256(DATA).digest()


def test_one_site_may_have_only_a_few_downloads_open_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A site opens downloads and never reads them: past MAX_DOWNLOADS_PER_SITE its next one
    is RESOURCE_EXHAUSTED (each open download holds a send slot and a chunk), while another
    site's download goes ahead."""
    monkeypatch.setattr(svc, "SEND_SLOT_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service: AggregationService = fake_service(
            core, may_read=lambda site, cid: True,
            hot_chunk=lambda cid: DATA if cid == CID else None)

        def download(site: int) -> Any:
            return service.GetChunks(service_pb2.ChunkIds(chunk_ids=[CID]),
                                     FakeContext(site)).__aiter__()

        held = [download(1) for _ in range(MAX_DOWNLOADS_PER_SITE)]
        firsts = [await asyncio.wait_for(s.__anext__(), timeout=5) for s in held]
        assert all(f.data == DATA for f in firsts)  # written, never read on: all open
        with pytest.raises(Aborted, match="RESOURCE_EXHAUSTED"):
            await asyncio.wait_for(download(1).__anext__(), timeout=5)
        other = await asyncio.wait_for(download(2).__anext__(), timeout=5)
        assert other.data == DATA
        core.executor.shutdown()

    asyncio.run(main())


def test_a_long_poll_waits_at_most_max_wait_ms_whatever_it_asks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A site asks to wait 10^9 ms: the poll ends (with nothing) after MAX_WAIT_MS, so no
    call of a site is held open for as long as the site likes."""
    monkeypatch.setattr(svc, "MAX_WAIT_MS", 200)

    async def main() -> float:
        service = AggregationService.__new__(AggregationService)
        service.core = types.SimpleNamespace(  # type: ignore[assignment]
            changed=asyncio.Event(), stopping=False)

        async def nothing() -> None:
            return None

        began = time.monotonic()
        result = await asyncio.wait_for(
            service._long_poll(FakeContext(1), 10**9, nothing), timeout=10)
        assert result is None
        return time.monotonic() - began

    assert asyncio.run(main()) < 5  # (0.2 s, with room for a slow machine)


def test_the_open_files_limit_is_raised_and_connections_kept_below_it() -> None:
    """A soft open-files limit below the hard one (often 1024 against far more) is raised
    to it, and the connections allowed stay RESERVED_FILES below it (at most
    MAX_CONNECTIONS)."""
    import resource

    from aggregator.service import MAX_CONNECTIONS, RESERVED_FILES, _connection_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < RESERVED_FILES + 128:
        pytest.skip("this machine's hard open-files limit is too low to test with")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (RESERVED_FILES + 64, hard))
        allowed = _connection_limit(3)
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == hard or hard == resource.RLIM_INFINITY
        assert allowed == min(MAX_CONNECTIONS, raised - RESERVED_FILES)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_work_pacer_lets_a_burst_through_then_paces_at_its_rate() -> None:
    """Each site's budget: a burst of units, refilled at a rate; a call costs at most the
    burst (a 4 GiB blob's 4096 chunk ids wait a few seconds, never for good); sites are
    paced apart."""
    from aggregator.service import WorkPacer

    now = [0.0]
    pacer = WorkPacer(rate=10.0, burst=20.0, clock=lambda: now[0])
    assert pacer.delay(1, 15) == 0.0
    assert pacer.delay(1, 5) == 0.0
    assert pacer.delay(1, 10) == 1.0  # 10 units short, at 10 a second
    assert pacer.delay(2, 20) == 0.0  # another site's budget is its own
    now[0] += 3.0  # 30 units refill the 10 owed, and 20 more (the burst)
    assert pacer.delay(1, 20) == 0.0
    assert pacer.delay(1, 1e9) == 2.0  # capped at the burst: 20 units owed


def test_an_idle_site_saves_up_no_more_than_the_burst() -> None:
    """A site that keeps quiet refills its budget up to the burst, no further: without the
    cap, a site idle for an hour saved up 230,400 units and could then make the aggregator
    serialise or look up as fast as it sends, unpaced, for minutes."""
    from aggregator.service import WorkPacer

    now = [0.0]
    pacer = WorkPacer(rate=10.0, burst=20.0, clock=lambda: now[0])
    assert pacer.delay(1, 20) == 0.0
    now[0] += 1000.0  # idle: 10,000 units' worth of time, capped at 20
    assert pacer.delay(1, 20) == 0.0
    assert pacer.delay(1, 20) == 2.0  # the burst spent: 20 units owed, at 10 a second


def test_a_large_request_costs_more_work_units_than_a_small_one() -> None:
    """A call costs one unit plus one per 4 KiB of its request: without the size counted,
    a site's 8 MiB messages or 4096-id lookups cost as little as an empty call, and were
    served 256 at a time and then 64 a second."""
    from aggregator.service import PACE_BYTES_PER_UNIT, request_cost

    small = service_pb2.ChunkIds(chunk_ids=[CID])
    large = service_pb2.ChunkIds(chunk_ids=[CID] * 4096)
    size = large.ByteSize()  # 4096 ids of 32 bytes: over 128 KiB
    small_cost, large_cost = request_cost(small), request_cost(large)
    assert small_cost < 2.0
    assert large_cost == 1.0 + size / PACE_BYTES_PER_UNIT, f"{large_cost} units for {size} B"
    assert large_cost > 32.0


@pytest.mark.parametrize("length", [0, 31, 33])
def test_a_chunk_id_of_another_length_is_refused_as_malformed_before_any_lookup(
        length: int) -> None:
    """A chunk id is a SHA-256: 32 bytes. One of another length, asked about or asked for,
    is refused INVALID_ARGUMENT, named as malformed, before the store is read or an upload
    slot or a download slot is taken (it was looked up, answered "missing", and the site
    given a slot to send a chunk no id of which could ever be stored)."""
    looked_up: list[list[bytes]] = []
    read: list[bytes] = []

    def missing(ids: list[bytes]) -> list[bytes]:
        looked_up.append(ids)
        return list(ids)

    def may_read(site: int, cid: bytes) -> bool:
        read.append(cid)
        return True

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service: AggregationService = fake_service(
            core, store=types.SimpleNamespace(missing=missing), current_round=1,
            current_stage=(1, 1), upload_limit=lambda site: 1 << 30, stored_uploads=(None, {}),
            generation=1, may_read=may_read, hot_chunk=lambda cid: DATA)
        ids = service_pb2.ChunkIds(chunk_ids=[CID, b"\x01" * length])
        with pytest.raises(Aborted, match=r"INVALID_ARGUMENT.*32-byte SHA-256"):
            await service.MissingChunks(ids, FakeContext(1))  # type: ignore[arg-type]
        with pytest.raises(Aborted, match=r"INVALID_ARGUMENT.*32-byte SHA-256"):
            async for _ in service.GetChunks(ids, FakeContext(1)):  # type: ignore[arg-type]
                pass
        core.executor.shutdown()

    asyncio.run(main())
    assert looked_up == [] and read == []


def test_connections_are_capped_at_what_the_aggregators_memory_can_hold() -> None:
    """A connection still in its TLS handshake holds ~100 KB (measured: 502 MB at 4,000
    unfinished handshakes): anyone who reaches the port can open MAX_CONNECTIONS of them,
    so the cap keeps that near 400 MB (it was 16,384, written for ~20-25 KB each: ~1.6 GB),
    whatever the open-files limit allows."""
    from aggregator.service import MAX_CONNECTIONS

    assert MAX_CONNECTIONS * 100 * 1024 <= 410 * 2**20
