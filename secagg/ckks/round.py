"""A CKKS aggregation round: configuration, messages, and the value layout.

Layout: ``[weight * clip(update), weight]`` packed into ciphertext chunks of ``slots`` values
(the last chunk zero-padded); decoding keeps exactly ``vector_length + 1`` values.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from secagg._encoding import digest, encode, parts_digest
from secagg._inputs import check_update
from secagg.ckks.presets import DEFAULT_PRESET, Preset, get_preset
from secagg.errors import ConfigurationError
from secagg.hazmat import signing

MIN_SITES = 3


class CkksStage(enum.Enum):
    CKKS_STAGE_UNSPECIFIED = 0
    UPLOAD = 1
    RELEASE = 2
    COMPLETED = 3
    ABORTED = 4


@dataclass(frozen=True)
class CkksRoundConfig:
    """What the sites, key holders and aggregator agree on before a CKKS round.

    Parameters
    ----------
    round_id: unique name of the round; uploads are bound to it.
    roster: site id -> the site's Ed25519 identity public key (32 bytes).
    key_id: the round's CKKS key (``KeyHolder.key_id``); uploads under another key are refused.
    key_holders: the sites that hold the secret key and decrypt the aggregate.
    vector_length: update elements per site (the weight is one more value).
    preset: CKKS parameters (see :mod:`secagg.ckks.presets`).
    clip, max_weight: each update element is clipped to [-clip, clip]; 0 < weight <= max_weight.
    min_sites: the aggregate of fewer sites is never released.

    Notes
    -----
    The aggregator never holds the secret key and only adds. Key holders see the aggregate of
    at least ``min_sites`` sites, never one site's update -- provided the aggregator really
    sums (a key holder cannot tell a sum from one ciphertext relabelled as one; a decryption
    committee or threshold CKKS would remove that trust, see DESIGN.md).
    """

    round_id: str
    roster: Mapping[int, bytes]
    key_id: bytes
    key_holders: tuple[int, ...]
    vector_length: int
    preset: str = DEFAULT_PRESET
    clip: float = 1.0
    max_weight: float = 1.0
    min_sites: int = MIN_SITES

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, str) or not self.round_id:
            raise ConfigurationError("round_id must be a non-empty string")
        if len(self.roster) < MIN_SITES:
            raise ConfigurationError(f"roster must list at least {MIN_SITES} sites")
        for site, key in self.roster.items():
            if not isinstance(site, int) or site < 1:
                raise ConfigurationError(f"roster site ids must be integers >= 1, got {site!r}")
            if not isinstance(key, bytes) or len(key) != signing.PUBLIC_KEY_BYTES:
                raise ConfigurationError(f"roster key of site {site} must be 32 bytes")
        if not isinstance(self.key_id, bytes) or len(self.key_id) != 32:
            raise ConfigurationError("key_id must be 32 bytes")
        if not self.key_holders or not set(self.key_holders) <= set(self.roster):
            raise ConfigurationError("key_holders must be a non-empty subset of the roster")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ConfigurationError(f"vector_length must be >= 1, got {self.vector_length}")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ConfigurationError(f"clip must be a positive finite number, got {self.clip}")
        if not (np.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigurationError(
                f"max_weight must be a positive finite number, got {self.max_weight}")
        if not MIN_SITES <= self.min_sites <= len(self.roster):
            raise ConfigurationError(
                f"min_sites must be in [{MIN_SITES}, {len(self.roster)}], got {self.min_sites}")
        p = self.preset_params  # raises ConfigurationError for an unknown preset
        n = len(self.roster)
        worst = n * max(self.clip * self.max_weight, self.max_weight)
        if worst > p.max_abs_value:
            raise ConfigurationError(
                f"headroom: {n} sites x clip {self.clip} x max_weight {self.max_weight} can sum "
                f"to {worst:g}, beyond the {p.max_abs_value:g} preset {p.name!r} holds safely; "
                "lower clip or max_weight (normalise weights), or pick a preset with more "
                "data bits")

    @cached_property
    def preset_params(self) -> Preset:
        return get_preset(self.preset)

    @property
    def chunk_count(self) -> int:
        return -(-(self.vector_length + 1) // self.preset_params.slots)

    @cached_property
    def params_digest(self) -> bytes:
        roster = b"".join(s.to_bytes(8, "big") + self.roster[s] for s in sorted(self.roster))
        return digest("ckks-round-params", self.round_id, roster, self.key_id,
                      sorted(self.key_holders), self.vector_length, self.preset,
                      repr(float(self.clip)), repr(float(self.max_weight)), self.min_sites)

    def check_input(self, update: object, weight: object) -> tuple[np.ndarray, float]:
        return check_update(update, weight, max_weight=self.max_weight, length=self.vector_length)

    def layout(self, update: np.ndarray, weight: float) -> np.ndarray:
        """The padded ``(chunk_count, slots)`` array a site encrypts. Checks the input."""
        update, weight = self.check_input(update, weight)
        out = np.zeros(self.chunk_count * self.preset_params.slots, dtype=np.float64)
        np.clip(update, -self.clip, self.clip, out=out[: self.vector_length])
        out[: self.vector_length] *= weight
        out[self.vector_length] = weight
        return out.reshape(self.chunk_count, self.preset_params.slots)


@dataclass(frozen=True)
class EncryptedUpdate:
    """One site's weighted update as CKKS ciphertext chunks, bound to round and key."""

    round_id: str
    key_id: bytes
    site_id: int
    chunks: tuple[bytes, ...]
    seeded: bool
    signature: bytes

    @staticmethod
    def signed_bytes(params_digest: bytes, site_id: int, key_id: bytes, seeded: bool,
                     chunks: Sequence[bytes]) -> bytes:
        return encode("ckks-update", params_digest, site_id, key_id, int(seeded),
                      parts_digest(chunks))

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class EncryptedAggregate:
    """The homomorphic sum, for the key holders. The aggregator cannot read it."""

    round_id: str
    key_id: bytes
    sites: tuple[int, ...]
    chunks: tuple[bytes, ...]


@dataclass(frozen=True)
class ReleasedAverage:
    """What a key holder releases: the weighted average, rounded to ``grid``."""

    average: np.ndarray
    weight_sum: float
    sites: tuple[int, ...]
    grid: float
