"""What the job answers a site about a round that ended or left it out, by status: the SDK
turns ABORTED into RoundAborted with the round's own reason (TOO_FEW_SURVIVORS, ...), and a
site told at once it dropped out of a stage (FAILED_PRECONDITION) does not long-poll for a
message that will never come until the round's deadline. (The job in-process.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.job import ABORTED, FAILED_PRECONDITION, ServiceError
from secagg.ckks import CkksStage
from secagg.v1 import service_pb2
from tests.threat_model.test_lying_payload_refs import _ckks_federation, _round_one


def _code(call) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ServiceError) as refused:
        call()
    return refused.value.code, str(refused.value)


def test_an_aborted_round_is_aborted_with_its_reason_to_receive_and_submit(
        tmp_path: Path) -> None:
    _, config, roster, store = _ckks_federation(tmp_path)
    try:
        job, info = _round_one(config, roster, store)
        assert job.active is not None
        job._abort(job.active, "TOO_FEW_SURVIVORS")
        request = service_pb2.SubmitRequest(round_id=info.round_id)
        request.ckks_update.site_id = 2
        for call in (lambda: job.receive(2, info.round_id, CkksStage.UPLOAD.value),
                     lambda: job.submit(2, request)):
            code, why = _code(call)
            assert code == ABORTED and "TOO_FEW_SURVIVORS" in why
    finally:
        store.close()


def test_a_site_left_out_of_a_stage_is_told_at_once(tmp_path: Path) -> None:
    _, config, roster, store = _ckks_federation(tmp_path)
    try:
        job, info = _round_one(config, roster, store)
        assert job.active is not None
        stage = CkksStage.UPLOAD.value
        job.active.outgoing[stage] = {1: service_pb2.CkksReleaseRequest()}
        code, why = _code(lambda: job.receive(2, info.round_id, stage))
        assert code == FAILED_PRECONDITION and "dropped out" in why
        assert job.receive(1, info.round_id, stage).ready
    finally:
        store.close()


def test_an_average_that_fits_no_model_is_refused_before_it_makes_one(tmp_path: Path) -> None:
    """A release or sum of the wrong length, or with a value that is not finite, is refused
    as such (INVALID_ARGUMENT), before a model is made of it."""
    import numpy as np

    from aggregator.job import INVALID_ARGUMENT

    _, config, roster, store = _ckks_federation(tmp_path)
    try:
        job, _ = _round_one(config, roster, store)
        assert job.active is not None
        view = job.active.view
        size = view.model.size
        assert job._next_model(view, np.zeros(size)).digest == view.model.digest
        for average in (np.zeros(size + 1), np.zeros(size - 1),
                        np.where(np.arange(size) == 0, np.nan, 0.0),
                        np.where(np.arange(size) == 0, np.inf, 0.0)):
            code, why = _code(lambda a=average: job._next_model(view, a))
            assert code == INVALID_ARGUMENT and "does not fit the model" in why
    finally:
        store.close()


class _Presenting:
    """A call's context presenting a client certificate (``pem``) and a chain."""

    def __init__(self, pem: bytes, chain: bytes = b"") -> None:
        self.pem, self.chain = pem, chain

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.pem],
                **({"x509_pem_cert_chain": [self.chain]} if self.chain else {})}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: object, details: str) -> None:
        from tests.fake_calls import Aborted

        raise Aborted(details)


def test_the_identity_cache_is_bounded_whatever_certificates_are_presented() -> None:
    """Each distinct certificate (and presented chain) is a cache entry, and a client
    chooses them: the cache is emptied at its bound, not grown without one."""
    import asyncio

    from aggregator.service import IDENTITY_CACHE_SIZE, Identity
    from tests.fake_calls import Aborted

    identity = Identity({1, 2, 3})

    async def main() -> None:
        for n in range(IDENTITY_CACHE_SIZE + 50):
            with pytest.raises(Aborted, match="names no site"):
                await identity.site(_Presenting(  # type: ignore[arg-type]
                    b"-----BEGIN CERTIFICATE-----\n%d\n" % n))
            assert len(identity._cache) <= IDENTITY_CACHE_SIZE

    asyncio.run(main())


def test_the_identity_cache_keeps_no_presented_bytes() -> None:
    """A site sent a fresh 100 KB chain of junk beside its certificate on each connection:
    the cache, bounded by its count of entries, held each chain (530 MB at its bound, live).
    200 such connections now leave a tenth of what their chains weigh, and far less."""
    import asyncio
    import gc
    import tracemalloc

    from aggregator.service import Identity
    from tests.fake_calls import Aborted

    identity = Identity({1, 2, 3})

    async def main() -> None:
        for n in range(200):
            with pytest.raises(Aborted, match="names no site"):
                await identity.site(_Presenting(  # type: ignore[arg-type]
                    b"-----BEGIN CERTIFICATE-----\n",
                    b"-----BEGIN CERTIFICATE-----\n%d\n" % n + b"A" * 100_000))

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        asyncio.run(main())
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(identity._cache) == 200
    assert kept < 2_000_000, kept  # (20 MB when the chains were kept; ~0.2 MB of other noise)


def test_an_average_past_its_tensors_range_is_refused_as_invalid_argument(
        tmp_path: Path) -> None:
    """A finite average that takes a value past what its tensor's dtype holds (1e39 for a
    float32 weight) is the sender's error, INVALID_ARGUMENT naming the range, as the message
    arrives: never the model's ConfigurationError out of the job's thread (UNKNOWN to the
    site, and an error the job met again on every replay)."""
    import numpy as np

    from aggregator.job import INVALID_ARGUMENT

    _, config, roster, store = _ckks_federation(tmp_path)
    try:
        job, _ = _round_one(config, roster, store)
        assert job.active is not None
        view = job.active.view
        average = np.where(np.arange(view.model.size) == 0, 1e39, 0.0)
        code, why = _code(lambda: job._next_model(view, average))
        assert code == INVALID_ARGUMENT and "tensors' range" in why
    finally:
        store.close()


def test_a_call_without_a_client_certificate_is_unauthenticated() -> None:
    """A call whose TLS context holds no client certificate (the server requires one, so
    only a server set up otherwise, or a transport in front of it, lets one through) is
    refused UNAUTHENTICATED, saying a certificate is required: never an IndexError (UNKNOWN)
    and never another site's identity."""
    import asyncio

    from aggregator.service import Identity
    from tests.fake_calls import Aborted

    class _Anonymous:
        def __init__(self, auth: dict[str, list[bytes]]) -> None:
            self.auth = auth

        def auth_context(self) -> dict[str, list[bytes]]:
            return self.auth

        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

        async def abort(self, code: object, details: str) -> None:
            raise Aborted(f"{code}: {details}")

    identity = Identity({1, 2, 3})

    async def main() -> None:
        anonymous: tuple[dict[str, list[bytes]], ...] = ({}, {"x509_pem_cert": []})
        for auth in anonymous:
            with pytest.raises(Aborted, match=r"UNAUTHENTICATED.*client certificate is required"):
                await identity.site(_Anonymous(auth))  # type: ignore[arg-type]

    asyncio.run(main())


def test_a_rounds_model_is_put_in_wire_form_once_for_every_poll(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every site's every poll is answered with the round's model: its wire form (a spec of
    up to 65,536 tensors, 120 ms of the job's thread) is built once, not at each answer, and
    only a few are kept."""
    import numpy as np

    from aggregator import job as job_module
    from aggregator.store import BlobRef
    from secagg import wire
    from secagg.model import FlatModel

    _, config, roster, store = _ckks_federation(tmp_path)
    built: list[bytes] = []
    real = wire.model_to_proto

    def counting(model, blob):  # type: ignore[no-untyped-def]
        built.append(model.digest)
        return real(model, blob)

    monkeypatch.setattr(job_module.wire, "model_to_proto", counting)
    try:
        job, first = _round_one(config, roster, store)
        answers = [job.round_info(0) for _ in range(3)] + [job.info(first.round_id)]
        assert len(built) == 1
        assert all(a == first for a in answers)
        assert first.model == real(job.model, wire.Blob(
            first.model.data.chunk_ids, first.model.data.size))
        # other models are other forms, and only MODEL_PROTOS_KEPT are kept
        for i in range(job_module.MODEL_PROTOS_KEPT + 2):
            other = FlatModel(job.model.spec, np.full(job.model.size, i + 1.0))
            made = job._model_proto(other, BlobRef((bytes(32),), other.size))
            assert made.digest == other.digest
        assert len(job._model_protos) == job_module.MODEL_PROTOS_KEPT
    finally:
        store.close()
