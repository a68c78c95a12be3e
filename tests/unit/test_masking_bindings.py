"""What the masking protocol's derivations bind, field by field: a field left out of one
is a value two parties can disagree on (or a colluding server can swap) while the
derivation still agrees. Each derivation must change when any one of its inputs does."""

from __future__ import annotations

import itertools

from secagg.masking._common import pairwise_seed, session_id, share_key
from secagg.masking.messages import AdvertiseKeys, share_commitment


def _distinct(values: list[bytes]) -> bool:
    return len(set(values)) == len(values)


def test_a_share_commitment_binds_its_session_owner_holder_kind_and_share() -> None:
    base = (b"\x01" * 32, 1, 2, "self-mask", b"\x05" * 66)
    variants = [base, (b"\x02" * 32, *base[1:]), (base[0], 3, *base[2:]),
                (*base[:2], 3, *base[3:]), (*base[:3], "masking-key", base[4]),
                (*base[:4], b"\x06" * 66),
                (base[0], 2, 1, *base[3:])]  # (owner and holder swapped)
    assert _distinct([share_commitment(*v) for v in variants])


def _keys(site: int, enc: bytes, mask: bytes) -> AdvertiseKeys:
    return AdvertiseKeys(site, enc, mask, b"")


def test_the_session_binds_every_site_and_each_of_its_two_keys() -> None:
    params = b"\x09" * 32
    keys = {s: (bytes([s]) * 32, bytes([s + 100]) * 32) for s in (1, 2, 3)}

    def session(entries: dict[int, tuple[bytes, bytes]], p: bytes = params) -> bytes:
        return session_id(p, [_keys(s, e, m) for s, (e, m) in entries.items()])

    sessions = [session(keys), session(keys, b"\x0a" * 32)]
    for s in keys:
        enc, mask = keys[s]
        sessions.append(session({**keys, s: (b"\xee" * 32, mask)}))  # another encryption key
        sessions.append(session({**keys, s: (enc, b"\xee" * 32)}))  # another masking key
    # the same keys under other site ids (the listing's order unchanged): site 3's keys
    # shown as site 4's
    sessions.append(session({1: keys[1], 2: keys[2], 4: keys[3]}))
    assert _distinct(sessions)
    # (the order the entries come in is not a field: sorted by site)
    assert session(dict(reversed(list(keys.items())))) == sessions[0]


def test_pairwise_seeds_and_share_keys_are_separate_derivations() -> None:
    secret, session = b"\x11" * 32, b"\x22" * 32
    derived = [f(secret, session, a, b) for f in (pairwise_seed, share_key)
               for a, b in itertools.permutations((1, 2))]
    # one value per purpose; the two sites of a pair derive the same (in either order)
    assert len(set(derived)) == 2


def test_every_signed_masking_message_binds_its_senders_site_id() -> None:
    """Each signature is checked with the claimed site's roster key, so a message signed for
    one id fails under another today; the signed bytes must still name the sender, so that
    no refactor of the key lookup lets a signature be replayed under another id."""
    import numpy as np

    from secagg.masking.messages import MaskAttestation, MaskedInput, ShareKeys, UnmaskResponse

    session = b"\x03" * 32
    for signed in (
            lambda s: AdvertiseKeys.signed_bytes(session, s, b"\x01" * 32, b"\x02" * 32),
            lambda s: ShareKeys.signed_bytes(session, s, {2: b"share"}, b"\x04" * 32,
                                             {2: b"\x05" * 32}),
            lambda s: MaskedInput.signed_bytes(session, s, np.arange(4, dtype=np.uint32),
                                               (2, 3)),
            lambda s: MaskAttestation.signed_bytes(session, s, b"\x06" * 32, (2, 3)),
            lambda s: UnmaskResponse.signed_bytes(session, s, {2: b"a"}, {3: b"b"})):
        assert signed(1) != signed(7)


def test_a_low_order_peer_key_aborts_the_exchange_not_a_public_mask() -> None:
    """A signed but low-order X25519 key makes an all-zero shared secret: a mask anyone could
    compute. The exchange refuses it (a second layer under the key directory's check)."""
    import pytest

    from secagg.errors import AbortReason, ProtocolAbort
    from secagg.hazmat.key_agreement import AgreementKey
    from secagg.masking.client import MaskingClient

    own = AgreementKey.generate()
    for low_order in (bytes(32), bytes([1]) + bytes(31)):
        with pytest.raises(ProtocolAbort) as e:
            MaskingClient._exchange(own, low_order, 4)
        assert e.value.reason is AbortReason.MALFORMED_MESSAGE and "site 4" in str(e.value)
