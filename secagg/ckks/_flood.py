"""The release's flooding noise: Gaussian samples from an AES-256-CTR stream.

Sample ``i`` depends on stream words ``i - i % 2`` and ``i - i % 2 + 1`` alone (one
Box-Muller pair: the cosine output at the even index, the sine at the odd), so a shard can draw
the noise of its own index range, starting at any even index, and the shards' noise is exactly
the whole vector's.
"""

from __future__ import annotations

import numpy as np

from secagg.hazmat.prg import MaskExpander


def gaussian(count: int, sigma: float, key: bytes, *, start: int = 0) -> np.ndarray:
    """Samples ``[start, start + count)`` of the N(0, sigma^2) sequence under ``key``."""
    if start < 0 or start % 2:
        raise ValueError(f"start must be even and >= 0, got {start}")
    pairs = (count + 1) // 2
    words = MaskExpander(2 * pairs, word_bits=32, start_word=start).view(key).reshape(pairs, 2)
    radius = np.log((words[:, 0] + 1.0) * 2.0**-32)  # ln of a uniform in (0, 1]
    radius *= -2.0
    np.sqrt(radius, out=radius)
    radius *= sigma
    angle = words[:, 1] * (2.0 * np.pi * 2.0**-32)
    out = np.empty((pairs, 2))
    np.cos(angle, out=out[:, 0])
    np.sin(angle, out=out[:, 1])
    out *= radius[:, None]
    return out.reshape(-1)[:count]
