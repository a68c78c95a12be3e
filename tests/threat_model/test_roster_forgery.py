"""Adversary: whoever hands the sites their roster (the aggregator, a network attacker) alters it.

The roster is the federation's root of trust: it names the sites, their identity keys (every
signature of every round is checked against them) and the SecAgg+ graph seed. A site uses it
only if the roster signer's signature over all of it verifies (:meth:`SignedRoster.open`).
"""

from __future__ import annotations

import os

import pytest

from secagg.errors import InvalidMessage
from secagg.hazmat.signing import IdentityKey
from secagg.roster import Roster, RosterSigner, SignedRoster


def _signed(sites: int = 6) -> tuple[RosterSigner, SignedRoster]:
    signer = RosterSigner.generate()
    keys = {s: IdentityKey.generate().public_bytes for s in range(1, sites + 1)}
    return signer, signer.sign(keys, federation="hospitals", version=3)


def _forged(signed: SignedRoster, sites: dict[int, bytes] | None = None,
            seed: bytes | None = None, **labels: object) -> SignedRoster:
    r = signed.roster
    roster = Roster(dict(r) if sites is None else sites,
                    r.graph_seed if seed is None else seed,
                    federation=labels.get("federation", r.federation),  # type: ignore[arg-type]
                    version=labels.get("version", r.version))  # type: ignore[arg-type]
    return SignedRoster(roster, signed.signature)


def test_roster_with_another_graph_seed_fails_the_trust_roots_signature() -> None:
    """A seed of the attacker's choosing picks the SecAgg+ graph: a victim among colluders."""
    signer, signed = _signed()
    assert signed.open(signer.public_key) == signed.roster
    with pytest.raises(InvalidMessage):
        _forged(signed, seed=os.urandom(32)).open(signer.public_key)


def test_roster_with_a_substituted_added_or_removed_site_fails_the_trust_roots_signature() -> None:
    """A site's identity key swapped for the attacker's (it could then sign in that site's
    name), a site added (one more colluder in every quorum) or a site removed."""
    signer, signed = _signed()
    sites = dict(signed.roster)
    substituted = {**sites, 2: IdentityKey.generate().public_bytes}
    added = {**sites, 99: IdentityKey.generate().public_bytes}
    removed = {s: k for s, k in sites.items() if s != 3}
    for forged in (substituted, added, removed):
        with pytest.raises(InvalidMessage):
            _forged(signed, forged).open(signer.public_key)


def test_roster_with_its_sites_renumbered_fails_the_trust_roots_signature() -> None:
    """The same keys in the same order under other ids: the ids are the Shamir points and
    place each site in the SecAgg+ graph, so a renumbering (shown to some sites only) would
    let the aggregator choose a victim's neighbours among its colluders."""
    signer, signed = _signed()
    keys = list(dict(signed.roster).values())
    for ids in ([1, 2, 3, 4, 5, 7], [2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 6, 5]):
        renumbered = dict(zip(ids, keys, strict=True))
        assert renumbered != dict(signed.roster)
        with pytest.raises(InvalidMessage):
            _forged(signed, renumbered).open(signer.public_key)


def test_roster_relabelled_for_another_federation_or_version_fails_the_signature() -> None:
    """An old roster version (a site since removed for misbehaving) or another federation's
    roster presented as this one."""
    signer, signed = _signed()
    for labels in ({"federation": "other"}, {"version": 2}):
        with pytest.raises(InvalidMessage):
            _forged(signed, **labels).open(signer.public_key)
