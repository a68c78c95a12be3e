"""A TCP proxy in front of the aggregator for fault tests: it can drop connections at random
points of what the site sends, or pass the site's bytes at one per second (a slow-loris)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading

from tests.service_kit import free_port


class Proxy:
    """Forwards 127.0.0.1:``port`` to the aggregator at ``target_port``.

    ``cut_every=(lo, hi)``: each connection is dropped once the site has sent a random number
    of bytes in [lo, hi] over it, at most ``max_cuts`` times in all (then the link is good).
    ``trickle_after=n``: once ``n`` bytes went up over all connections, the site's bytes pass
    at one per second.
    Set ``refusing`` to close every new connection at once (a server that is down), ``frozen``
    to pass nothing either way, on any connection, until it is cleared (a network partition:
    connections stay open, nothing answers).
    """

    def __init__(self, target_port: int, *, cut_every: tuple[int, int] | None = None,
                 max_cuts: int = 3, trickle_after: int | None = None, seed: int = 0) -> None:
        self.port = free_port()
        self.target = target_port
        self.cut_every = cut_every
        self.max_cuts = max_cuts
        self.trickle_after = trickle_after
        self.cuts = 0
        self.sent = 0
        self.refusing = False
        self.frozen = False
        self._rng = random.Random(seed)  # test faults only
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        # let the cancelled links finish (else: "Task was destroyed but it is pending")
        rest = asyncio.all_tasks(self._loop)
        self._loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            async with self._server:
                await self._server.serve_forever()

    async def _thawed(self) -> None:
        while self.frozen:
            await asyncio.sleep(0.05)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        await self._thawed()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        limit = None
        if self.cut_every is not None and self.cuts < self.max_cuts:
            limit = self._rng.randint(*self.cut_every)
        sent_here = 0

        async def upstream() -> None:
            nonlocal sent_here
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    await self._thawed()
                    if self.trickle_after is not None and self.sent >= self.trickle_after:
                        for i in range(len(data)):
                            up_writer.write(data[i:i + 1])
                            await up_writer.drain()
                            self.sent += 1
                            await asyncio.sleep(1.0)
                        continue
                    sent_here += len(data)
                    self.sent += len(data)
                    if limit is not None and sent_here > limit and self.cuts < self.max_cuts:
                        self.cuts += 1
                        writer.transport.abort()  # the connection is lost mid-upload
                        up_writer.transport.abort()
                        return
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await up_reader.read(65536):
                    await self._thawed()
                    writer.write(data)
                    await writer.drain()
            writer.close()

        with contextlib.suppress(asyncio.CancelledError):  # close() cancels live links
            await asyncio.gather(upstream(), downstream(), return_exceptions=True)

    def close(self) -> None:
        def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

        self._loop.call_soon_threadsafe(stop)
        self._thread.join(5)
