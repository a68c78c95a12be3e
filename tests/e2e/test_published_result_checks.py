"""What sites check of a published result, with real processes on loopback (the sites' side
against a lying aggregator, case by case: tests/threat_model/test_site_sdk_lying_aggregator.py).

CKKS: the result is signed by the round's key holder; the aggregator takes a release only
with the key holder's signature of the model it makes, and publishes that signature beside
the result, also after a restart, for every site to check with the roster alone.
Masking: a site whose input is in the sum takes no result further from the round's model
than the server learning rate times clip_norm (give or take the quantiser)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from clients.history import History
from clients.transport import Connection
from secagg import wire
from secagg.federation.kit import CONFIG_FILE, SiteKit, sign_settings
from secagg.v1 import service_pb2
from tests.service_kit import make_federation, run_sites, start_aggregator


def test_the_key_holders_result_signature_is_published_and_survives_a_restart(
        tmp_path: Path) -> None:
    """A round completes; the aggregator is stopped and started again on its store; the
    round's result, as any site then reads it, carries the key holder's signatures of
    (round, its model, its result) and of its sites, which verify against the roster."""
    fed = make_federation(tmp_path, 4, "ckks", rounds=1, key_holders=(2,))
    agg = start_aggregator(fed, tmp_path)
    try:
        reports = run_sites(fed, tmp_path)
        assert agg.stop() == 0
        agg.start()  # the job is over; its rounds come from the store
        kit = SiteKit.load(fed.site_dir(1))
        conn = Connection(kit, retry_seconds=30)
        try:
            info = conn.call("GetRound", service_pb2.GetRoundRequest(after_round=0, wait_ms=0))
        finally:
            conn.close()
    finally:
        agg.stop()
    assert all(len(rep) == 1 and "model" in rep[0] for rep in reports.values()), reports
    assert info.status == service_pb2.ROUND_STATUS_COMPLETED
    assert np.array_equal(reports[1][0]["model"], reports[3][0]["model"])
    wire.verify_result(kit.roster[2], bytes(info.result_signature), round_id=info.round_id,
                       model_digest=bytes(info.model.digest),
                       result_digest=bytes(info.result.digest))
    # the key holder signs the sites too: every site, key holder or not, reports those four
    wire.verify_sites(kit.roster[2], bytes(info.sites_signature), round_id=info.round_id,
                      result_digest=bytes(info.result.digest), sites=list(info.survivors))
    assert sorted(info.survivors) == [1, 2, 3, 4]
    assert all(rep[0]["survivors"] == [1, 2, 3, 4] for rep in reports.values()), reports


def test_a_release_that_does_not_sign_the_aggregators_result_is_refused(
        tmp_path: Path) -> None:
    """The key holder's config has another [job] server_learning_rate than the aggregator's:
    the result it signs is not the one the aggregator would publish. The release is refused
    (INVALID_ARGUMENT, naming the learning rate), nothing is published, and the round aborts
    for every site."""
    fed = make_federation(tmp_path, 4, "ckks", rounds=1, key_holders=(1,), release_s=5.0)
    _set_learning_rate(fed.site_dir(1) / CONFIG_FILE, 0.5)
    sign_settings(fed.directory, fed.site_dir(1) / CONFIG_FILE)  # (the operator's doing)
    agg = start_aggregator(fed, tmp_path)
    try:
        reports = run_sites(fed, tmp_path)
    finally:
        agg.stop()
    (holder,) = reports[1]
    assert holder.get("error") == "AggregatorRefused", holder
    assert "INVALID_ARGUMENT" in holder["reason"] and "server_learning_rate" in holder["reason"]
    for s in (2, 3, 4):
        (report,) = reports[s]
        assert report.get("error") == "RoundAborted", report
    assert not any(e.get("event") == "round_completed" for e in agg.read())


def _set_learning_rate(config: Path, value: float) -> None:
    text = config.read_text()
    changed = re.sub(r"(?m)^server_learning_rate = .*$", f"server_learning_rate = {value}",
                     text)
    assert changed != text
    config.write_text(changed)


def test_masking_sites_refuse_a_result_moved_further_than_clipped_updates_can(
        tmp_path: Path) -> None:
    """The aggregator applies the round's average four times over (its [job]
    server_learning_rate is 4; the sites' is 1): the published model is 4 x the average away,
    which the sites' updates (each clipped to 1, in different directions, averaged to about
    0.55) cannot make with their rate. Every site refuses the result (ModelMismatch, naming the
    learning rate) and holds none."""
    fed = make_federation(tmp_path, 4, "masking", rounds=1)
    _set_learning_rate(fed.aggregator_config, 4.0)
    sign_settings(fed.directory, fed.aggregator_config)  # (its own settings, signed)
    agg = start_aggregator(fed, tmp_path)
    try:
        reports = run_sites(fed, tmp_path)
    finally:
        agg.stop()
    assert any(e.get("event") == "round_completed" for e in agg.read())
    bounds = set()
    for s in (1, 2, 3, 4):
        (report,) = reports[s]
        assert report.get("error") == "ModelMismatch", report
        assert "server_learning_rate" in report["reason"]
        # each site recorded the bound it held round 1's result to
        bound = History(fed.site_dir(s)).in_sum(SiteKit.load(fed.site_dir(s)).config.job_id, 1)
        assert bound is not None and bound[0] > 0
        bounds.add(tuple(bound))
    # the same bound at every site, whatever its weight (100 to 400 samples here): one built
    # from a site's weight made its accept or refusal of a result an oracle on its sample
    # count, for an aggregator publishing steps between two weights' limits
    assert len(bounds) == 1, bounds


def test_a_site_told_it_dropped_out_after_its_input_was_summed_still_bounds_the_result(
        tmp_path: Path) -> None:
    """The aggregator never asks site 3 to unmask round 1 and tells it it dropped out, after
    the survivor list every site signed named it: the other sites' shares unmask its input
    all the same, so it is in the sum. The site had recorded no bound (it recorded one only
    once it had unmasked), so when the aggregator published a made-up result (every learned
    value +7: L2 127 against a bound of 1.01) it took it as a missed round's and trained
    from it. Every completed masking round a site did not see end is now held to the public
    bound in the chain: every site, site 3 too, refuses the result and trains from nothing
    of the aggregator's making."""
    from tests.service_kit import ROOT, Aggregator

    # (4 sites: with 3, the unmask quorum is all three, and cutting site 3 off aborts)
    fed = make_federation(tmp_path, 4, "masking", rounds=2, open_s=8.0, stage_s=3.0)
    agg = Aggregator(fed, tmp_path / "aggregator.db", tmp_path / "aggregator.log",
                     launcher=(str(ROOT / "tests" / "lying_aggregator.py"), "cutoff"))
    agg.start()
    try:
        reports = run_sites(fed, tmp_path, timeout=150)
        agg.wait_for(lambda e: e.get("event") == "job_done", timeout=60)
    finally:
        agg.stop()
    counted = [e for e in agg.read() if e.get("round_id", "").endswith("round-2")
               and e.get("event") == "message_counted"]
    assert counted == [], counted  # no site took round 2, which starts from the made-up model
    err = (tmp_path / "site-3.err").read_text()
    assert "further than the average of clipped updates" in err, (reports[3], err[-1500:])
