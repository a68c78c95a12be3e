"""The site's retry rule: UNAVAILABLE and CANCELLED (a call the aggregator's shutdown cut off)
are retried; every other status is a refusal at once."""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import grpc
import pytest

from clients.errors import AggregatorRefused, AggregatorUnavailable, AnswerRefused
from clients.transport import Blob, Connection


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"{self._code.name} from the test"


def _connection(retry_seconds: float = 5.0) -> Any:
    conn = Connection.__new__(Connection)  # no channel: _retry only needs these
    conn.retry_seconds = retry_seconds
    conn._random = random.SystemRandom()
    conn._aggregator = "vm.example.org:50051"
    return conn


def _failing(codes: list[grpc.StatusCode]) -> Any:
    calls = []

    def attempt() -> str:
        calls.append(1)
        if len(calls) <= len(codes):
            raise _Status(codes[len(calls) - 1])
        return "answer"

    return attempt, calls


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_transient_statuses_are_retried(code: grpc.StatusCode) -> None:
    attempt, calls = _failing([code, code])
    assert _connection()._retry(attempt) == "answer"
    assert len(calls) == 3


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT])
def test_refusals_surface_at_once_naming_the_code(code: grpc.StatusCode) -> None:
    attempt, calls = _failing([code])
    with pytest.raises(AggregatorRefused, match=code.name) as refused:
        _connection()._retry(attempt)
    assert len(calls) == 1
    # the aggregator's own status, not an answer this site refused
    assert not isinstance(refused.value, AnswerRefused)
    assert str(refused.value).startswith(f"aggregator refused ({code.name})")


def test_retries_stop_after_retry_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    import clients.transport

    clock = [0.0]  # (a fake clock: a retry loop that never stops fails at the cap, at once)
    monkeypatch.setattr(clients.transport.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(clients.transport.time, "sleep",
                        lambda s: clock.__setitem__(0, clock[0] + s))
    attempt, calls = _failing([grpc.StatusCode.CANCELLED] * 1000)
    with pytest.raises(AggregatorUnavailable, match="stayed unavailable") as e:
        _connection(retry_seconds=30)._retry(attempt)
    assert "retry_seconds=30" in str(e.value) and 25 <= clock[0] <= 30
    assert len(calls) < 100  # backed off, not hammering the aggregator


def test_a_long_wait_for_the_aggregator_is_said_once(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A training script sat silent for up to retry_seconds (300 s by default) while the
    aggregator was down. Past a few seconds of retries the SDK says so, once a call; a
    blip of a retry or two says nothing."""
    import logging

    import clients.transport

    clock = [0.0]
    monkeypatch.setattr(clients.transport.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(clients.transport.time, "sleep",
                        lambda s: clock.__setitem__(0, clock[0] + s))
    with caplog.at_level(logging.WARNING, logger="clients"):
        attempt, _ = _failing([grpc.StatusCode.UNAVAILABLE] * 2)
        assert _connection(retry_seconds=30)._retry(attempt) == "answer"
        assert caplog.records == []
        attempt, _ = _failing([grpc.StatusCode.UNAVAILABLE] * 1000)
        with pytest.raises(AggregatorUnavailable):
            _connection(retry_seconds=30)._retry(attempt)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "the aggregator is unavailable" in said[0], said
    assert "retrying for up to" in said[0]


class _HostnameFailure(_Status):
    def details(self) -> str:
        return ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:5: "
                "Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: Hostname "
                "Verification Check failed")


def test_a_certificate_that_does_not_name_the_host_dialled_is_said_so_at_once() -> None:
    """Told as "ca.crt is not the CA of the aggregator's certificate, or another
    federation's, or expired", the cause cut off at the end of gRPC's text."""
    calls = []

    def attempt() -> str:
        calls.append(1)
        raise _HostnameFailure(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(AggregatorRefused, match="does not name the host this site dials") as e:
        _connection()._retry(attempt)
    assert "vm.example.org:50051" in str(e.value) and len(calls) == 1


class _ForgetfulAggregator:
    """MissingChunks / PutChunks / Submit over a dict; the first ``forget`` Submits find the
    store lost every chunk (a crash before an unsynced commit reached the disk) and are
    refused as the aggregator refuses them; ``refuse`` refuses every Submit for another
    reason, with every chunk present."""

    def __init__(self, forget: int, refuse: bool = False) -> None:
        self.chunks: dict[bytes, bytes] = {}
        self.forget, self.refuse = forget, refuse
        self.puts: list[bytes] = []
        self.submits = 0

    def MissingChunks(self, request: Any, timeout: float) -> Any:
        from secagg.v1 import service_pb2

        return service_pb2.ChunkIds(chunk_ids=[c for c in request.chunk_ids
                                               if bytes(c) not in self.chunks])

    def PutChunks(self, chunks: Any, timeout: float) -> Any:
        from secagg.v1 import service_pb2

        n = 0
        for chunk in chunks:
            self.chunks[bytes(chunk.chunk_id)] = bytes(chunk.data)
            self.puts.append(bytes(chunk.chunk_id))
            n += 1
        return service_pb2.PutChunksResponse(stored=n)

    def Submit(self, request: Any, timeout: float) -> Any:
        from secagg.v1 import service_pb2

        self.submits += 1
        if self.forget:
            self.forget -= 1
            self.chunks.clear()
        ids = list(request.masked_input.masked_input.chunk_ids)
        if self.refuse or any(bytes(c) not in self.chunks for c in ids):
            raise _Status(grpc.StatusCode.FAILED_PRECONDITION)
        return service_pb2.SubmitResponse()


def _recorded_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The transport's clock made fake: its sleeps advance it (no real waiting) and are
    recorded in the list returned."""
    import clients.transport

    clock, pauses = [0.0], []
    monkeypatch.setattr(clients.transport.time, "monotonic", lambda: clock[0])

    def sleep(s: float) -> None:
        pauses.append(s)
        clock[0] += s

    monkeypatch.setattr(clients.transport.time, "sleep", sleep)
    return pauses


def _submitting(stub: _ForgetfulAggregator) -> tuple[Any, Any]:
    from secagg.v1 import service_pb2

    conn = _connection()
    conn.stub, conn.call_timeout, conn.bytes_sent, conn.bytes_received = stub, 5.0, 0, 0

    def request(blob: Any) -> Any:
        return conn.call("Submit", service_pb2.SubmitRequest(
            round_id="r", masked_input=service_pb2.MaskedInputRef(
                site_id=1, masked_input=blob.to_proto())))

    return conn, request


def test_chunks_the_aggregator_lost_after_acknowledging_them_are_sent_again() -> None:
    """The store lost acknowledged chunks before the message referring to them arrived: the
    site sends the same chunks again and the same message, instead of giving up its round."""
    stub = _ForgetfulAggregator(forget=2)
    conn, request = _submitting(stub)
    data = os.urandom(2_500_000)  # 3 chunks
    conn.upload_and_send(data, request, what="masked input")
    assert stub.submits == 3 and len(stub.puts) == 9 and len(set(stub.puts)) == 3


def test_a_refusal_with_every_chunk_present_is_not_retried() -> None:
    stub = _ForgetfulAggregator(forget=0, refuse=True)
    conn, request = _submitting(stub)
    with pytest.raises(AggregatorRefused, match="FAILED_PRECONDITION"):
        conn.upload_and_send(b"x" * 1000, request)
    assert stub.submits == 1 and len(stub.puts) == 1


def test_an_aggregator_that_keeps_losing_chunks_is_given_up_on() -> None:
    from clients.transport import LOST_CHUNK_RETRIES

    stub = _ForgetfulAggregator(forget=100)
    conn, request = _submitting(stub)
    with pytest.raises(AggregatorRefused, match="FAILED_PRECONDITION"):
        conn.upload_and_send(b"x" * 1000, request)
    assert stub.submits == LOST_CHUNK_RETRIES + 1


class _Insatiable(_ForgetfulAggregator):
    """Reads every upload whole, then answers UNAVAILABLE; asks for every chunk again."""

    def __init__(self) -> None:
        super().__init__(forget=0)
        self.bytes = 0

    def MissingChunks(self, request: Any, timeout: float) -> Any:
        from secagg.v1 import service_pb2

        return service_pb2.ChunkIds(chunk_ids=list(request.chunk_ids))

    def PutChunks(self, chunks: Any, timeout: float) -> Any:
        for chunk in chunks:
            self.bytes += len(chunk.data)
        raise _Status(grpc.StatusCode.UNAVAILABLE)


@pytest.mark.parametrize("via", ["upload", "upload_and_send"])
def test_a_lying_aggregator_gets_a_payload_a_bounded_number_of_times_over(
        via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """It read each upload whole and said UNAVAILABLE, and the site sent it again for
    retry_seconds (25 times over in a minute, hundreds in all); now at most 16 times over."""
    import clients.transport
    from clients.transport import UPLOAD_SEND_FACTOR

    monkeypatch.setattr(clients.transport.time, "sleep", lambda _s: None)  # the backoff
    stub = _Insatiable()
    conn, request = _submitting(stub)
    conn.retry_seconds = 30.0
    data = os.urandom(300_000)
    with pytest.raises(AggregatorRefused, match="RESOURCE_EXHAUSTED"):
        if via == "upload":
            conn.upload(data)
        else:
            conn.upload_and_send(data, request)
    assert len(data) <= stub.bytes <= UPLOAD_SEND_FACTOR * len(data)


class _SlowLink(_ForgetfulAggregator):
    """A link slower than the transfer's deadline: each PutChunks stores ``per_call`` chunks,
    then the site's own deadline cuts it (DEADLINE_EXCEEDED); each GetChunks serves
    ``per_call`` chunks, then the same. ``per_call`` 0: the chunks are read and never
    stored."""

    def __init__(self, per_call: int) -> None:
        super().__init__(forget=0)
        self.per_call = per_call
        self.calls = 0

    def PutChunks(self, chunks: Any, timeout: float) -> Any:
        self.calls += 1
        for n, chunk in enumerate(chunks):
            if n >= self.per_call:
                break
            self.chunks[bytes(chunk.chunk_id)] = bytes(chunk.data)
        raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED)

    def GetChunks(self, request: Any, timeout: float) -> Any:
        from secagg.v1 import service_pb2

        self.calls += 1
        for cid in list(request.chunk_ids)[:self.per_call]:
            yield service_pb2.Chunk(chunk_id=cid, data=self.chunks[bytes(cid)])
        raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED)


def test_an_upload_over_a_link_slower_than_its_deadline_is_resumed() -> None:
    """A hospital's uplink slower than the deadline assumed (2 s per chunk): each attempt
    stores some chunks before the site's own deadline cuts it; the upload resumes from what
    was stored and completes (the site took its own DEADLINE_EXCEEDED for a refusal and
    dropped out of the round)."""
    stub = _SlowLink(per_call=2)
    conn, _ = _submitting(stub)
    data = os.urandom(7 * 1024 * 1024 + 5)  # 8 chunks
    blob = conn.upload(data)
    assert stub.calls == 4 and set(blob.chunk_ids) <= stub.chunks.keys()


def test_a_download_over_a_link_slower_than_its_deadline_is_resumed() -> None:
    stub = _SlowLink(per_call=3)
    conn, _ = _submitting(stub)
    data = os.urandom(7 * 1024 * 1024 + 5)
    pieces = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    stub.chunks = {hashlib.sha256(p).digest(): p for p in pieces}
    blob = Blob(tuple(hashlib.sha256(p).digest() for p in pieces), len(data))
    assert conn.download(blob, max_size=len(data)) == data
    assert stub.calls == 3


def test_a_transfer_that_stores_nothing_within_its_deadline_is_refused_at_once() -> None:
    """Chunks go out and none is stored before the deadline (a link that cannot carry one
    chunk in time, or an aggregator that reads and keeps nothing): refused DEADLINE_EXCEEDED
    after one resumption at most, not resent until the allowance runs out."""
    stub = _SlowLink(per_call=0)
    conn, _ = _submitting(stub)
    with pytest.raises(AggregatorRefused, match="DEADLINE_EXCEEDED"):
        conn.upload(os.urandom(3 * 1024 * 1024))
    assert stub.calls == 1  # the second attempt found nothing stored, and sent nothing
    stub = _SlowLink(per_call=0)
    conn, _ = _submitting(stub)
    with pytest.raises(AggregatorRefused, match="DEADLINE_EXCEEDED"):
        conn.download(Blob((b"\1" * 32,), 10), max_size=10)
    assert stub.calls == 1


def test_an_aggregator_trickling_a_chunk_per_deadline_cannot_hold_a_site_for_hours(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator serves one chunk per GetChunks call, then stalls until the site's
    deadline (200 s): each chunk was progress, restarting the retry window, and a 100-chunk
    download held the site about 5.5 hours. The transfer now gets what the slowest supported
    link needs, plus retry_seconds."""
    import clients.transport
    from clients.transport import MIN_LINK_BYTES_PER_SECOND

    clock = [0.0]
    monkeypatch.setattr(clients.transport.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(clients.transport.time, "sleep", lambda s: clock.__setitem__(
        0, clock[0] + s))

    class Trickling(_SlowLink):
        def GetChunks(self, request: Any, timeout: float) -> Any:
            clock[0] += timeout  # the stall, until the site's own deadline
            yield from super().GetChunks(request, timeout)

    stub = Trickling(per_call=1)
    conn, _ = _submitting(stub)
    pieces = [os.urandom(1 << 20) for _ in range(100)]
    stub.chunks = {hashlib.sha256(p).digest(): p for p in pieces}
    blob = Blob(tuple(hashlib.sha256(p).digest() for p in pieces), sum(map(len, pieces)))
    with pytest.raises(AggregatorUnavailable, match="longer than a link"):
        conn.download(blob, max_size=blob.size)
    assert clock[0] <= conn.retry_seconds + blob.size / MIN_LINK_BYTES_PER_SECOND + 200
    assert stub.calls < 50


class _PacedCall:
    """A GetChunks stream as gRPC's client gives it: iterable and cancellable. It sends
    ``chunks``, each after ``gap`` seconds, then (``stall``) nothing until cancelled or until
    ``deadline`` seconds have passed (the call's own deadline, DEADLINE_EXCEEDED)."""

    def __init__(self, chunks: list[Any], gap: float, stall: bool, deadline: float) -> None:
        import threading

        self.chunks, self.gap, self.stall, self.deadline = chunks, gap, stall, deadline
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Any:
        for chunk in self.chunks:
            if self.cancelled.wait(self.gap):
                raise _Status(grpc.StatusCode.CANCELLED)
            yield chunk
        if self.stall:
            if self.cancelled.wait(self.deadline):
                raise _Status(grpc.StatusCode.CANCELLED)
            raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize("served", [0, 2])
def test_a_download_the_aggregator_stops_sending_is_refused_at_the_slowest_links_pace(
        served: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An aggregator that named a first model of 800 MB and then sent nothing held a site in
    one GetChunks call whose deadline came from the size it claimed (14 hours, not a byte
    moving). The bytes must now keep arriving at the slowest supported link's pace, after
    the transfer's allowance: here (a link of 2 chunks a second, no allowance) the stall is
    refused within a chunk's time of the last chunk, naming the pace."""
    import time

    import clients.transport
    from secagg.v1 import service_pb2

    monkeypatch.setattr(clients.transport, "MIN_LINK_BYTES_PER_SECOND",
                        clients.transport.CHUNK_BYTES * 2)
    pieces = [os.urandom(1000) for _ in range(5)]
    ids = [hashlib.sha256(p).digest() for p in pieces]
    chunks = [service_pb2.Chunk(chunk_id=c, data=p) for c, p in zip(ids, pieces, strict=True)]

    class Stub:
        def GetChunks(self, request: Any, timeout: float) -> Any:
            return _PacedCall(chunks[:served], gap=0.01, stall=True, deadline=5.0)

    conn, _ = _submitting(_ForgetfulAggregator(forget=0))
    conn.stub, conn.retry_seconds = Stub(), 0.0
    began = time.monotonic()
    with pytest.raises(AggregatorRefused, match=r"DEADLINE_EXCEEDED.*slower than") as e:
        conn.download(Blob(tuple(ids), 5000), max_size=10**9)
    assert time.monotonic() - began < 3.0
    assert f"{served * 1000} of 5000 bytes" in str(e.value)


def test_a_download_at_the_slowest_links_pace_is_not_cut(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pace is on what has arrived: a download whose chunks keep coming at the slowest
    link's pace is not cut, though it lasts far longer than one chunk's time in all."""
    import clients.transport
    from secagg.v1 import service_pb2

    size = clients.transport.CHUNK_BYTES
    monkeypatch.setattr(clients.transport, "MIN_LINK_BYTES_PER_SECOND", size * 2)
    pieces = [os.urandom(size) for _ in range(4)]
    ids = [hashlib.sha256(p).digest() for p in pieces]
    chunks = [service_pb2.Chunk(chunk_id=c, data=p) for c, p in zip(ids, pieces, strict=True)]

    class Stub:
        def GetChunks(self, request: Any, timeout: float) -> Any:
            return _PacedCall(chunks, gap=0.25, stall=False, deadline=0.0)

    conn, _ = _submitting(_ForgetfulAggregator(forget=0))
    conn.stub, conn.retry_seconds = Stub(), 0.0
    assert conn.download(Blob(tuple(ids), 4 * size), max_size=10**9) == b"".join(pieces)


class _Listing(_ForgetfulAggregator):
    """Answers MissingChunks with what ``answer`` makes of the ids asked about; records the
    deadline of every streaming call."""

    def __init__(self, answer: Any) -> None:
        super().__init__(forget=0)
        self.answer = answer
        self.timeouts: list[float] = []

    def MissingChunks(self, request: Any, timeout: float) -> Any:
        from secagg.v1 import service_pb2

        return service_pb2.ChunkIds(chunk_ids=self.answer(list(request.chunk_ids)))

    def PutChunks(self, chunks: Any, timeout: float) -> Any:
        self.timeouts.append(timeout)
        return super().PutChunks(chunks, timeout)


@pytest.mark.parametrize("lie", ["repeated", "not asked"])
def test_a_missing_chunks_reply_that_repeats_or_invents_ids_is_refused(lie: str) -> None:
    """A lying aggregator named one chunk 200,000 times (the upload's deadline grew with the
    count, to days), or a chunk the site never asked about."""
    stub = _Listing(lambda ids: ids[:1] * 1000 if lie == "repeated" else [b"\7" * 32])
    conn, _ = _submitting(stub)
    with pytest.raises(AggregatorRefused, match="INVALID_ARGUMENT") as refused:
        conn.upload(os.urandom(3 * 1024 * 1024))
    assert stub.puts == []
    # the site's refusal of a lie, not told as the aggregator refusing the site (the code is
    # the SDK's choice: the aggregator sent no status)
    assert isinstance(refused.value, AnswerRefused)
    assert str(refused.value).startswith("this site refused the aggregator's answer "
                                         "(INVALID_ARGUMENT)")


def test_a_payload_with_repeated_pieces_uploads_once_each() -> None:
    """Repeated content (a model of zeros) has repeated chunk ids: asked about once each, so
    an honest answer lists each once."""
    stub = _Listing(lambda ids: ids)
    conn, _ = _submitting(stub)
    blob = conn.upload(bytes(3 * 1024 * 1024))
    assert len(blob.chunk_ids) == 3 and len(set(blob.chunk_ids)) == 1
    assert len(stub.puts) == 1


def test_a_streaming_calls_deadline_never_passes_the_transfers_end() -> None:
    """Each call's deadline comes from its bytes at the slowest supported link, never past
    the transfer's own end."""
    import time

    from clients.transport import MIN_LINK_BYTES_PER_SECOND

    stub = _Listing(lambda ids: ids)
    conn, _ = _submitting(stub)
    conn.call_timeout = 60.0
    now = time.monotonic()
    assert conn._stream_timeout(10, now + 1000) == 60.0
    assert conn._stream_timeout(200 * MIN_LINK_BYTES_PER_SECOND, now + 1000) == 200.0
    assert conn._stream_timeout(10 ** 12, now + 30) <= 30.0
    conn.retry_seconds = 5.0
    data = os.urandom(2 * 1024 * 1024)
    conn.upload(data)
    assert stub.timeouts and max(stub.timeouts) <= 5.0 + len(data) / MIN_LINK_BYTES_PER_SECOND


def test_the_slowest_link_a_transfer_is_given_time_for_is_the_documented_16_kb_a_second(
        ) -> None:
    """README: a download's chunks must keep arriving at 16 KB/s on average after
    ``retry_seconds`` of allowance. The tests above read the pace from the constant they
    check, so a pace written as 16 bytes a second (a lying aggregator then holds a site a
    thousand times as long on one named payload) passed them: here the figure is the
    README's."""
    import time

    stub = _Listing(lambda ids: ids)
    conn, _ = _submitting(stub)
    conn.call_timeout, conn.retry_seconds = 1.0, 5.0
    now = time.monotonic()
    # 1.6 MB at 16 KB/s: 100 s, within a transfer ending in 10,000 s
    assert conn._stream_timeout(1_600_000, now + 10_000) == pytest.approx(100.0)
    assert conn._transfer_end(1_600_000) - time.monotonic() == pytest.approx(105.0, abs=1.0)


def test_a_blob_naming_more_chunks_than_bytes_is_refused_before_fetching() -> None:
    stub = _SlowLink(per_call=1)
    conn, _ = _submitting(stub)
    blob = Blob(tuple(bytes([i % 256, i // 256]) * 16 for i in range(1000)), 10)
    with pytest.raises(AnswerRefused, match="OUT_OF_RANGE"):
        conn.download(blob, max_size=10)
    assert stub.calls == 0


@pytest.mark.parametrize("bad", ["5", float("nan"), float("inf"), -1.0, True, None])
def test_a_retry_time_that_is_not_a_number_of_seconds_is_refused_at_connect(bad: object) -> None:
    """"5" failed only at the first call (a TypeError from inside), NaN retried an
    unreachable aggregator for ever: both said at connect, before training."""
    from clients.transport import Connection

    with pytest.raises(ValueError, match="retry_seconds must be a number of seconds"):
        Connection(None, retry_seconds=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="call_timeout must be"):
        Connection(None, call_timeout=bad)  # type: ignore[arg-type]


def test_a_call_on_a_closed_connection_is_a_site_error_not_grpcs_value_error() -> None:
    """A connection closed before a call, or by another thread during one (grpc then raises
    "Cannot invoke RPC on closed channel!", a ValueError the SDK took for the aggregator's
    doing): a SiteError naming the closed connection, and the attempt is not made again. A
    ValueError on an open connection is not disguised as one."""
    from clients.errors import SiteError

    conn = _connection()
    calls = []

    def closed_under_it() -> str:
        calls.append(1)
        conn.closed = True
        raise ValueError("Cannot invoke RPC on closed channel!")

    with pytest.raises(SiteError, match="connection is closed"):
        conn._retry(closed_under_it)
    assert calls == [1]
    with pytest.raises(SiteError, match="connection is closed"):
        conn._retry(lambda: "never made")
    fresh = _connection()

    def bad() -> str:
        raise ValueError("something else")

    with pytest.raises(ValueError, match="something else"):
        fresh._retry(bad)


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_refusal_after_progress_surfaces_at_once_too(code: grpc.StatusCode) -> None:
    """A transfer that moved data and is then refused is refused: only a deadline cut
    after progress (a slow link) is resumed."""
    import time

    moved = [0]
    attempt, calls = _failing([code])

    def moving() -> str:
        moved[0] += 1  # (data moved before the refusal)
        return attempt()

    with pytest.raises(AggregatorRefused, match=code.name):
        _connection()._retry(moving, progress=lambda: moved[0], end=time.monotonic() + 30)
    assert len(calls) == 1


# ---- sdk32: the retry policy's backoff (mutation review) --------------------------------------


def test_retries_wait_a_random_part_of_a_doubling_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full jitter: each wait is drawn from [0, delay], the delay doubling from 0.1 s to 5 s.
    Every site waiting the whole delay retried a restarting aggregator in lockstep, all at
    once; a wait above the delay, or a delay that did not grow, hammered it."""
    pauses = _recorded_sleeps(monkeypatch)
    attempt, calls = _failing([grpc.StatusCode.UNAVAILABLE] * 12)
    assert len(calls) == 0
    assert _connection(retry_seconds=1000)._retry(attempt) == "answer"
    delays = [min(0.1 * 2**n, 5.0) for n in range(12)]
    assert len(pauses) == 12 and len(calls) == 13
    assert all(0 <= p <= d for p, d in zip(pauses, delays, strict=True))
    assert sum(pauses) < 0.9 * sum(delays)  # (drawn, not the whole delay each time)
    assert sum(pauses[6:]) > 1.0  # (the delay grew)


def test_a_transfer_that_moved_data_retries_soon_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transfer cut by UNAVAILABLE after it moved data starts its backoff again at 0.1 s:
    a resumed upload over a flaky link waited up to 5 s a cut, for a delay grown before."""
    pauses = _recorded_sleeps(monkeypatch)
    moved = [0]
    codes = [grpc.StatusCode.UNAVAILABLE] * 40

    def attempt() -> str:
        if len(pauses) >= 8 and moved[0] < 30:  # after 8 bare retries, data moves each try
            moved[0] += 1
        if codes:
            codes.pop()
            raise _Status(grpc.StatusCode.UNAVAILABLE)
        return "answer"

    assert _connection(retry_seconds=1000)._retry(attempt, progress=lambda: moved[0],
                                                 end=1e9) == "answer"
    assert len(pauses) == 40
    assert max(pauses[8:38]) <= 0.1  # (each try after progress: the delay starts over)


def test_a_call_keeps_the_deadline_its_caller_gave() -> None:
    """A long poll is given its own deadline (its wait and a margin), a quick question a
    short one; only a call given none gets ``call_timeout``."""
    seen: list[float] = []

    class Stub:
        def GetRound(self, request: Any, timeout: float) -> Any:
            seen.append(timeout)
            return request

    from secagg.v1 import service_pb2

    conn = _connection()
    conn.stub, conn.call_timeout, conn.bytes_sent, conn.bytes_received = Stub(), 60.0, 0, 0
    conn.call("GetRound", service_pb2.GetRoundRequest(), timeout=7.5)
    conn.call("GetRound", service_pb2.GetRoundRequest())
    assert seen == [7.5, 60.0]


class _ReadsTenTimesThenForgets(_ForgetfulAggregator):
    """Reads each upload whole and says UNAVAILABLE ten times, stores it the eleventh, and
    has lost it again by the Submit that refers to it (FAILED_PRECONDITION)."""

    def __init__(self) -> None:
        super().__init__(forget=100)
        self.bytes, self.puts_seen = 0, 0

    def PutChunks(self, chunks: Any, timeout: float) -> Any:
        self.puts_seen += 1
        if self.puts_seen % 11:
            for chunk in chunks:
                self.bytes += len(chunk.data)
            raise _Status(grpc.StatusCode.UNAVAILABLE)
        chunks = list(chunks)
        self.bytes += sum(len(c.data) for c in chunks)
        return super().PutChunks(iter(chunks), timeout)


def test_the_upload_bound_holds_across_resubmissions_of_lost_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound of 16 times a payload's bytes is over every resubmission of one message
    (Connection.upload_and_send), not per upload: an aggregator that read each upload ten
    times over and then lost it had a site send it 44 times over."""
    import clients.transport
    from clients.transport import UPLOAD_SEND_FACTOR

    monkeypatch.setattr(clients.transport.time, "sleep", lambda _s: None)  # the backoff
    stub = _ReadsTenTimesThenForgets()
    conn, request = _submitting(stub)
    conn.retry_seconds = 30.0
    data = os.urandom(300_000)
    with pytest.raises(AggregatorRefused):
        conn.upload_and_send(data, request)
    assert len(data) <= stub.bytes <= UPLOAD_SEND_FACTOR * len(data)
