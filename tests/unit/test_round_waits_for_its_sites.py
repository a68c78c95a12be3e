"""A round waits for its sites: it is told to no site, and its deadlines do not run, until
as many sites as it needs are asking for it. An aggregator started before its sites came
online aborted round after round for want of them (TOO_FEW_SURVIVORS, one open deadline
apart) and ended the job with none trained, saying "job done" (an outside tester, as an
operator). Waiting loses nothing (no round of fewer sites can finish) and no site can hold
a round by it: one site can only start the clock, as its message always could. (The job
in-process, its clock the test's.)"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from aggregator.job import Job
from aggregator.service import load_server_files
from aggregator.store import Store
from secagg.federation.kit import ROSTER_FILE, load_roster
from secagg.model import FlatModel
from secagg.v1 import service_pb2
from tests.service_kit import make_federation


def _job(tmp_path: Path, protocol: str, rounds: int = 2, sites: int = 5,
         **overrides: Any) -> tuple[Job, Store, list[float]]:
    fed = make_federation(tmp_path, sites, protocol, rounds=rounds, **overrides)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    now = [0.0]
    job = Job(files.config, roster, store, FlatModel.load_npz(files.config.initial_model),
              clock=lambda: now[0])
    job.recover()
    return job, store, now


def _status(job: Job, number: int) -> Any:
    return job.rounds[number].status


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_a_round_no_site_asked_about_outlasts_its_deadlines(
        tmp_path: Path, protocol: str) -> None:
    job, store, now = _job(tmp_path, protocol)
    try:
        least = job._least_sites
        assert 1 < least < 5
        # no site at all, for a long time: the round waits, the job is not spent
        for _ in range(10):
            now[0] += 10 * job.config.deadlines.open
            job.tick()
        assert _status(job, 1) == service_pb2.ROUND_STATUS_RUNNING and not job.done
        # fewer sites than the round needs, asking again and again: it still waits
        for site in range(1, least):
            for _ in range(3):
                info = job.round_info(0, site)
                assert info is not None and info.round == 1
        now[0] += 10 * job.config.deadlines.open
        job.tick()
        assert _status(job, 1) == service_pb2.ROUND_STATUS_RUNNING
        # as many as it needs, each within PRESENCE_SECONDS: under way, and its clock starts
        # there, for the whole open deadline
        for site in range(1, least):
            job.round_info(0, site)
        assert job.active is not None and job.active.waiting
        asked_at = now[0]
        job.round_info(0, least)
        assert not job.active.waiting
        assert job.active.deadline == asked_at + job.config.deadlines.open
        now[0] = job.active.deadline - 1.0
        job.tick()
        assert _status(job, 1) == service_pb2.ROUND_STATUS_RUNNING
        # and once it passes with too few answers, the round ends as before
        now[0] += 2.0
        job.tick()
        assert _status(job, 1) == service_pb2.ROUND_STATUS_ABORTED
        assert job.rounds[1].abort_reason == "TOO_FEW_SURVIVORS"
        assert job.current_round == 2
        # the next round waits for its sites again
        now[0] += 10 * job.config.deadlines.open
        job.tick()
        assert _status(job, 2) == service_pb2.ROUND_STATUS_RUNNING
    finally:
        store.close()


def test_a_site_that_asked_once_and_went_away_is_not_counted(tmp_path: Path) -> None:
    """Sites that asked hours apart (the first gone since, its process stopped) made a
    round under way that counted a site no longer there: only the sites asking within
    PRESENCE_SECONDS count."""
    from aggregator.job import PRESENCE_SECONDS

    job, store, now = _job(tmp_path, "masking")
    try:
        least = job._least_sites
        job.round_info(0, 1)
        now[0] += PRESENCE_SECONDS + 1
        for site in range(2, least + 1):
            job.round_info(0, site)
        assert job.active is not None and job.active.waiting  # (site 1 gone: one short)
        job.round_info(0, least + 1)
        assert not job.active.waiting
    finally:
        store.close()


def test_a_round_under_way_stays_under_way_after_a_restart(tmp_path: Path) -> None:
    """A round under way, then the aggregator restarts: it waited again from nothing, and
    sites that had left it (their patience spent) never asked for it again, so it waited for
    good where its deadline would have ended it (a reviewer). Under way is recorded; the
    restarted round's deadlines run from the restart."""
    job, store, now = _job(tmp_path, "masking")
    try:
        for site in range(1, job._least_sites + 1):
            job.round_info(0, site)
        assert job.active is not None and not job.active.waiting
        store.close()
        store = Store(str(tmp_path / "aggregator.db"))
        again = Job(job.config, job.roster, store, job._initial, clock=lambda: now[0])
        again.recover()
        assert again.active is not None and not again.active.waiting
        now[0] += 2 * again.config.deadlines.open
        again.tick()
        assert _status(again, 1) == service_pb2.ROUND_STATUS_ABORTED
    finally:
        store.close()


def _advertised_then_restarted(tmp_path: Path, *, older_store: bool,
                               under_way: bool = False) -> tuple[Job, Store]:
    """Site 1 sends its keys to the waiting round 1 (counted; the round waits on for the
    others; ``under_way``: then the others ask, and it is under way), and the aggregator
    restarts; ``older_store``: the round's "waits" event taken out, as a store from before
    rounds waited, or from the build before this one, holds none."""
    import numpy as np

    from aggregator.store import events
    from secagg import wire
    from secagg.federation.kit import SiteKit
    from secagg.masking.client import MaskingClient

    job, store, now = _job(tmp_path, "masking")
    active = job.active
    assert active is not None and active.waiting
    config = active.role.config
    fed_dir = Path(job.config.initial_model).parent  # (the aggregator's directory)
    kit = SiteKit.load(fed_dir.parent / "sites" / "site-1")
    advert = MaskingClient(config, 1, kit.identity,
                           (np.zeros(active.view.model.size), 0.5)).start()
    assert job.submit(1, service_pb2.SubmitRequest(
        round_id=active.view.round_id,
        advertise_keys=wire.advertise_to_proto(advert))) is False
    assert active.waiting
    if under_way:
        for site in range(1, job._least_sites + 1):
            job.round_info(0, site)
        assert not active.waiting
    assert [e.kind for e in store.events(1)] == ["waits", "message"] + (
        ["under_way"] if under_way else [])
    if older_store:
        with store.transaction() as conn:
            conn.execute(events.delete().where(events.c.kind == "waits"))
    store.close()
    store = Store(str(tmp_path / "aggregator.db"))
    again = Job(job.config, job.roster, store, job._initial, clock=lambda: now[0])
    again.recover()
    return again, store


def test_a_message_replayed_puts_a_round_of_an_older_store_under_way(tmp_path: Path) -> None:
    """A store from before rounds waited holds no under_way event, and its round's sites,
    some past their patience, may not ask for it again: a round with messages counted is
    under way after a restart."""
    job, store = _advertised_then_restarted(tmp_path, older_store=True)
    try:
        assert job.active is not None and not job.active.waiting
    finally:
        store.close()


def test_a_round_opened_waiting_waits_on_after_a_restart(tmp_path: Path) -> None:
    """A restart during a long wait put the round under way as soon as one site's keys were
    replayed: its deadlines ran with the others still offline, TOO_FEW_SURVIVORS (a
    reviewer). The round is recorded as opened waiting; after a restart it waits on, and
    its sites, which wait with it, put it under way by asking again."""
    job, store = _advertised_then_restarted(tmp_path, older_store=False)
    try:
        active = job.active
        assert active is not None and active.waiting and active.answered == {1}
        for site in range(1, job._least_sites + 1):
            job.round_info(0, site)
        assert not active.waiting
    finally:
        store.close()


def test_a_round_past_its_opening_stage_is_under_way(tmp_path: Path) -> None:
    """Every site sent its keys while the round still waited (they asked more than
    PRESENCE_SECONDS apart): the stage closed, every site in, and the round went on to its
    shares with its deadlines still not running, so a site dropping there held it for good.
    Past its opening stages a round is under way."""
    import numpy as np

    from secagg import wire
    from secagg.federation.kit import SiteKit
    from secagg.masking.client import MaskingClient
    from secagg.masking.messages import Stage

    job, store, now = _job(tmp_path, "masking")
    try:
        active = job.active
        assert active is not None
        config = active.role.config
        fed_dir = Path(job.config.initial_model).parent
        for site in sorted(active.expected):
            kit = SiteKit.load(fed_dir.parent / "sites" / f"site-{site}")
            advert = MaskingClient(config, site, kit.identity,
                                   (np.zeros(active.view.model.size), 0.5)).start()
            assert active.waiting  # (no site asked: each only sent)
            job.submit(site, service_pb2.SubmitRequest(
                round_id=active.view.round_id, advertise_keys=wire.advertise_to_proto(advert)))
        assert active.view.stage == Stage.SHARE_KEYS.value and not active.waiting
        now[0] += 2 * job.config.deadlines.stage + 1
        job.tick()
        assert _status(job, 1) == service_pb2.ROUND_STATUS_ABORTED
    finally:
        store.close()


def test_sites_waiting_for_a_stage_count_as_asking(tmp_path: Path) -> None:
    """A site that sent its message waits for the stage's answer, not for the round: that
    is asking for the round too."""
    from secagg.ckks import CkksStage

    job, store, _now = _job(tmp_path, "ckks")
    try:
        assert job.active is not None
        round_id = job.active.view.round_id
        for site in range(1, job._least_sites + 1):
            job.receive(site, round_id, CkksStage.KEY_ANNOUNCEMENT.value)
        assert not job.active.waiting
    finally:
        store.close()


def test_a_secaggplus_round_waits_for_sites_whose_key_directory_each_takes(
        tmp_path: Path) -> None:
    """6 sites, 4 neighbours each (threshold 2, quorum 4): the round went under way with 4
    sites asking, and every one of them refused the key directory (a neighbour missing on
    a side, where none may be), round after round while sites 5 and 6 were late (an outside
    tester). The sites asking must make a directory each of them takes."""
    job, store, _now = _job(tmp_path, "masking", sites=6, neighbors=4)
    try:
        active = job.active
        assert active is not None
        config = active.role.config
        assert config.max_missing_per_side == 0 and job._least_sites == 4
        for site in (1, 2, 3, 4, 5):
            job.round_info(0, site)
        assert active.waiting
        job.round_info(0, 6)  # (all six: every window whole)
        assert not active.waiting
    finally:
        store.close()


def test_one_site_asking_often_is_one_site(tmp_path: Path) -> None:
    job, store, now = _job(tmp_path, "masking")
    try:
        for _ in range(20):
            job.round_info(0, 1)
        now[0] += 10 * job.config.deadlines.open
        job.tick()
        assert _status(job, 1) == service_pb2.ROUND_STATUS_RUNNING
        assert job.metrics.round_waiting_gauge._value.get() == 1
    finally:
        store.close()


def test_a_job_whose_rounds_all_aborted_says_so_when_done(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job, store, now = _job(tmp_path, "masking", rounds=2)
    try:
        with caplog.at_level(logging.INFO, logger="secagg.aggregator"):
            while not job.done:
                for site in job.roster:
                    job.round_info(job.current_round - 1, site)
                now[0] += 2 * job.config.deadlines.open
                job.tick()
        done = [r for r in caplog.records if getattr(r, "event", "") == "job_done"]
        assert len(done) == 1
        assert done[0].levelno == logging.WARNING
        assert done[0].getMessage() == "job done: 0 of 2 rounds completed"
        assert job.metrics.job_done_gauge._value.get() == 1
    finally:
        store.close()


def test_a_stage_names_the_sites_it_waited_for_in_vain(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A site killed mid-job was a dropout in the metrics and a count in the log: no line
    named it, and the operator compared message lines to find which hospital to call.
    Each is named (up to DROPOUTS_NAMED; the rest counted)."""
    from aggregator import job as job_module

    monkeypatch.setattr(job_module, "DROPOUTS_NAMED", 3)
    job, store, now = _job(tmp_path, "masking")
    try:
        for site in job.roster:
            job.round_info(0, site)
        with caplog.at_level(logging.INFO, logger="secagg.aggregator"):
            now[0] += 2 * job.config.deadlines.open
            job.tick()
        dropped = [r for r in caplog.records if getattr(r, "event", "") == "site_dropped"]
        assert [getattr(r, "site_id", None) for r in dropped] == [1, 2, 3, None]
        assert getattr(dropped[-1], "count", None) == 2
        assert all(r.levelno == logging.WARNING for r in dropped)
    finally:
        store.close()


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_a_waiting_round_says_so_to_its_sites_until_it_is_under_way(
        tmp_path: Path, protocol: str) -> None:
    """A site that came early gave the round up at its patience while the round still waited
    for the others (its training script ended on RoundAborted). The round's info, and a
    stage's "not yet", say it waits and for how many sites; once under way, neither does."""
    from secagg.ckks import CkksStage
    from secagg.masking import Stage

    job, store, _now = _job(tmp_path, protocol)
    stage = (Stage.ADVERTISE_KEYS if protocol == "masking"
             else CkksStage.KEY_ANNOUNCEMENT).value
    try:
        assert job.active is not None
        least, round_id = job._least_sites, job.active.view.round_id
        info = job.round_info(0, 1)
        assert info is not None and info.HasField("waiting")
        assert (info.waiting.sites_asking, info.waiting.sites_needed) == (1, least)
        answer = job.receive(2, round_id, stage)
        assert not answer.ready and answer.HasField("waiting")
        assert (answer.waiting.sites_asking, answer.waiting.sites_needed) == (2, least)
        for site in range(3, least + 1):
            job.round_info(0, site)
        assert not job.active.waiting
        info = job.round_info(0, 1)
        assert info is not None and not info.HasField("waiting")
        assert not job.receive(2, round_id, stage).HasField("waiting")
    finally:
        store.close()


def _ask_for(job: Job, now: list[float], sites: list[int], seconds: float,
             after_round: int = 0) -> Any:
    """``sites`` ask every 30 s for ``seconds``; the last answer."""
    info = None
    end = now[0] + seconds
    while now[0] < end:
        for site in sites:
            info = job.round_info(after_round, site)
        now[0] += 30.0
    return info


def test_a_ckks_round_waits_for_its_key_holder(tmp_path: Path) -> None:
    """A CKKS round went under way with `min_sites` asking, its key holder among them or
    not: without it, the round aborted at its open deadline (no key announced), and the
    next, its sites all online, went under way at once, so a key holder an hour later than
    the others spent the job's rounds untrained. No CKKS round ends without its key holder:
    with one, every round waits for it, however long, and says so; once it asks, the round
    is under way."""
    job, store, now = _job(tmp_path, "ckks", key_holders=(2,), open_s=600.0)
    try:
        active = job.active
        assert active is not None and active.view.ckks_key_holder == 2
        others = [s for s in range(1, 6) if s != 2]
        assert len(others) >= job._least_sites
        info = _ask_for(job, now, others, 10 * job.config.deadlines.open)
        assert active.waiting and info is not None and info.waiting.waits_for_key_holder
        assert (info.waiting.sites_asking, info.waiting.sites_needed) == (4, job._least_sites)
        job.tick()
        assert _status(job, 1) == service_pb2.ROUND_STATUS_RUNNING
        info = job.round_info(0, 2)
        assert not active.waiting and info is not None and not info.HasField("waiting")
    finally:
        store.close()


def test_a_ckks_round_waits_a_while_for_one_of_its_key_holders(tmp_path: Path) -> None:
    """With several key holders, each holding the rounds in turn, one gone for good would
    stop the job at its first round for ever, where the other holders' rounds can go on: the
    round waits for its holder for one open deadline once as many sites as it needs are
    asking, then goes under way (and ends as before), and the next holder's round runs."""
    job, store, now = _job(tmp_path, "ckks", key_holders=(2, 3), open_s=600.0)
    try:
        active = job.active
        assert active is not None and active.view.ckks_key_holder == 2
        others = [s for s in range(1, 6) if s != 2]
        began = now[0]
        info = _ask_for(job, now, others, job.config.deadlines.open - 30.0)
        assert active.waiting and info is not None and info.waiting.waits_for_key_holder
        _ask_for(job, now, others, 60.0)
        assert not active.waiting
        assert began + job.config.deadlines.open <= now[0] <= began + \
            job.config.deadlines.open + 60.0
        now[0] += 2 * job.config.deadlines.open
        job.tick()
        assert _status(job, 1) == service_pb2.ROUND_STATUS_ABORTED
        assert job.current_round == 2 and job.active is not None
        assert job.active.view.ckks_key_holder == 3
        _ask_for(job, now, others, 30.0, after_round=1)
        assert not job.active.waiting
    finally:
        store.close()


def test_a_masking_round_waits_for_no_key_holder(tmp_path: Path) -> None:
    job, store, _now = _job(tmp_path, "masking")
    try:
        info = job.round_info(0, 2)
        assert info is not None and info.HasField("waiting")
        assert not info.waiting.waits_for_key_holder
    finally:
        store.close()


def test_sites_asking_for_a_later_round_count_as_present(tmp_path: Path) -> None:
    """A site that left a waiting round (after a day said waiting) asks for the round after
    it: a round counting only the sites asking for it waited for good once every site was
    past it, and they for its successor. They count: under way, the round ends (with too few
    answers, aborted), and the next, which they join, opens."""
    job, store, now = _job(tmp_path, "masking")
    try:
        active = job.active
        assert active is not None
        for site in range(1, job._least_sites):
            assert job.round_info(1, site) is None  # (round 2 is not open)
        assert active.waiting
        assert job.round_info(1, job._least_sites) is None
        assert not active.waiting
        now[0] += 2 * job.config.deadlines.open
        job.tick()
        assert _status(job, 1) == service_pb2.ROUND_STATUS_ABORTED and job.current_round == 2
    finally:
        store.close()


@pytest.mark.parametrize("older_store", [False, True], ids=["this", "older"])
def test_a_round_put_under_way_after_a_message_recovers(tmp_path: Path,
                                                        older_store: bool) -> None:
    """The common early-site course: one site's keys counted while the round waits, then the
    others ask and it is under way. A store of the build before the "waits" event held
    [message, under_way]: the message replayed put the round under way, the under_way then
    did not fit, and the round did not recover (a reviewer). Both recover, under way."""
    job, store = _advertised_then_restarted(tmp_path, older_store=older_store,
                                            under_way=True)
    try:
        assert job.active is not None and not job.active.waiting
        assert job.active.answered == {1}
    finally:
        store.close()
