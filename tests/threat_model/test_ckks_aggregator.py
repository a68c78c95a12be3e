"""Adversaries of the CKKS path: a curious aggregator, a confused or broken site, a replayer.

The aggregator holds a public context only; uploads are bound to round and key; corrupted
ciphertext bytes are a clear error that leaves the running sum untouched.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from secagg.ckks import (
    EncryptedUpdate,
    KeyHolder,
    PublicContext,
    decrypt_aggregate,
    release_average,
)
from secagg.ckks._chunks import ChunkEncryptor
from secagg.ckks._seal import load_ciphertext
from secagg.errors import (
    AbortReason,
    InvalidMessage,
    PreconditionError,
    ProtocolAbort,
    RefusalReason,
    RefusedMessage,
)
from tests.ckks_kit import CkksRound


def _resign(r: CkksRound, update: EncryptedUpdate, chunks: tuple[bytes, ...]) -> EncryptedUpdate:
    """What a broken (but authenticated) site would send."""
    sig = r.identities[update.site_id].sign(EncryptedUpdate.signed_bytes(
        r.config.params_digest, update.site_id, update.key_id, update.seeded, chunks))
    return replace(update, chunks=chunks, signature=sig)


def test_aggregator_context_cannot_decrypt() -> None:
    r = CkksRound(sites=3, vector_length=100)
    public = PublicContext.load(r.public.serialize())
    ctx = ts.context_from(public.serialize())
    assert not ctx.has_secret_key()
    with pytest.raises(ValueError):
        ctx.secret_key()
    upload = r.client(2).start()
    ct = load_ciphertext(public.seal_context, upload.chunks[0], scale=r.config.preset_params.scale)
    assert ct.size() == 2  # it can parse and add ...
    with pytest.raises(ValueError, match="secret key"):
        KeyHolder(ctx)  # ... but nothing in it can become a decryptor
    vec = ts.ckks_vector(ctx, [1.0, 2.0])
    with pytest.raises(ValueError):
        vec.decrypt()


def test_public_context_carrying_a_secret_key_is_refused() -> None:
    holder = KeyHolder.generate()
    with pytest.raises(RefusedMessage) as caught:
        PublicContext.load(holder.export_secret_context())
    assert caught.value.reason is RefusalReason.CONTEXT_HAS_SECRET_KEY


def test_upload_under_another_key_id_is_refused() -> None:
    r = CkksRound(sites=3, vector_length=100)
    upload = r.client(2).start()
    with pytest.raises(RefusedMessage) as caught:
        r.server.handle(replace(upload, key_id=KeyHolder.generate().key_id))
    assert caught.value.reason is RefusalReason.WRONG_KEY_ID


def test_site_with_another_rounds_context_is_stopped_before_encrypting() -> None:
    r = CkksRound(sites=3, vector_length=100)
    other = CkksRound(sites=3, vector_length=100)
    from secagg.ckks import CkksClient

    with pytest.raises(RefusedMessage) as caught:
        CkksClient(r.config, 2, r.identities[2], other.public, r.inputs[2])
    assert caught.value.reason is RefusalReason.WRONG_KEY_ID


def test_ciphertexts_under_different_keys_silently_add_to_garbage() -> None:
    """Why key binding matters: TenSEAL/SEAL does not notice a foreign key."""
    a, b = KeyHolder.generate(), KeyHolder.generate()
    p = a.preset
    x = np.full(p.slots, 0.5)
    ct_a = load_ciphertext(a.seal_context, ChunkEncryptor(a.seal_context, p.scale,
                           public_key=a.public_key).encrypt_row(x), scale=p.scale)
    ct_b = load_ciphertext(a.seal_context, ChunkEncryptor(b.seal_context, p.scale,
                           public_key=b.public_key).encrypt_row(x), scale=p.scale)
    sealapi.Evaluator(a.seal_context).add_inplace(ct_a, ct_b)  # no error raised
    plain = sealapi.Plaintext()
    sealapi.Decryptor(a.seal_context, a.secret_key).decrypt(ct_a, plain)
    got = np.array(sealapi.CKKSEncoder(a.seal_context).decode_double(plain))
    assert np.max(np.abs(got - 1.0)) > 1.0


def test_upload_for_the_wrong_round_is_refused() -> None:
    holder = KeyHolder.generate()
    r1 = CkksRound(sites=3, vector_length=100, round_id="round-1", holder=holder)
    r2 = CkksRound(sites=3, vector_length=100, round_id="round-2", holder=holder)
    r2.identities, r2.roster = r1.identities, r1.roster
    upload_for_2 = r1.client(2).start()
    with pytest.raises(RefusedMessage) as caught:
        r2.server.handle(upload_for_2)
    assert caught.value.reason is RefusalReason.WRONG_ROUND


def test_upload_relabelled_for_another_round_fails_its_signature() -> None:
    holder = KeyHolder.generate()
    r1 = CkksRound(sites=3, vector_length=100, round_id="round-1", holder=holder)
    r2 = CkksRound(sites=3, vector_length=100, round_id="round-2", holder=holder)
    upload = r1.client(2).start()
    with pytest.raises(InvalidMessage):
        r2.server.handle(replace(upload, round_id="round-2"))


@pytest.mark.parametrize("corruption", ["truncate-half", "truncate-8", "empty", "random",
                                        "header-flip", "append-garbage"])
def test_corrupted_ciphertext_bytes_are_a_clear_error_and_add_nothing(corruption: str) -> None:
    r = CkksRound(sites=4, vector_length=3000)
    upload = r.client(2).start()
    c = upload.chunks[0]
    bad = {
        "truncate-half": c[: len(c) // 2],
        "truncate-8": c[:8],
        "empty": b"",
        "random": os.urandom(len(c)),
        "header-flip": bytes([c[0] ^ 0xFF]) + c[1:],
        "append-garbage": c + os.urandom(100),
    }[corruption]
    with pytest.raises(InvalidMessage):
        r.server.handle(_resign(r, upload, (bad, *upload.chunks[1:])))
    # the refused upload added nothing: the round still aggregates exactly
    for s in r.roster:
        r.server.handle(r.client(s).start())
    ws, _ = decrypt_aggregate(r.holder, r.config, r.server.close_stage()[1])
    assert float(np.max(np.abs(ws - r.expected()[0]))) < 1e-6


def test_hundreds_of_random_corruptions_never_crash_the_process() -> None:
    r = CkksRound(sites=3, vector_length=100)
    good = r.client(2).start().chunks[0]
    rng = np.random.default_rng(7)
    refused = 0
    for _ in range(300):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
            data[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(0, len(data)))]
        try:
            load_ciphertext(r.public.seal_context, bytes(data), scale=r.config.preset_params.scale)
        except InvalidMessage:
            refused += 1
    assert refused > 0


def test_upload_with_wrong_chunk_count_duplicate_or_unknown_site_is_refused() -> None:
    r = CkksRound(sites=3, vector_length=3000)
    upload = r.client(2).start()
    with pytest.raises(RefusedMessage, match="WRONG_SHAPE"):
        r.server.handle(_resign(r, upload, upload.chunks[:-1]))
    r.server.handle(upload)
    with pytest.raises(RefusedMessage, match="DUPLICATE_SITE"):
        r.server.handle(upload)
    with pytest.raises(RefusedMessage, match="UNKNOWN_SITE"):
        r.server.handle(replace(upload, site_id=42))


def test_forged_upload_signature_is_refused() -> None:
    r = CkksRound(sites=3, vector_length=100)
    upload = r.client(2).start()
    with pytest.raises(InvalidMessage):
        r.server.handle(replace(upload, site_id=3))


def test_aggregate_of_fewer_than_min_sites_is_never_produced_or_released() -> None:
    r = CkksRound(sites=4, vector_length=100)
    r.server.handle(r.client(1).start())
    r.server.handle(r.client(2).start())
    with pytest.raises(ProtocolAbort) as caught:
        r.server.close_stage()
    assert caught.value.reason is AbortReason.TOO_FEW_SURVIVORS
    with pytest.raises(PreconditionError):
        r.server.handle(r.client(3).start())


def test_key_holder_refuses_an_aggregate_claiming_too_few_sites_or_another_round() -> None:
    r = CkksRound(sites=4, vector_length=100)
    for s in r.roster:
        r.server.handle(r.client(s).start())
    aggregate = r.server.close_stage()[1]
    with pytest.raises(ProtocolAbort):
        release_average(r.holder, r.config, replace(aggregate, sites=(1, 2)))
    with pytest.raises(RefusedMessage, match="WRONG_ROUND"):
        release_average(r.holder, r.config, replace(aggregate, round_id="other"))
    with pytest.raises(RefusedMessage, match="DUPLICATE_SITE"):
        release_average(r.holder, r.config, replace(aggregate, sites=(1, 1, 2, 3)))
