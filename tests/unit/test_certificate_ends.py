"""The aggregator says when its certificates end: an aggregator whose TLS certificate ended
while it ran said nothing (its log, metrics and health unchanged) while every site was
refused by the TLS handshake (an outside operator). At start, and hourly: the ends as a
metric to alert on, a warning within CERTIFICATE_WARN_DAYS, an error once ended."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path

import pytest

from aggregator import service
from aggregator.metrics import Metrics
from tests.service_kit import make_federation


def _said(tmp_path: Path, at: str, caplog: pytest.LogCaptureFixture
          ) -> tuple[list[logging.LogRecord], Metrics, dict[str, dt.datetime]]:
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    files = service.load_server_files(fed.aggregator_config)
    ends = service.certificate_ends(files)
    now = {"long before": ends["server"] - dt.timedelta(days=300),
           "within the warning": ends["server"] - dt.timedelta(days=10),
           "after": ends["server"] + dt.timedelta(minutes=1)}[at]
    metrics = Metrics()

    async def main() -> None:
        task = asyncio.create_task(service._watch_certificates(files, metrics,
                                                               clock=lambda: now))
        await asyncio.sleep(0.05)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="secagg.aggregator"):
        asyncio.run(main())
    return [r for r in caplog.records if getattr(r, "event", "").startswith("certificate")], \
        metrics, ends


def test_the_ends_are_metrics_and_said_at_start(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    records, metrics, ends = _said(tmp_path, "long before", caplog)
    assert {(r.event, r.reason, r.levelno) for r in records} == {  # type: ignore[attr-defined]
        ("certificate", "server", logging.INFO), ("certificate", "ca", logging.INFO)}
    for name in ("server", "ca"):
        assert metrics.certificate_expiry.labels(name)._value.get() == ends[name].timestamp()
    assert ends["server"] <= ends["ca"]


@pytest.mark.parametrize(("at", "event", "level"), [
    pytest.param("within the warning", "certificate_ending", logging.WARNING, id="soon"),
    pytest.param("after", "certificate_expired", logging.ERROR, id="ended")])
def test_a_certificate_ending_soon_is_warned_of_and_one_ended_is_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, at: str, event: str,
        level: int) -> None:
    records, _, _ = _said(tmp_path, at, caplog)
    server = [r for r in records if r.reason == "server"]  # type: ignore[attr-defined]
    assert [(r.event, r.levelno) for r in server] == [(event, level)]  # type: ignore[attr-defined]
    assert "server.crt" in server[0].getMessage()
    assert "restart the aggregator" in server[0].getMessage()
