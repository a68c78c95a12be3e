"""The service with real processes on loopback: the aggregator and every site are separate
processes talking gRPC over mTLS; the aggregator is killed with SIGKILL and restarted on the
same store; sites drop out at every stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from aggregator.store import normalize_url
from secagg.masking import Stage
from secagg.model import FlatModel
from tests.service_kit import (
    fedavg,
    make_federation,
    read_reports,
    run_sites,
    start_aggregator,
    start_site,
)


def _initial(fed_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fed_dir / "model.npz") as z:
        return {k: z[k] for k in z.files}


def _check_job(reports: dict[int, list[dict]], initial: dict[str, np.ndarray], rounds: int,
               clip: float, max_samples: float, tolerance: float) -> None:
    model = initial
    for r in range(1, rounds + 1):
        results = [next(x for x in rep if x["round"] == r) for rep in reports.values()
                   if any(x["round"] == r and "model" in x for x in rep)]
        assert results, f"no site saw round {r} complete"
        survivors = results[0]["survivors"]
        got = np.array(results[0]["model"])
        for other in results[1:]:  # every site got the same model
            np.testing.assert_array_equal(np.array(other["model"]), got)
        expected = fedavg(model, reports, r, survivors, clip, max_samples)
        assert float(np.max(np.abs(got - expected))) < tolerance, r
        model = FlatModel(FlatModel.from_arrays(model).spec, got).to_arrays()


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_three_round_job_with_five_site_processes(tmp_path: Path, protocol: str) -> None:
    fed = make_federation(tmp_path, 5, protocol, rounds=3, key_holders=(1, 2))
    agg = start_aggregator(fed, tmp_path)
    try:
        reports = run_sites(fed, tmp_path)
    finally:
        assert agg.stop() == 0  # graceful shutdown on SIGTERM
    assert all(len([x for x in rep if "model" in x]) == 3 for rep in reports.values())
    # masking: quantisation error; CKKS: flooding noise of the release
    tolerance = 1e-6 if protocol == "masking" else 5e-4
    _check_job(reports, _initial(fed.directory), 3, 1.0, 500.0, tolerance)
    assert all(x["survivors"] == [1, 2, 3, 4, 5] for rep in reports.values() for x in rep)
    # the average comes back as the state was given (numpy arrays), torch installed or not
    assert all(x["result_types"] == ["numpy"] for rep in reports.values() for x in rep)


def test_a_site_dropping_at_each_stage_leaves_each_round_complete(tmp_path: Path) -> None:
    stages = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT,
              Stage.CONSISTENCY_CHECK, Stage.UNMASK]
    fed = make_federation(tmp_path, 5, "masking", rounds=len(stages), open_s=12.0,
                          stage_s=3.0)
    agg = start_aggregator(fed, tmp_path)
    drops = [arg for r, stage in enumerate(stages, 1) for arg in ("--drop", f"{r}:{stage.name}")]
    try:
        reports = run_sites(fed, tmp_path, extra={5: drops})
    finally:
        agg.stop()
    for r, stage in enumerate(stages, 1):
        done = [x for rep in reports.values() for x in rep if x["round"] == r and "model" in x]
        assert done, f"round {r} did not complete with site 5 dropping at {stage.name}"
        survivors = done[0]["survivors"]
        # a site that dropped after its masked input was summed is still in the sum
        assert (5 in survivors) == (stage.value > Stage.MASKED_INPUT.value), (stage, survivors)
    dropped = [x for x in reports[5] if "error" in x]
    assert len(dropped) == len(stages)


def test_ckks_site_and_key_holder_dropping(tmp_path: Path) -> None:
    """A non-holder drops at upload: the round completes without it. The next round's key
    holder dies before announcing: that round aborts, and the job goes on."""
    fed = make_federation(tmp_path, 4, "ckks", rounds=3, key_holders=(1, 2), stage_s=3.0,
                          open_s=15.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        reports = run_sites(fed, tmp_path, extra={4: ("--drop", "1:UPLOAD"),
                                                  2: ("--die", "2:KEY_ANNOUNCEMENT")})
    finally:
        agg.stop()
    first = next(x for x in reports[1] if x["round"] == 1)
    assert first["survivors"] == [1, 2, 3]
    second = next(x for x in reports[1] if x["round"] == 2)
    assert "error" in second and second["error"] == "RoundAborted"
    third = next(x for x in reports[1] if x["round"] == 3)
    assert third["survivors"] == [1, 3, 4]  # the key holder of round 3 is site 1 again


@pytest.mark.parametrize("dies", ["TRAINING", "UPLOAD", "RELEASE"])
def test_a_ckks_key_holder_whose_script_restarts_mid_round_releases_it(
        tmp_path: Path, dies: str) -> None:
    """The key holder's training script dies in round 1 (while training, after announcing
    its key; as its update goes out; as its release goes out) and is started again. It kept
    the round's key (0600, beside its history): the round completes, released by it, and
    the job goes on with every site. (Its secret key went with the process before: the
    round aborted, and every site that had sent against its model could go no further.)"""
    fed = make_federation(tmp_path, 4, "ckks", rounds=2, key_holders=(1,), stage_s=6.0,
                          open_s=20.0, release_s=30.0)
    agg = start_aggregator(fed, tmp_path)
    procs = []
    try:
        first = start_site(fed, 1, tmp_path / "site-1-first.jsonl", "--die", f"1:{dies}")
        others = [start_site(fed, s, tmp_path / f"site-{s}.jsonl") for s in (2, 3, 4)]
        procs += [first, *others]
        assert first.wait(timeout=120) == 0
        (kept_file,) = fed.site_dir(1).glob("ckks-round-key-*.json")
        kept = json.loads(kept_file.read_text())
        assert kept["round_id"].endswith("round-1")
        assert kept_file.stat().st_mode & 0o077 == 0
        # the aggregate it released is kept with the key before the release leaves
        assert list(kept["releases"]) == ([kept["round_id"]] if dies == "RELEASE" else [])
        again = start_site(fed, 1, tmp_path / "site-1.jsonl")
        procs.append(again)
        for p in (*others, again):
            assert p.wait(timeout=180) == 0, (tmp_path / "site-1.err").read_text()[-3000:]
    finally:
        for p in procs:  # (a failed run left them waiting for rounds, into the next tests)
            p.kill()
        agg.stop()
    reports = {s: read_reports(tmp_path / f"site-{s}.jsonl") for s in (1, 2, 3, 4)}
    one = [next(x for x in reports[s] if x["round"] == 1) for s in (2, 3, 4)]
    assert all("model" in x for x in one), one
    # the key holder's own update is in round 1 unless it died as the update went out (the
    # restarted script trains round 1 again if it died before that)
    assert (1 in one[0]["survivors"]) == (dies != "UPLOAD"), one[0]["survivors"]
    two = [next(x for x in reports[s] if x["round"] == 2) for s in (1, 2, 3, 4)]
    assert all("model" in x for x in two), two
    assert all(x["model"] == two[0]["model"] for x in two)
    assert 1 in two[0]["survivors"]
    assert list(fed.site_dir(1).glob("ckks-round-key-*")) == []


def test_kill9_during_uploads_and_during_unmasking_then_restart_gives_the_same_result(
        tmp_path: Path, store_url: str) -> None:
    """On each store (SQLite file, PostgreSQL database): the same result after two kills."""
    fed = make_federation(tmp_path, 4, "masking", rounds=1, shapes={"w": (300, 100)},
                          open_s=30.0, stage_s=30.0)
    agg = start_aggregator(fed, tmp_path, store_url)
    # site 4 is slow to upload and to unmask, so the kills land mid-stage
    procs = {s: start_site(fed, s, tmp_path / f"site-{s}.jsonl",
                           *(("--slow", "1:MASKED_INPUT", "--slow", "1:UNMASK") if s == 4 else ()))
             for s in range(1, 5)}
    try:
        agg.wait_for(lambda e: e.get("event") == "message_counted" and e.get("stage") == 3)
        agg.kill9()  # some masked inputs are counted, others are on their way
        agg.start()
        agg.wait_for(lambda e: e.get("event") == "message_counted" and e.get("stage") == 5)
        agg.kill9()  # some sites have revealed their shares
        agg.start()
        for p in procs.values():
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs.values():
            p.kill()
        agg.stop()
    reports = {s: read_reports(tmp_path / f"site-{s}.jsonl") for s in procs}
    _check_job(reports, _initial(fed.directory), 1, 1.0, 400.0, 1e-6)
    assert sum(e.get("event") == "round_recovered" for e in agg.read()) == 2
    # nothing counted twice: the released weight sum is the survivors' weights
    engine = sa.create_engine(normalize_url(store_url))
    try:
        with engine.connect() as db:
            ((weight_sum, sites),) = db.exec_driver_sql(
                "SELECT weight_sum, sites FROM releases").fetchall()
            assert db.exec_driver_sql(
                "SELECT COUNT(*) FROM events WHERE kind='message'").scalar() == 20
    finally:
        engine.dispose()
    assert sites == "[1, 2, 3, 4]"
    assert abs(weight_sum - sum(100 * s for s in range(1, 5)) / 400.0) < 1e-6


def test_a_site_whose_script_restarts_checks_the_next_model_against_the_one_it_held(
        tmp_path: Path) -> None:
    """Site 4's training script dies in round 1 once its masked input is counted and is
    started again only after round 2 is over. The model it held is in its directory's
    history, so the restarted site checks round 3's model against it: rounds 1 and 2 lead
    from it to round 3's, it takes part, and it ends with the model every other site has.
    (Without the record a restarted site would take any model; the lying-aggregator tests
    show it refusing one that does not follow.)"""
    fed = make_federation(tmp_path, 4, "masking", rounds=3, open_s=10.0, stage_s=3.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        first = start_site(fed, 4, tmp_path / "site-4-first.jsonl", "--die", "1:UNMASK")
        others = [start_site(fed, s, tmp_path / f"site-{s}.jsonl") for s in (1, 2, 3)]
        first.wait(timeout=120)
        agg.wait_for(lambda e: e.get("event") == "round_completed", count=2, timeout=120)
        again = start_site(fed, 4, tmp_path / "site-4.jsonl")
        for p in (*others, again):
            p.wait(timeout=180)
    finally:
        agg.stop()
    reports = {s: read_reports(tmp_path / f"site-{s}.jsonl") for s in (1, 2, 3, 4)}
    assert [x["round"] for x in reports[4]] == [3], (tmp_path / "site-4.err").read_text()
    assert "model" in reports[4][0] and 4 in reports[4][0]["survivors"]
    third = next(x for x in reports[1] if x["round"] == 3)
    assert reports[4][0]["model"] == third["model"]
    assert 4 in next(x for x in reports[1] if x["round"] == 1)["survivors"]
