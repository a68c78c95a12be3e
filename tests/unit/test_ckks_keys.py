"""Key ceremony: the secret context travels sealed; the public context carries no secret."""

from __future__ import annotations

import pickle
from dataclasses import replace
from typing import Any

import pytest

from secagg.ckks import KeyHolder, PublicContext, decrypt_verified_sum
from secagg.errors import InvalidMessage
from secagg.hazmat.key_agreement import AgreementKey
from secagg.hazmat.signing import IdentityKey
from tests.ckks_kit import CkksRound


@pytest.fixture(scope="module")
def holder() -> KeyHolder:
    return KeyHolder.generate()


def _sealed(holder: KeyHolder):  # type: ignore[no-untyped-def]
    sender_identity = IdentityKey.generate()
    recipient_key = AgreementKey.generate()
    sealed = holder.seal_for(sender=1, sender_identity=sender_identity, recipient=2,
                             recipient_public_key=recipient_key.public_bytes)
    return sealed, sender_identity, recipient_key


def test_sealed_secret_context_round_trip_gives_a_working_key_holder() -> None:
    r = CkksRound(sites=3, vector_length=50)
    sealed, ident, rkey = _sealed(r.holder)
    other = KeyHolder.open_sealed(sealed, recipient=2, recipient_key=rkey,
                                  sender_identity_public_key=ident.public_bytes,
                                  expected_key_id=r.holder.key_id)
    assert other.key_id == r.holder.key_id
    uploads, _ = r.run()
    ws, w = decrypt_verified_sum(other, r.config, uploads)
    exact_ws, exact_w = r.expected()
    assert abs(w - exact_w) < 1e-6 and float(abs(ws - exact_ws).max()) < 1e-6


def test_sealed_context_does_not_contain_the_secret_in_the_clear(holder: KeyHolder) -> None:
    sealed, _, _ = _sealed(holder)
    secret = holder.export_secret_context()
    assert secret[:64] not in sealed.ciphertext and secret[-64:] not in sealed.ciphertext
    # (and its repr leaves the ~500 KB ciphertext out: it was printed whole into log lines)
    assert len(repr(sealed)) < 1000 and "ciphertext" not in repr(sealed)


@pytest.mark.parametrize("field", ["ciphertext", "ephemeral_public_key", "sender", "recipient",
                                   "key_id", "signature"])
def test_tampering_with_the_sealed_context_is_detected(holder: KeyHolder, field: str) -> None:
    sealed, ident, rkey = _sealed(holder)
    value = getattr(sealed, field)
    if isinstance(value, int):
        tampered = replace(sealed, **{field: value + 1})
    else:
        flipped = bytearray(value)
        flipped[len(flipped) // 2] ^= 1
        tampered = replace(sealed, **{field: bytes(flipped)})
    with pytest.raises(InvalidMessage):
        KeyHolder.open_sealed(tampered, recipient=2, recipient_key=rkey,
                              sender_identity_public_key=ident.public_bytes,
                              expected_key_id=holder.key_id)


def test_sealed_context_opens_only_for_its_recipient(holder: KeyHolder) -> None:
    sealed, ident, _ = _sealed(holder)
    with pytest.raises(InvalidMessage):
        KeyHolder.open_sealed(sealed, recipient=2, recipient_key=AgreementKey.generate(),
                              sender_identity_public_key=ident.public_bytes,
                              expected_key_id=holder.key_id)
    with pytest.raises(InvalidMessage):  # signed by someone else than the claimed sender
        KeyHolder.open_sealed(sealed, recipient=2, recipient_key=AgreementKey.generate(),
                              sender_identity_public_key=IdentityKey.generate().public_bytes,
                              expected_key_id=holder.key_id)


def test_key_id_is_stable_across_serialisation_and_differs_per_key(holder: KeyHolder) -> None:
    public = PublicContext.load(holder.public_context().serialize())
    assert public.key_id == holder.key_id
    assert KeyHolder.generate().key_id != holder.key_id


def test_key_holder_redacts_and_refuses_pickling(holder: KeyHolder) -> None:
    assert "redacted" in repr(holder)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(holder)


def test_garbage_context_bytes_are_a_clear_error() -> None:
    with pytest.raises(InvalidMessage):
        PublicContext.load(b"\x00" * 100)


def test_sealed_context_of_another_key_under_the_expected_key_id_is_refused(
        holder: KeyHolder) -> None:
    """A dishonest sender seals a context of its own key, labelled (and signed) with the
    announced key id: the recipient would then decrypt with a key others never encrypted to,
    or release under a key it does not know. Property: opening checks what it opened."""
    sender_identity = IdentityKey.generate()
    recipient_key = AgreementKey.generate()
    rogue = KeyHolder.generate()
    rogue.key_id = holder.key_id  # the label the recipient expects
    sealed = rogue.seal_for(sender=1, sender_identity=sender_identity, recipient=2,
                            recipient_public_key=recipient_key.public_bytes)
    assert sealed.key_id == holder.key_id
    with pytest.raises(InvalidMessage):
        KeyHolder.open_sealed(sealed, recipient=2, recipient_key=recipient_key,
                              sender_identity_public_key=sender_identity.public_bytes,
                              expected_key_id=holder.key_id)


# ---- what a key holder is made of, and what it announces ------------------------------------


def test_secret_context_bytes_that_hold_no_secret_key_are_an_invalid_message(
        holder: KeyHolder) -> None:
    """A kept key file, or an opened envelope, whose bytes are not a secret context: garbage
    (TenSEAL's parser raises bare C++ errors) or a public context (no secret key) is the
    opaque InvalidMessage, and a KeyHolder is never made of a public context."""
    import tenseal as ts

    public_bytes = bytes(holder.public_context()._context.serialize())
    for data in (b"", b"\x00" * 100, b"\x0a\x05hello", public_bytes):
        with pytest.raises(InvalidMessage):
            KeyHolder.from_secret_context(data)
    with pytest.raises(ValueError, match="needs a context with a secret key"):
        KeyHolder(ts.context_from(public_bytes))
    again = KeyHolder.from_secret_context(holder.export_secret_context())
    assert again.key_id == holder.key_id


def _signed_announcement(key: KeyHolder, **fields: Any):  # type: ignore[no-untyped-def]
    """An announcement by site 1 of a 3-site roster, with ``fields`` changed and signed by
    site 1's own identity key (a key holder's slip, not a forgery)."""
    from secagg.masking import make_roster

    roster, identities = make_roster(3)
    good = key.announce(holder=1, identity=identities[1], epoch="r")
    unsigned = replace(good, signature=b"", **fields)
    return roster, replace(unsigned, signature=identities[1].sign(unsigned.signed_bytes()))


@pytest.mark.parametrize("field", ["key_id-31-bytes", "key_id-33-bytes", "holder-True",
                                   "preset-bytes", "epoch-bytes"])
def test_a_signed_announcement_of_the_wrong_shape_is_an_invalid_message(
        holder: KeyHolder, field: str) -> None:
    """Signed by the roster's key of its holder, and still refused: a key id that is no
    SHA-256 (no upload could name it), holder True (the roster's site 1 by hash and
    equality), a preset or epoch that is not a string."""
    variants: dict[str, dict[str, Any]] = {
        "key_id-31-bytes": {"key_id": holder.key_id[:31]},
        "key_id-33-bytes": {"key_id": holder.key_id + b"\x00"},
        "holder-True": {"holder": True},
        "preset-bytes": {"preset": holder.preset.name.encode()},
        "epoch-bytes": {"epoch": b"r"},
    }
    roster, announcement = _signed_announcement(holder, **variants[field])
    with pytest.raises(InvalidMessage):
        announcement.verify(roster)
    roster, good = _signed_announcement(holder)
    good.verify(roster)


def test_announcing_for_an_empty_or_non_string_epoch_is_refused(holder: KeyHolder) -> None:
    from secagg.hazmat.signing import IdentityKey

    identity = IdentityKey.generate()
    for epoch in ("", None, b"r", 1):
        with pytest.raises(ValueError, match="epoch must be a non-empty string"):
            holder.announce(holder=1, identity=identity, epoch=epoch)  # type: ignore[arg-type]
    assert holder.announce(holder=1, identity=identity, epoch="r").epoch == "r"


def test_only_a_named_presets_context_is_serialised() -> None:
    """A context of a custom preset (or of one named like a preset with other parameters)
    has no wire form: serialising it is a ConfigurationError at the sender, not bytes that
    every receiver refuses."""
    from secagg.ckks.presets import Preset
    from secagg.errors import ConfigurationError

    custom = KeyHolder.generate(Preset("custom", 4096, (40, 40), 30))
    with pytest.raises(ConfigurationError, match="only a named preset's context"):
        custom.public_context().serialize()


@pytest.mark.parametrize("form", ["bytearray", "memoryview"])
def test_a_public_context_given_as_anything_but_bytes_is_an_invalid_message(
        holder: KeyHolder, form: str) -> None:
    data = holder.public_context().serialize()
    with pytest.raises(InvalidMessage):
        PublicContext.load({"bytearray": bytearray, "memoryview": memoryview}[form](data))
    assert PublicContext.load(data).key_id == holder.key_id
