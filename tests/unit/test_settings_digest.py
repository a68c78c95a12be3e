"""A site whose federation.toml differs from the aggregator's in a shared setting says so."""

from __future__ import annotations

import dataclasses

import pytest

from clients.errors import RoundAborted
from tests.threat_model.test_site_sdk_lying_aggregator import _model_info, _site


@pytest.mark.parametrize(("setting", "value"), [
    ("max_samples", 3000.0),  # the site weighed itself wrongly, silently
    ("clip_norm", 5.0),  # seen as "refused: invalid signature"
    ("job_id", "job-2"), ("word_bits", 64), ("preset", "add-only-8192"),
])
def test_a_site_whose_shared_settings_differ_from_the_aggregators_names_its_config(
        setting: str, value: object) -> None:
    """Each party reads these from its own copy of the config: a hospital engineer who
    edited max_samples (as the weight's error message invites) weighed its site wrongly in
    every average, silently; another clip_norm showed only as a refused signature. The
    aggregator publishes its settings' digest with every round, and a site whose own differs
    refuses the round naming its federation.toml, before anything is fetched or sent. The
    same settings, or an aggregator that publishes none, join as before."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, conn = _site("masking", info, payloads)
    other = dataclasses.replace(site.config, **{setting: value})
    assert other.settings_digest() != site.config.settings_digest()
    info.settings_digest = other.settings_digest()
    with pytest.raises(RoundAborted, match=r"federation\.toml differs from the aggregator's"):
        next(site.rounds())
    assert conn.fetched == [] and conn.sent == []
    for published in (site.config.settings_digest(), b""):
        info.settings_digest = published
        site, conn = _site("masking", info, payloads)
        assert next(site.rounds()).number == 1


def test_deadlines_limits_and_addresses_are_each_partys_own() -> None:
    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, _ = _site("masking", info, payloads)
    mine = site.config
    theirs = dataclasses.replace(
        mine, aggregator="0.0.0.0:50051", rounds=mine.rounds + 1,
        deadlines=dataclasses.replace(mine.deadlines, open=mine.deadlines.open + 1),
        limits=dataclasses.replace(mine.limits, max_sites=mine.limits.max_sites + 1))
    assert theirs.settings_digest() == mine.settings_digest()
