from __future__ import annotations

import hashlib
import os

import pytest

from secagg._encoding import PAYLOAD_CHUNK_BYTES, digest, encode, parts_digest, payload_digest


def test_encoding_is_unambiguous() -> None:
    assert encode("l", b"ab", b"c") != encode("l", b"a", b"bc")
    assert encode("l", b"ab") != encode("m", b"ab")
    assert encode("l", [1, 2]) != encode("l", [1], [2])


@pytest.mark.parametrize("size", [0, 1, PAYLOAD_CHUNK_BYTES - 1, PAYLOAD_CHUNK_BYTES,
                                  PAYLOAD_CHUNK_BYTES + 1, 4 * PAYLOAD_CHUNK_BYTES + 17])
def test_payload_digest_equals_the_streaming_computation(size: int) -> None:
    data = os.urandom(size)
    chunk_digests = b"".join(hashlib.sha256(data[i : i + PAYLOAD_CHUNK_BYTES]).digest()
                             for i in range(0, size, PAYLOAD_CHUNK_BYTES))
    assert payload_digest(data) == digest("payload", size, chunk_digests)


def test_payload_digest_separates_inputs() -> None:
    data = bytearray(os.urandom(3 * PAYLOAD_CHUNK_BYTES))
    base = payload_digest(data)
    data[2 * PAYLOAD_CHUNK_BYTES + 5] ^= 1
    assert payload_digest(data) != base
    assert payload_digest(bytes(10)) != payload_digest(bytes(11))
    assert parts_digest([b"ab", b"c"]) != parts_digest([b"a", b"bc"])


def test_encoding_is_bound_to_the_format_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import secagg._encoding as encoding

    v1 = encode("l", b"ab")
    assert v1.startswith(len(encoding.FORMAT_VERSION).to_bytes(8, "big") + encoding.FORMAT_VERSION)
    monkeypatch.setattr(encoding, "FORMAT_VERSION", b"secagg/v2")
    assert encode("l", b"ab") != v1


def test_int_lists_encode_at_a_fixed_width() -> None:
    assert encode("l", [1, 2]) != encode("l", [258])
    assert encode("l", [1, 256]) != encode("l", [257, 0])
    assert len(encode("l", [1, 2, 3])) == len(encode("l", [])) + 3 * 8


def test_parts_digest_covers_every_part() -> None:
    base = parts_digest([b"a", b"b", b"c"])
    assert parts_digest([b"a", b"b", b"d"]) != base
    assert parts_digest([b"a", b"b"]) != base
    assert parts_digest([b"a", b"b", b"c", b""]) != base


def test_encode_is_the_documented_layout_byte_for_byte() -> None:
    """Every field an 8-byte big-endian length and its bytes: the version, the label, then a
    str as UTF-8, an int as 8 signed big-endian bytes, bytes as they are, a list of ints as
    one field of 8 bytes each. (Signatures are over these bytes: any change of layout is a
    change of the wire contract, and must fail here, not pass as a new self-consistent one.)"""
    def field(raw: bytes) -> bytes:
        return len(raw).to_bytes(8, "big") + raw

    expected = b"".join([
        field(b"secagg/v1"), field(b"label"), field("s\u00e9".encode()),
        field((-2).to_bytes(8, "big", signed=True)), field(b"\x00\xff"),
        field((1).to_bytes(8, "big") + (2**40).to_bytes(8, "big")),
    ])
    assert encode("label", "s\u00e9", -2, b"\x00\xff", [1, 2**40]) == expected


def test_the_trust_root_signs_a_labelled_roster_digest() -> None:
    """The roster signer's key signs only rosters today; the label keeps a signed digest from
    passing for any other message signed with it later."""
    from secagg.hazmat.signing import IdentityKey
    from secagg.roster import Roster, SignedRoster

    roster = Roster.new({1: IdentityKey.generate().public_bytes})
    assert SignedRoster.signed_bytes(roster) == encode("signed-roster", roster.digest)
    assert SignedRoster.signed_bytes(roster) != roster.digest
