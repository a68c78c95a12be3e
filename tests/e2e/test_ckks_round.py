"""CKKS rounds end to end: accuracy at scale, exact lengths, seeded sizes, workers."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.ckks import CkksClient, ReleaseRequest, decrypt_verified_sum, release_average
from secagg.ckks.presets import FLOOD_FACTOR
from tests.ckks_kit import CkksRound


def test_sum_of_100_sites_by_100k_values_at_the_default_preset() -> None:
    r = CkksRound(sites=100, vector_length=100_000, seed=3)
    uploads, aggregate = r.run()
    ws, w = decrypt_verified_sum(r.holder, r.config, uploads)
    exact_ws, exact_w = r.expected()
    assert float(np.max(np.abs(ws - exact_ws))) <= 1e-6
    assert abs(w - exact_w) <= 1e-6
    released = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    # flooding noise: sigma = FLOOD_FACTOR x the noise bound on the sums, 6 sigma over 100k
    bound = r.config.preset_params.noise_bound(100)
    tolerance = (6 * FLOOD_FACTOR * bound + released.grid) / exact_w * 2
    error = float(np.max(np.abs(released.average - exact_ws / exact_w)))
    assert error <= tolerance and tolerance < 2e-5
    assert released.grid >= bound
    steps = released.weight_sum / released.grid
    assert steps == round(steps)  # released sums sit on the grid


@pytest.mark.parametrize("length", [1, 2047, 2048, 2049, 5000])
def test_decoding_returns_exactly_the_original_length(length: int) -> None:
    r = CkksRound(sites=3, vector_length=length)
    uploads, _ = r.run()
    ws, w = decrypt_verified_sum(r.holder, r.config, uploads)
    exact_ws, exact_w = r.expected()
    assert ws.shape == (length,)
    assert float(np.max(np.abs(ws - exact_ws))) < 1e-6 and abs(w - exact_w) < 1e-6


def test_seeded_uploads_are_about_half_the_bytes_and_load_with_the_public_context() -> None:
    r = CkksRound(sites=3, vector_length=20_000)
    seeded = CkksClient(r.config, 1, r.identities[1], r.holder, r.inputs[1], seeded=True).start()
    public = CkksClient(r.config, 1, r.identities[1], r.holder, r.inputs[1],
                        seeded=False).start()
    assert seeded.nbytes < 0.52 * public.nbytes
    assert seeded.nbytes / 20_001 <= 15.5 and public.nbytes / 20_001 <= 30
    r.server.handle(seeded)  # the aggregator has no secret key and still loads it
    uploads, _ = r.run([2, 3])
    ws, _ = decrypt_verified_sum(r.holder, r.config, [seeded, *uploads])
    assert float(np.max(np.abs(ws - r.expected()[0]))) < 1e-6


def test_site_with_only_the_public_context_cannot_use_seeded_mode() -> None:
    r = CkksRound(sites=3, vector_length=10)
    with pytest.raises(ValueError, match="seeded encryption needs the secret key"):
        CkksClient(r.config, 2, r.identities[2], r.public, r.inputs[2], seeded=True)


def test_parallel_workers_produce_the_same_aggregate_and_report_progress() -> None:
    r = CkksRound(sites=3, vector_length=40_000)
    seen: list[tuple[int, int]] = []
    upload = r.client(2, workers=2, progress=lambda d, t: seen.append((d, t))).start()
    assert len(upload.chunks) == r.config.chunk_count
    assert seen[-1] == (r.config.chunk_count, r.config.chunk_count)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    r.server.handle(upload)
    uploads, _ = r.run([1, 3])
    ws, _ = decrypt_verified_sum(r.holder, r.config, [upload, *uploads])
    assert float(np.max(np.abs(ws - r.expected()[0]))) < 1e-6


def test_key_holder_client_releases_through_handle() -> None:
    r = CkksRound(sites=3, vector_length=100)
    holder_client = r.client(1)
    mine = holder_client.start()
    r.server.handle(mine)
    uploads, aggregate = r.run([2, 3])
    released = holder_client.handle(ReleaseRequest(aggregate, [mine, *uploads]))
    exact_ws, exact_w = r.expected()
    sigma = FLOOD_FACTOR * r.config.preset_params.noise_bound(3) / exact_w
    assert float(np.max(np.abs(released.average - exact_ws / exact_w))) < 6 * sigma
    assert released.sites == (1, 2, 3)


def test_bad_input_is_refused_when_the_site_is_created() -> None:
    r = CkksRound(sites=3, vector_length=10)
    with pytest.raises(ValueError, match="shape"):
        CkksClient(r.config, 2, r.identities[2], r.public, (np.zeros(9), 0.5))
    with pytest.raises(ValueError, match="weight"):
        CkksClient(r.config, 2, r.identities[2], r.public, (np.zeros(10), 2.0))
