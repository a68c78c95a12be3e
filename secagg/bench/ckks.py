"""``secagg bench ckks``: a CKKS round of simulated sites, and NVIDIA FLARE's default
TenSEAL configuration (N=8192, [60, 40, 40], scale 2^40, one ``ts.ckks_vector`` per update,
``serialize()``, ``+`` on the server) measured in the same run on the same inputs.

Figures per site are medians. ``encrypt_s`` includes serialisation; ``aggregate_s`` is the
server's time to parse and add one upload; ``max_abs_error`` is of the decrypted sum over all
sites (before the release rounding).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import tenseal as ts

from secagg.ckks import (
    CkksClient,
    CkksRoundConfig,
    CkksServer,
    KeyHolder,
    Release,
    decrypt_verified_sum,
    get_preset,
)
from secagg.masking import make_roster

FLARE_DEGREE, FLARE_BITS, FLARE_SCALE_BITS = 8192, [60, 40, 40], 40


def _inputs(clients: int, params: int) -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(0)  # test data only
    return [(rng.uniform(-1.0, 1.0, params), float(rng.uniform(0.5, 1.0)))
            for _ in range(clients)]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """TenSEAL's C++ prints warnings on stdout; keep stdout for the JSON result."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _figures(sizes: list[int], encrypt: list[float], aggregate: list[float], decrypt_s: float,
             error: np.ndarray, params: int) -> dict[str, Any]:
    """Per-site medians, bytes per value, and the max abs error of the decrypted sum."""
    return {
        "bytes_per_value": statistics.mean(sizes) / params,
        "encrypt_s": statistics.median(encrypt),
        "aggregate_s": statistics.median(aggregate),
        "decrypt_s": decrypt_s,
        "max_abs_error": float(np.max(np.abs(error))),
    }


def run_ours(clients: int, params: int, preset: str, seeded: bool, quiet: bool,
             inputs: list[tuple[np.ndarray, float]]) -> dict[str, Any]:
    roster, identities = make_roster(clients)
    holder = KeyHolder.generate(preset)
    public = holder.public_context()
    announcement = holder.announce(holder=1, identity=identities[1], epoch="bench")
    config = CkksRoundConfig("bench", roster, announcement, (1,), vector_length=params,
                             preset=preset)
    server = CkksServer(config, public)
    encrypt, aggregate, sizes = [], [], []
    uploads = []
    for site, (update, weight) in zip(sorted(roster), inputs, strict=True):
        client = CkksClient(config, site, identities[site], holder if seeded else public,
                            (update, weight), seeded=seeded)
        t0 = time.perf_counter()
        upload = client.start()
        encrypt.append(time.perf_counter() - t0)
        sizes.append(upload.nbytes)
        t0 = time.perf_counter()
        server.handle(upload)
        aggregate.append(time.perf_counter() - t0)
        uploads.append(upload)
        if site % 10 == 0:
            _say(quiet, f"ours ({preset}{', seeded' if seeded else ''}): {site}/{clients} sites")
    agg = server.close_stage()[1]
    weighted, _ = decrypt_verified_sum(holder, config, uploads)
    # the release path users run: verify every signed upload and recompute the sum (the
    # key holder's security cost), then compare, decrypt, check ranges, flood, round, divide
    release = Release(holder, config, site_id=1)
    t0 = time.perf_counter()
    for upload in uploads:
        release.add(upload)
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    released = release.finish(agg)
    release_s = time.perf_counter() - t0
    exact = sum(u * w for u, w in inputs)
    weights = sum(w for _, w in inputs)
    return {
        **_figures(sizes, encrypt, aggregate, release_s, weighted - exact, params),
        "release_s": release_s,
        "verify_uploads_s": verify_s,
        "verify_uploads_s_per_site": verify_s / clients,
        "released_average_max_abs_error": float(np.max(np.abs(released.average - exact / weights))),
        "release_grid": released.grid,
    }


def run_flare(clients: int, params: int, quiet: bool,
              inputs: list[tuple[np.ndarray, float]]) -> dict[str, Any]:
    context = ts.context(ts.SCHEME_TYPE.CKKS, FLARE_DEGREE, coeff_mod_bit_sizes=FLARE_BITS)
    context.global_scale = 2.0**FLARE_SCALE_BITS
    public = context.copy()
    public.make_context_public()
    encrypt, aggregate, sizes = [], [], []
    total = None
    for i, (update, weight) in enumerate(inputs, 1):
        t0 = time.perf_counter()
        with _stdout_to_stderr():
            blob = ts.ckks_vector(context, update * weight).serialize()
        encrypt.append(time.perf_counter() - t0)
        sizes.append(len(blob))
        t0 = time.perf_counter()
        vec = ts.ckks_vector_from(public, blob)
        total = vec if total is None else total + vec
        aggregate.append(time.perf_counter() - t0)
        if i % 10 == 0:
            _say(quiet, f"NVIDIA FLARE default: {i}/{clients} sites")
    assert total is not None
    t0 = time.perf_counter()
    total.link_context(context)
    decrypted = np.array(total.decrypt())
    decrypt_s = time.perf_counter() - t0
    exact = sum(u * w for u, w in inputs)
    return _figures(sizes, encrypt, aggregate, decrypt_s, decrypted - exact, params)


def run(clients: int, params: int, preset: str, seeded: bool, quiet: bool) -> dict[str, Any]:
    get_preset(preset)  # a clear error before any work
    inputs = _inputs(clients, params)
    ours = run_ours(clients, params, preset, seeded, quiet, inputs)
    theirs = run_flare(clients, params, quiet, inputs)
    out: dict[str, Any] = {"protocol": "ckks", "clients": clients, "params": params,
                           "preset": preset, "seeded": seeded, **ours,
                           "nvflare_default": theirs}
    for key in ("bytes_per_value", "encrypt_s", "aggregate_s", "decrypt_s"):
        out[f"{key}_ratio_vs_nvflare"] = ours[key] / theirs[key]
    return out
