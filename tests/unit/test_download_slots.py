"""The aggregator writes a bounded number of chunks at once however many sites download.

Every published model is fetched by every site at the same moment. Each GetChunks stream sends
a chunk only under one of ``MAX_CHUNKS_SENDING`` slots, held until gRPC has written it (the
handler is resumed), so 40 sites fetching at once make the handlers hold 8 chunk messages, not
40. A slot comes back after ``SEND_SLOT_LEASE_SECONDS`` even if the write has not finished,
so a site that opens downloads and never reads them delays the others by the lease at most.
The handler runs against fake calls (no gRPC): a chunk yielded and not yet taken by the
consumer is a write in progress.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from aggregator import service as svc
from aggregator.service import MAX_CHUNKS_SENDING, AggregationService, Core
from secagg.v1 import service_pb2
from tests.fake_calls import FakeContext, fake_service

DATA = b"model bytes " * 1000
CID = hashlib.sha256(DATA).digest()


def _service(core: Core) -> AggregationService:
    return fake_service(core, may_read=lambda site, cid: True,
                        hot_chunk=lambda cid: DATA if cid == CID else None)


def _download(service: AggregationService, site: int) -> Any:
    request = service_pb2.ChunkIds(chunk_ids=[CID])
    return service.GetChunks(request, FakeContext(site)).__aiter__()


async def _started(service: AggregationService, sites: range) -> tuple[list[Any], list[Any]]:
    streams = [_download(service, s) for s in sites]
    firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
    await asyncio.sleep(0.3)
    return streams, firsts


def _close(core: Core, streams: list[Any], firsts: list[Any]) -> None:
    for f in firsts:
        f.cancel()
    core.executor.shutdown()


def test_forty_downloads_at_once_write_at_most_the_slots_in_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "SEND_SLOT_LEASE_SECONDS", 60.0)  # a slow machine: no lease ends

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        streams, firsts = await _started(service, range(1, 41))
        writing = sum(f.done() for f in firsts)
        assert writing == MAX_CHUNKS_SENDING, f"{writing} chunks written at once"
        # writes that finish (the consumer takes the next) let the waiting streams go on
        for stream, first in zip(streams, firsts, strict=True):
            if first.done():
                assert first.result().data == DATA
                with pytest.raises(StopAsyncIteration):
                    await stream.__anext__()
        await asyncio.sleep(0.1)
        assert sum(f.done() for f in firsts) == 2 * MAX_CHUNKS_SENDING
        _close(core, streams, firsts)

    asyncio.run(main())


def test_sites_that_do_not_read_hold_up_other_downloads_only_for_the_lease(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "SEND_SLOT_LEASE_SECONDS", 0.2)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        # every slot taken by a write its site never reads
        stuck, firsts = await _started(service, range(1, MAX_CHUNKS_SENDING + 1))
        assert all(f.done() for f in firsts)
        honest = _download(service, 99)
        chunk = await asyncio.wait_for(honest.__anext__(), timeout=5)
        assert chunk.data == DATA
        _close(core, stuck, firsts)

    asyncio.run(main())


def test_a_send_slot_its_lease_gave_back_is_not_given_back_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A send slot whose lease ended (the site did not read its chunk) was given back by its
    timer; when the stream then goes on or ends, the slot is not given back a second time.
    Without that check every such site added a send slot for good, and the bound on the
    chunks written at once was gone."""
    monkeypatch.setattr(svc, "SEND_SLOT_LEASE_SECONDS", 0.1)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = _service(core)
        for site in (1, 2, 3):
            stream = _download(service, site)
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=5)  # written, not read
            assert chunk.data == DATA
            await asyncio.sleep(0.3)  # the lease ends: its timer gives the slot back
            with pytest.raises(StopAsyncIteration):  # the site reads on: the stream ends
                await asyncio.wait_for(stream.__anext__(), timeout=5)
        assert service.sending._value == MAX_CHUNKS_SENDING, "send slots were added"
        monkeypatch.setattr(svc, "SEND_SLOT_LEASE_SECONDS", 60.0)
        streams, firsts = await _started(service, range(10, 10 + 2 * MAX_CHUNKS_SENDING))
        writing = sum(f.done() for f in firsts)
        assert writing == MAX_CHUNKS_SENDING, f"{writing} chunks written at once"
        _close(core, streams, firsts)

    asyncio.run(main())
