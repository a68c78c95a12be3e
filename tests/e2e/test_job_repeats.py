"""The aggregator killed around the last message a stage waits for. A message counted just
before the aggregator could answer is sent again by its site, possibly after its round has
ended: the same bytes are the same message, acknowledged again, never counted twice; different
bytes are refused. A stage whose last message was counted but whose close was not recorded is
closed when the job recovers, not left to wait out its deadline."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

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


def _ckks_job(tmp_path: Path) -> tuple[Callable[[], Job], Store, list[float],
                                          service_pb2.SubmitRequest, int]:
    """(a maker of the job on one store, the store, its clock, the key holder's key offer
    for round 1, the key holder)."""
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

    info = job().round_info(0)
    assert info is not None
    holder, announcement, data = ckks_key_offer(fed, files.config, info.round_id)
    cid = hashlib.sha256(data).digest()
    store.put_chunks([(cid, data)], round_number=1, site=holder)
    offer = service_pb2.CkksKeyOffer(announcement=wire.announcement_to_proto(announcement))
    offer.public_context.CopyFrom(wire.Blob((cid,), len(data)).to_proto())
    return job, store, now, service_pb2.SubmitRequest(round_id=info.round_id,
                                                      ckks_key=offer), holder


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
        assert [e.kind for e in store.events(1)] == ["message", "close"]
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
