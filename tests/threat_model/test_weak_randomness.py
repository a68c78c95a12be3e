"""Adversary: a curious server or colluding sites exploiting predictable or biased randomness.

Masks, shares and sealed shares are only as secret as the randomness behind them: sharing
polynomials with small or repeated coefficients, a repeated AES-GCM nonce, rounding noise an
observer can replay, or a mask that ignores part of its seed each hand the observer part of a
site's secret.
"""

from __future__ import annotations

import numpy as np

from secagg._encoding import encode
from secagg.hazmat import aead, shamir
from secagg.hazmat.prg import expand
from secagg.hazmat.quantize import Quantizer
from secagg.hazmat.signing import IdentityKey


def test_one_share_below_threshold_confines_the_secret_to_no_small_window() -> None:
    """With threshold 2 the share at x=1 is secret + a: if a were drawn below 2**256 rather
    than uniformly over the field, one share would pin a 256-bit secret to a narrow window.
    Property: share(1) - secret is at least 2**256 in more than 90% of 64 sharings."""
    secret = 2**255 + 12345
    above = sum(
        (shamir.split(secret, 2, [1, 2])[1] - secret) % shamir.PRIME >= 2**256
        for _ in range(64)
    )
    assert above / 64 > 0.9


def test_two_sharings_of_one_secret_have_nothing_in_common() -> None:
    """Colluders who see a secret shared twice (a retried round) compare the two sharings.
    Property: every share differs between the sharings."""
    secret = 2**200 + 7
    first = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    second = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    assert all(first[x] != second[x] for x in first)


def test_eavesdropper_never_sees_a_nonce_twice_under_one_pair_key() -> None:
    """Both directions of a pair seal under one AES-GCM key. A repeated nonce would leak the
    XOR of the two share pairs and the GHASH key (forgeries).
    Property: nonces differ and the ciphertexts' XOR is not the plaintexts' XOR."""
    key = bytes(range(32))
    p1, p2 = bytes(range(132)), bytes(reversed(range(132)))
    s1 = aead.seal(key, p1, encode("share-ad", b"s", 1, 2, "share-keys"))
    s2 = aead.seal(key, p2, encode("share-ad", b"s", 2, 1, "share-keys"))
    n = aead.NONCE_BYTES
    assert s1[:n] != s2[:n]
    xor_ct = bytes(a ^ b for a, b in zip(s1[n : n + 132], s2[n : n + 132], strict=True))
    assert xor_ct != bytes(a ^ b for a, b in zip(p1, p2, strict=True))


def test_aggregator_cannot_replay_the_rounding_of_an_update() -> None:
    """Stochastic rounding with a predictable key rounds the same update the same way every
    time, so its noise could be predicted and subtracted.
    Property: two encodings of one update differ, in about half of the rounded elements."""
    q = Quantizer(clip=1.0, max_weight=1.0, max_sites=2**20)
    update = np.linspace(-0.9, 0.9, 4096) + 0.37 / q.update_scale  # off the grid
    a, b = q.encode(update, 1.0), q.encode(update, 1.0)
    differ = float(np.mean(a[:-1] != b[:-1]))
    assert 0.2 < differ < 0.8


def test_mask_depends_on_every_byte_of_its_seed() -> None:
    """A mask that ignored part of its seed (a seed folded or truncated to AES-128) could be
    brute-forced from the part that matters.
    Property: changing any one of the 32 seed bytes changes the mask."""
    seed = bytes(range(32))
    base = expand(seed, 64)
    for i in range(32):
        changed = bytearray(seed)
        changed[i] ^= 0x80
        assert not np.array_equal(expand(bytes(changed), 64), base), f"byte {i}"


def test_every_signed_roster_draws_a_fresh_graph_seed() -> None:
    """A graph seed fixed (or computable) before the sites' keys are would let colluders place
    themselves around a victim on the SecAgg+ ring by choosing their keys or ids.
    Property: signing the same roster twice draws two different seeds, hence two rings."""
    from secagg.masking import RoundConfig
    from secagg.roster import RosterSigner

    signer = RosterSigner.generate()
    sites = {s: IdentityKey.generate().public_bytes for s in range(1, 41)}
    first = signer.sign(sites).open(signer.public_key)
    second = signer.sign(sites).open(signer.public_key)
    assert first.graph_seed != second.graph_seed
    rings = {RoundConfig("r", roster, 4, neighbors="auto").ring for roster in (first, second)}
    assert len(rings) == 2


def test_self_mask_seeds_opened_at_unmask_never_repeat() -> None:
    """The aggregator sees every survivor's self-mask seed at unmask. A seed that repeats
    (across sites or rounds) is one it can predict, and a site it then claims dropped keeps
    only its pairwise masks. Property: all seeds of two rounds are distinct."""
    from secagg.masking.messages import UnmaskResponse
    from tests.roundkit import Round

    seen = []
    for _ in range(2):
        r = Round(sites=5)
        for _ in range(4):
            r.advance()
        r.advance()
        t = r.config.reconstruction_threshold
        responses = [m for m in r.replies.values() if isinstance(m, UnmaskResponse)]
        for owner in r.config.sites:
            shares = {resp.site_id: shamir.share_from_bytes(resp.self_mask_shares[owner])
                      for resp in responses[:t]}
            seen.append(shamir.secret_to_bytes(shamir.reconstruct(shares, t), 32))
    assert len(set(seen)) == len(seen) == 10
