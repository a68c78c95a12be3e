"""Adversary: sites that pool everything they hold (their shares of others' secrets) with the
aggregator, to rebuild an honest site's self-mask seed or masking key.

Each secret is Shamir-shared with threshold t among the site's neighbourhood, so any t - 1
holders together learn nothing of it; the aggregator gets more shares only through the
unmask stage, which the lying-server modules attack.
"""

from __future__ import annotations

from secagg.hazmat import shamir
from secagg.hazmat.key_agreement import private_key_from_bytes
from secagg.hazmat.prg import SEED_BYTES
from tests.roundkit import Round


def _rebuilt(shares: dict[int, int], threshold: int) -> bytes | None:
    try:
        return shamir.secret_to_bytes(shamir.reconstruct(shares, threshold), SEED_BYTES)
    except ValueError:  # interpolates to no 256-bit value at all
        return None


def test_fewer_than_threshold_colluding_holders_cannot_rebuild_a_sites_secrets() -> None:
    """t - 1 colluding share holders interpolate the victim's two secrets from their shares.
    Property: neither the self-mask seed nor the masking key comes out (either would strip
    a mask from the victim's input once the aggregator holds it)."""
    r = Round(sites=7)
    r.advance()
    r.advance()
    r.advance()  # every site now holds its shares of every other site's secrets
    victim = r.clients[1]
    t = r.config.reconstruction_threshold
    colluders = [s for s in r.config.sites if s != 1][: t - 1]
    seed_shares = {c: shamir.share_from_bytes(r.clients[c]._held_shares[1][0]) for c in colluders}
    key_shares = {c: shamir.share_from_bytes(r.clients[c]._held_shares[1][1]) for c in colluders}
    assert _rebuilt(seed_shares, t - 1) != victim._self_mask_seed
    key = _rebuilt(key_shares, t - 1)
    if key is not None:
        public = private_key_from_bytes(key).public_key().public_bytes_raw()
        assert public != victim._masking_key.public_bytes
