"""Adversary: a site that gets an upload labelled with an earlier round (its upload stream
was opened then, or it refers to a chunk uploaded then) and makes a later round's message
refer to it. The purge of finished rounds must never take the payload of a message a running
round has counted: the round could not finish, and a restart could not replay it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from aggregator.job import Job
from aggregator.service import load_server_files
from aggregator.store import Store
from secagg import wire
from secagg.federation.kit import ROSTER_FILE, load_roster
from secagg.model import FlatModel
from secagg.v1 import service_pb2
from tests.service_kit import ckks_key_offer, make_federation


def test_claimed_chunks_outlive_the_purge_of_older_rounds(store_url: str) -> None:
    store = Store(store_url)
    try:
        old, fresh, kept = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
        store.put_chunks([(old, b"old"), (fresh, b"fresh")], round_number=1, site=2)
        store.put_chunks([(kept, b"kept")], round_number=None, site=0)
        with store.transaction() as c:
            store.claim_chunks(c, [fresh, kept], 2)
        assert store.purge_chunks_before(2) == 1
        assert store.get_chunk(old) is None
        assert store.get_chunk(fresh) == b"fresh"
        assert store.get_chunk(kept) == b"kept"  # what is kept is never given back to a round
        with store.transaction() as c:
            store.claim_chunks(c, [fresh], None)
        assert store.purge_chunks_before(10) == 0
        assert store.get_chunk(fresh) == b"fresh"
    finally:
        store.close()


def test_a_counted_message_claims_its_payload_for_its_round(tmp_path: Path) -> None:
    """The key holder's public context, stored under an earlier round's label, is claimed by
    the round that counts the key offer: the purge of older rounds (which also runs at
    recovery) leaves it, and the round can go on."""
    fed = make_federation(tmp_path, 4, "ckks", rounds=2)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        job = Job(files.config, roster, store, FlatModel.load_npz(files.config.initial_model))
        job.recover()
        info = job.round_info(0)
        assert info is not None and info.round == 1
        holder, announcement, data = ckks_key_offer(fed, files.config, info.round_id)
        pieces = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
        ids = [hashlib.sha256(p).digest() for p in pieces]
        # uploaded under the label of a round before this one
        store.put_chunks(list(zip(ids, pieces, strict=True)), round_number=0, site=holder)
        job.submit(holder, service_pb2.SubmitRequest(
            round_id=info.round_id, ckks_key=service_pb2.CkksKeyOffer(
                announcement=wire.announcement_to_proto(announcement),
                public_context=wire.Blob(tuple(ids), len(data)).to_proto())))
        store.purge_chunks_before(1)
        assert store.missing(ids) == []
        assert all(job.may_read(2, cid) for cid in ids)  # the sites can still fetch it
    finally:
        store.close()


def test_a_store_of_another_job_is_refused_at_start(tmp_path: Path) -> None:
    """Sites accept only this configuration's round ids (`<name>/<[job] id>/round-<n>`): an
    aggregator started on a store whose rounds are named otherwise (another job's store, or a
    [job] id changed under a running job) would run rounds no site joins. It refuses to
    start, naming both."""
    import dataclasses

    import pytest

    from secagg.errors import ConfigurationError

    fed = make_federation(tmp_path, 4, "masking", rounds=2)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    model = FlatModel.load_npz(files.config.initial_model)
    try:
        Job(files.config, roster, store, model).recover()  # round 1 of job "job" opens
        other = dataclasses.replace(files.config, job_id="job-2")
        with pytest.raises(ConfigurationError, match="another job"):
            Job(other, roster, store, model).recover()
        moved = model.with_values(model.values + 1.0)  # another federation's, or edited
        with pytest.raises(ConfigurationError, match="another model"):
            Job(files.config, roster, store, moved).recover()
        Job(files.config, roster, store, model).recover()  # its own job still starts
    finally:
        store.close()


def test_ckks_key_holders_off_the_roster_are_refused_at_start(tmp_path: Path) -> None:
    """A key holder that is no roster site could never announce: every round would wait out
    its open deadline and abort. Refused when the job is made."""
    import dataclasses

    import pytest

    from secagg.errors import ConfigurationError

    fed = make_federation(tmp_path, 4, "ckks", rounds=1)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        config = dataclasses.replace(files.config, key_holders=(1, 9))
        with pytest.raises(ConfigurationError, match="key_holders"):
            Job(config, roster, store, FlatModel.load_npz(files.config.initial_model))
    finally:
        store.close()


def test_an_empty_initial_model_is_refused_before_the_store_is_touched(tmp_path: Path) -> None:
    import numpy as np
    import pytest

    from secagg.errors import ConfigurationError

    fed = make_federation(tmp_path, 4, "masking", rounds=1)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        with pytest.raises(ConfigurationError, match="no values"):
            Job(files.config, roster, store, FlatModel.from_arrays({"w": np.zeros(0)}))
        assert store.rounds() == []
    finally:
        store.close()


def _ckks_job(tmp_path: Path) -> tuple[Any, Any, Job, Store]:
    """A one-round CKKS job of four sites in this process, recovered: (federation, server
    files, job, store); the caller closes the store."""
    fed = make_federation(tmp_path, 4, "ckks", rounds=1)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    job = Job(files.config, roster, store, FlatModel.load_npz(files.config.initial_model))
    job.recover()
    return fed, files, job, store


def test_what_the_key_holder_may_read_no_other_site_may(tmp_path: Path) -> None:
    """In a CKKS round's release stage the key holder (alone) may fetch the aggregate and the
    uploads: they are granted to it, not to every site (each is a ciphertext under its key,
    but what a site may fetch is what its stage needs, nothing else)."""
    _, _, job, store = _ckks_job(tmp_path)
    try:
        active = job.active
        assert active is not None
        granted = b"\x05" * 32
        active.readable.setdefault(3, set()).add(granted)  # as the release stage grants it
        assert job.may_read(3, granted)
        assert not any(job.may_read(s, granted) for s in (1, 2, 4))
        model_chunk = next(iter(active.readable[0]))
        assert all(job.may_read(s, model_chunk) for s in (1, 2, 3, 4))
    finally:
        store.close()


def test_only_this_rounds_key_holder_announces_a_key(tmp_path: Path) -> None:
    """Another roster site relays the key holder's signed announcement as its own message:
    refused as a site that is no participant of the key stage (FAILED_PRECONDITION), and,
    were it one, as a site that is not the round's key holder (PERMISSION_DENIED)."""
    import pytest

    from aggregator.job import ServiceError

    fed, files, job, store = _ckks_job(tmp_path)
    try:
        info = job.round_info(0)
        assert info is not None
        holder, announcement, data = ckks_key_offer(fed, files.config, info.round_id)
        other = next(s for s in (1, 2, 3, 4) if s != holder)
        request = service_pb2.SubmitRequest(
            round_id=info.round_id, ckks_key=service_pb2.CkksKeyOffer(
                announcement=wire.announcement_to_proto(announcement),
                public_context=wire.Blob((hashlib.sha256(data).digest(),),
                                         len(data)).to_proto()))
        with pytest.raises(ServiceError) as caught:
            job.submit(other, request)
        assert caught.value.code == "FAILED_PRECONDITION"
        active = job.active
        assert active is not None
        with pytest.raises(ServiceError) as caught:
            job._apply_ckks(active, other, "ckks_key", request)
        assert caught.value.code == "PERMISSION_DENIED"
    finally:
        store.close()


def test_a_ckks_release_outlives_the_purge_of_its_round(tmp_path: Path) -> None:
    """The key holder uploads the released average during its round (labelled with it);
    the round's completion keeps those chunks for good, as the released history it records
    refers to them: the purge of the finished round's uploads leaves them readable."""
    import numpy as np

    from aggregator.store import BlobRef

    _, files, job, store = _ckks_job(tmp_path)
    try:
        active = job.active
        assert active is not None
        holder = files.config.key_holder_for(1)
        average = np.zeros(active.view.model.size)
        data = wire.average_bytes(average)
        cid = hashlib.sha256(data).digest()
        store.put_chunks([(cid, data)], round_number=1, site=holder)
        job._complete(active, average, (1, 2), wire.Blob((cid,), len(data)), 2.0)
        store.purge_chunks_before(2)
        (release,) = store.releases()
        assert store.read_blob(BlobRef.from_json(release.average)) == data
    finally:
        store.close()
