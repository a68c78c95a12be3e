"""The CKKS round configuration: what every upload's signature binds, and the value layout."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from secagg.ckks import CkksRoundConfig, KeyHolder, release_average
from secagg.masking import make_roster
from tests.ckks_kit import CkksRound


def test_params_digest_binds_every_parameter() -> None:
    """Uploads are signed over this digest: two rounds that differ in anything a site or a
    key holder relies on must never accept each other's uploads. (The preset and the epoch are
    pinned by the announcement, which is bound whole.)"""
    roster, identities = make_roster(5)
    holder = KeyHolder.generate()
    announcement = holder.announce(holder=1, identity=identities[1], epoch="e")
    base = CkksRoundConfig("r", roster, announcement, (1,), 4, epoch="e")
    other_roster = {**dict(roster), 5: make_roster(1)[0][1]}
    variants = [
        replace(base, round_id="r2"),
        replace(base, roster=other_roster),
        replace(base, announcement=holder.announce(holder=1, identity=identities[1], epoch="e",
                                                   max_rounds=2)),
        replace(base, key_holders=(1, 2)),
        replace(base, vector_length=5),
        replace(base, clip=0.5),
        replace(base, max_weight=0.5),
        replace(base, min_sites=4),
        replace(base, corrupt_fraction=0.1),
        replace(base, model_digest=bytes(32)),
        replace(base, model_digest=bytes(31) + b"\x01"),
    ]
    digests = {v.params_digest for v in variants}
    assert base.params_digest not in digests and len(digests) == len(variants)


def test_an_update_beyond_clip_is_clipped_and_the_round_still_releases() -> None:
    """A site whose update exceeds clip encrypts the clipped values: the sum stays within
    what the key holder's range checks accept, and the release is the clipped average."""
    r = CkksRound(sites=3, vector_length=50)
    r.inputs[2] = (np.full(50, 40.0), 1.0)
    uploads, aggregate = r.run()
    released = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    exact_ws, exact_w = r.expected()
    assert float(np.max(np.abs(released.average - exact_ws / exact_w))) < 0.01


def test_flooding_noise_is_gaussian_deterministic_per_key_and_independent_across_keys() -> None:
    """The release noise: N(0, sigma^2) (mean, spread, tails, normality of both Box-Muller
    outputs), the same for one key and uncorrelated for another."""
    import math

    from secagg.ckks.release import gaussian

    a = gaussian(200_001, 3.0, b"k" * 32)
    assert a.shape == (200_001,)
    assert abs(a.mean()) < 0.05 and abs(a.std() - 3.0) < 0.03
    assert 0.04 < float(np.mean(np.abs(a) > 2 * 3.0)) < 0.051  # P(|z| > 2) = 0.0455
    for half in (a[0::2], a[1::2]):  # the cosine and the sine outputs
        for z in np.linspace(-3, 3, 13):  # the empirical CDF against the normal one
            normal = (1 + math.erf(z / math.sqrt(2))) / 2
            assert abs(float(np.mean(half / 3.0 <= z)) - normal) < 0.006
    assert np.array_equal(a, gaussian(200_001, 3.0, b"k" * 32))
    assert abs(np.corrcoef(a, gaussian(200_001, 3.0, b"j" * 32))[0, 1]) < 0.02


def test_flooding_noise_of_a_box_muller_pair_is_two_independent_samples() -> None:
    """Each pair of stream words gives two samples, the cosine's and the sine's: were they one
    sample twice, neighbouring slots would carry the same noise, and the difference of two
    neighbouring weights in the released average would be exact."""
    from secagg.ckks.release import gaussian

    a = gaussian(200_000, 3.0, b"k" * 32)
    cosines, sines = a[0::2], a[1::2]
    assert abs(np.corrcoef(cosines, sines)[0, 1]) < 0.02
    assert abs(np.corrcoef(cosines**2, sines**2)[0, 1]) < 0.02
    assert 2.9 < float(np.std(cosines - sines)) / np.sqrt(2) < 3.1  # N(0, 2 sigma^2)


def test_flooding_noise_of_a_shard_is_its_range_of_the_whole_vectors_noise() -> None:
    """Shards draw the noise of their own slots: concatenated, exactly the one-shot noise."""
    from secagg.ckks.release import gaussian

    whole = gaussian(10_001, 2.0, b"k" * 32)
    parts = [gaussian(4096, 2.0, b"k" * 32), gaussian(4096, 2.0, b"k" * 32, start=4096),
             gaussian(10_001 - 8192, 2.0, b"k" * 32, start=8192)]
    assert np.array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="even"):
        gaussian(10, 1.0, b"k" * 32, start=3)


@pytest.mark.parametrize(("changed", "match"), [
    # a typo'd negative fraction took the weakest min_sites (3), as 0 does, not colluders + 2
    ({"corrupt_fraction": -0.3}, "corrupt_fraction must be in"),
    ({"corrupt_fraction": 1.0}, "corrupt_fraction must be in"),
    # more sites than the roster holds: every site encrypts, no round can ever be released
    ({"min_sites": 11}, r"min_sites must be in \[4, 10\]"),
    ({"min_sites": -1}, "min_sites must be in"),
])
def test_round_parameters_no_round_can_use_are_refused(changed: dict[str, object],
                                                       match: str) -> None:
    from secagg.ckks.round import check_round_parameters
    from secagg.errors import ConfigurationError

    good: dict[str, object] = {"preset": "add-only-4096", "clip": 1.0, "max_weight": 10.0,
                               "min_sites": 0, "corrupt_fraction": 0.2}
    assert check_round_parameters(10, **good) == 4  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=match):
        check_round_parameters(10, **{**good, **changed})  # type: ignore[arg-type]


def _config_with(**changed: object) -> CkksRoundConfig:
    roster, identities = make_roster(5)
    holder = KeyHolder.generate()
    announcement = holder.announce(holder=1, identity=identities[1], epoch="e")
    fields: dict[str, object] = {"round_id": "r", "roster": dict(roster),
                                 "announcement": announcement, "key_holders": (1,),
                                 "vector_length": 4, "epoch": "e"}
    return CkksRoundConfig(**{**fields, **changed})  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    "clip=0", "clip=-1", "clip=1e-25", "clip=True", "clip='1'", "max_weight=0",
    "max_weight=-1", "max_weight=None", "min_sites=4.0", "round_id=''", "model_digest=16",
    "roster-site-0", "roster-site-negative", "roster-site-2**63", "roster-key-31-bytes",
    "key_holders-repeated", "key_holders-list", "key_holders-float", "key_holders-True",
    "announcement-None",
])
def test_a_ckks_round_config_of_impossible_fields_is_a_configuration_error(
        change: str) -> None:
    """Each field of the round's configuration is checked as the config is made, with a
    ConfigurationError: a clip or max_weight that is no positive number (a negative clip
    passed every later check and clipped every update to a constant), a min_sites that is
    no integer, an empty round id, a model digest that is no SHA-256, roster site ids
    outside [1, 2**63) or keys that are no Ed25519 key, key holders that are not a tuple of
    distinct ints, an announcement that is no KeyAnnouncement."""
    from secagg.errors import ConfigurationError

    base = _config_with()
    roster = dict(base.roster)
    variants: dict[str, dict[str, Any]] = {
        "clip=0": {"clip": 0.0}, "clip=-1": {"clip": -1.0}, "clip=1e-25": {"clip": 1e-25},
        "clip=True": {"clip": True}, "clip='1'": {"clip": "1"},
        "max_weight=0": {"max_weight": 0}, "max_weight=-1": {"max_weight": -1.0},
        "max_weight=None": {"max_weight": None}, "min_sites=4.0": {"min_sites": 4.0},
        "round_id=''": {"round_id": ""}, "model_digest=16": {"model_digest": bytes(16)},
        "roster-site-0": {"roster": {**roster, 0: make_roster(1)[0][1]}},
        "roster-site-negative": {"roster": {**roster, -6: make_roster(1)[0][1]}},
        "roster-site-2**63": {"roster": {**roster, 2**63: make_roster(1)[0][1]}},
        "roster-key-31-bytes": {"roster": {**roster, 6: make_roster(1)[0][1][:31]}},
        "key_holders-repeated": {"key_holders": (1, 1)},
        "key_holders-list": {"key_holders": [1]},
        "key_holders-float": {"key_holders": (1.0,)},
        "key_holders-True": {"key_holders": (True,)},
        "announcement-None": {"announcement": None},
    }
    changed = variants[change]
    with pytest.raises(ConfigurationError):
        replace(base, **changed)


def test_round_parameters_of_too_few_sites_are_refused() -> None:
    """check_round_parameters is also run by the aggregator, on a federation's site count
    alone: fewer than three sites is refused there too (an aggregate of two sites hands
    each the other's update)."""
    from secagg.ckks.round import check_round_parameters
    from secagg.errors import ConfigurationError

    good: dict[str, object] = {"preset": "add-only-4096", "clip": 1.0, "max_weight": 1.0,
                               "min_sites": 0, "corrupt_fraction": 0.2}
    assert check_round_parameters(3, **good) == 3  # type: ignore[arg-type]
    for sites in (2, 1, 0, -1):
        with pytest.raises(ConfigurationError, match="at least 3 sites"):
            check_round_parameters(sites, **good)  # type: ignore[arg-type]
