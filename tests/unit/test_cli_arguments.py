"""The command line's own argument checks, each a one-line argparse error before anything
runs: fewer than 3 sites (a sum of two reveals the other's update), a DP noise multiplier or
clipping bound that is not positive."""

from __future__ import annotations

import argparse
import math

import pytest

from secagg.cli import _positive_float, _sites


@pytest.mark.parametrize("text", ["2", "1"])
def test_fewer_than_three_sites_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 3"):
        _sites(text)
    assert _sites("3") == 3


@pytest.mark.parametrize("text", ["0", "-1", "-0.5", "nan"])
def test_a_noise_multiplier_or_clip_is_positive(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be > 0"):
        _positive_float(text)
    assert _positive_float("0.5") == 0.5 and math.isinf(_positive_float("inf"))
