from __future__ import annotations

import pytest

from secagg.errors import ConfigurationError
from secagg.roster import GRAPH_SEED_BYTES, Roster

KEY_A, KEY_B, KEY_C = b"a" * 32, b"b" * 32, b"c" * 32


@pytest.mark.parametrize(
    ("sites", "seed", "match"),
    [
        ({1: KEY_A, 2: KEY_B, 3: KEY_C}, b"\x01" * 8, "graph_seed"),
        ({1: KEY_A, 2: KEY_B, 3: KEY_C}, "seed", "graph_seed"),
        ({1: KEY_A, 2: KEY_A, 3: KEY_C}, bytes(32), "same identity key"),
        ({0: KEY_A, 2: KEY_B, 3: KEY_C}, bytes(32), "site ids"),
        ({True: KEY_A, 2: KEY_B, 3: KEY_C}, bytes(32), "site ids"),
        ({1: KEY_A[:31], 2: KEY_B, 3: KEY_C}, bytes(32), "32 bytes"),
    ],
)
def test_roster_refuses_malformed_sites_keys_and_seeds(sites: dict[int, bytes], seed: bytes,
                                                        match: str) -> None:
    """A short graph seed can be ground; one key for two sites counts one party twice."""
    with pytest.raises(ConfigurationError, match=match):
        Roster(sites, seed)


def test_roster_is_an_immutable_mapping_whose_digest_identifies_it() -> None:
    sites = {3: KEY_C, 1: KEY_A, 2: KEY_B}
    r = Roster(sites, bytes(GRAPH_SEED_BYTES))
    assert list(r) == [1, 2, 3] and r[2] == KEY_B and len(r) == 3
    assert r == Roster(dict(reversed(list(sites.items()))), bytes(GRAPH_SEED_BYTES))
    assert r != Roster(sites, b"\x01" * GRAPH_SEED_BYTES)
    assert r.digest.hex()[:16] in repr(r)


def test_roster_keys_that_are_not_bytes_are_a_configuration_error() -> None:
    """A key of 32 characters (hex cut short, a str) was a TypeError from inside the digest's
    listing."""
    with pytest.raises(ConfigurationError, match="must be 32 bytes"):
        Roster({1: "a" * 32, 2: KEY_B, 3: KEY_C}, bytes(GRAPH_SEED_BYTES))  # type: ignore[dict-item]


def test_roster_sites_that_are_not_a_mapping_are_a_configuration_error() -> None:
    """A list of (site, key) pairs was an AttributeError from inside the constructor."""
    with pytest.raises(ConfigurationError, match="mapping of site id to key"):
        Roster([(1, KEY_A), (2, KEY_B), (3, KEY_C)], bytes(GRAPH_SEED_BYTES))  # type: ignore[arg-type]


def test_the_settings_signature_binds_the_serial() -> None:
    """The serial is what lets a site refuse settings older than it has used: a signature
    for serial 1 must not verify as serial 2 (a carrier raising an old settings.sig's
    serial brought back settings the operator had replaced)."""
    from secagg.errors import InvalidMessage
    from secagg.hazmat import signing
    from secagg.roster import RosterSigner, signed_settings_message

    signer = RosterSigner.generate()
    settings = b"\x07" * 32
    signature = signer.sign_settings(settings, 1)
    signing.verify(signer.public_key, signature, signed_settings_message(settings, 1))
    with pytest.raises(InvalidMessage):
        signing.verify(signer.public_key, signature, signed_settings_message(settings, 2))


def test_the_roster_signer_neither_shows_nor_pickles_its_private_key() -> None:
    import pickle

    from secagg.roster import RosterSigner

    signer = RosterSigner.generate()
    private = signer._identity._private.private_bytes_raw()
    assert private.hex() not in repr(signer) and private.hex()[:16] not in repr(signer)
    assert signer.public_key.hex()[:16] in repr(signer)
    with pytest.raises(TypeError, match="secret"):
        pickle.dumps(signer)
