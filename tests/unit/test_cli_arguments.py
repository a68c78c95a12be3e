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


def test_an_integer_argument_that_is_none_is_said_so_not_named_by_its_function(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--threshold abc` said "invalid _positive value"; `simulate --sites 1` said "must be
    >= 1" at 0 and then "roster must list at least 3 sites" at 1."""
    from secagg.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "masking", "--threshold", "abc"])
    err = capsys.readouterr().err
    assert "--threshold: must be an integer, got 'abc'" in err and "_positive" not in err
    with pytest.raises(SystemExit):
        main(["simulate", "--sites", "1"])
    assert "must be >= 3" in capsys.readouterr().err
