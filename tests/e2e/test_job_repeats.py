"""The aggregator killed around the last message a stage waits for. A message counted just
before the aggregator could answer is sent again by its site, possibly after its round has
ended: the same bytes are the same message, acknowledged again, never counted twice; different
bytes are refused. A stage whose last message was counted but whose close was not recorded is
closed when the job recovers, not left to wait out its deadline."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.job import Job, ServiceError
from aggregator.service import load_server_files
from aggregator.store import Store
from secagg import wire
from secagg.ckks import CkksStage
from secagg.federation.kit import ROSTER_FILE, load_roster
from secagg.model import FlatModel
from secagg.v1 import service_pb2
from tests.service_kit import ckks_key_offer, make_federation


def _two_round_ckks(tmp_path: Path) -> tuple[Any, Any, Callable[[], Job], Store, list[float]]:
    """(the federation, its server files, a maker of its two-round CKKS job on one store, the
    store, the job's clock)."""
    fed = make_federation(tmp_path, 4, "ckks", rounds=2)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    now = [0.0]
    model = FlatModel.load_npz(files.config.initial_model)

    def job() -> Job:
        j = Job(files.config, roster, store, model, clock=lambda: now[0])
        j.recover()
        return j

    return fed, files, job, store, now


def _key_offer(fed: Any, config: Any, store: Store, number: int) -> service_pb2.SubmitRequest:
    """Round ``number``'s key holder's genuine key offer (its public context stored)."""
    round_id = config.round_id_for(number)
    holder, announcement, data = ckks_key_offer(fed, config, round_id, number)
    cid = hashlib.sha256(data).digest()
    store.put_chunks([(cid, data)], round_number=number, site=holder)
    offer = service_pb2.CkksKeyOffer(announcement=wire.announcement_to_proto(announcement),
                                     public_context=wire.Blob((cid,), len(data)).to_proto())
    return service_pb2.SubmitRequest(round_id=round_id, ckks_key=offer)


def _ckks_job(tmp_path: Path) -> tuple[Callable[[], Job], Store, list[float],
                                          service_pb2.SubmitRequest, int]:
    """(a maker of the job on one store, the store, its clock, the key holder's key offer
    for round 1, the key holder)."""
    fed, files, job, store, now = _two_round_ckks(tmp_path)
    info = job().round_info(0)
    assert info is not None and info.round_id == files.config.round_id_for(1)
    return (job, store, now, _key_offer(fed, files.config, store, 1),
            files.config.key_holder_for(1))


def test_a_message_whose_answer_was_lost_is_acknowledged_after_its_round_ended(
        tmp_path: Path) -> None:
    job, store, now, request, holder = _ckks_job(tmp_path)
    try:
        first = job()
        assert first.submit(holder, request) is False  # counted; the answer never arrives
        # the round then ends (here: no site uploads before its deadlines) and the next opens
        for _ in range(5):
            if first.current_round != 1:
                break
            _sites_ask(first)
            now[0] += 10_000.0
            first.tick()
        assert first.current_round == 2

        again = job()  # the aggregator, restarted on the same store
        before = list(store.events(1))
        assert again.submit(holder, request) is True  # acknowledged, the site goes on
        assert list(store.events(1)) == before  # and nothing counted twice
        changed = service_pb2.SubmitRequest()
        changed.CopyFrom(request)
        changed.ckks_key.public_context.size += 1
        with pytest.raises(ServiceError):  # not the message it sent: refused
            again.submit(holder, changed)
    finally:
        store.close()


def test_a_stage_whose_last_message_was_counted_is_closed_on_recovery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between counting the key holder's key offer (all the key stage waits for) and
    recording the stage's close: the restarted job closes the stage itself. It stayed at the
    key stage, and every site, already holding the key, was refused its upload."""
    job, store, _now, request, holder = _ckks_job(tmp_path)
    try:
        first = job()

        def killed(*_args: object, **_kwargs: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(first, "_close", killed)
        with pytest.raises(KeyboardInterrupt):
            first.submit(holder, request)
        monkeypatch.undo()
        again = job()
        assert again.active is not None
        assert again.active.view.stage == CkksStage.UPLOAD.value
        assert [e.kind for e in store.events(1)] == ["waits", "message", "close"]
    finally:
        store.close()


def test_a_job_whose_commit_failed_serves_nothing_until_reloaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit of a message fails after the message was applied in memory: the job's
    memory is ahead of the store. Calls already queued on its thread ran on it (a stage could
    close on a message the store never recorded); now every call is UNAVAILABLE until the
    service reloads the job from the store, which holds the message uncounted."""
    import sqlalchemy as sa

    from aggregator.job import UNAVAILABLE

    job, store, _now, request, holder = _ckks_job(tmp_path)
    try:
        first = job()

        def failing_commit(*_args: object, **_kwargs: object) -> None:
            raise sa.exc.OperationalError("COMMIT", {}, Exception("disk I/O error"))

        monkeypatch.setattr(store, "claim_chunks", failing_commit)
        with pytest.raises(sa.exc.OperationalError):
            first.submit(holder, request)
        monkeypatch.undo()
        assert first.stale
        for call in (lambda: first.submit(holder, request), first.tick,
                     lambda: first.round_info(0),
                     lambda: first.receive(holder, request.round_id, CkksStage.UPLOAD.value)):
            with pytest.raises(ServiceError) as caught:
                call()
            assert caught.value.code == UNAVAILABLE
        fresh = job()  # what the service's watcher does
        assert not fresh.stale
        assert fresh.submit(holder, request) is False  # the message was never counted
    finally:
        store.close()


def _replaced_message(request: service_pb2.SubmitRequest, **changes: object) -> bytes:
    changed = service_pb2.SubmitRequest()
    changed.CopyFrom(request)
    for name, value in changes.items():
        setattr(changed, name, value)
    return changed.SerializeToString()


@pytest.mark.parametrize("damage", [
    "unknown kind", "message at another stage", "message of another site",
    "message of another round", "message of another stage's kind", "close at another stage",
    "close of a site", "event beyond the round"])
def test_a_store_whose_events_were_damaged_is_refused_not_replayed(
        tmp_path: Path, damage: str) -> None:
    """The round's recorded events changed under the job (bit rot, a hand edit, a restore of
    another store's rows): each event is checked as the live path checked it when it was
    recorded, and one that does not fit stops the job's recovery (the service refuses the
    store) instead of being skipped or replayed as far as it goes. The untouched store
    recovers."""
    import sqlalchemy as sa

    from aggregator.job import UNAVAILABLE
    from aggregator.store import events

    job, store, _now, request, holder = _ckks_job(tmp_path)
    try:
        assert job().submit(holder, request) is False  # counted; the key stage closes
        assert [(e.kind, e.stage, e.site) for e in store.events(1)] == [
            ("waits", CkksStage.KEY_ANNOUNCEMENT.value, 0),
            ("message", CkksStage.KEY_ANNOUNCEMENT.value, holder),
            ("close", CkksStage.KEY_ANNOUNCEMENT.value, 0)]
        assert job().active is not None  # the untouched store replays
        other = next(s for s in (1, 2, 3, 4) if s != holder)
        message = events.c.kind == "message"
        close = events.c.kind == "close"
        with store.engine.begin() as c:
            if damage == "unknown kind":
                c.execute(events.update().where(message).values(kind="massage"))
            elif damage == "message at another stage":
                c.execute(events.update().where(message).values(
                    stage=CkksStage.UPLOAD.value))
            elif damage == "message of another site":
                c.execute(events.update().where(message).values(site=other))
            elif damage == "message of another round":
                c.execute(events.update().where(message).values(payload=_replaced_message(
                    request, round_id=request.round_id.replace("round-1", "round-2"))))
            elif damage == "message of another stage's kind":  # a key offer at the upload
                c.execute(events.insert().values(round=1, kind="message", site=holder,
                                                 stage=CkksStage.UPLOAD.value, at=0.0,
                                                 payload=request.SerializeToString()))
            elif damage == "close at another stage":
                c.execute(events.update().where(close).values(stage=CkksStage.UPLOAD.value))
            elif damage == "close of a site":
                c.execute(events.update().where(close).values(site=holder))
            else:
                c.execute(events.insert().values(round=1, kind="close", stage=99, site=0,
                                                 payload=b"", at=0.0))
            inserted = damage in ("event beyond the round", "message of another stage's kind")
            assert c.execute(sa.select(sa.func.count()).select_from(events)).scalar() == (
                4 if inserted else 3)  # each damage changed or added one event
        with pytest.raises(ServiceError, match="do not replay") as caught:
            job()
        assert caught.value.code == UNAVAILABLE
    finally:
        store.close()


def test_a_recorded_message_its_role_refuses_on_replay_is_the_stores_damage(
        tmp_path: Path) -> None:
    """A recorded message that fits where it was recorded (its round, stage, kind and site)
    but that the round's role refuses when it is replayed (here the key holder's signature
    on its announcement changed under the job): the store's doing, not a site's, so the
    recovery is refused UNAVAILABLE, "do not replay" (never the site's INVALID_ARGUMENT out of
    a recovery no site called)."""
    from aggregator.job import UNAVAILABLE
    from aggregator.store import events

    job, store, _now, request, holder = _ckks_job(tmp_path)
    try:
        assert job().submit(holder, request) is False  # counted and recorded
        assert job().active is not None  # the untouched store replays
        damaged = service_pb2.SubmitRequest()
        damaged.CopyFrom(request)
        signature = bytearray(damaged.ckks_key.announcement.signature)
        signature[0] ^= 1
        damaged.ckks_key.announcement.signature = bytes(signature)
        with store.engine.begin() as c:
            c.execute(events.update().where(events.c.kind == "message").values(
                payload=damaged.SerializeToString()))
        with pytest.raises(ServiceError, match="do not replay: a recorded message is refused "
                                               "now") as caught:
            job()
        assert caught.value.code == UNAVAILABLE
    finally:
        store.close()


def test_fields_the_aggregator_does_not_know_are_not_stored(tmp_path: Path) -> None:
    """A site pads its message with a field of a number no .proto names (no signature covers
    it; Python's protobuf keeps it): the message counts, and the store keeps the message
    the roles read, not the padding (8 MiB a message, never purged, grew the store by 40 MB
    a round)."""
    job, store, _now, request, holder = _ckks_job(tmp_path)
    try:
        padding = b"\0" * (1 << 20)
        field_999 = b"\xba\x3e" + bytes([0x80, 0x80, 0x40])  # tag (999, bytes); length 2**20
        padded = service_pb2.SubmitRequest()
        padded.ParseFromString(request.SerializeToString() + field_999 + padding)
        assert len(padded.SerializeToString()) > len(padding)  # the padding is in the message
        assert job().submit(holder, padded) is False  # counted
        (message,) = [e for e in store.events(1) if e.kind == "message"]
        assert message.payload == request.SerializeToString(deterministic=True)
    finally:
        store.close()


def _sites_ask(job: Job) -> None:
    """Every roster site asks about the running round (a round's deadlines wait for that)."""
    assert job.active is not None
    for site in job.roster:
        job.round_info(job.active.view.number - 1, site)


def _tick_past_the_deadline(job: Job, now: list[float]) -> None:
    _sites_ask(job)
    assert job.active is not None
    now[0] = job.active.deadline + 1.0
    job.tick()


def test_a_key_holder_that_never_announces_aborts_the_round_at_its_deadline(
        tmp_path: Path) -> None:
    """The key holder never offers its key: at the key stage's deadline the round aborts
    (TOO_FEW_SURVIVORS) and the next opens. Without the check the round moved on to its
    upload stage with no CKKS role: every upload failed (None has no handle) and its close
    raised AttributeError on the job's thread, every tick, for good."""
    _, _, job, store, now = _two_round_ckks(tmp_path)
    try:
        first = job()
        _tick_past_the_deadline(first, now)
        assert first.rounds[1].status == service_pb2.ROUND_STATUS_ABORTED
        assert first.rounds[1].abort_reason == "TOO_FEW_SURVIVORS"
        assert first.current_stage == (2, CkksStage.KEY_ANNOUNCEMENT.value)
        assert [r.status for r in store.rounds()] == ["aborted", "running"]
    finally:
        store.close()


def test_a_message_of_the_running_round_sent_under_an_ended_rounds_id_is_refused(
        tmp_path: Path) -> None:
    """Round 2's key holder sends round 2's genuine key offer under round 1's round id
    (round 1 has ended): refused, nothing recorded. Without the check the job handed it to
    the running round, which counted it (it checks the message against its own round), and
    recorded it with a round id that is not its round's: the store's events no longer
    replayed, and no restart could load the job."""
    fed, files, job, store, now = _two_round_ckks(tmp_path)
    try:
        first = job()
        _tick_past_the_deadline(first, now)  # round 1 ends (no key); round 2 opens
        assert first.current_round == 2
        offer = _key_offer(fed, files.config, store, 2)
        misnamed = service_pb2.SubmitRequest()
        misnamed.CopyFrom(offer)
        misnamed.round_id = files.config.round_id_for(1)
        holder = files.config.key_holder_for(2)
        with pytest.raises(ServiceError) as caught:
            first.submit(holder, misnamed)
        assert caught.value.code in ("ABORTED", "FAILED_PRECONDITION")
        assert [e.kind for e in store.events(2)] == ["waits"]  # (nothing counted)
        again = job()  # a restart loads the job, and the offer under its own id is counted
        assert again.submit(holder, offer) is False
        assert again.current_stage == (2, CkksStage.UPLOAD.value)
    finally:
        store.close()


def _ended_round_1_with_an_upload(job: Job, store: Store, now: list[float]
                                  ) -> tuple[bytes, bytes]:
    """(id, bytes) of a chunk site 2 uploaded to round 1, which then ended at its deadline."""
    data = b"an upload of round 1"
    cid = hashlib.sha256(data).digest()
    store.put_chunks([(cid, data)], round_number=1, site=2)
    _tick_past_the_deadline(job, now)
    assert job.current_round == 2
    return cid, data


def test_a_finished_rounds_uploads_are_purged_once_the_purge_delay_passed(
        tmp_path: Path) -> None:
    """Chunks uploaded to round 1, which then ends: the ticker drops them PURGE_DELAY
    seconds later (not at once, nor never). Without the clock check they were kept until
    the aggregator shut down: every round's uploads, gigabytes over a long job."""
    from aggregator.job import PURGE_DELAY

    _, _, job, store, now = _two_round_ckks(tmp_path)
    try:
        first = job()
        cid, data = _ended_round_1_with_an_upload(first, store, now)
        ended = now[0]
        now[0] = ended + PURGE_DELAY / 2
        first.tick()
        assert store.get_chunk(cid) == data  # not yet
        now[0] = ended + PURGE_DELAY
        first.tick()
        assert first.current_round == 2  # (round 2's deadline is later)
        assert store.get_chunk(cid) is None
    finally:
        store.close()


def test_rounds_ending_in_quick_succession_do_not_postpone_each_others_purge(
        tmp_path: Path) -> None:
    """Round 1 ends, round 2 ends 2 s later (fast rounds: a small model, little training):
    round 1's uploads go PURGE_DELAY after round 1's end, round 2's after round 2's. Each
    round's end pushed back the one pending purge: a burst of fast rounds kept every round's
    uploads (a site's junk included, up to its budget each round) until 3 s passed with no
    round ending (a helper held 90 MiB over six rounds)."""
    from aggregator.job import PURGE_DELAY

    _, _, job, store, now = _two_round_ckks(tmp_path)
    try:
        first = job()
        first.purge()  # (what recovery left)
        ids = []
        for number in (1, 2):
            data = f"an upload of round {number}".encode()
            ids.append(hashlib.sha256(data).digest())
            store.put_chunks([(ids[-1], data)], round_number=number, site=2)
        now[0] = 100.0
        first._schedule_purge(2)  # round 1 ended
        now[0] = 100.0 + PURGE_DELAY - 1
        first._schedule_purge(3)  # round 2 ended
        first.purge(now=False)
        assert store.get_chunk(ids[0]) is not None and store.get_chunk(ids[1]) is not None
        now[0] = 100.0 + PURGE_DELAY
        first.purge(now=False)
        assert store.get_chunk(ids[0]) is None  # round 1's time came
        assert store.get_chunk(ids[1]) is not None
        now[0] = 100.0 + 2 * PURGE_DELAY - 1
        first.purge(now=False)
        assert store.get_chunk(ids[1]) is None
    finally:
        store.close()


def test_a_store_failure_while_a_stage_closes_leaves_the_round_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store fails (UNAVAILABLE: it lacks a model it refers to) while the key stage
    closes: the close is UNAVAILABLE and the round stays running, to be replayed once the
    store answers. Without the check any refusal in a close aborted the round as
    AGGREGATE_OUT_OF_RANGE: a round lost, for good, to the store's passing trouble."""
    from aggregator.job import UNAVAILABLE

    _, _, job, store, now = _two_round_ckks(tmp_path)
    try:
        first = job()

        def store_trouble(*_args: object, **_kwargs: object) -> None:
            raise ServiceError(UNAVAILABLE, "the store lacks a model it refers to")

        monkeypatch.setattr(first, "_close_ckks", store_trouble)
        with pytest.raises(ServiceError) as caught:
            _tick_past_the_deadline(first, now)
        assert caught.value.code == UNAVAILABLE
        monkeypatch.undo()
        assert first.rounds[1].status == service_pb2.ROUND_STATUS_RUNNING
        assert [r.status for r in store.rounds()] == ["running"]
        # the restarted job replays the recorded close, with the store answering: the key
        # holder never announced, so the round aborts for that, not for its sum
        assert job().rounds[1].abort_reason == "TOO_FEW_SURVIVORS"
    finally:
        store.close()


def test_every_due_purge_is_done_at_once_and_shutdown_does_the_pending_ones(
        tmp_path: Path) -> None:
    """Two rounds' purges fall due before the ticker looks: one purge drops both rounds'
    uploads (popping only the oldest, or purging only before its bound, left the later
    round's uploads to later ticks, one round a tick). At shutdown (now=True) every pending
    purge is done, due or not: the uploads of the rounds that ended are not kept on disk."""
    from aggregator.job import PURGE_DELAY

    _, _, job, store, now = _two_round_ckks(tmp_path)
    try:
        first = job()
        first.purge()  # (what recovery left)

        def uploads() -> list[bytes]:
            ids = []
            for number in (1, 2):
                data = f"an upload of round {number} at {now[0]}".encode()
                ids.append(hashlib.sha256(data).digest())
                store.put_chunks([(ids[-1], data)], round_number=number, site=2)
            return ids

        now[0] = 100.0
        ids = uploads()
        first._schedule_purge(2)
        now[0] = 101.0
        first._schedule_purge(3)
        now[0] = 101.0 + PURGE_DELAY  # both due
        first.purge(now=False)
        assert store.get_chunk(ids[0]) is None and store.get_chunk(ids[1]) is None
        assert not first._purges

        now[0] = 500.0
        ids = uploads()
        first._schedule_purge(2)
        first._schedule_purge(3)
        first.purge()  # shutdown: neither due yet
        assert store.get_chunk(ids[0]) is None and store.get_chunk(ids[1]) is None
    finally:
        store.close()


def test_a_restarted_aggregator_purges_the_finished_rounds_uploads_at_its_first_tick(
        tmp_path: Path) -> None:
    """Round 1 ends and the aggregator restarts before round 1's purge was due: the restarted
    job drops round 1's uploads at its first tick (recovery's purge is due at once), not
    PURGE_DELAY later nor never (a job whose last round had ended kept them for good)."""
    _, _, job, store, now = _two_round_ckks(tmp_path)
    try:
        first = job()
        cid, data = _ended_round_1_with_an_upload(first, store, now)
        assert store.get_chunk(cid) == data  # (round 1's purge not due yet)
        again = job()  # restarted, at the same moment
        assert again.current_round == 2
        again.tick()
        assert store.get_chunk(cid) is None
    finally:
        store.close()


def test_a_completed_rounds_own_uploads_are_purged_once_the_purge_delay_passed(
        tmp_path: Path) -> None:
    """Round 1 completes (its release taken): PURGE_DELAY later the ticker drops round 1's
    uploads, not only the rounds' before it (they were kept until the next round ended, and
    the last round's until the aggregator stopped)."""
    from aggregator.job import PURGE_DELAY

    _, _, job, store, now = _two_round_ckks(tmp_path)
    try:
        first = job()
        data = b"an upload of round 1"
        cid = hashlib.sha256(data).digest()
        store.put_chunks([(cid, data)], round_number=1, site=2)
        assert first.active is not None and first.current_round == 1
        now[0] = 10.0
        first._complete(first.active, np.zeros(first.model.size), (1, 2, 3, 4), None, 4.0)
        assert first.current_round == 2
        now[0] = 10.0 + PURGE_DELAY
        first.tick()
        assert first.current_round == 2  # (round 2's deadline is later)
        assert store.get_chunk(cid) is None
    finally:
        store.close()


def test_a_restarted_aggregator_keeps_the_running_rounds_uploads(tmp_path: Path) -> None:
    """The aggregator restarts while round 1 runs, a site's upload to it already stored:
    recovery's purge (due at once) drops only the rounds before the running one, so the
    restarted job's first tick and its shutdown keep round 1's upload, which the round still
    sums (a purge bound past the running round dropped it, and the round with it)."""
    _, _, job, store, _ = _two_round_ckks(tmp_path)
    try:
        first = job()
        assert first.current_round == 1
        data = b"an upload of round 1, still running"
        cid = hashlib.sha256(data).digest()
        store.put_chunks([(cid, data)], round_number=1, site=2)
        again = job()  # restarted, at the same moment
        assert again.current_round == 1 and again.active is not None
        again.tick()
        assert store.get_chunk(cid) == data
        again.purge()  # (shutdown)
        assert store.get_chunk(cid) == data
    finally:
        store.close()


def test_a_restarted_job_answers_for_its_ended_rounds_as_before(tmp_path: Path) -> None:
    """Both rounds of the job end (aborted: no site uploads). Before and after a restart,
    GetRound after round 1 is round 2 (never round 1 again), round 1 keeps its abort reason
    (which the SDK raises as RoundAborted), and after round 2 the answer is JOB_DONE, not
    "no round yet", which every site would long-poll for good."""
    _fed, files, job, store, now = _two_round_ckks(tmp_path)
    try:
        first = job()
        for _ in range(20):
            if first.done:
                break
            _sites_ask(first)
            now[0] += 10_000.0
            first.tick()
        assert first.done
        for j in (first, job()):
            after_one = j.round_info(1)
            assert after_one is not None and after_one.round == 2
            one = j.info(files.config.round_id_for(1))
            assert one.status == service_pb2.ROUND_STATUS_ABORTED
            assert one.abort_reason == "TOO_FEW_SURVIVORS"
            done = j.round_info(2)
            assert done is not None and done.status == service_pb2.ROUND_STATUS_JOB_DONE
    finally:
        store.close()


def test_a_site_asking_for_a_stage_of_a_round_that_is_not_running_is_told_so(
        tmp_path: Path) -> None:
    """Receive of a round that completed while the job runs the next one is
    FAILED_PRECONDITION ("not running": the SDK fetches the round again), never "not ready"
    nor the running round's message for that stage: a site told "not ready" long-polls for
    a message that never comes."""
    _fed, files, job, store, now = _two_round_ckks(tmp_path)
    try:
        j = job()
        for _ in range(5):
            if j.current_round != 1:
                break
            _sites_ask(j)
            now[0] += 10_000.0
            j.tick()
        assert j.current_round == 2
        j.rounds[1].status = service_pb2.ROUND_STATUS_COMPLETED  # (as a completed round's)
        with pytest.raises(ServiceError) as refused:
            j.receive(2, files.config.round_id_for(1), CkksStage.UPLOAD.value)
        assert refused.value.code == "FAILED_PRECONDITION"
        assert "not running" in str(refused.value)
    finally:
        store.close()


def test_a_job_restarted_between_a_rounds_completion_and_the_next_rounds_opening(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after round 1's completion was committed and before round 2 was opened: the
    restarted job opens round 2 from round 1's result (not from the initial model, which
    would undo the round every site trained for), and tells round 1's survivors as
    before."""
    _fed, files, job, store, _now = _two_round_ckks(tmp_path)
    try:
        first = job()
        active = first.active
        assert active is not None
        holder = files.config.key_holder_for(1)
        average = np.full(active.view.model.size, 0.01)
        data = wire.average_bytes(average)
        cid = hashlib.sha256(data).digest()
        store.put_chunks([(cid, data)], round_number=1, site=holder)

        def killed(*_args: object, **_kwargs: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(first, "_open", killed)
        with pytest.raises(KeyboardInterrupt):
            first._complete(active, average, (1, 2, 4), wire.Blob((cid,), len(data)), 3.0)
        monkeypatch.undo()
        result = first.rounds[1].result
        assert result is not None and result.digest != first.rounds[1].model.digest

        again = job()
        two = again.round_info(1)
        assert two is not None and two.round == 2
        assert again.rounds[2].model.digest == result.digest
        assert list(again.info(files.config.round_id_for(1)).survivors) == [1, 2, 4]
    finally:
        store.close()
