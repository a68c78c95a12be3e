"""A masking round whose weight sum is small for the quantiser: the average's rounding error,
divided by the weight sum, becomes a visible share of clip_norm (weights of 100 samples
under ``max_samples = 1e6``). Nothing refuses it (the sites' result checks use the same
bound), so the aggregator says so to its operator, with the fix, and stays quiet otherwise."""

from __future__ import annotations

import logging
import math
import types

import numpy as np
import pytest

from aggregator.job import Job
from secagg.masking import RoundConfig, make_roster, simulate_round
from secagg.masking.precision import PRECISION_MARGIN, error_share
from secagg.model import FlatModel

SIZE = 4096


def _round(weights: tuple[float, ...]) -> tuple[RoundConfig, np.ndarray, object]:
    roster, identities = make_roster(len(weights))
    config = RoundConfig("precision", roster, SIZE)
    rng = np.random.default_rng(11)  # test data only
    inputs = {}
    exact = np.zeros(SIZE)
    for s, w in zip(sorted(identities), weights, strict=True):
        delta = rng.normal(size=SIZE)
        delta *= config.quantizer.clip / np.linalg.norm(delta) / 2
        inputs[s] = (delta, w)
        exact += w * delta
    result = simulate_round(config, identities, inputs).result
    assert result is not None
    return config, exact / sum(weights), result


def _note(config: RoundConfig, result: object, caplog: pytest.LogCaptureFixture) -> list[str]:
    model = FlatModel.from_arrays({"w": np.zeros(SIZE, np.float32)})
    job = types.SimpleNamespace(config=types.SimpleNamespace(clip_norm=config.quantizer.clip))
    active = types.SimpleNamespace(view=types.SimpleNamespace(model=model, round_id="r-1"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="secagg.aggregator"):
        Job._note_masking_precision(job, active, result.weight_sum,  # type: ignore[arg-type, attr-defined]
                                    result.error_bound)  # type: ignore[attr-defined]
    return [r.getMessage() for r in caplog.records
            if getattr(r, "event", None) == "masking_precision_low"]


def test_a_small_weight_sum_is_warned_with_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    config, exact, result = _round((1e-6, 2e-6, 1e-6))
    average = result.weighted_sum / result.weight_sum  # type: ignore[attr-defined]
    share = error_share(result.error_bound, result.weight_sum,  # type: ignore[attr-defined]
                                SIZE, config.quantizer.clip)
    # the bound holds, and the error it bounds is really there (not a worst case only)
    error = float(np.linalg.norm(average - exact))
    assert error <= share * config.quantizer.clip
    assert error > PRECISION_MARGIN * config.quantizer.clip / 10
    (message,) = _note(config, result, caplog)
    assert "max_samples" in message and "word_bits" in message


def test_weights_near_one_are_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    config, exact, result = _round((1.0, 0.3, 0.8))
    average = result.weighted_sum / result.weight_sum  # type: ignore[attr-defined]
    assert np.linalg.norm(average - exact) < 1e-5 * config.quantizer.clip
    assert _note(config, result, caplog) == []


def test_a_weight_sum_within_its_own_error_is_infinitely_imprecise() -> None:
    assert error_share((1e-9, 1e-3), 1e-3, 100, 1.0) == math.inf
    assert error_share((0.0, 0.0), 2.0, 100, 1.0) == 0.0
