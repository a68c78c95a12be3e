"""A CKKS aggregation round: configuration, messages, and the value layout.

Layout: ``[weight * clip(update), weight]`` packed into ciphertext chunks of ``slots`` values
(the last chunk zero-padded); decoding keeps exactly ``vector_length + 1`` values.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from secagg._encoding import digest, encode, parts_digest
from secagg._inputs import check_update
from secagg.ckks.keys import KeyAnnouncement
from secagg.ckks.presets import (
    DEFAULT_PRESET,
    Preset,
    get_preset,
    least_weight_sum,
)
from secagg.errors import ConfigurationError, InvalidMessage
from secagg.hazmat import signing
from secagg.hazmat.prg import MAX_WORDS
from secagg.masking.graph import colluders

MIN_SITES = 3


class CkksStage(enum.Enum):
    CKKS_STAGE_UNSPECIFIED = 0
    UPLOAD = 1
    RELEASE = 2
    COMPLETED = 3
    ABORTED = 4
    KEY_ANNOUNCEMENT = 5  # the service waits for the round's key holder to announce its key


def _positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and 2.0**-64 <= v <= 2.0**64):
        raise ConfigurationError(f"{name} must be a finite number in [2**-64, 2**64], got {v}")
    return v


def check_round_parameters(sites: int, *, preset: str, clip: float, max_weight: float,
                           min_sites: int, corrupt_fraction: float) -> int:
    """Check what a CKKS round of ``sites`` roster sites is configured with, before any key
    exists, and return its ``min_sites`` (0 resolved to the default). :class:`CkksRoundConfig`
    runs it on construction; the aggregator runs it as a job starts, so that a configuration
    no round can use is refused then, not at every round's key announcement."""
    if type(sites) is not int or sites < MIN_SITES:
        raise ConfigurationError(f"roster must list at least {MIN_SITES} sites")
    clip = _positive_finite("clip", clip)
    max_weight = _positive_finite("max_weight", max_weight)
    # (a negative one took the weakest min_sites, as 0 does)
    # defence: ckks.round.corrupt-fraction-in-range
    if (isinstance(corrupt_fraction, bool) or not isinstance(corrupt_fraction, int | float)
            or not 0 <= corrupt_fraction < 1):
        raise ConfigurationError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction!r}")
    if not isinstance(preset, str):
        raise ConfigurationError(f"preset must be a preset's name, got {type(preset).__name__}")
    # Colluding sites count toward min_sites but subtract their own updates from the sum:
    # at least two honest sites must remain, or the sum is one site's update.
    # And never fewer than three: an aggregate of two sites hands each the other's update.
    # defence: ckks.round.min-sites-at-least-three
    fewest = max(MIN_SITES, colluders(sites, corrupt_fraction) + 2)
    if type(min_sites) is not int:
        raise ConfigurationError(f"min_sites must be an integer, got {type(min_sites).__name__}")
    if min_sites == 0:
        min_sites = fewest
    # (above the roster's size, no round could ever be released)
    # defence: ckks.round.min-sites-at-most-the-roster
    if not 1 <= min_sites <= sites:
        raise ConfigurationError(
            f"min_sites must be in [{fewest}, {sites}], got {min_sites}")
    # defence: ckks.round.min-sites-beyond-colluders
    if min_sites < fewest:
        raise ConfigurationError(
            f"min_sites={min_sites} lets {fewest - 2} colluding sites and one honest "
            f"site make up a released sum (corrupt_fraction={corrupt_fraction}); it "
            f"must be at least {fewest}")
    p = get_preset(preset)  # raises ConfigurationError for an unknown preset
    n = sites
    worst = n * max(clip * max_weight, max_weight)
    # defence: ckks.round.headroom
    if not worst <= p.max_abs_value:
        raise ConfigurationError(
            f"headroom: {n} sites x clip {clip} x max_weight {max_weight} can sum "
            f"to {worst:g}, beyond the {p.max_abs_value:g} preset {p.name!r} holds safely; "
            "lower clip or max_weight (normalise weights), or pick a preset with more "
            "data bits")
    # CKKS encodes through float64 (an FFT), whose rounding error grows with the values,
    # about worst * 2**-52 a value: past the noise bound B it made every honest round look
    # out of range (nvflare-default's headroom takes sums up to 3e17; at 3 sites a clip of
    # 3e8 failed every round, 2e8 passed). 2**-50 keeps a margin of about 4.
    # defence: ckks.round.values-within-float64-precision
    bound = p.noise_bound(n)
    if not worst * 2.0**-50 <= bound:
        raise ConfigurationError(
            f"precision: {n} sites x clip {clip:g} x max_weight {max_weight:g} can sum to "
            f"{worst:g}, where preset {p.name!r}'s float64 encoding loses more than its "
            f"noise bound ({bound:.3g} a value): every honest round would be "
            "refused; lower clip or max_weight")
    # (the key holder refuses a release whose weight sum is below least_weight_sum: if
    # even every site at max_weight is below it, no round could ever be released, and it
    # would show only once every site had encrypted and the round was spent)
    # defence: ckks.round.some-weight-sum-releasable
    least = least_weight_sum(p, n, clip)
    if not n * max_weight >= least:
        raise ConfigurationError(
            f"no round could be released: the key holder takes a weight sum of at least "
            f"{least:.3g} (preset {p.name!r}'s release noise under a tenth of clip "
            f"{clip:g} and of the weight sum), and {n} sites at max_weight {max_weight:g} "
            f"sum to {n * max_weight:g}; raise clip or max_weight")
    return min_sites


@dataclass(frozen=True)
class CkksRoundConfig:
    """What the sites, key holders and aggregator agree on before a CKKS round.

    Parameters
    ----------
    round_id: unique name of the round; uploads are bound to it.
    roster: site id -> the site's Ed25519 identity public key (32 bytes).
    announcement: the round's key, as announced and signed by the key holder that made it
        (:class:`~secagg.ckks.keys.KeyAnnouncement`). Its signature is checked here, against
        the roster, before any site can encrypt: nobody else can name the round's key.
    key_holders: the sites that hold the secret key and may release the aggregate (the
        announcing holder among them).
    vector_length: update elements per site (the weight is one more value).
    preset: CKKS parameters (see :mod:`secagg.ckks.presets`); must be the announced one.
    clip, max_weight: each update element is clipped to [-clip, clip]; 0 < weight <= max_weight.
    min_sites: the aggregate of fewer sites is never released; 0 (the default) picks
        colluders + 2, also the least allowed, so any released sum covers two honest sites.
    corrupt_fraction: the fraction of sites that may collude with the aggregator.
    epoch: the key's validity label this round belongs to (default: the round id, i.e. a fresh
        key per round); must equal the announcement's.
    model_digest: the digest of the model the round's updates are computed against (32
        bytes), or empty. Uploads are signed over it, so a key holder handed one model
        refuses uploads computed against another: an aggregator cannot give sites different
        models to isolate one site's update in the released sum.

    Notes
    -----
    The aggregator never holds the secret key and only adds. A key holder decrypts only a sum
    it has recomputed itself from at least ``min_sites`` uploads signed by distinct roster
    sites for this round and key, releases only in-range values with flooding noise, and at
    most once per round and ``max_rounds`` rounds per key. Which adversaries this stops, and
    what remains, is in the README's security section.
    """

    round_id: str
    roster: Mapping[int, bytes]
    announcement: KeyAnnouncement
    key_holders: tuple[int, ...]
    vector_length: int
    preset: str = DEFAULT_PRESET
    clip: float = 1.0
    max_weight: float = 1.0
    min_sites: int = 0
    corrupt_fraction: float = 0.2
    epoch: str | None = None
    model_digest: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, str) or not self.round_id:
            raise ConfigurationError("round_id must be a non-empty string")
        if not isinstance(self.model_digest, bytes) or len(self.model_digest) not in (0, 32):
            raise ConfigurationError("model_digest must be 32 bytes (or empty: no model)")
        if not isinstance(self.roster, Mapping) or len(self.roster) < MIN_SITES:
            raise ConfigurationError(f"roster must list at least {MIN_SITES} sites")
        for site, key in self.roster.items():
            if type(site) is not int or not 0 < site < 2**63:
                raise ConfigurationError(
                    f"roster site ids must be integers in [1, 2**63), got {site!r}")
            if not isinstance(key, bytes) or len(key) != signing.PUBLIC_KEY_BYTES:
                raise ConfigurationError(f"roster key of site {site} must be 32 bytes")
        # defence: ckks.round.one-key-per-site
        if len(set(self.roster.values())) != len(self.roster):
            raise ConfigurationError("roster lists the same identity key for two sites (one "
                                     "party would count as two toward min_sites)")
        if (not isinstance(self.key_holders, tuple) or not self.key_holders
                or not all(type(h) is int for h in self.key_holders)
                # defence: ckks.round.key-holders-on-roster
                or not set(self.key_holders) <= set(self.roster)
                or len(set(self.key_holders)) != len(self.key_holders)):
            raise ConfigurationError(
                "key_holders must be a non-empty tuple of distinct roster sites")
        if (isinstance(self.vector_length, bool) or not isinstance(self.vector_length, int)
                # defence: ckks.round.vector-length-bounded
                or not 1 <= self.vector_length < MAX_WORDS):
            # (the masking protocol's bound, far beyond any model a site sends: a length past
            # it is a slip, refused here rather than as a multi-gigabyte layout)
            raise ConfigurationError(
                f"vector_length must be in [1, 2**31 - 1], got {self.vector_length}")
        object.__setattr__(self, "min_sites", check_round_parameters(
            len(self.roster), preset=self.preset, clip=self.clip, max_weight=self.max_weight,
            min_sites=self.min_sites, corrupt_fraction=self.corrupt_fraction))
        if self.epoch is None:
            object.__setattr__(self, "epoch", self.round_id)
        elif not isinstance(self.epoch, str) or not self.epoch:
            raise ConfigurationError("epoch must be a non-empty string")
        self._check_announcement()

    def _check_announcement(self) -> None:
        a = self.announcement
        if not isinstance(a, KeyAnnouncement):
            raise ConfigurationError("announcement must be a KeyAnnouncement")
        # defence: ckks.round.announcer-is-a-key-holder
        if a.holder not in self.key_holders:
            raise ConfigurationError(f"the key was announced by site {a.holder}, which is not "
                                     "among the round's key holders")
        try:
            # defence: ckks.round.announcement-verified
            a.verify(self.roster)
        except InvalidMessage:
            raise ConfigurationError(
                f"the key announcement is not signed by key holder {a.holder}") from None
        # defence: ckks.round.announced-preset
        if a.preset != self.preset:
            raise ConfigurationError(
                f"the key was announced for preset {a.preset!r}, the round uses {self.preset!r}")
        # defence: ckks.round.announced-epoch
        if a.epoch != self.epoch:
            raise ConfigurationError(
                f"the key is valid for epoch {a.epoch!r}, not for this round's {self.epoch!r}")

    @property
    def key_id(self) -> bytes:
        return self.announcement.key_id

    @cached_property
    def preset_params(self) -> Preset:
        return get_preset(self.preset)

    @property
    def chunk_count(self) -> int:
        return -(-(self.vector_length + 1) // self.preset_params.slots)

    @cached_property
    def params_digest(self) -> bytes:
        roster = b"".join(s.to_bytes(8, "big") + self.roster[s] for s in sorted(self.roster))
        # defence: ckks.round.params-binds-round-id, ckks.round.params-binds-roster
        return digest("ckks-round-params", self.round_id, roster,
                      # defence: ckks.round.params-binds-announcement
                      # defence: ckks.round.params-binds-key-holders
                      self.announcement.signed_bytes(), sorted(self.key_holders),
                      # defence: ckks.round.params-binds-vector-length, ckks.round.params-binds-clip
                      self.vector_length, self.preset, repr(float(self.clip)),
                      # defence: ckks.round.params-binds-max-weight
                      # defence: ckks.round.params-binds-min-sites
                      repr(float(self.max_weight)), self.min_sites, str(self.epoch),
                      # defence: ckks.round.params-binds-corrupt-fraction
                      repr(float(self.corrupt_fraction)),
                      # defence: ckks.round.params-binds-model
                      *((self.model_digest,) if self.model_digest else ()))

    def value_bounds(self, sites: int) -> tuple[float, float]:
        """(max |weighted sum element|, max weight sum) of an honest aggregate of ``sites``."""
        return sites * self.clip * self.max_weight, sites * self.max_weight

    def check_input(self, update: object, weight: object) -> tuple[np.ndarray, float]:
        return check_update(update, weight, max_weight=self.max_weight, length=self.vector_length)

    def layout(self, update: np.ndarray, weight: float) -> np.ndarray:
        """The padded ``(chunk_count, slots)`` array a site encrypts. Checks the input."""
        update, weight = self.check_input(update, weight)
        out = np.zeros(self.chunk_count * self.preset_params.slots, dtype=np.float64)
        # defence: ckks.round.layout-clips
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
                     chunks: Sequence[bytes], *, chunks_digest: bytes | None = None) -> bytes:
        """What the site signs. ``chunks_digest``: ``parts_digest(chunks)`` if the caller
        already has it (never taken from the network: computed from the chunks it checks)."""
        if chunks_digest is None:
            chunks_digest = parts_digest(chunks)
        # defence: ckks.round.upload-binds-round
        return encode("ckks-update", params_digest, site_id, key_id, int(seeded),
                      # defence: ckks.round.upload-binds-chunks
                      chunks_digest)

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class EncryptedAggregate:
    """The homomorphic sum, for the key holders. The aggregator cannot read it.

    A key holder does not take the aggregator's word for it: it recomputes the sum from the
    signed uploads of ``sites`` (which the aggregator forwards) and refuses a mismatch."""

    round_id: str
    key_id: bytes
    sites: tuple[int, ...]
    chunks: tuple[bytes, ...]


@dataclass(frozen=True)
class ReleaseRequest:
    """What the aggregator sends a key holder: its sum and the signed uploads it summed (an
    iterable, so that a service can stream them from its store)."""

    aggregate: EncryptedAggregate
    uploads: Iterable[EncryptedUpdate]


@dataclass(frozen=True)
class ReleasedAverage:
    """What a key holder releases: the weighted average, flooded and rounded to ``grid``."""

    average: np.ndarray
    weight_sum: float
    round_id: str
    sites: tuple[int, ...]
    grid: float


def check_update_fields(update: object) -> None:
    """Every field of an upload has its type and size, or the opaque InvalidMessage."""
    if not isinstance(update, EncryptedUpdate):
        raise InvalidMessage("upload")
    # (exact types: a tuple subclass claiming another length was taken with no chunks, and
    # every honest upload after it raised from zip)
    ok = (type(update.round_id) is str
          and type(update.key_id) is bytes and len(update.key_id) == 32
          # defence: ckks.round.upload-site-id-is-int
          and type(update.site_id) is int and 0 < update.site_id < 2**63
          and isinstance(update.seeded, bool)
          and type(update.signature) is bytes and len(update.signature) == 64
          # defence: ckks.round.upload-chunks-tuple
          and type(update.chunks) is tuple
          and all(type(c) is bytes for c in update.chunks))
    if not ok:
        raise InvalidMessage("upload")
