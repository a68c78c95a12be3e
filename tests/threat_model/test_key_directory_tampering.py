"""Adversary: a server that tampers with the key directory it broadcasts (advertise stage)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from secagg.errors import AbortReason, PreconditionError, ProtocolAbort
from secagg.masking import Stage
from secagg.masking.messages import AdvertiseKeys, KeyDirectory
from tests.roundkit import Round


def _directory(r: Round) -> KeyDirectory:
    out = r.advance()
    d = out[1]
    assert isinstance(d, KeyDirectory)
    return d


def _expect_abort(r: Round, site: int, directory: KeyDirectory, reason: AbortReason) -> None:
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[site].handle(directory)
    assert caught.value.reason is reason
    assert r.clients[site].stage is Stage.ABORTED
    with pytest.raises(PreconditionError):  # an aborted site does nothing more
        r.clients[site].handle(directory)


def test_client_aborts_if_server_sends_wrong_size_key() -> None:
    r = Round()
    d = _directory(r)
    bad = replace(d.entries[2], masking_public_key=d.entries[2].masking_public_key[:31])
    _expect_abort(r, 1, KeyDirectory((*d.entries[:2], bad, *d.entries[3:])),
                  AbortReason.WRONG_SIZE_KEY)


def test_client_aborts_if_server_omits_clients_key() -> None:
    r = Round()
    d = _directory(r)
    _expect_abort(r, 1, KeyDirectory(d.entries[1:]), AbortReason.OWN_KEY_MISSING_OR_ALTERED)


def test_client_aborts_if_server_duplicates_clients_key() -> None:
    r = Round()
    d = _directory(r)
    # site 3's entry carrying site 1's masking key (with site 3's signature left as it was)
    dup = replace(d.entries[2], masking_public_key=d.entries[0].masking_public_key)
    _expect_abort(r, 1, KeyDirectory((*d.entries[:2], dup, *d.entries[3:])),
                  AbortReason.DUPLICATE_KEY)


def test_client_aborts_if_server_duplicates_a_site() -> None:
    r = Round()
    d = _directory(r)
    _expect_abort(r, 1, KeyDirectory((*d.entries, d.entries[3])), AbortReason.DUPLICATE_SITE)


def test_client_aborts_if_server_substitutes_its_own_key_for_a_peer() -> None:
    r = Round()
    d = _directory(r)
    from secagg.hazmat.key_agreement import AgreementKey

    forged = replace(d.entries[2], masking_public_key=AgreementKey.generate().public_bytes)
    _expect_abort(r, 1, KeyDirectory((*d.entries[:2], forged, *d.entries[3:])),
                  AbortReason.BAD_SIGNATURE)


def test_client_aborts_if_server_alters_the_clients_own_key() -> None:
    r = Round()
    d = _directory(r)
    from secagg.hazmat.key_agreement import AgreementKey

    # even re-signed correctly (a colluding peer's key cannot do this for site 1, but check)
    k = AgreementKey.generate().public_bytes
    altered = replace(d.entries[0], encryption_public_key=k)
    _expect_abort(r, 1, KeyDirectory((altered, *d.entries[1:])), AbortReason.BAD_SIGNATURE)


def test_client_aborts_if_server_lists_an_unknown_site() -> None:
    r = Round()
    d = _directory(r)
    ghost = AdvertiseKeys(99, b"\x01" * 32, b"\x02" * 32, b"\x00" * 64)
    _expect_abort(r, 1, KeyDirectory((*d.entries, ghost)), AbortReason.UNKNOWN_SITE)


def test_client_aborts_if_server_lists_fewer_than_threshold_sites() -> None:
    r = Round()
    d = _directory(r)
    t = r.config.reconstruction_threshold
    _expect_abort(r, 1, KeyDirectory(d.entries[: t - 1]), AbortReason.TOO_FEW_SURVIVORS)


def test_keys_signed_for_another_round_are_refused() -> None:
    """Site 3's genuine advertisement from round A, replayed into round B, fails its signature:
    signatures bind the round parameters."""
    a = Round(round_id="round-A")
    b = Round(round_id="round-B", identities=a.identities)
    da, db = _directory(a), _directory(b)
    replayed = KeyDirectory((*db.entries[:2], da.entries[2], *db.entries[3:]))
    _expect_abort(b, 1, replayed, AbortReason.BAD_SIGNATURE)


def test_client_aborts_if_server_substitutes_its_own_encryption_key_for_a_peer() -> None:
    """The server swaps a peer's share-encryption key for its own: site 1 would seal its
    shares for that peer to the server, which could open them (t of them rebuild a secret).
    Property: site 1 aborts (BAD_SIGNATURE) before sealing anything."""
    r = Round()
    d = _directory(r)
    from secagg.hazmat.key_agreement import AgreementKey

    forged = replace(d.entries[2], encryption_public_key=AgreementKey.generate().public_bytes)
    _expect_abort(r, 1, KeyDirectory((*d.entries[:2], forged, *d.entries[3:])),
                  AbortReason.BAD_SIGNATURE)


def test_client_aborts_if_server_replays_its_own_advertisement_from_a_restarted_round() -> None:
    """A round restarted under the same id has the same parameters, so site 1's signed
    advertisement from the first attempt still verifies; the server puts it in the second
    attempt's directory in place of site 1's fresh keys (whose private halves the first
    attempt may have leaked). Property: site 1 aborts (OWN_KEY_MISSING_OR_ALTERED)."""
    from secagg.masking import make_roster

    identities = make_roster(5)[1]
    first = Round(round_id="same-round", identities=identities)
    second = Round(round_id="same-round", identities=identities)
    old, new = _directory(first), _directory(second)
    replayed = KeyDirectory((old.entries[0], *new.entries[1:]))
    _expect_abort(second, 1, replayed, AbortReason.OWN_KEY_MISSING_OR_ALTERED)
