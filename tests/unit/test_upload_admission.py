"""Sites are told to send their chunks a few at a time, however many upload at once.

A site asks which chunks the aggregator lacks (MissingChunks) before it sends them; the answer
comes under one of ``[limits] upload_slots`` upload slots, so 40 sites uploading at the same
moment have a few uploads' bytes in flight (gRPC assembles every uploading stream's message:
~2-3 MB each), not 40. A slot is a lease: it comes back when the site's PutChunks stream ends,
however it ends, or after ``UPLOAD_LEASE_SECONDS``; a freed slot goes to the waiting site
given fewest slots in the running stage (colluders taking slots again and again queue
behind an honest site, whatever it uploaded in earlier stages); a site holds one slot at
most; a site not admitted in time is answered anyway; at shutdown, waiting sites are told
to retry. The handlers run against fake calls (no gRPC).
"""

from __future__ import annotations

import asyncio
import hashlib
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aggregator import service as svc
from aggregator.service import AggregationService, Core
from secagg.v1 import service_pb2
from tests.fake_calls import Aborted, FakeContext, fake_service

DATA = b"masked update " * 1000
SLOTS = 6  # the federation's [limits] upload_slots (8 unless set)
CID = hashlib.sha256(DATA).digest()


def _service(core: Core) -> AggregationService:
    return fake_service(core, limits={"upload_slots": SLOTS},
                        store=types.SimpleNamespace(missing=lambda ids: list(ids)),
                        current_round=1, current_stage=(1, 3), upload_limit=lambda site: 1 << 30,
                        stored_uploads=(None, {}), generation=1)


def _ask(service: AggregationService, site: int,
         remaining: float | None = None) -> asyncio.Future[Any]:
    request = service_pb2.ChunkIds(chunk_ids=[CID])
    return asyncio.ensure_future(service.MissingChunks(request, FakeContext(site, remaining)))


async def _chunks(*chunks: service_pb2.Chunk) -> AsyncIterator[service_pb2.Chunk]:
    for chunk in chunks:
        yield chunk


async def _put(service: AggregationService, site: int, *chunks: service_pb2.Chunk) -> Any:
    return await service.PutChunks(_chunks(*chunks), FakeContext(site))


def _answered(asks: list[asyncio.Future[Any]]) -> list[int]:
    return [i for i, a in enumerate(asks) if a.done()]


def test_forty_sites_uploading_at_once_are_told_to_send_a_few_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)  # a slow machine: no lease ends

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        asks = [_ask(service, s) for s in range(1, 41)]
        await asyncio.sleep(0.3)
        first = _answered(asks)
        assert len(first) == SLOTS, f"{len(first)} sites told to send at once"
        assert all(list(asks[i].result().chunk_ids) == [CID] for i in first)
        # uploads that end (however they end) let the next sites in arrival order send
        await _put(service, first[0] + 1)  # nothing sent: ended
        with pytest.raises(Aborted, match="do not hash"):  # refused: ended
            await _put(service, first[1] + 1, service_pb2.Chunk(chunk_id=CID, data=b"x" * 9))
        await asyncio.sleep(0.05)
        assert _answered(asks) == list(range(SLOTS + 2))
        for a in asks:
            a.cancel()
        core.executor.shutdown()

    asyncio.run(main())


def test_a_site_holds_one_slot_however_many_times_it_asks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        greedy = [_ask(service, 1) for _ in range(2 * SLOTS)]
        await asyncio.sleep(0.2)
        assert all(a.done() for a in greedy)  # it is admitted, once
        others = [_ask(service, s) for s in range(2, SLOTS + 1)]
        await asyncio.sleep(0.2)
        assert all(a.done() for a in others), "one site's calls took the others' slots"
        core.executor.shutdown()

    asyncio.run(main())


def test_a_site_that_is_admitted_and_sends_nothing_holds_up_others_only_for_the_lease(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 0.2)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        stuck = [_ask(service, s) for s in range(1, SLOTS + 1)]
        await asyncio.sleep(0.1)
        assert all(a.done() for a in stuck)  # every slot taken by a site that sends nothing
        honest = _ask(service, 99)
        reply = await asyncio.wait_for(honest, timeout=5)
        assert list(reply.chunk_ids) == [CID]
        core.executor.shutdown()

    asyncio.run(main())


def test_a_site_waiting_for_a_slot_is_answered_within_its_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        for s in range(1, SLOTS + 1):
            await _ask(service, s)
        unadmitted = svc._metrics.uploads_unadmitted._value.get()  # type: ignore[attr-defined]
        # 1.3 s left: it waits 0.3 s for a slot, then is answered anyway (never refused)
        reply = await asyncio.wait_for(_ask(service, 99, remaining=1.3), timeout=5)
        assert list(reply.chunk_ids) == [CID]
        # and the operator sees it
        assert svc._metrics.uploads_unadmitted._value.get() == unadmitted + 1  # type: ignore[attr-defined]
        core.executor.shutdown()

    asyncio.run(main())


def test_sites_that_go_away_while_waiting_lose_no_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        holders = [_ask(service, s) for s in range(1, SLOTS + 1)]
        await asyncio.sleep(0.1)
        gone = [_ask(service, s) for s in range(100, 110)]
        await asyncio.sleep(0.1)
        # a slot handed to a waiter in the same tick as it goes away is handed on
        await _put(service, 1)
        for g in gone:
            g.cancel()
        for s in range(2, SLOTS + 1):
            await _put(service, s)
        assert service.admission.in_use == 0
        fresh = [_ask(service, s) for s in range(200, 200 + SLOTS)]
        await asyncio.sleep(0.1)
        assert all(f.done() for f in fresh)
        del holders
        core.executor.shutdown()

    asyncio.run(main())


def test_a_site_with_nothing_missing_takes_no_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        core.job.store.missing = lambda ids: []  # type: ignore[union-attr]
        for s in range(1, 3 * SLOTS):
            reply = await asyncio.wait_for(_ask(service, s), timeout=5)
            assert list(reply.chunk_ids) == []
        assert service.admission.in_use == 0
        core.executor.shutdown()

    asyncio.run(main())


async def _honest_site_gets_the_next_slot(service: AggregationService) -> bool:
    """Colluders 1..2*SLOTS have each had a slot in this stage; half of them now hold every
    slot and the rest queue again; the honest site 99 asks last. When one slot comes back,
    does it go to the honest site (and to no colluder)?"""
    colluders = range(1, 2 * SLOTS + 1)
    for s in colluders:
        await asyncio.wait_for(_ask(service, s), timeout=5)
        await _put(service, s)
    holders = colluders[:SLOTS]
    for s in holders:
        await asyncio.wait_for(_ask(service, s), timeout=5)
    queued = [_ask(service, s) for s in colluders[SLOTS:]]
    await asyncio.sleep(0.05)
    honest = _ask(service, 99)
    await asyncio.sleep(0.05)
    await _put(service, holders[0])  # one slot comes back
    await asyncio.sleep(0.05)
    first = honest.done() and not any(q.done() for q in queued)
    for q in queued:
        q.cancel()
    return first


def test_colluders_taking_slots_again_and_again_queue_behind_an_honest_site(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        assert await _honest_site_gets_the_next_slot(service), (
            "the honest site waits behind colluders that had slots before")
        core.executor.shutdown()

    asyncio.run(main())


def test_sites_waiting_for_a_slot_at_shutdown_are_told_to_retry_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        for s in range(1, SLOTS + 1):
            await _ask(service, s)
        waiting = _ask(service, 99)
        await asyncio.sleep(0.05)
        core.stopping = True  # as serve() does on SIGTERM
        service.admission.close()
        with pytest.raises(Aborted, match="UNAVAILABLE"):
            await asyncio.wait_for(waiting, timeout=1)
        core.executor.shutdown()

    asyncio.run(main())


def test_an_honest_sites_uploads_in_earlier_stages_do_not_put_it_behind_colluders(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Colluders that kept quiet must not pass a site that uploads every round: only slots
    given in the running stage count."""
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        for _ in range(5):  # the honest site uploaded often in earlier stages
            await asyncio.wait_for(_ask(service, 99), timeout=5)
            await _put(service, 99)
        job: Any = core.job
        job.current_stage = (2, 3)  # the next round's upload stage
        assert await _honest_site_gets_the_next_slot(service), (
            "the honest site's earlier uploads put it behind colluders")
        core.executor.shutdown()

    asyncio.run(main())


def test_every_chunk_received_gives_back_its_in_flight_permit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each received chunk holds one of MAX_CHUNKS_IN_FLIGHT permits while it is hashed and
    stored. Without the permit given back when its chunk is settled, the permits are used up
    after 16 chunks in the aggregator's life, and every later upload waits for good (here:
    past the 5 s bound on each stream)."""
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        core.job.store.put_chunk_rows = (  # type: ignore[union-attr]
            lambda rows: [True] * len(rows))
        sent = 0
        for site in (1, 2, 3):  # 24 chunks in all, past the 16 permits
            data = [bytes([site, i]) * 500 for i in range(8)]
            chunks = [service_pb2.Chunk(chunk_id=hashlib.sha256(d).digest(), data=d)
                      for d in data]
            reply = await asyncio.wait_for(_put(service, site, *chunks), timeout=5)
            assert reply.stored == len(chunks)
            sent += len(chunks)
        assert sent > svc.MAX_CHUNKS_IN_FLIGHT
        await asyncio.sleep(0)
        assert service.in_flight._value == svc.MAX_CHUNKS_IN_FLIGHT, "permits not given back"
        core.executor.shutdown()

    asyncio.run(main())


def test_a_site_holding_no_slot_that_ends_an_upload_adds_no_slot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PutChunks stream gives back its site's slot when it ends, but only a site that
    holds one gives anything back. Without that check, every stream of a site holding no slot
    (one that never asked MissingChunks) added a slot: a site could make the slots unbounded
    and every uploader's bytes be in flight at once."""
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        for site in (100, 101, 102):  # no slot held, nothing sent: ended
            await asyncio.wait_for(_put(service, site), timeout=5)
        asks = [_ask(service, s) for s in range(1, 2 * SLOTS + 1)]
        await asyncio.sleep(0.2)
        answered = len(_answered(asks))
        assert answered == SLOTS, f"{answered} sites told to send at once, {SLOTS} slots"
        assert service.admission.in_use == SLOTS
        for a in asks:
            a.cancel()
        core.executor.shutdown()

    asyncio.run(main())


def test_no_site_is_given_a_slot_once_the_shutdown_began() -> None:
    """After the shutdown began a site asking for a slot is answered at once without one,
    slots free or not: none is taken (nor a lease timer set) for an upload the closing
    server would cut off."""
    async def main() -> None:
        admission = svc.UploadAdmission(SLOTS, 1.0)
        admission.close()
        assert await asyncio.wait_for(admission.admit(1, 5.0), timeout=1) is False
        assert admission.in_use == 0

    asyncio.run(main())


def test_an_upload_is_refused_once_a_chunk_of_it_does_not_hash_to_its_id(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk whose bytes do not hash to its id ends its stream INVALID_ARGUMENT as soon
    as its hash is known: the stream is not read on, nor the rest of it hashed and stored,
    up to the site's whole budget, before the refusal."""
    monkeypatch.setattr(svc, "UPLOAD_LEASE_SECONDS", 60.0)
    read: list[int] = []
    stored: list[Any] = []

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)

        def put_chunk_rows(rows: list[Any]) -> list[bool]:
            stored.extend(rows)
            return [True] * len(rows)

        core.job.store.put_chunk_rows = put_chunk_rows  # type: ignore[union-attr]
        good = [bytes([i]) * 1000 for i in range(10)]
        chunks = [service_pb2.Chunk(chunk_id=b"\0" * 32, data=b"forged")] + [
            service_pb2.Chunk(chunk_id=hashlib.sha256(d).digest(), data=d) for d in good]

        async def slowly() -> AsyncIterator[service_pb2.Chunk]:
            for i, chunk in enumerate(chunks):
                read.append(i)
                yield chunk
                await asyncio.sleep(0.3)  # (the forged chunk's hash is known by the next)

        with pytest.raises(Aborted, match=r"INVALID_ARGUMENT.*do not hash"):
            await asyncio.wait_for(service.PutChunks(slowly(), FakeContext(1)), timeout=10)
        core.executor.shutdown()

    asyncio.run(main())
    assert len(read) < 11 and len(stored) < 10, "the stream was read to its end first"
