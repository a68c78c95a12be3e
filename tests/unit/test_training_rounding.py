"""The one-update rule reads a model as the site's training does (``FlatModel.
training_digest_as``): each float rounded as torch rounds it into the tensors the site
trains in. A rounding of our own that differs from torch's anywhere (truncating, ties away
from even, float64 to float16 without going through float32, bfloat16 ranked finer than
float16) lets an aggregator nudge a model across a boundary where our digest sees a new
model and training the same numbers: a second update, and a rerun. Checked against torch
itself, on random values and on the ties and double roundings where the rules part."""

from __future__ import annotations

import math

import numpy as np
import pytest

from secagg.model import TRAINING_FLOATS, _as_held

torch = pytest.importorskip("torch")


def _torch_held(values: np.ndarray, name: str) -> np.ndarray:
    return torch.from_numpy(values).to(getattr(torch, name)).to(torch.float64).numpy()


def _random(n: int = 50_000) -> np.ndarray:
    rng = np.random.default_rng(3)  # test data only
    return rng.normal(size=n) * np.exp(rng.uniform(-30, 12, n))


def _bfloat16_ties(n: int = 2_000) -> np.ndarray:
    """float32 values exactly half-way between two bfloat16 neighbours (low 16 bits 0x8000),
    of either parity, as float64."""
    rng = np.random.default_rng(4)  # test data only
    bits = ((rng.integers(0, 1 << 7, n, dtype=np.uint32) << np.uint32(16))
            | (rng.integers(90, 160, n, dtype=np.uint32) << np.uint32(23))
            | (rng.integers(0, 2, n, dtype=np.uint32) << np.uint32(31)) | np.uint32(0x8000))
    return bits.view(np.float32).astype(np.float64)


def _float16_double_roundings(n: int = 2_000) -> np.ndarray:
    """float64 values just above a float16 tie, by less than float32 can show: float32
    rounds them onto the tie, which float16 then rounds to even (down, half the time), where
    one rounding straight from float64 goes up."""
    rng = np.random.default_rng(5)  # test data only
    low = rng.uniform(-6e4, 6e4, n).astype(np.float16)
    high = np.nextafter(low, np.float16(np.inf))
    tie = (low.astype(np.float64) + high.astype(np.float64)) / 2
    return tie + np.abs(np.spacing(tie.astype(np.float32)).astype(np.float64)) / 4


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_rounding_to_the_held_dtype_is_torchs(name: str) -> None:
    for values in (_random(), _bfloat16_ties(), _float16_double_roundings()):
        assert np.array_equal(_as_held(values, name), _torch_held(values, name))


def test_the_cases_where_rounding_rules_part_are_in_the_test() -> None:
    """The tie and double-rounding inputs are ones a wrong rule gets wrong."""
    ties = _bfloat16_ties()
    truncated = (ties.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(
        np.float32).astype(np.float64)
    assert np.count_nonzero(truncated != _torch_held(ties, "bfloat16")) > 100
    doubled = _float16_double_roundings()
    assert np.count_nonzero(doubled.astype(np.float16).astype(np.float64)
                            != _torch_held(doubled, "float16")) > 100


def test_precisions_rank_by_torchs_significand_bits() -> None:
    for name, bits in TRAINING_FLOATS.items():
        assert bits == 1 - math.log2(float(torch.finfo(getattr(torch, name)).eps)), name
