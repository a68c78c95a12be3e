"""Adversaries of the CKKS path: a curious aggregator, a confused or broken site, a replayer.

The aggregator holds a public context only; uploads are bound to round and key; corrupted
ciphertext bytes are a clear error that leaves the running sum untouched; only our canonical
ciphertext format is accepted (one encoding per ciphertext, exact length, strict parse).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from secagg.ckks import (
    CkksServer,
    EncryptedUpdate,
    KeyHolder,
    PublicContext,
    _seal,
    decrypt_verified_sum,
    release_average,
)
from secagg.ckks._chunks import ChunkEncryptor
from secagg.ckks._seal import Kind, load_ciphertext
from secagg.errors import (
    AbortReason,
    InvalidMessage,
    PreconditionError,
    ProtocolAbort,
    RefusalReason,
    RefusedMessage,
)
from tests.ckks_kit import CkksRound


def _sum_chunks(r: CkksRound, uploads: list[EncryptedUpdate]) -> list[bytes]:
    """The canonical bytes of the homomorphic sum of ``uploads``, computed here."""
    ctx, scale = r.public.seal_context, r.config.preset_params.scale
    evaluator = sealapi.Evaluator(ctx)
    acc: list[Any] = []
    for u in uploads:
        kinds = (Kind.SEEDED,) if u.seeded else (Kind.FULL,)
        cts = [load_ciphertext(ctx, c, scale=scale, kinds=kinds) for c in u.chunks]
        if not acc:
            acc = cts
        else:
            for a, c in zip(acc, cts, strict=True):
                evaluator.add_inplace(a, c)
    return [_seal.dump_ciphertext(a, ctx, scale=scale) for a in acc]


def _resign(r: CkksRound, update: EncryptedUpdate, chunks: tuple[bytes, ...]) -> EncryptedUpdate:
    """What a broken (but authenticated) site would send."""
    sig = r.identities[update.site_id].sign(EncryptedUpdate.signed_bytes(
        r.config.params_digest, update.site_id, update.key_id, update.seeded, chunks))
    return replace(update, chunks=chunks, signature=sig)


def test_aggregator_context_cannot_decrypt() -> None:
    r = CkksRound(sites=3, vector_length=100)
    public = PublicContext.load(r.public.serialize())
    ctx = public._context
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
    """On the wire a secret context is not even in the public context's format; and a
    TenSEAL context with a secret key cannot be made a PublicContext in process either."""
    holder = KeyHolder.generate()
    with pytest.raises(InvalidMessage):
        PublicContext.load(holder.export_secret_context())
    with pytest.raises(RefusedMessage) as caught:
        PublicContext(ts.context_from(holder.export_secret_context()))
    assert caught.value.reason is RefusalReason.CONTEXT_HAS_SECRET_KEY


def test_upload_under_another_key_id_is_refused() -> None:
    r = CkksRound(sites=3, vector_length=100)
    upload = r.client(2).start()
    with pytest.raises(RefusedMessage) as caught:
        r.server.handle(replace(upload, key_id=KeyHolder.generate().key_id))
    assert caught.value.reason is RefusalReason.WRONG_KEY_ID


def test_a_refusal_says_its_reason_and_what_was_refused() -> None:
    """A refusal's text is its reason and its detail (which key, which site): a bare reason
    left an operator guessing which of a round's messages was refused."""
    r = CkksRound(sites=3, vector_length=100)
    other = CkksRound(sites=3, vector_length=100)
    from secagg.ckks import CkksClient

    with pytest.raises(RefusedMessage) as caught:
        CkksClient(r.config, 2, r.identities[2], other.public, r.inputs[2])
    assert str(caught.value) == "WRONG_KEY_ID: context is not the round's key"
    assert str(RefusedMessage(RefusalReason.WRONG_ROUND)) == "WRONG_ROUND"


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
    uploads, aggregate = r.run()
    ws, _ = decrypt_verified_sum(r.holder, r.config, uploads)
    assert aggregate.chunks == tuple(_sum_chunks(r, uploads))
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




# --- The canonical ciphertext format (issue 6): a malformed chunk from an authenticated site is
# refused whole, before anything is added, and the round still sums exactly afterwards.

NTT_FLAG_OFFSET = 16 + 32  # SEAL header, parms_id


def _seal_form(r: CkksRound, chunk: bytes, form: str) -> bytes:
    """Our chunk re-expressed in SEAL's own format (which SEAL's load would accept)."""
    ctx, scale = r.public.seal_context, r.config.preset_params.scale
    layout = _seal._layout(ctx)
    kind = Kind(chunk[1])
    spec = layout.kinds[kind]
    seed = chunk[2:2 + _seal.SEED_BYTES] if kind is Kind.SEEDED else b""
    coefficients = spec.packer.unpack(chunk[len(chunk) - spec.packer.nbytes:])
    rebuilt = _seal._rebuild(layout, kind, coefficients, seed, scale)
    if form == "seal-uncompressed":
        return rebuilt
    if form == "seal-not-ntt":
        return rebuilt[:NTT_FLAG_OFFSET] + b"\x00" + rebuilt[NTT_FLAG_OFFSET + 1:]
    if form == "seal-zlib":
        body = zlib.compress(rebuilt[16:])
        return rebuilt[:5] + b"\x01" + rebuilt[6:8] + struct.pack("<Q", 16 + len(body)) + body
    assert form == "seal-zstd"
    return _seal.save_bytes(load_ciphertext(ctx, chunk, scale=scale))


def _with_coefficient(r: CkksRound, chunk: bytes, value: str) -> bytes:
    layout = _seal._layout(r.public.seal_context)
    spec = layout.kinds[Kind(chunk[1])]
    start = len(chunk) - spec.packer.nbytes
    coefficients = spec.packer.unpack(chunk[start:]).copy()
    q, bits = layout.primes[0], layout.bits[0]
    coefficients[-1] = {"prime": q, "above-prime": q + 1, "all-ones": 2**bits - 1}[value]
    return chunk[:start] + spec.packer.pack(coefficients)


def _attack_is_refused_and_the_sum_untouched(attacker: int, make_bad: Any) -> None:
    """An honest upload first (so a running sum exists), then ``attacker``'s upload with its
    last chunk replaced by ``make_bad(round, good_chunk)`` and re-signed, then every site
    honestly: the aggregate must be exact."""
    r = CkksRound(sites=3, vector_length=3000)  # 2 chunks per upload
    first = 2 if attacker == 1 else 1
    first_upload = r.client(first).start()
    r.server.handle(first_upload)
    upload = r.client(attacker).start()
    bad = make_bad(r, upload.chunks[-1])
    chunks = (*upload.chunks[:-1], bad)
    try:
        forged = _resign(r, upload, chunks)
    except TypeError:  # a chunk nothing can hash: the old signature will do
        forged = replace(upload, chunks=chunks)
    with pytest.raises(InvalidMessage):
        r.server.handle(forged)
    assert r.server.sites == (first,)
    uploads, aggregate = r.run(sorted(set(r.roster) - {first}))
    uploads.append(first_upload)
    ws, w = decrypt_verified_sum(r.holder, r.config, uploads)
    assert aggregate.chunks == tuple(_sum_chunks(r, uploads))
    exact_ws, exact_w = r.expected()
    assert abs(w - exact_w) < 1e-6 and float(np.max(np.abs(ws - exact_ws))) < 1e-6


SITES = pytest.mark.parametrize("attacker", [1, 2], ids=["seeded-site", "public-key-site"])


@SITES
def test_ciphertext_not_in_ntt_form_is_refused_before_anything_is_added(attacker: int) -> None:
    """The attack: SEAL loads a ciphertext flagged "not in NTT form", and the aggregator's
    add_inplace then throws mid-upload. Our format cannot express the flag; SEAL's bytes with
    it are refused whole."""
    _attack_is_refused_and_the_sum_untouched(
        attacker, lambda r, c: _seal_form(r, c, "seal-not-ntt"))


@SITES
@pytest.mark.parametrize("form", ["seal-zstd", "seal-uncompressed", "seal-zlib"])
def test_seal_encoded_ciphertext_is_refused_whatever_its_compression(attacker: int,
                                                                    form: str) -> None:
    _attack_is_refused_and_the_sum_untouched(attacker, lambda r, c: _seal_form(r, c, form))


@SITES
@pytest.mark.parametrize("change", ["one-byte-short", "one-byte-long", "50MB-trailing-junk"])
def test_ciphertext_of_any_other_length_is_refused(attacker: int, change: str) -> None:
    bad = {"one-byte-short": lambda c: c[:-1], "one-byte-long": lambda c: c + b"\x00",
           "50MB-trailing-junk": lambda c: c + os.urandom(50 * 2**20)}[change]
    _attack_is_refused_and_the_sum_untouched(attacker, lambda r, c: bad(c))


@SITES
@pytest.mark.parametrize("value", ["prime", "above-prime", "all-ones"])
def test_coefficient_equal_to_or_above_its_prime_is_refused(attacker: int, value: str) -> None:
    _attack_is_refused_and_the_sum_untouched(
        attacker, lambda r, c: _with_coefficient(r, c, value))


@SITES
@pytest.mark.parametrize("prefix", ["version-0", "version-2", "kind-0", "kind-3",
                                    "other-kind-than-announced"])
def test_wrong_format_version_or_kind_is_refused(attacker: int, prefix: str) -> None:
    def bad(r: CkksRound, c: bytes) -> bytes:
        if prefix == "other-kind-than-announced":  # a valid chunk of the other kind
            other = Kind.FULL if c[1] == Kind.SEEDED else Kind.SEEDED
            holder = r.holder
            enc = ChunkEncryptor(holder.seal_context, holder.preset.scale,
                                 **({"secret_key": holder.secret_key} if other is Kind.SEEDED
                                    else {"public_key": holder.public_key}))
            return enc.encrypt_row(np.zeros(holder.preset.slots))
        version, kind = {"version-0": (0, c[1]), "version-2": (2, c[1]),
                         "kind-0": (1, 0), "kind-3": (1, 3)}[prefix]
        return bytes((version, kind)) + c[2:]

    _attack_is_refused_and_the_sum_untouched(attacker, bad)


@pytest.mark.parametrize("form", ["none", "str", "bytearray", "memoryview", "int"])
def test_non_bytes_chunk_is_refused(form: str) -> None:
    make = {"none": lambda c: None, "str": lambda c: c.decode("latin-1"),
            "bytearray": bytearray, "memoryview": memoryview, "int": lambda c: 7}[form]
    _attack_is_refused_and_the_sum_untouched(2, lambda r, c: make(c))


def test_upload_relabelled_for_another_round_under_the_same_key_fails_its_signature() -> None:
    """In epoch mode one key serves several rounds of the same roster. The aggregator relabels
    a site's upload from round 1 as its round-2 upload (the site may have sat round 2 out).
    Property: the upload's signature binds round 1's parameters: refused."""
    r1 = CkksRound(sites=3, vector_length=100, round_id="round-1", epoch="e", max_rounds=2)
    config2 = replace(r1.config, round_id="round-2")
    server2 = CkksServer(config2, r1.public)
    upload = r1.client(2).start()
    with pytest.raises(InvalidMessage):
        server2.handle(replace(upload, round_id="round-2"))
    assert server2.sites == ()


def test_aggregator_given_another_keys_context_is_refused() -> None:
    r = CkksRound(sites=3, vector_length=10)
    with pytest.raises(RefusedMessage) as caught:
        CkksServer(r.config, KeyHolder.generate().public_context())
    assert caught.value.reason is RefusalReason.WRONG_KEY_ID


def test_aggregator_cannot_recompute_the_flooding_noise_from_public_values() -> None:
    """The aggregator knows the aggregate, the round parameters and the public key. If the
    release noise were keyed by anything derived from those, it could subtract the noise and
    read the key holder's raw decryption (which leaks the secret key).
    Property: no key the aggregator can derive reproduces the noise; the holder's does."""
    from secagg._encoding import digest, encode, parts_digest
    from secagg.ckks.presets import FLOOD_FACTOR
    from secagg.ckks.release import gaussian

    r = CkksRound(sites=3, vector_length=2000)
    uploads, aggregate = r.run()
    released = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    raw, _ = decrypt_verified_sum(r.holder, r.config, uploads)
    noise = released.average * released.weight_sum - raw
    by_site = {u.site_id: parts_digest(u.chunks) for u in uploads}
    aggregate_digest = hashlib.sha256(encode(
        "ckks-aggregate", r.config.params_digest, list(aggregate.sites),
        *(by_site[s] for s in aggregate.sites))).digest()
    sigma = FLOOD_FACTOR * r.config.preset_params.noise_bound(3)

    def correlation(key: bytes) -> float:
        prf = hmac.new(key, aggregate_digest, hashlib.sha256).digest()
        guess = gaussian(raw.shape[0] + 1, sigma, prf)[:-1]
        return float(np.corrcoef(noise, guess)[0, 1])

    public = [r.config.key_id, r.config.params_digest, b"", bytes(32),
              digest("ckks-flood-key", _seal.canonical_members(r.public.public_key))]
    assert all(abs(correlation(k)) < 0.2 for k in public)
    assert correlation(r.holder.flood_key()) > 0.9
