"""Adversary: a server that alters, reroutes or forges the encrypted shares it relays, and
sites that seal junk to a chosen peer.

A share that does not open is skipped, never stored or revealed: the site still masks with
its sender (the pair seed does not come from the share), so the masks cancel and the only
loss is one share of the sender's secrets. An abort instead let colluding sites push a
chosen honest site out of the round and read the sum of the sites left. A site none of whose
shares opens has another view of the round (another session, a split directory): it aborts.
"""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import AbortReason, ProtocolAbort
from secagg.hazmat import aead
from secagg.masking import Stage
from secagg.masking.messages import MaskedInput, ShareDelivery, ShareKeys
from tests.roundkit import Round


def _deliveries(r: Round) -> dict[int, ShareDelivery]:
    r.advance()
    out = r.advance()
    assert all(isinstance(m, ShareDelivery) for m in out.values())
    return out  # type: ignore[return-value]


def _expect(r: Round, site: int, msg: ShareDelivery, reason: AbortReason) -> None:
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[site].handle(msg)
    assert caught.value.reason is reason


def _expect_skipped(r: Round, site: int, msg: ShareDelivery, bad: set[int]) -> None:
    """The site goes on, masks with every sender, and holds no share from the bad ones."""
    client = r.clients[site]
    reply = client.handle(msg)
    assert isinstance(reply, MaskedInput)
    assert set(reply.partners) == set(msg.encrypted_shares)
    assert set(client.unusable_share_senders) == bad
    assert not bad & set(client._held_shares)


def test_client_skips_a_share_the_server_flipped_a_bit_in() -> None:
    r = Round()
    d = _deliveries(r)[1].encrypted_shares
    ct = bytearray(d[2])
    ct[20] ^= 1
    _expect_skipped(r, 1, ShareDelivery({**d, 2: bytes(ct)}), {2})


def test_client_skips_a_share_rerouted_from_another_site() -> None:
    r = Round()
    out = _deliveries(r)
    # the share site 2 sealed for site 3, delivered to site 1 as if it were for site 1
    forwarded = {**out[1].encrypted_shares, 2: out[3].encrypted_shares[2]}
    _expect_skipped(r, 1, ShareDelivery(forwarded), {2})


def test_client_skips_shares_whose_senders_were_swapped() -> None:
    r = Round()
    d = _deliveries(r)[1].encrypted_shares
    _expect_skipped(r, 1, ShareDelivery({**d, 2: d[3], 3: d[2]}), {2, 3})


def test_client_skips_a_truncated_share() -> None:
    r = Round()
    d = _deliveries(r)[1].encrypted_shares
    _expect_skipped(r, 1, ShareDelivery({**d, 2: d[2][:10]}), {2})


def test_client_aborts_if_server_delivers_a_share_from_itself_or_unknown_site() -> None:
    r = Round()
    d = _deliveries(r)[1].encrypted_shares
    _expect(r, 1, ShareDelivery({**d, 1: d[2]}), AbortReason.UNEXPECTED_SHARE_SENDER)
    r = Round()
    d = _deliveries(r)[1].encrypted_shares
    _expect(r, 1, ShareDelivery({**d, 42: d[2]}), AbortReason.UNEXPECTED_SHARE_SENDER)


def test_client_aborts_if_server_withholds_shares_below_threshold() -> None:
    r = Round()
    d = _deliveries(r)[1].encrypted_shares
    t = r.config.reconstruction_threshold
    kept = dict(list(d.items())[: t - 2])  # plus the site's own share: t - 1
    _expect(r, 1, ShareDelivery(kept), AbortReason.TOO_FEW_SURVIVORS)


def test_a_share_from_another_session_is_skipped_and_all_of_them_abort() -> None:
    r1, r2 = Round(seed=1), Round(seed=2)
    d1 = _deliveries(r1)[1].encrypted_shares
    d2 = _deliveries(r2)[1].encrypted_shares
    _expect_skipped(r1, 1, ShareDelivery({**d1, 2: d2[2]}), {2})
    # every share from the other session: this site's view is not its peers'
    r1 = Round(seed=1)
    _deliveries(r1)
    _expect(r1, 1, ShareDelivery({u: d2[u] for u in d1}), AbortReason.SHARE_AUTHENTICATION_FAILED)


def _junk_for(r: Round, victim: int | None, senders: tuple[int, ...]) -> None:
    """Colluding ``senders`` seal (to the server, correctly sized and signed) junk instead of
    their shares for ``victim`` (None: for everyone); the round then runs to its end."""
    r.advance()  # advertise
    replies = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    for u in senders:
        msg = replies[u]
        assert isinstance(msg, ShareKeys)
        junk = aead.seal(bytes(32), bytes(132), b"junk")  # opens under no pair key
        shares = {**msg.encrypted_shares, **{v: junk for v in msg.encrypted_shares
                                             if victim in (None, v)}}
        sig = r.identities[u].sign(ShareKeys.signed_bytes(
            r.server._session, u, shares, msg.self_mask_commitment, msg.share_commitments))
        replies[u] = ShareKeys(u, shares, msg.self_mask_commitment, msg.share_commitments, sig)
    for reply in replies.values():
        r.server.handle(reply)
    r.outgoing = r.server.close_stage()
    for _ in range(3):  # masked input, consistency check, unmask
        if r.server.stage in (Stage.COMPLETED, Stage.ABORTED):
            return
        r.advance()


@pytest.mark.parametrize("colluders", [(4,), (4, 5), (3, 4, 5)])
def test_colluders_sealing_junk_to_a_site_cannot_push_it_out_of_the_round(
        colluders: tuple[int, ...]) -> None:
    """Sites that seal junk to site 2 (even three of five) do not get a round that completes
    without it: the sum they would read then covers fewer honest sites, chosen by them. Here
    every site survives, site 2 included, and the sum is exact."""
    r = Round(sites=5)
    _junk_for(r, 2, colluders)
    assert set(r.clients[2].unusable_share_senders) == set(colluders)
    result = r.server.result
    assert result is not None and result.survivors == (1, 2, 3, 4, 5)
    exact = sum(np.clip(r.inputs[s][0], -1, 1) * r.inputs[s][1] for s in result.survivors)
    assert np.max(np.abs(result.weighted_sum - exact)) <= result.error_bound[0]


def test_a_site_sealing_junk_to_everyone_fails_the_round_at_unmask_and_is_named() -> None:
    """Nobody can rebuild site 3's self mask, so the round fails: any one site can fail a
    masking round. But no honest site is pushed out on the way (they would be counted as
    dropouts, and the failure blamed on them), and the abort names site 3."""
    r = Round(sites=5)
    with pytest.raises(ProtocolAbort) as caught:
        _junk_for(r, None, (3,))
    assert caught.value.reason is AbortReason.TOO_FEW_SURVIVORS  # too few shares of site 3
    assert "site 3" in caught.value.detail
    for s in (1, 2, 4, 5):
        assert r.clients[s].unusable_share_senders == (3,)
        assert r.clients[s].stage is Stage.COMPLETED  # each answered the unmask request


@pytest.mark.parametrize("colluders", [(4, 5), (3, 4, 5)])
def test_colluders_leaving_a_site_out_of_their_shares_cannot_push_it_out_of_the_round(
        colluders: tuple[int, ...]) -> None:
    """The other route to the same end: colluders seal shares to everyone but site 2, which
    would then count too few share senders and abort while the round went on without it.
    Property: the server refuses a ShareKeys that leaves out a neighbour (the colluders drop
    instead), and site 2 stays in the round, to its end. (Eight sites: with five, too few
    were left after the colluders dropped and the round aborted for everyone, so site 2's
    place in it was never checked.)"""
    from secagg.errors import InvalidMessage

    r = Round(sites=8, corrupt_fraction=0.4) if len(colluders) == 2 else Round(sites=8)
    r.advance()  # advertise
    replies = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    for u in colluders:
        msg = replies.pop(u)
        assert isinstance(msg, ShareKeys)
        shares = {v: c for v, c in msg.encrypted_shares.items() if v != 2}
        commitments = {h: c for h, c in msg.share_commitments.items() if h != 2}
        sig = r.identities[u].sign(ShareKeys.signed_bytes(
            r.server._session, u, shares, msg.self_mask_commitment, commitments))
        with pytest.raises(InvalidMessage, match="share recipients"):
            r.server.handle(ShareKeys(u, shares, msg.self_mask_commitment, commitments, sig))
    for reply in replies.values():
        r.server.handle(reply)
    r.outgoing = r.server.close_stage()
    delivered = r.outgoing
    assert 2 in delivered and set(delivered) == set(replies)
    assert all(set(d.encrypted_shares) == set(replies) - {v}  # type: ignore[attr-defined]
               for v, d in delivered.items())
    for _ in range(4):  # masked inputs, consistency, unmask (bounded: no endless loop)
        if r.server.result is not None:
            break
        r.advance()
    assert r.server.result is not None and 2 in r.server.result.survivors
    assert set(r.server.result.survivors) == set(replies)
