"""Adversary: whoever can reach the aggregator's port: without a certificate, with one from
another CA or an expired one, with one site's certificate posing as another, or with valid
identity and bad messages. Each is refused with its status code, and the round goes on for
the honest sites (real processes on loopback)."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from secagg import wire
from secagg.federation import pki
from secagg.federation.kit import SiteKit
from secagg.masking import MaskingClient
from secagg.v1 import service_pb2, service_pb2_grpc
from tests.service_kit import make_federation, read_reports, start_aggregator, start_site


def _channel(port: int, ca: bytes, key: bytes | None = None,
             cert: bytes | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    return grpc.secure_channel(f"localhost:{port}", creds)


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()  # type: ignore[no-any-return]


def test_identity_and_message_refusals_leave_the_round_intact(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, 4, "masking", rounds=1, open_s=40.0, stage_s=3.0)
    agg = start_aggregator(fed, tmp_path)
    honest = {s: start_site(fed, s, tmp_path / f"site-{s}.jsonl") for s in (1, 2, 3)}
    try:
        kit4 = SiteKit.load(fed.site_dir(4))
        ca = kit4.ca_pem
        request = service_pb2.GetRoundRequest(after_round=0, wait_ms=0)

        def get_round(channel: grpc.Channel) -> object:
            stub = service_pb2_grpc.AggregationStub(channel)  # type: ignore[no-untyped-call]
            return lambda: stub.GetRound(request, timeout=10)

        # no client certificate: the TLS handshake fails
        assert _code(get_round(_channel(fed.port, ca))) is grpc.StatusCode.UNAVAILABLE
        # a certificate from another CA
        other_key, other_ca = pki.make_ca("rogue")
        key = pki.new_key()
        rogue = pki.issue_site_cert(other_key, other_ca, 4, key.public_key())
        assert _code(get_round(_channel(fed.port, ca, pki.pem_private(key), pki.pem_cert(
            rogue)))) is grpc.StatusCode.UNAVAILABLE
        # an expired certificate from the right CA
        ca_key = pki.load_private(fed.directory / "ca" / "ca.key")
        ca_cert = pki.load_cert(fed.directory / "ca" / "ca.crt")
        expired = pki.issue_site_cert(ca_key, ca_cert, 4, key.public_key(), days=1,
                                      not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
        assert _code(get_round(_channel(fed.port, ca, pki.pem_private(key), pki.pem_cert(
            expired)))) is grpc.StatusCode.UNAVAILABLE

        # site 4, properly identified
        channel = _channel(fed.port, ca, kit4.key_pem, kit4.cert_pem)
        stub = service_pb2_grpc.AggregationStub(channel)  # type: ignore[no-untyped-call]
        info = stub.GetRound(service_pb2.GetRoundRequest(after_round=0, wait_ms=5000))
        assert info.status == service_pb2.ROUND_STATUS_RUNNING
        config = kit4.config.masking_round(info.round_id, kit4.roster, _size(info),
                                           model_digest=bytes(info.model.digest))
        client = MaskingClient(config, 4, kit4.identity, (_zeros(info), 0.5))
        advert = client.start()

        # site 2's certificate sending as site 3
        kit2 = SiteKit.load(fed.site_dir(2))
        stub2 = service_pb2_grpc.AggregationStub(  # type: ignore[no-untyped-call]
            _channel(fed.port, ca, kit2.key_pem, kit2.cert_pem))
        as_three = wire.advertise_to_proto(advert)
        as_three.site_id = 3
        assert _code(lambda: stub2.Submit(service_pb2.SubmitRequest(
            round_id=info.round_id, advertise_keys=as_three), timeout=10)
        ) is grpc.StatusCode.PERMISSION_DENIED

        # a valid submission, then a second, different one
        submit = service_pb2.SubmitRequest(round_id=info.round_id,
                                           advertise_keys=wire.advertise_to_proto(advert))
        assert not stub.Submit(submit, timeout=10).duplicate
        assert stub.Submit(submit, timeout=10).duplicate  # a retry is a no-op
        second = MaskingClient(config, 4, kit4.identity, (_zeros(info), 0.5)).start()
        assert _code(lambda: stub.Submit(service_pb2.SubmitRequest(
            round_id=info.round_id, advertise_keys=wire.advertise_to_proto(second)),
            timeout=10)) is grpc.StatusCode.FAILED_PRECONDITION

        # a message over the limit
        huge = service_pb2.Chunk(chunk_id=bytes(32), data=bytes(9 * 1024 * 1024))
        assert _code(lambda: stub.PutChunks(iter([huge]), timeout=30)
                     ) is grpc.StatusCode.RESOURCE_EXHAUSTED
        # a chunk whose bytes do not match its id
        data = b"not what the id says"
        wrong = service_pb2.Chunk(chunk_id=hashlib.sha256(b"other").digest(), data=data)
        assert _code(lambda: stub.PutChunks(iter([wrong]), timeout=10)
                     ) is grpc.StatusCode.INVALID_ARGUMENT
        # a chunk id of another length: said as such (not "does not hash to its id")
        with pytest.raises(grpc.RpcError) as refused:
            stub.PutChunks(iter([service_pb2.Chunk(chunk_id=b"\1", data=data)]), timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "32-byte" in (refused.value.details() or "")
        # one unknown id asked about many times is looked up and answered once
        unknown = hashlib.sha256(b"never uploaded").digest()
        assert list(stub.MissingChunks(service_pb2.ChunkIds(chunk_ids=[unknown] * 64),
                                       timeout=30).chunk_ids) == [unknown]
        # a message of the other protocol, and an unknown round
        assert _code(lambda: stub.Submit(service_pb2.SubmitRequest(
            round_id=info.round_id, ckks_key=service_pb2.CkksKeyOffer()), timeout=10)
        ) is grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: stub.Submit(service_pb2.SubmitRequest(
            round_id="no-such-round", advertise_keys=wire.advertise_to_proto(advert)),
            timeout=10)) is grpc.StatusCode.NOT_FOUND
        # reading a chunk it has no business reading
        assert _code(lambda: list(stub.GetChunks(service_pb2.ChunkIds(
            chunk_ids=[hashlib.sha256(b"x").digest()]), timeout=10))
        ) is grpc.StatusCode.PERMISSION_DENIED
        # one chunk asked for many times (one request must not become many payloads)
        model_chunk = bytes(info.model.data.chunk_ids[0])
        assert len(list(stub.GetChunks(service_pb2.ChunkIds(chunk_ids=[model_chunk]),
                                       timeout=10))) == 1
        assert _code(lambda: list(stub.GetChunks(service_pb2.ChunkIds(
            chunk_ids=[model_chunk] * 64), timeout=10))) is grpc.StatusCode.INVALID_ARGUMENT

        # site 4 goes silent; the honest sites finish the round without it
        for p in honest.values():
            assert p.wait(timeout=120) == 0
    finally:
        for p in honest.values():
            p.kill()
        agg.stop()
    for s in (1, 2, 3):
        (report,) = read_reports(tmp_path / f"site-{s}.jsonl")
        assert report["survivors"] == [1, 2, 3]
    refused = [e for e in agg.read() if e.get("event") == "identity_refused"]
    assert refused and refused[0]["site_id"] == 2
    # every refusal of a roster site's call is logged, naming the site, the code and why
    # (they were counted only: an operator whose alert fired could not tell whom)
    calls = {(e.get("site_id"), e.get("code"), e.get("level")): e.get("reason", "")
             for e in agg.read() if e.get("event") == "call_refused"}
    assert "already answered" in calls[(4, "FAILED_PRECONDITION", "info")], calls
    assert "does not belong" in calls[(4, "INVALID_ARGUMENT", "warning")], calls
    assert (4, "NOT_FOUND", "info") in calls, calls
    # the three refused handshakes are logged with their TLS reason
    tls = [e for e in agg.read() if e.get("event") == "tls_refused"]
    assert len(tls) >= 3, agg.tail()
    assert any("CERTIFICATE" in e.get("reason", "") for e in tls)


def _size(info: service_pb2.RoundInfo) -> int:
    from secagg import wire

    return sum(t.size for t in wire.spec_from_proto(info.model.spec))


def _zeros(info: service_pb2.RoundInfo) -> object:
    import numpy as np

    return np.zeros(_size(info))


GARBAGE = [b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f"]  # no tag; a field cut short
BAD_UTF8 = b"\x0a\x02\xc3\x28"  # field 1 is round_id (a string) in these requests
METHODS = {"GetRound": "unary", "Submit": "unary", "Receive": "unary",
           "MissingChunks": "unary", "GetChunks": "unary-stream", "PutChunks": "stream-unary"}


def _raw(channel: grpc.Channel, method: str, data: bytes) -> grpc.StatusCode:
    path = f"/secagg.v1.Aggregation/{method}"
    kind = METHODS[method]
    try:
        if kind == "unary":
            channel.unary_unary(path)(data, timeout=10)
        elif kind == "unary-stream":
            list(channel.unary_stream(path)(data, timeout=10))
        else:
            channel.stream_unary(path)(iter([data]), timeout=10)
    except grpc.RpcError as e:
        assert "Error" not in (e.details() or "") and "class" not in (e.details() or ""), \
            e.details()
        return e.code()  # type: ignore[no-any-return]
    raise AssertionError(f"{method} accepted bytes that are not its message")


def test_bytes_that_are_not_a_message_are_invalid_argument_not_unknown(tmp_path: Path) -> None:
    """Undecodable requests (garbage, a truncated field, invalid UTF-8 in a string) are the
    caller's fault: INVALID_ARGUMENT for a roster site, its identity refusal for anyone else,
    never UNKNOWN with the parser's exception in the details."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1, open_s=40.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        kit = SiteKit.load(fed.site_dir(1))
        site = _channel(fed.port, kit.ca_pem, kit.key_pem, kit.cert_pem)
        for method in METHODS:
            for data in GARBAGE:
                assert _raw(site, method, data) is grpc.StatusCode.INVALID_ARGUMENT, method
        for method in ("Submit", "Receive"):
            assert _raw(site, method, BAD_UTF8) is grpc.StatusCode.INVALID_ARGUMENT, method
        # a certificate from the federation's CA for a site that is not on the roster
        ca_key = pki.load_private(fed.directory / "ca" / "ca.key")
        ca_cert = pki.load_cert(fed.directory / "ca" / "ca.crt")
        key = pki.new_key()
        stranger = _channel(fed.port, kit.ca_pem, pki.pem_private(key), pki.pem_cert(
            pki.issue_site_cert(ca_key, ca_cert, 99, key.public_key())))
        for method in METHODS:
            assert _raw(stranger, method, GARBAGE[0]) is grpc.StatusCode.PERMISSION_DENIED
        # and the service still answers well-formed requests
        stub = service_pb2_grpc.AggregationStub(site)  # type: ignore[no-untyped-call]
        info = stub.GetRound(service_pb2.GetRoundRequest(after_round=0, wait_ms=0), timeout=10)
        assert info.status == service_pb2.ROUND_STATUS_RUNNING
    finally:
        agg.stop()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_requests_that_parse_into_far_more_than_their_bytes_are_refused_unparsed(
        tmp_path: Path) -> None:
    """8 MiB of empty chunk ids parse into ~128 MB before their count is refused, and gzip
    made that 8 KB on the wire: one connection held the aggregator at 1.2 GB. Compressed
    requests are refused (UNIMPLEMENTED, by gRPC), and a request longer than any honest one
    of its method is refused before it is parsed (RESOURCE_EXHAUSTED); the round goes on."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1, open_s=40.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        assert agg.process is not None
        kit = SiteKit.load(fed.site_dir(1))
        creds = grpc.ssl_channel_credentials(root_certificates=kit.ca_pem,
                                             private_key=kit.key_pem,
                                             certificate_chain=kit.cert_pem)
        options = [("grpc.max_send_message_length", 16 << 20)]
        bomb = service_pb2.ChunkIds(chunk_ids=[b""] * ((8 << 20) // 2 - 16))
        zipped = grpc.secure_channel(f"localhost:{fed.port}", creds, options=options,
                                     compression=grpc.Compression.Gzip)
        stub = service_pb2_grpc.AggregationStub(zipped)  # type: ignore[no-untyped-call]
        before = _rss_mb(agg.process.pid)
        for _ in range(3):
            assert _code(lambda: stub.MissingChunks(bomb, timeout=30)) \
                is grpc.StatusCode.UNIMPLEMENTED
        plain = grpc.secure_channel(f"localhost:{fed.port}", creds, options=options)
        stub = service_pb2_grpc.AggregationStub(plain)  # type: ignore[no-untyped-call]
        for call in (lambda: stub.MissingChunks(bomb, timeout=30),
                     lambda: list(stub.GetChunks(bomb, timeout=30)),
                     lambda: stub.GetRound(_padded_get_round(), timeout=30),
                     # a stage message past what the roster and the job's vector can need
                     # (8 MiB of partners parsed into 128 MB)
                     lambda: stub.Submit(service_pb2.SubmitRequest(
                         round_id="x", masked_input=service_pb2.MaskedInputRef(
                             partners=[1] * 1_000_000)), timeout=30)):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "longer than any of its kind" in (caught.value.details() or "")
        assert _rss_mb(agg.process.pid) < before + 100
        # the largest honest request of each kind still goes through
        honest = service_pb2.ChunkIds(chunk_ids=[bytes([i % 256, i // 256]) * 16
                                                 for i in range(4096)])
        assert len(stub.MissingChunks(honest, timeout=30).chunk_ids) == 4096
        reports = [start_site(fed, s, tmp_path / f"site-{s}.jsonl") for s in (1, 2, 3)]
        for p in reports:
            assert p.wait(timeout=120) == 0
        assert all(any("model" in x for x in read_reports(tmp_path / f"site-{s}.jsonl"))
                   for s in (1, 2, 3))
    finally:
        agg.stop()


def _padded_get_round() -> service_pb2.GetRoundRequest:
    """A GetRound request with 100 KB in a field no version knows (kept by the parser)."""
    request = service_pb2.GetRoundRequest(after_round=0, wait_ms=0)
    tag, length = 1000 << 3 | 2, 100_000
    unknown = _varint(tag) + _varint(length) + b"x" * length
    return service_pb2.GetRoundRequest.FromString(request.SerializeToString() + unknown)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_one_site_cannot_hold_more_than_a_few_calls_at_once(tmp_path: Path) -> None:
    """Each call holds a request of up to max_message_bytes: one site's calls in progress
    are bounded over all its connections (RESOURCE_EXHAUSTED beyond), and the other sites
    are not affected."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1, open_s=40.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        kit = SiteKit.load(fed.site_dir(1))
        stubs = [service_pb2_grpc.AggregationStub(  # type: ignore[no-untyped-call]
            _channel(fed.port, kit.ca_pem, kit.key_pem, kit.cert_pem)) for _ in range(3)]

        def outcomes(calls: list[Any]) -> list[grpc.StatusCode]:
            codes = []
            for call in calls:
                try:
                    call.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
            return codes

        now = service_pb2.GetRoundRequest(after_round=0, wait_ms=0)
        for _ in range(100):  # until the job is recovered (UNAVAILABLE before: retry)
            try:
                stubs[0].GetRound(now, timeout=10)
                break
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.UNAVAILABLE, e
                time.sleep(0.1)
        # long polls for a round that will not open while they wait. On one connection the
        # server admits 8 streams at a time: the client queues the rest (or, racing the
        # server's settings, has them refused as REFUSED_STREAM, UNAVAILABLE: the SDK
        # retries), so the site's own limit is never reached through one connection
        poll = service_pb2.GetRoundRequest(after_round=5, wait_ms=1500)
        codes = outcomes([stubs[0].GetRound.future(poll, timeout=20) for _ in range(12)])
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        assert codes.count(grpc.StatusCode.OK) >= 8, codes
        # over three connections, 15 at once: the site's ninth call and beyond are refused
        poll = service_pb2.GetRoundRequest(after_round=5, wait_ms=4000)
        calls = [stub.GetRound.future(poll, timeout=20) for stub in stubs for _ in range(5)]
        codes = outcomes(calls)
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(calls) - 8, codes
        assert codes.count(grpc.StatusCode.OK) == 8
        # its calls are counted out as they end: it can call again
        assert stubs[0].GetRound(now, timeout=10).status == service_pb2.ROUND_STATUS_RUNNING
        kit2 = SiteKit.load(fed.site_dir(2))
        other = service_pb2_grpc.AggregationStub(  # type: ignore[no-untyped-call]
            _channel(fed.port, kit2.ca_pem, kit2.key_pem, kit2.cert_pem))
        assert other.GetRound(now, timeout=10).status == service_pb2.ROUND_STATUS_RUNNING
    finally:
        agg.stop()


def test_chunks_outside_their_bounds_and_uploads_beyond_the_budget_are_refused(
        tmp_path: Path) -> None:
    """A site's uploads are bounded: a chunk of 0 bytes or of more than [limits]
    max_chunk_bytes (one gRPC allows, up to 8 MiB), more than the round needs from one site
    (its upload budget: so that one site cannot fill the aggregator's disk), and more chunk
    ids in one call than MAX_IDS_PER_CALL are refused with their codes; what was stored
    within the budget stays stored, what went past it is not."""
    import os

    from aggregator.service import MAX_IDS_PER_CALL

    fed = make_federation(tmp_path, 4, "masking", rounds=1, open_s=60.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        kit = SiteKit.load(fed.site_dir(4))
        stub = service_pb2_grpc.AggregationStub(  # type: ignore[no-untyped-call]
            _channel(fed.port, kit.ca_pem, kit.key_pem, kit.cert_pem))
        info = stub.GetRound(service_pb2.GetRoundRequest(after_round=0, wait_ms=5000))
        assert info.status == service_pb2.ROUND_STATUS_RUNNING

        def put(data: bytes) -> Any:
            cid = hashlib.sha256(data).digest()
            stub.MissingChunks(service_pb2.ChunkIds(chunk_ids=[cid]), timeout=30)
            return lambda: stub.PutChunks(iter([service_pb2.Chunk(chunk_id=cid, data=data)]),
                                          timeout=30)

        limit = kit.config.limits.max_chunk_bytes
        assert limit + 1 < 8 << 20  # (gRPC itself would let it through)
        assert _code(put(b"")) is grpc.StatusCode.INVALID_ARGUMENT  # malformed
        assert _code(put(os.urandom(limit + 1))) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _code(lambda: stub.MissingChunks(service_pb2.ChunkIds(
            chunk_ids=[os.urandom(32) for _ in range(MAX_IDS_PER_CALL + 1)]), timeout=30)
        ) is grpc.StatusCode.INVALID_ARGUMENT

        # the budget: a tiny model's round needs a few bytes a site; the budget is twice that
        # plus 16 MiB, each chunk charged its bytes and 64 KiB (a page of the store's log), so
        # the fourth 4 MiB chunk goes past it
        pieces = [os.urandom(limit) for _ in range(4)]
        for piece in pieces[:3]:
            assert put(piece)().stored == 1
        assert _code(put(pieces[3])) is grpc.StatusCode.RESOURCE_EXHAUSTED
        ids = [hashlib.sha256(p).digest() for p in pieces]
        assert list(stub.MissingChunks(service_pb2.ChunkIds(chunk_ids=ids), timeout=30
                                       ).chunk_ids) == [ids[3]]

        # tiny chunks are charged a page each: site 3 sends 3-byte chunks until refused, and
        # gets about 16 MiB / 64 KiB of them stored (before, bytes alone were charged: five
        # million of them, each a page of the log)
        kit3 = SiteKit.load(fed.site_dir(3))
        stub3 = service_pb2_grpc.AggregationStub(  # type: ignore[no-untyped-call]
            _channel(fed.port, kit3.ca_pem, kit3.key_pem, kit3.cert_pem))
        tiny = [os.urandom(3) for _ in range(2000)]
        stored = 0
        for start in range(0, len(tiny), 100):
            batch = tiny[start:start + 100]
            try:
                stored += stub3.PutChunks(iter([service_pb2.Chunk(
                    chunk_id=hashlib.sha256(d).digest(), data=d) for d in batch]),
                    timeout=30).stored
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                break
        else:
            raise AssertionError("2,000 tiny chunks were all taken")
        present = len(tiny) - len(stub3.MissingChunks(service_pb2.ChunkIds(
            chunk_ids=[hashlib.sha256(d).digest() for d in tiny]), timeout=30).chunk_ids)
        assert 200 <= present <= (17 << 20) // (64 << 10)  # the budget: 16 MiB + a little
    finally:
        agg.stop()


def _open_files(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_silent_connections_from_an_outsider_leaves_the_aggregator_up(
        tmp_path: Path) -> None:
    """An outsider with no certificate opens connections faster than they are closed, each
    sending the start of a TLS record and then nothing. They took every file descriptor of
    an aggregator under the common 1024 open-files limit (each was kept 120 s): the store
    could not be opened, health said NOT_SERVING, and no round ran. Connections are now
    bounded below the open-files limit, and a handshake gets 10 s: the aggregator keeps
    descriptors for its store, the silent connections are closed, and the round completes
    for the sites once the flood is over."""
    import socket

    from aggregator.service import HANDSHAKE_SECONDS, RESERVED_FILES
    from tests.service_kit import Aggregator

    fed = make_federation(tmp_path, 3, "masking", rounds=1, open_s=120.0, stage_s=30.0)
    limit = RESERVED_FILES + 64
    agg = Aggregator(fed, tmp_path / "aggregator.db", tmp_path / "aggregator.log",
                     open_files=limit)
    agg.start()
    assert agg.process is not None
    flood: list[socket.socket] = []
    sites: list[Any] = []
    try:
        began = time.monotonic()
        for _ in range(limit + 100):  # more than the process may open
            s = socket.create_connection(("127.0.0.1", fed.port), timeout=5)
            s.sendall(b"\x16\x03\x01\x02\x00")  # a TLS handshake record's header, no more
            flood.append(s)
        time.sleep(1.0)
        # the aggregator kept its reserve: it opened no more than its connection bound
        assert _open_files(agg.process.pid) < limit - RESERVED_FILES // 2, agg.tail()
        # the handshakes it took are closed once their time is up
        open_ones = list(flood)
        while open_ones and time.monotonic() - began < HANDSHAKE_SECONDS + 20:
            for s in list(open_ones):
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        open_ones.remove(s)
                except BlockingIOError:
                    pass
                except OSError:
                    open_ones.remove(s)
            time.sleep(0.5)
        assert not open_ones, f"{len(open_ones)} silent connections still open"
        for s in flood:
            s.close()
        sites.extend(start_site(fed, n, tmp_path / f"site-{n}.jsonl") for n in (1, 2, 3))
        for p in sites:
            assert p.wait(timeout=120) == 0
    finally:
        for s in flood:
            s.close()
        for p in sites:
            p.kill()
        agg.stop()
    for s in (1, 2, 3):
        (report,) = read_reports(tmp_path / f"site-{s}.jsonl")
        assert report["survivors"] == [1, 2, 3]
    assert not [e for e in agg.read() if e.get("event") in (
        "store_unreachable", "store_error", "recovery_error")], agg.tail()


def test_certificates_the_tls_stack_takes_but_the_federation_never_issues_are_refused(
        tmp_path: Path) -> None:
    """Two client certificates that pass gRPC's TLS: one for site 1 from an intermediate CA
    under the federation's CA (path length 0, which BoringSSL does not enforce on a trust
    anchor), and one from the CA itself naming a 5,000-digit site id (int() raised inside the
    call: UNKNOWN, with Python's message, nothing logged). Both are UNAUTHENTICATED, logged;
    site 1's own certificate is served. The aggregator's ca.crt also holds an operator CA
    that allows intermediates (a rotation to the operator's own PKI): the federation CA's
    path length still holds for what it issued."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def ca_allowing_intermediates(name: str, issuer: x509.Name | None = None,
                                  issuer_key: Any = None) -> tuple[Any, x509.Certificate]:
        key = pki.new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        return key, (x509.CertificateBuilder().subject_name(subject)
                     .issuer_name(issuer or subject).public_key(key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5))
                     .not_valid_after(now + dt.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                    critical=True)
                     .sign(issuer_key or key, hashes.SHA256()))

    fed = make_federation(tmp_path, 4, "masking", rounds=1)
    _, operator = ca_allowing_intermediates("operator")
    bundle = fed.directory / "aggregator" / "ca.crt"
    bundle.write_bytes(bundle.read_bytes() + pki.pem_cert(operator))
    agg = start_aggregator(fed, tmp_path)
    try:
        kit = SiteKit.load(fed.site_dir(1))
        ca_key = pki.load_private(fed.directory / "ca" / "ca.key")
        ca_cert = pki.load_cert(fed.directory / "ca" / "ca.crt")
        inter_key, inter = ca_allowing_intermediates("inter", ca_cert.subject, ca_key)
        key = pki.new_key()
        chained = pki.pem_cert(pki.issue_site_cert(inter_key, inter, 1, key.public_key()))
        long_id = pki.pem_cert(pki._issue(
            ca_key, ca_cert, key.public_key(), "site",
            [x509.UniformResourceIdentifier(pki.SITE_URI_PREFIX + "9" * 5000)],
            ExtendedKeyUsageOID.CLIENT_AUTH))
        request = service_pb2.GetRoundRequest(after_round=0, wait_ms=0)
        for cert in (chained + pki.pem_cert(inter), long_id):
            stub = service_pb2_grpc.AggregationStub(  # type: ignore[no-untyped-call]
                _channel(fed.port, kit.ca_pem, pki.pem_private(key), cert))
            assert _code(lambda: stub.GetRound(request, timeout=10)  # noqa: B023
                         ) is grpc.StatusCode.UNAUTHENTICATED
        own = service_pb2_grpc.AggregationStub(  # type: ignore[no-untyped-call]
            _channel(fed.port, kit.ca_pem, kit.key_pem, kit.cert_pem))
        assert own.GetRound(request, timeout=10).round == 1
    finally:
        agg.stop()
    refused = [e for e in agg.read() if e.get("event") == "identity_refused"]
    assert len(refused) == 2, agg.tail()
