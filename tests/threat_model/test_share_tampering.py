"""Adversary: a server that alters, reroutes or forges the encrypted shares it relays."""

from __future__ import annotations

import pytest

from secagg.errors import AbortReason, ProtocolAbort
from secagg.masking.messages import ShareDelivery
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


def test_client_aborts_if_server_flips_a_bit_in_a_share() -> None:
    r = Round()
    d = _deliveries(r)[1].encrypted_shares
    ct = bytearray(d[2])
    ct[20] ^= 1
    _expect(r, 1, ShareDelivery({**d, 2: bytes(ct)}), AbortReason.SHARE_AUTHENTICATION_FAILED)


def test_client_aborts_if_server_reroutes_a_share_meant_for_another_site() -> None:
    r = Round()
    out = _deliveries(r)
    # the share site 2 sealed for site 3, delivered to site 1 as if it were for site 1
    forwarded = {**out[1].encrypted_shares, 2: out[3].encrypted_shares[2]}
    _expect(r, 1, ShareDelivery(forwarded), AbortReason.SHARE_AUTHENTICATION_FAILED)


def test_client_aborts_if_server_swaps_senders() -> None:
    r = Round()
    d = _deliveries(r)[1].encrypted_shares
    _expect(r, 1, ShareDelivery({**d, 2: d[3], 3: d[2]}), AbortReason.SHARE_AUTHENTICATION_FAILED)


def test_client_aborts_if_server_truncates_a_share() -> None:
    r = Round()
    d = _deliveries(r)[1].encrypted_shares
    _expect(r, 1, ShareDelivery({**d, 2: d[2][:10]}), AbortReason.SHARE_AUTHENTICATION_FAILED)


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


def test_share_from_another_session_fails_to_authenticate() -> None:
    r1, r2 = Round(seed=1), Round(seed=2)
    d1 = _deliveries(r1)[1].encrypted_shares
    d2 = _deliveries(r2)[1].encrypted_shares
    _expect(r1, 1, ShareDelivery({**d1, 2: d2[2]}), AbortReason.SHARE_AUTHENTICATION_FAILED)
