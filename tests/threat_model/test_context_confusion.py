"""Adversary: a relay that moves authenticated bytes into another context, hoping they pass there.

The server (or anyone on the wire) replays a sealed share in the other direction of its pair,
a signature under another message type, a key derived for another session, purpose or pair, or
re-splits the fields of a signed encoding. Every such move must fail to authenticate.
"""

from __future__ import annotations

import pytest

from secagg._encoding import encode
from secagg.errors import InvalidMessage
from secagg.hazmat import signing
from secagg.hazmat.key_agreement import AgreementKey, derive_pair_key
from secagg.masking.messages import MaskedInput, ShareDelivery, ShareKeys
from tests.roundkit import Round


def test_client_never_takes_its_own_share_reflected_back_to_it() -> None:
    """Site 1's sealed share for site 2, handed back to site 1 as site 2's share for it.

    Both ends of a pair derive the same AES key, so only the associated data (sender and
    receiver) tells the two directions apart.
    Property: the share does not open; site 1 skips it (stores nothing as site 2's share, and
    will reveal none) and, every other share opening, goes on masking with site 2.
    """
    r = Round()
    r.advance()
    deliveries = r.advance()
    own = r.replies[1]
    assert isinstance(own, ShareKeys)
    delivery = deliveries[1]
    assert isinstance(delivery, ShareDelivery)
    reflected = {**delivery.encrypted_shares, 2: own.encrypted_shares[2]}
    reply = r.clients[1].handle(ShareDelivery(reflected))
    assert isinstance(reply, MaskedInput) and 2 in reply.partners
    assert r.clients[1].unusable_share_senders == (2,)
    assert 2 not in r.clients[1]._held_shares


def test_pair_key_of_one_session_purpose_or_pair_is_useless_in_another() -> None:
    """A seed or share key learned in one context, tried in another."""
    a, b = AgreementKey.generate(), AgreementKey.generate()
    shared = a.exchange(b.public_bytes)
    context = {"session_id": b"round-7", "purpose": "pairwise-mask-seed", "site_a": 2,
               "site_b": 5}
    key = derive_pair_key(shared, **context)  # type: ignore[arg-type]
    others = [{"session_id": b"round-8"}, {"purpose": "share-encryption"},
              {"site_a": 1}, {"site_b": 6}]
    derived = {derive_pair_key(shared, **{**context, **o}) for o in others}  # type: ignore[arg-type]
    assert key not in derived
    assert len(derived) == len(others)


def test_signature_does_not_survive_moving_a_field_boundary() -> None:
    """Signed (b"ab", b"c") presented as (b"a", b"bc"): the same bytes, split differently."""
    identity = signing.IdentityKey.generate()
    sig = identity.sign(encode("unmask", b"session", b"ab", b"c"))
    with pytest.raises(InvalidMessage):
        signing.verify(identity.public_bytes, sig, encode("unmask", b"session", b"a", b"bc"))


def test_signature_for_one_message_type_is_refused_as_another() -> None:
    """The same fields signed as an advertisement, presented as a consistency check."""
    identity = signing.IdentityKey.generate()
    sig = identity.sign(encode("advertise-keys", b"session", [1, 2, 3]))
    with pytest.raises(InvalidMessage):
        signing.verify(identity.public_bytes, sig,
                       encode("consistency-check", b"session", [1, 2, 3]))


def test_signed_survivor_list_cannot_be_passed_off_as_another_list() -> None:
    """A survivor list re-read as a different list of ids (e.g. [1, 2] as [258])."""
    identity = signing.IdentityKey.generate()
    for signed, other in [([1, 2], [258]), ([1, 256], [257, 0]), ([3], [0, 3])]:
        sig = identity.sign(encode("consistency-check", b"session", signed))
        with pytest.raises(InvalidMessage):
            signing.verify(identity.public_bytes, sig,
                           encode("consistency-check", b"session", other))
