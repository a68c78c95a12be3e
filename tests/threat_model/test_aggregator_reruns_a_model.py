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
from typing import Any

import pytest

from clients.errors import AggregatorRefused
from tests.service_kit import ROOT, Aggregator, make_federation, run_sites


@pytest.mark.parametrize(("protocol", "mode"), [("masking", "abort"), ("masking", "zero"),
                                                ("masking", "aba"), ("ckks", "abort"),
                                                ("masking", "nudge")])
def test_no_site_sends_a_second_update_against_a_model_it_already_sent_one_against(
        tmp_path: Path, protocol: str, mode: str) -> None:
    """``nudge``: a float64 model, float32 training scripts, and round 1's model moved below
    float32's precision published as its result: another model to the float64 digest, the
    same numbers to the sites' training. They refuse at submit, where their dtypes are known."""
    rerun = 3 if mode == "aba" else 2  # the round that starts from a model sent against
    nudge = mode == "nudge"
    fed = make_federation(tmp_path, 3, protocol, rounds=rerun, open_s=6.0,
                          float_dtype="float64" if nudge else "float32")

    agg = Aggregator(fed, tmp_path / "aggregator.db", tmp_path / "aggregator.log",
                     launcher=(str(ROOT / "tests" / "lying_aggregator.py"), mode))
    agg.start()
    try:
        reports = run_sites(fed, tmp_path, timeout=120, extra={
            s: ("--train-float32", "0:0") for s in range(1, 4)} if nudge else None)
        agg.wait_for(lambda e: e.get("event") == "job_done")
    finally:
        agg.stop()
    counted = [e for e in agg.read() if e.get("round_id", "").endswith(f"round-{rerun}")
               and e.get("event") == "message_counted"]
    for site in range(1, 4):
        if nudge:  # (refused by submit: a RoundAborted the site script reports)
            assert [r["round"] for r in reports[site]] == [1, 2], reports[site]
            assert "sends one update per model" in reports[site][1].get("reason", ""), (
                reports[site])
            continue
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
    from secagg.model import FlatModel

    w, b = np.ones(4, np.float32), np.zeros(2, np.float32)
    a = FlatModel.from_arrays({"w": w, "b": b})
    reordered = FlatModel.from_arrays({"b": b, "w": w})
    site, conn = _round_two(tmp_path, reordered)
    site._history.record_sent("job-1", 1, a.training_digest)
    with pytest.raises(RoundAborted, match="already sent an update against the model this "
                                           r"round starts from \(job 'job-1', round 1\)"):
        next(site.rounds())
    assert conn.sent == []


def _float64_round(tmp_path: Path, values: object) -> tuple[Any, Any]:
    from secagg.model import FlatModel

    return _round_two(tmp_path, FlatModel.from_arrays({"w": values}))


def _round_two(tmp_path: Path, model: Any) -> tuple[Any, Any]:
    """A site (its history in ``tmp_path``) offered round 2 of job-1, starting from
    ``model``: (site, its scripted connection)."""
    from secagg import wire
    from secagg.v1 import service_pb2
    from tests.threat_model.test_site_sdk_lying_aggregator import _site

    blob = wire.Blob((b"\x03" * 32,), len(model.to_bytes()))
    info = service_pb2.RoundInfo(round=2, round_id="hospitals/job-1/round-2",
                                 protocol=service_pb2.PROTOCOL_MASKING,
                                 status=service_pb2.ROUND_STATUS_RUNNING,
                                 model=wire.model_to_proto(model, blob))
    site, conn = _site("masking", info, {blob.chunk_ids[0]: model.to_bytes()},
                       directory=tmp_path)
    site._model_digest = None  # (whatever it holds: the chain is another check's business)
    return site, conn


def test_a_model_nudged_below_the_sites_precision_is_the_model_it_sent_against(
        tmp_path: Path) -> None:
    """A float64 federation model, trained by a script in float32 (torch's default: the
    state dict is cast into float32 parameters). The site sent an update against M in round
    1; the aggregator publishes M moved by 2**-40 of each value (within any result bound) and
    opens round 2 from it without another site: a new model to the float64 digest, but the
    site's float32 training starts from the same numbers, so with deterministic training the
    two sums differ by the left-out site's update (a helper's rerun). The site refuses at
    submit, where its tensors' dtypes are known, before anything is sent; a site that trains
    in float64 sees another model and takes part."""
    import numpy as np

    from clients.errors import RoundAborted
    from secagg.model import FlatModel

    rng = np.random.default_rng(5)  # test data only
    m = rng.normal(0, 0.1, 16)
    nudged = m * (1 + 2.0**-40)
    first, again = FlatModel.from_arrays({"w": m}), FlatModel.from_arrays({"w": nudged})
    assert first.training_digest != again.training_digest
    trained = {"w": nudged.astype(np.float32) + np.float32(0.01)}

    site, conn = _float64_round(tmp_path, nudged)
    # what round 1's submit recorded for a float32 site: both digests of M
    site._history.record_sent("job-1", 1, first.training_digest,
                              first.training_digest_as({"w": "float32"}))
    rnd = next(site.rounds())
    with pytest.raises(RoundAborted, match="already sent an update against the model this "
                                           r"round starts from \(as this site's tensors"):
        rnd.submit(trained, weight=1)
    assert conn.sent == []
    assert site._history.last_round("job-1") == 0  # not spent: nothing of it left

    # a float64 script trains from other numbers: the round is its to take part in
    (tmp_path / "f64").mkdir()
    site64, conn64 = _float64_round(tmp_path / "f64", nudged)
    site64._history.record_sent("job-1", 1, first.training_digest,
                                first.training_digest_as({"w": "float64"}))
    rnd64 = next(site64.rounds())
    # (the scripted aggregator refuses the first message the site sends: it went on)
    with pytest.raises(AggregatorRefused, match="the test's aggregator stops here"):
        rnd64.submit({"w": nudged + 0.01}, weight=1)
    assert conn64.sent  # its advertisement left: the round is its to take part in


def test_a_model_that_differs_only_in_a_counter_is_the_model_sent_against(
        tmp_path: Path) -> None:
    """A made-up result moving only an integer buffer training does not read (BatchNorm's
    ``num_batches_tracked`` + 1) had every site's next update bit for bit the same (a
    second-round helper's rerun). Integer tensors count by name and shape only: the round
    is refused before anything is sent. (An honest round moves the float values too.)"""
    import numpy as np

    from clients.errors import RoundAborted
    from secagg.model import FlatModel

    w = np.linspace(-1, 1, 8).astype(np.float32)
    a = FlatModel.from_arrays({"w": w, "n": np.array(5, np.int64)})
    bumped = FlatModel.from_arrays({"w": w, "n": np.array(6, np.int64)})
    assert a.training_digest == bumped.training_digest
    assert FlatModel.from_arrays({"w": w + 1, "n": np.array(5, np.int64)}
                                 ).training_digest != a.training_digest
    site, conn = _round_two(tmp_path, bumped)
    site._history.record_sent("job-1", 1, a.training_digest)
    with pytest.raises(RoundAborted, match="already sent an update against"):
        next(site.rounds())
    assert conn.sent == []


@pytest.mark.parametrize("how", ["bfloat16-state-dict", "autocast"])
def test_a_model_nudged_below_a_16_bit_training_precision_is_the_model_sent_against(
        tmp_path: Path, how: str) -> None:
    """A site that trains in bfloat16 (its state dict bfloat16; or float32 weights read in
    bfloat16 under autocast, which it says with ``training_dtype``) reads a float32 model
    moved below bfloat16's precision as the same numbers: refused at submit. Without the
    knob, the float32 state dict is all the SDK knows: another model to it."""
    import numpy as np
    import torch

    from clients.errors import RoundAborted
    from secagg.model import FlatModel

    m = np.array([0.5, 0.25, -1.0, 0.125] * 4, np.float32)  # exact in bfloat16
    nudged = (m * np.float32(1 + 2.0**-12)).astype(np.float32)  # below bfloat16's 2**-8
    first = FlatModel.from_arrays({"w": m})
    assert FlatModel.from_arrays({"w": nudged}).training_digest != first.training_digest

    site, conn = _float64_round(tmp_path, nudged)
    site._history.record_sent("job-1", 1, first.training_digest,
                              first.training_digest_as({"w": "bfloat16"}))
    rnd = next(site.rounds())
    if how == "autocast":
        site.training_dtype = "bfloat16"
        state: dict[str, object] = {"w": nudged + np.float32(0.01)}
    else:
        state = {"w": torch.from_numpy(nudged + np.float32(0.01)).to(torch.bfloat16)}
    with pytest.raises(RoundAborted, match="as this site's tensors hold it"):
        rnd.submit(state, weight=1)
    assert conn.sent == []

    (tmp_path / "f32").mkdir()
    site32, conn32 = _float64_round(tmp_path / "f32", nudged)
    site32._history.record_sent("job-1", 1, first.training_digest,
                                first.training_digest_as({"w": "float32"}))
    with pytest.raises(AggregatorRefused, match="the test's aggregator stops here"):
        next(site32.rounds()).submit({"w": nudged + np.float32(0.01)}, weight=1)
    assert conn32.sent


def test_training_dtype_is_a_float_precision() -> None:
    from clients.site import Site
    from secagg.errors import ConfigurationError
    from tests.threat_model.test_site_sdk_lying_aggregator import _site

    site, conn = _site("masking", None, {})
    for bad in ("int8", "float128", 16, "bf16"):
        with pytest.raises(ConfigurationError, match="training_dtype must be one of"):
            Site(site.kit, conn, training_dtype=bad)  # type: ignore[arg-type]


def test_a_model_of_integers_alone_counts_by_its_values_and_old_records_still_hold(
        tmp_path: Path) -> None:
    """Leaving integer tensors out of the training digest made every round of a model of
    integers and bools alone (counts, masks: federated analytics) the same model, refused
    from round 2; such a model counts by its values. And a model a site sent against
    before the upgrade, recorded by the digest with its counters' values, is still the same
    model: that digest is checked too (an auditor's findings)."""
    import numpy as np

    from clients.errors import RoundAborted
    from secagg.model import FlatModel

    counts = FlatModel.from_arrays({"c": np.array([1, 2, 3]), "m": np.array([True, False])})
    later = FlatModel.from_arrays({"c": np.array([5, 9, 3]), "m": np.array([True, True])})
    assert counts.training_digest != later.training_digest

    a = FlatModel.from_arrays({"w": np.ones(8, np.float32), "n": np.array(5, np.int64)})
    assert a.legacy_training_digest != a.training_digest
    site, conn = _round_two(tmp_path, a)
    site._history.record_sent("job-1", 1, a.legacy_training_digest)  # (an older SDK's record)
    with pytest.raises(RoundAborted, match="already sent an update against"):
        next(site.rounds())
    assert conn.sent == []
