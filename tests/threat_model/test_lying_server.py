"""Adversary: a server that lies about who dropped out, to unmask one site's input.

If the server learned both the self-mask seed b_u and the masking key s_u of a site u whose
masked input it holds, it could strip every mask from that input. It tries by telling sites
that u is alive (to collect b_u shares) and dead (to collect s_u shares). The consistency
check (a signed survivor list) and the sites' unmask checks stop every variant.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from secagg.errors import AbortReason, PreconditionError, ProtocolAbort
from secagg.masking import Stage, make_roster
from secagg.masking.messages import (
    ConsistencySignature,
    KeyDirectory,
    MaskedInput,
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
    UnmaskResponse,
)
from tests.roundkit import Round


def _to_unmask(r: Round, *, drop_masked: frozenset[int] = frozenset()) -> UnmaskRequest:
    r.advance()  # advertise
    r.advance()  # share keys
    r.advance(skip=drop_masked)  # masked input
    out = r.advance()  # consistency check
    request = next(iter(out.values()))
    assert isinstance(request, UnmaskRequest)
    return request


def _expect(r: Round, site: int, request: UnmaskRequest, reason: AbortReason) -> None:
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[site].handle(request)
    assert caught.value.reason is reason


def test_honest_unmask_never_reveals_both_shares_of_any_site() -> None:
    r = Round(sites=7)
    _to_unmask(r, drop_masked=frozenset({4, 6}))
    r.advance()
    responses = [m for m in r.replies.values() if isinstance(m, UnmaskResponse)]
    assert responses
    for resp in responses:
        assert not set(resp.self_mask_shares) & set(resp.key_shares)
        assert set(resp.key_shares) == {4, 6}
    assert r.server.result is not None


def test_client_aborts_if_unmask_request_lists_itself_as_dropped() -> None:
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    _expect(r, 1, replace(req, dropped=(*req.dropped, 1)), AbortReason.SELF_LISTED_AS_DROPPED)


def test_client_aborts_if_unmask_request_lists_survivor_as_dropped() -> None:
    """The core attack: ask for site 2's key shares although site 2's input was summed."""
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    _expect(r, 1, replace(req, dropped=(*req.dropped, 2)),
            AbortReason.PEER_BOTH_ALIVE_AND_DROPPED)


def test_client_aborts_if_unmask_request_lists_unknown_site() -> None:
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    _expect(r, 1, replace(req, dropped=(*req.dropped, 77)), AbortReason.UNKNOWN_SITE)


def test_an_abort_for_many_unknown_sites_names_a_few() -> None:
    """An unmask request naming a million unknown sites made an abort text of 16 MB (every
    id), built before anything cut it: it names sixteen and counts the rest."""
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[1].handle(replace(req, dropped=(*req.dropped, *range(100, 1100))))
    assert caught.value.reason is AbortReason.UNKNOWN_SITE
    assert "and 984 more" in str(caught.value) and len(str(caught.value)) < 300


def test_client_aborts_if_unmask_request_lists_duplicate_id() -> None:
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    _expect(r, 1, replace(req, dropped=(4, 4)), AbortReason.DUPLICATE_SITE)


def test_client_aborts_if_unmask_request_lists_peer_already_dropped() -> None:
    """Site 5 dropped before sharing keys: nothing of it can be unmasked, asking is a lie."""
    r = Round(sites=7)
    r.advance()
    r.advance(skip=frozenset({5}))  # 5 never sends its shares
    r.advance()
    req = r.advance()[1]
    assert isinstance(req, UnmaskRequest) and 5 not in req.dropped
    _expect(r, 1, replace(req, dropped=(*req.dropped, 5)), AbortReason.PEER_ALREADY_DROPPED)


def test_client_aborts_if_unmask_request_hides_a_dropped_peer() -> None:
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    _expect(r, 1, replace(req, dropped=()), AbortReason.SURVIVOR_LIST_MISMATCH)


def test_client_aborts_if_survivor_list_differs_from_the_one_it_signed() -> None:
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    _expect(r, 1, replace(req, survivors=tuple(s for s in req.survivors if s != 2)),
            AbortReason.SURVIVOR_LIST_MISMATCH)


def test_client_aborts_if_survivor_signature_is_forged() -> None:
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    sigs = dict(req.survivor_signatures)
    sigs[2] = bytes(64)
    _expect(r, 1, replace(req, survivor_signatures=sigs), AbortReason.BAD_SIGNATURE)


def test_client_aborts_if_signature_is_moved_to_another_signer() -> None:
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    sigs = dict(req.survivor_signatures)
    sigs[2] = sigs[3]
    _expect(r, 1, replace(req, survivor_signatures=sigs), AbortReason.BAD_SIGNATURE)


def test_client_aborts_if_too_few_survivor_signatures() -> None:
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    t = r.config.reconstruction_threshold
    sigs = dict(list(req.survivor_signatures.items())[: t - 1])
    _expect(r, 1, replace(req, survivor_signatures=sigs), AbortReason.TOO_FEW_SURVIVORS)


def test_clients_abort_if_server_sends_different_survivor_lists() -> None:
    """Tell site 1 that site 2 dropped and everyone else that it survived: the signatures
    the others gave cannot match site 1's list, so site 1 refuses to unmask."""
    r = Round(sites=7)
    r.advance()
    r.advance()
    out = r.advance()
    honest = out[1]
    assert isinstance(honest, SurvivorList)
    lie = SurvivorList(tuple(s for s in honest.survivors if s != 2))
    replies = {s: r.clients[s].handle(lie if s == 1 else msg) for s, msg in out.items()}
    t = r.config.reconstruction_threshold
    # the server forwards the signatures it got, over lists that differ from site 1's
    request = UnmaskRequest(lie.survivors, {s: m.signature for s, m in replies.items()  # type: ignore[union-attr]
                                            if s != 2}, (2,))
    assert len(request.survivor_signatures) >= t
    _expect(r, 1, request, AbortReason.BAD_SIGNATURE)


def test_client_aborts_if_survivor_list_omits_itself() -> None:
    r = Round(sites=7)
    r.advance()
    r.advance()
    out = r.advance()
    honest = out[1]
    assert isinstance(honest, SurvivorList)
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[1].handle(SurvivorList(tuple(s for s in honest.survivors if s != 1)))
    assert caught.value.reason is AbortReason.SELF_LISTED_AS_DROPPED


def test_a_three_site_sum_never_shrinks_to_two() -> None:
    """With 3 sites the safe threshold was 2: the server claimed site 3 dropped and released
    the sum of 1 and 2, and each of them, given the average, had the other's update. The
    threshold (so the quorum) is now never below three, as CKKS's min_sites."""
    r = Round(sites=3)
    assert r.config.reconstruction_threshold == 3 == r.config.consistency_quorum
    r.advance()  # advertise
    r.advance()  # share keys
    with pytest.raises(ProtocolAbort, match="TOO_FEW_SURVIVORS"):  # the honest server stops
        r.advance(skip=frozenset({3}))  # masked input: site 3 "dropped"
    for site in (1, 2):
        with pytest.raises(ProtocolAbort) as caught:
            r.clients[site].handle(SurvivorList((1, 2)))
        assert caught.value.reason is AbortReason.TOO_FEW_SURVIVORS
        assert r.clients[site].stage is not Stage.COMPLETED


def test_client_answers_only_one_unmask_request() -> None:
    """A second request (say, with a different dropped list) is refused outright."""
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    r.clients[1].handle(req)
    assert r.clients[1].stage is Stage.COMPLETED
    with pytest.raises(PreconditionError):
        r.clients[1].handle(replace(req, dropped=()))


def test_survivor_signatures_from_a_restarted_round_are_refused() -> None:
    """The server restarts a round under the same id (same parameters, fresh keys) and, in
    the second attempt, forwards the survivor-list signatures the sites gave in the first.
    Property: site 1 refuses to unmask (BAD_SIGNATURE): a quorum must sign this session."""
    identities = make_roster(7)[1]
    first = Round(sites=7, round_id="same-round", identities=identities)
    old = _to_unmask(first)
    second = Round(sites=7, round_id="same-round", identities=identities)
    second.advance()
    second.advance()
    listing = second.advance()[1]
    assert isinstance(listing, SurvivorList) and listing.survivors == old.survivors
    mine = second.clients[1].handle(listing)
    assert isinstance(mine, ConsistencySignature)
    replayed = {**old.survivor_signatures, 1: mine.signature}
    _expect(second, 1, UnmaskRequest(old.survivors, replayed, ()), AbortReason.BAD_SIGNATURE)


def test_client_aborts_if_survivor_list_names_an_unknown_or_duplicate_site() -> None:
    """Padding the survivor list with ids no roster site has (or one site twice) to make it
    look long enough. Property: the site aborts (UNKNOWN_SITE / DUPLICATE_SITE), signs nothing."""
    for extra, reason in (((77,), AbortReason.UNKNOWN_SITE), ((2,), AbortReason.DUPLICATE_SITE)):
        r = Round(sites=7)
        r.advance()
        r.advance()
        honest = r.advance()[1]
        assert isinstance(honest, SurvivorList)
        with pytest.raises(ProtocolAbort) as caught:
            r.clients[1].handle(SurvivorList((*honest.survivors, *extra)))
        assert caught.value.reason is reason


def test_client_refuses_a_survivor_list_naming_a_peer_whose_shares_it_never_got() -> None:
    """The server withholds site 2's shares from site 1 (so 1 never masks with 2), then lists
    2 as a survivor: 2's mask with 1 would be left in the sum, or 1's input under-masked.
    Property: site 1 aborts with PEER_ALREADY_DROPPED."""
    r = Round(sites=7)
    r.advance()
    deliveries = r.advance()
    delivery = deliveries[1]
    assert isinstance(delivery, ShareDelivery)
    withheld = ShareDelivery({s: c for s, c in delivery.encrypted_shares.items() if s != 2})
    assert isinstance(r.clients[1].handle(withheld), MaskedInput)
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[1].handle(SurvivorList(tuple(r.config.sites)))
    assert caught.value.reason is AbortReason.PEER_ALREADY_DROPPED


def test_malformed_server_messages_abort_cleanly_never_crash() -> None:
    """Fields of the wrong type in every server message (what a buggy or hostile server could
    put on the wire). Property: one named abort (MALFORMED_MESSAGE), never a traceback."""
    def at(stage: int) -> Round:
        r = Round(sites=5)
        for _ in range(stage):
            r.advance()
        return r

    cases = [
        (1, KeyDirectory((None,))),  # type: ignore[arg-type]
        (2, ShareDelivery(None)),  # type: ignore[arg-type]
        (3, SurvivorList(None)),  # type: ignore[arg-type]
    ]
    for stage, message in cases:
        r = at(stage)
        with pytest.raises(ProtocolAbort) as caught:
            r.clients[1].handle(message)
        assert caught.value.reason is AbortReason.MALFORMED_MESSAGE
        assert r.clients[1].stage is Stage.ABORTED
    r = Round(sites=5)
    request = _to_unmask(r)
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[1].handle(replace(request, survivor_signatures=None))
    assert caught.value.reason is AbortReason.MALFORMED_MESSAGE


def test_signature_from_a_site_not_on_the_list_does_not_count_toward_the_quorum() -> None:
    """Site 4 dropped (it is not on the list) but colludes: it signs the list anyway, and the
    server uses its signature to make up a quorum the survivors did not give.
    Property: site 1 aborts (SURVIVOR_LIST_MISMATCH) rather than count it."""
    r = Round(sites=7)
    req = _to_unmask(r, drop_masked=frozenset({4}))
    q = r.config.consistency_quorum
    signed = ConsistencySignature.signed_bytes(r.server._session, req.survivors)
    survivors_sigs = dict(sorted(req.survivor_signatures.items())[: q - 1])
    sigs = {**survivors_sigs, 4: r.identities[4].sign(signed)}
    assert len(sigs) == q and 4 not in req.survivors
    _expect(r, 1, replace(req, survivor_signatures=sigs), AbortReason.SURVIVOR_LIST_MISMATCH)
