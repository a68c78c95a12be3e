"""The aggregator's gRPC service (``grpc.aio``): mTLS identity, limits, long polls, chunks.

The job (:mod:`aggregator.job`) runs on one core thread; the event loop only decodes, checks
identity and limits, hashes chunks (``hashlib`` releases the GIL, so on a pool) and waits. A
site's id comes from its client certificate's SAN URI (``context.auth_context()``), never from a
request field; a protocol message that names another site is PERMISSION_DENIED.

Health (``grpc.health.v1``): NOT_SERVING while the job recovers from the store and whenever the
store stops answering; SERVING otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import logging
import signal
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from sqlalchemy.exc import SQLAlchemyError

from aggregator.job import (
    CHUNK_STORAGE_COST,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    Job,
    ServiceError,
    check_job,
)
from aggregator.metrics import Metrics, NoMetrics, serve_metrics
from aggregator.store import (
    Store,
    StoreBusy,
    StoreError,
    StoreUnreachable,
    check_store_location,
    described,
    sqlite_url,
    store_failure,
)
from secagg.errors import ConfigurationError, SecAggError
from secagg.federation import pki
from secagg.federation.config import SDK_CHUNK_BYTES, FederationConfig
from secagg.federation.kit import (
    AGGREGATOR_ENTRIES,
    ROSTER_FILE,
    check_kit_directory,
    check_settings_signature,
    load_roster,
)
from secagg.federation.pki import read_private_key
from secagg.hazmat.secret import SecretBytes, reveal
from secagg.model import FlatModel
from secagg.v1 import service_pb2, service_pb2_grpc

log = logging.getLogger("secagg.aggregator")
T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = "secagg.v1.Aggregation"
MAX_WAIT_MS = 30_000
MAX_IDS_PER_CALL = 4096
IDENTITY_CACHE_SIZE = 4096  # certificates (and presented chains) whose site id is kept


class Identity:
    """Site ids from client certificates, cached by certificate."""

    def __init__(self, roster_sites: set[int], ca_pem: bytes | None = None) -> None:
        self._sites = roster_sites
        self.roster_size = len(roster_sites)
        self._anchors = () if ca_pem is None else pki.trust_anchors(ca_pem)
        self._cache: dict[bytes, int | None] = {}

    async def site(self, context: Ctx) -> int:
        auth = context.auth_context()
        pems = list(auth.get("x509_pem_cert") or [])
        if not pems:
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "a client certificate is "
                                                                   "required")
        pem = bytes(pems[0])
        # the intermediates the client presented (TLS verified a chain; this checks the CA's
        # path length over it, which BoringSSL does not)
        chain = b"".join(bytes(c) for c in auth.get("x509_pem_cert_chain") or [])
        # an entry is a digest of what was presented, not the presented bytes: a site sending
        # a fresh 100 KB chain of junk beside its certificate on each connection held 4,096 of
        # them (530 MB) in a cache bounded by its count of entries alone
        # defence: service.identity-cache-keyed-by-digest
        key = hashlib.sha256(len(pem).to_bytes(8, "big") + pem + chain).digest()
        if key not in self._cache:
            # defence: service.identity-cache-bounded
            if len(self._cache) >= IDENTITY_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = pki.site_id_from_pem(pem, self._anchors, chain)
        site = self._cache[key]
        if site is None:
            log.warning("refused: certificate names no site", extra={
                "event": "identity_refused", "peer": context.peer()})
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED,
                         "the client certificate names no site, or does not chain to a CA "
                         "of the federation within that CA's path length")
        # defence: service.identity-on-the-roster
        if site not in self._sites:
            log.warning("refused: site not on the roster", extra={
                "event": "identity_refused", "site_id": site, "peer": context.peer()})
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"site {site} is not on the federation's roster")
        assert site is not None
        return site


_metrics: Metrics = NoMetrics()  # this process's aggregator's metrics (set by serve)


async def _abort(context: Ctx, code: grpc.StatusCode, message: str) -> NoReturn:
    """Refuse the call with ``code``: every refusal is counted, by status code."""
    _metrics.refused.labels(code.name).inc()
    await context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover


def _let_go(error: BaseException) -> None:
    """Clear the locals of the finished frames an exception passed through on its way out of
    a handler.

    grpc.aio keeps an aborted call's exception on the call's state (``context.abort`` sets
    ``abort_exception`` before raising it), and the exception's traceback holds the handler's
    frames, whose locals hold the context: a reference cycle only the garbage collector
    breaks, and with it every request and chunk those frames held (up to 8 MiB each). One
    site sending over-limit chunks on two streams kept 2 GB alive that way, growing, before
    the collector ran. The frames are finished (the exception has left them), so nothing
    reads their locals again."""
    traceback.clear_frames(error.__traceback__)  # (the frame still running is skipped)


class _Undecodable:
    """What a request whose bytes do not parse becomes: its handler refuses it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDECODABLE"


UNDECODABLE = _Undecodable()
NOT_A_MESSAGE = "the request does not parse as its message type"


class _TooLarge:
    """What a request longer than any honest one of its method is (never parsed)."""

    def __repr__(self) -> str:
        return "<too large>"


TOO_LARGE = _TooLarge()
# The most bytes an honest request of each method holds, checked before it is parsed (the
# others are bounded by [limits] max_message_bytes, which gRPC checks): a parsed message can
# be many times its bytes (an empty repeated field element is 2 bytes on the wire and a
# pointer and an object once parsed), and 8 MiB of empty chunk ids parsed into ~128 MB
# before the id count was refused; eight such calls, held while paced, kept 1.2 GB.
REQUEST_BYTES = {
    "MissingChunks": MAX_IDS_PER_CALL * 35 + 64,
    "GetChunks": MAX_IDS_PER_CALL * 35 + 64,
    "GetRound": 256,
    "Receive": 4096,
}


# a stage message holds, at most, a few entries per roster site (keys, shares, partners,
# sites) and the chunk list of one payload of the job's longest vector (CKKS: ~50 bytes a
# value at the largest preset; masking: 8 at most), in chunks of SDK_CHUNK_BYTES or more
SUBMIT_BASE_BYTES = 256 * 1024
SUBMIT_BYTES_PER_SITE = 4 * 1024
SUBMIT_PAYLOAD_BYTES_PER_VALUE = 64


def submit_bytes(config: FederationConfig, sites: int) -> int:
    """The most bytes an honest Submit of this federation holds (REQUEST_BYTES)."""
    ids = -(-config.limits.max_vector_length * SUBMIT_PAYLOAD_BYTES_PER_VALUE
            // SDK_CHUNK_BYTES) + 2
    return min(int(config.limits.max_message_bytes),
               SUBMIT_BASE_BYTES + sites * SUBMIT_BYTES_PER_SITE + ids * 40)


def _lenient(parse: Callable[[bytes], Any], limit: int | None = None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        # defence: service.request-bytes-per-method
        if limit is not None and len(data) > limit:
            return TOO_LARGE
        try:
            return parse(data)
        except Exception:  # DecodeError, or whatever the parser raises on garbage
            return UNDECODABLE
    return deserialize


def add_service(servicer: AggregationService, server: Any) -> None:
    """Register the service as the generated code does, except that a request that does not
    parse is refused INVALID_ARGUMENT by the service (after the caller's identity is checked)
    rather than answered UNKNOWN by gRPC with the parser's exception in the details."""

    class _Capture:
        def __init__(self) -> None:
            self.handlers: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, _handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, _name: str, handlers: Any) -> None:
            self.handlers = dict(handlers)

    capture = _Capture()
    service_pb2_grpc.add_AggregationServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, capture)

    async def refuse(context: Ctx) -> None:
        await servicer.identity.site(context)  # an outsider hears its own refusal first
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, NOT_A_MESSAGE)

    async def admit(context: Ctx) -> int:
        """The caller's site, counted among its calls in progress: a site has no reason for
        more than a few at once, and each holds a request of up to max_message_bytes."""
        site = await servicer.identity.site(context)
        # defence: service.calls-per-site-bounded
        if not servicer.calls.enter(site, MAX_CALLS_PER_SITE):
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"more than {MAX_CALLS_PER_SITE} calls of this site at once")
        return site

    async def too_large(context: Ctx) -> None:
        await servicer.identity.site(context)  # an outsider hears its own refusal first
        await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     "the request is longer than any of its kind can be")

    async def enter(request: Any, context: Ctx) -> int:
        if request is UNDECODABLE:
            await refuse(context)
        if request is TOO_LARGE:
            await too_large(context)
        site = await admit(context)
        # defence: service.work-paced-per-site
        wait = servicer.pacer.delay(site, request_cost(request))
        if wait > 0:
            _metrics.calls_paced.inc()
            try:
                await asyncio.sleep(wait)
            except BaseException:
                # defence: service.calls-left-when-cancelled-while-paced
                servicer.calls.leave(site)
                raise
        return site

    def guard(name: str, h: Any) -> Any:
        # defence: service.wire.undecodable-is-invalid-argument
        h = h._replace(request_deserializer=_lenient(h.request_deserializer,
                                                     limits.get(name)))
        # every refusal (and any other exception) leaves through here: its frames let go of
        # the requests they held (_let_go), and so does this one
        if h.unary_unary is not None:
            unary = h.unary_unary

            async def unary_unary(request: Any, context: Ctx) -> Any:
                try:
                    site = await enter(request, context)
                    try:
                        return await unary(request, context)
                    finally:
                        servicer.calls.leave(site)
                except BaseException as e:
                    # defence: service.refused-requests-let-go
                    _let_go(e)
                    del request, context  # this frame stays on the traceback grpc keeps
                    raise
            return h._replace(unary_unary=unary_unary)
        if h.unary_stream is not None:
            streaming = h.unary_stream

            async def unary_stream(request: Any, context: Ctx) -> Any:
                try:
                    site = await enter(request, context)
                    try:
                        async for item in streaming(request, context):
                            yield item
                    finally:
                        # defence: service.calls-left-by-downloads
                        servicer.calls.leave(site)
                except BaseException as e:
                    _let_go(e)
                    del request, context
                    raise
            return h._replace(unary_stream=unary_stream)
        receiving = h.stream_unary

        async def stream_unary(requests: Any, context: Ctx) -> Any:
            async def checked() -> Any:
                async for request in requests:
                    if request is UNDECODABLE:
                        await refuse(context)
                    yield request
            try:
                site = await admit(context)
                try:
                    return await receiving(checked(), context)
                finally:
                    # defence: service.calls-left-by-uploads
                    servicer.calls.leave(site)
            except BaseException as e:
                # defence: service.refused-uploads-let-go
                _let_go(e)
                del requests, context  # (cells ``checked`` reads: it is not resumed)
                raise
        return h._replace(stream_unary=stream_unary)

    # defence: service.submit-bytes-bounded
    limits = {**REQUEST_BYTES,
              "Submit": submit_bytes(servicer.config, servicer.identity.roster_size)}
    handlers = {name: guard(name, h) for name, h in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


# refusals an honest site meets in the course of rounds (a round ended, a stage already
# answered, a round not running): logged at info, the others at warning
_ROUTINE_REFUSALS = frozenset({"FAILED_PRECONDITION", "ABORTED", "NOT_FOUND"})
_CODES = {name: getattr(grpc.StatusCode, name) for name in (
    "INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
    "ABORTED", "UNAVAILABLE", "NOT_FOUND", "UNAUTHENTICATED", "DEADLINE_EXCEEDED")}


READER_THREADS = 2  # downloads and lookups read the store on these, beside the job's thread


class Core:
    """The job on its one thread; an asyncio condition that wakes long polls on changes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secagg-core")
        self.hashers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="secagg-hash")
        self.bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secagg-bulk")
        self.readers = ThreadPoolExecutor(max_workers=READER_THREADS,
                                          thread_name_prefix="secagg-read")
        # the health watcher's store ping, on its own thread: on the job's, it queued behind
        # a store call that hung, and health said SERVING for as long as the store hung
        self.pinger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secagg-ping")
        self.changed = asyncio.Event()
        self.job: Job | None = None
        self.healthy = False
        self.stopping = False

    def notify(self) -> None:  # called on the core thread
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.loop.run_in_executor(self.executor, fn, *args)


class UploadBudget:
    """Bytes each site stored in the current round; far more than a round needs is refused
    (RESOURCE_EXHAUSTED), so one site cannot fill the aggregator's disk. A job reloaded from
    the store (a restart, a database that failed) starts from what the store holds of each
    site's uploads: chunks the store lost and the site sends again are not charged twice
    (two database crashes in a round took an honest site past twice its upload, and dropped
    it), and a restart does not give a site a new budget."""

    def __init__(self) -> None:
        self._generation = 0
        self._round: int | None = None
        self._used: dict[int, int] = {}

    def charge(self, job: Job, site: int, number: int | None, nbytes: int) -> bool:
        """Charge ``nbytes`` to ``site`` in round ``number`` (the job's current round, read
        once by the caller, who labels the chunk with it); False if that is over its limit
        or there is no round."""
        # only ever forward, to a job loaded later: a stream opened before a reload still
        # holds the older job, and switching back and forth reset the counts each time (one
        # site stored 4x its budget); the service also ends such streams (PutChunks)
        # defence: service.upload-budget-from-the-store
        if job.generation > self._generation:
            self._generation = job.generation
            recovered, stored = job.stored_uploads
            self._round, self._used = number, dict(stored) if recovered == number else {}
        elif number != self._round and job.generation == self._generation:
            self._round, self._used = number, {}
        if number is None:
            return False
        used = self._used.get(site, 0) + nbytes
        self._used[site] = used
        return used <= job.upload_limit(site)


class PerSite:
    """How many of something each site has in progress (calls, downloads), on the event
    loop's thread."""

    def __init__(self) -> None:
        self._open: dict[int, int] = {}

    def enter(self, site: int, limit: int) -> bool:
        """Count one more for ``site`` unless it already has ``limit``."""
        if self._open.get(site, 0) >= limit:
            return False
        self._open[site] = self._open.get(site, 0) + 1
        return True

    def leave(self, site: int) -> None:
        self._open[site] -= 1
        if not self._open[site]:
            del self._open[site]


PACE_UNITS_PER_SECOND = 64.0  # each site's work budget (WorkPacer): units a second,
PACE_BURST_UNITS = 256.0  # and at most this many saved up
PACE_BYTES_PER_UNIT = 4096


class WorkPacer:
    """Each site's calls paced by the work they ask for (a token bucket of work units, per
    site, on the event loop's thread): a site within its few concurrent calls made the
    aggregator serialise 8 MiB messages to a finished round, or look up 4096 chunk ids,
    as fast as it could send them, and honest rounds ran 3-10x slower. A call costs one unit
    plus one per 4 KiB of request (at most the bucket); a site with no units left waits
    for them before its call is served (it is never refused: the SDK makes one call at a
    time, far below the rate, and pacing only slows whoever outruns it)."""

    def __init__(self, rate: float = PACE_UNITS_PER_SECOND, burst: float = PACE_BURST_UNITS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._units: dict[int, tuple[float, float]] = {}  # site -> (units, as of when)

    def delay(self, site: int, cost: float) -> float:
        """Charge ``site`` for a call of ``cost`` units: how long it must wait first."""
        now = self._clock()
        units, then = self._units.get(site, (self.burst, now))
        # defence: service.pace-burst-capped
        units = min(self.burst, units + (now - then) * self.rate) - min(cost, self.burst)
        self._units[site] = (units, now)
        return max(0.0, -units / self.rate)


def request_cost(request: Any) -> float:
    """The work units a request asks for (WorkPacer): one, plus one per 4 KiB of it."""
    size = request.ByteSize() if hasattr(request, "ByteSize") else 0
    # defence: service.pace-cost-by-request-size
    return 1.0 + size / PACE_BYTES_PER_UNIT


class UploadAdmission:
    """Which sites may send their chunks now: at most ``slots`` at once, over all sites.

    A site asks which chunks the aggregator lacks (MissingChunks) before it sends them
    (PutChunks); that answer waits until one of the slots is free. The bytes a site has not
    been told to send are not in flight, so gRPC buffers nothing for it: 50 sites uploading
    at the same moment make the aggregator hold ``slots`` uploads' messages, not 50 (gRPC
    assembles each stream's message, ~2-3 MB per uploading connection). Reading streams only
    under a slot would not do it: the bytes are already sent, and gRPC holds them in the
    stream's window.

    Availability first:
    - a slot is a lease: it comes back when the site's upload stream ends or ``lease``
      seconds after it was given, whichever is first, so a site that takes a slot and sends
      nothing, or trickles, holds it for the lease at most;
    - a freed slot goes to the waiting site given fewest slots in the running stage (arrival
      order among equals): every site gets its first slot of a stage before any site gets
      its second, so sites that take slots again and again (colluders holding every slot to
      make honest uploads miss their deadline) queue behind every site that has not
      uploaded in this stage. An honest site's first upload of a stage waits at most for
      the sites that asked before it for their first slot: (those sites) / ``slots`` leases,
      however often the colluders ask. (A count over a longer window, tried first, let
      colluders that had kept quiet pass an honest site that uploads every round.);
    - a site holds one slot at most, however many calls it makes;
    - a site not admitted within ``wait`` seconds is answered anyway (never refused for
      load): the bound holds for bursts of fast uploads, where memory grows; a slow upload (a
      long WAN link) outlives its lease and goes on without a slot, holding the one message
      it is sending, as before.
    Runs on the event loop's thread."""

    def __init__(self, slots: int, lease: float) -> None:
        self.slots, self.lease = slots, lease
        self._free = slots  # while a slot is free no one waits (_hand_on gives it first)
        self._waiting: dict[asyncio.Future[bool], int] = {}  # turn -> site, in arrival order
        self._held: dict[int, asyncio.TimerHandle] = {}
        self._stage: object = None  # the stage the grant counts are for
        self._grants: dict[int, int] = {}  # site -> slots given in that stage
        self._closed = False

    @property
    def in_use(self) -> int:
        return self.slots - self._free

    async def admit(self, site: int, wait: float, stage: object = None) -> bool:
        """Wait (up to ``wait`` s) until ``site`` holds a slot; False if it was not given one
        (or the aggregator is shutting down). ``stage``: the running stage (any value that
        changes when it does)."""
        if self._closed:
            return False
        if stage != self._stage:  # a new stage: everyone's first slot again
            self._stage, self._grants = stage, {}
        # defence: service.upload-admission-one-per-site
        if site in self._held:
            return True
        loop = asyncio.get_running_loop()
        if self._free:
            self._free -= 1
        else:
            turn: asyncio.Future[bool] = loop.create_future()
            self._waiting[turn] = site

            def give_up() -> None:
                if not turn.done():
                    turn.set_result(False)
            # defence: service.upload-admission-wait-bounded
            timer = loop.call_later(max(wait, 0.0), give_up)
            try:
                if not await turn:
                    return False
            except asyncio.CancelledError:
                # the site went away; a slot handed to it in the meantime goes to the next
                # defence: service.upload-admission-handed-on
                if turn.done() and not turn.cancelled() and turn.result():
                    self._hand_on()
                raise
            finally:
                timer.cancel()
                self._waiting.pop(turn, None)
        if site in self._held:  # another call of the same site was admitted meanwhile
            self._hand_on()
            return True
        self._grants[site] = self._grants.get(site, 0) + 1
        # defence: service.upload-admission-lease
        self._held[site] = loop.call_later(self.lease, self.done, site)
        return True

    def done(self, site: int) -> None:
        """``site``'s upload ended (or its lease did): its slot, if it holds one, goes on."""
        timer = self._held.pop(site, None)
        # defence: service.upload-admission-slotless-end-adds-no-slot
        if timer is not None:
            timer.cancel()
            self._hand_on()

    def close(self) -> None:
        """The aggregator is shutting down: every site waiting is answered now."""
        self._closed = True
        for turn in self._waiting:
            if not turn.done():
                turn.set_result(False)

    def _hand_on(self) -> None:
        # defence: service.upload-admission-least-served-first
        waiting = [(self._grants.get(site, 0), arrival, turn)
                   for arrival, (turn, site) in enumerate(self._waiting.items())
                   if not turn.done()]
        if waiting:
            min(waiting, key=lambda w: (w[0], w[1]))[2].set_result(True)
            return
        self._free += 1


class ChunkWriter:
    """Group commit for uploaded chunks: what arrives while the store's bulk thread is writing
    is written next, together, in one transaction (a commit per chunk was the ingest's
    bottleneck). Every chunk is acknowledged only once its transaction has committed."""

    Row = tuple[bytes, bytes, int | None, int]

    def __init__(self, core: Core) -> None:
        self.core = core
        self._pending: list[tuple[Store, ChunkWriter.Row, asyncio.Future[bool]]] = []
        self._draining = False
        self._task: asyncio.Future[None] | None = None

    async def put(self, store: Store, row: ChunkWriter.Row) -> bool:
        future: asyncio.Future[bool] = self.core.loop.create_future()
        self._pending.append((store, row, future))
        if not self._draining:
            self._draining = True
            self._task = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                store = self._pending[0][0]
                batch = [p for p in self._pending if p[0] is store][:MAX_CHUNKS_PER_COMMIT]
                taken = {id(p) for p in batch}
                self._pending = [p for p in self._pending if id(p) not in taken]
                try:
                    results = await self.core.loop.run_in_executor(
                        self.core.bulk, store.put_chunk_rows, [row for _, row, _ in batch])
                except Exception as e:  # each waiting upload gets the store's error
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, _, future), is_new in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(is_new)
        finally:
            self._draining = False


MAX_CHUNKS_PER_COMMIT = 16
PING_TIMEOUT_SECONDS = 5.0  # a store that does not answer the health ping by then is down
MAX_CHUNKS_IN_FLIGHT = 16  # received chunks being hashed or stored, over all upload streams
MAX_CHUNKS_SENDING = 8  # chunks being written to downloading sites, over all GetChunks streams
SEND_SLOT_LEASE_SECONDS = 1.0  # the longest one chunk's write holds up the others
UPLOAD_LEASE_SECONDS = 1.0  # the longest one admitted upload holds up the others
MAX_ADMISSION_WAIT_SECONDS = 20.0  # then a site is answered without a slot
MAX_DOWNLOADS_PER_SITE = 4  # GetChunks streams one site may have open at once
MAX_CALLS_PER_SITE = 8  # calls of one site in progress at once (the SDK makes one at a time)
MAX_STREAMS_PER_CONNECTION = 8  # HTTP/2: what one connection may have open at once


class AggregationService(service_pb2_grpc.AggregationServicer):
    def __init__(self, core: Core, identity: Identity, config: FederationConfig) -> None:
        self.core = core
        self.identity = identity
        self.calls = PerSite()  # each site's calls in progress (add_service)
        self.pacer = WorkPacer()  # each site's work rate (add_service)
        self.config = config
        self.budget = UploadBudget()
        self.writer = ChunkWriter(core)
        self.in_flight = asyncio.Semaphore(MAX_CHUNKS_IN_FLIGHT)
        self.sending = asyncio.Semaphore(MAX_CHUNKS_SENDING)
        self.downloads = PerSite()  # each site's GetChunks streams open
        self.admission = UploadAdmission(config.limits.upload_slots, UPLOAD_LEASE_SECONDS)

    async def _ready_job(self, context: Ctx) -> Job:
        """The job, or UNAVAILABLE while it is recovering (the port is open before the store
        is: sites that call then retry)."""
        job = self.core.job
        # defence: service.no-calls-served-while-stopping
        if self.core.stopping:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the aggregator is shutting down")
        # defence: service.no-answers-while-unhealthy
        if job is None or not self.core.healthy:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the aggregator is recovering")
        assert job is not None
        return job

    async def _call(self, context: Ctx, fn: Callable[[Job], T], site: int = 0) -> T:
        """``fn(job)`` on the job's thread, for ``site``; its ServiceError becomes the call's
        status."""
        job = await self._ready_job(context)
        try:
            return await self.core.run(fn, job)
        except ServiceError as e:
            # defence: service.unavailable-marks-unhealthy
            if e.code == UNAVAILABLE:
                self.core.healthy = False
            else:
                # every refusal of a site's call in the log, naming the site, the code and our
                # reason (rate-limited per site: PEER_EVENTS): they were counted, and only
                # identity refusals said whom (sites holding an old roster after a site's
                # removal were refused "invalid signature", four of them, in silence)
                # defence: service.refusals-logged
                log.log(logging.INFO if e.code in _ROUTINE_REFUSALS else logging.WARNING,
                        "refused", extra={"event": "call_refused", "site_id": site or None,
                                          "code": e.code, "reason": str(e)[:300]})
            await _abort(context, _CODES.get(e.code, grpc.StatusCode.INTERNAL), str(e))
        except (StoreError, SQLAlchemyError) as e:
            # a database error the store did not wrap is the store's too: UNAVAILABLE (and
            # its text, which can quote the statement's parameters, is never logged)
            self.core.healthy = False
            # defence: service.raw-database-errors-logged-by-type
            # (a raw one through store_failure: its class and our words for a known cause,
            # a full disk, never its text; its class alone hid the full disk it was)
            reason = str(e) if isinstance(e, StoreError) else str(store_failure(e, "database"))
            log.error("store error", extra={"event": "store_error", "reason": reason})
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the store is unavailable")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _long_poll(self, context: Ctx, wait_ms: int,
                         attempt: Callable[[], Awaitable[T | None]]) -> T | None:
        loop = asyncio.get_running_loop()
        # defence: service.long-poll-capped
        end = loop.time() + min(max(wait_ms, 0), MAX_WAIT_MS) / 1000
        while True:
            changed = self.core.changed
            result = await attempt()
            if result is not None:
                return result
            remaining = end - loop.time()
            if remaining <= 0:
                return None
            # defence: service.polls-end-unavailable-at-a-shutdown
            if self.core.stopping:
                # a poll cut off by the shutdown would end CANCELLED; UNAVAILABLE says "retry"
                await _abort(context, grpc.StatusCode.UNAVAILABLE,
                             "the aggregator is shutting down")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 1.0))

    # ---- rounds and stage messages -------------------------------------------------------------

    async def GetRound(self, request: service_pb2.GetRoundRequest,
                       context: Ctx) -> service_pb2.RoundInfo:
        site = await self.identity.site(context)
        waiting: list[service_pb2.RoundWaiting | None] = [None]  # (as the last attempt saw it)

        async def attempt() -> service_pb2.RoundInfo | None:
            info = await self._call(context, lambda job: job.round_info(
                int(request.after_round), site), site)
            if (request.until_finished and info is not None
                    and info.status == service_pb2.ROUND_STATUS_RUNNING):
                waiting[0] = info.waiting if info.HasField("waiting") else None
                return None
            return info

        info = await self._long_poll(context, request.wait_ms, attempt)
        if info is not None:
            return info
        # a wait for the round's end that ran out says whether the round waits for its sites
        # (a site that came early gave the round up while it waited for the others)
        # defence: service.round-end-poll-tells-waiting
        return service_pb2.RoundInfo(waiting=waiting[0])

    async def Submit(self, request: service_pb2.SubmitRequest,
                     context: Ctx) -> service_pb2.SubmitResponse:
        site = await self.identity.site(context)
        # defence: service.empty-submission-refused
        if request.WhichOneof("message") is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty submission")
        duplicate = await self._call(context, lambda job: job.submit(site, request), site)
        return service_pb2.SubmitResponse(duplicate=duplicate)

    async def Receive(self, request: service_pb2.ReceiveRequest,
                      context: Ctx) -> service_pb2.ReceiveResponse:
        site = await self.identity.site(context)

        waiting: list[service_pb2.RoundWaiting | None] = [None]  # (as the last attempt saw it)

        async def attempt() -> service_pb2.ReceiveResponse | None:
            response = await self._call(context, lambda job: job.receive(
                site, request.round_id, int(request.stage)), site)
            waiting[0] = response.waiting if response.HasField("waiting") else None
            return response if response.ready else None

        response = await self._long_poll(context, request.wait_ms, attempt)
        if response is not None:
            return response
        # defence: service.stage-poll-tells-waiting
        return service_pb2.ReceiveResponse(ready=False, waiting=waiting[0])

    # ---- chunks --------------------------------------------------------------------------------

    def _check_ids(self, ids: list[bytes]) -> str | None:
        # defence: service.ids-per-call
        if len(ids) > MAX_IDS_PER_CALL:
            return f"at most {MAX_IDS_PER_CALL} chunk ids per call"
        if any(len(i) != 32 for i in ids):
            return "a chunk id is a 32-byte SHA-256"
        return None

    async def MissingChunks(self, request: service_pb2.ChunkIds,
                            context: Ctx) -> service_pb2.ChunkIds:
        site = await self.identity.site(context)
        ids = [bytes(i) for i in request.chunk_ids]
        problem = self._check_ids(ids)
        if problem:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        # each id once (a blob may hold one chunk twice, a model of zeros: asked, not refused;
        # 4096 copies of one id were looked up, and answered, 4096 times)
        # defence: service.missing-ids-distinct
        ids = list(dict.fromkeys(ids))
        job = await self._ready_job(context)
        store = job.store
        try:
            missing = await self.core.loop.run_in_executor(self.core.readers, store.missing, ids)
        except StoreError:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the store is unavailable")
        if missing:
            # the answer is the site's cue to send: given under an upload slot
            # defence: service.upload-admission
            _metrics.uploads_waiting.inc()
            try:
                admitted = await self.admission.admit(site, _admission_wait(context),
                                                      job.current_stage)
            finally:
                _metrics.uploads_waiting.dec()
            if self.core.stopping:  # a wait cut short by the shutdown: "retry", not "send"
                await _abort(context, grpc.StatusCode.UNAVAILABLE,
                             "the aggregator is shutting down")
            if not admitted:
                _metrics.uploads_unadmitted.inc()
        return service_pb2.ChunkIds(chunk_ids=missing)

    async def PutChunks(self, request_iterator: AsyncIterator[service_pb2.Chunk],
                        context: Ctx) -> service_pb2.PutChunksResponse:
        """Receive, hash and store chunks as a pipeline: while chunk i is hashed (on a pool)
        and stored (on the store's bulk thread), chunk i + 1 is already being received."""
        site = await self.identity.site(context)
        limit = self.config.limits.max_chunk_bytes
        idle = self.config.limits.stream_idle_seconds
        loop = asyncio.get_running_loop()
        job = await self._ready_job(context)
        tasks: list[asyncio.Future[tuple[int, int]]] = []

        async def ingest(cid: bytes, data: bytes, number: int) -> tuple[int, int]:
            digest = await loop.run_in_executor(self.core.hashers, _sha256, data)
            # defence: service.chunk-bytes-match-id
            if digest != cid:
                raise ServiceError(INVALID_ARGUMENT, "a chunk's bytes do not hash to its id")
            # labelled with the round it was charged to (a message that refers to it later
            # claims it for its own round: Job.submit), not with the round current now: a
            # round that closed while it was hashed left it with no round (kept for good)
            # defence: service.chunk-labelled-with-its-charged-round
            is_new = await self.writer.put(job.store, (cid, data, number, site))
            return (1, 0) if is_new else (0, 1)

        def settled(task: asyncio.Future[tuple[int, int]]) -> None:
            # defence: service.chunk-in-flight-permits-returned
            self.in_flight.release()
            # a chunk still being stored when its stream was refused (idle, over budget, a
            # later chunk's bad hash) has its outcome read here: left unread, asyncio logged
            # "Task exception was never retrieved" with a traceback for every refused stream
            # defence: service.orphan-chunk-outcomes-read
            error = None if task.cancelled() else task.exception()
            # defence: service.late-chunk-store-failure-marks-unhealthy
            if isinstance(error, StoreError):
                self.core.healthy = False  # (as a stream that sees it: reload from the store)

        iterator = request_iterator.__aiter__()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(iterator.__anext__(), timeout=idle)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    log.warning("idle upload stream", extra={"event": "stream_idle",
                                                             "site_id": site})
                    await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"the upload stream was idle for {idle:g} s")
                # the store failed under this stream (the job is to be reloaded from it), or
                # the job was reloaded: its chunks go to the reloaded job, through a new
                # stream (the SDK resumes with MissingChunks). Storing on while the job
                # reloads put chunks beside the budget's snapshot of the store.
                # defence: service.stream-ends-with-its-job
                if self.core.job is not job or (
                        # defence: service.stream-ends-when-the-store-fails
                        not self.core.healthy):
                    del chunk
                    await _abort(context, grpc.StatusCode.UNAVAILABLE,
                                 "the aggregator is reloading its job from the store; send "
                                 "the rest again")
                # (an id of another length is malformed, said as such, and refused before a
                # byte is hashed or charged)
                # defence: service.chunk-id-length
                if len(chunk.chunk_id) != 32:
                    del chunk
                    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                 "a chunk id is a 32-byte SHA-256")
                size = len(chunk.data)
                # defence: logs.no-payloads (of a chunk, only its size is ever logged or counted)
                _metrics.bytes_received.inc(size)
                # defence: service.chunk-size-bounded, service.upload-budget
                # defence: service.upload-budget-per-chunk
                number = job.current_round  # the round this chunk is charged to and kept for
                if number is None:  # between rounds, or the job is over
                    del chunk
                    await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                                 "no round is open: there is nothing to upload for now")
                if not 0 < size <= limit or not self.budget.charge(
                        job, site, number, size + CHUNK_STORAGE_COST):
                    del chunk  # refused before it is copied; let go before the refusal
                    # (an empty chunk is malformed, not over a limit)
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED if size
                                 else grpc.StatusCode.INVALID_ARGUMENT,
                                 f"a chunk must hold 1 to {limit} bytes" if not 0 < size <= limit
                                 else "upload budget for this round exceeded")
                # the message is let go before this stream waits for a slot: a waiting
                # stream holds one copy of its chunk, not two
                cid, data = bytes(chunk.chunk_id), bytes(chunk.data)
                del chunk
                # at most MAX_CHUNKS_IN_FLIGHT chunks are hashed or stored at once, over all
                # streams, so the payload the handlers hold grows by one chunk per uploader at
                # most (a stream waiting here reads no more: gRPC's flow control holds its
                # sender). A slot is held while hashing and storing, never while waiting.
                await self.in_flight.acquire()
                task = asyncio.ensure_future(ingest(cid, data, number))
                task.add_done_callback(settled)
                tasks.append(task)
                if len(tasks) >= 8:  # bound what is in flight (8 chunks)
                    await asyncio.wait(tasks[-8:-7])
                failed = next((t for t in tasks if t.done() and t.exception()), None)
                if failed is not None:
                    await failed
            results = await asyncio.gather(*tasks)
        except ServiceError as e:
            log.warning("refused chunk", extra={"event": "chunk_refused", "site_id": site,
                                                "reason": str(e)})
            await _abort(context, _CODES[e.code], str(e))
        except StoreError:
            self.core.healthy = False
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the store is unavailable")
        finally:
            # defence: service.upload-admission-released
            self.admission.done(site)  # however the stream ended
        # (A broken stream cancels this handler, not the chunks already received: those are
        # still hashed and stored, so the site's retry sends only what is really missing.)
        return service_pb2.PutChunksResponse(stored=sum(r[0] for r in results),
                                             already_present=sum(r[1] for r in results))

    async def GetChunks(self, request: service_pb2.ChunkIds,
                        context: Ctx) -> AsyncIterator[service_pb2.Chunk]:
        site = await self.identity.site(context)
        ids = [bytes(i) for i in request.chunk_ids]
        problem = self._check_ids(ids) or (
            "a chunk id is asked for twice" if len(set(ids)) != len(ids) else None)
        if problem:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        # defence: service.downloads-per-site
        if not self.downloads.enter(site, MAX_DOWNLOADS_PER_SITE):
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"at most {MAX_DOWNLOADS_PER_SITE} downloads at once per site")
        try:
            async for chunk in self._serve_chunks(context, site, ids):
                yield chunk
        finally:
            # defence: service.downloads-left
            self.downloads.leave(site)

    async def _serve_chunks(self, context: Ctx, site: int,
                            ids: list[bytes]) -> AsyncIterator[service_pb2.Chunk]:
        # every id is checked before any byte is sent (on the job's thread, which alone
        # changes what a site may read); the bytes then come from the two newest models in
        # memory or from the store on the reader threads, never holding up the job's thread
        allowed = await self._call(context, functools.partial(_may_read_all, site=site, ids=ids))
        if not allowed:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         "this site may not read that chunk")
        job = await self._ready_job(context)
        loop = asyncio.get_running_loop()
        for cid in ids:
            # A chunk is sent under one of MAX_CHUNKS_SENDING slots over all downloads, held
            # until gRPC has written it: 50 sites fetching the model at once make the handlers
            # hold a few chunks' messages at a time, not 50. A slot comes back after
            # SEND_SLOT_LEASE_SECONDS even if its write has not finished, so a site that does
            # not read its stream holds up no one for longer than that.
            # defence: service.download-send-slots
            release = await self._send_slot()
            try:
                data = job.hot_chunk(cid)
                if data is None:
                    try:
                        data = await loop.run_in_executor(self.core.readers, job.store.get_chunk,
                                                          cid)
                    except StoreError:
                        await _abort(context, grpc.StatusCode.UNAVAILABLE,
                                     "the store is unavailable")
                # defence: service.missing-chunk-not-found
                if data is None:
                    await _abort(context, grpc.StatusCode.NOT_FOUND, "no such chunk")
                assert data is not None
                _metrics.bytes_sent.inc(len(data))
                yield service_pb2.Chunk(chunk_id=cid, data=data)
            finally:
                release()

    async def _send_slot(self) -> Callable[[], None]:
        """Take a send slot; returns the function that gives it back (once), which a timer
        calls SEND_SLOT_LEASE_SECONDS later if the sender has not."""
        await self.sending.acquire()
        given_back = False

        def release() -> None:
            nonlocal given_back
            # defence: service.download-slot-given-back-once
            if not given_back:
                given_back = True
                timer.cancel()
                self.sending.release()
        # defence: service.download-slot-lease
        timer = asyncio.get_running_loop().call_later(SEND_SLOT_LEASE_SECONDS, release)
        return release


def _admission_wait(context: Ctx) -> float:
    """How long a MissingChunks call may wait for an upload slot: within its deadline."""
    remaining = context.time_remaining()
    if remaining is None:
        return MAX_ADMISSION_WAIT_SECONDS
    # defence: service.admission-answers-before-the-deadline
    return max(0.0, min(MAX_ADMISSION_WAIT_SECONDS, remaining - 1.0))


def _may_read_all(job: Job, *, site: int, ids: list[bytes]) -> bool:
    return all(job.may_read(site, cid) for cid in ids)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ---- the server ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerFiles:
    config: FederationConfig
    directory: Path
    tls_key: SecretBytes = field(repr=False)  # the TLS private key: never in a repr
    server_cert: bytes
    ca_cert: bytes

    @property
    def server_key(self) -> bytes:
        """The TLS private key's PEM bytes (for gRPC's credentials)."""
        return reveal(self.tls_key)


def load_server_files(config_path: Path) -> ServerFiles:
    d = config_path.parent
    check_kit_directory(d, (config_path.name, *AGGREGATOR_ENTRIES))
    config = FederationConfig.load(config_path)
    try:
        files = ServerFiles(config, d, read_private_key(d / "server.key"),
                            (d / "server.crt").read_bytes(), (d / "ca.crt").read_bytes())
    except FileNotFoundError as e:
        raise ConfigurationError(f"the aggregator directory {d} lacks {Path(e.filename).name}"
                                 ) from None
    except OSError as e:
        raise ConfigurationError(f"cannot read {e.filename}: {e.strerror}") from None
    pki.check_tls_files(files.tls_key, files.server_cert, files.ca_cert, d,
                        chain_to_ca=False)
    # a site's client certificate put in as server.crt started a server no site could
    # connect to (each failed the handshake, told only "unavailable")
    # defence: service.server-certificate-for-servers
    if not pki.is_server_certificate(files.server_cert):
        raise ConfigurationError(f"{d / 'server.crt'} is not a server certificate (its "
                                 "extended key usage lacks serverAuth: a site's?)")
    return files


SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    # a ping's answer can wait behind a slow link's queued chunks: 20 s (the default)
    # closed healthy connections of sites on ~20 KB/s links
    ("grpc.keepalive_timeout_ms", 60_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # a site's channel may ping with no call in flight (it keeps keepalive on to find a
    # connection a NAT dropped while it trained): gRPC's default takes each such ping as a
    # strike (the next allowed 2 h later) and ends the connection on the third
    ("grpc.keepalive_permit_without_calls", 1),
]


async def serve(config_path: Path, *, store: str | None = None, listen: str | None = None,
                ready: Callable[[int], None] | None = None,
                stop_event: asyncio.Event | None = None,
                store_factory: Callable[[str], Store] = Store,
                metrics_listen: str | None = None) -> int:
    """Run the aggregator until SIGTERM, SIGINT or SIGHUP (or ``stop_event``); returns the
    exit status.
    ``metrics_listen``: HOST:PORT for Prometheus's ``/metrics`` (None: not served)."""
    global _metrics
    # (a port past 65535 was a traceback for --metrics, and for --listen another port,
    # silently: gRPC bound 99999 - 65536)
    # defence: service.addresses-checked
    for value, flag in ((listen, "--listen"), (metrics_listen, "--metrics")):
        if value is not None:
            check_address(value, flag)
    files = load_server_files(config_path)
    config = files.config
    roster = load_roster(files.directory / ROSTER_FILE, config.trust_root)
    # Settings every party shares that the trust root did not sign (an operator's edit of
    # the aggregator's copy, not signed with sign-config): every site refused each round as
    # its own config's fault, and the aggregator served on, saying nothing (an operator's
    # test). The aggregator checks them as a site does, before it serves.
    # defence: service.settings-signed
    try:
        check_settings_signature(files.directory, config)
    except ConfigurationError as e:
        raise ConfigurationError(f"every site would refuse this aggregator's settings: {e}; "
                                 "then give the aggregator's directory the signed "
                                 "federation.toml and settings.sig") from None
    if config.initial_model is None:
        raise ConfigurationError("[job] initial_model is not set: the job needs a model to "
                                 "start from")
    model = FlatModel.load_npz(config.initial_model,
                               max_values=config.limits.max_vector_length)
    # the sites take round 1 only from the model their config names: started from another
    # one, the job would run rounds every site refuses
    if config.initial_model_digest is not None and model.digest != config.initial_model_digest:
        raise ConfigurationError(
            f"[job] initial_model ({config.initial_model}) is not the model "
            "[job] initial_model_digest names (the sites' configs name it too): restore the "
            "model file, or give every party a config naming the new model")
    # every check of the job that needs no store, before the port is bound
    check_job(config, roster, model)
    # (an empty --store, an unset "$DB_URL", is refused, not taken for the default)
    # defence: service.empty-store-not-the-default
    store_url = sqlite_url(str(files.directory / "aggregator.db") if store is None else store)
    check_store_location(store_url)
    # defence: service.store-named-at-start
    log.info("store", extra={"event": "store", "reason": described(store_url)})
    _metrics = Metrics()
    metrics_server = None
    if metrics_listen is not None:
        try:
            metrics_server, metrics_port = serve_metrics(_metrics, metrics_listen)
        except (OSError, ValueError) as e:
            raise ConfigurationError(f"cannot serve metrics on {metrics_listen}: {e}") from None
        log.info("metrics", extra={"event": "metrics_listening",
                                   "peer": f"{metrics_listen} -> {metrics_port}"})
    loop = asyncio.get_running_loop()
    core = Core(loop)
    limits = config.limits
    connections = _connection_limit(len(roster))
    server = grpc.aio.server(options=[
        # connections, handshaking or not, are bounded below the open-files limit, and a TLS
        # handshake gets HANDSHAKE_SECONDS: an outsider with no certificate held 1,224 silent
        # connections (each kept 120 s), took every file descriptor, and the store could not
        # be opened (NOT_SERVING, no round). A flood now keeps new sites out at worst, for
        # as long as it lasts; the aggregator and the sites connected stay up.
        # defence: service.connections-bounded, service.handshake-timeout
        ("grpc.max_allowed_incoming_connections", connections),
        # a second aggregator on this port fails to bind rather than share it: with the
        # port shared (gRPC's default), a standby answering "unavailable" took sites'
        # connections until they gave up
        # defence: service.port-not-shared
        ("grpc.so_reuseport", 0),
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_SECONDS * 1000)),
        # no compressed requests: a compressed message is checked against the limits only
        # as it is inflated (8 KB of gzip made an 8 MiB request), and what travels here is
        # random-looking (masked words, ciphertexts, hashes) and does not compress (DESIGN
        # §3); gRPC refuses one UNIMPLEMENTED
        # defence: service.compression-off
        ("grpc.compression_enabled_algorithms_bitset", 1),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        *SERVER_KEEPALIVE_OPTIONS,
        # a client opens no more streams than this on one connection (it queues the rest),
        # so one connection cannot make the server receive dozens of large requests at once
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ])
    # defence: service.identity-knows-the-ca (site certificates issued by the CA itself)
    service = AggregationService(core, Identity(set(roster), files.ca_cert), config)
    add_service(service, server)
    health = BoundedHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    credentials = grpc.ssl_server_credentials([(files.server_key, files.server_cert)],
                                              root_certificates=files.ca_cert,
                                              require_client_auth=True)
    address = listen or "[::]:" + config.aggregator.rsplit(":", 1)[1]
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc's "Failed to bind": in use, not an address, no permission
        port = 0
    if port == 0:
        raise ConfigurationError(f"cannot listen on {address} (in use, or not an address "
                                 "this machine has)")
    await _set_health(health, False)
    await server.start()
    log.info("listening", extra={"event": "listening", "peer": f"{address} -> {port}"})
    stop = stop_event or asyncio.Event()

    def stop_on(sig: signal.Signals) -> None:
        log.info("signal", extra={"event": "signal", "reason": sig.name})
        stop.set()

    # (SIGHUP too, as systemd's default reload, a closed terminal and log rotation send it:
    # it killed the aggregator at once, without a line)
    # defence: service.sighup-stops-gracefully
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop_on, sig)
    if ready is not None:
        ready(port)
    tasks: list[asyncio.Task[None]] = []
    store_opened: Store | None = None
    heartbeat = asyncio.create_task(_heartbeat(_metrics))
    certificates = asyncio.create_task(_watch_certificates(files, _metrics))
    try:
        opened = await _until_the_store_answers(
            core, functools.partial(_open_leased, store_factory, store_url), stop)
        if opened is None:
            return 0  # stopped while waiting for the store
        _metrics.watch_engine(opened.engine)
        _metrics.watch_engine(opened.bulk)
        store_opened = opened
        # a store that was empty, whatever its kind (a PostgreSQL database's name mistyped
        # for an existing empty one began the job again with no word; SQLite's new file is
        # said in the store line too)
        # defence: service.new-store-said
        if opened.created:
            log.warning("the store was empty: the job starts at round 1 (if it ran before on "
                        "another store, stop this aggregator and give that store)",
                        extra={"event": "store_new", "reason": described(store_url)})
        metrics = _metrics

        def recovered() -> Job:
            # (the lease, lost while the job waited to recover (a database restarted, or
            # made writable again, ends its session), is taken again first: the job's writes
            # are fenced by it, and no ping runs yet to retake it)
            # defence: service.recovery-retakes-the-lease
            opened.check_lease()
            job = Job(config, roster, opened, model, on_change=core.notify, metrics=metrics)
            try:
                job.recover()
            except SecAggError:  # already a clear refusal (a store of another job) or a wait
                raise
            except SQLAlchemyError as e:
                raise store_failure(e, "recovering the job from the store failed") from None
            # a store that answers with what the job cannot load (a damaged model chunk, a
            # torn restore) is a refusal to start that names the cause, not a traceback
            # defence: service.damaged-store-refused-clearly
            except ServiceError as e:
                raise StoreError(f"the store holds a job this aggregator cannot load: {e}"
                                 ) from None
            except (ValueError, KeyError, TypeError, DecodeError) as e:  # a damaged record
                raise StoreError("the store holds a job this aggregator cannot load: a "
                                 f"damaged record ({type(e).__name__})") from None
            return job

        # the job's first reads race the stop, and a database that stops answering between
        # the store's opening and these reads is waited for, NOT_SERVING, as at the opening
        # (it was a traceback and an exit, or an aggregator deaf to SIGTERM)
        # defence: service.recovery-waits-for-the-store
        job = await _until_the_store_answers(core, recovered, stop)
        if job is None:
            return 0
        core.job = job
        core.healthy = True
        await _set_health(health, True)
        log.info("serving", extra={"event": "serving"})
        tasks = [asyncio.create_task(_ticker(core)), asyncio.create_task(_watch(core, health)),
                 asyncio.create_task(_checkpointer(core))]
        await stop.wait()
    finally:
        log.info("shutting down", extra={"event": "shutdown"})
        # long polls end UNAVAILABLE now (sites retry) rather than CANCELLED at the grace's end
        core.stopping = True
        core._wake()
        service.admission.close()
        for task in (*tasks, heartbeat, certificates):
            task.cancel()
        await _set_health(health, False)
        await server.stop(grace=5)
        if core.job is not None:
            with contextlib.suppress(ServiceError, StoreError, TimeoutError):
                await asyncio.wait_for(core.run(core.job.purge), timeout=SHUTDOWN_STORE_SECONDS)
        # a store call that hangs (a database that accepts and never answers) must not keep
        # the process from stopping: what it had not committed is lost as in a crash, which
        # the store is made for; the command line then exits without the stuck thread
        # defence: service.shutdown-bounded
        if await _drained(core):
            if store_opened is not None:
                await core.run(store_opened.close)
        else:
            log.error("a store call did not return; stopping without it",
                      extra={"event": "shutdown_stuck"})
        for executor in (core.executor, core.hashers, core.bulk, core.readers, core.pinger):
            executor.shutdown(wait=False, cancel_futures=True)
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0


SHUTDOWN_STORE_SECONDS = 5.0  # what a store call in progress gets to end, at shutdown


def check_address(value: str, flag: str) -> None:
    """A HOST:PORT ([v6]:PORT) to bind, its port in 0..65535 (0: any free one), or a
    ConfigurationError naming the flag."""
    host, sep, port = value.rpartition(":")
    # defence: service.address-brackets-balanced
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or (
            host.startswith("[") != host.endswith("]")):
        raise ConfigurationError(f"{flag} must be HOST:PORT with a port in 0..65535, got "
                                 f"{value!r}")


def _open_leased(store_factory: Callable[[str], Store], url: str) -> Store:
    """The store, held for this aggregator alone (Store.take_lease), or StoreError."""
    store = store_factory(url)
    try:
        store.take_lease()
    except BaseException:
        store.close()
        raise
    return store


async def _drained(core: Core) -> bool:
    """Whether the store calls in progress end within SHUTDOWN_STORE_SECONDS: every thread
    of every pool that calls the store must be free at once (one task per thread, each
    waiting at a barrier for the others: two tasks on a two-thread pool both ran on its one
    free thread, and a stuck one went unseen)."""
    ends = []
    for pool, threads in ((core.executor, 1), (core.bulk, 1), (core.readers, READER_THREADS),
                          (core.pinger, 1)):
        # defence: service.drained-means-every-thread
        barrier = threading.Barrier(threads, timeout=SHUTDOWN_STORE_SECONDS)
        ends += [core.loop.run_in_executor(pool, barrier.wait) for _ in range(threads)]
    done, pending = await asyncio.wait(ends, timeout=SHUTDOWN_STORE_SECONDS)
    return not pending and all(f.exception() is None for f in done)


async def _until_the_store_answers(core: Core, fn: Callable[[], T],
                                   stop: asyncio.Event) -> T | None:
    """``fn()`` on the job's thread, once the store's database answers: an aggregator started
    while its PostgreSQL is down (a host rebooting, both restarted together) waits NOT_SERVING
    and tries again (StoreUnreachable), rather than exit; a store it does not understand is
    still a refusal to start. None if stopped first."""
    delay, told_busy = 1.0, False
    while True:
        busy = False
        # defence: service.open-store-races-the-stop (the attempt races the stop: a database
        # that accepts connections and never answers held the aggregator deaf to SIGTERM)
        attempt = asyncio.ensure_future(core.run(fn))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not attempt.done():
            return None
        try:
            return attempt.result()
        # defence: service.waits-for-an-unreachable-store
        except StoreUnreachable as e:
            busy = isinstance(e, StoreBusy)
            # (a standby waits as long as the other serves: warned once, then told at info)
            log.log(logging.INFO if busy and told_busy else logging.WARNING,
                    "store in use" if busy else "store unreachable", extra={
                        "event": "store_busy" if busy else "store_unreachable",
                        "reason": f"{e}; retrying in {delay:g} s"})
            told_busy = told_busy or busy
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            return None
        # a standby tries the lease every 2 s at most (it took over up to 10 s after the
        # serving aggregator died); a database that does not answer, every 10 s
        # defence: service.standby-retries-the-lease-often
        delay = min(delay * 2, STANDBY_RETRY_SECONDS if busy else 10.0)


STANDBY_RETRY_SECONDS = 2.0
HANDSHAKE_SECONDS = 10.0  # a TLS handshake takes a few round trips, even on slow links
RESERVED_FILES = 256  # descriptors kept from connections: store, logs, metrics, tools
# each connection still in its TLS handshake holds ~100 KB (an outside tester's flood of
# unfinished handshakes, measured: 502 MB at 4,000, 1.07 GB at 10,000; the ~20-25 KB once
# written here was wrong): 4,096 of them, ~400 MB, is what anyone who reaches the port can
# make the aggregator hold. A federation needs a few per site (2,000 sites at most fit).
MAX_CONNECTIONS = 4_096


def _connection_limit(sites: int) -> int:
    """Raise the soft limit of open files to the hard one (a server's usual first step: the
    soft default is often 1024); the connections to allow: RESERVED_FILES below it, at most
    MAX_CONNECTIONS. Logs a warning if that leaves too little for the roster."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    files = MAX_CONNECTIONS + RESERVED_FILES if soft == resource.RLIM_INFINITY else soft
    allowed = max(1, min(MAX_CONNECTIONS, files - RESERVED_FILES))
    if allowed < 2 * sites + 16:
        log.warning("few connections", extra={
            "event": "connections_limited",
            "reason": f"{allowed} connections for {sites} sites: the open-files limit "
                      f"({soft}) is too low; raise it (systemd: LimitNOFILE)"})
    log.info("connections", extra={"event": "connections_allowed",
                                   "reason": f"at most {allowed} connections"})
    return allowed


MAX_HEALTH_WATCHES = 1024  # Watch streams open at once, over all callers
MAX_HEALTH_WATCHES_PER_CALLER = 4  # and of one client certificate
MAX_HEALTH_SERVICE_NAME = 256  # bytes of the service name a Watch names


class BoundedHealth(health_aio.HealthServicer):  # type: ignore[misc]
    """gRPC's health service with its Watch streams bounded. They are long-lived and held
    outside the service's per-site call limits: one site opened thousands (~25 KB each,
    ~3 GB at the connection limit), each naming a service of its choosing (up to the
    message limit long, held while the stream is open). At most a few are open per client
    certificate and ``MAX_HEALTH_WATCHES`` in all (RESOURCE_EXHAUSTED beyond: Check, what
    probes use, is always answered), and a service name is at most
    ``MAX_HEALTH_SERVICE_NAME`` bytes (INVALID_ARGUMENT). Within those, a Watch of a service
    this aggregator does not serve streams SERVICE_UNKNOWN, as the health protocol says."""

    def __init__(self) -> None:
        super().__init__()
        self._watching: dict[bytes, int] = {}
        self._watches = 0

    async def Watch(self, request: Any, context: Any) -> None:
        # defence: service.health-watch-names-short
        if len(request.service.encode()) > MAX_HEALTH_SERVICE_NAME:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"service name over {MAX_HEALTH_SERVICE_NAME} bytes")
        # defence: service.health-watches-bounded
        caller = hashlib.sha256(b"".join(
            bytes(c) for c in context.auth_context().get("x509_pem_cert") or [])).digest()
        if (self._watching.get(caller, 0) >= MAX_HEALTH_WATCHES_PER_CALLER
                or self._watches >= MAX_HEALTH_WATCHES):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "too many health watches open (use Check)")
        self._watching[caller] = self._watching.get(caller, 0) + 1
        self._watches += 1
        try:
            await super().Watch(request, context)
        finally:
            # defence: service.health-watches-given-back
            self._watches -= 1
            self._watching[caller] -= 1
            if not self._watching[caller]:
                del self._watching[caller]


async def _heartbeat(metrics: Metrics) -> None:
    """The event loop's heartbeat, which the metrics port's probes read (on their own thread:
    without it they answered 200 from an aggregator whose loop had stalled)."""
    while True:
        # defence: service.loop-heartbeat
        metrics.beat = time.monotonic()
        await asyncio.sleep(1.0)


async def _set_health(health: Any, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set("", status)
    await health.set(SERVICE_NAME, status)
    # defence: service.ready-probe-follows-health
    _metrics.is_serving = serving
    _metrics.serving.set(1 if serving else 0)


async def _checkpointer(core: Core) -> None:
    while True:
        await asyncio.sleep(1.0)
        if core.job is not None and core.healthy:
            with contextlib.suppress(Exception):  # a store down is the watcher's to report
                await core.loop.run_in_executor(core.readers, core.job.store.checkpoint)


def _failure(e: BaseException) -> str:
    """What a log line says of a failure: a StoreError's own text (ours: the class, the
    SQLSTATE and a known cause, such as a full disk, never a driver's message), else the
    class alone (it was the class alone for both: "StoreError", naming no cause)."""
    # defence: service.store-failures-told-with-their-cause
    return str(e) if isinstance(e, StoreError) else type(e).__name__


CERTIFICATE_WARN_DAYS = 30  # a certificate ending within this many days is warned of
CERTIFICATE_CHECK_SECONDS = 3600.0  # how often the certificates' ends are looked at again


def certificate_ends(files: ServerFiles) -> dict[str, dt.datetime]:
    """When the aggregator's TLS certificate and its federation's CA certificate (the one
    ending last, of several during a rotation) stop being valid."""
    server = x509.load_pem_x509_certificate(files.server_cert)
    return {"server": server.not_valid_after_utc,
            "ca": max(c.not_valid_after_utc for c in pki.trust_anchors(files.ca_cert))}


async def _watch_certificates(files: ServerFiles, metrics: Metrics, *,
                              clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(
                                  dt.UTC)) -> None:
    """Says when the certificates end, at start and then hourly: a warning from
    CERTIFICATE_WARN_DAYS before, an error once ended (sites can no longer connect; renew
    it and restart), and each end as a metric to alert on. An aggregator whose certificate
    ended while it ran said nothing, metrics and health unchanged, while every site was
    refused (an outside operator)."""
    ends = certificate_ends(files)
    for name, end in ends.items():
        metrics.certificate_expiry.labels(name).set(end.timestamp())
    first = True
    while True:
        now = clock()
        for name, end in ends.items():
            left = end - now
            what = f"the {name} certificate ({'ca.crt' if name == 'ca' else 'server.crt'})"
            # defence: service.certificate-ends-said
            if left <= dt.timedelta(0):
                log.error(f"{what} ended {end:%Y-%m-%d %H:%M} UTC: no site can connect; "
                          "issue a new one and restart the aggregator",
                          extra={"event": "certificate_expired", "reason": name})
            # defence: service.certificate-ending-warned
            elif left <= dt.timedelta(days=CERTIFICATE_WARN_DAYS):
                log.warning(f"{what} ends {end:%Y-%m-%d %H:%M} UTC, in {left.days} days: "
                            "issue a new one and restart the aggregator before then",
                            extra={"event": "certificate_ending", "reason": name})
            elif first:
                log.info(f"{what} ends {end:%Y-%m-%d} UTC",
                         extra={"event": "certificate", "reason": name})
        first = False
        await asyncio.sleep(CERTIFICATE_CHECK_SECONDS)


async def _ticker(core: Core) -> None:
    while True:
        await asyncio.sleep(0.2)
        if core.job is not None and core.healthy:
            try:
                await core.run(core.job.tick)
            # defence: service.ticker-outlives-failures (it alone closes stages at their
            # deadlines: if it died, no round would ever end for want of a site again)
            except Exception as e:
                log.error("stage close failed", extra={"event": "tick_error",
                                                       "reason": _failure(e)})
                core.healthy = False  # the watcher reloads the job from the store


async def _watch(core: Core, health: Any) -> None:
    """Health follows the store: NOT_SERVING while it does not answer; on recovery, the job
    reloads from it (its in-memory state may be ahead of what was committed)."""
    serving = True
    while True:
        await asyncio.sleep(1.0)
        job = core.job
        if job is None:
            continue
        why = ""
        try:
            # defence: service.ping-off-the-job-thread
            await asyncio.wait_for(core.loop.run_in_executor(core.pinger, job.store.ping),
                                   timeout=PING_TIMEOUT_SECONDS)
            ok = True
        except StoreError as e:
            ok, why = False, _failure(e)
        except TimeoutError:
            ok, why = False, f"the store did not answer within {PING_TIMEOUT_SECONDS:g} s"
        if ok and not core.healthy:
            try:
                # serving again needs a write that commits, not only a read: a store that
                # refused the job's writes (read-only, a full disk) answered the read ping,
                # and health flapped back to SERVING every second
                # defence: service.recovery-proves-a-write
                await asyncio.wait_for(core.loop.run_in_executor(
                    core.pinger, functools.partial(job.store.ping, write=True)),
                    timeout=PING_TIMEOUT_SECONDS)
                # defence: service.recovered-job-keeps-metrics
                fresh = Job(job.config, job.roster, job.store, job._initial,
                            on_change=core.notify, metrics=job.metrics)
                await core.run(fresh.recover)
                core.job = fresh
                core.healthy = True
            except Exception as e:  # not recovered yet: the next second tries again
                failure = _failure(e)
                log.error("recovery failed", extra={"event": "recovery_error",
                                                    "reason": failure})
                ok, why = False, f"recovery failed: {failure}"
        elif not ok:
            core.healthy = False
            # a store that hangs (rather than fails) marked nothing stale: the call it held
            # returned when it woke, the tick queued behind it found the stage's deadline
            # passed during the hang and closed it, and the round (every site's update spent)
            # aborted, ending the job. Stale, the job refuses everything until it is rebuilt
            # from the store, with its deadlines started again, as after a failure.
            # defence: service.hung-store-marks-the-job-stale
            job.stale = True
        if ok != serving:
            await _set_health(health, ok)
            serving = ok
            # (the line said "not serving", never why: a hung store, a lost lease and a
            # full disk read the same)
            # defence: service.health-change-says-why
            log.warning("health changed", extra={
                "event": "health", "reason": "serving" if ok else f"not serving: {why}"})


__all__ = ["FAILED_PRECONDITION", "INVALID_ARGUMENT", "PERMISSION_DENIED",
           "RESOURCE_EXHAUSTED", "AggregationService", "serve"]
