"""A refused call lets go of what it received at once, not when the garbage collector runs.

grpc.aio keeps an aborted call's exception on the call's state, and the exception's traceback
holds the handler's frames, whose locals hold the call's context: a reference cycle. Before,
everything those frames held (a request of up to 8 MiB, a chunk, the upload stream) lived
until the cyclic collector ran; one site sending over-limit chunks on two streams kept 2 GB
alive. The handlers run here as registered (``add_service``) against a context that aborts
as grpc.aio's does, with the collector off: what a refused call held must be gone when it
returns.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import tracemalloc
import types
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from aggregator.service import Core, add_service
from secagg.v1 import service_pb2
from tests.fake_calls import Aborted, FakeContext, fake_service


class _Requests:
    """A client-streaming call's requests (weakly referenceable, unlike messages)."""

    def __init__(self, *chunks: service_pb2.Chunk) -> None:
        self._chunks = list(chunks)

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> service_pb2.Chunk:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)


class _Server:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, _name: str, handlers: Any) -> None:
        self.handlers = dict(handlers)


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _handlers(core: Core) -> dict[str, Any]:
    service = fake_service(core, store=types.SimpleNamespace(missing=lambda ids: list(ids)),
                           current_round=1, upload_limit=lambda site: 1 << 40,
                           stored_uploads=(None, {}), generation=1)
    server = _Server()
    add_service(service, server)
    return server.handlers


async def _refused_upload(handlers: dict[str, Any], chunk: service_pb2.Chunk,
                          site: int) -> weakref.ref[_Requests]:
    requests = _Requests(chunk)
    watch = weakref.ref(requests)
    with pytest.raises(Aborted):
        await handlers["PutChunks"].stream_unary(requests, FakeContext(site))
    return watch


def test_a_refused_upload_stream_is_let_go_at_once(no_collector: None) -> None:
    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        handlers = _handlers(core)
        over = service_pb2.Chunk(chunk_id=b"\1" * 32, data=b"\0" * (5 << 20))  # over 4 MiB
        watches = [await _refused_upload(handlers, over, site) for site in (1, 2, 3)]
        for _ in range(3):  # the event loop closes the abandoned stream readers
            await asyncio.sleep(0)
        assert all(w() is None for w in watches), "a refused upload stream is still held"
        core.executor.shutdown()

    asyncio.run(main())


def test_the_bytes_of_refused_chunks_do_not_pile_up(no_collector: None) -> None:
    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        handlers = _handlers(core)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for site in range(1, 11):
                # 2 MiB copied off the message, then refused: its bytes do not match its id
                data = bytes([site]) * (2 << 20)
                wrong = service_pb2.Chunk(chunk_id=hashlib.sha256(b"other").digest(), data=data)
                del data
                await _refused_upload(handlers, wrong, site)
                del wrong
            for _ in range(3):
                await asyncio.sleep(0)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held < 4 << 20, f"{held / 2**20:.0f} MiB of refused chunks still held"
        core.executor.shutdown()

    asyncio.run(main())


def test_a_refused_request_is_let_go_at_once(no_collector: None) -> None:
    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        handlers = _handlers(core)
        request = service_pb2.ChunkIds(chunk_ids=[b"short"] * 1000)  # ids are 32 bytes
        base = _refs(request)
        with pytest.raises(Aborted):
            await handlers["MissingChunks"].unary_unary(request, FakeContext(1))
        assert _refs(request) == base, "a refused request is still held"
        core.executor.shutdown()

    asyncio.run(main())


def _refs(obj: object) -> int:
    import sys

    return sys.getrefcount(obj)


DATA = b"model bytes " * 100
CID = hashlib.sha256(DATA).digest()


def _registered(service: Any) -> dict[str, Any]:
    server = _Server()
    add_service(service, server)
    return server.handlers


def test_finished_and_abandoned_downloads_give_back_the_sites_counts() -> None:
    """A site's download (GetChunks) counts among its calls in progress (at most
    MAX_CALLS_PER_SITE) and its downloads open (at most MAX_DOWNLOADS_PER_SITE) while it
    runs. Without either given back when the stream ends (read to the end, or abandoned by
    the site), a few downloads in a site's life locked it out of downloading, or of every
    call, for good."""
    from aggregator.service import MAX_CALLS_PER_SITE, MAX_DOWNLOADS_PER_SITE

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        handlers = _registered(fake_service(
            core, may_read=lambda site, cid: True,
            hot_chunk=lambda cid: DATA if cid == CID else None))
        get = handlers["GetChunks"].unary_stream
        for i in range(MAX_CALLS_PER_SITE + MAX_DOWNLOADS_PER_SITE + 2):
            stream = get(service_pb2.ChunkIds(chunk_ids=[CID]), FakeContext(1)).__aiter__()
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=5)
            assert chunk.data == DATA
            if i % 2:
                with pytest.raises(StopAsyncIteration):
                    await asyncio.wait_for(stream.__anext__(), timeout=5)
            else:  # the site goes away mid-stream
                await stream.aclose()
                await asyncio.sleep(0.01)  # the abandoned handler is closed by the loop
        core.executor.shutdown()

    asyncio.run(main())


def test_finished_uploads_give_back_the_sites_call_count() -> None:
    """An upload stream (PutChunks) counts among its site's calls in progress while it runs.
    Without the count given back when it ends, however it ends, MAX_CALLS_PER_SITE uploads in
    a site's life locked the site out of every call for good."""
    from aggregator.service import MAX_CALLS_PER_SITE

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        put = _handlers(core)["PutChunks"].stream_unary
        over = service_pb2.Chunk(chunk_id=b"\1" * 32, data=b"\0" * (5 << 20))  # over 4 MiB
        for i in range(2 * MAX_CALLS_PER_SITE):
            if i % 2:
                reply = await asyncio.wait_for(put(_Requests(), FakeContext(1)), timeout=5)
                assert reply.stored == 0
            else:
                with pytest.raises(Aborted, match="RESOURCE_EXHAUSTED: a chunk must hold"):
                    await asyncio.wait_for(put(_Requests(over), FakeContext(1)), timeout=5)
        core.executor.shutdown()

    asyncio.run(main())


def test_calls_cancelled_while_paced_give_back_the_sites_call_count() -> None:
    """A call waiting for its site's work units (paced) counts among the site's calls in
    progress. Without the count given back when such a call is cancelled (the site gave up,
    its deadline passed), MAX_CALLS_PER_SITE cancelled calls locked the site out of every
    call for good."""
    from aggregator.service import MAX_CALLS_PER_SITE, WorkPacer

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = fake_service(core, store=types.SimpleNamespace(missing=lambda ids: []))
        now = [0.0]
        service.pacer = WorkPacer(rate=1.0, burst=1.0, clock=lambda: now[0])
        ask = _registered(service)["MissingChunks"].unary_unary
        request = service_pb2.ChunkIds(chunk_ids=[CID])
        await asyncio.wait_for(ask(request, FakeContext(1)), timeout=5)  # the burst: at once
        for _ in range(MAX_CALLS_PER_SITE):
            call = asyncio.ensure_future(ask(request, FakeContext(1)))
            await asyncio.sleep(0.01)
            assert not call.done()  # paced: waiting for its units
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        now[0] += 1000.0  # the budget refilled: the next call is served at once
        reply = await asyncio.wait_for(ask(request, FakeContext(1)), timeout=5)
        assert list(reply.chunk_ids) == []
        core.executor.shutdown()

    asyncio.run(main())
