"""Adversary: a server or site that hands the roles crafted Python objects instead of plain
values (an in-process or pickle-free transport still lets a caller build any object): int
subclasses that equal a site id but hash apart from it, dicts whose iteration repeats a key,
deeply nested tuples that crash hashing, None and strings where ids belong.

Property: every role rebuilds each message from plain types first; anything else is one
named refusal (MALFORMED_MESSAGE for a site, InvalidMessage for the server), never a quorum,
threshold or duplicate check fooled, and never a crash."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from secagg.errors import AbortReason, InvalidMessage, ProtocolAbort
from secagg.masking.messages import (
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
    UnmaskResponse,
)
from tests.roundkit import Round


class Clone(int):
    """Equal to an id, but a different hash each time: a set would count it again."""

    counter = 0

    def __hash__(self) -> int:
        Clone.counter += 1
        return super().__hash__() + Clone.counter * 2**61


class Repeating(dict):  # type: ignore[type-arg]
    """A dict whose keys() and iteration repeat one key."""

    def __init__(self, key: int, value: bytes, times: int) -> None:
        super().__init__({key: value})
        self._times = times

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([next(iter(dict.keys(self)))] * self._times)

    def keys(self):  # type: ignore[no-untyped-def]
        return list(self)

    def items(self):  # type: ignore[no-untyped-def]
        key, value = next(iter(dict.items(self)))
        return [(key, value)] * self._times


def _abort_reason(r: Round, site: int, message: object) -> AbortReason:
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[site].handle(message)  # type: ignore[arg-type]
    return caught.value.reason


def test_cloned_share_sender_ids_cannot_pass_the_threshold() -> None:
    """The server gives the victim t-1 'senders' that are clones of one colluder's id, each
    carrying the colluder's genuine share: counted as t-1 senders, the victim would mask with
    one partner only."""
    r = Round(sites=7)
    r.advance()
    r.advance()
    delivery = r.outgoing[1]
    assert isinstance(delivery, ShareDelivery)
    colluder = 2
    clones = {Clone(colluder): delivery.encrypted_shares[colluder]
              for _ in range(r.config.reconstruction_threshold)}
    assert _abort_reason(r, 1, ShareDelivery(clones)) is AbortReason.MALFORMED_MESSAGE


def test_a_dict_repeating_one_signature_cannot_fake_the_quorum() -> None:
    """The victim's own consistency signature, repeated q times by a dict that lies about its
    keys, would count as a roster-wide quorum."""
    r = Round(sites=7)
    r.advance()
    r.advance()
    r.advance()
    replies = {s: r.clients[s].handle(m) for s, m in r.outgoing.items()}
    request = UnmaskRequest(r.server._survivors, Repeating(
        1, replies[1].signature, r.config.consistency_quorum), ())  # type: ignore[union-attr]
    assert _abort_reason(r, 1, request) is AbortReason.MALFORMED_MESSAGE


@pytest.mark.parametrize("bad", ["nested", "none", "string", "bool", "huge", "float"])
def test_ids_of_the_wrong_type_are_malformed_not_a_crash(bad: str) -> None:
    nested: object = 1
    for _ in range(100_000):
        nested = (nested,)
    value = {"nested": nested, "none": None, "string": "2", "bool": True, "huge": 2**64,
             "float": 2.0}[bad]
    r = Round(sites=5)
    r.advance()
    r.advance()
    r.advance()
    listing = r.outgoing[1]
    assert isinstance(listing, SurvivorList)
    bad_list = replace(listing, survivors=(*listing.survivors[:-1], value))
    assert _abort_reason(r, 1, bad_list) is AbortReason.MALFORMED_MESSAGE
    assert r.clients[1]._held_shares == {}


@pytest.mark.parametrize("field", ["site_id", "self_mask_shares", "key_shares", "signature"])
def test_server_refuses_site_messages_with_fields_of_the_wrong_type(field: str) -> None:
    r = Round(sites=5)
    for _ in range(4):
        r.advance()
    reply = r.clients[1].handle(r.outgoing[1])
    assert isinstance(reply, UnmaskResponse)
    bad = {"site_id": Clone(1), "self_mask_shares": None, "key_shares": {"2": b"x"},
           "signature": "sig"}[field]
    with pytest.raises(InvalidMessage):
        r.server.handle(replace(reply, **{field: bad}))
    r.server.handle(reply)  # the genuine one is still taken


def test_a_site_whose_masked_input_is_garbage_gets_an_out_of_range_abort() -> None:
    """A malicious site adds its own junk to its masked input (signed normally). The unmasked
    sum would be silently absurd (an average far beyond clip); it is refused instead."""
    from secagg.masking.messages import MaskedInput

    r = Round(sites=5)
    r.advance()
    r.advance()
    for s, delivery in r.outgoing.items():
        masked = r.clients[s].handle(delivery)
        assert isinstance(masked, MaskedInput)
        if s == 3:
            junk = masked.masked_input.copy()
            junk[0] ^= np.uint32(2**31)  # one update word, flipped
            sig = r.identities[3].sign(MaskedInput.signed_bytes(r.server._session, 3, junk,
                                                                masked.partners))
            masked = MaskedInput(3, junk, masked.partners, sig)
        r.server.handle(masked)
    r.outgoing = r.server.close_stage()
    r.advance()
    with pytest.raises(ProtocolAbort) as caught:
        r.advance()
    assert caught.value.reason is AbortReason.AGGREGATE_OUT_OF_RANGE
    assert r.server.result is None


def test_a_site_keeps_no_secret_once_it_has_answered_the_unmask_request() -> None:
    r = Round(sites=5)
    for _ in range(4):
        r.advance()
    client = r.clients[1]
    client.handle(r.outgoing[1])
    assert client._held_shares == {} and client._self_mask_seed == b""
    assert client._input[0].size == 0
    assert client._masking_key.public_bytes != r.server._advertised[1].masking_public_key


class Agreeable(bytes):
    """Bytes that claim to equal anything: a commitment compared with it always matches."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = bytes.__hash__


class SubArray(np.ndarray):  # type: ignore[type-arg]
    """An ndarray subclass: it may override any ufunc, the server's running-sum add too."""


@pytest.mark.parametrize("bad", ["commitment-bytearray", "commitment-bytes-subclass",
                                 "masked-input-ndarray-subclass"])
def test_server_refuses_byte_fields_and_arrays_that_are_not_exactly_bytes_or_ndarray(
        bad: str) -> None:
    """Same contents, validly signed, in another type: a bytearray (mutable, and encoded apart
    from bytes), a bytes subclass whose == says yes to any commitment, an ndarray subclass
    whose ufuncs are its own. The server takes exact bytes and ndarray only (InvalidMessage)."""
    from secagg.masking.messages import MaskedInput, ShareKeys

    r = Round(sites=5)
    r.advance()
    if bad.startswith("commitment"):
        msg = r.clients[1].handle(r.outgoing[1])
        assert isinstance(msg, ShareKeys)
        kind = bytearray if bad == "commitment-bytearray" else Agreeable
        forged: object = replace(msg, self_mask_commitment=kind(msg.self_mask_commitment))
    else:
        r.advance()
        msg = r.clients[1].handle(r.outgoing[1])
        assert isinstance(msg, MaskedInput)
        forged = replace(msg, masked_input=msg.masked_input.view(SubArray))
    with pytest.raises(InvalidMessage):
        r.server.handle(forged)  # type: ignore[arg-type]
    r.server.handle(msg)  # the genuine one is still taken


class Duck:
    """Not the message class the field holds, but it normalizes into a genuine one."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def normalized(self) -> object:
        return self.inner.normalized()  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["directory-entry-duck", "attestation-duck",
                                 "attestation-partners-clones", "unmask-dropped-clone"])
def test_a_lying_servers_objects_of_another_type_are_malformed_at_the_site(bad: str) -> None:
    """A lying server hands a site a directory entry or mask attestation that is some other
    object (one whose normalized() it wrote), an attestation whose partner ids are int
    subclasses, or an unmask request naming a dropped site by a clone of its id. Each is
    MALFORMED_MESSAGE before any check reads it."""
    from secagg.masking.messages import KeyDirectory

    if bad == "directory-entry-duck":
        r = Round(sites=5)
        r.advance()
        directory = r.outgoing[1]
        assert isinstance(directory, KeyDirectory)
        message: object = KeyDirectory(tuple(Duck(e) for e in directory.entries))  # type: ignore[misc]
        site = 1
    elif bad.startswith("attestation"):
        r = Round(sites=40, vector_length=4, neighbors="auto")
        assert not r.config.complete_graph
        for _ in range(3):
            r.advance()
        site = 1
        listing = r.outgoing[site]
        assert isinstance(listing, SurvivorList) and listing.attestations
        peer = min(listing.attestations)
        genuine = listing.attestations[peer]
        swapped: object = (Duck(genuine) if bad == "attestation-duck" else
                           replace(genuine, partners=tuple(Clone(p) for p in genuine.partners)))
        message = replace(listing, attestations={**listing.attestations, peer: swapped})
    else:
        r = Round(sites=6)
        r.advance()
        r.advance()
        r.advance(skip=frozenset({6}))
        r.advance()
        site = 1
        request = r.outgoing[site]
        assert isinstance(request, UnmaskRequest) and request.dropped == (6,)
        message = replace(request, dropped=(Clone(6),))
    assert _abort_reason(r, site, message) is AbortReason.MALFORMED_MESSAGE
