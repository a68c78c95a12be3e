"""Adversary: the aggregator, lying to one honest site's SDK (`clients/site.py`) about the round.

The SDK takes the round's facts from the aggregator (`RoundInfo`): the round id, the CKKS key
announcement it relays. Whatever a site acts on must be checked against what the federation's
own configuration says, or the aggregator chooses it. These tests drive the real site code
against a fake aggregator connection (no server, no network).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import types
from typing import Any

import numpy as np
import pytest

from clients.errors import ModelMismatch, RoundAborted
from clients.site import Round, Site
from secagg import wire
from secagg.ckks import KeyHolder
from secagg.federation.config import FederationConfig
from secagg.masking import make_roster
from secagg.v1 import service_pb2

HONEST, HOLDER, COLLUDER = 2, 1, 5


class _LyingAggregator:
    """Answers GetRound with a CKKS round whose key announcement it chose; records uploads."""

    def __init__(self, announcement: Any, public: bytes, round_id: str) -> None:
        self.announcement, self.public, self.round_id = announcement, public, round_id
        self.blob = wire.Blob((b"\x01" * 32,), len(public))
        self.uploaded: list[bytes] = []

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        if method == "GetRound":
            return service_pb2.RoundInfo(
                round=1, round_id=self.round_id, protocol=service_pb2.PROTOCOL_CKKS,
                status=service_pb2.ROUND_STATUS_RUNNING, ckks_key_holder=HOLDER,
                ckks_key=service_pb2.CkksKeyOffer(
                    announcement=wire.announcement_to_proto(self.announcement),
                    public_context=self.blob.to_proto()))
        raise AssertionError(f"the site should not get as far as {method}")

    def download(self, blob: Any, progress: Any = None, what: str = "") -> bytes:
        return self.public

    def upload(self, data: bytes, progress: Any = None, what: str = "") -> Any:
        self.uploaded.append(data)
        raise AssertionError("the site uploaded its update")


def _honest_round(announcer: int, round_id: str = "hospitals/job-1/round-1",
                  epoch: str | None = None) -> tuple[Round, _LyingAggregator]:
    roster, identities = make_roster(5)
    config = FederationConfig.from_dict({
        "federation": {"name": "hospitals", "protocol": "ckks", "aggregator": "agg:443",
                       "trust_root": "00" * 32},
        "job": {"id": "job-1"},
        "ckks": {"key_holders": [HOLDER]},  # only site 1 makes and releases keys
    })
    key = KeyHolder.generate(config.preset)
    announcement = key.announce(holder=announcer, identity=identities[announcer],
                                epoch=epoch or round_id)
    aggregator = _LyingAggregator(announcement, key.public_context().serialize(), round_id)
    aggregator.key, aggregator.identities = key, identities  # type: ignore[attr-defined]
    kit = types.SimpleNamespace(site_id=HONEST, config=config, roster=roster,
                                identity=identities[HONEST])
    site = Site(kit, aggregator)  # type: ignore[arg-type]
    rnd = Round.__new__(Round)
    rnd._site, rnd._conn, rnd.number, rnd.round_id = site, aggregator, 1, round_id
    rnd.protocol, rnd._key, rnd._submitted = "ckks", None, False
    rnd.model = types.SimpleNamespace(size=1000, digest=b"\x07" * 32)  # type: ignore[assignment]
    return rnd, aggregator


def test_site_refuses_a_key_announced_by_a_site_the_federation_did_not_name() -> None:
    """The aggregator relays a key announced (and correctly signed) by colluding site 5, a
    roster site but not the federation's key holder: a site that encrypted to it would hand
    site 5 its update in the clear. The site refuses before encrypting anything."""
    rnd, aggregator = _honest_round(announcer=COLLUDER)
    update = np.random.default_rng(7).uniform(-0.03, 0.03, 1000)
    with pytest.raises(RoundAborted, match="must be announced by site 1"):
        rnd._run_ckks(update, 0.25)
    assert aggregator.uploaded == []


@pytest.mark.parametrize(("round_id", "epoch", "says"), [
    ("hospitals/job-1/round-7", None, "is not round 1"),
    ("other-federation/job-1/round-1", None, "is not round 1"),
    ("hospitals/job-1/round-1", "hospitals/job-0/round-1", "not for this round"),
])
def test_site_refuses_a_round_id_or_key_epoch_that_is_not_this_round(
        round_id: str, epoch: str | None, says: str) -> None:
    rnd, aggregator = _honest_round(announcer=HOLDER, round_id=round_id, epoch=epoch)
    with pytest.raises(RoundAborted, match=says):
        rnd._run_ckks(np.zeros(1000), 0.25)
    assert aggregator.uploaded == []


# ---- sizes the aggregator claims: checked before memory is spent on them ---------------------


class _ChunkStub:
    """A GetChunks that serves one real chunk, however often it is asked for."""

    def __init__(self, data: bytes) -> None:
        import hashlib

        self.data, self.cid = data, hashlib.sha256(data).digest()
        self.served = 0

    def GetChunks(self, request: Any, timeout: float) -> Any:
        for cid in request.chunk_ids:
            self.served += 1
            yield service_pb2.Chunk(chunk_id=cid, data=self.data)


def _connection(stub: _ChunkStub) -> Any:
    import random

    from clients.transport import Connection

    conn = Connection.__new__(Connection)
    conn.stub, conn.retry_seconds, conn.call_timeout = stub, 1.0, 5.0
    conn._random, conn.bytes_received, conn.bytes_sent = random.SystemRandom(), 0, 0
    return conn


def _fresh_site(conn: Any) -> Site:
    """A masking site of a bare federation that holds no model yet (its process's first)."""
    config = FederationConfig.from_dict({
        "federation": {"name": "hospitals", "protocol": "masking", "aggregator": "agg:443",
                       "trust_root": "00" * 32}})
    return Site(types.SimpleNamespace(site_id=HONEST, config=config),  # type: ignore[arg-type]
                conn)


def test_download_of_one_chunk_named_many_times_is_refused_before_it_is_built() -> None:
    """A blob naming one 64 KiB chunk 20,000 times claims 1.3 GB: refused by the size the
    caller can need, and otherwise by the sizes of what arrived, before joining anything."""
    from clients.errors import AggregatorRefused

    stub = _ChunkStub(b"x" * 65536)
    conn = _connection(stub)
    many = wire.Blob((stub.cid,) * 20_000, 65536 * 20_000)
    with pytest.raises(AggregatorRefused, match="at most"):
        conn.download(many, max_size=10 * 65536)
    assert stub.served == 0
    import tracemalloc

    lying = wire.Blob((stub.cid,) * 2000, 65536)  # claims one chunk's size
    tracemalloc.start()
    try:
        with pytest.raises(AggregatorRefused, match="wrong size"):
            conn.download(lying, max_size=65536)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stub.served == 1  # fetched once: ids are deduplicated
    assert peak < 16 * 2**20, peak  # the 131 MB it names were never built


def test_split_never_makes_more_pieces_than_bytes() -> None:
    from secagg.errors import InvalidMessage

    with pytest.raises(InvalidMessage):
        wire.split_fixed(b"", 3)  # (an aggregator asked for 2^32 - 1: a 34 GB tuple)
    with pytest.raises(InvalidMessage):
        wire.split_fixed(b"abcd", 8)
    assert wire.split_fixed(b"abcdef", 3) == (b"ab", b"cd", b"ef")


def _releasing_holder() -> tuple[Round, _LyingAggregator, Any, _ChunkStub]:
    """The key holder at its release, its round's CKKS config, and a GetChunks stub that
    counts what it serves."""
    rnd, aggregator = _honest_round(announcer=HOLDER)
    config = rnd._site.config.ckks_round(1, rnd.round_id, rnd._site.kit.roster,
                                         aggregator.announcement, 1000,
                                         model_digest=rnd.model.digest)
    stub = _ChunkStub(b"")
    rnd._conn = _connection(stub)
    rnd._key = aggregator.key  # type: ignore[attr-defined]
    return rnd, aggregator, config, stub


def test_key_holder_checks_claimed_chunk_counts_and_sizes_before_downloading() -> None:
    """The aggregator's release request names 2^32 - 1 chunks in an empty blob, or a blob
    larger than the round's layout allows: refused before anything is fetched or split."""
    from secagg.ckks import Release
    from secagg.errors import InvalidMessage

    rnd, _, config, stub = _releasing_holder()
    release = Release.__new__(Release)  # never reached
    from secagg.ckks import _seal as seal

    full = int(config.chunk_count) * seal.encoded_length(
        rnd._key.seal_context, seal.Kind.FULL)  # type: ignore[union-attr]
    # (and an upload flagged seeded, of a full one's size or a seeded one's: a seeded
    # ciphertext needs the secret key, so it is a forgery)
    seeded = int(config.chunk_count) * seal.encoded_length(
        rnd._key.seal_context, seal.Kind.SEEDED)  # type: ignore[union-attr]
    for count, size, is_seeded in ((2**32 - 1, 0, False), (config.chunk_count, 10**12, False),
                                   (config.chunk_count, full, True),
                                   (config.chunk_count, seeded, True)):
        upload = service_pb2.EncryptedUpdateRef(
            round_id=rnd.round_id, site_id=3, chunk_count=count, seeded=is_seeded,
            chunks=service_pb2.Blob(chunk_ids=[b"\x01" * 32], size=size))
        request = service_pb2.CkksReleaseRequest(uploads=[upload])
        with pytest.raises(InvalidMessage):
            rnd._verify_and_release(release, request, config)
    assert stub.served == 0


def test_key_holder_refuses_more_uploads_than_sites_and_a_misshapen_aggregate_unfetched() -> None:
    """A release request listing more uploads than the federation has sites (each one shaped
    as the round's layout says: the holder would fetch and verify them all), or an aggregate
    of another chunk count or size: refused before anything is fetched."""
    from secagg.ckks import Release
    from secagg.ckks import _seal as seal
    from secagg.errors import InvalidMessage

    rnd, aggregator, config, stub = _releasing_holder()
    context = aggregator.key.seal_context  # type: ignore[attr-defined]
    full = int(config.chunk_count) * seal.encoded_length(context, seal.Kind.FULL)
    release = Release.__new__(Release)  # never reached
    shaped = [service_pb2.EncryptedUpdateRef(
        round_id=rnd.round_id, site_id=s % 5 + 1, chunk_count=config.chunk_count,
        chunks=service_pb2.Blob(chunk_ids=[bytes([s]) * 32], size=full)) for s in range(6)]
    with pytest.raises(InvalidMessage, match="release request"):
        rnd._verify_and_release(release, service_pb2.CkksReleaseRequest(uploads=shaped), config)
    for count, size in ((2**32 - 1, full), (config.chunk_count, full + 1)):
        aggregate = service_pb2.EncryptedAggregateRef(
            round_id=rnd.round_id, chunk_count=count,
            chunks=service_pb2.Blob(chunk_ids=[b"\x02" * 32], size=size))
        with pytest.raises(InvalidMessage, match="aggregate"):
            rnd._verify_and_release(release, service_pb2.CkksReleaseRequest(
                aggregate=aggregate), config)
    assert stub.served == 0


def test_a_key_holder_stops_verifying_uploads_when_the_round_is_out_of_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The aggregator trickles each upload the key holder must verify before it releases
    (each download near its slowest allowed pace): the holder was held for the uploads'
    count times that, outside the round's time. Past the round's patience it downloads no
    further upload and gives the round up (RoundAborted)."""
    from secagg.ckks import Release
    from secagg.ckks import _seal as seal

    clock = _fake_clock(monkeypatch)
    rnd, aggregator, config, stub = _releasing_holder()
    full = int(config.chunk_count) * seal.encoded_length(
        aggregator.key.seal_context, seal.Kind.FULL)  # type: ignore[attr-defined]
    shaped = [service_pb2.EncryptedUpdateRef(
        round_id=rnd.round_id, site_id=s + 1, chunk_count=config.chunk_count,
        chunks=service_pb2.Blob(chunk_ids=[bytes([s]) * 32], size=full)) for s in range(3)]
    rnd._deadline = 600.0  # (as submit sets it)
    clock[0] = 601.0  # the trickled downloads so far took the round's time
    with pytest.raises(RoundAborted, match="did not end the round"):
        rnd._verify_and_release(Release.__new__(Release),
                                service_pb2.CkksReleaseRequest(uploads=shaped), config)
    assert stub.served == 0


def test_a_downloaded_chunk_must_hash_to_its_id() -> None:
    """The aggregator answers a chunk id with other bytes of the same size (a model or a
    payload it would like the site to take): refused, nothing kept."""
    from clients.errors import AnswerRefused

    class _Swapped(_ChunkStub):
        def GetChunks(self, request: Any, timeout: float) -> Any:
            for cid in request.chunk_ids:
                self.served += 1
                yield service_pb2.Chunk(chunk_id=cid, data=b"x" * len(self.data))

    stub = _Swapped(b"y" * 1024)
    with pytest.raises(AnswerRefused, match=r"DATA_LOSS.*does not match its id"):
        _connection(stub).download(wire.Blob((stub.cid,), 1024), max_size=1024)
    assert stub.served == 1


@pytest.mark.parametrize("chunk_type", [bytearray, memoryview, str])
def test_sharded_key_holder_refuses_aggregate_chunks_that_are_not_bytes(chunk_type: Any) -> None:
    from secagg.ckks import Release
    from secagg.errors import InvalidMessage
    from tests.ckks_kit import CkksRound

    r = CkksRound(sites=3, vector_length=5000)
    uploads, aggregate = r.run()
    chunks = tuple(c.hex() if chunk_type is str else chunk_type(c) for c in aggregate.chunks)
    from dataclasses import replace

    release = Release(r.holder, r.config, site_id=1, workers=2)
    try:
        for u in uploads:
            release.add(u)
        with pytest.raises(InvalidMessage):
            release.finish(replace(aggregate, chunks=chunks))
    finally:
        release.close()


def test_model_download_is_bounded_by_the_models_spec_before_it_is_fetched() -> None:
    """The aggregator names a model whose spec says 1,000 float32 values but whose blob is
    1.3 GB: the site refuses before fetching a chunk (and a spec beyond the federation's
    [limits] max_vector_length likewise)."""
    from clients.errors import AggregatorRefused
    from secagg.model import FlatModel

    stub = _ChunkStub(b"x" * 65536)
    model = FlatModel.from_arrays({"w": np.zeros(1000, np.float32)})
    config = FederationConfig.from_dict({
        "federation": {"name": "hospitals", "protocol": "masking", "aggregator": "agg:443",
                       "trust_root": "00" * 32}, "limits": {"max_vector_length": 10_000}})
    kit = types.SimpleNamespace(site_id=HONEST, config=config)
    site = Site(kit, _connection(stub))  # type: ignore[arg-type]
    huge = wire.model_to_proto(model, wire.Blob((stub.cid,) * 20_000, 65536 * 20_000))
    with pytest.raises(AggregatorRefused, match="at most 8000"):
        site._download_model(huge, "model")
    wide = FlatModel.from_arrays({"w": np.zeros(20_000, np.float32)})
    with pytest.raises(AggregatorRefused, match="max_vector_length"):
        site._download_model(wire.model_to_proto(wide, wire.Blob((stub.cid,), 65536)), "model")
    assert stub.served == 0


def test_a_first_model_of_one_chunk_named_many_times_is_refused_before_it_is_built() -> None:
    """A site that holds no model yet (the first of its process, or after a restart) takes
    the model's size from the aggregator, up to [limits] max_vector_length. A lying
    aggregator names 8 M float64 values (64 MiB) in one 1 MiB chunk named 64 times (the
    digest is the real first model's, the spec its own): the site built the joined 64 MiB
    and the model's copy (1.7 GB at the default limit) to refuse it. The digest is checked
    part by part first: refused with a few MiB in hand; an honest first model is taken."""
    import tracemalloc

    from secagg.errors import InvalidMessage
    from secagg.model import FlatModel

    stub = _ChunkStub(bytes(1 << 20))
    site = _fresh_site(_connection(stub))
    claimed = FlatModel.from_arrays({"w": np.zeros(1000, np.float32)})
    lie = wire.model_to_proto(claimed, wire.Blob((stub.cid,) * 64, 64 << 20))
    del lie.spec[:]
    lie.spec.add(name="w", shape=[8 << 20], dtype="float64")
    tracemalloc.start()
    try:
        with pytest.raises(InvalidMessage):
            site._download_model(lie, "model")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stub.served == 1
    assert peak < 16 << 20, f"{peak >> 20} MiB built to refuse a model sent in 1 MiB"

    honest = FlatModel.from_arrays({"w": np.zeros(3 << 17, np.float32),
                                    "b": np.arange(5, dtype=np.float64)})
    data = honest.to_bytes()
    cuts = [data[:1 << 20], data[1 << 20:]]
    stub_parts = {hashlib.sha256(c).digest(): c for c in cuts}

    class _Parts(_ChunkStub):
        def GetChunks(self, request: Any, timeout: float) -> Any:
            for cid in request.chunk_ids:
                yield service_pb2.Chunk(chunk_id=cid, data=stub_parts[cid])

    fresh = _fresh_site(_connection(_Parts(b"")))
    got = fresh._download_model(wire.model_to_proto(
        honest, wire.Blob(tuple(stub_parts), len(data))), "model")
    assert got.digest == honest.digest


@pytest.mark.parametrize(("shapes", "dtypes"), [
    # int64 products wrap: sizes 2**40 and -2**40 once summed to 0 values, and the download
    # bound came out at 4 TiB
    ([[2**40], [2**40, 2**24 - 1]], ["float64", "float32"]),
    ([[2**32, 2**32]], ["float32"]),  # "size" 0: accepted, then a bare reshape error
    ([[2**63]], ["float32"]),  # a bare OverflowError from the digest's encoder
    ([[3]], ["float128"]), ([[3]], ["complex64"]), ([[3]], ["S5"]), ([[3]], ["f8,"]),
    ([[3]], ["(-1,)f8"]), ([[3]], ["object"]), ([[3]], ["datetime64"]),
])
def test_a_model_spec_no_tensor_can_have_is_refused_before_anything_is_fetched(
        shapes: list[list[int]], dtypes: list[str]) -> None:
    from secagg.errors import InvalidMessage

    stub = _ChunkStub(b"x" * 65536)
    site = _fresh_site(_connection(stub))
    lying = service_pb2.Model(
        spec=[service_pb2.Tensor(name=f"t{i}", shape=shape, dtype=dtype)
              for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))],
        data=wire.Blob((stub.cid,) * 300, 300 * 65536).to_proto(), digest=b"\0" * 32)
    with pytest.raises(InvalidMessage, match="model spec"):
        site._download_model(lying, "model")
    assert stub.served == 0


# ---- what a round is comes from the site's own configuration and history ---------------------


class _Scripted:
    """An aggregator connection that announces one round and serves payloads by first chunk
    id; records what the site sends."""

    def __init__(self, info: Any, payloads: dict[bytes, bytes]) -> None:
        self.info, self.payloads = info, payloads
        self.sent: list[str] = []
        self.fetched: list[str] = []
        self.stop_code = "INTERNAL"  # (the code the first message the site sends is refused with)

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        if method == "GetRound":
            self.polls = getattr(self, "polls", 0) + 1
            # (a test that expects a refusal at the first answer ends the job after a few,
            # so a site that skips the round instead fails the test rather than hang it)
            if self.polls > getattr(self, "max_polls", float("inf")):
                return service_pb2.RoundInfo(status=service_pb2.ROUND_STATUS_JOB_DONE)
            if getattr(self, "then_done", False) and request.after_round >= self.info.round:
                return service_pb2.RoundInfo(status=service_pb2.ROUND_STATUS_JOB_DONE)
            return self.info
        from clients.errors import AggregatorRefused

        self.sent.append(method)
        raise AggregatorRefused(self.stop_code, "the test's aggregator stops here")

    def download(self, blob: Any, **_: Any) -> bytes:
        self.fetched.append(blob.chunk_ids[0].hex())
        return self.payloads[blob.chunk_ids[0]]

    def upload(self, data: bytes, **_: Any) -> Any:
        self.sent.append("upload")
        raise AssertionError("the site uploaded something")


def _site(protocol: str, info: Any, payloads: dict[bytes, bytes], directory: Any = None,
          ) -> tuple[Site, _Scripted]:
    roster, identities = make_roster(5)
    config = FederationConfig.from_dict({
        "federation": {"name": "hospitals", "protocol": protocol, "aggregator": "agg:443",
                       "trust_root": "00" * 32},
        "job": {"id": "job-1", "rounds": 3}, "ckks": {"key_holders": [HOLDER]}})
    kit = types.SimpleNamespace(site_id=HONEST, config=config, roster=roster,
                                identity=identities[HONEST], directory=directory)
    conn = _Scripted(info, payloads)
    return Site(kit, conn), conn  # type: ignore[arg-type]


def _model_info(number: int, round_id: str, protocol: int = service_pb2.PROTOCOL_MASKING,
                data: bytes | None = None, w: np.ndarray | None = None
                ) -> tuple[Any, dict[bytes, bytes]]:
    from secagg.model import FlatModel

    model = FlatModel.from_arrays({"w": np.zeros(8, np.float32) if w is None else w})
    blob = wire.Blob((b"\x03" * 32,), len(model.to_bytes()))
    info = service_pb2.RoundInfo(round=number, round_id=round_id, protocol=protocol,
                                 status=service_pb2.ROUND_STATUS_RUNNING,
                                 model=wire.model_to_proto(model, blob))
    return info, {blob.chunk_ids[0]: model.to_bytes() if data is None else data}


def _ckks_site(context: Any, payloads: dict[bytes, bytes]) -> tuple[Site, _Scripted, Any]:
    """A CKKS site joined to round 1, whose key the federation's holder genuinely announced,
    with ``context`` the public-context blob the aggregator names for it."""
    roster, identities = make_roster(5)
    announcement = KeyHolder.generate().announce(
        holder=HOLDER, identity=identities[HOLDER], epoch="hospitals/job-1/round-1")
    info, model = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    info.ckks_key.CopyFrom(service_pb2.CkksKeyOffer(
        announcement=wire.announcement_to_proto(announcement), public_context=context.to_proto()))
    site, conn = _site("ckks", info, {**model, **payloads})
    site.kit.roster, site.kit.identity = roster, identities[HONEST]
    return site, conn, info


@pytest.mark.parametrize(("number", "round_id"), [
    (1, "hospitals/jobB/round-1"),  # another job: a replay of round 1 under a new name
    (1, "hospitals/job-1/round-1/x"),
    (4, "hospitals/job-1/round-4"),  # beyond [job] rounds = 3
    (0, "hospitals/job-1/round-0"),
])
def test_site_refuses_a_round_of_another_job_or_beyond_the_jobs_rounds(
        number: int, round_id: str) -> None:
    info, payloads = _model_info(number, round_id)
    site, conn = _site("masking", info, payloads)
    conn.max_polls = 2  # type: ignore[attr-defined]
    with pytest.raises(RoundAborted, match="is not round"):
        next(site.rounds())
    assert conn.fetched == [] and conn.sent == []


def test_site_refuses_a_round_run_as_another_protocol_than_its_federations() -> None:
    """A masking federation's aggregator announces the round as CKKS (its own config edited):
    the sites would encrypt to a key holder, and one colluder could have it release a single
    site's update. The site refuses before fetching anything."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, conn = _site("masking", info, payloads)
    with pytest.raises(RoundAborted, match="another protocol"):
        next(site.rounds())
    assert conn.fetched == [] and conn.sent == []


def test_site_sends_to_each_round_number_once_even_across_restarts(tmp_path: Any) -> None:
    """The aggregator runs round 2, reports it failed after unmasking, and runs "round 2"
    again (or round 1) to get a second sum over other sites: the difference would be one
    site's update. The site recorded round 2 as spent before its first message left, in its
    directory, so a restarted training script refuses it too."""
    info, payloads = _model_info(2, "hospitals/job-1/round-2")
    site, conn = _site("masking", info, payloads, directory=tmp_path)
    rnd = next(site.rounds())
    from clients.errors import SiteError

    # (a round the aggregator says is no longer running is RoundAborted, as documented; it
    # was AggregatorRefused, and a training loop catching RoundAborted ended there)
    conn.stop_code = "FAILED_PRECONDITION"
    with pytest.raises(RoundAborted, match=r"aborted \(FAILED_PRECONDITION\): the test's "
                                           r"aggregator stops here \(the aggregator no longer "
                                           r"takes this site's message") as caught:
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    assert caught.value.code == "FAILED_PRECONDITION"
    assert conn.sent == ["Submit"]  # its first message left
    for number in (2, 1):  # skipped (a restarted script goes on to the next round)
        info, payloads = _model_info(number, f"hospitals/job-1/round-{number}")
        restarted, conn = _site("masking", info, payloads, directory=tmp_path)
        conn.then_done = True  # type: ignore[attr-defined]
        assert list(restarted.rounds()) == []
        assert conn.fetched == [] and conn.sent == []
        with pytest.raises(SiteError, match="already took part in round 2"):
            restarted._history.spend("job-1", number, b"\x01" * 32)
    info, payloads = _model_info(3, "hospitals/job-1/round-3")
    later, _ = _site("masking", info, payloads, directory=tmp_path)
    assert next(later.rounds()).number == 3


def test_a_damaged_round_history_is_a_clear_error(tmp_path: Any) -> None:
    from clients.errors import SiteError
    from clients.history import HISTORY_FILE

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    for damaged in ('{"version": 1, "last_round": {"job-1": "x"}}',
                    '{"version": 1, "last_round": {}, "in_sum": {"job-1": [1, [1e9, -1.0]]}}',
                    '{"version": 1, "last_round": {}, "in_sum": {"job-1": [1, "big"]}}'):
        (tmp_path / HISTORY_FILE).write_text(damaged)
        with pytest.raises(SiteError, match="not a round history"):
            _site("masking", info, payloads, directory=tmp_path)


def test_lies_the_site_detects_are_round_refusals_not_internal_errors() -> None:
    """A model whose bytes do not match its digest, a CKKS public context that does not
    parse: each is RoundAborted (a SiteError, which a training loop catches), never the
    library's internal exception."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1",
                                 data=np.ones(8, np.float32).tobytes())
    site, _ = _site("masking", info, payloads)
    with pytest.raises(RoundAborted, match="refused the round"):
        next(site.rounds())

    site, conn, _ = _ckks_site(wire.Blob((b"\x09" * 32,), 5), {b"\x09" * 32: b"junk!"})
    rnd = next(site.rounds())
    with pytest.raises(RoundAborted, match="refused the aggregator's messages"):
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    assert "upload" not in conn.sent


class _ExtraChunks(_ChunkStub):
    """GetChunks that also sends chunks nobody asked for."""

    def GetChunks(self, request: Any, timeout: float) -> Any:
        import hashlib

        for cid in request.chunk_ids:
            yield service_pb2.Chunk(chunk_id=cid, data=self.data)
        for i in range(100):
            extra = i.to_bytes(4, "big") * 16384
            self.served += 1
            yield service_pb2.Chunk(chunk_id=hashlib.sha256(extra).digest(), data=extra)


def test_download_refuses_chunks_that_were_not_asked_for() -> None:
    """The site asked for one 1 KiB chunk; the aggregator streams 64 KiB chunks it did not
    ask for (valid ones, each matching its id): refused at the first, nothing kept."""
    from clients.errors import AggregatorRefused

    stub = _ExtraChunks(b"y" * 1024)
    with pytest.raises(AggregatorRefused, match="not asked for"):
        _connection(stub).download(wire.Blob((stub.cid,), 1024), max_size=1024)
    assert stub.served == 1


def test_upload_refuses_an_aggregator_that_asks_for_a_chunk_it_was_not_offered() -> None:
    from clients.errors import AggregatorRefused

    class _Asks:
        put = False

        def MissingChunks(self, request: Any, timeout: float) -> Any:
            return service_pb2.ChunkIds(chunk_ids=[*request.chunk_ids, b"\x05" * 32])

        def PutChunks(self, stream: Any, timeout: float) -> Any:
            self.put = True
            return service_pb2.PutChunksResponse()

    stub = _Asks()
    with pytest.raises(AggregatorRefused, match="did not offer"):
        _connection(stub).upload(b"data")  # type: ignore[arg-type]
    assert not stub.put


def test_a_wrong_argument_to_submit_leaves_the_round_open_to_a_corrected_call() -> None:
    """A weight of 0 (a typo) is a ValueError and nothing is sent; the corrected call then
    goes ahead (before, the round was marked submitted first and the retry was told it
    "already submitted"). Numpy and 0-d torch scalars are numbers of samples too."""
    import torch

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    over = site.config.max_samples * 2  # above [update] max_samples: refused before spending

    from secagg.errors import ConfigurationError

    meta = torch.tensor(3.0, device="meta")  # (its .item() raised from inside torch)
    for bad in (0, -1.0, float("nan"), True, "10", np.array([3]), 1e-320, 10**400, over, meta):
        # (a ConfigurationError, which is a ValueError: what `except SecAggError` catches)
        with pytest.raises(ConfigurationError, match="weight must be"):
            rnd.submit({"w": np.ones(8, np.float32)}, weight=bad)
    assert conn.sent == []
    from clients.errors import AggregatorRefused, SiteError

    with pytest.raises(AggregatorRefused):  # got as far as sending (the stub stops it there)
        rnd.submit({"w": np.ones(8, np.float32)}, weight=torch.tensor(10))
    assert conn.sent == ["Submit"]
    with pytest.raises(SiteError, match="already submitted to this round"):
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    assert conn.sent == ["Submit"]
    for number, weight in ((2, np.int64(10)), (3, np.float32(2.5))):
        info, payloads = _model_info(number, f"hospitals/job-1/round-{number}")
        site, conn = _site("masking", info, payloads)
        with pytest.raises(AggregatorRefused):
            next(site.rounds()).submit({"w": np.ones(8, np.float32)}, weight=weight)
        assert conn.sent == ["Submit"]


def test_what_is_not_a_state_dict_of_readable_tensors_is_a_clear_error_and_nothing_is_sent(
        ) -> None:
    """A module instead of its state dict, a list, a sparse or meta tensor, a complex
    conjugate view: each raised from inside torch (or as a misleading dtype message); and an
    update whose difference from a float64 model overflows was clipped to NaN after the round
    was spent. Each is a ConfigurationError before anything is sent, and the round stays
    open to the corrected call."""
    import torch

    from clients.errors import AggregatorRefused
    from secagg.errors import ConfigurationError

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    linear = torch.nn.Linear(2, 4)
    bad: list[tuple[Any, str]] = [
        (linear, r"got Linear \(a module: pass model.state_dict\(\)\)"),
        ([np.ones(8, np.float32)], "got list"),
        ({"w": torch.ones(8).to_sparse()}, "'w' is sparse_coo"),
        ({"w": torch.ones(8, device="meta")}, "'w' is on the meta device"),
        ({"w": torch.ones(8, dtype=torch.complex64).conj()}, "."),
        # (a LazyLinear's parameter raised torch's own ValueError, naming no tensor)
        ({"w": torch.nn.LazyLinear(8).weight}, "'w' is an uninitialized \\(lazy\\) parameter"),
    ]
    for state, match in bad:
        with pytest.raises(ConfigurationError, match=match):
            rnd.submit(state, weight=10)
    assert conn.sent == []
    huge = np.full(8, -1.5e308)
    info, payloads = _model_info(1, "hospitals/job-1/round-1", w=huge)
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    with pytest.raises(ConfigurationError, match="not finite"):
        rnd.submit({"w": -huge}, weight=10)
    assert conn.sent == []
    with pytest.raises(AggregatorRefused):  # the corrected call goes ahead
        rnd.submit({"w": huge * 0.9}, weight=10)
    assert conn.sent == ["Submit"]


def test_download_stream_that_ends_short_is_a_refusal_not_a_key_error() -> None:
    from clients.errors import AggregatorRefused

    class _Short(_ChunkStub):
        def GetChunks(self, request: Any, timeout: float) -> Any:
            return iter(())  # ends at once, status OK

    stub = _Short(b"z" * 100)
    with pytest.raises(AggregatorRefused, match="without every chunk"):
        _connection(stub).download(wire.Blob((stub.cid,), 100), max_size=100)


class _StubServer:
    """The aggregator's side of a real ``Connection``: GetRound, and GetChunks counting what
    it serves (it names any size it likes)."""

    def __init__(self, info: Any) -> None:
        self.info, self.served = info, 0

    def GetRound(self, request: Any, timeout: float) -> Any:
        return self.info

    def GetChunks(self, request: Any, timeout: float) -> Any:
        for cid in request.chunk_ids:
            self.served += 1
            yield service_pb2.Chunk(chunk_id=cid, data=b"\0" * 1024)


def test_a_ckks_site_bounds_the_public_context_download_before_fetching() -> None:
    """The aggregator relays the key holder's genuine announcement with a context blob it
    claims is 1 TiB (a real one is ~0.1-0.4 MB): refused before a chunk is fetched."""
    from clients.errors import AggregatorRefused

    site, _, info = _ckks_site(wire.Blob((b"\x09" * 32,) * 1024, 2**40), {})
    from secagg.model import FlatModel

    model = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    rnd = Round(site, info, model)
    stub = _StubServer(info)
    rnd._conn = site._conn = _connection(stub)  # type: ignore[assignment]
    with pytest.raises(AggregatorRefused, match="at most"):
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    assert stub.served == 0


def test_two_site_objects_on_one_directory_cannot_both_send_to_a_round(tmp_path: Any) -> None:
    """A training script restarted while the old one still runs: both joined round 1 before
    either sent. The second to send re-reads the directory's history under its lock and
    refuses; nothing of its update leaves."""
    from clients.errors import AggregatorRefused, SiteError

    rounds = []
    conns = []
    for _ in range(2):
        info, payloads = _model_info(1, "hospitals/job-1/round-1")
        site, conn = _site("masking", info, payloads, directory=tmp_path)
        rounds.append(next(site.rounds()))
        conns.append(conn)
    # the race: the second has passed its own checks (which read the history too) when the
    # first records the round and sends; only the re-read under the lock stops the second
    history = rounds[1]._site._history
    spend = history.spend

    def first_sends_meanwhile(*args: Any, **kwargs: Any) -> None:
        with pytest.raises(AggregatorRefused):
            rounds[0].submit({"w": np.ones(8, np.float32)}, weight=10)
        spend(*args, **kwargs)

    history.spend = first_sends_meanwhile  # type: ignore[method-assign]
    with pytest.raises(SiteError, match="already took part in round 1"):
        rounds[1].submit({"w": np.ones(8, np.float32)}, weight=10)
    assert conns[0].sent == ["Submit"] and conns[1].sent == []


def test_a_result_of_other_names_shapes_or_dtypes_is_refused() -> None:
    """The README promises the average back with the round's names, shapes and dtypes; a
    result relabelled (a float tensor as int64) is refused, not handed to the script."""
    from clients.errors import ModelMismatch
    from secagg.model import FlatModel

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    other = FlatModel.from_arrays({"w": np.zeros(8, np.int64)})
    blob = wire.Blob((b"\x04" * 32,), len(other.to_bytes()))
    conn.payloads[blob.chunk_ids[0]] = other.to_bytes()
    done = service_pb2.RoundInfo(round=1, round_id=rnd.round_id,
                                 status=service_pb2.ROUND_STATUS_COMPLETED,
                                 result=wire.model_to_proto(other, blob))
    with pytest.raises(ModelMismatch, match="names, shapes"):
        site._accept_result(done, rnd.model)


@pytest.mark.parametrize(("number", "round_id"), [
    (3, "hospitals/job-1/round-3"),  # a later round's result
    (1, "hospitals/job-1/round-3"),  # this round's number under another round's id
    (3, "hospitals/job-1/round-1"),
])
def test_a_site_takes_only_its_own_rounds_result(number: int, round_id: str) -> None:
    """The aggregator answers "round finished" with another round's info: the site would take
    that round's result as the model it holds and check the next rounds against it. It
    refuses, as it accepts this round's own result."""
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    finished = service_pb2.RoundInfo()
    finished.CopyFrom(mine)
    finished.status = service_pb2.ROUND_STATUS_COMPLETED
    rnd = Round.__new__(Round)
    rnd._site, rnd.number, rnd.round_id = site, 1, "hospitals/job-1/round-1"
    rnd._deadline = float("inf")
    rnd._conn = types.SimpleNamespace(call=lambda *a, **k: finished)  # type: ignore[assignment]
    assert rnd._wait_for_end() is finished
    finished.round, finished.round_id = number, round_id
    with pytest.raises(RoundAborted, match="result of another round"):
        rnd._wait_for_end()


class _Chain(_Scripted):
    """Announces ``info`` and answers the site's look back at the rounds it missed
    (GetRound without waiting) from ``past``."""

    def __init__(self, info: Any, payloads: dict[bytes, bytes],
                 past: dict[int, Any]) -> None:
        super().__init__(info, payloads)
        self.past = past

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        if method == "GetRound" and request.wait_ms == 0:
            return self.past.get(request.after_round + 1, service_pb2.RoundInfo())
        return super().call(method, request, timeout)


@pytest.mark.parametrize("missed", [False, True])
def test_a_site_refuses_a_round_whose_model_does_not_follow_from_the_one_it_holds(
        missed: bool) -> None:
    """The site holds round 1's result; the aggregator opens the next round the site joins
    from another model (one it chose: model substitution). Refused before anything is fetched,
    whether the site joins round 2 or missed round 2 and joins round 3; a model that does
    follow (round 2 completed from the held model, within an honest round's step, and
    round 3 starts from its result) is taken."""
    from secagg.model import FlatModel

    number = 3 if missed else 2
    info, payloads = _model_info(number, f"hospitals/job-1/round-{number}")
    announced = bytes(info.model.digest)
    held_model = FlatModel.from_arrays({"w": np.full(8, 0.1, np.float32)})
    held_blob = wire.Blob((b"\x12" * 32,), len(held_model.to_bytes()))
    payloads[held_blob.chunk_ids[0]] = held_model.to_bytes()
    held = held_model.digest

    def past(result: bytes) -> dict[int, Any]:
        if not missed:
            return {}
        round2 = service_pb2.RoundInfo(round=2, round_id="hospitals/job-1/round-2",
                                       status=service_pb2.ROUND_STATUS_COMPLETED)
        round2.model.CopyFrom(wire.model_to_proto(held_model, held_blob))
        round2.result.CopyFrom(info.model)
        round2.result.digest = result
        return {2: round2}

    for result, follows in ((b"\x22" * 32, False), (announced, True)):
        if follows and not missed:
            continue  # (round 2 follows from round 1 only by starting from its result)
        site, _ = _site("masking", info, payloads)
        conn = _Chain(info, payloads, past(result))
        site._conn = conn  # type: ignore[assignment]
        site._model_digest, site._held_round = held, 1
        # (the site holds the model too: it is not the one the round starts from, so the
        # round's own is fetched, not the held one used)
        site._held_model = held_model
        if follows:
            assert next(site.rounds()).model.digest == announced
            continue
        with pytest.raises(ModelMismatch, match="does not follow"):
            next(site.rounds())
        assert conn.fetched == [] and conn.sent == []


@pytest.mark.parametrize("lie", ["starts-from-another-model", "aborted-but-moved"])
def test_a_missed_round_moves_the_held_model_only_from_it_and_only_if_completed(
        lie: str) -> None:
    """The site holds round 1's result and missed round 2; the aggregator opens round 3
    from a model of its choosing and says round 2 led there: from another model than the
    one the site holds, or as a round that aborted (whose model does not move) but still
    carries a "result". Either is model substitution: refused before anything is fetched."""
    info, payloads = _model_info(3, "hospitals/job-1/round-3")
    announced = bytes(info.model.digest)
    held = b"\x11" * 32
    round2 = service_pb2.RoundInfo(
        round=2, round_id="hospitals/job-1/round-2",
        status=(service_pb2.ROUND_STATUS_ABORTED if lie == "aborted-but-moved"
                else service_pb2.ROUND_STATUS_COMPLETED))
    round2.model.digest = b"\x33" * 32 if lie == "starts-from-another-model" else held
    round2.result.digest = announced
    site, _ = _site("masking", info, payloads)
    conn = _Chain(info, payloads, {2: round2})
    site._conn = conn  # type: ignore[assignment]
    site._model_digest, site._held_round = held, 1
    with pytest.raises(ModelMismatch, match="does not follow"):
        next(site.rounds())
    assert conn.fetched == [] and conn.sent == []


def test_a_missed_round_chain_shown_slowly_is_given_up_within_the_rounds_patience(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The site holds round 1's model and the aggregator opens round 60 of a long job,
    showing the 58 rounds between one at a time, each answer held as long as a call may
    take: nothing bounded the walk as a whole (120 s for 12 rounds held 10 s each; hours
    for a long job). It has the round's patience, then ModelMismatch, naming it."""
    from clients.site import _round_patience

    clock = _fake_clock(monkeypatch)
    info, payloads = _model_info(60, "hospitals/job-1/round-60")
    held = b"\x11" * 32
    site, _ = _site("masking", info, payloads)
    site.config = dataclasses.replace(site.config, rounds=100)
    asked: list[int] = []

    class _Slow(_Chain):
        def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
            if method == "GetRound" and request.wait_ms == 0:
                asked.append(request.after_round + 1)
                clock[0] += 60.0  # (each answer held as long as a call may take)
                past = service_pb2.RoundInfo(round=request.after_round + 1, round_id=(
                    f"hospitals/job-1/round-{request.after_round + 1}"),
                    status=service_pb2.ROUND_STATUS_ABORTED)
                past.model.digest = held
                return past
            return super().call(method, request, timeout)

    conn = _Slow(info, payloads, {})
    site._conn = conn  # type: ignore[assignment]
    site._model_digest, site._held_round = held, 1
    with pytest.raises(ModelMismatch, match="patience"):
        next(site.rounds())
    patience = _round_patience(site.config)
    assert len(asked) <= patience / 60 + 1 < 58, len(asked)
    assert conn.fetched == [] and conn.sent == []


def test_a_missed_round_chain_downloaded_slowly_is_given_up_within_the_rounds_patience(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The aggregator says the site missed 98 completed rounds, each an honest step, and
    sends each step's result just inside the slowest supported link's pace (100 s here):
    the walk's look at the rounds had the round's patience, but not its downloads (a site
    spent 24 s in a walk given 5 s; 8 hours in a 100-round job). A step begun within the
    patience is finished; none begins after it."""
    from clients.site import _round_patience
    from secagg.model import FlatModel

    clock = _fake_clock(monkeypatch)
    # the model after round k: a step of 1e-4 a round, well within an honest round's bound
    models = [FlatModel.from_arrays({"w": np.full(8, 1e-4 * k, np.float32)})
              for k in range(100)]
    blobs = [wire.Blob((bytes([k + 1]) * 32,), len(m.to_bytes())) for k, m in enumerate(models)]
    info, payloads = _model_info(100, "hospitals/job-1/round-100", w=np.full(
        8, 1e-4 * 99, np.float32))
    payloads.update({b.chunk_ids[0]: m.to_bytes() for m, b in zip(models, blobs, strict=True)})
    site, _ = _site("masking", info, payloads)
    site.config = dataclasses.replace(site.config, rounds=100)

    def past(number: int) -> Any:
        p = service_pb2.RoundInfo(round=number, round_id=f"hospitals/job-1/round-{number}",
                                  status=service_pb2.ROUND_STATUS_COMPLETED)
        p.model.CopyFrom(wire.model_to_proto(models[number - 1], blobs[number - 1]))
        p.result.CopyFrom(wire.model_to_proto(models[number], blobs[number]))
        return p

    class _Slow(_Chain):
        def download(self, blob: Any, **kwargs: Any) -> bytes:
            clock[0] += 100.0
            return super().download(blob, **kwargs)

    conn = _Slow(info, payloads, {n: past(n) for n in range(2, 100)})
    site._conn = conn  # type: ignore[assignment]
    site._model_digest, site._held_round = models[1].digest, 1
    with pytest.raises(ModelMismatch, match="patience"):
        next(site.rounds())
    patience = _round_patience(site.config)
    assert patience < 98 * 100  # (the walk would have outlasted it)
    assert clock[0] <= patience + 2 * 100, (clock[0], patience)
    assert conn.sent == []


def test_a_missed_round_padded_past_its_models_size_is_refused_as_it_is_read() -> None:
    """The steps of the missed-rounds walk are kept until its end; each model's chunk list
    and size come from the aggregator, and padded (chunk ids by the hundred thousand) they
    held 8 MB a round. A step naming more chunks or bytes than a model of the job's spec
    has is refused as it is read, before the next round is asked for."""
    info, payloads = _model_info(3, "hospitals/job-1/round-3")
    held = b"\x11" * 32
    asked: list[int] = []

    def past(number: int) -> Any:
        p = service_pb2.RoundInfo(round=number, round_id=f"hospitals/job-1/round-{number}",
                                  status=service_pb2.ROUND_STATUS_COMPLETED)
        p.model.CopyFrom(info.model)
        p.model.digest = held if number == 2 else b"\x22" * 32
        p.result.CopyFrom(info.model)
        p.result.digest = b"\x22" * 32 if number == 2 else bytes(info.model.digest)
        if number == 2:
            p.result.data.chunk_ids.extend([b"\x07" * 32] * 20_000)
        return p

    class _Padded(_Chain):
        def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
            if method == "GetRound" and request.wait_ms == 0:
                asked.append(request.after_round + 1)
                return past(request.after_round + 1)
            return super().call(method, request, timeout)

    site, _ = _site("masking", info, payloads)
    conn = _Padded(info, payloads, {})
    site._conn = conn  # type: ignore[assignment]
    site._model_digest, site._held_round = held, 1
    with pytest.raises(ModelMismatch, match="missed round 2's model"):
        next(site.rounds())
    assert asked == [2] and conn.fetched == []


def test_a_running_round_zero_is_refused_once_and_is_no_news_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator answers every poll at once with a running round 0 (padded to the
    message limit): a script catching RoundAborted, as the README says, took it again and
    again unpaced (3 GB in 20 s). Refused once; after that it is no news, paced, and the
    site goes on to the job's round 1."""
    clock = _fake_clock(monkeypatch)
    mine, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", mine, payloads)
    zero = service_pb2.RoundInfo()
    zero.CopyFrom(mine)
    zero.round, zero.round_id = 0, "hospitals/job-1/round-0"
    zero.abort_reason = "x" * 1_000_000
    asked: list[int] = []

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        asked.append(request.after_round)
        assert len(asked) < 20
        return zero if len(asked) < 5 else mine

    conn.call = call  # type: ignore[method-assign]
    with pytest.raises(RoundAborted):
        next(site.rounds())
    rnd = next(site.rounds())  # the script caught it and went on
    assert rnd.number == 1 and asked == [0] * 5
    # the three padded answers after the refusal were paced by their bytes (64 KiB/s)
    assert clock[0] >= 3 * (1_000_000 - 128 * 1024) / (64 * 1024)


def test_a_padded_info_to_join_with_does_not_unpace_the_polls_after_it() -> None:
    """How much a "nothing new" answer may hold unpaced was the size of the info the site
    joined the round with, as the aggregator sent it: padded to the message limit, every
    poll after it came unpaced (100 MB a minute, not 64 KiB/s). It is what an honest info
    can hold for the model the site knows."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    honest = info.ByteSize()
    info.abort_reason = "x" * 8_000_000
    site, _ = _site("masking", info, payloads)
    rnd = next(site.rounds())
    assert honest < rnd._poll_allowance < honest + 128 * 1024, rnd._poll_allowance
    assert site._poll_allowance == rnd._poll_allowance


@pytest.mark.parametrize("held", [0, 1, 3])
def test_a_job_the_aggregator_ends_before_its_last_round_is_said(
        held: int, caplog: pytest.LogCaptureFixture) -> None:
    """The aggregator answered "job done" while the site held round 1's result of a 3-round
    job (or the job's first model): rounds() ended as for a finished job, with no word, and
    the training script ran its "training finished" path with an early model."""
    import logging

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    site._held_round = held
    if held:
        site._model_digest = b"\x05" * 32  # (a round's result)
    done = service_pb2.RoundInfo(status=service_pb2.ROUND_STATUS_JOB_DONE)
    conn.call = lambda method, request, **_kw: done  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="clients"):
        assert list(site.rounds()) == []
    said = [r.getMessage() for r in caplog.records if "is over" in r.getMessage()]
    if held == 3:
        assert said == []
    else:
        assert len(said) == 1 and f"after {held} of its 3 rounds" in said[0], said
        assert ("the job's first model" in said[0]) == (held == 0), said
    if held == 1:
        # the model round 2 starts from when round 1 aborted is still the first model: it
        # was called "round 1's result" (an outside tester)
        site._model_digest = site.config.initial_model_digest
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clients"):
            assert list(site.rounds()) == []
        assert "the job's first model" in caplog.text


def _take_round_1_result(site: Site, conn: Any, rnd: Any) -> tuple[Any, Any]:
    """Round 1's result (every value 0.5), served by ``conn``, taken by ``site`` at the end
    of ``rnd``: the result and its blob."""
    from secagg.model import FlatModel

    result = FlatModel.from_arrays({"w": np.full(8, 0.5, np.float32)})
    blob = wire.Blob((b"\x05" * 32,), len(result.to_bytes()))
    conn.payloads[blob.chunk_ids[0]] = result.to_bytes()
    done = service_pb2.RoundInfo(round=1, round_id=rnd.round_id,
                                 status=service_pb2.ROUND_STATUS_COMPLETED,
                                 result=wire.model_to_proto(result, blob))
    site._accept_result(done, rnd.model)
    return result, blob

def test_a_restarted_site_still_refuses_a_model_that_does_not_follow_from_the_one_it_held(
        tmp_path: Any) -> None:
    """The site took round 1's result, and its training script restarts. The aggregator opens
    round 2 from a model of its own making (a fresh Site would accept any first model). The
    model the site held is kept in its directory's history, so the restarted site refuses
    it, before fetching anything, as the running one would; round 2 from that result is
    taken."""

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads, directory=tmp_path)
    rnd = next(site.rounds())
    result, blob = _take_round_1_result(site, conn, rnd)

    made_up, payloads = _model_info(2, "hospitals/job-1/round-2")  # (zeros, not the result)
    restarted, conn = _site("masking", made_up, payloads, directory=tmp_path)
    with pytest.raises(ModelMismatch, match="does not follow"):
        next(restarted.rounds())
    assert conn.fetched == [] and conn.sent == []

    following = service_pb2.RoundInfo()
    following.CopyFrom(made_up)
    following.model.CopyFrom(wire.model_to_proto(result, blob))
    restarted, _ = _site("masking", following, {blob.chunk_ids[0]: result.to_bytes()},
                         directory=tmp_path)
    assert next(restarted.rounds()).model.digest == result.digest


def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The SDK's clock as a list of one value, which its sleeps advance (no real waiting)."""
    import clients.site

    clock = [0.0]
    monkeypatch.setattr(clients.site.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(clients.site.time, "sleep",
                        lambda s: clock.__setitem__(0, clock[0] + s))
    return clock


def _poll_done(mine: Any, method: str, poll: str) -> Any:
    """The answer that ends ``poll``: a stage's answer, the round completed, the job done."""
    if method == "Receive":
        return service_pb2.ReceiveResponse(ready=True)
    done = service_pb2.RoundInfo()
    done.CopyFrom(mine)
    done.status = (service_pb2.ROUND_STATUS_COMPLETED if poll == "wait_for_end"
                   else service_pb2.ROUND_STATUS_JOB_DONE)
    return done


def _run_poll(site: Any, call: Any, poll: str) -> None:
    """``poll`` (the wait for the round's end, a stage's answer, or the next round) of
    round 1 at ``site``, its calls answered by ``call``."""
    rnd = Round.__new__(Round)
    rnd._site, rnd.number, rnd.round_id = site, 1, "hospitals/job-1/round-1"
    rnd._deadline = float("inf")
    rnd._conn = types.SimpleNamespace(call=call)  # type: ignore[assignment]
    site._conn = types.SimpleNamespace(call=call)
    if poll == "wait_for_end":
        rnd._wait_for_end()
    elif poll == "receive":
        rnd._receive(1)
    else:
        assert site._next_round_info() is None


@pytest.mark.parametrize("poll", ["wait_for_end", "receive", "next_round"])
def test_long_polls_answered_at_once_with_nothing_new_are_spaced_out(
        poll: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator answers every long poll at once with "nothing new" (each reply up
    to the message limit): the site called it a hundred times a second and received
    gigabytes. Such polls are now spaced out, up to 5 s apart."""
    clock = _fake_clock(monkeypatch)
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    calls = [0]

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] < 40:  # nothing new, at once
            return (service_pb2.ReceiveResponse(ready=False) if method == "Receive"
                    else service_pb2.RoundInfo())
        return _poll_done(mine, method, poll)

    _run_poll(site, call, poll)
    assert calls[0] == 40
    assert clock[0] >= 60.0  # 39 early answers: about 2 s apart on average, at least


def test_the_wait_for_a_rounds_end_stops_at_its_abort_with_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The aggregator answers the wait for the round's end with the round aborted: the site
    stops at that answer, RoundAborted with the aggregator's reason (not after the round's
    patience, as a round the aggregator did not end: the fake clock would run to it)."""
    import clients.site

    _fake_clock(monkeypatch)
    monkeypatch.setattr(clients.site, "_round_patience", lambda config: 600.0)
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    calls = [0]

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        calls[0] += 1
        aborted = service_pb2.RoundInfo()
        aborted.CopyFrom(mine)
        aborted.status = service_pb2.ROUND_STATUS_ABORTED
        aborted.abort_reason = "TOO_FEW_SURVIVORS"
        return aborted

    rnd = Round.__new__(Round)
    rnd._site, rnd.number, rnd.round_id = site, 1, "hospitals/job-1/round-1"
    rnd._deadline = 600.0
    rnd._conn = types.SimpleNamespace(call=call)  # type: ignore[assignment]
    with pytest.raises(RoundAborted, match="TOO_FEW_SURVIVORS") as caught:
        rnd._wait_for_end()
    assert caught.value.code == "ABORTED" and calls[0] == 1


def _padded(message: Any, nbytes: int) -> Any:
    """``message`` with an unknown field of ``nbytes`` (what a lying aggregator pads an
    answer with: a parser keeps it, and it costs the site's link and memory all the same)."""
    payload = b"\0" * nbytes
    size, length = bytearray(), len(payload)
    while True:  # (the length as a protobuf varint)
        size.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    padded = type(message)()
    padded.CopyFrom(message)
    padded.MergeFromString(b"\xba\x3e" + bytes(size) + payload)  # (field 999, bytes)
    return padded


@pytest.mark.parametrize("poll", ["wait_for_end", "receive", "next_round"])
def test_polls_padded_and_held_past_the_pacers_threshold_are_paced_by_their_bytes(
        poll: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator padded each "nothing new" answer to the message limit and held it
    just past the point where the pacer takes it for an honest long poll: ~6 MB a second
    until the round's patience ran out. An answer of n bytes now takes n /
    POLL_BYTES_PER_SECOND from its start to the next poll."""
    from clients.site import POLL_BYTES_PER_SECOND, POLL_MS, POLL_SLACK_BYTES

    clock = _fake_clock(monkeypatch)
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    calls, pad = [0], 1 << 20

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        calls[0] += 1
        clock[0] += POLL_MS / 2000 + 0.05  # held just past the pacer's threshold
        if calls[0] <= 10:
            return _padded(service_pb2.ReceiveResponse(ready=False) if method == "Receive"
                           else service_pb2.RoundInfo(), pad)
        return _poll_done(mine, method, poll)

    _run_poll(site, call, poll)
    assert calls[0] == 11
    # (held alone: 10 x 5.05 s; the allowance is what the round's info as joined holds)
    assert clock[0] >= 10 * (pad - POLL_SLACK_BYTES) / POLL_BYTES_PER_SECOND


def test_a_padded_answer_is_paced_at_the_documented_64_kib_a_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """README: answers that bring nothing new are paced by their size at 64 KiB/s. The test
    above reads the pace from the constant it checks (a pace of 64 MiB/s, a thousand times
    what a padding aggregator may pull through a site's link, passed it): here an answer of
    30 x 64 KiB, held 6 s (past the pacer's threshold for a long poll), is 30 s from its
    start to the next poll."""
    from clients.site import _Pacer

    clock = _fake_clock(monkeypatch)
    clock[0] = 100.0
    _Pacer(allowance=0).nothing_new(94.0, 30 * 64 * 1024)
    assert clock[0] == pytest.approx(124.0)


@pytest.mark.parametrize("case", ["honest", "patience"])
def test_a_polls_byte_pacing_spares_the_rounds_own_info_and_ends_with_its_patience(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An honest "nothing new" repeats the round's info, with its model's names and shapes
    (4.6 MB for 65,536 tensors): paced by its bytes, it slept 70 s a poll. What the info as
    joined holds is allowed; and no pacing sleeps past the round's patience (it slept up to
    128 s beyond it)."""
    from clients.site import POLL_MS

    clock = _fake_clock(monkeypatch)
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    pad, calls = 4 << 20, [0]

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        calls[0] += 1
        clock[0] += POLL_MS / 2000 + 0.05
        return (_padded(service_pb2.ReceiveResponse(ready=False), pad) if calls[0] <= 3
                else service_pb2.ReceiveResponse(ready=True))

    rnd = Round.__new__(Round)
    rnd._site, rnd.number, rnd.round_id = site, 1, "hospitals/job-1/round-1"
    rnd._conn = types.SimpleNamespace(call=call)  # type: ignore[assignment]
    if case == "honest":
        rnd._deadline = float("inf")
        rnd._poll_allowance = pad + 1024  # (the round's info as joined was this large)
        rnd._receive(1)
        assert calls[0] == 4 and clock[0] < 4 * (POLL_MS / 2000 + 0.05) + 1  # held, not paced
    else:
        rnd._deadline = 7.0
        with pytest.raises(RoundAborted, match="did not end the round within"):
            rnd._receive(1)
        assert calls[0] == 2 and clock[0] < 7.0 + 2 * (POLL_MS / 2000 + 0.05)


def test_a_ckks_key_wait_answered_padded_at_once_is_paced_by_its_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CKKS site waiting for the round's key asked once a second (no long poll), and a
    lying aggregator answered "no key yet" padded to 6 MB each time, at once: 6 MB a second
    until the round's patience ran out. The wait is paced by the answers' bytes too."""
    import clients.site
    from clients.site import POLL_BYTES_PER_SECOND

    clock = _fake_clock(monkeypatch)
    monkeypatch.setattr(clients.site, "_round_patience", lambda config: 1e9)
    rnd, conn = _ckks_round_then_aborted("no key came")
    aborted = conn.info
    running = service_pb2.RoundInfo()
    running.CopyFrom(aborted)
    running.status = service_pb2.ROUND_STATUS_RUNNING
    running = _padded(running, 1 << 20)
    answers = [running] * 5 + [aborted]

    def call(method: str, request: Any, timeout: float | None = None) -> Any:
        assert method == "GetRound"
        return answers.pop(0)

    conn.call = call  # type: ignore[method-assign]
    with pytest.raises(RoundAborted, match="no key came"):
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    assert not answers
    assert clock[0] >= 5 * (running.ByteSize() - rnd._poll_allowance) / POLL_BYTES_PER_SECOND - 1


@pytest.mark.parametrize("case", ["key_directory", "share_delivery", "survivor_list",
                                  "unmask_request", "ckks_release_request",
                                  "attestation_partners", "aggregate_sites", "payload_chunk_ids"])
def test_a_stage_answer_with_more_entries_than_the_roster_has_sites_is_refused_first(
        case: str) -> None:
    """A key directory padded to 8 MB with entries cost a site 762 MB and 8 CPU seconds to
    decode before it was refused as DUPLICATE_SITE (a release request of 1.3 million uploads,
    498 MB); a survivor list's attestation with its partners padded to 8 MB, one level
    down, 271 MB. No honest answer names more entries than the roster has sites, in any of
    its lists at any depth: counted before a Python object is made of any."""
    from secagg.v1 import masking_pb2

    kind = {"attestation_partners": "survivor_list", "aggregate_sites": "ckks_release_request",
            "payload_chunk_ids": "ckks_release_request"}.get(case, case)

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", info, payloads)
    sites = len(site.kit.roster)
    too_many = {
        "key_directory": lambda n: masking_pb2.KeyDirectory(
            entries=[masking_pb2.AdvertiseKeys(site_id=1)] * n),
        "share_delivery": lambda n: masking_pb2.ShareDelivery(
            encrypted_shares={i: b"x" for i in range(1, n + 1)}),
        "survivor_list": lambda n: masking_pb2.SurvivorList(survivors=[1] * n),
        "unmask_request": lambda n: masking_pb2.UnmaskRequest(dropped=[2] * n),
        "ckks_release_request": lambda n: service_pb2.CkksReleaseRequest(
            uploads=[service_pb2.EncryptedUpdateRef(site_id=1)] * n),
        "attestation_partners": lambda n: masking_pb2.SurvivorList(
            survivors=[1, 2], attestations={
                1: masking_pb2.MaskAttestation(), 2: masking_pb2.MaskAttestation(
                    partners=[1] * n)}),
        "aggregate_sites": lambda n: service_pb2.CkksReleaseRequest(
            aggregate=service_pb2.EncryptedAggregateRef(sites=[1] * n)),
        "payload_chunk_ids": lambda n: service_pb2.CkksReleaseRequest(uploads=[
            service_pb2.EncryptedUpdateRef(site_id=1), service_pb2.EncryptedUpdateRef(
                chunks=service_pb2.Blob(chunk_ids=[bytes(32)] * n))]),
    }[case]
    rnd = Round.__new__(Round)
    rnd._site, rnd.number, rnd.round_id = site, 1, "hospitals/job-1/round-1"
    rnd._deadline = float("inf")
    answer: list[Any] = []
    rnd._conn = types.SimpleNamespace(  # type: ignore[assignment]
        call=lambda *_a, **_k: answer[0])
    answer.append(service_pb2.ReceiveResponse(ready=True, **{kind: too_many(sites)}))
    assert rnd._receive(1) is answer[0]  # (as many as the roster's sites: read)
    answer[0] = service_pb2.ReceiveResponse(ready=True, **{kind: too_many(sites + 1)})
    if case == "payload_chunk_ids":  # a payload's chunks are as many as its size needs
        assert rnd._receive(1) is answer[0]
        return
    with pytest.raises(RoundAborted, match=f"names {sites + 1} .*more than the roster's"):
        rnd._receive(1)


@pytest.mark.parametrize("announced", ["passed", "round 0, finished", "alternating"])
def test_a_round_the_site_passed_announced_at_once_again_and_again_is_paced(
        announced: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator answers every GetRound at once with the running round this site
    already passed (asked for the rounds after it): the site skipped it, asked again and
    spun, thousands of calls and warnings a second. It is not news: paced like "nothing
    new", until the job's end."""
    clock = _fake_clock(monkeypatch)
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    site._last_round = 1  # the site passed round 1 (skipped it, or took part)
    calls = [0]

    zero = service_pb2.RoundInfo(round=0, round_id="hospitals/job-1/round-0",
                                 status=service_pb2.ROUND_STATUS_COMPLETED)

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        calls[0] += 1
        assert method == "GetRound" and request.after_round == 1  # never reset
        if calls[0] < 40:  # at once: round 1 running, round 0 finished, or each in turn
            return {"passed": mine, "round 0, finished": zero,
                    "alternating": (mine, zero)[calls[0] % 2]}[announced]
        return service_pb2.RoundInfo(status=service_pb2.ROUND_STATUS_JOB_DONE)

    site._conn = types.SimpleNamespace(call=call)  # type: ignore[assignment]
    assert site._next_round_info() is None
    assert calls[0] == 40
    assert clock[0] >= 60.0


def test_text_the_aggregator_chose_reaches_errors_on_one_line_and_bounded() -> None:
    """A lying aggregator names a round with a line break, a forged log line, a terminal
    escape and megabytes of padding (and as much in an abort reason or a status's details):
    the training script logged the site's error, and the forged line stood on its own. The
    errors carry such text escaped, on one line, and cut short."""
    from clients.errors import AggregatorRefused

    forged = ("x\n2026-12-03 10:00:00 INFO clients: round 1 completed: the new model was "
              "verified\x1b[2K\r" + "A" * (7 << 20))
    info, payloads = _model_info(1, forged, service_pb2.PROTOCOL_CKKS)
    site, _conn = _site("masking", info, payloads)
    with pytest.raises(RoundAborted) as caught:
        next(site.rounds())
    refused = AggregatorRefused("FAILED_PRECONDITION", forged)
    for text in (str(caught.value), caught.value.round_id, str(refused), refused.reason,
                 str(RoundAborted("hospitals/job-1/round-1", forged))):
        assert "\n" not in text and "\r" not in text and "\x1b" not in text
        assert len(text) < 2000
    assert "\\n2026-12-03" in str(caught.value)  # still readable, escaped


def test_an_abort_names_the_aggregators_code_and_a_cut_text_says_its_length() -> None:
    """An abort the aggregator answered names its gRPC code (FAILED_PRECONDITION: this site
    was left out; ABORTED: the round ended), a site's own abort names none; text cut short
    says how long it was, and a round id is cut shorter than a reason."""
    from clients.errors import shown

    assert str(RoundAborted("r-1", "TOO_FEW_SURVIVORS", "ABORTED")) == (
        "round r-1 aborted (ABORTED): TOO_FEW_SURVIVORS")
    assert str(RoundAborted("r-1", "model mismatch")) == "round r-1 aborted: model mismatch"
    assert shown("A" * 1000) == "A" * 1000
    assert shown("A" * 5000) == "A" * 1000 + "... (5000 characters)"
    assert len(RoundAborted("r" * 5000, "x").round_id) < 250


@pytest.mark.parametrize("number", [1, 3])
def test_a_site_holding_no_model_yet_takes_only_the_first_model_its_config_names(
        number: int) -> None:
    """The aggregator opens the job (round 1, or round 3 for a site joining late) from a
    model of its own making: a site that held no model took any. Its config names the first
    model's digest (`federation init --model` writes it): a round that does not start from
    it, or follow from it, is refused before anything is fetched; the named model is
    taken."""
    import dataclasses

    from secagg.model import FlatModel

    info, payloads = _model_info(number, f"hospitals/job-1/round-{number}")
    made_up = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    first = FlatModel.from_arrays({"w": np.full(8, 0.25, np.float32)})
    site, conn = _site("masking", info, payloads)
    site.config = dataclasses.replace(site.config, initial_model_digest=first.digest)
    site._model_digest = first.digest  # as Site() sets it from such a config
    assert made_up.digest != first.digest
    with pytest.raises(ModelMismatch, match="does not follow"):
        next(site.rounds())
    assert conn.fetched == [] and conn.sent == []

    pinned, _ = _site("masking", info, payloads)
    kit = pinned.kit
    kit.config = dataclasses.replace(kit.config, initial_model_digest=made_up.digest)
    assert Site(kit, conn)._model_digest == made_up.digest  # type: ignore[arg-type]
    if number == 1:
        fresh = Site(kit, _Scripted(info, payloads))  # type: ignore[arg-type]
        assert next(fresh.rounds()).model.digest == made_up.digest


def _waiting_round(wait: str, monkeypatch: pytest.MonkeyPatch, waiting_until: float,
                   flapping: bool = False, poll_s: float = 10.0,
                   stop_at: float = math.inf,
                   waiting_from: float = 0.0,
                   flipping: bool = False) -> tuple[Round, list[float]]:
    """A round whose every wait is answered "not yet", said to wait for its sites (1 of the 3
    it needs asking; ``flapping``: another count at each answer; ``flipping``: said under way
    at every other answer) from ``waiting_from`` until the clock passes ``waiting_until``,
    after ``poll_s`` (an honest poll's full wait: 10 s); _Stopped once the clock passes
    ``stop_at``."""
    clock = _fake_clock(monkeypatch)
    mine, _ = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS
                          if wait == "ckks_key" else service_pb2.PROTOCOL_MASKING)
    site, _conn = _site("ckks" if wait == "ckks_key" else "masking", mine, {})
    calls = [0]

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        calls[0] += 1
        assert calls[0] < 100_000, "the site still waits for a round that never ends"
        clock[0] += poll_s
        if clock[0] > stop_at:
            raise _Stopped(calls[0])
        asking = calls[0] % 3 if flapping else 1
        waiting = (service_pb2.RoundWaiting(sites_asking=asking, sites_needed=3)
                   if waiting_from <= clock[0] < waiting_until
                   and not (flipping and calls[0] % 2 == 0) else None)
        if method == "Receive":
            return service_pb2.ReceiveResponse(ready=False, waiting=waiting)
        info = service_pb2.RoundInfo()
        info.CopyFrom(mine)  # running, no key announced
        if waiting is not None:
            info.waiting.CopyFrom(waiting)
        return info

    rnd = Round(site, mine, None)  # type: ignore[arg-type]
    rnd._conn = types.SimpleNamespace(call=call)  # type: ignore[assignment]
    return rnd, clock


def _wait(rnd: Round, wait: str) -> None:
    if wait == "receive":
        rnd._receive(1)
    elif wait == "wait_for_end":
        rnd._wait_for_end()
    else:
        rnd._run_ckks(np.zeros(8), 0.5)


@pytest.mark.parametrize("wait", ["receive", "wait_for_end", "ckks_key"])
def test_a_round_the_aggregator_never_ends_is_given_up(
        wait: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator answers every wait of a round (a stage's messages, the round's end,
    the CKKS key) with "not yet", after the poll's full wait: the site stayed in submit()
    for good. A site gives a round twice what its federation's [deadlines] allow, and five
    minutes more, then gives it up (RoundAborted); the training script goes on."""
    import clients.site

    rnd, clock = _waiting_round(wait, monkeypatch, waiting_until=0.0)  # (never said waiting)
    patience = clients.site._round_patience(rnd._site.config)
    with pytest.raises(RoundAborted, match="did not end the round"):
        _wait(rnd, wait)
    assert patience <= clock[0] <= patience + 30


@pytest.mark.parametrize("wait", ["receive", "wait_for_end", "ckks_key"])
def test_a_round_waiting_for_its_sites_is_waited_for_and_said(
        wait: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An aggregator started before the hospitals came online keeps its first round waiting
    for its sites (its deadlines not running). A site that came early gave the round up at
    its patience (55 minutes at the defaults), a RoundAborted its training script ended on,
    while the round still waited for the others. The aggregator now says the round waits: the
    site waits with it, says so once a minute at most, and its patience runs from when the
    round is under way."""
    import clients.site

    patience = clients.site._round_patience(_site("masking", _model_info(
        1, "hospitals/job-1/round-1")[0], {})[0].config)
    hours = 3 * 3600.0
    assert hours > 2 * patience
    rnd, clock = _waiting_round(wait, monkeypatch, waiting_until=hours)
    with caplog.at_level("INFO", logger="clients"), \
            pytest.raises(RoundAborted, match="did not end the round"):
        _wait(rnd, wait)
    assert hours + patience - 30 <= clock[0] <= hours + patience + 30
    said = [r.getMessage() for r in caplog.records if "waits for its sites" in r.getMessage()]
    assert said and "(asking: 1, needed: at least 3)" in said[0]
    assert len(said) <= hours / clients.site.WAITING_SAID_SECONDS + 1
    assert any("is under way" in r.getMessage() for r in caplog.records)


class _Stopped(Exception):
    pass


@pytest.mark.parametrize("wait", ["receive", "wait_for_end"])
def test_a_waiting_round_answered_at_once_stays_paced_past_the_first_patience(
        wait: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The polls' pacing stops at the round's patience (no sleep past it); a round said to
    wait for its sites moves the patience on, and the pacing must follow it: answered at
    once, "waiting", an hour past the first patience, the site polled a hundred times a
    second."""
    import clients.site

    patience = clients.site._round_patience(_site("masking", _model_info(
        1, "hospitals/job-1/round-1")[0], {})[0].config)
    limit = patience + 3600.0
    rnd, _clock = _waiting_round(wait, monkeypatch, waiting_until=math.inf, poll_s=0.0,
                                stop_at=limit)
    with pytest.raises(_Stopped) as stopped:
        _wait(rnd, wait)
    # (spaced 2.5 to 5 s once the back-off is at its top)
    assert stopped.value.args[0] <= limit / 2.5 + 20


@pytest.mark.parametrize("wait", ["receive", "wait_for_end", "ckks_key"])
def test_a_round_first_said_waiting_late_is_held_a_day_from_the_submit(
        wait: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The day a round said waiting is waited for ran from the first answer that said so: a
    lying aggregator saying so first just before the round's patience ran out held the site
    a day and two patiences (a reviewer). It runs from the submit."""
    import clients.site

    patience = clients.site._round_patience(_site("masking", _model_info(
        1, "hospitals/job-1/round-1")[0], {})[0].config)
    rnd, clock = _waiting_round(wait, monkeypatch, waiting_until=math.inf,
                                waiting_from=patience - 15)
    with pytest.raises(RoundAborted, match="did not end the round"):
        _wait(rnd, wait)
    day = clients.site.WAITING_PATIENCE_SECONDS
    assert day + patience - 30 <= clock[0] <= day + patience + 30


def test_a_ckks_key_wait_of_a_waiting_round_asks_every_ten_seconds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CKKS key wait asks for the round (its info, the model's spec in it) at most a
    second apart, while the key holder is due; a round waiting for its sites, its holder
    perhaps not yet online, was asked once a second for up to a day (a reviewer: 89,700
    asks). While the round waits, it is asked every 10 s, as a long poll is."""
    half_a_day = 12 * 3600.0
    rnd, _clock = _waiting_round("ckks_key", monkeypatch, waiting_until=math.inf, poll_s=0.0,
                                 stop_at=half_a_day)
    with pytest.raises(_Stopped) as stopped:
        _wait(rnd, "ckks_key")
    assert stopped.value.args[0] <= half_a_day / 10 * 1.05 + 20


@pytest.mark.parametrize("wait", ["receive", "wait_for_end", "ckks_key"])
def test_a_round_said_to_wait_for_ever_is_given_up_after_a_day(
        wait: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A lying aggregator saying the round waits for its sites, for ever, holds a site no
    longer than a day (WAITING_PATIENCE_SECONDS) and the round's patience; the site says so
    at most once a minute, however often the count it is told changes."""
    import clients.site

    rnd, clock = _waiting_round(wait, monkeypatch, waiting_until=float("inf"), flapping=True)
    patience = clients.site._round_patience(rnd._site.config)
    with caplog.at_level("INFO", logger="clients"), \
            pytest.raises(RoundAborted, match="did not end the round"):
        _wait(rnd, wait)
    day = clients.site.WAITING_PATIENCE_SECONDS
    assert day <= 24 * 3600.0
    assert day + patience - 30 <= clock[0] <= day + patience + 30
    said = [r for r in caplog.records if "waits for its sites" in r.getMessage()]
    assert 1 <= len(said) <= day / clients.site.WAITING_SAID_SECONDS + 1


def test_a_ckks_round_waiting_for_its_key_holder_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A CKKS round waits for its key holder too (no round ends without it): a site told
    "asking: 4, needed: at least 3" and nothing more would not know what the round waits
    for."""
    rnd, _clock = _waiting_round("ckks_key", monkeypatch, waiting_until=math.inf)
    with caplog.at_level("INFO", logger="clients"):
        rnd._note_waiting(service_pb2.RoundWaiting(sites_asking=4, sites_needed=3,
                                                   waits_for_key_holder=True))
    (said,) = [r.getMessage() for r in caplog.records if "waits for its sites" in r.getMessage()]
    assert "(asking: 4, needed: at least 3, its key holder among them)" in said


@pytest.mark.parametrize("wait", ["receive", "wait_for_end", "ckks_key"])
def test_a_round_said_to_flip_between_waiting_and_under_way_is_said_once_a_minute(
        wait: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A round under way never waits for its sites again. A lying aggregator answering
    "waiting" and "under way" in turn got two lines a minute from a site, for a day (an
    outside attacker): "waits" once a minute, and a false "is under way" after each. A round
    is said under way once; its site's lines on the wait stay at one a minute."""
    import clients.site

    rnd, clock = _waiting_round(wait, monkeypatch, waiting_until=float("inf"),
                                flipping=True)
    with caplog.at_level("INFO", logger="clients"), \
            pytest.raises(RoundAborted, match="did not end the round"):
        _wait(rnd, wait)
    waits = [r for r in caplog.records if "waits for its sites" in r.getMessage()]
    under_way = [r for r in caplog.records if "is under way" in r.getMessage()]
    assert len(waits) >= 2 and len(under_way) == 1
    assert len(waits) <= clock[0] / clients.site.WAITING_SAID_SECONDS + 1


def test_a_never_ending_round_is_given_up_after_the_documented_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """README: a round that outlasts twice what the federation's [deadlines] allow plus five
    minutes is given up. The test above takes the patience from the function it checks, so
    a patience of twenty times the deadlines (or of hours of grace) passed it. At the default
    deadlines (open 600 s, five stages of 60 s, release 600 s: 1,500 s) that is 3,300 s."""
    clock = _fake_clock(monkeypatch)
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    calls = [0]

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        calls[0] += 1
        assert calls[0] < 10_000, "the site still waits for a round that never ends"
        clock[0] += 10.0
        return service_pb2.ReceiveResponse(ready=False)

    rnd = Round(site, mine, None)  # type: ignore[arg-type]
    rnd._conn = types.SimpleNamespace(call=call)  # type: ignore[assignment]
    with pytest.raises(RoundAborted, match="did not end the round"):
        rnd._receive(1)
    assert 3_300 <= clock[0] <= 3_330


def test_a_key_holder_takes_only_the_result_its_release_makes() -> None:
    """A CKKS key holder released the round's average; the aggregator publishes a result of
    its own making (one weight moved by 1e-3). The key holder computes the result as the
    aggregator must (the round's model plus the server learning rate times the average, in
    the model's dtypes) and refuses any other, before it holds it; the honest one is taken
    (the real rounds of tests/e2e take it too)."""
    from secagg.model import FlatModel

    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, conn = _site("ckks", info, payloads)
    model = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    released = np.linspace(-0.5, 0.5, 8) / 3
    honest = model.with_values(model.values + site.config.server_learning_rate * released)
    made_up = honest.with_values(honest.values + np.eye(8)[3] * 1e-3)
    for n, result in enumerate((made_up, honest)):
        blob = wire.Blob((bytes([0x40 + n]) * 32,), len(result.to_bytes()))
        conn.payloads[blob.chunk_ids[0]] = result.to_bytes()
        done = service_pb2.RoundInfo(round=1, round_id=info.round_id,
                                     status=service_pb2.ROUND_STATUS_COMPLETED,
                                     result=wire.model_to_proto(result, blob))
        if result is made_up:
            with pytest.raises(ModelMismatch, match="average this site released"):
                site._accept_result(done, model, released)
            assert site._model_digest != made_up.digest  # not held
        else:
            assert site._accept_result(done, model, released).digest == honest.digest


def test_status_details_of_an_unavailable_aggregator_reach_errors_escaped() -> None:
    """The aggregator answers UNAVAILABLE with details holding a line break, a forged log
    line and a terminal escape until the site's retries run out: AggregatorUnavailable
    carried them as they were (the other errors escaped such text already)."""
    import grpc

    from clients.errors import AggregatorUnavailable

    forged = "down\n2026-12-03 10:00:00 INFO clients: round 1 completed\x1b[2K" + "A" * 5000

    class Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return forged

    def get_round(request: Any, timeout: float) -> Any:
        raise Unavailable()

    conn = _connection(types.SimpleNamespace(GetRound=get_round))  # type: ignore[arg-type]
    conn.retry_seconds = 0.3
    with pytest.raises(AggregatorUnavailable) as caught:
        conn.call("GetRound", service_pb2.GetRoundRequest())
    text = str(caught.value)
    assert "\n" not in text and "\x1b" not in text and len(text) < 2000
    assert "\\n2026-12-03" in text


def _signed_ckks_site() -> tuple[Site, _Scripted, Any, dict[int, Any]]:
    """A site of a CKKS federation (key holder: HOLDER) joined to round 1, with the
    federation's identities, so a test can sign as any roster site."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, conn = _site("ckks", info, payloads)
    roster, identities = make_roster(5)
    site.kit.roster, site.kit.identity = roster, identities[HONEST]
    return site, conn, info, identities


def _completed(conn: _Scripted, number: int, result: Any, signature: bytes,
               tag: int) -> Any:
    blob = wire.Blob((bytes([tag]) * 32,), len(result.to_bytes()))
    conn.payloads[blob.chunk_ids[0]] = result.to_bytes()
    return service_pb2.RoundInfo(round=number, round_id=f"hospitals/job-1/round-{number}",
                                 protocol=service_pb2.PROTOCOL_CKKS,
                                 status=service_pb2.ROUND_STATUS_COMPLETED,
                                 result=wire.model_to_proto(result, blob),
                                 result_signature=signature)


@pytest.mark.parametrize("lie", ["unsigned", "another-result", "another-signer",
                                 "another-round", "another-start"])
def test_a_ckks_site_takes_only_the_result_its_key_holder_signed(lie: str) -> None:
    """Only the key holder and the aggregator see a CKKS round's average; the other sites
    took whatever model the aggregator published, so long as its bytes matched its digest
    (a lying aggregator could publish a model of its choosing: a trap for the next round's
    updates). The key holder signs the model its release makes; a site takes a result only
    with that signature, from the holder its own config names (the roster's key): not one
    unsigned, signed for another result, by another roster site, for another round, or from
    another starting model. The genuine one is taken."""
    from secagg.model import FlatModel

    site, conn, info, identities = _signed_ckks_site()
    model = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    honest = model.with_values(np.linspace(-0.1, 0.1, 8))
    made_up = honest.with_values(honest.values + np.eye(8)[3])
    signer, round_id, start, result = HOLDER, info.round_id, model.digest, honest
    if lie == "another-result":
        result = made_up  # the holder signed the honest result; the made-up one is published
    elif lie == "another-signer":
        signer, result = COLLUDER, made_up
    elif lie == "another-round":
        round_id, result = "hospitals/job-1/round-2", made_up
    elif lie == "another-start":
        start, result = b"\x09" * 32, made_up
    signature = identities[signer].sign(wire.result_signed_bytes(
        round_id, start, (honest if lie == "another-result" else result).digest))
    done = _completed(conn, 1, result, b"" if lie == "unsigned" else signature, 0x50)
    with pytest.raises(ModelMismatch, match="key holder \\(site 1\\) signed"):
        site._accept_result(done, model)
    assert site._model_digest != result.digest  # not held

    genuine = identities[HOLDER].sign(wire.result_signed_bytes(
        info.round_id, model.digest, honest.digest))
    done = _completed(conn, 1, honest, genuine, 0x51)
    assert site._accept_result(done, model).digest == honest.digest


@pytest.mark.parametrize("signed", [False, True])
def test_a_ckks_site_that_missed_a_round_takes_its_result_only_signed(signed: bool) -> None:
    """The site holds round 1's result and missed round 2; round 3 starts from round 2's
    published result. That result, which the site never saw made, is taken only with round
    2's key holder's signature; unsigned, the site refuses round 3 before fetching
    anything."""
    from secagg.model import FlatModel

    site, _conn, _info, identities = _signed_ckks_site()
    info, payloads = _model_info(3, "hospitals/job-1/round-3", service_pb2.PROTOCOL_CKKS)
    announced = bytes(info.model.digest)
    held = b"\x11" * 32
    start = FlatModel.from_arrays({"w": np.ones(8, np.float32)})
    round2 = _completed(_Scripted(info, {}), 2, start, b"", 0x52)
    round2.model.digest, round2.result.digest = held, announced
    if signed:
        round2.result_signature = identities[HOLDER].sign(
            wire.result_signed_bytes(round2.round_id, held, announced))
    conn = _Chain(info, payloads, {2: round2})
    site._conn = conn  # type: ignore[assignment]
    site._model_digest, site._held_round = held, 1
    if signed:
        assert next(site.rounds()).model.digest == announced
        return
    with pytest.raises(ModelMismatch, match="round 2's result is not the one"):
        next(site.rounds())
    assert conn.fetched == [] and conn.sent == []


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_a_masking_bound_is_not_bought_with_rounding_slack(dtype: str) -> None:
    """The rounding a result may carry is half the gap toward the model's value, never a
    whole spacing at the result's: at a dtype's largest value that spacing is infinite, and
    a lying aggregator set float16 weights to +-65504 (L2 2e7 against a limit of 1) for
    nothing; a whole spacing let it push 1M float16 ones by a step each, every round. Both
    are refused; and integer counters move no further than the average's per-value bound
    (plus rounding), where they were not bounded at all."""
    from clients.site import AverageBound
    from secagg.model import FlatModel

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    size = 4096
    rng = np.random.default_rng(3)  # test data only
    model = FlatModel.from_arrays({"w": rng.normal(0, 0.02, size).astype(dtype),
                                   "ones": np.ones(size, dtype),
                                   "steps": np.array(7, np.int64)})
    bound = AverageBound(0.01, 0.01)
    values = model.values.copy()
    top = float(np.finfo(dtype).max)
    at_max = values.copy()
    at_max[:64] = np.where(np.arange(64) % 2 == 0, top, -top)
    ones = slice(size, 2 * size)
    stepped = values.copy()
    stepped[ones] = np.nextafter(np.ones(size, dtype), np.full(size, 2, dtype)).astype(float)
    counted = values.copy()
    counted[-1] += 100
    for n, moved in enumerate((at_max, stepped, counted)):
        result = model.with_values(moved)
        done = _completed(conn, 1, result, b"", 0x70 + n)
        if dtype != "float16" and moved is stepped:  # (a float32/64 step is ~nothing)
            site._accept_result(done, model, None, bound)
            continue
        with pytest.raises(ModelMismatch, match="further than"):
            site._accept_result(done, model, None, bound)
    one_step = values.copy()
    one_step[-1] += 1  # an honest round's counter step (clipped to 1, lr 1... and rounded)
    done = _completed(conn, 1, model.with_values(one_step), b"", 0x7F)
    assert site._accept_result(done, model, None, AverageBound(1.0, 1.0)) is not None


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (1e-4, 0.3, 1.0, 2e-3)])
def test_a_masking_site_takes_no_result_further_than_clipped_updates_move_the_model(
        weights: tuple[float, ...]) -> None:
    """No site sees a masking round's sum, so none can check the result to the bit: a lying
    aggregator published any model it liked (a trap for the next round's updates). A site
    whose input is in the sum knows the average of clipped updates is at most clip_norm
    long, give or take the quantiser (its error at a weight sum of 1, and a margin of 1% of
    clip_norm for smaller sums: secagg.masking.precision, the same for every site, whatever
    its weight): it takes no result further than the server learning rate times that from
    the round's model. The least slack there is passes, with small and large weights: every
    update exactly clip_norm long, all in one direction, quantised, masked and unmasked for
    real, and the result rounded to float32 from a model of values ~1. The same result 2%
    further out, or with one value moved by 0.2, is refused before it is held."""
    from clients.site import _masked_average_bound
    from secagg.masking import RoundConfig, simulate_round
    from secagg.model import FlatModel

    size = 4096
    roster, identities = make_roster(len(weights))
    config = RoundConfig("norm-check", roster, size)
    rng = np.random.default_rng(7)  # test data only
    direction = rng.normal(size=size)
    direction *= config.quantizer.clip / np.linalg.norm(direction)
    inputs = {s: (direction.copy(), w) for s, w in zip(sorted(identities), weights, strict=True)}
    sums = simulate_round(config, identities, inputs).result
    assert sums is not None
    average = sums.weighted_sum / sums.weight_sum
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    lr = site.config.server_learning_rate
    model = FlatModel.from_arrays({"w": rng.normal(size=size).astype(np.float32)})
    honest = model.with_values(model.values + lr * average)
    further = model.with_values(model.values + 1.02 * lr * average)
    nudged = honest.with_values(honest.values + 0.2 * np.eye(size)[9])
    model16 = FlatModel.from_arrays({"w": rng.normal(size=size).astype(np.float16)})
    honest16 = model16.with_values(model16.values + lr * average)
    bound = _masked_average_bound(config.quantizer, size)
    for n in range(len(weights)):
        for m, result in enumerate((further, nudged, honest, honest16)):
            done = _completed(conn, 1, result, b"", 0x60 + 4 * n + m)
            done.protocol = service_pb2.PROTOCOL_MASKING
            if result is honest16:
                assert site._accept_result(done, model16, None, bound).digest == result.digest
                continue
            if result is honest:
                assert site._accept_result(done, model, None, bound).digest == honest.digest
                continue
            with pytest.raises(ModelMismatch, match="further than the average of clipped"):
                site._accept_result(done, model, None, bound)
            assert site._model_digest != result.digest  # not held


def test_a_masking_round_the_site_was_in_stays_bounded_when_told_it_aborted(
        tmp_path: Any) -> None:
    """The site's input is in round 1's sum (it finished unmasking; its history says so,
    with the bound); the aggregator tells it round 1 aborted, then opens round 2 from a
    model of its own making and, asked about round 1 as the site follows the chain, says
    it completed with that model. The bound holds in the chain too (and for a site that
    restarted while it waited): refused before round 2 is joined; a result within the bound
    is followed."""
    from clients.history import History
    from clients.site import AverageBound
    from secagg.model import FlatModel

    start = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    for far, follows in ((5.0, False), (0.05, True)):
        made = start.with_values(start.values + far / np.sqrt(8))
        directory = tmp_path / ("far" if not follows else "near")
        directory.mkdir()
        history = History(directory)
        history.spend("job-1", 1, start.digest)
        history.record_in_sum("job-1", 1, AverageBound(1.0, 1.0))
        _round_1_claimed_to_lead(start, made, follows, directory)


def _round_1_claimed_to_lead(start: Any, made: Any, follows: bool, directory: Any = None,
                             pinned: bool = False, refusal: str = "further than") -> None:
    """A masking site holding ``start`` is offered round 2 from ``made``, the aggregator
    claiming a completed round 1 led there: followed, or refused before anything is sent."""
    info, _ = _model_info(2, "hospitals/job-1/round-2")
    blob = wire.Blob((b"\x31" * 32,), len(made.to_bytes()))
    info.model.CopyFrom(wire.model_to_proto(made, blob))
    start_blob = wire.Blob((b"\x32" * 32,), len(start.to_bytes()))
    payloads = {blob.chunk_ids[0]: made.to_bytes(), start_blob.chunk_ids[0]: start.to_bytes()}
    round1 = service_pb2.RoundInfo(round=1, round_id="hospitals/job-1/round-1",
                                   protocol=service_pb2.PROTOCOL_MASKING,
                                   status=service_pb2.ROUND_STATUS_COMPLETED,
                                   model=wire.model_to_proto(start, start_blob),
                                   result=wire.model_to_proto(made, blob))
    site, _ = _site("masking", info, payloads, directory=directory)
    if pinned:
        site._model_digest, site._held_round = start.digest, 0  # (as a pinned config sets)
    conn = _Chain(info, payloads, {1: round1})
    site._conn = conn  # type: ignore[assignment]
    if follows:
        assert next(site.rounds()).model.digest == made.digest
        return
    with pytest.raises(ModelMismatch, match=refusal):
        next(site.rounds())
    assert conn.sent == []


def test_a_late_site_takes_no_first_model_the_aggregator_made_up() -> None:
    """A site that has taken part in nothing holds the first model its config pins. The
    aggregator opens round 2 from a model of its making and, as the site follows the chain,
    says round 1 led there from the pinned model: under masking the site was in no sum and
    checked nothing, so it trained from any model the aggregator liked (the pin was moot).
    Every completed missed masking round is now held to the public bound on an honest
    round's step: a made-up model is refused before anything is sent; one an honest round
    could make is followed."""
    from secagg.model import FlatModel

    pinned = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    for far, follows in ((1234.5, False), (0.05, True)):
        made = pinned.with_values(pinned.values + far / np.sqrt(8))
        _round_1_claimed_to_lead(pinned, made, follows, pinned=True)


def test_a_missed_masking_round_the_site_was_in_keeps_its_names_shapes_and_dtypes(
        tmp_path: Any) -> None:
    """As above, but round 1's "result" is the held model's values under another name (no
    step at all, so within any bound): a relabelled model is refused in the chain as it is
    when the site sees the result itself."""
    from clients.history import History
    from clients.site import AverageBound
    from secagg.model import FlatModel

    start = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    made = FlatModel.from_arrays({"v": np.zeros(8, np.float32)})
    history = History(tmp_path)
    history.spend("job-1", 1, start.digest)
    history.record_in_sum("job-1", 1, AverageBound(1.0, 1.0))
    _round_1_claimed_to_lead(start, made, False, tmp_path, refusal="names, shapes")


def test_a_missed_ckks_rounds_signature_counts_only_under_this_jobs_round_id() -> None:
    """The key holder signed round 1 of another job of the federation that started from the
    same model; the aggregator replays that round, signature and all, as this job's round 1
    in the chain a site follows. The round id the signature binds must be this config's
    for that number: refused; this job's own signed round is followed."""
    from secagg.model import FlatModel

    info, payloads = _model_info(2, "hospitals/job-1/round-2", service_pb2.PROTOCOL_CKKS)
    announced = bytes(info.model.digest)
    held = b"\x11" * 32
    for round_id, follows in (("hospitals/job-0/round-1", False),
                              ("hospitals/job-1/round-1", True)):
        site, _conn, _info, identities = _signed_ckks_site()
        site._model_digest, site._held_round = held, 0
        past = _completed(_Scripted(info, {}), 1, FlatModel.from_arrays(
            {"w": np.ones(8, np.float32)}), b"", 0x53)
        past.round_id = round_id
        past.model.digest, past.result.digest = held, announced
        past.result_signature = identities[HOLDER].sign(
            wire.result_signed_bytes(round_id, held, announced))
        conn = _Chain(info, payloads, {1: past})
        site._conn = conn  # type: ignore[assignment]
        if follows:
            assert next(site.rounds()).model.digest == announced
            return
        with pytest.raises(ModelMismatch, match="does not follow"):
            next(site.rounds())


@pytest.mark.parametrize("case", ["honest", "too-long", "too-little-weight"])
def test_a_key_holder_signs_no_result_the_aggregators_norm_check_refuses(case: str) -> None:
    """The aggregator's L2 check of a CKKS release (longer than clip_norm allows, or a
    weight sum so small the average is mostly noise) is made by the key holder too, before
    it signs the result: a lying aggregator skipping its own check gets no signature, and
    the other sites take no unsigned result."""
    from secagg.ckks.presets import get_preset
    from secagg.ckks.round import ReleasedAverage
    from secagg.model import FlatModel

    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, _ = _site("ckks", info, payloads)
    model = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    clip = site.config.clip_norm
    average = np.full(8, clip / np.sqrt(8))  # exactly clip_norm long: the longest honest one
    weight = {"honest": 3.0, "too-long": 3.0, "too-little-weight": 1e-6}[case]
    if case == "too-long":
        average *= 1.01
    released = ReleasedAverage(average, weight, info.round_id, (1, 2, 3), 2.0**-20)
    result = site._signable_result(model, released, get_preset("add-only-4096"), info.round_id)
    if case == "honest":
        assert result is not None
        assert result.digest == site._result_of(model, average).digest
    else:
        assert result is None


def test_a_result_of_another_spec_is_refused_before_a_byte_is_fetched() -> None:
    """The round's model is 8 float32 values; the aggregator publishes a "result" of 10M
    float64 values whose blob names one real chunk again and again: the site joined and
    hashed ~40x what it received before refusing the spec. The spec is compared first now,
    for the round's result, for the next round's model and for a missed round's result."""
    from clients.errors import ModelMismatch
    from secagg.model import FlatModel

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    wide = FlatModel.from_arrays({"w": np.zeros(10_000_000, np.float64)})
    bomb = wire.Blob((b"\x05" * 32,) * 20, 80_000_000)
    conn.payloads[bomb.chunk_ids[0]] = b"x" * (4 << 20)
    done = service_pb2.RoundInfo(round=1, round_id=rnd.round_id,
                                 status=service_pb2.ROUND_STATUS_COMPLETED,
                                 result=wire.model_to_proto(wide, bomb))
    fetched = list(conn.fetched)
    with pytest.raises(ModelMismatch, match="names, shapes"):
        site._accept_result(done, rnd.model)
    assert conn.fetched == fetched  # nothing of the "result" was asked for
    # the next round's model, likewise: the site holds a model of 8 float32 values
    with pytest.raises(ModelMismatch, match="names, shapes"):
        site._download_model(wire.model_to_proto(wide, bomb), "model", site._spec)
    assert conn.fetched == fetched


def test_a_running_round_beyond_the_jobs_rounds_does_not_end_the_sites_part(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator announces running round 2**64-1: refused as the site joined it, it
    first became the round the site waits after, and the site never joined round 1 (nor any
    other). It is refused once and is not news after that: the site goes on to the job's
    own round."""
    _fake_clock(monkeypatch)
    mine, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", mine, payloads)
    beyond = service_pb2.RoundInfo()
    beyond.CopyFrom(mine)
    beyond.round, beyond.round_id = 2**64 - 1, f"hospitals/job-1/round-{2**64 - 1}"
    asked: list[int] = []

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        asked.append(request.after_round)
        assert len(asked) < 20, "the site waits for rounds after the one it refused"
        return beyond if len(asked) < 5 else mine

    conn.call = call  # type: ignore[method-assign]
    with pytest.raises(RoundAborted, match="is not round"):
        next(site.rounds())
    rnd = next(site.rounds())  # the script caught it and went on
    assert rnd.number == 1
    assert asked == [0] * 5



def test_a_refused_weight_is_shown_by_its_type_not_its_contents() -> None:
    """A label tensor passed as the weight (``weight=y`` for ``len(y)``) was echoed whole in
    the refusal: every patient's label, in the exception and every log and crash report it
    reaches; a string weight (a name) verbatim. A refused number is still shown as itself."""
    import torch

    from secagg.errors import ConfigurationError

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    labels = torch.tensor([7654321] * 600)
    cases = ((labels, "got a Tensor of shape (600,)"),
             (labels.numpy(), "got a ndarray of shape (600,)"),
             ([7654321] * 600, "got a list"),
             ("Jane Doe 7654321", "got a str"),
             (-7654321, "got -7.65432e+06"))
    for bad, shown in cases:
        with pytest.raises(ConfigurationError) as caught:
            rnd.submit({"w": np.ones(8, np.float32)}, weight=bad)
        message = str(caught.value)
        assert message.endswith(shown), message
        assert "7654321" not in message and "Jane" not in message
    assert conn.sent == []


def test_a_second_thread_submitting_to_the_round_is_told_so() -> None:
    """Two threads calling submit on one Round at once: one update went out (safe), and the
    other thread was told of restarts and job ids (the history's record of a spent round).
    It is now told another thread is submitting, and sends nothing."""
    import threading

    from clients.errors import AggregatorRefused, SiteError

    inside, go_on = threading.Event(), threading.Event()

    class _Held(_Scripted):
        def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
            if method != "GetRound":
                inside.set()
                go_on.wait(30)
            return super().call(method, request, timeout)

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, _ = _site("masking", info, payloads)
    site._conn = conn = _Held(info, payloads)
    rnd = next(site.rounds())
    raised: list[BaseException] = []

    def first() -> None:
        try:
            rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    try:
        assert inside.wait(30)
        with pytest.raises(SiteError, match="another thread is submitting to this round"):
            rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    finally:
        go_on.set()
        thread.join(30)
    assert len(raised) == 1 and isinstance(raised[0], AggregatorRefused)
    assert conn.sent == ["Submit"]
    with pytest.raises(SiteError, match="already submitted to this round"):
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)


def test_a_ckks_weight_too_small_for_any_release_is_warned_before_the_round_is_spent(
        caplog: pytest.LogCaptureFixture) -> None:
    """weight=1 at every site (the README's advice for a sensitive sample count) under the
    default max_samples of 10,000: the key holder refused round 1's release as noise, and,
    every site having spent the model, the job ended. A CKKS site whose weight would be
    refused were every site's as small is warned, naming the fix, before it sends; a weight
    that could be released is not, and masking sites never are (no noise floor)."""
    import logging

    from clients.errors import RoundAborted

    def submit_with(weight: float, protocol: str) -> list[str]:
        kind = (service_pb2.PROTOCOL_CKKS if protocol == "ckks"
                else service_pb2.PROTOCOL_MASKING)
        info, payloads = _model_info(1, "hospitals/job-1/round-1", protocol=kind)
        site, conn = _site(protocol, info, payloads)
        conn.max_polls = 2  # (then the job is done: the key wait ends)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clients"), pytest.raises(
                (RoundAborted, SiteError)):
            next(site.rounds()).submit({"w": np.ones(8, np.float32)}, weight=weight)
        return [r.getMessage() for r in caplog.records if "max_samples" in r.getMessage()]

    from clients.errors import SiteError

    warned = submit_with(1, "ckks")
    assert len(warned) == 1 and "weight 1 is small for [update] max_samples 10000" in warned[0]
    assert "max_samples = 1" in warned[0]
    assert submit_with(5000, "ckks") == []
    assert submit_with(1, "masking") == []
    # released by a round of all 5 roster sites at this weight, refused by one a dropout
    # took down to the 3 a release needs at least: warned
    light = submit_with(17, "ckks")
    assert len(light) == 1 and "a round of 3 sites" in light[0], light


def test_a_ckks_weight_whose_release_noise_is_large_is_said(
        caplog: pytest.LogCaptureFixture) -> None:
    """Cohorts of 34-54 samples under the default max_samples were released, but 11-27% off
    FedAvg with no word (only a weight the key holder would refuse was warned). A weight
    whose round of the fewest sites carries release noise above 1% of the clip is said, with
    the share; one well above that is not."""
    import logging

    from clients.errors import RoundAborted, SiteError
    from secagg.ckks.presets import MAX_NOISE_SHARE, PRESETS, least_weight_sum
    from secagg.ckks.release import least_l2_weight_sum

    def said(weight: float) -> list[str]:
        info, payloads = _model_info(1, "hospitals/job-1/round-1",
                                     protocol=service_pb2.PROTOCOL_CKKS)
        site, conn = _site("ckks", info, payloads)
        conn.max_polls = 2
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clients"), pytest.raises(
                (RoundAborted, SiteError)):
            next(site.rounds()).submit({"w": np.ones(8, np.float32)}, weight=weight)
        return [r.getMessage() for r in caplog.records if "release noise" in r.getMessage()]

    config = _site("ckks", *_model_info(1, "hospitals/job-1/round-1"))[0].config
    params = PRESETS[config.preset]
    least = max(least_weight_sum(params, 3, 1.0), least_l2_weight_sum(params, 3, 1.0, 8))
    # a weight sum (3 sites) at which the tail of the noise is 3% of the clip
    weight = MAX_NOISE_SHARE * least / 0.03 / 3 * config.max_samples
    noisy = said(weight)
    assert len(noisy) == 1 and "about 3% of [update] clip_norm" in noisy[0], noisy
    assert said(weight * 10) == []
    # said once each: the noise said first does not silence a later refusal's warning
    from clients.site import _warn_weight_below_release

    told: set[str] = set()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clients"):
        for w in (weight, weight, 1, 1):
            _warn_weight_below_release(config, w, 5, 8, told)
    kinds = [("noise" if "release noise of up to" in r.getMessage() else "refused")
             for r in caplog.records]
    assert kinds == ["noise", "refused"], kinds

def test_a_round_whose_submit_refused_an_argument_is_offered_again_while_it_runs() -> None:
    """``site.aggregate(bad, w)`` raised (nothing sent), and the retry ``site.aggregate(good,
    w)`` waited for the next round while this one waited for this site, until its deadline:
    rounds() had passed it. The round is handed out again while the aggregator still runs it,
    and not once it runs another."""
    from clients.errors import AggregatorRefused, SiteError
    from secagg.errors import ConfigurationError

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    conn.then_done = True  # (a round after round 1: the job is over)
    with pytest.raises(ConfigurationError, match="weight must be"):
        site.aggregate({"w": np.ones(8, np.float32)}, weight=0)
    assert conn.sent == []
    with pytest.raises(AggregatorRefused):  # round 1 again: sent (the stub stops it there)
        site.aggregate({"w": np.ones(8, np.float32)}, weight=10)
    assert conn.sent == ["Submit"]
    with pytest.raises(SiteError, match="the job is over"):  # submitted: not offered again
        site.aggregate({"w": np.ones(8, np.float32)}, weight=10)

    site, conn = _site("masking", info, payloads)
    conn.then_done = True
    with pytest.raises(ConfigurationError):
        site.aggregate({"w": np.ones(8, np.float32)}, weight=0)
    conn.info = service_pb2.RoundInfo(round=1, round_id="hospitals/job-1/round-1",
                                      status=service_pb2.ROUND_STATUS_COMPLETED)
    with pytest.raises(SiteError, match="the job is over"):  # round 1 ended meanwhile
        site.aggregate({"w": np.ones(8, np.float32)}, weight=10)
    assert conn.sent == []


def test_an_update_the_learning_rate_would_carry_past_its_dtype_is_refused_before_sending(
        ) -> None:
    """[job] server_learning_rate 2: a uint8 buffer moving 250 -> 255 at every site makes a
    result of 260, which no uint8 holds; the round was refused after every site had sent,
    ending the job. The site refuses its update before anything is sent, naming the tensor;
    252 (a result of 254) goes ahead."""
    from dataclasses import replace

    from clients.errors import AggregatorRefused
    from secagg.errors import ConfigurationError

    info, payloads = _model_info(1, "hospitals/job-1/round-1",
                                 w=np.full(8, 250, np.uint8))
    site, conn = _site("masking", info, payloads)
    site.config = replace(site.config, server_learning_rate=2.0, clip_norm=10.0)
    rnd = next(site.rounds())
    with pytest.raises(ConfigurationError, match=r"server_learning_rate 2.*tensor 'w' past "
                                                 r"what its dtype \(uint8\) holds"):
        rnd.submit({"w": np.full(8, 255, np.uint8)}, weight=10)
    assert conn.sent == []
    with pytest.raises(AggregatorRefused):  # sent (the stub stops it there)
        rnd.submit({"w": np.full(8, 252, np.uint8)}, weight=10)
    assert conn.sent == ["Submit"]
    # at clip_norm 1 a counter's change is capped at 1 in the average: 250 + 2 * 1 is held
    site, conn = _site("masking", info, payloads)
    site.config = replace(site.config, server_learning_rate=2.0, clip_norm=1.0)
    with pytest.raises(AggregatorRefused):
        next(site.rounds()).submit({"w": np.full(8, 255, np.uint8)}, weight=10)
    assert conn.sent == ["Submit"]
    # a bool result saturates (above 0 is True): every site whose bool changed was refused
    info, payloads = _model_info(1, "hospitals/job-1/round-1",
                                 w=np.array([True, False] * 4))
    site, conn = _site("masking", info, payloads)
    site.config = replace(site.config, server_learning_rate=2.0, clip_norm=10.0)
    with pytest.raises(AggregatorRefused):  # sent (the stub stops it there)
        next(site.rounds()).submit({"w": np.array([False, True] * 4)}, weight=10)
    assert conn.sent == ["Submit"]


def _ckks_round_then_aborted(reason: str) -> tuple[Any, Any]:
    """A CKKS site's round 1, joined, which the aggregator then says aborted for
    ``reason``: the round and the connection."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, conn = _site("ckks", info, payloads)
    rnd = next(site.rounds())
    conn.info = service_pb2.RoundInfo()
    conn.info.CopyFrom(info)
    conn.info.status = service_pb2.ROUND_STATUS_ABORTED
    conn.info.abort_reason = reason
    return rnd, conn

def test_a_ckks_round_aborted_before_its_key_is_told_with_the_aggregators_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A site waiting for the round's key stops when the round stops running, with the
    aggregator's reason: not at the end of twice the round's deadlines, as "did not end the
    round"."""
    import clients.site

    monkeypatch.setattr(clients.site, "_round_patience", lambda config: 3.0)  # (if missed)
    rnd, conn = _ckks_round_then_aborted("fewer than min_sites joined")
    with pytest.raises(RoundAborted, match="fewer than min_sites joined"):
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    assert "upload" not in conn.sent



def test_a_result_wait_the_aggregator_leaves_unanswered_past_its_deadline_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A long poll for the round's end that the aggregator left unanswered past its
    deadline (its database hung for 40 s) left submit as AggregatorRefused
    ("DEADLINE_EXCEEDED", gRPC's raw text), though the round went on. It is asked again
    until the round's patience is spent; other refusals still end the wait."""
    import clients.site
    from clients.errors import AggregatorRefused

    monkeypatch.setattr(clients.site, "_round_patience", lambda config: 30.0)
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    done = service_pb2.RoundInfo()
    done.CopyFrom(info)
    done.status = service_pb2.ROUND_STATUS_COMPLETED
    answers: list[Any] = [AggregatorRefused("DEADLINE_EXCEEDED", "Deadline Exceeded")] * 2
    answers.append(done)

    def call(method: str, request: Any, timeout: float | None = None) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    rnd._conn.call = call  # type: ignore[method-assign]
    slept: list[float] = []
    monkeypatch.setattr(clients.site.time, "sleep", slept.append)
    assert rnd._wait_for_end() is done and not answers
    # each answered at once: paced as "nothing new" is (it was a hot loop, 4,600 polls a
    # second over real gRPC)
    assert len(slept) == 2 and all(pause > 0 for pause in slept), slept
    answers[:] = [AggregatorRefused("PERMISSION_DENIED", "no")]
    with pytest.raises(AggregatorRefused, match="PERMISSION_DENIED"):
        rnd._wait_for_end()


@pytest.mark.parametrize("method", ["Submit", "Receive"])
def test_a_round_call_the_aggregator_leaves_unanswered_past_its_deadline_is_asked_again(
        method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Submit cut by its own deadline (the aggregator's store hung for 40 s) left submit as
    AggregatorRefused("DEADLINE_EXCEEDED"), and a stage's wait cut so aborted the round at
    once, while the long poll for the result waited on. Each is asked again (paced, every
    call is idempotent) until the round's patience is spent; other refusals still end it."""
    import time

    import clients.site
    from clients.errors import AggregatorRefused

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    rnd._deadline = time.monotonic() + 30.0
    ok: Any = (service_pb2.SubmitResponse() if method == "Submit"
               else service_pb2.ReceiveResponse(ready=True))
    answers: list[Any] = [AggregatorRefused("DEADLINE_EXCEEDED", "Deadline Exceeded")] * 2
    answers.append(ok)
    asked: list[str] = []

    def call(name: str, request: Any, timeout: float | None = None) -> Any:
        asked.append(name)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def run() -> Any:
        return rnd._submit() if method == "Submit" else rnd._receive(1)

    rnd._conn.call = call  # type: ignore[method-assign]
    slept: list[float] = []
    monkeypatch.setattr(clients.site.time, "sleep", slept.append)
    run()
    assert asked == [method] * 3 and not answers
    assert len(slept) == 2 and all(pause > 0 for pause in slept), slept
    # past the round's patience: given up, as a round the aggregator did not end
    answers[:] = [AggregatorRefused("DEADLINE_EXCEEDED", "Deadline Exceeded")]
    rnd._deadline = time.monotonic() + 0.05
    monkeypatch.setattr(clients.site.time, "sleep", lambda s: None)
    real_in_time = rnd._in_time

    def late() -> None:
        rnd._deadline = time.monotonic() - 1.0
        real_in_time()

    rnd._in_time = late  # type: ignore[method-assign]
    with pytest.raises(RoundAborted, match="did not end the round within"):
        run()
    rnd._in_time = real_in_time  # type: ignore[method-assign]
    rnd._deadline = time.monotonic() + 30.0
    answers[:] = [AggregatorRefused("PERMISSION_DENIED", "no")]
    with pytest.raises((AggregatorRefused, RoundAborted), match="PERMISSION_DENIED"):
        run()
    assert not answers


def test_a_site_sends_nothing_once_the_rounds_patience_is_spent() -> None:
    """Only the waits checked the round's patience: past it, a site whose stage answers
    came back "ready" still sent its Submits and its uploads (with retries, hours past the
    README's give-up time). Each Submit and each upload is now checked first."""
    import time

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    rnd._deadline = time.monotonic() - 1.0
    with pytest.raises(RoundAborted, match="did not end the round within"):
        rnd._submit()
    with pytest.raises(RoundAborted, match="did not end the round within"):
        rnd._upload_and_submit(b"masked input", "masked input", lambda blob: {})
    assert conn.sent == []

@pytest.mark.parametrize("reason", ["AGGREGATE_OUT_OF_RANGE", "TOO_FEW_SURVIVORS"])
def test_an_abort_reason_a_site_can_act_on_is_explained(
        reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sites of a CKKS round whose key holder refused the release as noise (weights too
    small for max_samples) were told "AGGREGATE_OUT_OF_RANGE" and nothing more. The reasons
    a site can act on now come with what they mean."""
    import clients.site

    monkeypatch.setattr(clients.site, "_round_patience", lambda config: 3.0)  # (if missed)
    rnd, _ = _ckks_round_then_aborted(reason)
    with pytest.raises(RoundAborted) as caught:
        rnd.submit({"w": np.ones(8, np.float32)}, weight=5000)
    assert {"AGGREGATE_OUT_OF_RANGE": "max_samples far above the sites' sample counts",
            "TOO_FEW_SURVIVORS": "fewer sites than the federation's threshold"}[reason] in str(
                caught.value)

@pytest.mark.parametrize("code", ["NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED"])
def test_a_refused_receive_is_the_round_aborted_whatever_its_code(code: str) -> None:
    """A Receive refused with a code an honest aggregator does not use for it left submit()
    as AggregatorRefused: a training loop catching RoundAborted, as documented, died there,
    and the site took no further part in the job."""
    from clients.errors import AggregatorRefused

    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        raise AggregatorRefused(code, "the test's aggregator refuses")

    rnd = Round(site, mine, None)  # type: ignore[arg-type]
    rnd._conn = types.SimpleNamespace(call=call)  # type: ignore[assignment]
    with pytest.raises(RoundAborted, match="the test's aggregator refuses") as e:
        rnd._receive(1)
    assert e.value.code == code


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_a_site_reports_the_survivors_it_signed_not_the_aggregators_word(
        protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    """A lying aggregator ends an honest round of five sites saying only sites 1 and 2 were
    in its sum (fewer than any sum may hold, and hiding who an update was averaged with):
    every site took its word into ``rnd.survivors``, a site's only record of it. A site
    reports the list it signed (masking) or the sites it released (a CKKS key holder), and
    logs the aggregator's claim; with nothing of its own (another CKKS site) the claim."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    rnd = Round.__new__(Round)
    rnd._site, _ = _site(protocol, info, payloads)
    rnd.round_id, rnd.protocol = "hospitals/job-1/round-1", protocol
    rnd._known_survivors = (1, 2, 3, 4, 5)
    lie = service_pb2.RoundInfo(survivors=[2, 1])
    with caplog.at_level("WARNING", logger="clients"):
        assert rnd._survivors(lie) == (1, 2, 3, 4, 5)
    assert "the aggregator says sites [1, 2]" in caplog.text
    caplog.clear()
    assert rnd._survivors(service_pb2.RoundInfo(survivors=[5, 4, 3, 2, 1])) == (1, 2, 3, 4, 5)
    assert caplog.text == ""
    if protocol == "masking":
        rnd._known_survivors = None
        assert rnd._survivors(lie) == (1, 2)


@pytest.mark.parametrize("signed", [True, False])
def test_survivors_padded_past_the_roster_are_counted_before_they_are_read(
        signed: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A lying aggregator ended a round naming 900,000 survivors (8 MB): a site read them all
    (95 MB) after taking the result. No sum holds more sites than the roster has: counted
    first, logged, and the site keeps the list it signed, or none."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    rnd = Round.__new__(Round)
    rnd._site, _ = _site("masking", info, payloads)
    rnd.round_id, rnd.protocol = "hospitals/job-1/round-1", "masking"
    rnd._known_survivors = (1, 2, 3, 4, 5) if signed else None
    sites = len(rnd._site.kit.roster)
    padded = service_pb2.RoundInfo(survivors=[1] * (sites + 1))
    with caplog.at_level("WARNING", logger="clients"):
        assert rnd._survivors(padded) == ((1, 2, 3, 4, 5) if signed else ())
    assert f"says {sites + 1} sites are in the round's sum" in caplog.text


def test_a_ckks_sites_survivors_are_the_ones_its_key_holder_signed(
        caplog: pytest.LogCaptureFixture) -> None:
    """A CKKS site that is not the key holder has no survivors of its own: it took the
    aggregator's word, and a lie of two sites where five were summed was its only record of
    who its update was averaged with. The key holder now signs the sites it released; the
    site reports them when the aggregator's list is the signed one, and none (logged)
    otherwise: a list of other sites, of another round or result, signed by another site,
    unsigned, or naming a site id past an int64 (a uint64 on the wire: it raised
    OverflowError out of submit, after the result was taken)."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, _conn = _site("ckks", info, payloads)
    rnd = Round.__new__(Round)
    rnd._site, rnd.round_id, rnd.protocol = site, info.round_id, "ckks"
    rnd._known_survivors = None
    roster, identities = make_roster(5)
    site.kit.roster = roster

    result = service_pb2.Model(digest=b"\x05" * 32)

    def ended(survivors: list[int], signer: int = HOLDER, signed: list[int] | None = None,
              round_id: str = info.round_id, result_digest: bytes = result.digest) -> Any:
        signature = identities[signer].sign(wire.sites_signed_bytes(
            round_id, result_digest, survivors if signed is None else signed))
        return service_pb2.RoundInfo(round=1, survivors=survivors, sites_signature=signature,
                                     result=result)

    assert rnd._survivors(ended([5, 4, 3, 2, 1])) == (1, 2, 3, 4, 5)
    assert caplog.text == ""
    beyond = ended([1, 2, 3, 4], signed=[1, 2, 3, 4])
    beyond.survivors.append(2**64 - 1)
    for lie in (ended([2, 1], signed=[1, 2, 3, 4, 5]), ended([1, 2, 3, 4, 5], signer=HONEST),
                ended([1, 2, 3, 4, 5], round_id="hospitals/job-1/round-2"),
                ended([1, 2, 3, 4, 5], result_digest=b"\x06" * 32), beyond,
                service_pb2.RoundInfo(round=1, survivors=[1, 2, 3, 4, 5], result=result)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="clients"):
            assert rnd._survivors(lie) == ()
        assert f"the key holder (site {HOLDER}) did not sign them" in caplog.text


def test_a_masking_sites_survivors_after_submit_are_the_list_it_signed(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A whole masking submit (the protocol's messages stubbed): the site signs the survivor
    list 1..5 when the aggregator sends it (not before), and the round ends with the
    aggregator saying only sites 1 and 2 were summed. ``rnd.survivors`` is the list the
    site signed, as submit leaves it (the list must be taken once signed, after the stages,
    and submit must report it rather than the aggregator's claim)."""
    import clients.site as site_module
    from secagg.masking import Stage

    signed = (1, 2, 3, 4, 5)

    class _Client:
        def __init__(self, *_args: Any, **_kwargs: Any) -> None:
            self.stage, self.unusable_share_senders = Stage.ADVERTISE_KEYS, ()
            self._signed: tuple[int, ...] = ()

        def start(self) -> Any:
            return None

        def handle(self, _message: Any) -> Any:
            if self.stage is Stage.MASKED_INPUT:  # the survivor list: signed here
                self._signed = signed
            self.stage = Stage(self.stage.value + 1)
            return None

        @property
        def signed_survivors(self) -> tuple[int, ...]:
            return self._signed

    for name in ("advertise_to_proto", "directory_from_proto", "delivery_from_proto",
                 "survivors_from_proto", "unmask_request_from_proto"):
        monkeypatch.setattr(wire, name, lambda p: p)
    monkeypatch.setattr(site_module, "MaskingClient", _Client)
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    lie = service_pb2.RoundInfo()
    lie.CopyFrom(info)
    lie.status = service_pb2.ROUND_STATUS_COMPLETED
    del lie.survivors[:]
    lie.survivors.extend([2, 1])
    monkeypatch.setattr(rnd, "_submit", lambda **_: None)
    monkeypatch.setattr(rnd, "_send_masking", lambda *_: None)
    monkeypatch.setattr(rnd, "_receive", lambda _stage: service_pb2.ReceiveResponse())
    monkeypatch.setattr(rnd, "_wait_for_end", lambda: lie)
    monkeypatch.setattr(site, "_accept_result", lambda *_: rnd.model)
    with caplog.at_level("WARNING", logger="clients"):
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    assert rnd.survivors == signed
    assert "the aggregator says sites [1, 2]" in caplog.text


@pytest.mark.parametrize("holder", [False, True])
@pytest.mark.parametrize("left_out", [True, False])
def test_a_ckks_site_the_signed_sum_leaves_out_is_told_its_update_was_dropped(
        holder: bool, left_out: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator acknowledged a CKKS site's upload, then left it out of the sum it
    gave the key holder, who released (and signed) the average of the other sites. The site
    took the result with no word, its one update per model spent, believing it took part
    (a tester). The signed sites (a key holder: the ones it released) leaving out a site
    whose update was acknowledged can only be a lie: submit raises RoundAborted, and the
    result, signed, stays held for the next round."""
    from secagg.model import FlatModel

    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, _conn = _site("ckks", info, payloads)
    site.kit.roster, identities = make_roster(5)
    me = HOLDER if holder else HONEST
    site.site_id = me
    model = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    rnd = Round(site, info, model)
    summed = [s for s in (1, 2, 3, 4, 5) if s != me or not left_out]
    result = service_pb2.Model(digest=b"\x05" * 32)
    ended = service_pb2.RoundInfo(
        round=1, round_id=info.round_id, status=service_pb2.ROUND_STATUS_COMPLETED,
        survivors=summed, result=result, sites_signature=identities[HOLDER].sign(
            wire.sites_signed_bytes(info.round_id, result.digest, summed)))

    def run_ckks(*_args: Any) -> None:
        if holder:  # the key holder released the sum it was given
            rnd._released = np.zeros(8)
            rnd._known_survivors = tuple(summed)

    accepted: list[Any] = []
    monkeypatch.setattr(rnd, "_run_ckks", run_ckks)
    monkeypatch.setattr(rnd, "_wait_for_end", lambda: ended)
    monkeypatch.setattr(site, "_accept_result",
                        lambda *args: accepted.append(args) or model)
    if not left_out:
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    else:
        with pytest.raises(RoundAborted, match="left this site's update out of the sum"):
            rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    assert rnd.survivors == tuple(summed) and len(accepted) == 1 and rnd.result is model


def test_a_masking_clients_signed_survivors_are_the_sorted_list_it_signed() -> None:
    """MaskingClient.signed_survivors (what a site reports as the round's survivors) is
    empty until the site signs a survivor list, then that list, sorted: here site 5 drops
    out before its masked input, and every other site signed 1..4."""
    from secagg.masking import Stage
    from tests.roundkit import Round as HandRound

    r = HandRound(sites=5)
    r.advance()  # keys advertised
    r.advance()  # shares delivered
    assert all(c.signed_survivors == () for c in r.clients.values())
    r.advance(skip=frozenset({5}))  # masked inputs: site 5 drops out
    assert all(c.signed_survivors == () for c in r.clients.values())
    r.advance(skip=frozenset({5}))  # the survivor list, signed
    for s in (1, 2, 3, 4):
        assert r.clients[s].stage is not Stage.ADVERTISE_KEYS
        assert r.clients[s].signed_survivors == (1, 2, 3, 4), s


def test_a_key_holders_survivors_are_the_sites_it_released(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CKKS key holder's release (verification stubbed) of the sum of sites 1..5: the
    round's survivors as it reports them are those five, whatever the aggregator says at
    the end."""
    import clients.site as site_module

    class _Release:
        def __init__(self, *_args: Any, **_kwargs: Any) -> None:
            pass

        def close(self) -> None:
            pass

    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, _conn = _site("ckks", info, payloads)
    rnd = Round(site, info, None)  # type: ignore[arg-type]
    rnd._key = object()  # type: ignore[assignment]
    released = types.SimpleNamespace(average=np.zeros(8), sites=(1, 2, 3, 4, 5))
    monkeypatch.setattr(site_module, "Release", _Release)
    monkeypatch.setattr(rnd, "_receive", lambda _stage: service_pb2.ReceiveResponse())
    monkeypatch.setattr(rnd, "_verify_and_release", lambda *_: released)
    monkeypatch.setattr(rnd, "_upload_and_submit", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(site, "_signable_result", lambda *_: None)
    rnd._release(types.SimpleNamespace(preset_params=None))
    assert rnd._survivors(service_pb2.RoundInfo(survivors=[2, 1])) == (1, 2, 3, 4, 5)


def test_a_site_with_no_survivor_list_of_its_own_reports_the_aggregators_sorted_once() -> None:
    """A CKKS site that is not the key holder signs no survivor list: its round's survivors
    are the aggregator's, sorted, each once (not an empty tuple), when the key holder signed
    them (test_a_ckks_sites_survivors_are_the_ones_its_key_holder_signed)."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, _conn = _site("ckks", info, payloads)
    site.kit.roster, identities = make_roster(5)
    rnd = Round(site, info, None)  # type: ignore[arg-type]
    signature = identities[HOLDER].sign(wire.sites_signed_bytes(info.round_id, b"r", [1, 2, 3]))
    assert rnd._survivors(service_pb2.RoundInfo(
        round=1, survivors=[3, 1, 2, 1], sites_signature=signature,
        result=service_pb2.Model(digest=b"r"))) == (1, 2, 3)


def test_an_honest_first_model_whose_chunks_repeat_is_taken() -> None:
    """An honest first model whose 1 MiB chunks repeat (zeros, ones, zeros: the aggregator
    stores the zeros once and names that chunk twice): the part-by-part digest check sees
    the parts in the blob's order, each as often as named, and takes it (checking the
    distinct chunks, or another order, refused an honest model)."""
    from secagg.model import FlatModel

    n = 1 << 17  # 1 MiB of float64
    honest = FlatModel.from_arrays({"w": np.concatenate(
        [np.zeros(n), np.ones(n), np.zeros(n)])})
    data = honest.to_bytes()
    cuts = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    assert cuts[0] == cuts[2] and cuts[0] != cuts[1]
    stored = {hashlib.sha256(c).digest(): c for c in cuts}

    class _Parts(_ChunkStub):
        def GetChunks(self, request: Any, timeout: float) -> Any:
            for cid in request.chunk_ids:
                yield service_pb2.Chunk(chunk_id=cid, data=stored[cid])

    config = FederationConfig.from_dict({
        "federation": {"name": "hospitals", "protocol": "masking", "aggregator": "agg:443",
                       "trust_root": "00" * 32}})
    site = Site(types.SimpleNamespace(site_id=HONEST, config=config),  # type: ignore[arg-type]
                _connection(_Parts(b"")))
    blob = wire.Blob(tuple(hashlib.sha256(c).digest() for c in cuts), len(data))
    got = site._download_model(wire.model_to_proto(honest, blob), "model")
    assert got.digest == honest.digest


def test_a_first_model_of_neither_encoded_size_is_an_invalid_message() -> None:
    """A first model whose bytes are neither of its spec's sizes (6000 bytes for 1000
    float32 values: 4000 compact, 8000 all-float64) is InvalidMessage from the part-by-part
    check, as every other lie about a model is, not a bare ValueError."""
    from secagg.errors import InvalidMessage
    from secagg.model import FlatModel

    stub = _ChunkStub(bytes(6000))
    site = _fresh_site(_connection(stub))
    model = FlatModel.from_arrays({"w": np.zeros(1000, np.float32)})
    with pytest.raises(InvalidMessage):
        site._download_model(wire.model_to_proto(model, wire.Blob((stub.cid,), 6000)), "model")
    assert stub.served == 1


def test_a_round_that_starts_from_the_model_a_site_holds_is_not_fetched_again() -> None:
    """A site takes round 1's result at its end, and round 2 starts from it: every site
    fetched that model again (twice a round's bytes down; a site on a slow link that could
    fetch it once within the open deadline missed every round after the first, a tester's
    live run). The model held is used, unless something wrote into its values since (the
    caller holds rnd.result): then it is fetched, and the fetched one is taken."""
    from secagg.model import FlatModel

    info, payloads = _model_info(2, "hospitals/job-1/round-2", w=np.full(8, 0.5, np.float32))
    held = FlatModel.from_arrays({"w": np.full(8, 0.5, np.float32)})
    assert held.digest == bytes(info.model.digest)
    site, conn = _site("masking", info, payloads)
    site._held_model, site._model_digest, site._held_round = held, held.digest, 1
    rnd = next(site.rounds())
    assert conn.fetched == [] and rnd.model is held

    written, conn2 = _site("masking", info, payloads)
    written._held_model, written._model_digest, written._held_round = held, held.digest, 1
    held.values[0] = 7.0  # (the training script wrote into the model it was handed)
    rnd = next(written.rounds())
    assert conn2.fetched == [info.model.data.chunk_ids[0].hex()]
    assert rnd.model is not held and rnd.model.values[0] == 0.5


def test_a_result_a_site_took_is_the_model_it_holds_for_the_next_round() -> None:
    """The site joins round 1 (fetching its model) and takes round 1's result; round 2
    starts from that result: the site uses the result it took, fetched once, not twice (the
    result taken is the model held, not round 1's model)."""

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    result, blob = _take_round_1_result(site, conn, rnd)
    assert conn.fetched == ["03" * 32, "05" * 32]

    conn.info = service_pb2.RoundInfo(round=2, round_id="hospitals/job-1/round-2",
                                      protocol=service_pb2.PROTOCOL_MASKING,
                                      status=service_pb2.ROUND_STATUS_RUNNING,
                                      model=wire.model_to_proto(result, blob))
    rnd2 = next(site.rounds())
    assert rnd2.round_id == "hospitals/job-1/round-2"
    assert conn.fetched == ["03" * 32, "05" * 32]  # (the result: not fetched again)
    assert rnd2.model.digest == result.digest


def test_a_round_joined_and_not_sent_to_leaves_its_model_held() -> None:
    """The site joins round 1 and sends nothing (the round aborts without it). Round 2
    starts from the same model: the one the site holds is used, not fetched again."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    rnd1 = next(site.rounds())
    assert conn.fetched == ["03" * 32]

    conn.info = service_pb2.RoundInfo()
    conn.info.CopyFrom(info)
    conn.info.round, conn.info.round_id = 2, "hospitals/job-1/round-2"
    rnd2 = next(site.rounds())
    assert rnd2.round_id == "hospitals/job-1/round-2"
    assert conn.fetched == ["03" * 32] and rnd2.model is rnd1.model


def test_an_abort_reason_told_after_the_upload_is_explained_too() -> None:
    """A CKKS round whose key holder refused the release as noise is aborted after every
    site uploaded: a site learns it waiting for the round's end, not for its key, and the
    reason it is told there comes with what it means as well."""
    rnd, _ = _ckks_round_then_aborted("AGGREGATE_OUT_OF_RANGE")
    with pytest.raises(RoundAborted, match="max_samples far above the sites' sample counts"):
        rnd._wait_for_end()


# ---- sdk32: checks a weakened build got past (mutation review) -------------------------------


@pytest.mark.parametrize("poll", ["wait_for_end", "receive", "next_round"])
def test_polls_padded_and_answered_at_once_are_paced_by_their_bytes_too(
        poll: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator pads each "nothing new" answer to 1 MiB and answers at once (below
    the pacer's threshold for an honest long poll): the early-answer backoff alone (up to
    5 s) let ~200 KB a second in. The answer's bytes pace the next poll there too."""
    from clients.site import POLL_BYTES_PER_SECOND, POLL_SLACK_BYTES

    clock = _fake_clock(monkeypatch)
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    calls, pad = [0], 1 << 20

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= 10:  # at once: no time passes
            return _padded(service_pb2.ReceiveResponse(ready=False) if method == "Receive"
                           else service_pb2.RoundInfo(), pad)
        return _poll_done(mine, method, poll)

    _run_poll(site, call, poll)
    assert calls[0] == 11
    assert clock[0] >= 10 * (pad - POLL_SLACK_BYTES) / POLL_BYTES_PER_SECOND


def test_a_site_waits_for_a_round_as_long_as_its_deadlines_allow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's promise: a site gives a round up only once it outlasts twice what the
    federation's [deadlines] allow (the open stage, five stages, the key holder's release)
    plus five minutes. An honest aggregator that restarted mid-round and ends the round
    just inside that is waited for; one that never ends it is given up after it."""
    clock = _fake_clock(monkeypatch)
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    d = site.config.deadlines
    promised = 2 * (d.open + 5 * d.stage + d.release) + 300
    rnd = Round(site, mine, None)  # type: ignore[arg-type]

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        clock[0] += 10.0  # each long poll waits its full 10 s, as an honest one does
        if clock[0] < promised - 20:
            return mine  # still running
        return _poll_done(mine, method, "wait_for_end")

    rnd._conn = types.SimpleNamespace(call=call)  # type: ignore[assignment]
    assert rnd._wait_for_end().status == service_pb2.ROUND_STATUS_COMPLETED
    assert promised - 20 <= clock[0] < promised


def test_a_long_training_does_not_count_against_the_rounds_patience(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The round's patience runs from the submit, not from the join: a site whose training
    took longer than the patience (a large model on a slow GPU) and submits while the round
    still runs sends its update, instead of giving the round up unsent."""
    import clients.site

    clock = _fake_clock(monkeypatch)
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    clock[0] += clients.site._round_patience(site.config) + 600  # training
    from clients.errors import AggregatorRefused

    with pytest.raises(AggregatorRefused, match="stops here"):  # (the stub's refusal)
        rnd.submit({"w": np.ones(8, np.float32)}, weight=10)
    assert conn.sent == ["Submit"]


def test_a_key_holder_takes_no_result_when_its_release_makes_no_model() -> None:
    """The key holder's released average makes no model (values past the tensor's range):
    the aggregator's result cannot be the round's, whatever it published; the key holder
    refuses it rather than take it unchecked."""
    from secagg.model import FlatModel

    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, conn = _site("ckks", info, payloads)
    model = FlatModel.from_arrays({"w": np.zeros(8, np.float32)})
    made_up = model.with_values(model.values + 0.01)
    blob = wire.Blob((b"\x4f" * 32,), len(made_up.to_bytes()))
    conn.payloads[blob.chunk_ids[0]] = made_up.to_bytes()
    done = service_pb2.RoundInfo(round=1, round_id=info.round_id,
                                 status=service_pb2.ROUND_STATUS_COMPLETED,
                                 result=wire.model_to_proto(made_up, blob))
    with pytest.raises(ModelMismatch, match="average this site released"):
        site._accept_result(done, model, np.full(8, 1e300))
    assert site._model_digest != made_up.digest


def test_a_key_holders_norm_check_leaves_integer_counters_out() -> None:
    """Integer tensors (BatchNorm's num_batches_tracked) count steps: they are left out of
    the clip, so the key holder's L2 check of the release leaves them out too. An honest
    release whose learned values are exactly clip_norm long and whose counter moved by
    clip_norm is signed."""
    from secagg.ckks.presets import get_preset
    from secagg.ckks.round import ReleasedAverage
    from secagg.model import FlatModel

    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, _ = _site("ckks", info, payloads)
    model = FlatModel.from_arrays({"w": np.zeros(8, np.float32),
                                   "n": np.array(100, np.int64)})
    clip = site.config.clip_norm
    average = np.concatenate([np.full(8, clip / np.sqrt(8)), [clip]])
    released = ReleasedAverage(average, 3.0, info.round_id, (1, 2, 3), 2.0**-20)
    result = site._signable_result(model, released, get_preset("add-only-4096"), info.round_id)
    assert result is not None
    assert result.digest == site._result_of(model, average).digest


def _served(conn: Any, model: Any, tag: int) -> Any:
    """``model`` as a round's model or result, its bytes served by ``conn``."""
    blob = wire.Blob((bytes([tag]) * 32,), len(model.to_bytes()))
    conn.payloads[blob.chunk_ids[0]] = model.to_bytes()
    return wire.model_to_proto(model, blob)


@pytest.mark.parametrize("last", ["joined", "took-the-result"])
def test_a_site_follows_the_rounds_it_missed_from_the_last_round_it_joined(last: str) -> None:
    """The site joined round 2 as its first (and sent nothing), or took round 1's result;
    round 2 completed honestly without it, and the site joins round 3 from round 2's
    result: the chain of rounds it missed starts after the round whose model it holds, and
    is followed (an honest round's model refused for a stale start is a site out of the
    job)."""
    from secagg.model import FlatModel

    first = 2 if last == "joined" else 1
    info, payloads = _model_info(first, f"hospitals/job-1/round-{first}")
    site, conn = _site("masking", info, payloads)
    rnd = next(site.rounds())
    held = rnd.model
    if last == "took-the-result":
        held, _ = _take_round_1_result(site, conn, rnd)
    result2 = held.with_values(held.values + 0.01)
    round2 = service_pb2.RoundInfo(round=2, round_id="hospitals/job-1/round-2",
                                   status=service_pb2.ROUND_STATUS_COMPLETED,
                                   model=_served(conn, held, 0x71),
                                   result=_served(conn, result2, 0x72))
    round3 = service_pb2.RoundInfo(round=3, round_id="hospitals/job-1/round-3",
                                   protocol=service_pb2.PROTOCOL_MASKING,
                                   status=service_pb2.ROUND_STATUS_RUNNING,
                                   model=_served(conn, result2, 0x73))
    chain = _Chain(round3, conn.payloads, {2: round2})
    site._conn = chain  # type: ignore[assignment]
    assert isinstance(held, FlatModel)
    rnd3 = next(site.rounds())
    assert rnd3.round_id == "hospitals/job-1/round-3"
    assert rnd3.model.digest == result2.digest


def test_a_finished_round_beyond_the_jobs_rounds_is_not_a_round_the_site_passed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator answers the site's wait for its next round with a finished round
    numbered 2**32 (beyond [job] rounds = 3): taken as passed, it made the site wait for
    the rounds after it, and it never joined another round of the job. It is no news: the
    site still waits after the round it passed, and joins round 1."""
    _fake_clock(monkeypatch)
    mine, _ = _model_info(1, "hospitals/job-1/round-1")
    site, _conn = _site("masking", mine, {})
    beyond = service_pb2.RoundInfo(round=2**32, round_id="hospitals/job-1/round-4294967296",
                                   status=service_pb2.ROUND_STATUS_COMPLETED)
    calls, asked = [0], []

    def call(method: str, request: Any, **_kwargs: Any) -> Any:
        calls[0] += 1
        asked.append(request.after_round)
        if calls[0] <= 3:
            return beyond
        if calls[0] <= 6:
            return mine
        return service_pb2.RoundInfo(status=service_pb2.ROUND_STATUS_JOB_DONE)

    site._conn = types.SimpleNamespace(call=call)  # type: ignore[assignment]
    info = site._next_round_info()
    assert info is not None and info.round == 1
    assert set(asked) == {0}
