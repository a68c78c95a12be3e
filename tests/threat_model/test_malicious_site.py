"""Adversary: a site (or an impersonator) that sends the server bad messages.

The server refuses the message and treats the site as dropped; the round goes on. Bad shares
at unmask are caught by the self-mask commitment or the advertised public key.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from secagg.errors import AbortReason, InvalidMessage, PreconditionError, ProtocolAbort
from secagg.hazmat import shamir
from secagg.masking.messages import AdvertiseKeys, MaskedInput, UnmaskResponse
from tests.roundkit import Round


def test_server_refuses_advertisement_signed_by_another_site() -> None:
    r = Round()
    msg = r.clients[1].start()
    forged = AdvertiseKeys(2, msg.encryption_public_key, msg.masking_public_key, msg.signature)
    with pytest.raises(InvalidMessage):
        r.server.handle(forged)


def test_server_refuses_a_site_answering_twice() -> None:
    r = Round()
    msg = r.clients[1].start()
    r.server.handle(msg)
    with pytest.raises(PreconditionError, match="already answered"):
        r.server.handle(msg)


def test_server_refuses_unknown_site() -> None:
    r = Round()
    msg = r.clients[1].start()
    with pytest.raises(PreconditionError, match="not a participant"):
        r.server.handle(replace(msg, site_id=99))


def _masked_inputs(r: Round) -> dict[int, MaskedInput]:
    r.advance()
    r.advance()
    out = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    assert all(isinstance(m, MaskedInput) for m in out.values())
    return out  # type: ignore[return-value]


def test_server_refuses_masked_input_altered_in_transit() -> None:
    r = Round()
    msg = _masked_inputs(r)[1]
    tampered = msg.masked_input.copy()
    tampered[0] += np.uint32(1)
    with pytest.raises(InvalidMessage):
        r.server.handle(replace(msg, masked_input=tampered))


@pytest.mark.parametrize("bad", [np.zeros(3, np.uint32), np.zeros(17, np.uint64),
                                 np.zeros(17, np.float64)])
def test_server_refuses_masked_input_of_wrong_size_or_type(bad: np.ndarray) -> None:
    r = Round()
    msg = _masked_inputs(r)[1]
    with pytest.raises(InvalidMessage):
        r.server.handle(replace(msg, masked_input=bad))


def test_server_refuses_message_for_the_wrong_stage() -> None:
    r = Round()
    msgs = _masked_inputs(r)
    r.server.handle(msgs[1])
    with pytest.raises(PreconditionError, match="not valid in stage"):
        r.server.handle(AdvertiseKeys(2, b"", b"", b""))


def test_round_survives_a_refused_site_as_a_dropout() -> None:
    r = Round(sites=6)
    msgs = _masked_inputs(r)
    bad = msgs[3].masked_input.copy()
    bad[1] ^= np.uint32(7)
    for s, m in msgs.items():
        if s == 3:
            with pytest.raises(InvalidMessage):
                r.server.handle(replace(m, masked_input=bad))
        else:
            r.server.handle(m)
    r.outgoing = r.server.close_stage()
    r.advance()
    r.advance()
    result = r.server.result
    assert result is not None and 3 not in result.survivors
    exact = sum(np.clip(r.inputs[s][0], -1, 1) * r.inputs[s][1] for s in result.survivors)
    assert np.max(np.abs(result.weighted_sum - exact)) <= result.error_bound[0]


def _unmask_responses(r: Round) -> dict[int, UnmaskResponse]:
    r.advance()
    r.advance()
    r.advance()
    r.advance()
    out = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    return out  # type: ignore[return-value]


def test_server_detects_corrupted_self_mask_shares() -> None:
    """Colluding sites send wrong (but well-signed) shares of site 2's self-mask seed: the
    reconstructed seed fails its commitment, and the server aborts rather than output garbage."""
    r = Round(sites=5)
    responses = _unmask_responses(r)
    t = r.config.reconstruction_threshold
    for s in list(responses)[: len(responses) - t + 1]:
        shares = dict(responses[s].self_mask_shares)
        shares[2] = shamir.share_to_bytes((shamir.share_from_bytes(shares[2]) + 1) % shamir.PRIME)
        identity = r.identities[s]
        sig = identity.sign(UnmaskResponse.signed_bytes(
            r.server._session, s, shares, responses[s].key_shares))
        responses[s] = UnmaskResponse(s, shares, responses[s].key_shares, sig)
    for m in responses.values():
        r.server.handle(m)
    with pytest.raises(ProtocolAbort) as caught:
        r.server.close_stage()
    assert caught.value.reason is AbortReason.RECONSTRUCTION_FAILED
    assert r.server.result is None


def test_server_detects_corrupted_key_shares_of_a_dropped_site() -> None:
    r = Round(sites=5)
    r.advance()
    r.advance()
    r.advance(skip=frozenset({4}))
    r.advance()
    responses = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    for s, resp in responses.items():
        assert isinstance(resp, UnmaskResponse)
        keys = {4: shamir.share_to_bytes(12345 + s)}
        sig = r.identities[s].sign(UnmaskResponse.signed_bytes(
            r.server._session, s, resp.self_mask_shares, keys))
        r.server.handle(UnmaskResponse(s, resp.self_mask_shares, keys, sig))
    with pytest.raises(ProtocolAbort) as caught:
        r.server.close_stage()
    assert caught.value.reason is AbortReason.RECONSTRUCTION_FAILED


def test_server_refuses_unmask_response_with_forged_signature() -> None:
    r = Round(sites=5)
    responses = _unmask_responses(r)
    with pytest.raises(InvalidMessage):
        r.server.handle(replace(responses[1], signature=responses[2].signature))


def test_neighbours_abort_if_a_site_signs_a_low_order_masking_key() -> None:
    """A malicious site advertises (and signs) the all-zero X25519 point: no pairwise seed
    can be derived with it, and its neighbours say so instead of failing obscurely."""
    r = Round(sites=5)
    r.clients[3]._masking_key.public_bytes = bytes(32)  # site 3 advertises and signs it
    r.advance()  # advertise
    r.advance()  # share keys go through: only the encryption keys are used there
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[1].handle(r.outgoing[1])
    assert caught.value.reason is AbortReason.MALFORMED_MESSAGE


@pytest.mark.parametrize(("update", "weight", "match"), [
    (np.zeros(15), 0.5, "shape"), (np.full(16, np.nan), 0.5, "NaN"), (np.zeros(16), 0.0, "weight"),
    (np.zeros(16), "heavy", "weight"),
])
def test_bad_input_is_refused_when_the_site_is_created_not_mid_round(
    update: np.ndarray, weight: object, match: str,
) -> None:
    from secagg.masking import MaskingClient

    r = Round()
    with pytest.raises((ValueError, TypeError), match=match):
        MaskingClient(r.config, 1, r.identities[1], (update, weight))  # type: ignore[arg-type]
