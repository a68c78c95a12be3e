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
   within ``sites * clip * max_weight`` and the weight sum at most ``sites * max_weight``
   (each plus B);
4. adds Gaussian flooding noise of standard deviation ``FLOOD_FACTOR * B`` drawn from AES-CTR
   keyed by HMAC(flood key, aggregate): deterministic, so every release of one aggregate, by
   any holder of the key, is identical and averaging releases removes nothing; then rounds to
   a power-of-two grid at least B; refuses unless the noise a value carries is at most
   ``MAX_NOISE_SHARE`` of ``min(clip, 1)`` times the weight sum W (so W is positive and
   the average a tenth noise at most) and every weighted element is within ``clip * W``
   (plus that noise); and divides;
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

import numpy as np

from secagg._encoding import encode, parts_digest
from secagg.ckks import _seal
from secagg.ckks._flood import gaussian  # re-exported: the release's noise
from secagg.ckks._shards import ShardedSum
from secagg.ckks.keys import KeyHolder
from secagg.ckks.presets import (
    FLOOD_FACTOR,
    MAX_NOISE_SHARE,
    TAIL,
    Preset,
    least_weight_sum,
    release_noise,
)
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
from secagg.hazmat.secret import scrubs_locals

__all__ = ["MAX_NOISE_SHARE", "Release", "check_released_norm", "decrypt_verified_sum",
           "gaussian", "least_l2_weight_sum", "release_average", "release_noise_share"]


def _l2_slack(params: Preset, sites: int, clip_norm: float, learned: int) -> float:
    """How much longer than ``clip_norm * W`` a release of ``learned`` values times its
    weight sum W can be from noise alone (see :func:`check_released_norm`)."""
    sigma, per_value = release_noise(params, sites)
    root = math.sqrt(learned)
    return clip_norm * (TAIL * sigma + per_value) + root * per_value + sigma * (root + TAIL)


def least_l2_weight_sum(params: Preset, sites: int, clip_norm: float, learned: int) -> float:
    """The least weight sum whose release :func:`check_released_norm` takes."""
    return _l2_slack(params, sites, clip_norm, learned) / (MAX_NOISE_SHARE * clip_norm)


def release_noise_share(params: Preset, sites: int, clip_norm: float, weight_sum: float,
                        learned: int) -> float:
    """How far (L2, as a share of ``clip_norm``) a release of ``learned`` values can be from
    the exact average by noise alone, at weight sum ``weight_sum``: the slack of
    :func:`check_released_norm` over the weight sum (it refuses above MAX_NOISE_SHARE)."""
    if not weight_sum > 0:
        return math.inf
    return _l2_slack(params, sites, clip_norm, learned) / (clip_norm * weight_sum)


def check_released_norm(params: Preset, sites: int, clip_norm: float, weight_sum: float,
                        norm: float, learned: int) -> None:
    """The L2 check of a released average (``norm`` over its ``learned`` values, integer
    counters aside) for one that knows the round's L2 clip, which the key holder's element
    checks do not: the aggregator before publishing, the key holder before signing.

    The released vector times the weight sum W is the sum (within ``clip_norm * W`` of zero)
    plus CKKS's error and the grid's rounding (``e`` a value), and the flooding noise
    (Gaussian, sigma a value: its norm is below ``sigma * (sqrt(d) + TAIL)`` but with
    probability e**-72); W carries the same per-value terms. So an average longer than
    ``clip_norm`` by more than that slack over W no clipped inputs make; and where the slack
    over W is above ``MAX_NOISE_SHARE * clip_norm`` the average is mostly noise (a small
    weight sum: the sites' weights, or a site's negative one), refused rather than applied."""
    slack = _l2_slack(params, sites, clip_norm, learned)
    # defence: ckks.released-norm.noise-floor
    if not slack <= MAX_NOISE_SHARE * clip_norm * weight_sum:
        raise ProtocolAbort(
            AbortReason.AGGREGATE_OUT_OF_RANGE,
            f"the weight sum is below {slack / (MAX_NOISE_SHARE * clip_norm):.3g}, the least "
            f"for which the release noise stays under {MAX_NOISE_SHARE:g} x clip_norm: the "
            "average would be noise; bring [update] max_samples nearer the sites' sample "
            "counts (weights nearer 1)")
    # defence: service.released-average-within-the-clip-norm
    if not abs(weight_sum) * norm <= clip_norm * weight_sum * (1 + 1e-9) + slack:
        raise ProtocolAbort(AbortReason.AGGREGATE_OUT_OF_RANGE,
                            "the released average is longer than clipped inputs can make")


class Release:
    """One key holder's verification and release of one round's aggregate."""

    # defence: ckks.release.construction-leaves-no-locals
    @scrubs_locals  # (the workers are handed the secret context: _shards)
    def __init__(self, holder: KeyHolder, config: CkksRoundConfig, *, site_id: int,
                 workers: int = 1) -> None:
        """``workers`` > 1: parse, add, compare and decrypt in that many worker processes,
        each owning a range of chunks (:mod:`secagg.ckks._shards`)."""
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
        if type(workers) is not int or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        self._holder = holder
        self._config = config
        self._sum = ShardedSum(holder, config.preset_params.scale, config.preset_params.slots,
                               config.chunk_count, workers)
        self._sites: set[int] = set()
        self._upload_digests: dict[int, bytes] = {}  # site -> digest of its signed chunks

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
        chunks_digest = parts_digest(update.chunks)
        # defence: ckks.release.upload-signature-verified
        signing.verify(config.roster[update.site_id], update.signature,
                       EncryptedUpdate.signed_bytes(config.params_digest, update.site_id,
                                                    update.key_id, update.seeded, update.chunks,
                                                    chunks_digest=chunks_digest))
        # defence: ckks.release.upload-kind-as-signed
        kinds = (_seal.Kind.SEEDED,) if update.seeded else (_seal.Kind.FULL,)
        self._sum.add(update.chunks, kinds)  # all chunks or none; InvalidMessage if malformed
        self._sites.add(update.site_id)
        self._upload_digests[update.site_id] = chunks_digest

    # defence: ckks.release.exceptions-leave-no-locals
    @scrubs_locals  # (decrypted sums and the flooding key: hazmat.secret.scrub_locals)
    def finish(self, aggregate: EncryptedAggregate) -> ReleasedAverage:
        """Compare with the aggregator's sum, decrypt, check, flood, round, divide, record."""
        config = self._config
        # defence: ckks.release.aggregate-type
        if not isinstance(aggregate, EncryptedAggregate):
            raise InvalidMessage("aggregate")
        # (types before any comparison: a numpy array as the round id raised from inside
        # the comparison; a tuple subclass claiming another length, from zip)
        # defence: ckks.release.aggregate-field-types
        if (type(aggregate.round_id) is not str or type(aggregate.key_id) is not bytes
                or type(aggregate.sites) is not tuple or type(aggregate.chunks) is not tuple):
            raise InvalidMessage("aggregate")
        # defence: ckks.release.aggregate-round
        if aggregate.round_id != config.round_id:
            raise RefusedMessage(RefusalReason.WRONG_ROUND)
        # defence: ckks.release.aggregate-key
        if aggregate.key_id != config.key_id:
            raise RefusedMessage(RefusalReason.WRONG_KEY_ID)
        if (not isinstance(aggregate.sites, tuple) or not isinstance(aggregate.chunks, tuple)
                # defence: ckks.release.aggregate-chunks-are-bytes
                or not all(type(c) is bytes for c in aggregate.chunks)
                # defence: ckks.release.aggregate-sites-are-ints
                # (numpy ints compared equal and then raised AttributeError from encode)
                or not all(type(s) is int for s in aggregate.sites)):
            raise InvalidMessage("aggregate")
        # defence: ckks.release.min-sites
        if len(self._sites) < config.min_sites or not self._sites:
            raise ProtocolAbort(AbortReason.TOO_FEW_SURVIVORS,
                                f"{len(self._sites)} verified uploads, min_sites "
                                f"{config.min_sites}")
        # defence: ckks.release.claimed-sites-are-verified-sites
        if tuple(sorted(self._sites)) != aggregate.sites:
            raise RefusedMessage(RefusalReason.AGGREGATE_MISMATCH,
                                 "the claimed sites are not the verified uploads")
        # defence: ckks.release.sum-compared
        if not self._sum.is_my_sum(aggregate.chunks):
            raise RefusedMessage(RefusalReason.AGGREGATE_MISMATCH,
                                 "the aggregate is not the sum of the verified uploads")
        # The sum is a function of the summed uploads, each named by the digest of its signed
        # chunks: binding those binds the summed ciphertexts without hashing them again.
        digest = hashlib.sha256(encode(
            "ckks-aggregate", config.params_digest, list(aggregate.sites),
            # defence: ckks.release.digest-binds-the-summed-ciphertexts
            *(self._upload_digests[site] for site in aggregate.sites))).digest()
        # The round is spent before anything is decrypted: a refusal after decryption (out of
        # range) must not be repeatable on other sums, or each refusal is an oracle bit.
        # defence: ckks.release.recorded
        self._holder.record_release(config.round_id, digest, config.announcement.max_rounds)
        sites = len(aggregate.sites)
        bound = config.preset_params.noise_bound(sites)
        max_element, max_weight = config.value_bounds(sites)
        # Each shard decrypts its own sum and checks its slots; nothing is released unless
        # every slot of every shard is one an honest round produces.
        if not self._sum.check_range(config.vector_length, bound, max_element, max_weight):
            self._sum.stop_soon()
            raise RefusedMessage(RefusalReason.OUT_OF_RANGE,
                                 "the aggregate holds values no honest round produces")
        # (a refusal from _flooded leaves its frame, which held the decrypted sum and the
        # flooding key, without locals: the decorator above)
        return self._flooded(digest, sites, bound)

    def _flooded(self, digest: bytes, sites: int, bound: float) -> ReleasedAverage:
        config = self._config
        grid = 2.0 ** math.ceil(math.log2(bound))
        # defence: ckks.release.flooding-keyed-by-secret, ckks.release.flooding-deterministic
        rounded = self._sum.flood(hmac.new(self._holder.flood_key(), digest,
                                           hashlib.sha256).digest(), FLOOD_FACTOR * bound, grid)
        self._sum.stop_soon()  # the workers' part is done; close() or collection reaps them
        weight, clip = float(rounded[-1]), float(config.clip)
        sigma, per_value = release_noise(config.preset_params, sites)
        noise = TAIL * sigma + per_value  # what a released value carries beyond the sum
        # An average whose every value may be more noise than a tenth of the clip is noise: a
        # weight sum that small (the sites' weights, or one site's negative weight cancelling
        # the others') would divide the noise, or a malicious site's share, up past the clip.
        # The weight sum's own noise is held to a tenth of it too (min(clip, 1)): with a clip
        # above 10 the first alone let W be below its noise, so the true weight sum could be
        # zero or negative and a site's share amplified 3-5 times past the clip. So the floor
        # is above zero: a weight sum not positive, before or after the noise, is refused here.
        # defence: ckks.release.weight-sum-above-the-noise
        least = least_weight_sum(config.preset_params, sites, clip)
        if not weight >= least:
            raise RefusedMessage(
                RefusalReason.OUT_OF_RANGE,
                f"the weight sum is below {least:.3g}, the least for which the release noise "
                f"stays under {MAX_NOISE_SHARE:g} x clip in each value and {MAX_NOISE_SHARE:g} "
                "of the weight sum: the average would be noise; weights nearer max_weight "
                "are needed")
        # Each weighted element is within clip * W of zero (weights are positive): the step 3
        # bound, sites * clip * max_weight, let a site past the clip, with small weights all
        # round, release an average of 100 with clip 1.
        # defence: ckks.release.elements-within-clip-times-weight-sum
        if float(np.max(np.abs(rounded[:-1]), initial=0.0)) > clip * (weight + noise) + noise:
            raise RefusedMessage(RefusalReason.OUT_OF_RANGE,
                                 "the weighted elements exceed clip times the weight sum")
        return ReleasedAverage(rounded[:-1] / rounded[-1], float(rounded[-1]),
                               config.round_id, tuple(sorted(self._sites)), grid)

    def close(self) -> None:
        """Stop the worker processes (also done by :meth:`finish` and on garbage collection)."""
        self._sum.close()


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
    values = release._sum.decrypt()
    release.close()
    n = config.vector_length
    return values.real[:n], float(values.real[n])
