"""A CKKS key holder whose training script restarted after announcing its round's key."""

from __future__ import annotations

import logging

import pytest

from clients.errors import AggregatorRefused
from clients.site import Round
from secagg.v1 import service_pb2
from tests.threat_model.test_site_sdk_lying_aggregator import HOLDER, _model_info, _site


@pytest.mark.parametrize("code", ["FAILED_PRECONDITION", "INVALID_ARGUMENT"])
def test_a_key_holder_whose_key_is_refused_as_already_announced_skips_the_round(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: str) -> None:
    """The key holder announced round 1's key, and its script restarted before it spent the
    round: the secret key went with the old process, and the aggregator refuses a second
    announcement (FAILED_PRECONDITION). The AggregatorRefused escaped rounds(), so the
    script died at every restart until the round's deadline; now the round is skipped with
    a warning and the site waits for the next. Any other refusal is still raised."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, conn = _site("ckks", info, payloads)
    site.site_id = HOLDER
    conn.then_done = True  # type: ignore[attr-defined]

    def refused(self: Round) -> None:
        raise AggregatorRefused(code, "this site already answered this stage")

    monkeypatch.setattr(Round, "_announce_key", refused)
    if code != "FAILED_PRECONDITION":
        with pytest.raises(AggregatorRefused):
            next(site.rounds())
        return
    with caplog.at_level(logging.WARNING, logger="clients"):
        assert list(site.rounds()) == []
    assert "cannot be released" in caplog.text
