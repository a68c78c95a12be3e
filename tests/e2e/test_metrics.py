"""Prometheus metrics, scraped from a real aggregator process during and after a job, checked
against what happened in it."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service_kit import Aggregator, make_federation, run_sites, start_aggregator


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _metrics_port(agg: Aggregator) -> int:
    agg.wait_for(lambda e: e.get("event") == "metrics_listening")
    event = next(e for e in agg.read() + agg.lines if e.get("event") == "metrics_listening")
    return int(event["peer"].rsplit(" -> ", 1)[1])


def _value(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_during_and_after_a_job_match_what_happened(tmp_path: Path) -> None:
    """Two masking rounds of 5 sites; site 5 stops answering at SHARE_KEYS in round 1 (one
    dropout at stage 2); one request refused. Scraped mid-round and at the end."""
    from clients.errors import AggregatorRefused
    from clients.transport import Connection
    from secagg.federation.kit import SiteKit
    from secagg.v1 import service_pb2

    fed = make_federation(tmp_path, 5, "masking", rounds=2, stage_s=3.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        port = _metrics_port(agg)
        during = _scrape(port)
        assert _value(during, "secagg_current_round") == 1
        assert _value(during, "secagg_current_stage") == 1
        assert _value(during, "secagg_rounds_started_total", protocol="masking") == 1
        conn = Connection(SiteKit.load(fed.site_dir(1)), retry_seconds=5)
        with pytest.raises(AggregatorRefused):  # a chunk id that is not 32 bytes
            conn.call("MissingChunks", service_pb2.ChunkIds(chunk_ids=[b"short"]))
        conn.close()
        reports = run_sites(fed, tmp_path, extra={5: ("--drop", "1:SHARE_KEYS")})
        after = _scrape(port)
    finally:
        agg.stop()
    assert _value(after, "secagg_rounds_started_total", protocol="masking") == 2
    assert _value(after, "secagg_rounds_completed_total", protocol="masking") == 2
    assert not any(name == "secagg_rounds_aborted_total" for name, _ in after)
    assert _value(after, "secagg_dropouts_total", protocol="masking", stage="2") == 1
    # honest sites (one call at a time) never outrun their work budget
    assert _value(after, "secagg_calls_paced_total") == 0
    assert sum(v for (name, _), v in after.items() if name == "secagg_dropouts_total") == 1
    assert _value(after, "secagg_refused_total", code="INVALID_ARGUMENT") == 1
    # every stage of both rounds closed once: 5 stages x 2 rounds
    for stage in "12345":
        assert _value(after, "secagg_stage_duration_seconds_count", protocol="masking",
                      stage=stage) == 2
    assert _value(after, "secagg_current_round") == 0  # the job is done
    # (the last stage's close, counted after the round ended, set it to masking's "stage 6")
    assert _value(after, "secagg_current_stage") == 0
    # round 2: every site counted at every stage
    assert _value(after, "secagg_round_sites", stage="3") == 5
    # bytes: at least every survivor's masked input, at most what the sites sent in all
    sent = sum(max(r["bytes_sent"] for r in rep if "bytes_sent" in r) for rep in reports.values())
    masked_inputs = (4 + 5) * 329 * 4  # survivors over 2 rounds x values x 32-bit words
    received = _value(after, "secagg_bytes_received_total")
    assert masked_inputs <= received <= sent
    assert _value(after, "secagg_bytes_sent_total") > 0  # models, to every site
    assert _value(after, "secagg_store_latency_seconds_count", operation="insert") > 0


def test_a_site_flooding_large_requests_is_paced_not_refused(tmp_path: Path) -> None:
    """A site sending 1 MiB messages to no round, as fast as it can (within its concurrent
    calls), made the aggregator's one job thread serialise each before refusing it, and
    every honest round slowed. Each site's calls are paced by the work they ask for: past
    its burst, the flood waits (counted), and each call still gets its own answer."""
    from clients.errors import AggregatorRefused
    from clients.transport import Connection
    from secagg.federation.kit import SiteKit
    from secagg.v1 import service_pb2

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = start_aggregator(fed, tmp_path)
    try:
        port = _metrics_port(agg)
        conn = Connection(SiteKit.load(fed.site_dir(1)), retry_seconds=30)
        # (200 KB each, within what a stage message of this federation may hold: longer
        # ones are refused unparsed, RESOURCE_EXHAUSTED; 51 units each, past the burst of 256
        # from the sixth on)
        padding = service_pb2.SubmitRequest(round_id="no-such-round" + "x" * (200 << 10))
        for _ in range(8):
            with pytest.raises(AggregatorRefused) as refused:
                conn.call("Submit", padding, timeout=30)
            assert refused.value.code == "INVALID_ARGUMENT"  # (its own answer, not a pacing one)
        conn.close()
        paced = _value(_scrape(port), "secagg_calls_paced_total")
    finally:
        agg.stop()
    assert paced >= 2
