"""CKKS parameter presets, each checked against the HomomorphicEncryption.org 128-bit table.

The table (Albrecht et al., "Homomorphic Encryption Security Standard", 2018, Table 1, classical
128-bit security, ternary secret) bounds log2 Q, the total bits of the coefficient modulus, for
each ring degree N. A preset above it is refused at construction, whoever made it.

For an add-only workload the last prime of ``coeff_mod_bit_sizes`` is SEAL's special (key
switching) prime; fresh ciphertexts live at the level of the other primes ("data primes"), so
only those count toward a ciphertext's size, and they bound the values it can hold:
``|value| * 2**scale_bits < 2**(data_bits - 1)``. We keep a further factor of 2 of headroom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secagg.errors import ConfigurationError

# N -> max log2 Q for 128-bit classical security (HE standard, Table 1)
# defence: ckks.presets.table-is-the-standards
MAX_LOG_Q_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Release noise: a key holder floods each released value with Gaussian noise of standard
# deviation FLOOD_FACTOR x noise_bound. An adversarial term that survives the release checks
# (imaginary parts and padding within the noise bound) is then 2**-6 of the noise per slot; see
# secagg/ckks/release.py for what that buys.
# defence: ckks.presets.flooding-far-above-decryption-noise
FLOOD_FACTOR = 64.0
TAIL = 12.0  # a flooding draw beyond TAIL sigma: probability below 4e-33 a value
# The most noise a released average may carry, as a share of the clip and of the weight sum:
# below, the weight sum is too small for the release to be anything but noise (and one site's
# negative weight, cancelling the others', could amplify the sum past the clip through it)
MAX_NOISE_SHARE = 0.1
MIN_PRIME_BITS = 20
MAX_PRIME_BITS = 60  # SEAL's limit for one prime
ERROR_STDDEV = 3.2  # SEAL's noise standard deviation (seal/util/globals.h: 3.2)


@dataclass(frozen=True)
class Preset:
    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in MAX_LOG_Q_128:
            raise ConfigurationError(
                f"poly_modulus_degree must be one of {sorted(MAX_LOG_Q_128)}, got {n}")
        bits = tuple(self.coeff_mod_bit_sizes)
        if len(bits) < 2:
            raise ConfigurationError(
                "coeff_mod_bit_sizes needs at least two primes (data primes + special prime), "
                f"got {list(bits)}")
        for b in bits:
            if not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS:
                raise ConfigurationError(
                    f"coeff_mod_bit_sizes entries must be in [{MIN_PRIME_BITS}, "
                    f"{MAX_PRIME_BITS}], got {b}")
        # defence: ckks.presets.within-the-128-bit-table
        if sum(bits) > MAX_LOG_Q_128[n]:
            raise ConfigurationError(
                f"preset {self.name!r} is below 128-bit security: log2 Q = {sum(bits)} exceeds "
                f"{MAX_LOG_Q_128[n]} for poly_modulus_degree={n} (HomomorphicEncryption.org table)")
        # defence: ckks.presets.scale-below-data-bits
        if not 0 < self.scale_bits < self.data_bits - 1:
            raise ConfigurationError(
                f"scale_bits must be in [1, {self.data_bits - 2}] for data primes of "
                f"{self.data_bits} bits, got {self.scale_bits}")
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def max_abs_value(self) -> float:
        """The largest |value| a (summed) ciphertext may hold, with a factor 2 of headroom."""
        return float(2 ** (self.data_bits - 1 - self.scale_bits - 1))

    def noise_bound(self, summed: int) -> float:
        """A high-probability bound on the per-slot error of a sum of ``summed`` fresh
        ciphertexts: 4 * sigma * N * sqrt(n) / scale. Measured errors here sit about 10x below
        it (tests/property/test_ckks_noise.py asserts they stay below)."""
        return 4.0 * ERROR_STDDEV * self.poly_modulus_degree * math.sqrt(summed) / self.scale


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # The default for add-only rounds: log2 Q = 100 <= 109; 28.8 bytes per value public-key,
        # about half that seeded.
        Preset("add-only-4096", 4096, (50, 50), 38),
        # More headroom and precision at twice the bytes: log2 Q = 120 <= 218.
        Preset("add-only-8192", 8192, (60, 60), 40),
        # NVIDIA FLARE's default TenSEAL configuration, for comparison and interoperation.
        Preset("nvflare-default", 8192, (60, 40, 40), 40),
    )
}
DEFAULT_PRESET = "add-only-4096"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    # (a list raised TypeError: unhashable)
    except (KeyError, TypeError):
        raise ConfigurationError(f"unknown preset {name!r:.60}; known presets: "
                                 f"{', '.join(sorted(PRESETS))}") from None


def release_noise(params: Preset, sites: int) -> tuple[float, float]:
    """(sigma of a release's flooding noise, per-value CKKS error plus the rounding to the
    release's grid) for a sum of ``sites`` uploads."""
    bound = params.noise_bound(sites)
    grid = 2.0 ** math.ceil(math.log2(bound))
    return FLOOD_FACTOR * bound, bound + grid / 2


def least_weight_sum(params: Preset, sites: int, clip: float) -> float:
    """The least weight sum whose release the key holder takes: the per-value noise (a
    TAIL-sigma flooding draw, CKKS's error, the rounding) at most MAX_NOISE_SHARE of ``clip``
    times it in each element, and of the weight sum itself (so that it is positive)."""
    sigma, per_value = release_noise(params, sites)
    # defence: ckks.release.weight-sum-noise-held-to-the-weight-sum
    return (TAIL * sigma + per_value) / (MAX_NOISE_SHARE * min(clip, 1.0))
