"""Adversary: a roster site whose message refers to its payload with a lying size or chunk
list: one byte off, a chunk named hundreds of times, chunks that do not add up. A lie about a
site's own payload is INVALID_ARGUMENT (or RESOURCE_EXHAUSTED), found before one byte of
payload is read: never a store failure (which would restart the job and its deadlines for
every site) and never a read larger than the round's own payload. The same site sending out
of turn (a message of another stage, a second message in one stage, a payload it never
uploaded, a key announcement made for another round or holder) is refused with its code and
reason before the round's role sees it."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aggregator.job import RESOURCE_EXHAUSTED, Job, ServiceError
from aggregator.service import load_server_files
from aggregator.store import BlobRef, Store
from secagg import wire
from secagg.ckks import _seal
from secagg.federation.kit import ROSTER_FILE, load_roster
from secagg.model import FlatModel
from secagg.v1 import service_pb2
from tests.service_kit import ckks_key_offer, make_federation


@dataclass
class Setting:
    job: Job
    store: Store
    round_id: str
    holder: int
    reads: list[int]
    fed: Any = None


def _put(store: Store, data: bytes, site: int) -> bytes:
    cid = hashlib.sha256(data).digest()
    store.put_chunks([(cid, data)], round_number=1, site=site)
    return cid


def _ckks_federation(tmp_path: Path) -> tuple[Any, Any, Any, Store]:
    """A 4-site CKKS federation of one round: (federation, config, roster, a new store)."""
    fed = make_federation(tmp_path, 4, "ckks", rounds=1)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    return fed, files.config, roster, Store(str(tmp_path / "aggregator.db"))


def _round_one(config: Any, roster: Any, store: Store) -> tuple[Job, service_pb2.RoundInfo]:
    """The job in-process on ``store``, recovered, and its round 1 (open)."""
    job = Job(config, roster, store, FlatModel.load_npz(config.initial_model))
    job.recover()
    info = job.round_info(0)
    assert info is not None
    return job, info


@pytest.fixture
def ckks_upload_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setting]:
    """A CKKS job in-process whose round 1 is at its upload stage; ``reads`` records the
    size of every payload the job reads from the store."""
    fed, config, roster, store = _ckks_federation(tmp_path)
    reads: list[int] = []
    real = store.read_blob

    def recording(blob: BlobRef) -> bytes:
        reads.append(blob.size)
        return real(blob)

    monkeypatch.setattr(store, "read_blob", recording)
    try:
        job, info = _round_one(config, roster, store)
        holder, announcement, data = ckks_key_offer(fed, config, info.round_id)
        offer = service_pb2.CkksKeyOffer(announcement=wire.announcement_to_proto(announcement))

        # the key offer itself: a chunk named again and again, adding up to 40 MiB (a public
        # context of the round's preset has one exact length)
        junk = _put(store, os.urandom(4 << 20), holder)
        offer.public_context.CopyFrom(wire.Blob((junk,) * 10, 10 * (4 << 20)).to_proto())
        with pytest.raises(ServiceError) as caught:
            job.submit(holder, service_pb2.SubmitRequest(round_id=info.round_id,
                                                         ckks_key=offer))
        assert caught.value.code == "INVALID_ARGUMENT" and reads == []

        # more chunks than bytes: refused before the store is even asked for their sizes
        # (at the exact size a context of the round's preset has)
        tiny = tuple(_put(store, bytes([i]), holder) for i in range(3))
        offer.public_context.CopyFrom(wire.Blob(tiny * (len(data) // 3 + 1),
                                                len(data)).to_proto())
        monkeypatch.setattr(store, "chunk_sizes", None)
        with pytest.raises(ServiceError) as caught:
            job.submit(holder, service_pb2.SubmitRequest(round_id=info.round_id,
                                                         ckks_key=offer))
        assert caught.value.code == "INVALID_ARGUMENT"
        monkeypatch.undo()
        monkeypatch.setattr(store, "read_blob", recording)

        cid = _put(store, data, holder)
        offer.public_context.CopyFrom(wire.Blob((cid,), len(data)).to_proto())
        job.submit(holder, service_pb2.SubmitRequest(round_id=info.round_id, ckks_key=offer))
        assert reads == [len(data)]
        reads.clear()
        yield Setting(job, store, info.round_id, holder, reads, fed)
    finally:
        store.close()


def _update(s: Setting, site: int, blob: wire.Blob) -> service_pb2.SubmitRequest:
    config = s.job.active.ckks_config  # type: ignore[union-attr]
    ref = service_pb2.EncryptedUpdateRef(
        site_id=site, key_id=config.key_id, seeded=False, chunk_count=config.chunk_count,
        chunks=blob.to_proto(), signature=bytes(64))
    return service_pb2.SubmitRequest(round_id=s.round_id, ckks_update=ref)


def _needed(s: Setting) -> int:
    active = s.job.active
    assert active is not None
    return int(active.ckks_config.chunk_count) * _seal.encoded_length(
        active.ckks_context.seal_context, _seal.Kind.FULL)


def _refused(s: Setting, site: int, blob: wire.Blob) -> str:
    with pytest.raises(ServiceError) as caught:
        s.job.submit(site, _update(s, site, blob))
    assert s.reads == [], "the job read a payload before checking the claims about it"
    assert s.store.event_payload(1, "message", s.job.active.view.stage, site) is None  # type: ignore[union-attr]
    return caught.value.code


def test_a_chunk_named_many_times_is_refused_before_anything_is_read(
        ckks_upload_stage: Setting) -> None:
    """Sizes that add up, to far more than the round's upload: the round's own size is the
    bound, not the largest vector the federation allows."""
    s = ckks_upload_stage
    piece = _put(s.store, os.urandom(64 << 10), 2)
    assert _refused(s, 2, wire.Blob((piece,) * 400, 400 * (64 << 10))) == "INVALID_ARGUMENT"


@pytest.mark.parametrize("lie", ["one-byte-more", "one-byte-less", "tiny-chunk-many-times",
                                 "no-chunks"])
def test_chunks_that_do_not_add_up_to_the_claimed_size_are_refused(
        ckks_upload_stage: Setting, lie: str) -> None:
    s = ckks_upload_stage
    needed = _needed(s)
    if lie in ("one-byte-more", "one-byte-less"):
        # honest chunks of the right total, and a size claim one byte off... or the other way
        data = os.urandom(needed + (1 if lie == "one-byte-more" else -1))
        ids = tuple(_put(s.store, data[i:i + (1 << 20)], 2)
                    for i in range(0, len(data), 1 << 20))
        blob = wire.Blob(ids, needed)
    elif lie == "tiny-chunk-many-times":
        blob = wire.Blob((_put(s.store, b"x", 2),) * 50_000, needed)
    else:
        blob = wire.Blob((), needed)
    assert _refused(s, 2, blob) == "INVALID_ARGUMENT"


def test_the_store_stays_healthy_and_an_honest_upload_is_counted_after_the_lies(
        ckks_upload_stage: Setting) -> None:
    s = ckks_upload_stage
    data = os.urandom(_needed(s))
    ids = tuple(_put(s.store, data[i:i + (1 << 20)], 2) for i in range(0, len(data), 1 << 20))
    assert _refused(s, 2, wire.Blob(ids, len(data) + 1)) == "INVALID_ARGUMENT"
    # the same chunks with the true size get past every claim check: what refuses them now
    # is the upload's signature, after reading exactly the round's payload
    with pytest.raises(ServiceError) as caught:
        s.job.submit(2, _update(s, 2, wire.Blob(ids, len(data))))
    assert caught.value.code == "INVALID_ARGUMENT" and s.reads == [len(data)]


def test_the_size_a_message_needs_is_its_only_bound(ckks_upload_stage: Setting,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A CKKS upload takes 25-50 bytes a value: the bound for payloads of unknown size
    (16 bytes a value of the largest vector allowed) must not refuse an honest upload whose
    exact size the round fixes."""
    s = ckks_upload_stage
    limits = dataclasses.replace(s.job.config.limits, max_vector_length=10)
    s.job.config = dataclasses.replace(s.job.config, limits=limits)
    needed = 65 << 20  # beyond 16 x 11 bytes + 64 MiB
    cid = b"\x07" * 32
    monkeypatch.setattr(s.store, "chunk_sizes", lambda ids: {cid: needed})
    monkeypatch.setattr(s.store, "read_blob", lambda blob: b"read")
    assert s.job._read(wire.Blob((cid,), needed), size=needed) == b"read"
    with pytest.raises(ServiceError) as caught:  # unknown size: the general bound holds
        s.job._read(wire.Blob((cid,), needed))
    assert caught.value.code == RESOURCE_EXHAUSTED


# ---- messages out of turn, and payloads that are not there -----------------------------------


def _honest_upload(s: Setting, site: int, value: float) -> service_pb2.SubmitRequest:
    """Site ``site``'s genuine CKKS upload (its chunks stored) for round 1."""
    import numpy as np

    from secagg.ckks import CkksClient
    from secagg.federation.kit import SiteKit

    active = s.job.active
    assert active is not None
    kit = SiteKit.load(s.fed.site_dir(site))
    upload = CkksClient(active.ckks_config, site, kit.identity, active.ckks_context,
                        (np.full(active.view.model.size, value), 0.5), seeded=False).start()
    data = b"".join(upload.chunks)
    ids = tuple(_put(s.store, data[i:i + (1 << 20)], site)
                for i in range(0, len(data), 1 << 20))
    return service_pb2.SubmitRequest(round_id=s.round_id, ckks_update=wire.update_to_ref(
        upload, wire.Blob(ids, len(data))))


def test_a_message_of_another_stage_is_refused_as_out_of_turn(
        ckks_upload_stage: Setting) -> None:
    """The key holder sends a release while the round is still taking uploads (were it
    handled, the holder's "release" would fix the round's survivors before the others
    uploaded): FAILED_PRECONDITION, naming the stage, and nothing recorded."""
    s = ckks_upload_stage
    events = list(s.store.events(1))
    release = service_pb2.SubmitRequest(round_id=s.round_id,
                                        ckks_release=service_pb2.ReleasedAverageRef())
    with pytest.raises(ServiceError) as caught:
        s.job.submit(s.holder, release)
    assert caught.value.code == "FAILED_PRECONDITION" and "is at stage" in str(caught.value)
    assert list(s.store.events(1)) == events and s.reads == []


def test_a_message_naming_chunks_never_uploaded_is_a_precondition_not_an_error(
        ckks_upload_stage: Setting) -> None:
    """An upload naming chunks the aggregator never received (the site skipped PutChunks)
    is FAILED_PRECONDITION saying so, so the SDK uploads and sends again; never an internal
    error on the job's thread."""
    s = ckks_upload_stage
    blob = wire.Blob((hashlib.sha256(b"never uploaded").digest(),), _needed(s))
    assert _refused(s, 2, blob) == "FAILED_PRECONDITION"


def test_a_second_different_upload_in_one_stage_is_refused_and_the_first_stands(
        ckks_upload_stage: Setting) -> None:
    """A site whose upload was counted sends another, different one: refused, naming the
    reason, and the counted one is what the round keeps (the same one again is a no-op)."""
    s = ckks_upload_stage
    stage = s.job.active.view.stage  # type: ignore[union-attr]
    first = _honest_upload(s, 2, 0.01)
    assert s.job.submit(2, first) is False
    counted = s.store.event_payload(1, "message", stage, 2)
    assert counted is not None
    assert s.job.submit(2, first) is True  # the same message again: acknowledged, not counted
    with pytest.raises(ServiceError) as caught:
        s.job.submit(2, _honest_upload(s, 2, -0.01))
    assert caught.value.code == "FAILED_PRECONDITION"
    assert "already answered" in str(caught.value)
    assert s.store.event_payload(1, "message", stage, 2) == counted


def test_an_upload_of_another_ciphertext_count_is_refused_before_it_is_read(
        ckks_upload_stage: Setting) -> None:
    s = ckks_upload_stage
    config = s.job.active.ckks_config  # type: ignore[union-attr]
    request = _update(s, 2, wire.Blob((b"\x09" * 32,), _needed(s)))
    request.ckks_update.chunk_count = config.chunk_count + 1
    with pytest.raises(ServiceError, match="wrong number of ciphertexts") as caught:
        s.job.submit(2, request)
    assert caught.value.code == "INVALID_ARGUMENT" and s.reads == []


@pytest.mark.parametrize("lie", ["another-round", "another-holder"])
def test_a_key_announcement_for_another_round_or_holder_is_refused(
        tmp_path: Path, lie: str) -> None:
    """The key holder offers a genuine announcement of its own made for another round (a
    replay), or one naming another holder: the aggregator refuses it (INVALID_ARGUMENT),
    rather than leaving it to every site to refuse the round. (The epoch is checked twice: here
    and by the round's CKKS configuration.)"""
    fed, config, roster, store = _ckks_federation(tmp_path)
    try:
        job, info = _round_one(config, roster, store)
        epoch = "hospitals/other-job/round-1" if lie == "another-round" else info.round_id
        holder, announcement, data = ckks_key_offer(fed, config, epoch)
        if lie == "another-holder":
            announcement = dataclasses.replace(announcement, holder=holder % 4 + 1)
        offer = service_pb2.CkksKeyOffer(announcement=wire.announcement_to_proto(announcement))
        offer.public_context.CopyFrom(wire.Blob((_put(store, data, holder),),
                                                len(data)).to_proto())
        with pytest.raises(ServiceError, match="not for this round") as caught:
            job.submit(holder, service_pb2.SubmitRequest(round_id=info.round_id,
                                                         ckks_key=offer))
        assert caught.value.code == "INVALID_ARGUMENT"
        assert job.active is not None and job.active.ckks_config is None
    finally:
        store.close()


def test_a_payload_of_many_small_chunks_is_refused_before_a_lookup(
        ckks_upload_stage: Setting, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks that add up to the round's payload, but each of 1 KiB: the job looked each up
    (one store query per id, on its only thread) before a signature could refuse it, and a
    message of 8 MiB names 246,000 ids, sent again and again. A payload's chunks must hold
    64 KiB each on average (the page each chunk is charged): refused before the store is
    asked."""
    s = ckks_upload_stage
    data = os.urandom(_needed(s))
    ids = tuple(_put(s.store, data[i:i + 1024], 2) for i in range(0, len(data), 1024))
    lookups: list[int] = []
    sizes = s.store.chunk_sizes
    monkeypatch.setattr(s.store, "chunk_sizes", lambda i: lookups.append(len(i)) or sizes(i))
    assert _refused(s, 2, wire.Blob(ids, len(data))) == "INVALID_ARGUMENT"
    assert lookups == [] and s.reads == []


def test_a_site_whose_messages_are_refused_again_and_again_costs_the_job_no_more_reads(
        ckks_upload_stage: Setting) -> None:
    """Chunks uploaded once and named again and again under a wrong signature: each Submit
    (~200 bytes) made the job read and check the round's whole payload, ~50 times a second
    from one site, while every honest call waited. After a few refusals in a stage the site's
    messages to it are refused before anything is read; a retry after missing chunks (an
    honest site's, found before a read) is not counted, and another site is not touched."""
    from aggregator.job import REFUSED_MESSAGES_PER_STAGE

    s = ckks_upload_stage
    data = os.urandom(_needed(s))
    ids = tuple(_put(s.store, data[i:i + (1 << 20)], 2) for i in range(0, len(data), 1 << 20))
    missing = wire.Blob((hashlib.sha256(b"never uploaded").digest(),), len(data))
    for _ in range(REFUSED_MESSAGES_PER_STAGE + 2):
        assert _refused(s, 2, missing) == "FAILED_PRECONDITION"  # (not counted)
    for n in range(REFUSED_MESSAGES_PER_STAGE):
        with pytest.raises(ServiceError) as caught:
            s.job.submit(2, _update(s, 2, wire.Blob(ids, len(data))))
        assert caught.value.code == "INVALID_ARGUMENT"
        assert s.reads == [len(data)] * (n + 1)
    s.reads.clear()
    for _ in range(3):
        assert _refused(s, 2, wire.Blob(ids, len(data))) == "RESOURCE_EXHAUSTED"
    # another site's message is still read and checked
    with pytest.raises(ServiceError) as caught:
        s.job.submit(3, _update(s, 3, wire.Blob(ids, len(data))))
    assert caught.value.code == "INVALID_ARGUMENT" and s.reads == [len(data)], caught.value


def test_a_message_naming_no_site_and_a_wait_on_no_stage_are_bad_input(
        ckks_upload_stage: Setting) -> None:
    """A message with its site id unset was refused PERMISSION_DENIED ("may not send a
    message of site 0"), an identity refusal for what is malformed; and a Receive for a stage
    the round's protocol does not have was answered "not yet" for as long as the site asked.
    Both are INVALID_ARGUMENT (status codes keep one meaning each)."""
    s = ckks_upload_stage
    blob = wire.Blob((_put(s.store, b"x" * 100, 2),), 100)
    with pytest.raises(ServiceError) as caught:
        s.job.submit(2, _update(s, 0, blob))
    assert caught.value.code == "INVALID_ARGUMENT" and "names no site" in str(caught.value)
    with pytest.raises(ServiceError) as caught:
        s.job.receive(2, s.round_id, 99)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert not s.job.receive(2, s.round_id, 1).ready  # (the upload stage: not yet)


@pytest.mark.parametrize("kind", ["full-size", "seeded-size"])
def test_an_upload_flagged_seeded_is_refused_before_it_is_read(ckks_upload_stage: Setting,
                                                               kind: str) -> None:
    """A seeded ciphertext needs the secret key, which a service federation's sites do not
    hold (the SDK never sends one): one flagged seeded was taken, a second polynomial its
    site chose by the seed, which the key holder then decrypted against. Refused
    INVALID_ARGUMENT before a byte is read, whatever size it claims."""
    s = ckks_upload_stage
    active = s.job.active
    assert active is not None
    kinds = {"full-size": _seal.Kind.FULL, "seeded-size": _seal.Kind.SEEDED}
    size = int(active.ckks_config.chunk_count) * _seal.encoded_length(
        active.ckks_context.seal_context, kinds[kind])
    data = os.urandom(size)
    ids = tuple(_put(s.store, data[i:i + (1 << 20)], 2) for i in range(0, size, 1 << 20))
    request = _update(s, 2, wire.Blob(ids, size))
    request.ckks_update.seeded = True
    with pytest.raises(ServiceError) as caught:
        s.job.submit(2, request)
    assert caught.value.code == "INVALID_ARGUMENT" and "seeded" in str(caught.value)
    assert s.reads == []


def test_a_release_payload_larger_than_the_average_is_refused_before_it_is_read(
        ckks_upload_stage: Setting) -> None:
    """The key holder's release names an average one value longer than the model (chunks
    that add up to what it claims, within the general bound): refused INVALID_ARGUMENT before
    a byte is read. Without the exact size the job read whatever the holder named, up to
    16 bytes a value of the largest vector allowed plus 64 MiB, before refusing it."""
    s = ckks_upload_stage
    active = s.job.active
    assert active is not None
    size = 8 * (active.view.model.size + 1)
    blob = wire.Blob((_put(s.store, os.urandom(size), s.holder),), size)
    request = service_pb2.SubmitRequest(round_id=s.round_id, ckks_release=(
        service_pb2.ReleasedAverageRef(average=blob.to_proto())))
    with pytest.raises(ServiceError) as caught:  # (as Submit applies it, out of turn aside)
        s.job._apply(active, s.holder, request, replay=False)
    assert s.reads == [], "the job read a payload larger than the message needs"
    assert caught.value.code == "INVALID_ARGUMENT" and "needs" in str(caught.value)


def test_a_masked_input_payload_larger_than_the_round_needs_is_refused_before_it_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A masking site's masked input names one word more than the round's vector (chunks
    that add up to what it claims, within the general bound): refused INVALID_ARGUMENT before
    a byte is read. Without the exact size the job read whatever the site named, up to 16
    bytes a value of the largest vector allowed plus 64 MiB, before refusing it."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        job, info = _round_one(files.config, roster, store)
        active = job.active
        assert active is not None
        role = active.role
        word = wire.WORD_DTYPES[role.config.word_bits].itemsize
        size = word * (role.config.vector_length + 2)
        blob = wire.Blob((_put(store, os.urandom(size), 2),), size)
        reads: list[int] = []
        real = store.read_blob
        monkeypatch.setattr(store, "read_blob", lambda b: reads.append(b.size) or real(b))
        request = service_pb2.SubmitRequest(round_id=info.round_id)
        request.masked_input.site_id = 2
        request.masked_input.masked_input.CopyFrom(blob.to_proto())
        with pytest.raises(ServiceError) as caught:  # (as Submit applies it, out of turn aside)
            job._apply(active, 2, request, replay=False)
        assert reads == [], "the job read a payload larger than the message needs"
        assert caught.value.code == "INVALID_ARGUMENT" and "needs" in str(caught.value)
    finally:
        store.close()


def test_the_aggregate_and_the_uploads_are_granted_to_the_key_holder_alone(
        ckks_upload_stage: Setting) -> None:
    """Every site uploads and the upload stage closes (the real close): the aggregate it
    writes, and each site's upload, may be read by the key holder (it decrypts them) and by
    no other site. Without the grant being the holder's own, they were readable by every
    site (what a site may fetch is what its stage needs, nothing else)."""
    from secagg.ckks import CkksStage

    s = ckks_upload_stage
    for site in (1, 2, 3, 4):
        s.job.submit(site, _honest_upload(s, site, 0.01 * site))
    active = s.job.active
    assert active is not None and active.view.stage == CkksStage.RELEASE.value
    assert active.ckks_aggregate is not None
    aggregate = [bytes(c) for c in active.ckks_aggregate.chunks.chunk_ids]
    uploads = [bytes(c) for ref in active.ckks_uploads.values() for c in ref.chunks.chunk_ids]
    assert aggregate and uploads
    others = [site for site in (1, 2, 3, 4) if site != s.holder]
    for cid in aggregate + uploads:
        assert s.job.may_read(s.holder, cid)
        assert not any(s.job.may_read(site, cid) for site in others)


def test_after_the_job_is_done_no_site_reads_a_rounds_uploads(tmp_path: Path) -> None:
    """The job's last round ends (here: its key holder never announced): a site's upload
    to it may be read by no site, while the rounds' models stay public. Without the check,
    with no round running, every chunk in the store was readable by every site."""
    _, config, roster, store = _ckks_federation(tmp_path)
    try:
        now = [0.0]
        job = Job(config, roster, store, FlatModel.load_npz(config.initial_model),
                  clock=lambda: now[0])
        job.recover()
        active = job.active
        assert active is not None
        upload = _put(store, b"site 2's upload", 2)
        active.readable.setdefault(2, set()).add(upload)  # as a stage grants it
        model_chunk = next(iter(active.readable[0]))
        assert job.may_read(2, upload)
        for site in roster:  # (the sites ask about the round: its deadlines run)
            job.round_info(0, site)
        now[0] = active.deadline + 1.0
        job.tick()
        assert job.done and job.active is None
        assert not any(job.may_read(site, upload) for site in (1, 2, 3, 4))
        assert all(job.may_read(site, model_chunk) for site in (1, 2, 3, 4))
    finally:
        store.close()
