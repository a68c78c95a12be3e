"""The per-site upload budget (Job.upload_limit, charged by UploadBudget: each chunk its bytes
and CHUNK_STORAGE_COST) holds what an honest site sends, sent twice (once more after the
aggregator lost chunks), for every preset and protocol up to [limits] max_vector_length; and
not much more."""

from __future__ import annotations

import types
from typing import Any

import pytest

from aggregator.job import CHUNK_STORAGE_COST, Job
from secagg.ckks import KeyHolder, _seal
from secagg.ckks.keys import public_context_length
from secagg.ckks.presets import PRESETS
from secagg.federation.config import SDK_CHUNK_BYTES, Limits


def _charged(nbytes: int) -> int:
    """What the service charges for an upload of ``nbytes`` in the SDK's chunks."""
    chunks = max(1, -(-nbytes // SDK_CHUNK_BYTES))
    return nbytes + chunks * CHUNK_STORAGE_COST


def _limit(protocol: str, size: int, *, preset: str = "add-only-4096", word_bits: int = 32,
           holder: bool = False) -> int:
    view = types.SimpleNamespace(model=types.SimpleNamespace(size=size), protocol=protocol,
                                 ckks_key_holder=1 if holder else 2)
    job = types.SimpleNamespace(active=types.SimpleNamespace(view=view),
                                config=types.SimpleNamespace(preset=preset, word_bits=word_bits))
    return Job.upload_limit(job, 1)  # type: ignore[arg-type]


SIZES = [1, 1000, 1_000_000, 17_000_000, Limits().max_vector_length]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("holder", [False, True])
def test_an_honest_ckks_upload_fits_twice(preset: str, size: int, holder: bool) -> None:
    context = KeyHolder.generate(preset).public_context()
    slots = PRESETS[preset].slots
    ciphertexts = -(-(size + 1) // slots) * _seal.encoded_length(context.seal_context,
                                                                 _seal.Kind.FULL)
    sent = [ciphertexts]
    if holder:
        sent += [public_context_length(preset), 8 * size]
    honest = sum(_charged(n) for n in sent)
    limit = _limit("ckks", size, preset=preset, holder=holder)
    assert 2 * honest <= limit <= 2 * honest + (17 << 20)


@pytest.mark.parametrize("word_bits", [32, 64])
@pytest.mark.parametrize("size", SIZES)
def test_an_honest_masked_input_fits_twice(size: int, word_bits: int) -> None:
    honest = _charged((size + 1) * word_bits // 8)
    limit = _limit("masking", size, word_bits=word_bits)
    assert 2 * honest <= limit <= 2 * honest + (17 << 20)


def _stored_job(tmp_path: Any) -> tuple[Any, Any]:
    """(a maker of a masking job recovered from one store, the store)."""
    from aggregator.service import load_server_files
    from aggregator.store import Store
    from secagg.federation.kit import ROSTER_FILE, load_roster
    from secagg.model import FlatModel
    from tests.service_kit import make_federation

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    model = FlatModel.load_npz(files.config.initial_model)

    def job() -> Job:
        j = Job(files.config, roster, store, model)
        j.recover()
        return j

    return job, store


def _upload(budget: Any, job: Job, store: Any, nbytes: int) -> bool:
    """Site 1 uploads ``nbytes`` in the SDK's chunks, charged as the service charges them;
    whether the budget took every chunk."""
    import os

    from aggregator.store import chunk_id

    for start in range(0, nbytes, SDK_CHUNK_BYTES):
        data = os.urandom(min(SDK_CHUNK_BYTES, nbytes - start))
        if not budget.charge(job, 1, job.current_round, len(data) + CHUNK_STORAGE_COST):
            return False
        store.put_chunks([(chunk_id(data), data)], round_number=job.current_round, site=1)
    return True


def test_chunks_a_store_lost_are_not_charged_twice(tmp_path: Any) -> None:
    """The database loses the site's acknowledged chunks twice in one round (crashes before
    unsynced commits): the job reloads from the store each time and the site sends them again.
    Its budget counts what the store holds, so the third upload fits (charged three times, an
    honest site was refused RESOURCE_EXHAUSTED and dropped)."""

    from aggregator.service import UploadBudget
    from aggregator.store import chunks

    job, store = _stored_job(tmp_path)
    try:
        budget = UploadBudget()
        current = job()
        payload = int(current.upload_limit(1) * 0.4)
        for _ in range(3):
            assert _upload(budget, current, store, payload)
            with store.engine.begin() as c:  # lost before it reached the disk
                c.execute(chunks.delete().where(chunks.c.site == 1))
            current = job()  # what the service's watcher does once the store answers again
    finally:
        store.close()


def test_a_restart_does_not_give_a_site_a_new_budget(tmp_path: Any) -> None:
    from aggregator.service import UploadBudget

    job, store = _stored_job(tmp_path)
    try:
        first = job()
        limit = first.upload_limit(1)
        assert _upload(UploadBudget(), first, store, int(limit * 0.8))
        restarted = job()  # a new process: a new UploadBudget, the same store
        assert not _upload(UploadBudget(), restarted, store, int(limit * 0.3))
    finally:
        store.close()


def test_streams_on_either_side_of_a_reload_share_one_budget(tmp_path: Any) -> None:
    """A site keeps an upload stream open across a reload (it holds the older job) and opens
    another after it, and alternates chunks between them: the counts were reset to the
    store's at every switch, and the site stored 3x its budget. They only move forward."""
    from aggregator.service import UploadBudget

    job, store = _stored_job(tmp_path)
    try:
        old, new = job(), job()  # before and after the watcher's reload
        limit = new.upload_limit(1)
        budget = UploadBudget()
        stored, n = 0, 0
        while stored <= 3 * limit:
            current = new if n % 2 == 0 else old
            n += 1
            if not _upload(budget, current, store, SDK_CHUNK_BYTES):
                break
            stored += SDK_CHUNK_BYTES + CHUNK_STORAGE_COST
        assert stored <= limit
    finally:
        store.close()



def _stored_while_the_round_closes(next_round: int | None) -> list[tuple[Any, ...]]:
    """Site 2 uploads one chunk in round 3; the round ends (to ``next_round``) while the chunk
    is being hashed. The rows the store was given. (Fake calls, no gRPC.)"""
    import asyncio
    import concurrent.futures
    import hashlib

    from aggregator.service import Core
    from secagg.v1 import service_pb2
    from tests.fake_calls import FakeContext, fake_service

    stored: list[tuple[Any, ...]] = []

    def put_chunk_rows(rows: list[tuple[Any, ...]]) -> list[bool]:
        stored.extend(rows)
        return [True] * len(rows)

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = fake_service(core, store=types.SimpleNamespace(put_chunk_rows=put_chunk_rows),
                               current_round=3, upload_limit=lambda site: 1 << 40,
                               stored_uploads=(None, {}), generation=1)
        job = core.job

        class ClosingWhileHashing(concurrent.futures.ThreadPoolExecutor):
            def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
                job.current_round = next_round  # type: ignore[union-attr]
                return super().submit(fn, *args, **kwargs)

        core.hashers = ClosingWhileHashing(max_workers=1)
        data = b"update bytes"

        async def requests() -> Any:
            yield service_pb2.Chunk(chunk_id=hashlib.sha256(data).digest(), data=data)

        assert (await service.PutChunks(requests(), FakeContext(2))).stored == 1
        core.executor.shutdown()
        core.hashers.shutdown()

    asyncio.run(main())
    return stored


@pytest.mark.parametrize("next_round", [None, 4])
def test_a_chunk_is_kept_for_the_round_it_was_charged_to(next_round: int | None) -> None:
    """A chunk is stored labelled with the round it was charged to (purged with it), not with
    the round current once it is hashed: between rounds that was none, which kept it for
    good; or the next round, whose budget it did not pay into."""
    rows = _stored_while_the_round_closes(next_round)
    assert [(r[2], r[3]) for r in rows] == [(3, 2)], (
        f"a chunk charged to round 3 was kept for round {rows[0][2]}")


def test_an_upload_between_rounds_is_refused_as_out_of_stage() -> None:
    """No round is open: a chunk is refused FAILED_PRECONDITION (the wrong stage), not as a
    budget exceeded, and nothing is stored."""
    import asyncio
    import hashlib

    from aggregator.service import Core
    from secagg.v1 import service_pb2
    from tests.fake_calls import Aborted, FakeContext, fake_service

    stored: list[Any] = []

    async def main() -> None:
        core = Core(asyncio.get_running_loop())
        service = fake_service(core, store=types.SimpleNamespace(put_chunk_rows=stored.extend),
                               current_round=None, upload_limit=lambda site: 1 << 40,
                               stored_uploads=(None, {}), generation=1)

        async def requests() -> Any:
            yield service_pb2.Chunk(chunk_id=hashlib.sha256(b"x").digest(), data=b"x")

        try:
            with pytest.raises(Aborted, match=r"FAILED_PRECONDITION.*no round is open"):
                await service.PutChunks(requests(), FakeContext(2))
        finally:
            core.executor.shutdown()

    asyncio.run(main())
    assert stored == []


def test_a_restart_charges_the_stored_chunks_their_storage_cost(tmp_path: Any) -> None:
    """A site stores 1-byte chunks, charged CHUNK_STORAGE_COST each, up to most of its
    budget; the aggregator restarts. The budget recovered from the store charges each chunk
    its cost again, so the site may store little more. Without it the store's 1-byte chunks
    counted a byte each after a restart: every restart gave the site a whole new budget of
    chunks (each a page of the write-ahead log)."""
    from aggregator.service import UploadBudget
    from aggregator.store import chunk_id

    job, store = _stored_job(tmp_path)
    try:
        first = job()
        limit = first.upload_limit(1)
        n = int(limit * 0.8) // (1 + CHUNK_STORAGE_COST)
        assert 0 < n <= 256  # (distinct one-byte chunks)
        budget = UploadBudget()
        for i in range(n):
            data = bytes([i])
            assert budget.charge(first, 1, first.current_round, 1 + CHUNK_STORAGE_COST)
            store.put_chunks([(chunk_id(data), data)], round_number=first.current_round, site=1)
        restarted = job()  # a new process: a new UploadBudget, the same store
        assert restarted.stored_uploads == (1, {1: n * (1 + CHUNK_STORAGE_COST)})
        assert not _upload(UploadBudget(), restarted, store, int(limit * 0.3))
    finally:
        store.close()


def test_each_round_gives_each_site_a_budget_of_its_own() -> None:
    """What a site stored in one round is not charged to the next: a site that used most of
    its budget in round 1 uploads its round 2 payload, as an honest site does every round
    (charged for good, it was refused from its second or third round on)."""
    from aggregator.service import UploadBudget

    job = types.SimpleNamespace(generation=1, stored_uploads=(None, {}),
                                upload_limit=lambda site: 100)
    budget = UploadBudget()
    assert budget.charge(job, 1, 1, 80)  # type: ignore[arg-type]
    assert not budget.charge(job, 1, 1, 30)  # type: ignore[arg-type]
    assert budget.charge(job, 1, 2, 80)  # type: ignore[arg-type]
    assert budget.charge(job, 2, 2, 80)  # type: ignore[arg-type]
