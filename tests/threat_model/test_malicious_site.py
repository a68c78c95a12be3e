"""Adversary: a site (or an impersonator) that sends the server bad messages.

The server refuses the message and treats the site as dropped; the round goes on. Bad shares
at unmask are caught by the self-mask commitment or the advertised public key.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from secagg.errors import AbortReason, InvalidMessage, PreconditionError, ProtocolAbort
from secagg.hazmat import aead, shamir
from secagg.masking import Stage, _common, make_roster
from secagg.masking.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    MaskedInput,
    ShareKeys,
    UnmaskResponse,
)
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
    """Colluding sites send wrong (but well-signed) shares of site 2's self-mask seed: each
    fails site 2's signed share commitment and its sender is dropped; with too few left the
    server aborts rather than output garbage."""
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
    assert caught.value.reason is AbortReason.TOO_FEW_SURVIVORS
    assert r.server.result is None


def _unmask_with_site_6_dropped(sites: int) -> tuple[Round, dict[int, Any]]:
    """A round of ``sites`` in which site 6 drops before its masked input (its key shares
    are asked for), and every other site's unmask response."""
    r = Round(sites=sites)
    r.advance()
    r.advance()
    r.advance(skip=frozenset({6}))
    r.advance()
    return r, {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}


@pytest.mark.parametrize("kind", ["self-mask", "masking-key"])
def test_one_site_revealing_a_wrong_share_cannot_void_the_round(kind: str) -> None:
    """A malicious low-id site reveals a random, well-formed, well-signed share at unmask. The
    server used to reconstruct from the t lowest ids and abort the whole round; now the share
    fails its owner's signed commitment, the responder is dropped, and the round completes
    exactly from the others' shares."""
    r, responses = _unmask_with_site_6_dropped(sites=7)
    bad = responses[1]
    assert isinstance(bad, UnmaskResponse)
    forged = shamir.share_to_bytes(12345)
    if kind == "self-mask":
        self_mask, keys = {**bad.self_mask_shares, 2: forged}, dict(bad.key_shares)
    else:
        self_mask, keys = dict(bad.self_mask_shares), {**bad.key_shares, 6: forged}
    sig = r.identities[1].sign(UnmaskResponse.signed_bytes(r.server._session, 1, self_mask,
                                                           keys))
    responses[1] = UnmaskResponse(1, self_mask, keys, sig)
    for m in responses.values():
        r.server.handle(m)  # type: ignore[arg-type]
    r.server.close_stage()
    result = r.server.result
    assert result is not None and 1 in result.survivors
    exact = sum(np.clip(r.inputs[s][0], -1, 1) * r.inputs[s][1] for s in result.survivors)
    assert np.max(np.abs(result.weighted_sum - exact)) <= result.error_bound[0]


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
    assert caught.value.reason is AbortReason.TOO_FEW_SURVIVORS
    # the abort names the responders whose shares were not counted, not only the owner
    assert "sites [1, 2, 3, 5] revealed shares that do not match" in caught.value.detail


def test_server_refuses_unmask_response_with_forged_signature() -> None:
    r = Round(sites=5)
    responses = _unmask_responses(r)
    with pytest.raises(InvalidMessage):
        r.server.handle(replace(responses[1], signature=responses[2].signature))


def _plus_small_order_point(key: bytes) -> bytes:
    """``key``'s point plus the point of order 2, (0, 0): u becomes 1/u, a canonical encoding
    of another point that agrees with ``key`` on every X25519 secret (private keys are
    clamped to multiples of 8)."""
    p = 2**255 - 19
    return pow(int.from_bytes(key, "little"), -1, p).to_bytes(32, "little")


def _other_encoding(key: bytes, *, bit_255: bool) -> bytes:
    """Another encoding of the X25519 point ``key``: bit 255 set, or u + p (for a u < 19)."""
    u = int.from_bytes(key, "little")
    return ((u | 1 << 255) if bit_255 else u + 2**255 - 19).to_bytes(32, "little")


@pytest.mark.parametrize("bad", ["low-order", "copy-of-a-peers-key", "own-keys-equal",
                                 "short", "copy-with-bit-255-set", "u-plus-the-prime",
                                 "copy-plus-a-small-order-point", "encryption-key-low-order",
                                 "encryption-key-copy-of-a-peers"])
def test_server_refuses_an_advertisement_that_would_make_every_site_abort(bad: str) -> None:
    """One malicious site advertises (and signs) a low-order X25519 point, a copy of another
    site's key, the same key twice, or a short key. Put into the directory, it would make every
    honest site abort the round. Property: the server refuses that site alone and the round
    completes exactly without it."""
    r = Round(sites=5)
    key = r.clients[3]._masking_key
    # the encryption key is checked like the masking key: a low-order one, or a copy of a
    # peer's, sealed shares no site could open (or that two sites could)
    encryption = {"encryption-key-low-order": bytes(32),
                  "encryption-key-copy-of-a-peers": r.clients[1]._encryption_key.public_bytes}
    if bad in encryption:
        r.clients[3]._encryption_key.public_bytes = encryption[bad]
        bad = "as-is"  # (the masking key left as it is)
    key.public_bytes = {"as-is": key.public_bytes, "low-order": bytes(32),
                        "copy-of-a-peers-key": r.clients[1]._masking_key.public_bytes,
                        "own-keys-equal": r.clients[3]._encryption_key.public_bytes,
                        "short": bytes(31),
                        # the same point as site 1's key, in another encoding
                        "copy-with-bit-255-set": _other_encoding(
                            r.clients[1]._masking_key.public_bytes, bit_255=True),
                        "u-plus-the-prime": _other_encoding(
                            (9).to_bytes(32, "little"), bit_255=False),
                        "copy-plus-a-small-order-point": _plus_small_order_point(
                            r.clients[1]._masking_key.public_bytes)}[bad]
    advert = r.clients[3].start()
    for s in (1, 2, 4, 5):
        r.server.handle(r.clients[s].start())
    with pytest.raises(InvalidMessage):
        r.server.handle(advert)
    r.started = True
    r.outgoing = r.server.close_stage()
    for _ in range(4):
        r.advance()
    result = r.server.result
    assert result is not None and result.survivors == (1, 2, 4, 5)


def test_neighbours_abort_if_a_lying_server_forwards_a_low_order_masking_key() -> None:
    """A lying server puts site 3's (signed) all-zero X25519 point into the directory anyway:
    no pairwise seed can be derived with it, and every other site says so as it reads the
    directory (where it compares the keys) instead of failing obscurely."""
    from secagg.masking.messages import KeyDirectory

    r = Round(sites=5)
    r.clients[3]._masking_key.public_bytes = bytes(32)  # site 3 advertises and signs it
    adverts = {s: c.start() for s, c in r.clients.items()}
    directory = KeyDirectory(tuple(adverts[s] for s in sorted(adverts)))
    for s in (1, 2, 4, 5):
        with pytest.raises(ProtocolAbort) as caught:
            r.clients[s].handle(directory)
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


# ---- a site (or an impersonator on the wire) against the server's checks ---------------------


def _share_keys(r: Round) -> dict[int, ShareKeys]:
    """Every site's ShareKeys for the directory the server sent, not yet handed to it."""
    r.advance()  # advertise
    out = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    assert all(isinstance(m, ShareKeys) for m in out.values())
    return out  # type: ignore[return-value]


def _resigned_share_keys(r: Round, msg: ShareKeys, shares: dict[int, bytes],
                         commitment: bytes,
                         share_commitments: dict[int, bytes] | None = None) -> ShareKeys:
    """What a malicious site sends: its own ShareKeys changed, and signed again by it."""
    if share_commitments is None:
        share_commitments = {h: msg.share_commitments.get(h, bytes(64))
                             for h in {*shares, msg.site_id}}
    sig = r.identities[msg.site_id].sign(ShareKeys.signed_bytes(
        r.server._session, msg.site_id, shares, commitment, share_commitments))
    return ShareKeys(msg.site_id, shares, commitment, share_commitments, sig)


def _resigned_masked(r: Round, msg: MaskedInput, masked: np.ndarray,
                     partners: tuple[int, ...]) -> MaskedInput:
    sig = r.identities[msg.site_id].sign(MaskedInput.signed_bytes(
        r.server._session, msg.site_id, masked, partners))
    return MaskedInput(msg.site_id, masked, partners, sig)


def test_server_refuses_share_keys_replayed_from_another_round() -> None:
    """A site's genuine sealed shares from round A, replayed into round B (same sites, same
    identity keys): they are sealed under A's keys, and would make every recipient abort.
    Property: the server refuses them (InvalidMessage), so B's round is not derailed."""
    a = Round(round_id="round-A")
    b = Round(round_id="round-B", identities=a.identities)
    replayed = _share_keys(a)[1]
    b.advance()  # advertise: b's server now takes ShareKeys
    with pytest.raises(InvalidMessage):
        b.server.handle(replayed)
    assert 1 not in b.server._share_keys


@pytest.mark.parametrize("change", ["share", "swapped-recipients", "commitment",
                                    "share-commitment"])
def test_server_refuses_share_keys_altered_in_transit(change: str) -> None:
    """Someone between a site and the server changes a sealed share, moves shares between
    recipients, or swaps the self-mask commitment (so that reconstruction later fails).
    Property: the signature no longer verifies and the server refuses the message."""
    r = Round()
    msg = _share_keys(r)[1]
    shares = dict(msg.encrypted_shares)
    commitment = msg.self_mask_commitment
    if change == "share":
        flipped = bytearray(shares[2])
        flipped[-1] ^= 1
        shares[2] = bytes(flipped)
    elif change == "swapped-recipients":
        shares[2], shares[3] = shares[3], shares[2]
    elif change == "commitment":
        commitment = bytes(a ^ 0xFF for a in commitment)
    else:
        pairs = dict(msg.share_commitments)
        pairs[2] = bytes(64)
        with pytest.raises(InvalidMessage):
            r.server.handle(ShareKeys(1, shares, commitment, pairs, msg.signature))
        return
    with pytest.raises(InvalidMessage):
        r.server.handle(ShareKeys(1, shares, commitment, msg.share_commitments, msg.signature))


def test_server_refuses_share_keys_with_a_malformed_commitment() -> None:
    """A malicious site signs a 31-byte self-mask commitment: no reconstructed seed could
    match it, so accepting it would abort the whole round at unmask."""
    r = Round()
    msg = _share_keys(r)[1]
    bad = _resigned_share_keys(r, msg, dict(msg.encrypted_shares),
                               msg.self_mask_commitment[:31])
    with pytest.raises(InvalidMessage):
        r.server.handle(bad)


def test_server_refuses_shares_addressed_outside_the_senders_neighbourhood() -> None:
    """SecAgg+: a malicious site also seals a share to a site outside its neighbourhood. A
    server that delivered it would make that honest site abort (UNEXPECTED_SHARE_SENDER).
    Property: the server refuses the message; the far site is never sent the share."""
    r = Round(sites=40, vector_length=4, neighbors="auto")
    assert not r.config.complete_graph
    msg = _share_keys(r)[1]
    far = next(s for s in r.config.sites if s not in r.config.neighbourhood(1))
    shares = {**msg.encrypted_shares, far: next(iter(msg.encrypted_shares.values()))}
    with pytest.raises(InvalidMessage):
        r.server.handle(_resigned_share_keys(r, msg, shares, msg.self_mask_commitment))


def test_site_sealing_a_malformed_share_pair_to_a_peer_is_refused_and_never_stored() -> None:
    """A malicious site seals (correctly, under the pair key) a share pair of the wrong length
    to site 1. Property: the server refuses the ShareKeys (a sealed share's size is fixed;
    a 4.5 MB one made the delivery to its recipient exceed the message limit and that site
    dropped, with nothing naming the sender), and site 1, if a server relays it anyway, skips
    it (stores nothing it could not reveal) and goes on."""
    r = Round()
    replies = _share_keys(r)
    evil = replies[3]
    session = r.clients[3]._session
    for length in (10, 4_500_000):
        odd = aead.seal(r.clients[3]._share_key(1), b"\x01" * length,
                        _common.share_associated_data(session, 3, 1))
        with pytest.raises(InvalidMessage, match="sealed share size"):
            r.server.handle(_resigned_share_keys(r, evil, {**evil.encrypted_shares, 1: odd},
                                                 evil.self_mask_commitment))
    for m in replies.values():
        r.server.handle(m)
    deliveries = r.server.close_stage()
    short = aead.seal(r.clients[3]._share_key(1), b"\x01" * 10,
                      _common.share_associated_data(session, 3, 1))
    shares = {**deliveries[1].encrypted_shares, 3: short}  # type: ignore[attr-defined]
    from secagg.masking.messages import ShareDelivery

    reply = r.clients[1].handle(ShareDelivery(shares))
    assert isinstance(reply, MaskedInput) and 3 in reply.partners
    assert r.clients[1].unusable_share_senders == (3,) and 3 not in r.clients[1]._held_shares


@pytest.mark.parametrize("encoding", ["same-bytes", "plus-a-small-order-point"])
def test_site_advertising_a_copy_of_a_peers_masking_key_is_refused_by_every_site(
        encoding: str) -> None:
    """A malicious site 3 advertises (and signs) site 1's masking public key and a lying server
    forwards it. Every other site v would then derive the same pair seed with 1 and with 3,
    applied with opposite signs (v is between them), so v's masks with 1 and 3 cancel.
    Property: every honest site aborts with DUPLICATE_KEY before using the directory, also
    for the copy in another encoding of its class (the same secrets, other bytes)."""
    from secagg.masking.messages import KeyDirectory

    r = Round(sites=5)
    copied = r.clients[1]._masking_key.public_bytes
    r.clients[3]._masking_key.public_bytes = (
        copied if encoding == "same-bytes" else _plus_small_order_point(copied))
    adverts = {s: c.start() for s, c in r.clients.items()}
    directory = KeyDirectory(tuple(adverts[s] for s in sorted(adverts)))
    for s in (1, 2, 4, 5):
        with pytest.raises(ProtocolAbort) as caught:
            r.clients[s].handle(directory)
        assert caught.value.reason is AbortReason.DUPLICATE_KEY


def test_server_refuses_masked_input_replayed_from_another_round() -> None:
    """Site 1's genuine masked input from round A (same sites, same identities) replayed into
    round B: it is masked with A's seeds, so adding it would corrupt B's sum.
    Property: the server refuses it."""
    a = Round(round_id="round-A")
    b = Round(round_id="round-B", identities=a.identities)
    replayed = _masked_inputs(a)[1]
    b.advance()
    b.advance()
    with pytest.raises(InvalidMessage):
        b.server.handle(replayed)


@pytest.mark.parametrize("bad", ["one-word", "wide-words", "floats"])
def test_server_refuses_a_signed_masked_input_of_the_wrong_shape_or_type(bad: str) -> None:
    """A malicious site signs a vector the server's running sum would broadcast (one word
    added to every element) or silently cast (64-bit words, floats).
    Property: refused (InvalidMessage), and the round still sums exactly without it."""
    r = Round(sites=6)
    msgs = _masked_inputs(r)
    length = r.config.vector_length + 1
    vector = {"one-word": np.array([12345], dtype=np.uint32),
              "wide-words": np.full(length, 2**40 + 5, dtype=np.uint64),
              "floats": np.full(length, 0.5)}[bad]
    with pytest.raises(InvalidMessage):
        r.server.handle(_resigned_masked(r, msgs[3], vector, msgs[3].partners))
    for s, m in msgs.items():
        if s != 3:
            r.server.handle(m)
    r.outgoing = r.server.close_stage()
    r.advance()
    r.advance()
    result = r.server.result
    assert result is not None and result.survivors == (1, 2, 4, 5, 6)
    exact = sum(np.clip(r.inputs[s][0], -1, 1) * r.inputs[s][1] for s in result.survivors)
    assert np.max(np.abs(result.weighted_sum - exact)) <= result.error_bound[0]


def test_server_refuses_a_masked_input_signed_with_other_partners_than_delivered() -> None:
    """A malicious site claims (and signs) that it did not mask with site 2, although the
    server delivered it site 2's share: its attestation would mislead its neighbours.
    Property: the server refuses it."""
    r = Round()
    msg = _masked_inputs(r)[1]
    partners = tuple(p for p in msg.partners if p != 2)
    with pytest.raises(InvalidMessage):
        r.server.handle(_resigned_masked(r, msg, msg.masked_input, partners))


def test_server_refuses_masked_input_from_a_site_that_never_shared_keys() -> None:
    """Site 5's shares never reached the server, so nobody can unmask its self-mask; it
    sends a (validly signed) masked input anyway. Adding it would make unmasking impossible.
    Property: the server refuses it (PreconditionError) and the round completes without it."""
    r = Round()
    r.advance()
    r.advance(skip=frozenset({5}))
    session = r.server._session
    partners = (1, 2, 3, 4)
    vector = np.zeros(r.config.vector_length + 1, dtype=np.uint32)
    sig = r.identities[5].sign(MaskedInput.signed_bytes(session, 5, vector, partners))
    with pytest.raises(PreconditionError):
        r.server.handle(MaskedInput(5, vector, partners, sig))


def test_server_adds_a_masked_input_only_once() -> None:
    """A site (or a replaying relay) sends the same masked input twice, to have its update
    counted twice. Property: the second copy is refused."""
    r = Round()
    msg = _masked_inputs(r)[1]
    r.server.handle(msg)
    with pytest.raises(PreconditionError, match="already answered"):
        r.server.handle(msg)


def test_server_refuses_a_consistency_signature_forged_in_a_sites_name() -> None:
    """An impersonator sends site 3's consistency signature: a forged one, or site 3's genuine
    signature over another survivor list. Forwarded, it would make every site abort.
    Property: the server refuses both."""
    r = Round()
    r.advance()
    r.advance()
    r.advance()
    survivors = r.server._survivors
    other = tuple(s for s in survivors if s != 2)
    for sig in (bytes(64), r.identities[4].sign(
            ConsistencySignature.signed_bytes(r.server._session, survivors)),
            r.identities[3].sign(ConsistencySignature.signed_bytes(r.server._session, other))):
        with pytest.raises(InvalidMessage):
            r.server.handle(ConsistencySignature(3, sig))


def test_server_refuses_unmask_response_replayed_from_a_restarted_round() -> None:
    """A round restarted under the same id (same parameters, fresh keys): site 1's unmask
    response from the first attempt is replayed into the second.
    Property: refused; its shares belong to other secrets."""
    identities = make_roster(5)[1]
    a = Round(round_id="same-round", identities=identities)
    b = Round(round_id="same-round", identities=identities)
    assert a.config.params_digest == b.config.params_digest
    replayed = _unmask_responses(a)[1]
    for _ in range(4):
        b.advance()
    with pytest.raises(InvalidMessage):
        b.server.handle(replayed)


@pytest.mark.parametrize("field", ["self_mask_shares", "key_shares"])
def test_server_refuses_unmask_response_altered_in_transit(field: str) -> None:
    """Someone between a site and the server changes a revealed share (so that the round
    aborts or, without the commitment checks, unmasks wrongly).
    Property: the signature no longer verifies; the response is refused."""
    r = Round(sites=5)
    r.advance()
    r.advance()
    r.advance(skip=frozenset({4}))
    r.advance()
    msg = r.clients[1].handle(r.outgoing[1])
    assert isinstance(msg, UnmaskResponse) and msg.key_shares
    table = dict(getattr(msg, field))
    owner = next(iter(table))
    table[owner] = shamir.share_to_bytes((shamir.share_from_bytes(table[owner]) + 1)
                                         % shamir.PRIME)
    with pytest.raises(InvalidMessage):
        r.server.handle(replace(msg, **{field: table}))


def test_site_withholding_a_share_from_one_neighbour_then_dropping_leaves_the_aggregate_exact(
) -> None:
    """Malicious site 4 sends its shares to everyone but site 2 (so 2 never masks with 4),
    then drops. The server now refuses such a ShareKeys outright (a share left out pushed its
    site under its threshold of senders: test_share_tampering); one accepted anyway (a store
    written before that check, replayed) must still not make the server strip a 2-4 mask
    that 2 never applied. Property: the aggregate of the survivors is exact."""
    r = Round(sites=7)
    replies = _share_keys(r)
    evil = replies[4]
    replies[4] = _resigned_share_keys(
        r, evil, {k: v for k, v in evil.encrypted_shares.items() if k != 2},
        evil.self_mask_commitment)
    with pytest.raises(InvalidMessage, match="share recipients"):
        r.server.handle(replies[4])
    for s, m in replies.items():
        if s == 4:
            r.server._share_keys[4] = m  # type: ignore[assignment]  # (accepted before)
        else:
            r.server.handle(m)
    r.outgoing = r.server.close_stage()
    r.advance(skip=frozenset({4}))  # masked input: 4 drops
    r.advance()  # consistency check
    for s, request in r.outgoing.items():
        try:
            r.server.handle(r.clients[s].handle(request))
        except ProtocolAbort:  # site 2 never held 4's shares: it declines to unmask 4
            assert s == 2
    r.server.close_stage()
    result = r.server.result
    assert result is not None and 4 not in result.survivors
    exact = sum(np.clip(r.inputs[s][0], -1, 1) * r.inputs[s][1] for s in result.survivors)
    assert np.max(np.abs(result.weighted_sum - exact)) <= result.error_bound[0]


def test_round_aborts_cleanly_when_too_few_sites_answer_a_stage() -> None:
    """Three of seven sites go silent at the share stage (t = 5): the round cannot finish.
    Property: the server aborts at once (TOO_FEW_SURVIVORS) instead of delivering shares."""
    r = Round(sites=7)
    r.advance()
    with pytest.raises(ProtocolAbort) as caught:
        r.advance(skip=frozenset({1, 2, 3}))
    assert caught.value.reason is AbortReason.TOO_FEW_SURVIVORS
    assert r.server.stage is Stage.ABORTED


@pytest.mark.parametrize("bad", ["missing-holder", "short", "extra-holder", "long"])
def test_server_refuses_share_keys_with_missing_or_short_share_commitments(bad: str) -> None:
    """Without a commitment for every holder, the server could not check the shares revealed
    at unmask, and one bad share would again void the round. A longer one (a pair and junk,
    stored for the round) is refused too: each is exactly 64 bytes."""
    r = Round()
    msg = _share_keys(r)[1]
    pairs = dict(msg.share_commitments)
    if bad == "missing-holder":
        pairs.pop(2)
    elif bad == "short":
        pairs[2] = pairs[2][:63]
    elif bad == "long":
        pairs[2] = pairs[2] + b"\0"
    else:
        pairs[99] = bytes(64)
    with pytest.raises(InvalidMessage):
        r.server.handle(_resigned_share_keys(r, msg, dict(msg.encrypted_shares),
                                             msg.self_mask_commitment, pairs))


def test_site_dealing_shares_of_another_self_mask_seed_than_it_committed_to_aborts_cleanly(
) -> None:
    """A malicious site 2 commits to one self-mask seed and deals consistent shares of
    another. Every share matches its own commitment, so no responder is dropped; the seed
    rebuilt from them is not the committed one. Property: the server aborts with
    RECONSTRUCTION_FAILED rather than strip the wrong mask and output garbage."""
    from unittest import mock

    from secagg.masking import _common

    r = Round(sites=5)
    r.advance()
    real = _common.self_mask_commitment

    def lying(session: bytes, site: int, seed: bytes) -> bytes:
        return real(session, site, bytes(32) if site == 2 else seed)

    with mock.patch.object(_common, "self_mask_commitment", lying):
        replies = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    for m in replies.values():
        r.server.handle(m)  # type: ignore[arg-type]
    r.outgoing = r.server.close_stage()
    r.started = True
    r.advance()
    r.advance()
    with pytest.raises(ProtocolAbort) as caught:
        r.advance()
    assert caught.value.reason is AbortReason.RECONSTRUCTION_FAILED
    assert r.server.result is None


def test_dropped_site_that_dealt_shares_of_another_masking_key_aborts_cleanly() -> None:
    """A malicious site 4 deals consistent shares of a masking key other than the one it
    advertised, then drops: the key rebuilt from its shares does not match its advertised
    public key. Property: the server aborts with RECONSTRUCTION_FAILED instead of removing the
    wrong pairwise masks."""
    from unittest import mock

    from secagg.hazmat.key_agreement import AgreementKey

    r = Round(sites=5)
    r.advance()
    other = AgreementKey.generate().export_private_bytes()
    target = r.clients[4]._masking_key
    real = AgreementKey.export_private_bytes

    def lying(self: AgreementKey) -> bytes:
        return other if self is target else real(self)

    with mock.patch.object(AgreementKey, "export_private_bytes", lying):
        r.advance()
    r.advance(skip=frozenset({4}))
    r.advance()
    with pytest.raises(ProtocolAbort) as caught:
        r.advance()
    assert caught.value.reason is AbortReason.RECONSTRUCTION_FAILED


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_a_site_sending_past_the_clip_norm_aborts_the_round_over_the_service(
        tmp_path: Any, protocol: str) -> None:
    """A roster site skips the SDK's clip and sends +clip_norm in every learned element: each
    element is within what the masking role checks, but the update is sqrt(n) times longer
    than any clipped one, and it moved the published model 33 times as far as a site within
    its limits could. The aggregator, which knows the model, checks the unmasked sum's L2
    norm (CKKS: the released average's, times the weight sum, beside the flooding noise's)
    against clip_norm times the weight sum: the round aborts, out of range, and no model is
    published from it."""
    reports, aborted = _four_sites_one_malicious(tmp_path, protocol, ("--unclipped", "1:1.0"),
                                                 within=120.0)
    assert all("AGGREGATE_OUT_OF_RANGE" in r["reason"] for r in reports.values()), reports
    assert [e["reason"] for e in aborted] == ["AGGREGATE_OUT_OF_RANGE"], aborted


def _four_sites_one_malicious(tmp_path: Any, protocol: str, flag: tuple[str, str], *,
                              within: float, **deadlines: float
                              ) -> tuple[dict[int, Any], list[dict[str, Any]]]:
    """One round of 4 site processes over the service, site 4 run with ``flag``; each must
    end (RoundAborted) ``within`` seconds of the start. (Each site's report, the
    aggregator's round_aborted events.)"""
    import time

    from tests.service_kit import make_federation, read_reports, start_aggregator, start_site

    fed = make_federation(tmp_path, 4, protocol, rounds=1, open_s=60.0, stage_s=20.0,
                          **deadlines)
    agg = start_aggregator(fed, tmp_path)
    began = time.monotonic()
    sites = {s: start_site(fed, s, tmp_path / f"site-{s}.jsonl", *(flag if s == 4 else ()))
             for s in (1, 2, 3, 4)}
    try:
        for p in sites.values():
            assert p.wait(timeout=max(1.0, within - (time.monotonic() - began))) == 0
    finally:
        for p in sites.values():
            p.kill()
        agg.stop()
    reports = {}
    for s in (1, 2, 3, 4):
        (reports[s],) = read_reports(tmp_path / f"site-{s}.jsonl")
        assert reports[s].get("error") == "RoundAborted", reports[s]
    return reports, [e for e in agg.read() if e.get("event") == "round_aborted"]


def test_a_ckks_site_past_the_element_clip_aborts_the_round_when_the_key_holder_refuses(
        tmp_path: Any) -> None:
    """A roster site skips every clip and sends 50 in each learned element of its CKKS upload
    (the layout's per-element clip too). The key holder decrypts the sum, finds it out of
    range and refuses it; it tells the aggregator (a signed CkksReleaseRefusal), which aborts
    the round as AGGREGATE_OUT_OF_RANGE at once. Before, the key holder only stopped, and
    every site waited for the release deadline (here 240 s: the sites are given 60) for an
    abort that named no cause."""
    reports, aborted = _four_sites_one_malicious(tmp_path, "ckks", ("--past-the-clip", "1:50.0"),
                                                 within=60.0, release_s=240.0)
    for s, report in reports.items():
        assert ("OUT_OF_RANGE" if s == 1 else "AGGREGATE_OUT_OF_RANGE") in report["reason"]
    assert [e["reason"] for e in aborted] == ["AGGREGATE_OUT_OF_RANGE"], aborted
    assert "key holder refused the sum" in aborted[0]["message"], aborted


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (1e-4, 0.3, 1.0, 2e-3)])
def test_honest_inputs_at_the_clip_norm_pass_the_aggregators_norm_check(
        weights: tuple[float, ...]) -> None:
    """The least slack there is: every site's delta exactly clip_norm long, all in one
    direction (their sum as long as clipped inputs can make it), with small and large
    weights; quantised, masked and unmasked for real. The aggregator's L2 check takes it."""
    import types

    from aggregator.job import Job
    from secagg.masking import RoundConfig, simulate_round
    from secagg.model import FlatModel

    size = 4096
    roster, identities = make_roster(len(weights))
    config = RoundConfig("norm-check", roster, size)
    direction = np.random.default_rng(7).normal(size=size)  # test data only
    direction *= config.quantizer.clip / np.linalg.norm(direction)
    inputs = {s: (direction.copy(), w) for s, w in zip(sorted(identities), weights, strict=True)}
    result = simulate_round(config, identities, inputs).result
    assert result is not None
    model = FlatModel.from_arrays({"w": np.zeros(size, np.float32)})
    job = types.SimpleNamespace(config=types.SimpleNamespace(clip_norm=config.quantizer.clip))
    Job._check_clip_norm(job, model, result.weighted_sum,  # type: ignore[arg-type]
                         result.weight_sum, result.error_bound)
    longer = result.weighted_sum * 1.001
    with pytest.raises(ProtocolAbort):
        Job._check_clip_norm(job, model, longer, result.weight_sum,  # type: ignore[arg-type]
                             result.error_bound)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (1e-3, 0.3, 1.0, 2e-2)])
def test_honest_ckks_inputs_at_the_clip_norm_pass_the_aggregators_norm_check(
        weights: tuple[float, ...]) -> None:
    """As for masking: every site's delta exactly clip long, all in one direction, encrypted,
    summed and released for real (flooding noise and all): the aggregator's L2 check of the
    release takes it, and refuses it 1% longer."""
    import types

    from aggregator.job import Job
    from secagg.ckks import CkksClient, CkksRoundConfig, CkksServer, KeyHolder, release_average
    from secagg.model import FlatModel

    size = 2048
    roster, identities = make_roster(len(weights))
    holder = KeyHolder.generate()
    announcement = holder.announce(holder=1, identity=identities[1], epoch="norm-check")
    config = CkksRoundConfig("norm-check", roster, announcement, (1,), size)
    direction = np.random.default_rng(7).normal(size=size)  # test data only
    direction *= config.clip / np.linalg.norm(direction)
    public = holder.public_context()
    server = CkksServer(config, public)
    uploads = []
    for s, w in zip(sorted(identities), weights, strict=True):
        upload = CkksClient(config, s, identities[s], holder if s == 1 else public,
                            (direction.copy(), w), seeded=False).start()
        server.handle(upload)
        uploads.append(upload)
    released = release_average(holder, config, server.close_stage()[1], uploads, site_id=1)
    model = FlatModel.from_arrays({"w": np.zeros(size, np.float32)})
    job = types.SimpleNamespace(config=types.SimpleNamespace(clip_norm=config.clip))
    active = types.SimpleNamespace(ckks_config=config, view=types.SimpleNamespace(model=model))
    sites = len(released.sites)
    Job._check_released_norm(job, active, released.average, sites,  # type: ignore[arg-type]
                             released.weight_sum)
    with pytest.raises(ProtocolAbort, match="longer than clipped inputs can make"):
        Job._check_released_norm(job, active, released.average * 1.01,  # type: ignore[arg-type]
                                 sites, released.weight_sum)


# ---- CKKS: uploads whose second polynomial is zero ("transparent") -------------------------


def _transparent(r: Any, update: Any, how: str) -> Any:
    """``update`` re-signed by its site with its second polynomial zero: "decrypted" (the
    plaintext the honest ciphertext holds, as an unencrypted ciphertext: decrypts, without the
    key, to the same values) or "zeroed" (the first polynomial kept: garbage)."""
    from tenseal import sealapi

    from secagg.ckks import _seal
    from secagg.ckks.round import EncryptedUpdate

    ctx = r.public.seal_context
    packer = _seal._layout(ctx).kinds[_seal.Kind.FULL].packer
    chunks = []
    for chunk in update.chunks:
        values = packer.unpack(memoryview(chunk)[2:]).copy()
        half = values.size // 2
        if how == "decrypted":
            ct = _seal.load_ciphertext(ctx, chunk, scale=r.config.preset_params.scale)
            plain = sealapi.Plaintext()
            sealapi.Decryptor(r.holder.seal_context, r.holder.secret_key).decrypt(ct, plain)
            assert plain.coeff_count() == half
            values[:half] = [plain.data(i) for i in range(half)]
        values[half:] = 0
        chunks.append(chunk[:2] + packer.pack(values))
    signed = EncryptedUpdate.signed_bytes(r.config.params_digest, update.site_id,
                                          update.key_id, update.seeded, tuple(chunks))
    return replace(update, chunks=tuple(chunks),
                   signature=r.identities[update.site_id].sign(signed))


@pytest.mark.parametrize("workers", [1, 2])
def test_two_sites_sending_transparent_uploads_first_leave_the_ckks_round_exact(
        workers: int) -> None:
    """Two sites whose ciphertexts have a zero second polynomial, counted first, make the
    running sum transparent for a moment. SEAL throws after such an addition: before, the
    aggregator's and the key holder's sums kept the second upload without counting it (the
    round then refused as AGGREGATE_MISMATCH: two sites could void any round). Now the
    round completes with the right average: a transparent sum is still the sum."""
    from secagg.ckks import CkksServer, Release

    r = _make_ckks_round()
    honest = {s: r.client(s, seeded=False).start() for s in sorted(r.roster)}
    uploads = [_transparent(r, honest[2], "decrypted"), _transparent(r, honest[3], "decrypted")]
    uploads += [honest[s] for s in (1, 4, 5)]
    server = CkksServer(r.config, r.public)
    for u in uploads:
        server.handle(u)
    aggregate = server.close_stage()[1]
    assert aggregate.sites == (1, 2, 3, 4, 5)
    release = Release(r.holder, r.config, site_id=1, workers=workers)
    try:
        for u in uploads:
            release.add(u)
        released = release.finish(aggregate)
    finally:
        release.close()
    ws, w = r.expected()
    np.testing.assert_allclose(released.average, ws / w, atol=1e-3)


def test_a_transparent_upload_cancelling_the_sum_is_counted_whole_on_both_sides() -> None:
    """A site whose second polynomial cancels the running sum's (its colluder's, read from a
    seeded upload or made zero): the addition that throws in SEAL has happened, and the
    upload is counted; the aggregator's sum and the key holder's stay equal (a garbage
    upload is then the range check's to refuse, as any out-of-range upload is)."""
    from secagg.ckks import CkksServer, Release
    from secagg.errors import RefusalReason, RefusedMessage

    r = _make_ckks_round()
    honest = {s: r.client(s, seeded=False).start() for s in sorted(r.roster)}
    uploads = [_transparent(r, honest[2], "zeroed"), _transparent(r, honest[3], "zeroed")]
    uploads += [honest[s] for s in (1, 4, 5)]
    server = CkksServer(r.config, r.public)
    for u in uploads:
        server.handle(u)
    aggregate = server.close_stage()[1]
    release = Release(r.holder, r.config, site_id=1)
    try:
        for u in uploads:
            release.add(u)
        with pytest.raises(RefusedMessage) as refused:
            release.finish(aggregate)
    finally:
        release.close()
    assert refused.value.reason is RefusalReason.OUT_OF_RANGE, refused.value


def _make_ckks_round() -> Any:
    from tests.ckks_kit import CkksRound

    return CkksRound(sites=5, vector_length=3000)  # two chunks: two release workers


def test_a_site_advertising_its_own_key_in_another_encoding_cannot_void_the_round() -> None:
    """Site 4 advertises its masking key plus the point of order 2 (1/u: the same secrets
    with everyone), then drops after sharing its keys. The server reconstructs its private
    key and checks it against the advertised key by class, as every comparison of keys is:
    compared by bytes, the check failed (RECONSTRUCTION_FAILED) and one site voided the
    round. The round completes, exactly, without site 4."""
    r = Round(sites=5)
    key = r.clients[4]._masking_key
    key.public_bytes = _plus_small_order_point(key.public_bytes)
    r.advance()
    r.advance()
    r.advance(skip=frozenset({4}))
    r.advance()
    r.advance()
    result = r.server.result
    assert result is not None and result.survivors == (1, 2, 3, 5)
    exact = sum(np.clip(r.inputs[s][0], -1, 1) * r.inputs[s][1] for s in result.survivors)
    assert np.max(np.abs(result.weighted_sum - exact)) <= result.error_bound[0]


@pytest.mark.parametrize("bad", ["unknown owner", "many junk entries", "survivor's key",
                                 "dropped site's self-mask", "long share", "short share"])
def test_server_refuses_unmask_shares_the_site_does_not_hold(bad: str) -> None:
    """A site signs an unmask response with shares it cannot hold: of sites outside the
    round, 105,000 made-up entries (7.8 MB the aggregator kept in the round's record for
    good), a key share of a survivor, a self-mask share of a dropped site, or a share of
    another length. Refused whole; the round completes from the others' shares."""
    r, responses = _unmask_with_site_6_dropped(sites=6)
    mine = responses[1]
    assert isinstance(mine, UnmaskResponse) and 6 in mine.key_shares
    self_mask, keys = dict(mine.self_mask_shares), dict(mine.key_shares)
    share = shamir.share_to_bytes(12345)
    if bad == "unknown owner":
        self_mask[99] = share
    elif bad == "many junk entries":
        self_mask.update({1000 + i: share for i in range(105_000)})
    elif bad == "survivor's key":
        keys[2] = share
    elif bad == "dropped site's self-mask":
        self_mask[6] = share
    elif bad == "long share":
        self_mask[2] = share + b"\0"
    else:
        keys[6] = share[:-1]
    sig = r.identities[1].sign(UnmaskResponse.signed_bytes(r.server._session, 1, self_mask,
                                                           keys))
    with pytest.raises(InvalidMessage, match="unmask shares"):
        r.server.handle(UnmaskResponse(1, self_mask, keys, sig))
    for s, m in responses.items():
        if s != 1:
            r.server.handle(m)  # type: ignore[arg-type]
    r.server.close_stage()
    result = r.server.result
    assert result is not None
    exact = sum(np.clip(r.inputs[s][0], -1, 1) * r.inputs[s][1] for s in result.survivors)
    assert np.max(np.abs(result.weighted_sum - exact)) <= result.error_bound[0]


def _deal_a_share_outside_the_field(r: Round, dealer: int, holder: int, which: int = 0) -> None:
    """Advance ``r`` through ShareKeys with ``dealer`` sealing ``holder`` a share of 66
    bytes that is no field element (>= PRIME), sealed and committed properly: of its
    self-mask seed (``which`` 0, the first split) or of its key (1, the second)."""
    from unittest import mock

    import secagg.masking.client as client_module

    r.advance()
    real_split, calls = shamir.split, [0]

    def split(secret: int, t: int, holders: Any) -> Any:
        out = dict(real_split(secret, t, holders))
        if calls[0] == which:
            out[holder] = shamir.PRIME + 5
        calls[0] += 1
        return out

    replies = {}
    for s, msg in r.outgoing.items():
        if s == dealer:
            with mock.patch.object(client_module.shamir, "split", split), \
                    mock.patch.object(client_module.shamir, "share_to_bytes",
                                      lambda y: y.to_bytes(shamir.SHARE_BYTES, "big")):
                replies[s] = r.clients[s].handle(msg)
        else:
            replies[s] = r.clients[s].handle(msg)
    for m in replies.values():
        r.server.handle(m)  # type: ignore[arg-type]
    r.outgoing = r.server.close_stage()


@pytest.mark.parametrize("which", [0, 1], ids=["self-mask-share", "key-share"])
def test_a_share_outside_the_field_is_its_dealers_fault_not_its_holders(which: int) -> None:
    """Site 1 deals site 2 a self-mask share >= PRIME, sealed and committed: site 2 held it,
    revealed it at unmask, and the server aborted the round as MALFORMED_MESSAGE "share from
    site 2", blaming the honest holder. Site 2 now takes site 1 for an unusable share sender
    (as for a share that does not open) and the round completes. (Either half of the pair.)"""
    r = Round(sites=5, vector_length=4)
    _deal_a_share_outside_the_field(r, dealer=1, holder=2, which=which)
    r.advance()
    assert 1 in r.clients[2].unusable_share_senders
    r.advance()
    r.advance()
    assert r.server.stage is Stage.COMPLETED
    result = r.server.result
    assert result is not None
    exact = sum(np.clip(r.inputs[s][0], -1, 1) * r.inputs[s][1] for s in result.survivors)
    assert np.max(np.abs(result.weighted_sum - exact)) <= result.error_bound[0]


def test_a_revealed_share_outside_the_field_drops_its_revealer_not_the_round() -> None:
    """The holder colludes and reveals the dealer's share >= PRIME (it matches the dealer's
    commitment): the server dropped nothing and aborted the round. The revealer is dropped
    like one revealing a wrong share, and the round completes from the others."""
    from unittest import mock

    import secagg.masking.client as client_module

    r = Round(sites=5, vector_length=4)
    _deal_a_share_outside_the_field(r, dealer=1, holder=2)
    with mock.patch.object(client_module, "_field_elements", lambda pair: True):
        r.advance()
    r.advance()
    r.advance()
    assert r.server.stage is Stage.COMPLETED
    assert r.server.result is not None


def test_closing_a_stage_once_the_round_has_ended_is_a_named_refusal() -> None:
    """A driver that closes a stage again after the round completed (or aborted) is told so
    (PreconditionError), not sent a KeyError from the server's stage tables."""
    r = Round(sites=5)
    for _ in range(5):
        r.advance()
    assert r.server.stage is Stage.COMPLETED and r.server.result is not None
    with pytest.raises(PreconditionError, match="no stage to close"):
        r.server.close_stage()
    aborted = Round(sites=5)
    with pytest.raises(ProtocolAbort):
        aborted.advance(skip=frozenset(aborted.config.sites))
    assert aborted.server.stage is Stage.ABORTED
    with pytest.raises(PreconditionError, match="no stage to close"):
        aborted.server.close_stage()


@pytest.mark.parametrize("stage", ["share-keys", "consistency-check", "unmask"])
def test_server_refuses_a_signed_message_from_a_site_that_left_at_an_earlier_stage(
        stage: str) -> None:
    """Site 6 drops out at one stage and then sends (validly signed) the next stage's message
    anyway: ShareKeys without having advertised keys (its shares would reach honest sites
    from a sender missing from their directory), a consistency signature without a masked
    input (counted towards the quorum for a list it is not on), an unmask response without
    having signed the survivor list. Each is refused: only the sites still in the round at
    a stage may answer it."""
    from secagg.masking.server import SEALED_SHARE_BYTES

    r = Round(sites=6)
    me = r.identities[6]
    if stage == "share-keys":
        r.advance(skip=frozenset({6}))
        shares = {u: bytes(SEALED_SHARE_BYTES) for u in range(1, 6)}
        pairs = {h: bytes(64) for h in range(1, 7)}
        msg: Any = ShareKeys(6, shares, bytes(32), pairs, me.sign(ShareKeys.signed_bytes(
            r.server._session, 6, shares, bytes(32), pairs)))
    elif stage == "consistency-check":
        r.advance()
        r.advance()
        r.advance(skip=frozenset({6}))
        assert 6 not in r.server._survivors
        msg = ConsistencySignature(6, me.sign(ConsistencySignature.signed_bytes(
            r.server._session, r.server._survivors)))
    else:
        r.advance()
        r.advance()
        r.advance()
        r.advance(skip=frozenset({6}))
        msg = UnmaskResponse(6, {}, {}, me.sign(UnmaskResponse.signed_bytes(
            r.server._session, 6, {}, {})))
    with pytest.raises(PreconditionError, match="not a participant"):
        r.server.handle(msg)


def _masked_inputs_and_encodings(r: Round) -> tuple[dict[int, MaskedInput],
                                                     dict[int, np.ndarray]]:
    """Every site's masked input, and the quantised encoding each one masked."""
    from unittest import mock

    from secagg.hazmat.quantize import Quantizer

    r.advance()
    r.advance()
    encodings: dict[int, np.ndarray] = {}
    real = Quantizer.encode

    def recording(self: Quantizer, update: np.ndarray, weight: float, **kw: Any) -> np.ndarray:
        out = real(self, update, weight, **kw)
        encodings[next(s for s, (u, _) in r.inputs.items() if u is update)] = out.copy()
        return out

    with mock.patch.object(Quantizer, "encode", recording):
        masked = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    return masked, encodings  # type: ignore[return-value]


@pytest.mark.parametrize("steer", ["zero-weight-sum", "weight-sum-past-the-survivors-max"])
def test_a_site_steering_the_unmasked_weight_sum_out_of_range_gets_an_out_of_range_abort(
        steer: str) -> None:
    """A malicious site 3 adds its own offsets to its masked input (signed normally) so that
    the unmasked sum is one no clipped, weighted inputs produce: a weight sum of exactly 0
    (with every weighted element 0: the published average 0/0), or a weight sum above
    max_weight times the survivors (4 of 5 here: a site weighing as much as the missing one
    and more, diluting every honest update). Both are refused as AGGREGATE_OUT_OF_RANGE."""
    r = Round(sites=5)
    masked, encodings = _masked_inputs_and_encodings(r)
    survivors = (1, 2, 3, 4, 5) if steer == "zero-weight-sum" else (1, 2, 3, 4)
    q = r.config.quantizer
    honest = np.zeros_like(encodings[1])
    for s in survivors:
        honest += encodings[s]
    target = honest.copy()
    if steer == "zero-weight-sum":
        target[:-1] = len(survivors) * q.levels // 2  # every weighted element decodes to ~0
        target[-1] = 0
    else:
        target[-1] = (len(survivors) + 1) * q.levels - 1  # a weight sum of ~5 for 4 sites
    bad = masked[3].masked_input + (target - honest)
    for s in survivors:
        r.server.handle(_resigned_masked(r, masked[3], bad, masked[3].partners) if s == 3
                        else masked[s])
    r.outgoing = r.server.close_stage()
    r.advance()
    with pytest.raises(ProtocolAbort) as caught:
        r.advance()
    assert caught.value.reason is AbortReason.AGGREGATE_OUT_OF_RANGE
    assert r.server.result is None


def test_site_dealing_shares_of_a_secret_too_long_for_a_seed_aborts_cleanly() -> None:
    """A malicious site 2 deals consistent, committed shares of a "self-mask seed" of 301
    bits: every share passes its commitment, and the value rebuilt from them fits no 32-byte
    seed. Property: the round aborts, RECONSTRUCTION_FAILED, with the server in ABORTED (not
    a ValueError out of close_stage leaving it in UNMASK)."""
    from unittest import mock

    import secagg.masking.client as client_module

    r = Round(sites=5)
    r.advance()
    real_split, calls = shamir.split, [0]

    def split(secret: int, t: int, holders: Any) -> Any:
        calls[0] += 1
        return real_split(1 << 300 if calls[0] == 1 else secret, t, holders)

    replies = {}
    for s, msg in r.outgoing.items():
        with mock.patch.object(client_module.shamir, "split",
                               split if s == 2 else real_split):
            replies[s] = r.clients[s].handle(msg)
    for m in replies.values():
        r.server.handle(m)  # type: ignore[arg-type]
    r.outgoing = r.server.close_stage()
    r.advance()
    r.advance()
    with pytest.raises(ProtocolAbort) as caught:
        r.advance()
    assert caught.value.reason is AbortReason.RECONSTRUCTION_FAILED
    assert r.server.stage is Stage.ABORTED and r.server.result is None
