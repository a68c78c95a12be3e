"""Quantisation of weighted model updates into words that sum without wrapping.

Layout of an encoded vector: ``[weight * clip(update), weight]`` — the weight rides in one extra
element so the aggregate yields the weighted average without a plaintext weight on the wire.

- each update element is clipped to ``[-clip, clip]`` and multiplied by the site's weight
  (``0 < weight <= max_weight``), so weighted elements lie in ``[-R, R]``, ``R = clip*max_weight``;
- values are shifted to be non-negative and scaled onto ``levels`` integer steps, with
  ``levels = floor(min(2**word_bits - 1, 2**53) / max_sites)`` so that the sum of ``max_sites``
  encoded vectors never wraps and stays exact in float64: decoding is exact;
- rounding is stochastic, its uniforms drawn from an AES-CTR keystream under a fresh 256-bit
  key from ``os.urandom``: never numpy's global RNG. It works in float64, so it has
  :attr:`Quantizer.rounding_bits` = ``min(32, 52 - bit_length(levels))`` random bits: plenty
  with 32-bit words (21 or more), but with 64-bit words ``levels`` already uses float64's whole
  precision, so few sites leave few: for 4 or fewer sites there are *zero* random bits and
  rounding is a plain floor, and 5 to 8 sites get one bit, 2**20 sites 18 bits. A floor is
  biased by up to one step (about ``2**-51`` of the range
  per element, far below the precision of the float64 inputs themselves). With ``b`` bits the
  rounding is unbiased to within ``2**-b`` of a step. Use 32-bit words when unbiased rounding
  matters more than resolution;
- error bound: each encoded value is within one step of the exact scaled value, so a decoded
  sum of ``n`` vectors is within ``n / scale`` of the exact sum of the clipped, weighted inputs
  (``scale`` = :attr:`Quantizer.update_scale` for update elements, :attr:`weight_scale` for the
  weight). :meth:`Quantizer.error_bound` returns these.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import numpy as np

from secagg._inputs import check_update
from secagg.hazmat.prg import MaskExpander, word_dtype

# Decoding goes through float64, exact for integers up to 2**53: the *sum* must stay below it.
_MAX_EXACT_SUM = 2**53


@dataclass(frozen=True)
class Quantizer:
    clip: float
    max_weight: float
    max_sites: int
    word_bits: int = 32

    def __post_init__(self) -> None:
        word_dtype(self.word_bits)
        # (a numpy integer, which word_dtype takes, is held as an int: 2**numpy.int64(64)
        # wraps to 0, and the quantiser then claimed it had no precision)
        # defence: hazmat.quantize.word-bits-as-int
        object.__setattr__(self, "word_bits", int(self.word_bits))
        # defence: hazmat.quantize.bounds-are-real-numbers
        # (a str or None made numpy raise from deep inside; True passed as a clip of 1)
        for name in ("clip", "max_weight"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
            # defence: hazmat.quantize.bounds-taken-as-floats
            try:  # one type from here on (a Fraction or numpy.float32 is not a ufunc input)
                object.__setattr__(self, name, float(value))
            # defence: hazmat.quantize.bounds-in-float-range
            except OverflowError:
                raise ValueError(f"{name} is beyond the float range") from None
        # defence: hazmat.quantize.clip-finite, hazmat.quantize.clip-positive
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        # defence: hazmat.quantize.max-weight-positive
        if not (np.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"max_weight must be a positive finite number, got {self.max_weight}")
        # defence: hazmat.quantize.max-sites-positive
        if (not isinstance(self.max_sites, numbers.Integral) or isinstance(self.max_sites, bool)
                or self.max_sites < 1):
            raise ValueError(f"max_sites must be an int >= 1, got {self.max_sites!r}")
        object.__setattr__(self, "max_sites", int(self.max_sites))
        # (one level a site: every update encoded to 0 or 1)
        # defence: hazmat.quantize.levels-two-at-least
        if self.levels < 2:
            raise ValueError(
                f"word_bits={self.word_bits} leaves no precision for max_sites={self.max_sites}"
            )
        # clip * max_weight, and the scales derived from it, must be normal floats: a range
        # that overflows made every update encode to 0, a subnormal one an infinite scale
        # defence: hazmat.quantize.range-and-scales-finite
        # (the largest factor encode multiplies by: weight * update_scale * 2**rounding_bits)
        if not all(np.isfinite(v) and v >= np.finfo(np.float64).tiny for v in
                   (self.update_range, self.update_scale, self.weight_scale,
                    self.max_weight * self.update_scale * 2.0**32)):
            raise ValueError(f"clip * max_weight must be a normal, finite float: clip "
                             f"{self.clip} and max_weight {self.max_weight} are out of range")

    @property
    def levels(self) -> int:
        # defence: hazmat.quantize.levels-per-site, hazmat.quantize.levels-below-word
        # defence: hazmat.quantize.exact-float-sum
        return int(min(2**self.word_bits - 1, _MAX_EXACT_SUM)) // self.max_sites

    @property
    def update_range(self) -> float:
        return self.clip * self.max_weight

    @property
    def update_scale(self) -> float:
        return self.levels / (2.0 * self.update_range)

    @property
    def weight_scale(self) -> float:
        return self.levels / self.max_weight

    @property
    def rounding_bits(self) -> int:
        """Random bits per stochastic rounding (0: a floor; see the module docstring)."""
        return min(32, max(0, 52 - self.levels.bit_length()))

    def error_bound(self, n_summed: int) -> tuple[float, float]:
        """Max abs error of a decoded sum of ``n_summed`` vectors: (update elements, weight)."""
        self._check_n_summed(n_summed)
        return n_summed / self.update_scale, n_summed / self.weight_scale

    def encode(self, update: np.ndarray, weight: float, *, length: int | None = None) -> np.ndarray:
        """``len(update) + 1`` words: the weighted, clipped, quantised update, then the weight."""
        update, weight = check_update(update, weight, max_weight=self.max_weight, length=length)
        # Work in units of 2**-f steps, f chosen so every value stays below 2**52: adding an
        # f-bit uniform integer and flooring is then exact float arithmetic.
        f = self.rounding_bits
        unit = 2.0**f
        u_scale = weight * self.update_scale * unit
        offset = self.update_range * self.update_scale * unit
        half_width = self.clip * weight * self.update_scale * unit
        scaled = np.empty(update.shape[0] + 1, dtype=np.float64)
        # (a finite value past ~1e292 overflows to +-inf here, which the clip below brings back
        # to the bound: not worth numpy's RuntimeWarning on the site's console)
        # defence: hazmat.quantize.overflow-quiet
        with np.errstate(over="ignore"):
            np.multiply(update, u_scale, out=scaled[:-1])
            scaled[:-1] += offset
        # clipping after scaling == clipping the update to [-clip, clip] (weight > 0)
        # defence: hazmat.quantize.clip-update
        np.clip(scaled[:-1], offset - half_width, offset + half_width, out=scaled[:-1])
        scaled[-1] = weight * self.weight_scale * unit
        return self._stochastic_round(scaled, f)

    def _stochastic_round(self, scaled: np.ndarray, f: int) -> np.ndarray:
        """floor(x + u), u uniform on the 2**-f grid in [0, 1): rounds up with probability
        frac(x) (to within 2**-f), so the result is unbiased and within one step of x."""
        # defence: hazmat.quantize.csprng-rounding
        uniforms = MaskExpander(scaled.shape[0], word_bits=32).view(os.urandom(32))
        if f < 32:
            np.right_shift(uniforms, 32 - f, out=uniforms)
        # defence: hazmat.quantize.unbiased-rounding
        np.add(scaled, uniforms, out=scaled)
        scaled *= 2.0**-f
        np.floor(scaled, out=scaled)
        np.minimum(scaled, self.levels, out=scaled)  # float rounding at the very top
        return scaled.astype(word_dtype(self.word_bits))

    def _check_n_summed(self, n_summed: int) -> None:
        # defence: hazmat.quantize.n-summed-is-an-int
        # (1.5 sites decoded to a silently wrong sum)
        if not isinstance(n_summed, numbers.Integral) or isinstance(n_summed, bool):
            raise ValueError(f"n_summed must be an int, got {type(n_summed).__name__}")
        # defence: hazmat.quantize.decode-within-max-sites
        if not 0 < n_summed <= self.max_sites:
            raise ValueError(f"n_summed must be in [1, {self.max_sites}], got {n_summed}")

    def decode_sum(self, summed: np.ndarray, n_summed: int) -> tuple[np.ndarray, float]:
        """(sum of weighted updates, sum of weights) from the sum of ``n_summed`` encodings."""
        self._check_n_summed(n_summed)
        # defence: hazmat.quantize.decode-shape
        if not isinstance(summed, np.ndarray) or summed.ndim != 1 or summed.size < 1:
            raise ValueError("summed must be a 1-D array of encoded elements and the weight")
        # defence: hazmat.quantize.decode-word-dtype
        # (a float, signed or wider array is not a sum of encodings taken modulo 2**word_bits:
        # decoding it would be silently wrong, and a str array made numpy raise from inside)
        if summed.dtype != word_dtype(self.word_bits):
            raise ValueError(f"summed must hold {self.word_bits}-bit unsigned words, got dtype "
                             f"{summed.dtype}")
        values = summed.astype(np.float64)
        weighted = values[:-1] / self.update_scale - n_summed * self.update_range
        return weighted, float(values[-1] / self.weight_scale)
