"""How a key holder turns an encrypted aggregate into a released average, and why it is safe.

Decrypting a ciphertext nobody verified leaks the secret key: for (c0, c1) = (0, c) the
decryption is c * s. So a key holder never decrypts what it is handed. :class:`Release`:

1. takes the signed uploads one by one (:meth:`Release.add`): each must be for this round and
   key, signed by its roster site, from a site not seen before, and parse canonically; it adds
   them itself (memory: one running sum, as the aggregator's);
2. at :meth:`Release.finish` requires at least ``min_sites`` of them and the exact site list
   the aggregator claims, and compares its own sum with the aggregator's, byte for byte
   (a mismatch is AGGREGATE_MISMATCH: the aggregator lied or erred);
3. decrypts its own sum, and refuses to release unless every value is one an honest round can
   produce: imaginary parts and padding slots within the noise bound B, weighted elements
   within ``sites * clip * max_weight`` and the weight sum within ``(0, sites * max_weight]``
   (each plus B);
4. adds Gaussian flooding noise of standard deviation ``FLOOD_FACTOR * B`` drawn from AES-CTR
   keyed by HMAC(flood key, aggregate): deterministic, so every release of one aggregate, by
   any holder of the key, is identical and averaging releases removes nothing; then rounds to
   a power-of-two grid at least B and divides;
5. records the release: one aggregate per round, at most ``max_rounds`` rounds per key.

What this leaves (also in the README): a site's own upload is never checked for being a fresh
encryption, so a malicious site can add a term c * s to its ciphertext. Step 3 bounds that
term: to pass, its imaginary part must stay within B in every slot, so it is about B / 64 of
the flooding noise per slot, and recovering the 4096 ternary coefficients of s from one
release would need of the order of 64**2 * 4096 / (fraction of slots it controls) slots per
coefficient: far beyond one round's model (a heuristic signal-to-noise argument, not a proof).
A site learning s gains nothing alone (only the aggregator holds the uploads), and keys are
fresh per round by default. In seeded mode every site holds the key anyway: a site colluding
with the aggregator reads everything. Masking is the protocol for that adversary.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from tenseal import sealapi

from secagg._encoding import encode
from secagg.ckks import _seal
from secagg.ckks.keys import KeyHolder
from secagg.ckks.presets import FLOOD_FACTOR
from secagg.ckks.round import (
    CkksRoundConfig,
    EncryptedAggregate,
    EncryptedUpdate,
    ReleasedAverage,
    check_update_fields,
)
from secagg.errors import (
    AbortReason,
    InvalidMessage,
    ProtocolAbort,
    RefusalReason,
    RefusedMessage,
)
from secagg.hazmat import signing
from secagg.hazmat.prg import MaskExpander


def gaussian(count: int, sigma: float, key: bytes) -> np.ndarray:
    """N(0, sigma^2) samples from an AES-256-CTR stream under ``key`` (Box-Muller)."""
    words = MaskExpander(2 * count, word_bits=32).view(key).astype(np.float64)
    u1 = (words[:count] + 1.0) * 2.0**-32  # (0, 1]
    u2 = words[count:] * 2.0**-32
    return sigma * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class Release:
    """One key holder's verification and release of one round's aggregate."""

    def __init__(self, holder: KeyHolder, config: CkksRoundConfig, *, site_id: int) -> None:
        if not isinstance(holder, KeyHolder):
            raise TypeError("holder must be a KeyHolder")
        # defence: ckks.release.holder-holds-the-rounds-key
        if holder.key_id != config.key_id:
            raise RefusedMessage(RefusalReason.WRONG_KEY_ID, "this holder's key is not the round's")
        # One site releases a round: the one that announced its key. Two holders of one key
        # keep two ledgers; if both released, one could be shown all sites and the other all
        # but one, and the difference is that site's update.
        # defence: ckks.release.only-the-announcing-holder
        if type(site_id) is not int or site_id != config.announcement.holder:
            raise RefusedMessage(RefusalReason.NOT_THE_RELEASING_HOLDER,
                                 f"round {config.round_id!r} is released by site "
                                 f"{config.announcement.holder} alone")
        self._holder = holder
        self._config = config
        self._context = holder.seal_context
        self._evaluator = sealapi.Evaluator(self._context)
        self._sum: list[Any] | None = None
        self._sites: set[int] = set()

    def add(self, update: EncryptedUpdate) -> None:
        """Check one signed upload whole and add it to this holder's own sum."""
        config = self._config
        check_update_fields(update)
        # defence: ckks.release.upload-round
        if update.round_id != config.round_id:
            raise RefusedMessage(RefusalReason.WRONG_ROUND)
        # defence: ckks.release.upload-key
        if update.key_id != config.key_id:
            raise RefusedMessage(RefusalReason.WRONG_KEY_ID)
        # defence: ckks.release.upload-site-on-roster
        if update.site_id not in config.roster:
            raise RefusedMessage(RefusalReason.UNKNOWN_SITE)
        # defence: ckks.release.distinct-sites
        if update.site_id in self._sites:
            raise RefusedMessage(RefusalReason.DUPLICATE_SITE)
        # defence: ckks.release.upload-shape
        if len(update.chunks) != config.chunk_count:
            raise RefusedMessage(RefusalReason.WRONG_SHAPE)
        # defence: ckks.release.upload-signature-verified
        signing.verify(config.roster[update.site_id], update.signature,
                       EncryptedUpdate.signed_bytes(config.params_digest, update.site_id,
                                                    update.key_id, update.seeded, update.chunks))
        # defence: ckks.release.upload-kind-as-signed
        kinds = (_seal.Kind.SEEDED,) if update.seeded else (_seal.Kind.FULL,)
        scale = config.preset_params.scale
        loaded = [_seal.load_ciphertext(self._context, c, scale=scale, kinds=kinds)
                  for c in update.chunks]
        if self._sum is None:
            self._sum = loaded
        else:
            for acc, ct in zip(self._sum, loaded, strict=True):
                self._evaluator.add_inplace(acc, ct)
        self._sites.add(update.site_id)

    def finish(self, aggregate: EncryptedAggregate) -> ReleasedAverage:
        """Compare with the aggregator's sum, decrypt, check, flood, round, divide, record."""
        config = self._config
        # defence: ckks.release.aggregate-type
        if not isinstance(aggregate, EncryptedAggregate):
            raise InvalidMessage("aggregate")
        # defence: ckks.release.aggregate-round
        if aggregate.round_id != config.round_id:
            raise RefusedMessage(RefusalReason.WRONG_ROUND)
        # defence: ckks.release.aggregate-key
        if aggregate.key_id != config.key_id:
            raise RefusedMessage(RefusalReason.WRONG_KEY_ID)
        if not isinstance(aggregate.sites, tuple) or not isinstance(aggregate.chunks, tuple):
            raise InvalidMessage("aggregate")
        # defence: ckks.release.min-sites
        if len(self._sites) < config.min_sites or self._sum is None:
            raise ProtocolAbort(AbortReason.TOO_FEW_SURVIVORS,
                                f"{len(self._sites)} verified uploads, min_sites "
                                f"{config.min_sites}")
        # defence: ckks.release.claimed-sites-are-verified-sites
        if tuple(sorted(self._sites)) != aggregate.sites:
            raise RefusedMessage(RefusalReason.AGGREGATE_MISMATCH,
                                 "the claimed sites are not the verified uploads")
        scale = config.preset_params.scale
        # defence: ckks.release.sum-compared, ckks.release.decrypts-only-its-own-sum
        mine = tuple(_seal.dump_ciphertext(ct, self._context, scale=scale) for ct in self._sum)
        if mine != aggregate.chunks:
            raise RefusedMessage(RefusalReason.AGGREGATE_MISMATCH,
                                 "the aggregate is not the sum of the verified uploads")
        digest = hashlib.sha256(encode("ckks-aggregate", config.params_digest,
                                       # defence: ckks.release.digest-binds-the-summed-ciphertexts
                                       list(aggregate.sites), *mine)).digest()
        # The round is spent before anything is decrypted: a refusal after decryption (out of
        # range) must not be repeatable on other sums, or each refusal is an oracle bit.
        # defence: ckks.release.recorded
        self._holder.record_release(config.round_id, digest, config.announcement.max_rounds)
        values = self._decrypt()
        sites = len(aggregate.sites)
        weighted, weight_sum = self._check_range(values, sites)
        return self._flood(weighted, weight_sum, sites, digest)

    def _decrypt(self) -> np.ndarray:
        assert self._sum is not None
        decryptor = sealapi.Decryptor(self._context, self._holder.secret_key)
        encoder = sealapi.CKKSEncoder(self._context)
        slots = self._config.preset_params.slots
        values = np.empty(len(self._sum) * slots, dtype=np.complex128)
        for i, ct in enumerate(self._sum):
            plain = sealapi.Plaintext()
            decryptor.decrypt(ct, plain)
            values[i * slots:(i + 1) * slots] = encoder.decode_complex(plain)
        return values

    def _check_range(self, values: np.ndarray, sites: int) -> tuple[np.ndarray, float]:
        config = self._config
        bound = config.preset_params.noise_bound(sites)
        n = config.vector_length
        max_element, max_weight = config.value_bounds(sites)
        ok = (
            # defence: ckks.release.range-imaginary-parts
            float(np.max(np.abs(values.imag))) <= bound
            # defence: ckks.release.range-padding
            and (values.shape[0] == n + 1 or float(np.max(np.abs(values[n + 1:]))) <= bound)
            # defence: ckks.release.range-elements
            and float(np.max(np.abs(values.real[:n]))) <= max_element + bound
            # defence: ckks.release.range-weight-sum, ckks.release.range-weight-sum-positive
            and 0.0 < values.real[n] <= max_weight + bound
        )
        if not ok:
            raise RefusedMessage(RefusalReason.OUT_OF_RANGE,
                                 "the aggregate holds values no honest round produces")
        return values.real[:n], float(values.real[n])

    def _flood(self, weighted: np.ndarray, weight_sum: float, sites: int,
               digest: bytes) -> ReleasedAverage:
        bound = self._config.preset_params.noise_bound(sites)
        # defence: ckks.release.flooding-keyed-by-secret, ckks.release.flooding-deterministic
        key = hmac.new(self._holder.flood_key(), digest, hashlib.sha256).digest()
        # defence: ckks.release.flooding-added
        noisy = np.append(weighted, weight_sum) + gaussian(weighted.shape[0] + 1,
                                                           FLOOD_FACTOR * bound, key)
        grid = 2.0 ** math.ceil(math.log2(bound))
        rounded = np.round(noisy / grid) * grid
        # defence: ckks.release.flooded-weight-sum-positive
        if rounded[-1] <= 0:
            raise RefusedMessage(RefusalReason.OUT_OF_RANGE, "weight sum not positive")
        return ReleasedAverage(rounded[:-1] / rounded[-1], float(rounded[-1]),
                               self._config.round_id, tuple(sorted(self._sites)), grid)


def release_average(holder: KeyHolder, config: CkksRoundConfig, aggregate: EncryptedAggregate,
                    uploads: Iterable[EncryptedUpdate], *, site_id: int) -> ReleasedAverage:
    """Verify ``uploads`` (the signed uploads the aggregator summed), check ``aggregate`` is
    their sum, and release the flooded, rounded weighted average: the only way out.
    ``site_id`` is the releasing key holder's own site (the one that announced the key)."""
    release = Release(holder, config, site_id=site_id)
    try:
        items = iter(uploads)
    except TypeError:
        raise InvalidMessage("uploads") from None
    for update in items:
        release.add(update)
    return release.finish(aggregate)


def decrypt_verified_sum(holder: KeyHolder, config: CkksRoundConfig,
                      uploads: Iterable[EncryptedUpdate]) -> tuple[np.ndarray, float]:
    """Hazardous, for noise measurements only: the raw (weighted sum, weight sum) of verified
    uploads, without range checks or flooding. Never release these."""
    release = Release(holder, config, site_id=config.announcement.holder)
    for update in uploads:
        release.add(update)
    values = release._decrypt()
    n = config.vector_length
    return values.real[:n], float(values.real[n])
