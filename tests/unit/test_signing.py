"""Ed25519 verification raises one opaque error for anything that is not a valid signature."""

from __future__ import annotations

import pytest

from secagg.errors import InvalidMessage
from secagg.hazmat import signing

MESSAGE = b"survivors: 1, 2, 4"


def test_forged_or_altered_signature_is_refused() -> None:
    key = signing.IdentityKey.generate()
    sig = key.sign(MESSAGE)
    signing.verify(key.public_bytes, sig, MESSAGE)
    forged = bytes([sig[0] ^ 1]) + sig[1:]
    for public, signature, message in [
        (key.public_bytes, forged, MESSAGE),
        (key.public_bytes, sig, MESSAGE + b", 5"),
        (signing.IdentityKey.generate().public_bytes, sig, MESSAGE),
        (key.public_bytes, bytes(64), MESSAGE),
    ]:
        with pytest.raises(InvalidMessage):
            signing.verify(public, signature, message)


@pytest.mark.parametrize(("public", "signature"), [
    (None, bytes(64)),
    ("k" * 32, bytes(64)),
    (bytes(31), bytes(64)),
    (b"k" * 32, None),
    (b"k" * 32, "s" * 64),
    (b"k" * 32, bytes(63)),
    (b"k" * 32, bytes(65)),
], ids=["key-none", "key-str", "key-31-bytes", "sig-none", "sig-str", "sig-63-bytes",
        "sig-65-bytes"])
def test_malformed_key_or_signature_is_the_same_opaque_error(public: object,
                                                            signature: object) -> None:
    with pytest.raises(InvalidMessage) as caught:
        signing.verify(public, signature, MESSAGE)  # type: ignore[arg-type]
    assert str(caught.value) == "invalid signature"
