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


def test_the_training_digest_sees_through_a_re_encoding() -> None:
    """A model re-encoded (its tensors in another order, a float32 tensor declared float64,
    a 0.0 made -0.0) has another digest but trains the same (a state dict is loaded by name,
    cast into the site's own tensors): the rule keys on the training digest, which is the
    same for all of them; another value, name or shape is another model."""
    import numpy as np

    from secagg.model import FlatModel

    w, b = np.array([[0.5, 0.0], [1.5, -2.0]], np.float32), np.array([0.0, 3.0], np.float32)
    a = FlatModel.from_arrays({"w": w, "b": b})
    same = [FlatModel.from_arrays({"b": b, "w": w}),
            FlatModel.from_arrays({"w": w.astype(np.float64), "b": b}),
            FlatModel.from_arrays({"w": w, "b": np.array([-0.0, 3.0], np.float32)})]
    for m in same:
        assert m.digest != a.digest and m.training_digest == a.training_digest
    other = [FlatModel.from_arrays({"w": w + np.float32(2.0**-20), "b": b}),
             FlatModel.from_arrays({"v": w, "b": b}),
             FlatModel.from_arrays({"w": w.reshape(4), "b": b})]
    for m in other:
        assert m.training_digest != a.training_digest


def test_a_round_from_a_re_encoding_of_a_model_sent_against_is_refused(tmp_path: Path) -> None:
    """The site sent an update against A (round 1); the aggregator opens round 2 from A with
    its tensors reordered (another digest, the same training: a helper's bypass under CKKS
    via a new job, and under masking via a round no site was in). Refused, by the training
    digest, before anything is sent."""
    import numpy as np

    from clients.errors import RoundAborted
    from secagg import wire
    from secagg.model import FlatModel
    from secagg.v1 import service_pb2
    from tests.threat_model.test_site_sdk_lying_aggregator import _site

    w, b = np.ones(4, np.float32), np.zeros(2, np.float32)
    a = FlatModel.from_arrays({"w": w, "b": b})
    reordered = FlatModel.from_arrays({"b": b, "w": w})
    blob = wire.Blob((b"\x03" * 32,), len(reordered.to_bytes()))
    info = service_pb2.RoundInfo(round=2, round_id="hospitals/job-1/round-2",
                                 protocol=service_pb2.PROTOCOL_MASKING,
                                 status=service_pb2.ROUND_STATUS_RUNNING,
                                 model=wire.model_to_proto(reordered, blob))
    site, conn = _site("masking", info, {blob.chunk_ids[0]: reordered.to_bytes()},
                       directory=tmp_path)
    site._history.record_sent("job-1", 1, a.training_digest)
    site._model_digest = None  # (whatever it holds: the chain is another check's business)
    with pytest.raises(RoundAborted, match="already sent an update against the model this "
                                           r"round starts from \(job 'job-1', round 1\)"):
        next(site.rounds())
    assert conn.sent == []
