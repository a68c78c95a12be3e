"""Adversary: the aggregator, running a second round from a model the sites already sent an
update against, to difference two sums.

It lets round 1 be summed (unmasked, or released by the CKKS key holder), then reports it
aborted (or, under masking, publishes the round's own model as its result: a zero step within
any bound a site can check) and opens round 2 from the same model, leaving one site out. Were
the others to train from that model again, with training that repeats (full-batch, or seeded
apart from the round), sum 1 - sum 2 would be the left-out site's update, exactly; a helper
recovered it to 8e-8 under masking and to the flooding noise under CKKS. Each site sends one
update per model (clients.history): it refuses round 2, naming why, before anything is sent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.service_kit import ROOT, Aggregator, make_federation, run_sites


@pytest.mark.parametrize(("protocol", "mode"), [("masking", "abort"), ("masking", "zero"),
                                                ("masking", "aba"), ("ckks", "abort")])
def test_no_site_sends_a_second_update_against_a_model_it_already_sent_one_against(
        tmp_path: Path, protocol: str, mode: str) -> None:
    rerun = 3 if mode == "aba" else 2  # the round that starts from a model sent against
    fed = make_federation(tmp_path, 3, protocol, rounds=rerun, open_s=6.0)

    agg = Aggregator(fed, tmp_path / "aggregator.db", tmp_path / "aggregator.log",
                     launcher=(str(ROOT / "tests" / "lying_aggregator.py"), mode))
    agg.start()
    try:
        reports = run_sites(fed, tmp_path, timeout=120)
        agg.wait_for(lambda e: e.get("event") == "job_done")
    finally:
        agg.stop()
    counted = [e for e in agg.read() if e.get("round_id", "").endswith(f"round-{rerun}")
               and e.get("event") == "message_counted"]
    for site in range(1, 4):
        err = (tmp_path / f"site-{site}.err").read_text()
        assert "sends one update per model" in err, (site, reports[site], err[-1500:])
        # the rounds before were the site's only ones
        assert [r["round"] for r in reports[site]] == list(range(1, rerun)), reports[site]
    assert counted == [], json.dumps(counted)[:2000]
    assert any(e.get("event") == "round_opened" and e.get("round_id", "").endswith(
        f"round-{rerun}") for e in agg.read()), agg.tail()
