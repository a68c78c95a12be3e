"""Adversary: sites that pool everything they hold (their shares of others' secrets) with the
aggregator, to rebuild an honest site's self-mask seed or masking key.

Each secret is Shamir-shared with threshold t among the site's neighbourhood, so any t - 1
holders together learn nothing of it; the aggregator gets more shares only through the
unmask stage, which the lying-server modules attack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import pytest

from secagg.errors import InvalidMessage
from secagg.hazmat import aead, shamir
from secagg.hazmat.key_agreement import private_key_from_bytes
from secagg.hazmat.prg import SEED_BYTES
from secagg.masking import _common
from secagg.masking.messages import ShareDelivery, ShareKeys
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


def _byte_values(value: object) -> Iterator[bytes]:
    """Every bytes value inside a message (dataclass fields, mappings, sequences)."""
    if isinstance(value, bytes | bytearray | memoryview):
        yield bytes(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _byte_values(getattr(value, f.name))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _byte_values(k)
            yield from _byte_values(v)
    elif isinstance(value, tuple | list | frozenset | set):
        for v in value:
            yield from _byte_values(v)


def test_colluders_pooling_a_full_rounds_deliveries_cannot_recover_an_honest_input() -> None:
    """t - 1 sites run a full, honest masking round (roundkit) and pool every ServerMessage
    delivered to them, every share they held during it, and every sealed share the victim
    dealt (as if the aggregator passed them on too). Guards three defences:

    1. the server delivers each site only the shares sealed to it (its ShareDelivery
       routing): checked on what each colluder got (a server routing every share to every
       site is also stopped earlier, by the client's share-senders-are-neighbours check,
       which aborts the round);
    2. a share is sealed under a key from the X25519 agreement of dealer and receiver
       (``_common.share_key``): derived from public values only (session, ids), any colluder
       opened the victim's shares sealed to honest sites; here every colluder's key, under
       either receiver's associated data, fails to authenticate;
    3. the victim's secrets are Shamir-shared at threshold t: the colluders pool t - 1
       shares of each, which rebuild neither secret (the same shares plus one honest holder's
       do rebuild the seed, so the check is real); neither secret appears raw in anything
       they were delivered."""
    r = Round(sites=7)
    t = r.config.reconstruction_threshold
    victim = 1
    colluders = [s for s in r.config.sites if s != victim][: t - 1]
    honest = [s for s in r.config.sites if s not in colluders and s != victim]
    delivered: dict[int, list[object]] = {c: [] for c in colluders}
    dealt: dict[int, dict[int, bytes]] = {}  # dealer -> receiver -> sealed
    held: dict[int, tuple[bytes, bytes]] = {}  # holder -> its share pair of the victim's
    secrets: tuple[bytes, bytes] | None = None
    keys: dict[int, list[bytes]] = {}
    session = b""
    for _ in range(8):
        outgoing = r.advance()
        for s, reply in r.replies.items():
            if isinstance(reply, ShareKeys):
                dealt[s] = dict(reply.encrypted_shares)
        if victim in dealt and secrets is None:
            v = r.clients[victim]
            secrets = (v._self_mask_seed, v._masking_key.export_private_bytes())
            session = v._session
            for c in colluders:  # every key a colluder can make for a (victim, h) share
                me = r.clients[c]
                keys[c] = [me._share_key(victim)]
                for h in honest:
                    for peer in (victim, h):
                        secret = me._encryption_key.exchange(
                            me._directory[peer].encryption_public_key)
                        keys[c].append(_common.share_key(secret, session, victim, h))
            keys[honest[0]] = [r.clients[honest[0]]._share_key(victim)]  # the control
        for c in [*colluders, honest[0]]:  # (one honest holder: the control below)
            if victim in r.clients[c]._held_shares:
                held[c] = r.clients[c]._held_shares[victim]
        for c in colluders:
            if c in outgoing:
                delivered[c].append(outgoing[c])
        if not outgoing:
            break
    assert r.server.stage.name == "COMPLETED", r.server.stage  # the round ran to the end
    assert secrets is not None and set(honest) <= set(dealt[victim])
    seed, masking_key = secrets
    pooled = [b for c in colluders for m in delivered[c] for b in _byte_values(m)]

    # 1. each colluder was delivered the shares sealed to it, and no other
    for c in colluders:
        (delivery,) = [m for m in delivered[c] if isinstance(m, ShareDelivery)]
        assert delivery.encrypted_shares == {u: dealt[u][c] for u in dealt if c in dealt[u]}
    sealed_to_honest = [dealt[u][h] for u in dealt for h in honest if h in dealt[u]]
    assert not any(x in pooled for x in sealed_to_honest)

    # 2. no key a colluder can make opens a share the victim sealed to an honest site: its
    # agreement secret with the victim or with the receiver, derived for the (victim,
    # receiver) pair, and its own share key with the victim as it stands
    # (the keys as they were in the round: a client forgets its keys when the round ends)
    ad = {h: _common.share_associated_data(session, victim, h) for h in honest}
    for c in colluders:
        for h in honest:
            for key in keys[c]:
                with pytest.raises(InvalidMessage):
                    aead.open_sealed(key, dealt[victim][h], ad[h])
    # (the receiver's own key does open it: the attempt above is the real one)
    assert aead.open_sealed(keys[honest[0]][0], dealt[victim][honest[0]],
                            ad[honest[0]]) == b"".join(held[honest[0]])

    # 3. t - 1 shares of each secret: not enough; neither secret raw in what they got
    assert set(held) == {*colluders, honest[0]}
    seed_shares = {c: shamir.share_from_bytes(held[c][0]) for c in colluders}
    key_shares = {c: shamir.share_from_bytes(held[c][1]) for c in colluders}
    assert _rebuilt(seed_shares, t - 1) != seed
    assert _rebuilt(key_shares, t - 1) != masking_key
    seed_shares[honest[0]] = shamir.share_from_bytes(held[honest[0]][0])
    assert _rebuilt(seed_shares, t) == seed  # t shares do: the search above is real
    assert not any(seed in b or masking_key in b for b in pooled)
