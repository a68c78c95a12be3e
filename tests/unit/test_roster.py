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
