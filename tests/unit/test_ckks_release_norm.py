"""The L2 check of a CKKS release (secagg.ckks.release.check_released_norm), which the
aggregator makes before publishing and the key holder before signing."""

from __future__ import annotations

import math

import pytest

from secagg.ckks.presets import get_preset
from secagg.ckks.release import MAX_NOISE_SHARE, check_released_norm
from secagg.errors import AbortReason, ProtocolAbort

PRESET = get_preset("add-only-4096")


def test_the_longest_honest_average_passes_and_one_longer_does_not() -> None:
    check_released_norm(PRESET, 3, 1.0, 3.0, 1.0, 100_000)
    with pytest.raises(ProtocolAbort, match="longer than clipped inputs can make") as caught:
        check_released_norm(PRESET, 3, 1.0, 3.0, 1.05, 100_000)
    assert caught.value.reason is AbortReason.AGGREGATE_OUT_OF_RANGE


@pytest.mark.parametrize("weight_sum", [3e-3, 1e-4, 0.0, -1.0])
def test_a_weight_sum_too_small_for_the_noise_is_refused(weight_sum: float) -> None:
    """Three sites of 10 samples under max_samples = 10000 (W = 3e-3) at 1e5 values: the
    release's noise, divided by W, made an average of L2 22 from inputs of L2 1, and it
    passed the length check (whose slack is the same noise). Refused, naming the least
    weight sum (not the round's: the message reaches logs), even for an average of zero."""
    with pytest.raises(ProtocolAbort, match=r"weight sum is below \d") as caught:
        check_released_norm(PRESET, 3, 1.0, weight_sum, 0.0, 100_000)
    assert caught.value.reason is AbortReason.AGGREGATE_OUT_OF_RANGE


@pytest.mark.parametrize(("values", "low", "high"), [(8, 0.005, 0.01), (50_000, 0.05, 0.1)])
def test_the_least_weight_sum_is_the_readmes_figure(values: int, low: float,
                                                      high: float) -> None:
    """README: with the default preset, clip 1 and 5 sites, the least weight sum is ~0.007
    for 8 values and ~0.07 for 50,000. The floor's slack counts the flooding noise to TAIL
    sigma; the test below reads the floor back from the check itself, so a tail of 2 sigma
    (a release noisier than a tenth of the clip in many values then passes: a 2-sigma draw is
    exceeded by ~5% of them) passed it. Refused below the figure's range, taken above it."""
    with pytest.raises(ProtocolAbort, match="weight sum is below"):
        check_released_norm(PRESET, 5, 1.0, low, 0.0, values)
    check_released_norm(PRESET, 5, 1.0, high, 0.0, values)


def test_the_floor_is_where_the_noise_is_the_documented_share_of_the_clip() -> None:
    """Just above the least weight sum the check takes an average of zero; just below it
    refuses: the floor is the slack over MAX_NOISE_SHARE * clip_norm, no more."""
    with pytest.raises(ProtocolAbort) as caught:
        check_released_norm(PRESET, 3, 2.0, 1e-9, 0.0, 100_000)
    floor = float(str(caught.value).split("below ")[1].split(",")[0])
    check_released_norm(PRESET, 3, 2.0, floor * 1.01, 0.0, 100_000)
    with pytest.raises(ProtocolAbort):
        check_released_norm(PRESET, 3, 2.0, floor * 0.98, 0.0, 100_000)
    assert MAX_NOISE_SHARE == 0.1 and math.isfinite(floor) and 0.01 < floor < 1.0
