"""The SDK's measure of how far a masking result moved the model (clients.site._steps),
worked in cache-sized blocks, against the whole-vector formula it replaced."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from clients.site import _STEP_BLOCK, _steps
from secagg.model import FlatModel


def _reference(model: FlatModel, result: FlatModel) -> tuple[float, float]:
    step = np.abs(result.values - model.values)
    pos = 0
    for t in model.spec:
        dtype = np.dtype(t.dtype)
        end = pos + t.size
        if dtype.kind == "f":
            got = result.values[pos:end].astype(dtype)
            toward = np.nextafter(got, model.values[pos:end].astype(dtype))
            slack = np.abs(got.astype(np.float64) - toward.astype(np.float64)) / 2
            if dtype.itemsize == 4:
                slack += float(np.finfo(dtype).tiny)
            slack += np.abs(result.values[pos:end]) * 2.0**-52
            step[pos:end] -= slack
        pos = end
    step = np.maximum(step, 0.0)
    integer = model.integer_positions
    learned, counters = step[~integer], step[integer]
    return (math.sqrt(float(np.sum(learned * learned))),
            float(counters.max()) if counters.size else 0.0)


@pytest.mark.parametrize("seed", range(12))
def test_steps_in_blocks_are_the_whole_vector_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for i, dtype in enumerate(rng.permutation(["float32", "float16", "float64", "int64",
                                                "bool"])):
        n = int(rng.choice([0, 1, _STEP_BLOCK - 1, _STEP_BLOCK, _STEP_BLOCK + 1,
                            2 * _STEP_BLOCK + 7]))
        if dtype == "bool":
            arrays[f"t{i}"] = rng.integers(0, 2, n).astype(bool)
        elif dtype == "int64":
            arrays[f"t{i}"] = rng.integers(-50, 50, n)
        else:
            arrays[f"t{i}"] = np.clip(rng.normal(0, 100, n), -6e4, 6e4).astype(dtype)
    model = FlatModel.from_arrays(arrays)
    moved = model.values + rng.normal(0, 1, model.size) * (rng.random(model.size) < 0.5)
    result = model.with_values(moved)
    got, want = _steps(model, result), _reference(model, result)
    assert got[0] == pytest.approx(want[0], rel=1e-12, abs=0)
    assert got[1] == want[1]
    assert _steps(model, model) == (0.0, 0.0)


def test_a_step_past_floats_range_is_infinite_not_an_error() -> None:
    model = FlatModel.from_arrays({"w": np.array([-1e308, 0.0])})
    result = model.with_values(np.array([1e308, 1e200]))
    assert _steps(model, result)[0] == math.inf


def test_the_sdk_imports_no_numpy_ma_to_take_a_state_dict() -> None:
    """numpy.ma is a lazy import of ~50 ms a site paid each round's first flatten."""
    code = ("import sys, numpy as np\n"
            "from clients import tensors\n"
            "from secagg.model import FlatModel\n"
            "m = FlatModel.from_arrays({'w': np.zeros(3, np.float32)})\n"
            "tensors.flatten_like({'w': np.ones(3, np.float32)}, m)\n"
            "print('numpy.ma' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
