"""The aggregator's background loops: the ticker (which alone closes stages at their
deadlines) must outlive any failure of a tick, and the job the watcher rebuilds from the store
after a failure must keep reporting to the same metrics."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from aggregator.job import Job
from aggregator.metrics import Metrics
from aggregator.service import Core, _ticker, _watch, load_server_files
from aggregator.store import Store
from secagg.federation.kit import ROSTER_FILE, load_roster
from secagg.model import FlatModel
from tests.service_kit import make_federation


class _Flaky:
    def __init__(self) -> None:
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks == 1:
            raise RuntimeError("a failure nobody foresaw")


def _shutdown(core: Core) -> None:
    for pool in (core.executor, core.hashers, core.bulk, core.readers):
        pool.shutdown(wait=True)


def test_the_ticker_outlives_a_tick_that_fails_unexpectedly() -> None:
    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        job = _Flaky()
        core.job, core.healthy = job, True  # type: ignore[assignment]
        task = asyncio.create_task(_ticker(core))
        try:
            await asyncio.sleep(0.5)
            assert job.ticks == 1 and core.healthy is False  # for the watcher to reload
            core.healthy = True  # what the watcher does once the job is reloaded
            await asyncio.sleep(0.5)
            assert not task.done(), "the ticker died: no stage would ever close again"
            assert job.ticks >= 2
        finally:
            task.cancel()
            _shutdown(core)

    asyncio.run(main())


def test_the_job_rebuilt_after_a_failure_keeps_its_metrics(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    metrics = Metrics()

    async def main() -> Any:
        core = Core(asyncio.get_running_loop())
        job = Job(files.config, roster, store, FlatModel.load_npz(files.config.initial_model),
                  metrics=metrics)
        await core.run(job.recover)
        core.job, core.healthy = job, False  # as after a store error
        task = asyncio.create_task(_watch(core, health_aio.HealthServicer()))
        try:
            for _ in range(50):
                await asyncio.sleep(0.1)
                if core.healthy:
                    break
            assert core.healthy and core.job is not job
            return core.job
        finally:
            task.cancel()
            _shutdown(core)

    try:
        fresh = asyncio.run(main())
        assert fresh.metrics is metrics, "the rebuilt job reports to nobody"
    finally:
        store.close()


def test_the_loops_log_a_store_failures_cause_not_its_class_alone() -> None:
    """A full disk was told each second as "stage close failed: StoreError" and "recovery
    failed: StoreError", naming no cause: the ticker's and the recovery's lines give a
    StoreError's own text (ours: never a driver's message), and a raw error's class alone."""
    import logging
    import types

    from aggregator.store import DISK_FULL, StoreError

    told = StoreError(f"storing chunks failed: OperationalError: {DISK_FULL}")
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    class _Full:
        def tick(self) -> None:
            raise told

    def ping(write: bool = False) -> None:
        if write:
            raise told

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        core.job, core.healthy = _Full(), True  # type: ignore[assignment]
        ticker = asyncio.create_task(_ticker(core))
        try:
            await asyncio.sleep(0.5)
        finally:
            ticker.cancel()
        core.job = types.SimpleNamespace(  # type: ignore[assignment]
            store=types.SimpleNamespace(ping=ping))
        watcher = asyncio.create_task(_watch(core, health_aio.HealthServicer()))
        try:
            await asyncio.sleep(1.5)
        finally:
            watcher.cancel()
            _shutdown(core)

    handler = _Keep(level=logging.ERROR)
    logger = logging.getLogger("secagg.aggregator")
    logger.addHandler(handler)
    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
    reasons = {r.__dict__.get("event"): r.__dict__.get("reason") for r in records}
    assert reasons.get("tick_error") == str(told), reasons
    assert reasons.get("recovery_error") == str(told), reasons


def test_a_store_that_hangs_marks_the_job_stale_as_one_that_fails_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A database frozen for 30-40 s (its backends stopped: a hung volume, a VM pause) was
    only NOT_SERVING: no store call failed, so the job was not stale. When it woke, the call
    it had held returned, the tick queued behind it found the stage's deadline passed during
    the hang and closed the stage, and the round aborted with every site's update spent: the
    job was over. A ping that times out now marks the job stale too, so it refuses every
    call (the queued tick included) until the watcher rebuilds it with fresh deadlines."""
    import threading
    import types

    from aggregator import service

    monkeypatch.setattr(service, "PING_TIMEOUT_SECONDS", 0.2)
    woken = threading.Event()

    def hangs(write: bool = False) -> None:
        woken.wait(5)

    job = types.SimpleNamespace(stale=False, store=types.SimpleNamespace(ping=hangs))

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        core.job, core.healthy = job, True  # type: ignore[assignment]
        watcher = asyncio.create_task(_watch(core, health_aio.HealthServicer()))
        try:
            await asyncio.sleep(1.6)
            assert core.healthy is False
        finally:
            watcher.cancel()
            woken.set()
            _shutdown(core)
            core.pinger.shutdown(wait=True)

    records = _kept_records()
    try:
        asyncio.run(main())
    finally:
        records.close()
    assert job.stale is True, "a hung store left the job to close stages on its return"
    # and the health line says why (it said "not serving" alone)
    health = [r.__dict__.get("reason") for r in records if r.__dict__.get("event") == "health"]
    assert health == ["not serving: the store did not answer within 0.2 s"], health


class _Records(list):  # type: ignore[type-arg]
    handler: logging.Handler
    level: int

    def close(self) -> None:
        logger = logging.getLogger("secagg.aggregator")
        logger.removeHandler(self.handler)
        logger.setLevel(self.level)


def _kept_records() -> _Records:
    kept = _Records()

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    kept.handler = _Keep(level=logging.DEBUG)
    logger = logging.getLogger("secagg.aggregator")
    kept.level = logger.level
    logger.addHandler(kept.handler)
    logger.setLevel(logging.DEBUG)
    return kept


def test_a_standby_tries_the_lease_every_two_seconds_and_warns_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A standby's tries of the store's lease backed off to 10 s (it took over up to 10 s
    after the serving aggregator died) and warned "store in use" every 10 s for as long as
    it waited, a normal state. It now tries every STANDBY_RETRY_SECONDS, warns once and
    then tells it at info; an unreachable database still backs off further."""
    from aggregator import service
    from aggregator.store import StoreBusy

    monkeypatch.setattr(service, "STANDBY_RETRY_SECONDS", 0.1)
    tries = [0]

    def busy_three_times() -> str:
        tries[0] += 1
        if tries[0] <= 3:
            raise StoreBusy("another aggregator serves this store")
        return "opened"

    async def main() -> str | None:
        core = Core(asyncio.get_running_loop())
        try:
            return await service._until_the_store_answers(core, busy_three_times,
                                                           asyncio.Event())
        finally:
            _shutdown(core)

    records = _kept_records()
    try:
        assert asyncio.run(main()) == "opened"
    finally:
        records.close()
    busy = [(r.levelno, r.__dict__.get("reason", "").rsplit("; ", 1)[-1]) for r in records
            if r.__dict__.get("event") == "store_busy"]
    assert busy == [(logging.WARNING, "retrying in 1 s"), (logging.INFO, "retrying in 0.1 s"),
                    (logging.INFO, "retrying in 0.1 s")], busy
