"""A CKKS round whose weight sum is small for its preset: the release's flooding noise, over
the weight sum, is then a visible share of clip_norm. The release is refused only once that
share passes MAX_NOISE_SHARE; past 1% (PRECISION_MARGIN, as for masking's rounding) the
aggregator says so to its operator, with the fix, and stays quiet otherwise."""

from __future__ import annotations

import logging
import math
import types

import numpy as np
import pytest

from aggregator.job import Job
from secagg.ckks import release_average
from secagg.ckks.presets import MAX_NOISE_SHARE
from secagg.ckks.release import release_noise_share
from secagg.masking.precision import PRECISION_MARGIN
from secagg.model import FlatModel
from tests.ckks_kit import CkksRound

SIZE = 3000
CLIP_NORM = 1.0


def _release(weight: float) -> tuple[CkksRound, np.ndarray, np.ndarray, float]:
    """A released round of 3 sites at ``weight`` each: (round, exact average, released one,
    weight sum)."""
    r = CkksRound(sites=3, vector_length=SIZE, seed=5)
    rng = np.random.default_rng(5)  # test data only
    for s in r.inputs:
        delta = rng.normal(size=SIZE)
        r.inputs[s] = (delta * (CLIP_NORM / 2 / float(np.linalg.norm(delta))), weight)
    uploads, aggregate = r.run()
    released = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    exact_sum, exact_weight = r.expected()
    return r, exact_sum / exact_weight, np.asarray(released.average), released.weight_sum


def _note(r: CkksRound, weight_sum: float, caplog: pytest.LogCaptureFixture) -> list[str]:
    model = FlatModel.from_arrays({"w": np.zeros(SIZE, np.float32)})
    job = types.SimpleNamespace(config=types.SimpleNamespace(clip_norm=CLIP_NORM,
                                                             preset="add-only-4096"))
    active = types.SimpleNamespace(view=types.SimpleNamespace(model=model, round_id="r-1"),
                                   ckks_config=r.config)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="secagg.aggregator"):
        Job._note_ckks_precision(job, active, 3, weight_sum)  # type: ignore[arg-type]
    return [rec.getMessage() for rec in caplog.records
            if getattr(rec, "event", None) == "ckks_precision_low"]


def test_a_small_weight_sum_is_warned_with_the_fix(
        caplog: pytest.LogCaptureFixture) -> None:
    r, exact, released, weight_sum = _release(0.03)
    share = release_noise_share(r.config.preset_params, 3, CLIP_NORM, weight_sum, SIZE)
    assert PRECISION_MARGIN < share <= MAX_NOISE_SHARE  # released, and noisy
    # the bound holds, and the noise it bounds is really there (not a worst case only)
    error = float(np.linalg.norm(released - exact))
    assert error <= share * CLIP_NORM
    assert error > share * CLIP_NORM / 10
    (message,) = _note(r, weight_sum, caplog)
    assert "max_samples" in message and "clip_norm" in message and "preset" in message


def test_weights_near_one_are_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    r, exact, released, weight_sum = _release(0.8)
    assert np.linalg.norm(released - exact) < 1e-3 * CLIP_NORM
    assert _note(r, weight_sum, caplog) == []


def test_no_weight_is_infinitely_noisy() -> None:
    r = CkksRound(sites=3, vector_length=10)
    assert release_noise_share(r.config.preset_params, 3, 1.0, 0.0, 10) == math.inf
    assert release_noise_share(r.config.preset_params, 3, 1.0, -1.0, 10) == math.inf
