"""The L2 norm of a float64 vector without BLAS, shared by the SDK and the aggregator.

``np.linalg.norm`` and ``np.dot(v, v)`` are OpenBLAS's ``ddot``, whose worker threads then
busy-wait ~0.1 s for more work: ~0.1 CPU-s taken from a training script (or from the other
sites and the aggregator on a shared machine) for a sum that takes ~2 ms.
"""

from __future__ import annotations

import math

import numpy as np

_NORM_BLOCK = 1 << 18  # values squared at once: a 2 MiB temporary, not one the model's size


def l2_norm(values: np.ndarray) -> float:
    """The L2 norm of a float64 vector, block by block, without BLAS (module docstring); an
    infinite norm only for a vector holding infinity (squares past float64's range are
    summed scaled)."""
    with np.errstate(over="ignore"):
        total = _sum_of_squares(values, 1.0)
    if math.isinf(total) and values.size:
        # the squares overflowed (values beyond ~1e154): again, scaled by the largest, so a
        # finite vector has a finite norm (an infinite one was clipped to all zeros)
        # defence: sdk.norm-without-overflow
        largest = float(np.max(np.abs(values)))
        if math.isfinite(largest):
            return largest * math.sqrt(_sum_of_squares(values, largest))
    return math.sqrt(total)


def _sum_of_squares(values: np.ndarray, scale: float) -> float:
    total = 0.0
    square = np.empty(min(values.size, _NORM_BLOCK))
    for start in range(0, values.size, _NORM_BLOCK):
        part = square[:min(_NORM_BLOCK, values.size - start)]
        if scale == 1.0:
            np.square(values[start:start + part.size], out=part)
        else:
            np.divide(values[start:start + part.size], scale, out=part)
            np.square(part, out=part)
        total += float(part.sum())
    return total
