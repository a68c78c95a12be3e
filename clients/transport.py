"""The site's gRPC connection: mTLS, retries with backoff and jitter, resumable chunked transfer.

- Every call is retried on UNAVAILABLE (the aggregator restarting, recovering or unreachable)
  and on CANCELLED (a call the aggregator's shutdown cut off) with exponential backoff and
  full jitter, up to ``retry_seconds`` in all; every other status is a refusal and surfaces at
  once as :class:`~clients.errors.AggregatorRefused` naming the code and the aggregator's
  reason.
- Uploads are split into 1 MiB content-addressed chunks; the site asks which ones the
  aggregator lacks and sends only those, so a broken upload resumes where it stopped and a
  repeated one sends nothing.
- Downloads check every chunk against its id.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from clients.errors import AggregatorRefused, AggregatorUnavailable, AnswerRefused, SiteError, shown
from secagg.errors import ConfigurationError
from secagg.federation.config import SDK_CHUNK_BYTES
from secagg.federation.kit import SiteKit
from secagg.v1 import service_pb2, service_pb2_grpc
from secagg.wire import Blob

T = TypeVar("T")
RETRY_SAID_AFTER_SECONDS = 5.0  # retries going on longer than this are said in the log
CHUNK_BYTES = SDK_CHUNK_BYTES  # what the aggregator's limits and upload budget assume
IDS_PER_CALL = 1024
LOST_CHUNK_RETRIES = 3
# a payload's bytes are sent at most this many times over, in all: enough for an honest but
# flaky link (each cut resends only what was not stored), not for hundreds of copies
UPLOAD_SEND_FACTOR = 16
# the slowest link a transfer is given time for: a 1 MiB chunk within the aggregator's
# [limits] stream_idle_seconds (60 s) is ~17 KB/s
MIN_LINK_BYTES_PER_SECOND = 16_000
_log = logging.getLogger("clients")
Progress = Callable[[str, int, int], None]  # (what, done, total)


CLOSED = ("this site's connection is closed (Site.close(), or the end of its with block): "
          "connect again with Site.connect")


class _RateWatch:
    """Cancels a streaming download once ``due()`` (a time.monotonic() value that moves on as
    bytes arrive) has passed. An aggregator that named a large payload and then sent nothing
    held a site in one call whose deadline was set from the size it claimed (800 MB: 14
    hours, not a byte moving); now the bytes must keep arriving at the slowest supported
    link's pace, after the transfer's allowance (Connection.download)."""

    def __init__(self, call: Any, due: Callable[[], float]) -> None:
        self.fired = False
        self._call, self._due = call, due
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="secagg-download-watch",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(max(0.0, min(1.0, self._due() - time.monotonic()))):
            if time.monotonic() >= self._due():
                self.fired = True
                self._call.cancel()
                return

    def close(self) -> None:
        self._stop.set()


KEEPALIVE_SECONDS = 20.0  # an idle channel pings the aggregator this often (it allows 10 s)
# and takes a ping unanswered this long for a dead link: as the aggregator's own timeout, a
# ping's answer can wait behind a slow link's queued chunks (20 s closed healthy connections
# on ~20 KB/s links)
KEEPALIVE_TIMEOUT_SECONDS = 60.0


def keepalive_options() -> list[tuple[str, int]]:
    """The channel's HTTP/2 keepalive: a connection a NAT or firewall dropped silently while
    the site trained (idle for minutes) left every call after it ending DEADLINE_EXCEEDED
    (the middlebox keeps the socket open), until the round was lost. With it, the first call
    after a long idle sends a ping, and one unanswered for KEEPALIVE_TIMEOUT_SECONDS closes
    the connection: the next retry dials a new one (measured: the third call goes through).
    The aggregator permits pings with no call in flight, which gRPC's default counts as
    strikes against the client."""
    # defence: sdk.channel-keepalive
    return [("grpc.keepalive_time_ms", int(KEEPALIVE_SECONDS * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000))]


class Connection:
    closed = False  # (set by close)

    def __init__(self, kit: SiteKit, *, retry_seconds: float = 300.0,
                 call_timeout: float = 60.0) -> None:
        # ("5" failed at the first call; NaN retried an unreachable aggregator for ever)
        # defence: sdk.retry-seconds-checked
        for name, value in (("retry_seconds", retry_seconds), ("call_timeout", call_timeout)):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0 <= value < math.inf):
                raise ConfigurationError(
                    f"{name} must be a number of seconds >= 0, got {value!r}")
        limits = kit.config.limits
        credentials = grpc.ssl_channel_credentials(root_certificates=kit.ca_pem,
                                                   private_key=kit.key_pem,
                                                   certificate_chain=kit.cert_pem)
        # defence: sdk.reply-size-bounded
        self._aggregator = kit.config.aggregator
        self.channel = grpc.secure_channel(kit.config.aggregator, credentials, options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.enable_retries", 0),  # we retry ourselves, with jitter, and say why
            # defence: sdk.channel-takes-keepalive
            *keepalive_options(),
        ])
        self.stub = service_pb2_grpc.AggregationStub(self.channel)  # type: ignore[no-untyped-call]
        self.retry_seconds = retry_seconds
        self.call_timeout = call_timeout
        self._random = random.SystemRandom()
        self.bytes_sent = 0  # request messages and chunk payloads, as sent (retries included)
        self.bytes_received = 0

    def close(self) -> None:
        self.closed = True
        self.channel.close()

    def check_open(self) -> None:
        """A clear error for a call on a closed connection (grpc's is a ValueError from deep
        inside, which the SDK then took for the aggregator's doing)."""
        # defence: sdk.closed-connection-named
        if self.closed:
            raise SiteError(CLOSED)

    # ---- calls ---------------------------------------------------------------------------------

    def call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        def attempt() -> Any:
            self.bytes_sent += request.ByteSize()
            reply = getattr(self.stub, method)(request, timeout=timeout or self.call_timeout)
            self.bytes_received += reply.ByteSize()
            return reply

        return self._retry(attempt)

    def _transfer_end(self, nbytes: int) -> float:
        """When a transfer of ``nbytes`` must be over: what the slowest link the federation
        supports (MIN_LINK_BYTES_PER_SECOND) needs for it, plus ``retry_seconds``."""
        # defence: sdk.transfer-time-bounded
        return time.monotonic() + self.retry_seconds + nbytes / MIN_LINK_BYTES_PER_SECOND

    def _stream_timeout(self, nbytes: int, end: float) -> float:
        """The deadline of one streaming call moving ``nbytes``: what the slowest supported
        link needs (at least ``call_timeout``), and never past the transfer's ``end``: a
        lying aggregator that names many chunks cannot stretch one call for days."""
        wanted = max(self.call_timeout, nbytes / MIN_LINK_BYTES_PER_SECOND)
        # defence: sdk.stream-deadline-within-the-transfer
        return max(1.0, min(wanted, end - time.monotonic()))

    def _retry(self, attempt: Callable[[], T], *, progress: Callable[[], int] | None = None,
               end: float | None = None) -> T:
        """``attempt()`` until it answers, through UNAVAILABLE and CANCELLED for up to
        ``retry_seconds``. ``progress``: for a streaming transfer that must be over by
        ``end`` (``_transfer_end``), a count that grows as data moves; an attempt cut by its
        own deadline (DEADLINE_EXCEEDED) after moving data is a slow link, not a refusal, and
        is resumed, and progress restarts the ``retry_seconds``; but past ``end`` the
        transfer fails: an aggregator trickling a chunk per deadline cannot hold a site for
        hours."""
        self.check_open()
        began = time.monotonic()
        deadline = began + self.retry_seconds
        overall = end if end is not None else float("inf")
        delay = 0.1
        said = False  # (a long wait is said once)
        while True:
            if time.monotonic() > overall:
                raise AggregatorUnavailable(
                    f"a transfer took {time.monotonic() - began:.0f} s, longer than a link of "
                    f"{MIN_LINK_BYTES_PER_SECOND // 1000} KB/s needs")
            before = progress() if progress is not None else 0
            try:
                return attempt()
            except ValueError:
                self.check_open()  # closed by another thread mid-call: said as such
                raise
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
                # a transfer over a link slower than its deadline assumed (a hospital's
                # uplink): it was a final DEADLINE_EXCEEDED, and the site dropped out
                # defence: sdk.slow-transfer-resumed
                if progress is not None and progress() > before:
                    deadline = min(time.monotonic() + self.retry_seconds, overall)
                    delay = 0.1
                    # defence: sdk.only-deadlines-resumed-after-progress
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        _log.info("a transfer outlasted its deadline while moving data (a "
                                  "slow link); resuming it")
                        continue
                # CANCELLED: this SDK never cancels its own calls, so a call cut off by the
                # aggregator's shutdown; retried like UNAVAILABLE (every call is idempotent)
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise AggregatorRefused(code.name, _details(e)) from None
                # a certificate the other side will not accept does not get better with
                # time: said at once, not as "unavailable" after retry_seconds
                # defence: sdk.certificate-failures-not-retried
                # (a certificate that does not name the host dialled was told as one of
                # another CA, the cause cut off at the end of gRPC's text)
                if "Hostname Verification" in _details(e):
                    raise AggregatorRefused(
                        "UNAUTHENTICATED", "the aggregator's certificate does not name the "
                        f"host this site dials ([federation] aggregator = "
                        f"{self._aggregator!r}): dial a name its certificate holds, or have "
                        "the operator issue one naming this host (federation init --host)"
                        ) from None
                if any(m in _details(e) for m in _CERTIFICATE_FAILURES):
                    raise AggregatorRefused(
                        "UNAUTHENTICATED", "the TLS handshake failed on a certificate: this "
                        "site's ca.crt is not the CA of the aggregator's certificate, or the "
                        "aggregator does not accept this site's certificate (another "
                        f"federation's, or expired): {_details(e)}") from None
                # the wait before the next try (full jitter); the tries end where the next
                # would start past the deadline (the full delay was compared: a site gave up
                # with a third of retry_seconds left)
                pause = self._random.uniform(0, delay)
                # defence: sdk.retries-end-after-retry-seconds
                if time.monotonic() + pause > deadline:
                    raise AggregatorUnavailable(
                        # (the time it was tried for: it said retry_seconds, 5 s, after 2)
                        f"the aggregator stayed unavailable for "
                        f"{time.monotonic() - began:.1f} s (the next try would be past "
                        f"retry_seconds={self.retry_seconds:g}): {_details(e)}") from None
                # a wait of more than a few seconds is said once a call (a training script
                # sat silent for up to retry_seconds, 300 s by default, while the aggregator
                # was down)
                # defence: sdk.long-retries-said
                if not said and time.monotonic() - began >= RETRY_SAID_AFTER_SECONDS:
                    said = True
                    _log.warning("the aggregator is unavailable (%s); retrying for up to "
                                 "%.0f s more", shown(_details(e), 200),
                                 max(0.0, deadline - time.monotonic()))
                time.sleep(pause)
                # (every site retrying a restarting aggregator 20 times a second)
                # defence: sdk.retries-back-off
                delay = min(delay * 2, 5.0)

    # ---- chunks --------------------------------------------------------------------------------

    def upload(self, data: bytes, *, progress: Progress | None = None,
               what: str = "upload", _allowance: list[int] | None = None) -> Blob:
        """Store ``data`` at the aggregator as chunks; resumes after a broken connection.

        However often the aggregator asks again (an honest one after a cut connection or a
        crash), this sends at most UPLOAD_SEND_FACTOR times ``data``'s bytes in all, then
        refuses (RESOURCE_EXHAUSTED): a lying aggregator that reads every upload and answers
        UNAVAILABLE made a site send its payload hundreds of times over."""
        allowance = (_allowance if _allowance is not None
                     else [UPLOAD_SEND_FACTOR * max(len(data), 1)])
        view = memoryview(data)
        pieces = [view[i:i + CHUNK_BYTES] for i in range(0, len(view), CHUNK_BYTES)]
        ids = [hashlib.sha256(p).digest() for p in pieces]
        by_id = dict(zip(ids, pieces, strict=True))
        total = len(ids)
        end = self._transfer_end(len(data))
        # chunks put on the wire in all; how many were missing before the last attempt;
        # whether it ran out of time
        sent, before, slow = [0], [total], [False]

        def attempt() -> None:
            missing = self._missing(ids)
            # a transfer resumed as slow, after which the aggregator holds no more chunks
            # than before (a link that cannot carry one chunk within the deadline, an
            # aggregator that reads and keeps nothing): refused, not resumed again
            if slow[0] and len(missing) >= before[0]:
                raise AnswerRefused("DEADLINE_EXCEEDED", f"the {what} made no progress "
                                    "within the deadline: no chunk sent was stored")
            before[0], slow[0] = len(missing), False
            # defence: sdk.upload-offered-only
            if not set(missing) <= by_id.keys():
                raise AnswerRefused("INVALID_ARGUMENT", f"the aggregator asked for a chunk "
                                                        f"of the {what} this site did not "
                                                        "offer")
            done = total - len(missing)
            if progress:
                progress(what, done, total)
            if not missing:
                return
            # defence: sdk.upload-resend-bounded
            if sum(len(by_id[c]) for c in dict.fromkeys(missing)) > allowance[0]:
                raise AnswerRefused("RESOURCE_EXHAUSTED", f"the aggregator asked for the "
                                    f"{what} more than {UPLOAD_SEND_FACTOR} times over")

            def stream() -> Iterator[service_pb2.Chunk]:
                nonlocal done
                for cid in dict.fromkeys(missing):
                    chunk = service_pb2.Chunk(chunk_id=cid, data=bytes(by_id[cid]))
                    self.bytes_sent += chunk.ByteSize()
                    allowance[0] -= len(by_id[cid])
                    sent[0] += 1
                    yield chunk
                    done += 1
                    if progress:
                        progress(what, done, total)

            nbytes = sum(len(by_id[c]) for c in dict.fromkeys(missing))
            try:
                self.stub.PutChunks(stream(), timeout=self._stream_timeout(nbytes, end))
            except grpc.RpcError as e:
                slow[0] = getattr(e, "code", lambda: None)() == grpc.StatusCode.DEADLINE_EXCEEDED
                raise

        self._retry(attempt, progress=lambda: sent[0], end=end)
        return Blob(tuple(ids), len(data))

    def _missing(self, ids: list[bytes]) -> list[bytes]:
        missing: list[bytes] = []
        ids = list(dict.fromkeys(ids))  # a payload's repeated pieces are one chunk
        for start in range(0, len(ids), IDS_PER_CALL):
            asked = ids[start:start + IDS_PER_CALL]
            reply = self.stub.MissingChunks(service_pb2.ChunkIds(chunk_ids=asked),
                                            timeout=self.call_timeout)
            named = [bytes(c) for c in reply.chunk_ids]
            # each missing chunk once (and only chunks offered: upload checks): a reply
            # naming one chunk 200,000 times stretched the upload's deadline to days
            # defence: sdk.missing-chunks-checked
            if len(set(named)) != len(named):
                raise AnswerRefused("INVALID_ARGUMENT", "the aggregator's list of missing "
                                                        "chunks names a chunk twice")
            missing.extend(named)
        return missing

    def upload_and_send(self, data: bytes, send: Callable[[Blob], T], *,
                        progress: Progress | None = None, what: str = "upload") -> T:
        """Upload ``data``, then ``send(blob)``: the call whose request refers to it.

        Chunks the aggregator acknowledged can be lost before a message refers to them: its
        store crashed before an unsynced commit reached the disk, or was restored from a
        backup. The call is then refused FAILED_PRECONDITION; if the aggregator now lacks
        chunks of ``data``, they are sent again and the same request made again (the same
        bytes, the same message: nothing new leaves), up to LOST_CHUNK_RETRIES times. Before,
        the site gave up its round."""
        allowance = [UPLOAD_SEND_FACTOR * max(len(data), 1)]  # over every resubmission
        for attempt in range(LOST_CHUNK_RETRIES + 1):
            blob = self.upload(data, progress=progress, what=what, _allowance=allowance)
            ids = list(blob.chunk_ids)
            try:
                return send(blob)
            except AggregatorRefused as e:
                # defence: sdk.lost-chunks-sent-again
                if (e.code != "FAILED_PRECONDITION" or attempt == LOST_CHUNK_RETRIES
                        or not self._retry(lambda: self._missing(ids))):  # noqa: B023
                    raise
                _log.warning("the aggregator lost chunks of the %s it had acknowledged; "
                             "sending them again", what)
        raise AssertionError("unreachable")

    def download(self, blob: Blob, *, max_size: int, progress: Progress | None = None,
                 what: str = "download",
                 check: Callable[[list[bytes]], None] | None = None) -> bytes:
        """The payload ``blob`` names, checked against its chunk ids and size. ``max_size``:
        the most the caller can need (required: every size the aggregator names is a claim);
        a larger blob is refused before anything is fetched. ``check``: called with the
        payload's parts in order (the chunks received, each once) before they are joined; it
        raises to refuse a payload the caller can tell is not the one it wants."""
        # defence: sdk.download-bounded
        if blob.size > max_size:
            raise AnswerRefused("OUT_OF_RANGE", f"the aggregator named a {what} of "
                                                f"{blob.size} bytes (at most {max_size})")
        # every chunk holds a byte at least (an empty payload is one empty chunk): a blob
        # naming more chunks than it has bytes is a lie, and would stretch the transfer
        # defence: sdk.download-chunk-count-bounded
        if len(blob.chunk_ids) > max(1, blob.size):
            raise AnswerRefused("OUT_OF_RANGE", f"the aggregator named a {what} of "
                                                f"{blob.size} bytes in "
                                                f"{len(blob.chunk_ids)} chunks")
        began = time.monotonic()
        end = self._transfer_end(blob.size)
        got: dict[bytes, bytes] = {}
        wanted = list(dict.fromkeys(blob.chunk_ids))
        held = 0  # bytes of the chunks kept so far: never more than the blob's size

        def due() -> float:
            """When the next chunk must have arrived: the transfer's allowance
            (retry_seconds), and time for what has arrived and one chunk more at the slowest
            supported link's pace: not the size the aggregator claims."""
            # defence: sdk.download-keeps-its-pace
            return (began + self.retry_seconds
                    + (held + CHUNK_BYTES) / MIN_LINK_BYTES_PER_SECOND)

        def attempt() -> None:
            nonlocal held
            missing = [c for c in wanted if c not in got]
            for start in range(0, len(missing), IDS_PER_CALL):
                asked = missing[start:start + IDS_PER_CALL]
                pending = set(asked)
                request = service_pb2.ChunkIds(chunk_ids=asked)
                call = self.stub.GetChunks(request, timeout=self._stream_timeout(
                    blob.size - held, end))
                watch = _RateWatch(call, due) if hasattr(call, "cancel") else None
                try:
                    for chunk in call:
                        cid, data = bytes(chunk.chunk_id), bytes(chunk.data)
                        # only what was asked for, each once, and no more bytes than the
                        # blob holds: a lying aggregator cannot make a site buffer what it
                        # likes
                        # defence: sdk.download-asked-only
                        if cid not in pending or held + len(data) > blob.size:
                            raise AnswerRefused("DATA_LOSS", f"the aggregator sent a chunk "
                                                             f"of the {what} that was not "
                                                             "asked for")
                        # defence: sdk.download-chunk-matches-id
                        if hashlib.sha256(data).digest() != cid:
                            raise AnswerRefused("DATA_LOSS", "a downloaded chunk does not "
                                                             "match its id")
                        pending.discard(cid)
                        got[cid] = data
                        held += len(data)
                        self.bytes_received += len(data)
                        if progress:
                            progress(what, len(got), len(wanted))
                except grpc.RpcError:
                    # defence: sdk.download-pace-refused
                    if watch is not None and watch.fired:
                        raise AnswerRefused(
                            "DEADLINE_EXCEEDED", f"the aggregator sent the {what} slower than "
                            f"{MIN_LINK_BYTES_PER_SECOND // 1000} KB/s ({held} of "
                            f"{blob.size} bytes in {time.monotonic() - began:.0f} s)") from None
                    raise
                finally:
                    if watch is not None:
                        watch.close()

        self._retry(attempt, progress=lambda: len(got), end=end)
        # a stream that ended without every chunk asked for (the retry covers broken ones)
        # defence: sdk.download-complete
        if len(got) != len(wanted):
            raise AnswerRefused("DATA_LOSS", f"the aggregator's {what} stream ended "
                                             "without every chunk asked for")
        # sized before joining: a blob naming one chunk many times must not make us build it
        # defence: sdk.download-sized-before-join
        if sum(len(got[c]) for c in blob.chunk_ids) != blob.size:
            raise AnswerRefused("DATA_LOSS", "a downloaded payload has the wrong size")
        if check is not None:
            check([got[c] for c in blob.chunk_ids])
        return b"".join(got[c] for c in blob.chunk_ids)


_CERTIFICATE_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA",
                         "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
                         "TLSV1_ALERT_DECRYPT_ERROR", "Hostname Verification Check failed")


def _details(e: grpc.RpcError) -> str:
    """The status's details, as the aggregator chose them: escaped and cut short (they
    reach AggregatorUnavailable's message, which training scripts log)."""
    details = e.details() if hasattr(e, "details") else None
    # defence: sdk.status-details-shown-safely
    return shown(str(details or "no details"))
