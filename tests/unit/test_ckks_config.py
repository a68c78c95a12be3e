"""The CKKS round configuration: what every upload's signature binds, and the value layout."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

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
