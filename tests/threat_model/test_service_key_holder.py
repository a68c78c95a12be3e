"""Adversary: the round's CKKS key holder, which releases an average no honest round could
produce: finite, but beyond what its tensor can hold (1e39 for a float32 weight). The
aggregator must refuse it as the release arrives if it is signed (nothing recorded), abort
the round at once as out of range if it is not (the key holder's SDK signs no model its
tensors cannot hold: its word that the sum is out of range), never publish a model the
sites cannot hold, never answer UNKNOWN, and go on with the job: before, the overflow was
raised while closing the stage, the job failed over and over on recovery, and a restart on the
same store exited.

The job goes on at the aggregator: it opens the next round. The sites whose updates were in
the refused round do not send again against its model (one update per model: the bad
release, or the sum that made no model, showed the aggregator that round's sum, and a
second sum from the same model without one site would give that site's update away).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.service_kit import make_federation, run_sites, start_aggregator


@pytest.mark.parametrize(("lie", "refusal"), [
    # (unsigned, as the key holder's SDK signs no model its tensors cannot hold: taken as
    # its word that the sum is out of range, and the round aborts at once)
    (["--inflate-release", "1:1e39"], "AGGREGATE_OUT_OF_RANGE"),
    (["--repeat-release-site", "1:0"], "other sites"),  # the published survivors
])
def test_a_release_no_honest_round_makes_is_refused_and_the_job_goes_on(
        tmp_path: Path, lie: list[str], refusal: str) -> None:
    fed = make_federation(tmp_path, 3, "ckks", rounds=2, release_s=5.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        reports = run_sites(fed, tmp_path, extra={1: lie}, timeout=60.0)
    finally:
        agg.stop()
    first = reports[1][0]
    assert first["round"] == 1 and refusal in first["reason"], reports[1]
    for s in (2, 3):
        assert [r.get("error") for r in reports[s]] == ["RoundAborted"], reports[s]
        assert "sends one update per model" in (tmp_path / f"site-{s}.err").read_text()
    events = agg.read()
    names = [e.get("event") for e in events]
    assert not {"tick_error", "recovery_error", "store_error"} & set(names), agg.tail()
    assert names.count("round_completed") == 0 and names.count("round_aborted") == 1
    assert any(e.get("event") == "round_opened" and e["round_id"].endswith("round-2")
               for e in events), agg.tail()


def test_a_round_whose_result_no_tensor_can_hold_aborts_and_the_job_goes_on(
        tmp_path: Path) -> None:
    """What the round's messages make is no model (here a server learning rate of 1000
    takes an int8 step counter, one step a round, from 0 to 1000): found while closing the
    last stage, deterministically, so the round aborts (AGGREGATE_OUT_OF_RANGE) rather than
    failing on every recovery; the job opens round 2, which the sites, whose updates were
    in round 1's sum, refuse (one update per model). (The sites' own configs say a rate of
    1: a site that knows the rate refuses, before sending, an update it would carry past
    its dtype; the aggregator's check is for the sites that do not.)"""
    import re

    from secagg.federation.kit import CONFIG_FILE, sign_settings

    fed = make_federation(tmp_path, 3, "masking", rounds=2, server_learning_rate=1000.0,
                          steps_dtype="int8")
    for s in (1, 2, 3):
        path = fed.site_dir(s) / CONFIG_FILE
        text, n = re.subn(r"(?m)^server_learning_rate = .*$", "server_learning_rate = 1.0",
                          path.read_text())
        assert n == 1
        path.write_text(text)
        sign_settings(fed.directory, path)  # (signed: the operator gave the sites this rate)
    agg = start_aggregator(fed, tmp_path)
    try:
        reports = run_sites(fed, tmp_path, timeout=60.0)
    finally:
        agg.stop()
    for s in (1, 2, 3):
        assert [r.get("error") for r in reports[s]] == ["RoundAborted"], reports[s]
        assert "sends one update per model" in (tmp_path / f"site-{s}.err").read_text()
    events = agg.read()
    names = [e.get("event") for e in events]
    assert not {"tick_error", "recovery_error", "store_error"} & set(names), agg.tail()
    aborts = [e.get("reason") for e in events if e.get("event") == "round_aborted"]
    assert aborts == ["AGGREGATE_OUT_OF_RANGE"], agg.tail()
    assert any(e.get("event") == "round_opened" and e["round_id"].endswith("round-2")
               for e in events), agg.tail()


class _AtRelease:
    """An in-process CKKS job of 3 sites brought to its release stage: the key holder has
    announced, every site has uploaded (each a real, signed CKKS upload)."""

    def __init__(self, tmp_path: Path) -> None:
        import numpy as np

        from aggregator.job import Job
        from aggregator.service import load_server_files
        from aggregator.store import Store
        from secagg import wire
        from secagg.ckks import CkksClient
        from secagg.federation.kit import ROSTER_FILE, SiteKit, load_roster
        from secagg.model import FlatModel
        from secagg.v1 import service_pb2
        from tests.service_kit import ckks_key_offer

        self.fed = fed = make_federation(tmp_path, 3, "ckks", rounds=1)
        files = load_server_files(fed.aggregator_config)
        self.config = config = files.config
        self.store_path = str(tmp_path / "aggregator.db")
        self.store = store = Store(self.store_path)
        self.roster = load_roster(files.directory / ROSTER_FILE, config.trust_root)
        self.initial = FlatModel.load_npz(config.initial_model)
        self.job = job = Job(config, self.roster, store, self.initial)
        job.recover()
        info = job.round_info(0)
        self.round_id = info.round_id
        holder, announcement, context = ckks_key_offer(fed, config, info.round_id)
        self.holder = holder
        offer = service_pb2.CkksKeyOffer(announcement=wire.announcement_to_proto(announcement))
        offer.public_context.CopyFrom(wire.Blob((self.put(context, holder),),
                                                len(context)).to_proto())
        job.submit(holder, service_pb2.SubmitRequest(round_id=info.round_id, ckks_key=offer))
        active = job.active
        assert active is not None
        for site in sorted(active.expected):
            kit = SiteKit.load(fed.site_dir(site))
            up = CkksClient(active.ckks_config, site, kit.identity, active.ckks_context,
                            (np.full(active.view.model.size, 0.01), 0.5), seeded=False).start()
            data = b"".join(up.chunks)
            ids = tuple(self.put(data[i:i + (1 << 20)], site)
                        for i in range(0, len(data), 1 << 20))
            job.submit(site, service_pb2.SubmitRequest(
                round_id=info.round_id,
                ckks_update=wire.update_to_ref(up, wire.Blob(ids, len(data)))))
        assert job.active is active and active.view.stage == 2  # RELEASE

    def put(self, data: bytes, site: int) -> bytes:
        import hashlib

        cid = hashlib.sha256(data).digest()
        self.store.put_chunks([(cid, data)], round_number=1, site=site)
        return cid

    def refusal(self, *, signer: int | None = None, reason: int = 10,
                params_digest: bytes | None = None,
                aggregate_chunk_ids: tuple[bytes, ...] | None = None) -> Any:
        """A SubmitRequest with the key holder's refusal, signed by ``signer``'s roster key
        over this round's parameters (or ``params_digest``), ``reason`` and the aggregate
        the round asked it to release (or ``aggregate_chunk_ids``)."""
        from secagg import wire
        from secagg.federation.kit import SiteKit
        from secagg.v1 import service_pb2

        active = self.job.active
        assert active is not None and active.ckks_aggregate is not None
        digest = active.ckks_config.params_digest if params_digest is None else params_digest
        ids = (tuple(active.ckks_aggregate.chunks.chunk_ids) if aggregate_chunk_ids is None
               else aggregate_chunk_ids)
        kit = SiteKit.load(self.fed.site_dir(self.holder if signer is None else signer))
        signature = kit.identity.sign(wire.refusal_signed_bytes(digest, self.holder, reason,
                                                                ids))
        return service_pb2.SubmitRequest(round_id=self.round_id, ckks_refusal=(
            service_pb2.CkksReleaseRefusal(reason=reason, signature=signature)))  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["result_signature", "sites_signature"])
@pytest.mark.parametrize("signature", [b"\0" * (6 << 20), b"\0" * 64])
def test_an_unsigned_release_carrying_a_signature_is_refused_and_not_recorded(
        tmp_path: Path, signature: bytes, field: str) -> None:
    """The key holder releases an average beyond the clip (which the aggregator takes
    unsigned, to abort the round as out of range) padded with a 6 MiB result signature: the
    signature went unchecked and was recorded with the message, for good. Refused now."""
    import numpy as np

    from aggregator.job import ServiceError
    from secagg import wire
    from secagg.v1 import service_pb2

    r = _AtRelease(tmp_path)
    job, holder = r.job, r.holder
    try:
        active = job.active
        assert active is not None
        average = np.full(active.view.model.size, 1e6).astype("<f8").tobytes()
        release = service_pb2.ReleasedAverageRef(
            average=wire.Blob((r.put(average, holder),), len(average)).to_proto(),
            weight_sum=1.0, sites=sorted(active.ckks_uploads), grid=2.0**-20,
            **{field: signature})
        stage = active.view.stage
        with pytest.raises(ServiceError, match="carries no signature"):
            job.submit(holder, service_pb2.SubmitRequest(round_id=r.round_id,
                                                         ckks_release=release))
        assert r.store.event_payload(1, "message", stage, holder) is None
    finally:
        r.store.close()


@pytest.mark.parametrize("signed", [False, True])
def test_a_release_that_makes_no_model_aborts_the_round_at_once_unless_signed(
        tmp_path: Path, signed: bool) -> None:
    """A release within the L2 check whose average takes a value out of its tensor's range
    (one site pushed an integer buffer past its dtype: no learned value moved). The key
    holder's SDK signs no model it cannot hold, so it came unsigned, and the aggregator
    refused it: the round waited out the release deadline (600 s) and aborted as
    TOO_FEW_SURVIVORS, and the key holder's submit raised AggregatorRefused (an outside
    tester). Unsigned, it is taken as the key holder's word and the round aborts at once,
    AGGREGATE_OUT_OF_RANGE; signed, it is a lie refused as it arrives, nothing recorded."""
    import numpy as np

    from aggregator.job import ServiceError
    from secagg import wire
    from secagg.v1 import service_pb2

    r = _AtRelease(tmp_path)
    job, holder = r.job, r.holder
    try:
        active = job.active
        assert active is not None
        values = np.zeros(active.view.model.size)
        # an integer counter past its dtype (finite; the L2 check leaves counters out, so
        # only the model the average makes refuses it)
        counters = np.flatnonzero(active.view.model.integer_positions)
        assert counters.size
        values[counters[0]] = 1e30
        average = values.astype("<f8").tobytes()
        release = service_pb2.ReleasedAverageRef(
            average=wire.Blob((r.put(average, holder),), len(average)).to_proto(),
            weight_sum=1.5, sites=sorted(active.ckks_uploads), grid=2.0**-20,
            result_signature=b"\1" * 64 if signed else b"")
        stage = active.view.stage
        request = service_pb2.SubmitRequest(round_id=r.round_id, ckks_release=release)
        if signed:
            with pytest.raises(ServiceError, match="out of its tensors' range"):
                job.submit(holder, request)
            assert r.store.event_payload(1, "message", stage, holder) is None
            assert job.rounds[1].status == service_pb2.ROUND_STATUS_RUNNING
            return
        assert job.submit(holder, request) is False
        view = job.rounds[1]
        assert view.status == service_pb2.ROUND_STATUS_ABORTED
        assert view.abort_reason == "AGGREGATE_OUT_OF_RANGE" and view.result is None
    finally:
        r.store.close()


def test_the_key_holders_signed_refusal_aborts_the_round_at_once_and_after_a_crash(
        tmp_path: Path) -> None:
    """The key holder refuses the sum as out of range (a site's upload past its limits; it
    sees the sum only). Its signed refusal ends the round at once, AGGREGATE_OUT_OF_RANGE,
    not at the release deadline; and the refusal is a counted message like any other: an
    aggregator killed after counting it, before the round's end was written, aborts the round
    on recovery, not waiting again for a key holder that has gone."""
    from unittest import mock

    from aggregator.job import Job
    from aggregator.store import Store
    from secagg.v1 import service_pb2

    r = _AtRelease(tmp_path)
    try:
        with mock.patch.object(Job, "_close", lambda self, active, replay=False: None):
            assert r.job.submit(r.holder, r.refusal()) is False  # counted, the close "lost"
        view = r.job.rounds[1]
        assert view.status == service_pb2.ROUND_STATUS_RUNNING
    finally:
        r.store.close()
    store = Store(r.store_path)
    try:
        job = Job(r.config, r.roster, store, r.initial)
        job.recover()
        view = job.rounds[1]
        assert view.status == service_pb2.ROUND_STATUS_ABORTED
        assert view.abort_reason == "AGGREGATE_OUT_OF_RANGE"
        # the same refusal again (its answer lost) is acknowledged, not an error
        assert job.submit(r.holder, service_pb2.SubmitRequest.FromString(
            store.event_payload(1, "message", 2, r.holder) or b"")) is True
    finally:
        store.close()


def test_the_live_refusal_ends_the_round_when_it_is_counted(tmp_path: Path) -> None:
    from secagg.v1 import service_pb2

    r = _AtRelease(tmp_path)
    try:
        assert r.job.submit(r.holder, r.refusal()) is False
        view = r.job.rounds[1]
        assert view.status == service_pb2.ROUND_STATUS_ABORTED
        assert view.abort_reason == "AGGREGATE_OUT_OF_RANGE"
    finally:
        r.store.close()


@pytest.mark.parametrize("lie", ["another-sites-key", "another-round", "another-reason",
                                 "garbage", "another-reason-signed-as-out-of-range",
                                 "another-sum"])
def test_a_refusal_counts_only_signed_by_the_key_holder_for_this_round_and_out_of_range(
        tmp_path: Path, lie: str) -> None:
    """Only the key holder's own refusal, of this round and of the sum the round asked it
    to release, for the one reason it tells, ends the round; anything else is
    INVALID_ARGUMENT, nothing is recorded, and the round still waits for the release (the
    key holder's real answer is then taken)."""
    import hashlib

    from aggregator.job import ServiceError
    from secagg.v1 import service_pb2

    r = _AtRelease(tmp_path)
    try:
        if lie == "another-sites-key":
            request = r.refusal(signer=2 if r.holder != 2 else 3)
        elif lie == "another-round":
            request = r.refusal(params_digest=hashlib.sha256(b"another round").digest())
        elif lie == "another-reason":
            request = r.refusal(reason=9)  # AGGREGATE_MISMATCH, validly signed
        elif lie == "another-sum":  # (signed before the sum was seen, or for another)
            request = r.refusal(aggregate_chunk_ids=(hashlib.sha256(b"a sum").digest(),))
        elif lie == "another-reason-signed-as-out-of-range":
            request = r.refusal()
            request.ckks_refusal.reason = 9  # type: ignore[assignment]
        else:
            request = r.refusal()
            request.ckks_refusal.signature = b"\1" * 64
        with pytest.raises(ServiceError) as caught:
            r.job.submit(r.holder, request)
        assert caught.value.code == "INVALID_ARGUMENT", caught.value
        assert r.store.event_payload(1, "message", 2, r.holder) is None
        assert r.job.rounds[1].status == service_pb2.ROUND_STATUS_RUNNING
        r.job.submit(r.holder, r.refusal())
        assert r.job.rounds[1].abort_reason == "AGGREGATE_OUT_OF_RANGE"
    finally:
        r.store.close()


def test_a_key_holder_that_never_releases_aborts_the_round_at_the_release_deadline(
        tmp_path: Path) -> None:
    """Every site uploaded, and the key holder neither releases nor refuses (it is gone):
    at the release stage's deadline the round aborts, TOO_FEW_SURVIVORS, its end recorded,
    and no model is published (never a TypeError closing the stage on the job's thread,
    every tick, for good)."""
    from secagg.v1 import service_pb2

    r = _AtRelease(tmp_path)
    job = r.job
    try:
        active = job.active
        assert active is not None and active.ckks_release is None
        active.deadline = float("-inf")  # (the release deadline has passed)
        job.tick()
        view = job.rounds[1]
        assert view.status == service_pb2.ROUND_STATUS_ABORTED
        assert view.abort_reason == "TOO_FEW_SURVIVORS" and view.result is None
        assert job.active is None and job.done  # (a job of one round)
        assert [row.status for row in r.store.rounds()] == ["aborted"]
    finally:
        r.store.close()


@pytest.mark.parametrize("lie", ["other-sites", "another-signer", "other-result", "unsigned",
                                 None])
def test_a_signed_release_must_sign_its_sites(tmp_path: Path, lie: str | None) -> None:
    """The key holder signs the sites its release covers beside the result, and the
    aggregator publishes that signature as the survivors' (every other site reports the sites
    from it). A release whose sites signature is over other sites or another result, or by
    another site, is refused, INVALID_ARGUMENT, and not recorded; the key holder's own is
    taken, and so is none (a key holder's SDK from before sites signatures: the other sites
    then report no survivors)."""
    import numpy as np

    from aggregator.job import ServiceError
    from secagg import wire
    from secagg.federation.kit import SiteKit
    from secagg.v1 import service_pb2

    r = _AtRelease(tmp_path)
    job, holder = r.job, r.holder
    try:
        active = job.active
        assert active is not None
        view = active.view
        values = np.zeros(view.model.size)
        sites = sorted(active.ckks_uploads)
        data = values.astype("<f8").tobytes()
        new = job._next_model(view, values)
        signer = SiteKit.load(r.fed.site_dir(
            holder if lie != "another-signer" else next(s for s in sites if s != holder)))
        own = SiteKit.load(r.fed.site_dir(holder)).identity
        sites_signature = b"" if lie == "unsigned" else signer.identity.sign(
            wire.sites_signed_bytes(r.round_id,
                                    b"\x01" * 32 if lie == "other-result" else new.digest,
                                    sites[:2] if lie == "other-sites" else sites))
        release = service_pb2.ReleasedAverageRef(
            average=wire.Blob((r.put(data, holder),), len(data)).to_proto(),
            weight_sum=1.5, sites=sites, grid=2.0**-20,
            result_signature=own.sign(wire.result_signed_bytes(
                r.round_id, view.model.digest, new.digest)),
            sites_signature=sites_signature)
        stage = view.stage
        request = service_pb2.SubmitRequest(round_id=r.round_id, ckks_release=release)
        if lie in (None, "unsigned"):
            job.submit(holder, request)
            assert r.store.event_payload(1, "message", stage, holder) is not None
            info = job.round_info(0)
            assert info.status == service_pb2.ROUND_STATUS_COMPLETED
            assert bytes(info.sites_signature) == sites_signature
            assert sorted(info.survivors) == sites
            return
        with pytest.raises(ServiceError, match="sites signature does not sign"):
            job.submit(holder, request)
        assert r.store.event_payload(1, "message", stage, holder) is None
    finally:
        r.store.close()
