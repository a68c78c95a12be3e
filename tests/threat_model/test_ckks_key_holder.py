"""Adversary: an aggregator or a site that makes a CKKS key holder decrypt what it should not.

A key holder that decrypts whatever it is handed leaks: one site's update relabelled as an
aggregate, or the secret key itself (the decryption of (0, c) is c * s). These are the attacks
of the issue 6 review, each played against the release path users run
(:mod:`secagg.ckks.release`), plus the key-announcement, replay and averaging attacks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from secagg.ckks import (
    CkksClient,
    CkksRoundConfig,
    CkksServer,
    EncryptedAggregate,
    EncryptedUpdate,
    KeyHolder,
    Release,
    _seal,
    decrypt_verified_sum,
    release_average,
)
from secagg.ckks._seal import Kind
from secagg.ckks.presets import FLOOD_FACTOR
from secagg.errors import (
    ConfigurationError,
    InvalidMessage,
    ProtocolAbort,
    RefusalReason,
    RefusedMessage,
)
from tests.ckks_kit import CkksRound


def _crafted_chunk(r: CkksRound, c0: int, c1: int) -> bytes:
    """A full ciphertext (c0, c1) with constant polynomials, in our canonical format (in NTT
    form a constant polynomial has every coefficient equal to it)."""
    layout = _seal._layout(r.public.seal_context)
    n = r.config.preset_params.poly_modulus_degree
    coefficients = np.array([c0] * n + [c1] * n, dtype=np.uint64)
    return bytes([_seal.FORMAT_VERSION, Kind.FULL]) + layout.kinds[Kind.FULL].packer.pack(
        coefficients)


def _signed(r: CkksRound, site: int, chunks: tuple[bytes, ...], seeded: bool) -> EncryptedUpdate:
    sig = r.identities[site].sign(EncryptedUpdate.signed_bytes(
        r.config.params_digest, site, r.config.key_id, seeded, chunks))
    return EncryptedUpdate(r.config.round_id, r.config.key_id, site, chunks, seeded, sig)


def test_one_upload_relabelled_as_the_aggregate_of_three_sites_is_refused() -> None:
    """The aggregator hands the key holder site 2's upload as "the aggregate of 1, 2, 3"."""
    r = CkksRound(sites=3, vector_length=100)
    uploads, aggregate = r.run()
    lone = uploads[1]
    forged = replace(aggregate, chunks=tuple(
        _seal.dump_ciphertext(_seal.load_ciphertext(r.public.seal_context, c,
                                                    scale=r.config.preset_params.scale),
                              r.public.seal_context, scale=r.config.preset_params.scale)
        for c in lone.chunks))
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, forged, uploads, site_id=1)
    assert caught.value.reason is RefusalReason.AGGREGATE_MISMATCH
    # ... and with only that site's upload forwarded, too few sites
    with pytest.raises(ProtocolAbort):
        release_average(r.holder, r.config, replace(forged, sites=(2,)), [lone], site_id=1)
    # ... and the same upload forwarded three times counts once
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, forged, [lone, lone, lone], site_id=1)
    assert caught.value.reason is RefusalReason.DUPLICATE_SITE
    assert not r.holder.releases


def test_crafted_aggregate_with_zero_c0_and_chosen_c1_is_never_decrypted() -> None:
    """(0, c): its decryption is c * s, the secret key, flooding or not."""
    r = CkksRound(sites=3, vector_length=100)
    uploads, aggregate = r.run()
    crafted = replace(aggregate, chunks=(_crafted_chunk(r, 0, 1 << 20),))
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, crafted, uploads, site_id=1)
    assert caught.value.reason is RefusalReason.AGGREGATE_MISMATCH
    # an aggregator cannot forge the sites' upload signatures either
    forged = replace(uploads[0], chunks=(_crafted_chunk(r, 0, 1 << 20),))
    with pytest.raises(InvalidMessage):
        release_average(r.holder, r.config, crafted, [forged, *uploads[1:]], site_id=1)
    assert not r.holder.releases


class _DecryptSpy:
    """Stands in for ``sealapi`` inside the release module: records, for every decryption,
    whether the ciphertext was the holder's own sum or key-free (zero second polynomial)."""

    def __init__(self) -> None:
        from tenseal import sealapi

        self._real = sealapi
        self.own_sum: list[object] = []
        self.seen: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def Decryptor(self, context: object, key: object) -> object:
        real = self._real.Decryptor(context, key)
        spy = self

        class Wrapped:
            def decrypt(self, ct: object, plain: object) -> None:
                mine = any(ct is c for c in spy.own_sum)
                spy.seen.append("own sum" if mine else
                                "key-free" if ct.is_transparent() else "OTHER")  # type: ignore[attr-defined]
                real.decrypt(ct, plain)

        return Wrapped()


@pytest.mark.parametrize("claimed", ["honest", "zero c0, chosen c1", "another upload"])
def test_a_key_holder_decrypts_only_its_own_sum_or_a_key_free_difference(
        monkeypatch: pytest.MonkeyPatch, claimed: str) -> None:
    """Comparing the aggregator's claimed sum with its own, the key holder decrypts only the
    difference, and only once its second polynomial is zero (then the decryption does not
    involve the key): never the aggregator's bytes, never anything that mixes in c * s."""
    from secagg.ckks import _shards

    r = CkksRound(sites=3, vector_length=100)
    uploads, aggregate = r.run()
    if claimed == "zero c0, chosen c1":
        aggregate = replace(aggregate, chunks=(_crafted_chunk(r, 0, 1 << 20),))
    elif claimed == "another upload":
        ctx, scale = r.holder.seal_context, r.config.preset_params.scale
        one = tuple(_seal.dump_ciphertext(_seal.load_ciphertext(ctx, c, scale=scale), ctx,
                                          scale=scale) for c in uploads[0].chunks)
        aggregate = replace(aggregate, chunks=one)
    spy = _DecryptSpy()
    monkeypatch.setattr(_shards, "sealapi", spy)
    release = Release(r.holder, r.config, site_id=1)
    for u in uploads:
        release.add(u)
    state = release._sum.local
    assert state is not None and state.sum is not None
    spy.own_sum = list(state.sum)
    if claimed == "honest":
        release.finish(aggregate)
        assert "own sum" in spy.seen
    else:
        with pytest.raises(RefusedMessage):
            release.finish(aggregate)
        assert "own sum" not in spy.seen
    assert "OTHER" not in spy.seen, spy.seen


def test_malicious_site_adding_a_c1_term_to_its_own_upload_gets_no_release() -> None:
    """With an honest aggregator, a site signs an upload holding (0, c) and hopes to read
    c * s off the published average. The key holder's own sum then decrypts to values no
    honest round produces (imaginary parts and padding far above the noise): refused."""
    r = CkksRound(sites=3, vector_length=100)  # one chunk of 2048 slots
    for c1 in (1 << 30, 1 << 12):
        r = CkksRound(sites=3, vector_length=100)
        honest = [r.client(s).start() for s in (1, 2)]
        evil = _signed(r, 3, (_crafted_chunk(r, 0, c1),), seeded=False)
        server = CkksServer(r.config, r.public)
        for u in (*honest, evil):
            server.handle(u)  # canonical, correctly signed: the aggregator must accept it
        aggregate = server.close_stage()[1]
        with pytest.raises(RefusedMessage) as caught:
            release_average(r.holder, r.config, aggregate, [*honest, evil], site_id=1)
        assert caught.value.reason is RefusalReason.OUT_OF_RANGE, c1
        # the round is spent on that aggregate: there is no second, different try
        assert set(r.holder.releases) == {r.config.round_id}


def test_key_announcement_not_signed_by_a_key_holder_is_refused_before_encrypting() -> None:
    """Whoever hands a site its round configuration could name a key of its own."""
    r = CkksRound(sites=4, vector_length=10)
    rogue = KeyHolder.generate()
    unsigned = replace(r.announcement, key_id=rogue.key_id)
    with pytest.raises(ConfigurationError, match="not signed"):
        replace(r.config, announcement=unsigned)
    # signed by a roster site that is not a key holder
    by_site_3 = rogue.announce(holder=3, identity=r.identities[3], epoch=r.config.round_id)
    with pytest.raises(ConfigurationError, match="key holders"):
        replace(r.config, announcement=by_site_3)
    # signed by the holder's key, but moved to another epoch or preset
    with pytest.raises(ConfigurationError):
        replace(r.config, announcement=replace(r.announcement, epoch="later"))
    with pytest.raises(ConfigurationError):
        replace(r.config, announcement=replace(r.announcement, max_rounds=100))
    # a site given the rogue's context for the real announcement cannot encrypt under it
    with pytest.raises(RefusedMessage):
        CkksClient(r.config, 2, r.identities[2], rogue.public_context(), r.inputs[2])


def test_release_is_identical_every_time_and_for_every_key_holder() -> None:
    """Independent flooding noise per release would let an observer average it away."""
    r = CkksRound(sites=3, vector_length=500)
    sealed_to_2 = KeyHolder.from_secret_context(r.holder.export_secret_context())
    uploads, aggregate = r.run()
    first = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    again = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    other = release_average(sealed_to_2, r.config, aggregate, uploads, site_id=1)
    np.testing.assert_array_equal(first.average, again.average)
    np.testing.assert_array_equal(first.average, other.average)


def test_release_is_flooded_with_noise_of_the_documented_size_from_the_secret() -> None:
    """Without flooding the release carries the decryption noise (which leaks the key, Li and
    Micciancio 2021); with noise from a fixed key anyone could subtract it."""
    noises = []
    for _ in range(2):
        r = CkksRound(sites=3, vector_length=4000, seed=11)  # same inputs, fresh keys
        uploads, aggregate = r.run()
        raw, _ = decrypt_verified_sum(r.holder, r.config, uploads)
        released = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
        noise = released.average * released.weight_sum - raw
        sigma = FLOOD_FACTOR * r.config.preset_params.noise_bound(3)
        assert 0.5 * sigma < float(np.std(noise)) < 2 * sigma
        noises.append(noise)
    assert abs(float(np.corrcoef(noises[0], noises[1])[0, 1])) < 0.1


def test_second_release_of_a_round_with_other_uploads_is_refused() -> None:
    """A round restarted under the same id (same key, epoch mode) would let the aggregator
    release two sums that differ by one site: their difference is that site's update."""
    r = CkksRound(sites=4, vector_length=50, epoch="epoch-1", max_rounds=5)
    uploads, aggregate = r.run([1, 2, 3, 4])
    release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    again = CkksRound.__new__(CkksRound)
    again.__dict__.update(r.__dict__)
    again.server = CkksServer(r.config, r.public)
    fewer, smaller = again.run([1, 2, 3])
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, smaller, fewer, site_id=1)
    assert caught.value.reason is RefusalReason.ALREADY_RELEASED


def test_fresh_key_per_round_refuses_replayed_uploads_and_a_second_round() -> None:
    r = CkksRound(sites=3, vector_length=50)  # max_rounds=1: a fresh key per round
    uploads, aggregate = r.run()
    release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    # the same key cannot serve another round ...
    next_config = replace(r.config, round_id="next", epoch=r.config.epoch)
    server = CkksServer(next_config, r.public)
    next_uploads = [CkksClient(next_config, s, r.identities[s],
                               r.holder if s == 1 else r.public, r.inputs[s]).start()
                    for s in r.roster]
    for u in next_uploads:
        server.handle(u)
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, next_config, server.close_stage()[1], next_uploads, site_id=1)
    assert caught.value.reason is RefusalReason.KEY_EXHAUSTED
    # ... and a restarted round gets a fresh key: the old uploads no longer verify
    fresh = CkksRound(sites=3, vector_length=50)
    with pytest.raises((RefusedMessage, InvalidMessage)):
        fresh.server.handle(replace(uploads[0], key_id=fresh.config.key_id))
    with pytest.raises(RefusedMessage):
        fresh.server.handle(uploads[0])


def test_upload_signature_covers_every_chunk() -> None:
    """Swapping in a chunk of another valid encryption without re-signing is refused (a
    signature over everything but the ciphertexts would let anyone substitute them)."""
    r = CkksRound(sites=3, vector_length=3000)
    a, b = r.client(2).start(), r.client(2).start()
    swapped = replace(a, chunks=(b.chunks[0], *a.chunks[1:]))
    with pytest.raises(InvalidMessage):
        r.server.handle(swapped)
    with pytest.raises(InvalidMessage):
        Release(r.holder, r.config, site_id=1).add(swapped)


def test_aggregator_refuses_to_be_handed_a_key_holder() -> None:
    r = CkksRound(sites=3, vector_length=10)
    with pytest.raises(RefusedMessage) as caught:
        CkksServer(r.config, r.holder)  # type: ignore[arg-type]
    assert caught.value.reason is RefusalReason.CONTEXT_HAS_SECRET_KEY


@pytest.mark.parametrize("field", ["round_id", "key_id", "site_id", "chunks", "seeded",
                                   "signature"])
def test_malformed_upload_fields_are_secagg_errors(field: str) -> None:
    r = CkksRound(sites=3, vector_length=10)
    upload = r.client(2).start()
    bad = {"round_id": 7, "key_id": "k" * 32, "site_id": "2", "chunks": list(upload.chunks),
           "seeded": 1, "signature": None}[field]
    with pytest.raises(InvalidMessage):
        r.server.handle(replace(upload, **{field: bad}))
    with pytest.raises(InvalidMessage):
        Release(r.holder, r.config, site_id=1).add(replace(upload, **{field: bad}))


def test_sum_beyond_the_range_is_refused_not_wrapped() -> None:
    """A site encrypting values beyond clip (its own encoder, correctly signed) would make the
    sum wrap modulo q: 2049 decrypts as -2047. The release refuses anything out of range."""
    r = CkksRound(sites=3, vector_length=100)
    honest = [r.client(s).start() for s in (1, 2)]
    rows = np.zeros((1, r.config.preset_params.slots))
    rows[0, :100] = 2049.0
    rows[0, 100] = 0.5
    from secagg.ckks._chunks import ChunkEncryptor

    enc = ChunkEncryptor.for_context(r.public, seeded=False)
    evil = _signed(r, 3, (enc.encrypt_row(rows[0]),), seeded=False)
    server = CkksServer(r.config, r.public)
    for u in (*honest, evil):
        server.handle(u)
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, server.close_stage()[1], [*honest, evil], site_id=1)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE


def test_release_for_another_round_or_key_is_refused() -> None:
    r = CkksRound(sites=3, vector_length=10)
    uploads, aggregate = r.run()
    with pytest.raises(RefusedMessage, match="WRONG_ROUND"):
        release_average(r.holder, r.config, replace(aggregate, round_id="other"), uploads,
                        site_id=1)
    other = KeyHolder.generate()
    with pytest.raises(RefusedMessage, match="WRONG_KEY_ID"):
        release_average(other, r.config, aggregate, uploads, site_id=1)
    with pytest.raises(InvalidMessage):
        release_average(r.holder, r.config, "aggregate", uploads, site_id=1)  # type: ignore[arg-type]
    assert isinstance(aggregate, EncryptedAggregate)
    with pytest.raises(ConfigurationError):
        CkksRoundConfig(r.config.round_id, r.roster, r.announcement, (1,), 10, epoch="")


# ---- a malicious site encrypts values no honest site produces ---------------------------------


def _encrypted_row(r: CkksRound, values: np.ndarray) -> bytes:
    """One public-key encryption of ``values`` (complex allowed), in the canonical format."""
    from tenseal import sealapi

    ctx, scale = r.public.seal_context, r.config.preset_params.scale
    plain = sealapi.Plaintext()
    sealapi.CKKSEncoder(ctx).encode(values, scale, plain)
    ct = sealapi.Ciphertext(ctx)
    sealapi.Encryptor(ctx, r.public.public_key).encrypt(plain, ct)
    return _seal.dump_ciphertext(ct, ctx, scale=scale)


def _release_with(r: CkksRound, evil_values: np.ndarray) -> None:
    """Sites 1 and 2 upload honestly, site 3 signs an upload of ``evil_values``; the honest
    aggregator sums all three and the key holder is asked to release."""
    honest = [r.client(s).start() for s in (1, 2)]
    evil = _signed(r, 3, (_encrypted_row(r, evil_values),), seeded=False)
    server = CkksServer(r.config, r.public)
    for u in (*honest, evil):
        server.handle(u)
    release_average(r.holder, r.config, server.close_stage()[1], [*honest, evil], site_id=1)


def _honest_looking_row(r: CkksRound) -> np.ndarray:
    row = np.zeros(r.config.preset_params.slots, dtype=np.complex128)
    row[: r.config.vector_length] = 0.25
    row[r.config.vector_length] = 0.5  # its weight
    return row


def test_site_hiding_values_in_the_imaginary_parts_gets_no_release() -> None:
    """Real parts in range, imaginary parts carrying a term (where a c*s term shows too).
    Property: OUT_OF_RANGE, nothing released."""
    r = CkksRound(sites=3, vector_length=100)
    row = _honest_looking_row(r)
    row[: r.config.vector_length + 1] += 1j
    with pytest.raises(RefusedMessage) as caught:
        _release_with(r, row)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE
    assert set(r.holder.releases) == {r.config.round_id}  # spent: no second try


def test_site_writing_into_the_padding_slots_gets_no_release() -> None:
    """Values in the slots past the weight (zero in every honest upload)."""
    r = CkksRound(sites=3, vector_length=100)
    row = _honest_looking_row(r)
    row[r.config.vector_length + 1:] = 0.5
    with pytest.raises(RefusedMessage) as caught:
        _release_with(r, row)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE


def test_site_inflating_its_weight_gets_no_release() -> None:
    """A weight of 50 (max_weight is 1) with in-range elements: the site would own the
    average. Property: the weight sum exceeds sites * max_weight: OUT_OF_RANGE."""
    r = CkksRound(sites=3, vector_length=100)
    row = _honest_looking_row(r)
    row[r.config.vector_length] = 50.0
    with pytest.raises(RefusedMessage) as caught:
        _release_with(r, row)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE


def test_weight_sum_lost_in_the_flooding_noise_is_refused_not_divided_by() -> None:
    """Weights so small that the flooded weight sum can round to zero or below (about half
    the time): dividing by it would release an infinite or sign-flipped average.
    Property: each such round is refused (OUT_OF_RANGE) by the weight-sum floor, whatever
    its noise draw (the floor sits far above the noise), and nothing is released."""
    holder = KeyHolder.generate()
    for i in range(8):
        r = CkksRound(sites=3, vector_length=10, holder=holder, round_id=f"tiny-{i}",
                      epoch="tiny", max_rounds=100)
        for s, (update, _) in list(r.inputs.items()):
            r.inputs[s] = (update, 1e-6)
        uploads, aggregate = r.run()
        with pytest.raises(RefusedMessage, match="the weight sum is below") as refused:
            release_average(holder, r.config, aggregate, uploads, site_id=1)
        assert refused.value.reason is RefusalReason.OUT_OF_RANGE


# ---- the aggregator forwards something other than what it summed -----------------------------


def test_key_holder_refuses_an_upload_it_cannot_attribute_or_shape() -> None:
    """A forwarded upload from a site not on the roster, or signed with fewer chunks than the
    round has. Property: refused with its reason; no crash, nothing added."""
    r = CkksRound(sites=3, vector_length=3000)  # two chunks
    upload = r.client(2).start()
    with pytest.raises(RefusedMessage) as caught:
        Release(r.holder, r.config, site_id=1).add(replace(upload, site_id=42))
    assert caught.value.reason is RefusalReason.UNKNOWN_SITE
    short = _signed(r, 2, upload.chunks[:1], seeded=False)
    with pytest.raises(RefusedMessage) as caught:
        Release(r.holder, r.config, site_id=1).add(short)
    assert caught.value.reason is RefusalReason.WRONG_SHAPE


@pytest.mark.parametrize("change", ["other-kind-than-signed", "one-byte-long"])
def test_key_holder_parses_every_forwarded_chunk_canonically(change: str) -> None:
    """The key holder does not rely on the aggregator's parsing: a signed upload whose chunk
    is of the other kind than its signed flag, or not of the exact length, is refused."""
    r = CkksRound(sites=3, vector_length=100)
    seeded = r.client(1).start()  # the key holder's own upload is seeded
    assert seeded.seeded
    if change == "other-kind-than-signed":
        chunk = _encrypted_row(r, np.zeros(r.config.preset_params.slots))
    else:
        chunk = seeded.chunks[0] + b"\x00"
    bad = _signed(r, 1, (chunk,), seeded=True)
    with pytest.raises(InvalidMessage):
        Release(r.holder, r.config, site_id=1).add(bad)


def test_aggregate_labelled_for_another_key_is_refused() -> None:
    r = CkksRound(sites=3, vector_length=10)
    uploads, aggregate = r.run()
    other = KeyHolder.generate().key_id
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, replace(aggregate, key_id=other), uploads, site_id=1)
    assert caught.value.reason is RefusalReason.WRONG_KEY_ID


def test_aggregate_claiming_more_sites_than_the_forwarded_uploads_is_refused() -> None:
    """The aggregator sums three uploads but claims four sites: the range checks would then
    allow a larger sum (and the release would name a site whose update is not in it).
    Property: AGGREGATE_MISMATCH."""
    r = CkksRound(sites=4, vector_length=10)
    uploads, aggregate = r.run([1, 2, 3])
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, replace(aggregate, sites=(1, 2, 3, 4)), uploads,
                        site_id=1)
    assert caught.value.reason is RefusalReason.AGGREGATE_MISMATCH
    assert not r.holder.releases


def test_restarted_round_with_a_site_reuploading_cannot_be_released_twice() -> None:
    """The aggregator restarts a round under the same id and has one site upload another
    update, the same sites otherwise. Two releases that differ in one site's update (with the
    same noise) hand over the difference of its updates.
    Property: the second aggregate of the round is refused (ALREADY_RELEASED)."""
    r = CkksRound(sites=4, vector_length=50, epoch="epoch-1", max_rounds=5)
    uploads, aggregate = r.run()
    release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    server = CkksServer(r.config, r.public)
    changed = CkksClient(r.config, 4, r.identities[4], r.public,
                         (np.zeros(50), 1.0)).start()
    again = [*uploads[:3], changed]
    for u in again:
        server.handle(u)
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, server.close_stage()[1], again, site_id=1)
    assert caught.value.reason is RefusalReason.ALREADY_RELEASED


def test_key_announcement_moved_to_another_epoch_or_preset_fails_its_signature() -> None:
    """The announcement signed for epoch e (one round) re-labelled for a longer epoch, or for
    another preset, with a round configuration to match.
    Property: the configuration refuses it as not signed by the key holder."""
    r = CkksRound(sites=4, vector_length=10)
    moved = replace(r.announcement, epoch="all-year")
    with pytest.raises(ConfigurationError, match="not signed"):
        replace(r.config, announcement=moved, epoch="all-year")
    relabelled = replace(r.announcement, preset="add-only-8192")
    with pytest.raises(ConfigurationError, match="not signed"):
        replace(r.config, announcement=relabelled, preset="add-only-8192")


def test_flooding_noise_drowns_the_decryption_noise() -> None:
    """The raw decryption error depends on the secret key (Li and Micciancio 2021); the
    release hides it under flooding noise many times larger.
    Property: the flooding noise's standard deviation is over 256 times the largest
    decryption error of the round."""
    r = CkksRound(sites=3, vector_length=4000, seed=5)
    uploads, aggregate = r.run()
    raw, _ = decrypt_verified_sum(r.holder, r.config, uploads)
    decryption_error = float(np.max(np.abs(raw - r.expected()[0])))
    released = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    flooding = released.average * released.weight_sum - raw
    assert float(np.std(flooding)) > 256 * decryption_error


def test_aggregator_counting_one_sites_upload_twice_is_refused() -> None:
    """The aggregator adds site 3's upload twice (its weight doubles in the average) and
    forwards it twice, so that the key holder's own sum matches.
    Property: the key holder counts each site once (DUPLICATE_SITE); nothing is released."""
    from tenseal import sealapi

    r = CkksRound(sites=3, vector_length=10)
    uploads, aggregate = r.run()
    ctx, scale = r.public.seal_context, r.config.preset_params.scale
    total = [_seal.load_ciphertext(ctx, c, scale=scale) for c in aggregate.chunks]
    twice = uploads[2]
    kinds = (Kind.SEEDED,) if twice.seeded else (Kind.FULL,)
    for acc, c in zip(total, twice.chunks, strict=True):
        sealapi.Evaluator(ctx).add_inplace(acc, _seal.load_ciphertext(ctx, c, scale=scale,
                                                                      kinds=kinds))
    doubled = replace(aggregate, chunks=tuple(_seal.dump_ciphertext(ct, ctx, scale=scale)
                                              for ct in total))
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, doubled, [*uploads, twice], site_id=1)
    assert caught.value.reason is RefusalReason.DUPLICATE_SITE
    assert not r.holder.releases


def test_site_cancelling_the_weight_sum_gets_no_release() -> None:
    """A site that knows (or guesses) the others' weights encrypts a weight that brings the
    sum just below zero: the flooded weight sum is then positive about half the time, and the
    release divides by a weight sum no honest round has.
    Property: every attempt is refused (OUT_OF_RANGE)."""
    holder = KeyHolder.generate()
    for i in range(16):
        r = CkksRound(sites=3, vector_length=10, holder=holder, round_id=f"cancel-{i}",
                      epoch="cancel", max_rounds=100)
        row = np.zeros(r.config.preset_params.slots, dtype=np.complex128)
        row[r.config.vector_length] = -(r.inputs[1][1] + r.inputs[2][1]) - 1e-6
        with pytest.raises(RefusedMessage) as caught:
            _release_with(r, row)
        assert caught.value.reason is RefusalReason.OUT_OF_RANGE


def test_key_holder_refuses_an_upload_of_another_round_or_key() -> None:
    """The aggregator forwards a genuine upload of another round under the same key (epoch
    mode), or of another key. Property: refused with the reason (WRONG_ROUND, WRONG_KEY_ID)."""
    r = CkksRound(sites=3, vector_length=10, epoch="e", max_rounds=2)
    config2 = replace(r.config, round_id="round-2")
    other_round = CkksClient(config2, 2, r.identities[2], r.public, r.inputs[2]).start()
    with pytest.raises(RefusedMessage) as caught:
        Release(r.holder, r.config, site_id=1).add(other_round)
    assert caught.value.reason is RefusalReason.WRONG_ROUND
    other_key = CkksRound(sites=3, vector_length=10).client(2).start()
    with pytest.raises(RefusedMessage) as caught:
        Release(r.holder, r.config, site_id=1).add(other_key)
    assert caught.value.reason is RefusalReason.WRONG_KEY_ID


def test_each_refusal_after_decryption_spends_the_round_so_refusals_are_no_oracle() -> None:
    """A key holder that decrypted, refused (out of range) and then decrypted other sums for
    the same round would answer one yes/no question per try about an exact decryption: 260
    such questions recovered a site's update. Now the round is spent on the first aggregate
    decrypted, before decryption: any other aggregate for it is ALREADY_RELEASED, decided
    before anything is decrypted."""
    from unittest import mock

    from secagg.ckks import _shards

    r = CkksRound(sites=4, vector_length=100)
    honest = [r.client(s).start() for s in (1, 2, 3)]
    evil = _signed(r, 4, (_crafted_chunk(r, 0, 1 << 30),), seeded=False)
    server = CkksServer(r.config, r.public)
    for u in (*honest, evil):
        server.handle(u)
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, server.close_stage()[1], [*honest, evil],
                        site_id=1)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE
    decrypts = mock.Mock(side_effect=AssertionError("decrypted again"))
    server = CkksServer(r.config, r.public)
    for u in honest:
        server.handle(u)
    with mock.patch.object(_shards.ShardedSum, "decrypt", decrypts), pytest.raises(
            RefusedMessage) as caught:
        release_average(r.holder, r.config, server.close_stage()[1], honest, site_id=1)
    assert caught.value.reason is RefusalReason.ALREADY_RELEASED
    assert not decrypts.called


def test_a_second_key_holder_cannot_release_a_round_another_announced() -> None:
    """Two sites hold one key (sealed from one to the other). Each keeps its own ledger; if
    both could release, the aggregator would ask one for all sites and the other for all but
    one, and subtract. Only the announcing holder releases."""
    r = CkksRound(sites=4, vector_length=100)
    copy = KeyHolder.from_secret_context(r.holder.export_secret_context())
    uploads, aggregate = r.run()
    release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    fewer, smaller = uploads[:3], None
    server = CkksServer(r.config, r.public)
    for u in fewer:
        server.handle(u)
    smaller = server.close_stage()[1]
    with pytest.raises(RefusedMessage) as caught:
        release_average(copy, r.config, smaller, fewer, site_id=2)
    assert caught.value.reason is RefusalReason.NOT_THE_RELEASING_HOLDER
    assert not copy.releases


def test_colluding_sites_cannot_make_up_min_sites_around_one_victim() -> None:
    """With 2 colluders among 10 sites and min_sites=3, the aggregator could release the sum
    of {victim, colluder A, colluder B}; the colluders subtract their own updates. min_sites
    now counts the colluders: at least colluders + 2."""
    from tests.ckks_kit import announcement_for

    roster, announcement = announcement_for(10)
    with pytest.raises(ConfigurationError, match="min_sites"):
        CkksRoundConfig("r", roster, announcement, (1,), 10, min_sites=3)
    config = CkksRoundConfig("r", roster, announcement, (1,), 10)
    assert config.min_sites == 4  # floor(0.2 * 10) + 2
    roster, announcement = announcement_for(100)
    assert CkksRoundConfig("r", roster, announcement, (1,), 10).min_sites == 22


def test_a_roster_naming_one_key_twice_is_refused() -> None:
    from tests.ckks_kit import announcement_for

    roster, announcement = announcement_for(5)
    roster[5] = roster[4]
    with pytest.raises(ConfigurationError, match="same identity key"):
        CkksRoundConfig("r", roster, announcement, (1,), 10)


def _sharded_refusal(r: Any, uploads: Any, aggregate: Any = None) -> RefusalReason:
    """Why a key holder whose sum is split over two workers refuses to release ``uploads``
    (summed by the aggregator, or ``aggregate``)."""
    if aggregate is None:
        server = CkksServer(r.config, r.public)
        for u in uploads:
            server.handle(u)
        aggregate = server.close_stage()[1]
    release = Release(r.holder, r.config, site_id=1, workers=2)
    try:
        for u in uploads:
            release.add(u)
        with pytest.raises(RefusedMessage) as caught:
            release.finish(aggregate)
    finally:
        release.close()
    return caught.value.reason


def test_sharded_release_adds_an_upload_whole_or_not_at_all() -> None:
    """With the key holder's sum split over worker processes, a signed upload whose last
    chunk is malformed must be refused by every shard, not added by the shards whose chunks
    parsed: the release that follows is exactly the in-process release of the honest sites."""
    r = CkksRound(sites=4, vector_length=5000)  # 3 chunks: shards [0, 2) and [2, 3)
    uploads, aggregate = r.run(sites=[1, 2, 3])
    good = r.client(4).start().chunks
    evil = _signed(r, 4, (*good[:2], good[2][:-8]), seeded=False)
    release = Release(r.holder, r.config, site_id=1, workers=2)
    try:
        with pytest.raises(InvalidMessage):
            release.add(evil)
        for u in uploads:
            release.add(u)
        sharded = release.finish(aggregate)
    finally:
        release.close()
    single = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    assert np.array_equal(sharded.average, single.average)
    assert sharded.weight_sum == single.weight_sum and sharded.sites == (1, 2, 3)


def test_sharded_release_refuses_when_any_shard_is_out_of_range() -> None:
    """A site hides a c1 term in its last chunk, which the second of two worker shards
    holds: the release is refused as a whole (OUT_OF_RANGE), whichever shard saw it."""
    r = CkksRound(sites=4, vector_length=5000)  # 3 chunks: shards [0, 2) and [2, 3)
    honest = [r.client(s).start() for s in (1, 2, 3)]
    good = r.client(4).start().chunks
    evil = _signed(r, 4, (*good[:2], _crafted_chunk(r, 0, 1 << 30)), seeded=False)
    assert _sharded_refusal(r, (*honest, evil)) is RefusalReason.OUT_OF_RANGE


def test_a_sharded_sum_whose_worker_failed_answers_nothing_more() -> None:
    """One worker of two fails a command (here flooding a shard whose range check failed,
    while the other shard's passed) and the other answers. Its answer must be read with the
    failure, and the sum refuse every later call: an unread answer would be taken for the
    next command's (a stale flood size read as "this chunk is my sum")."""
    from secagg.ckks._shards import ShardedSum
    from secagg.errors import SecAggError

    r = CkksRound(sites=3, vector_length=3000)  # 2 chunks: one per worker
    for s in r.roster:  # the second chunk's elements zero: only shard 1 is out of range
        values, weight = r.inputs[s]
        values[2048:] = 0.0
        r.inputs[s] = (values, weight)
    uploads, aggregate = r.run()
    params = r.config.preset_params
    shards = ShardedSum(r.holder, params.scale, params.slots, r.config.chunk_count, workers=2)
    try:
        for u in uploads:
            shards.add(u.chunks, (Kind.SEEDED, Kind.FULL))
        assert not shards.check_range(3000, 0.01, 0.0, 100.0)
        with pytest.raises(SecAggError):
            shards.flood(bytes(32), 0.0, 2.0 ** -20)
        with pytest.raises(SecAggError, match="failed earlier"):
            shards.is_my_sum(aggregate.chunks)
    finally:
        shards.close()



def test_a_release_worker_that_stops_answering_is_ended_not_waited_for_ever(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A release worker stopped with SIGSTOP (neither answering nor dead) held its key
    holder in the pipe's recv for ever, past every round's end. Now an answer is waited for
    WORKER_ANSWER_SECONDS at most: then the worker is killed, the call is WorkersFailed and
    the sum refuses every later call."""
    import os
    import signal
    import threading

    from secagg.ckks import _shards
    from secagg.errors import SecAggError, WorkersFailed

    monkeypatch.setattr(_shards, "WORKER_ANSWER_SECONDS", 3.0)
    r = CkksRound(sites=3, vector_length=3000)  # 2 chunks: one per worker
    uploads, aggregate = r.run()
    params = r.config.preset_params
    shards = _shards.ShardedSum(r.holder, params.scale, params.slots, r.config.chunk_count,
                                workers=2)
    raised: list[BaseException] = []

    def add() -> None:
        try:
            shards.add(uploads[0].chunks, (Kind.SEEDED, Kind.FULL))
        except BaseException as e:
            raised.append(e)

    try:
        stopped = shards._workers[1].process
        os.kill(stopped.pid, signal.SIGSTOP)
        caller = threading.Thread(target=add, daemon=True)
        caller.start()
        caller.join(timeout=15)
        waited_for_ever = caller.is_alive()
        if waited_for_ever:
            stopped.kill()  # (else a caller still waiting would wait for ever)
        caller.join(timeout=10)
        assert not waited_for_ever, "the key holder still waits for its stopped worker"
        assert len(raised) == 1 and isinstance(raised[0], WorkersFailed), raised
        assert "gave no answer in 3 s" in str(raised[0])
        stopped.join(timeout=10)  # (ended by the key holder, not by this test)
        assert not stopped.is_alive(), "the stopped worker was left alive"
        with pytest.raises(SecAggError, match="failed earlier"):
            shards.is_my_sum(aggregate.chunks)
    finally:
        shards.close()

def test_known_limitation_aggregator_and_one_colluding_site_cancel_honest_uploads() -> None:
    """KNOWN LIMITATION (README, "aggregator + colluding sites", CKKS public-key mode).
    CKKS ciphertexts are malleable and nothing proves an upload is a fresh encryption of
    something its site knows: a colluding site signs, as its own upload, the negation of
    honest site B's upload (which the aggregator holds). The key holder's sum of {A, B, -B}
    passes every check and is site A's update. min_sites cannot help (one colluder cancels
    any number of honest uploads). Masking resists this (B's pairwise masks with honest sites
    stay in the sum). If this test ever fails, a defence exists: update the README's table."""
    from tenseal import sealapi

    r = CkksRound(sites=5, vector_length=3000)
    a, b, colluder = 2, 3, 5
    up_a, up_b = r.client(a).start(), r.client(b).start()
    ctx, scale = r.public.seal_context, r.config.preset_params.scale
    evaluator = sealapi.Evaluator(ctx)

    def negated(chunk: bytes) -> bytes:
        ct = _seal.load_ciphertext(ctx, chunk, scale=scale)
        evaluator.negate_inplace(ct)
        return _seal.dump_ciphertext(ct, ctx, scale=scale)

    evil = _signed(r, colluder, tuple(negated(c) for c in up_b.chunks), seeded=False)
    server = CkksServer(r.config, r.public)
    for u in (up_a, up_b, evil):
        server.handle(u)
    released = release_average(r.holder, r.config, server.close_stage()[1], [up_a, up_b, evil],
                               site_id=1)
    update_a, weight_a = r.inputs[a]
    assert released.weight_sum == pytest.approx(weight_a, abs=1e-3)
    assert np.max(np.abs(released.average - np.clip(update_a, -r.config.clip, r.config.clip))
                  ) < 1e-3


# ---- small weight sums: the release must not be mostly noise, nor amplify a site ---------------


def _zero_inputs(r: CkksRound, weights: dict[int, float]) -> None:
    for s, w in weights.items():
        r.inputs[s] = (np.zeros(r.config.vector_length), w)


def _refused_cancelling(r: CkksRound, leftover: float) -> None:
    """Sites 1 and 2 upload zeros at weights 0.5 and 0.6; site 3's weight cancels theirs down
    to ``leftover``. Refused (OUT_OF_RANGE), naming the least weight sum."""
    _zero_inputs(r, {1: 0.5, 2: 0.6})
    row = np.zeros(r.config.preset_params.slots, dtype=np.complex128)
    row[r.config.vector_length] = -1.1 + leftover
    with pytest.raises(RefusedMessage, match="weight sum is below") as caught:
        _release_with(r, row)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE


def test_elements_beyond_clip_times_the_weight_sum_get_no_release() -> None:
    """Every site's weight 0.01; site 3 sends 2 * clip in every element. The sum's elements
    were checked against sites * clip * max_weight (3 here) only: the key holder released an
    average of 100 with clip 1. Each weighted element is within clip * W of zero.
    Property: OUT_OF_RANGE; and the same round with site 3 within its clip is released."""
    for evil, refused in ((2.0, True), (0.01, False)):
        r = CkksRound(sites=3, vector_length=100)
        for s in (1, 2):
            r.inputs[s] = (r.inputs[s][0], 0.01)
        row = np.zeros(r.config.preset_params.slots, dtype=np.complex128)
        row[: r.config.vector_length] = evil * r.config.clip
        row[r.config.vector_length] = 0.01
        if refused:
            with pytest.raises(RefusedMessage, match="exceed clip times the weight sum") as caught:
                _release_with(r, row)
            assert caught.value.reason is RefusalReason.OUT_OF_RANGE
        else:
            _release_with(r, row)


@pytest.mark.parametrize("case", ["honest-tiny-weights", "negative-weight-cancelling"])
def test_a_weight_sum_too_small_for_the_release_noise_gets_no_release(case: str) -> None:
    """A weight sum the flooding noise swamps: honest sites with tiny weights (the noise,
    divided by W, made an average of L2 22 from inputs of L2 1), or a site whose negative
    weight cancels the others' to a tiny positive sum (dividing its share, or the noise, up
    past the clip). Property: OUT_OF_RANGE naming the least weight sum, whatever made it."""
    r = CkksRound(sites=3, vector_length=100)
    if case == "negative-weight-cancelling":
        _refused_cancelling(r, 1e-4)
        return
    _zero_inputs(r, {1: 1e-4, 2: 1e-4, 3: 1e-4})
    uploads, aggregate = r.run()
    with pytest.raises(RefusedMessage, match="weight sum is below") as caught:
        release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE


def test_an_honest_round_well_above_the_noise_floor_is_released() -> None:
    """Weights of 0.01 each (W = 0.03, ten times the floor at this preset and size)."""
    r = CkksRound(sites=3, vector_length=100)
    for s in r.inputs:
        r.inputs[s] = (r.inputs[s][0], 0.01)
    uploads, aggregate = r.run()
    released = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    exact, weight = r.expected()
    assert abs(released.weight_sum - weight) < 1e-3
    assert np.max(np.abs(released.average - exact / weight)) < 0.1 * r.config.clip


def test_an_aggregate_naming_its_sites_by_anything_but_ints_is_an_invalid_message() -> None:
    """numpy ints compare equal to the verified sites, then raised AttributeError from inside
    the digest's encoding (no SecAggError): refused as malformed, before the round is spent."""
    r = CkksRound(sites=3, vector_length=10)
    uploads, aggregate = r.run()
    for sites in (tuple(np.int64(s) for s in aggregate.sites),
                  tuple(float(s) for s in aggregate.sites)):
        with pytest.raises(InvalidMessage):
            release_average(r.holder, r.config, replace(aggregate, sites=sites),  # type: ignore[arg-type]
                            uploads, site_id=1)
    assert not r.holder.releases
    release_average(r.holder, r.config, aggregate, uploads, site_id=1)


def test_an_element_just_past_sites_times_clip_is_refused_before_the_noise() -> None:
    """The range check before flooding is exact (B a value): every weight 1, sites 1 and 2 at
    +clip in element 0, site 3 at clip + 1e-4 there. The sum, 3 * clip + 1e-4, is within
    what the flooded check (clip * W plus the noise, ~5e-4) would take, and beyond
    sites * clip * max_weight: OUT_OF_RANGE."""
    r = CkksRound(sites=3, vector_length=100)
    for s in (1, 2):
        update = np.zeros(r.config.vector_length)
        update[0] = r.config.clip
        r.inputs[s] = (update, 1.0)
    row = np.zeros(r.config.preset_params.slots, dtype=np.complex128)
    row[0] = r.config.clip + 1e-4
    row[r.config.vector_length] = 1.0
    with pytest.raises(RefusedMessage, match="no honest round produces") as caught:
        _release_with(r, row)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE


def test_a_weight_sum_below_its_own_noise_gets_no_release_whatever_the_clip() -> None:
    """With a clip of 100, a floor of a tenth of clip * W in each element let W itself be
    below its noise: a site whose negative weight cancels the others' to 2e-4 released an
    average 3 to 5 times the clip. The weight sum's noise is held to a tenth of it too.
    Property: OUT_OF_RANGE; an honest round at this clip is released."""
    _refused_cancelling(CkksRound(sites=3, vector_length=100, clip=100.0), 2e-4)
    honest = CkksRound(sites=3, vector_length=100, clip=100.0)
    uploads, aggregate = honest.run()
    release_average(honest.holder, honest.config, aggregate, uploads, site_id=1)


def test_a_config_no_round_of_which_could_be_released_is_refused() -> None:
    """clip 1e-4 at add-only-4096: the release's noise floor asks for a weight sum of ~25,
    three sites at max_weight make 3. Every round would be spent and refused once the sites
    had encrypted; the config is refused, naming the least weight sum. clip 1e-2 is taken."""
    with pytest.raises(ConfigurationError, match="no round could be released"):
        CkksRound(sites=3, vector_length=10, clip=1e-4)
    CkksRound(sites=3, vector_length=10, clip=1e-2)


def test_a_config_whose_values_outgrow_the_encodings_precision_is_refused() -> None:
    """nvflare-default's headroom takes sums up to 3e17, but CKKS encodes through float64,
    whose rounding grows with the values: at 3 sites a clip of 3e8 made every honest round
    look out of range. Refused when the config is made, naming the precision; a clip of 6e7,
    within the margin, releases an honest round."""
    with pytest.raises(ConfigurationError, match=r"precision: 3 sites x clip 1e\+09"):
        CkksRound(sites=3, vector_length=100, clip=1e9, preset="nvflare-default")
    r = CkksRound(sites=3, vector_length=100, clip=6e7, preset="nvflare-default")
    for s in r.inputs:
        r.inputs[s] = (r.inputs[s][0] * 6e7, 1.0)
    uploads, aggregate = r.run()
    released = release_average(r.holder, r.config, aggregate, uploads, site_id=1)
    exact, weight = r.expected()
    assert np.max(np.abs(released.average - exact / weight)) < 1e-3 * r.config.clip


def test_a_refusal_after_decryption_leaves_the_decrypted_sum_in_no_frame() -> None:
    """A key holder's refusal after decrypting (the weight sum or the elements out of range)
    withholds the sum; its traceback held the decrypted, flooded sum and the flooding key as
    the refusing frame's locals, shown by ``pytest -l`` and sent by error trackers that record
    locals. Property: no frame of the refusal (or its chain) holds a float vector of the
    round's length + 1 or a 32-byte key."""
    for r, row in ((CkksRound(sites=3, vector_length=100, clip=100.0), None),
                   (CkksRound(sites=3, vector_length=100), "beyond-clip")):
        if row is None:
            _zero_inputs(r, {1: 0.5, 2: 0.6})
            evil = np.zeros(r.config.preset_params.slots, dtype=np.complex128)
            evil[r.config.vector_length] = -1.1 + 2e-4
        else:
            for s in (1, 2):
                r.inputs[s] = (r.inputs[s][0], 0.01)
            evil = np.zeros(r.config.preset_params.slots, dtype=np.complex128)
            evil[: r.config.vector_length] = 2.0 * r.config.clip
            evil[r.config.vector_length] = 0.01
        with pytest.raises(RefusedMessage) as caught:
            _release_with(r, evil)
        assert caught.value.reason is RefusalReason.OUT_OF_RANGE
        frames = []
        chain: BaseException | None = caught.value
        while chain is not None:
            tb = chain.__traceback__
            while tb is not None:
                frames.append(tb.tb_frame)
                tb = tb.tb_next
            chain = chain.__cause__ or chain.__context__
        # (the flooding key, keyed by the holder's secret and the sum's digest, is 32 bytes:
        # since every frame below Release.finish leaves without locals, no 32-byte value is
        # left in any, whatever it is)
        held = [(f.f_code.co_name, name) for f in frames if f.f_code.co_filename != __file__
                for name, value in f.f_locals.items()
                if (isinstance(value, np.ndarray)
                    and value.shape == (r.config.vector_length + 1,)) or (
                        isinstance(value, bytes) and len(value) == 32)]
        assert held == []


def test_an_aggregate_off_the_sum_in_its_first_polynomial_alone_is_refused() -> None:
    """The aggregator's claimed sum is the key holder's own in its second polynomial (so
    the difference is key-free) but off by one in one coefficient of the first: not the sum
    of the uploads, refused before anything is released."""
    r = CkksRound(sites=3, vector_length=100)
    uploads, aggregate = r.run()
    layout = _seal._layout(r.public.seal_context)
    packer = layout.kinds[Kind.FULL].packer
    (chunk,) = aggregate.chunks
    coefficients = packer.unpack(memoryview(chunk)[2:]).copy()
    x = int(coefficients[0])
    coefficients[0] = np.uint64(x - 1 if x > 0 else x + 1)
    nudged = bytes(chunk[:2]) + packer.pack(coefficients)
    assert nudged != chunk
    with pytest.raises(RefusedMessage):
        release_average(r.holder, r.config, replace(aggregate, chunks=(nudged,)), uploads,
                        site_id=1)
    # (and the honest aggregate is released: the test refuses only the nudge)
    r2 = CkksRound(sites=3, vector_length=100)
    uploads2, aggregate2 = r2.run()
    release_average(r2.holder, r2.config, aggregate2, uploads2, site_id=1)


@pytest.mark.parametrize("where", ["last", "first"])
def test_a_sharded_release_refuses_an_oversized_aggregate_chunk_as_a_mismatch(
        where: str) -> None:
    """A lying aggregator's aggregate with one chunk far longer than any ciphertext: with
    the sum split over worker processes, the chunk did not fit its worker's buffer and the
    key holder failed with a raw error (or broke its sum for good) instead of refusing the
    aggregate as not its own sum."""
    r = CkksRound(sites=4, vector_length=5000)  # 3 chunks: shards [0, 2) and [2, 3)
    uploads, aggregate = r.run(sites=[1, 2, 3])
    chunks = list(aggregate.chunks)
    at = -1 if where == "last" else 0
    chunks[at] = chunks[at] * 40
    assert _sharded_refusal(r, uploads, replace(aggregate, chunks=tuple(chunks))) is (
        RefusalReason.AGGREGATE_MISMATCH)


class _LyingTuple(tuple):  # type: ignore[type-arg]
    """A tuple that claims one element whatever it holds."""

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize("field", ["round_id", "key_id", "sites", "chunks"])
def test_an_aggregate_of_the_wrong_field_types_is_an_invalid_message_before_any_compare(
        field: str) -> None:
    """A release request whose aggregate has a numpy array as its round id or key id raised
    ValueError from inside the comparison ("truth value of an empty array is ambiguous"); a
    tuple subclass claiming another length raised from zip. Each field's exact type is
    checked first: InvalidMessage, and the round is not spent (the honest aggregate is
    released after it)."""
    r = CkksRound(sites=3, vector_length=10)
    uploads, aggregate = r.run()
    bad = {"round_id": np.zeros(0), "key_id": np.zeros(0), "sites": list(aggregate.sites),
           "chunks": _LyingTuple(())}[field]
    with pytest.raises(InvalidMessage, match="aggregate"):
        release_average(r.holder, r.config, replace(aggregate, **{field: bad}), uploads,
                        site_id=1)
    assert release_average(r.holder, r.config, aggregate, uploads, site_id=1).sites == (1, 2, 3)


def test_an_upload_whose_chunks_are_a_lying_tuple_is_refused_and_the_round_goes_on() -> None:
    """A site uploads (signed with its own key) chunks in a tuple subclass that claims the
    round's chunk count: the server took it with no chunks, and every honest upload after it
    raised ValueError from zip (the round aborted). Refused as InvalidMessage; the honest
    uploads are counted."""
    r = CkksRound(sites=3, vector_length=10)
    honest = r.client(3).start()
    evil = _signed(r, 3, _LyingTuple(()), seeded=honest.seeded)
    _refused_then_the_honest_counted(r, evil)


class _AgreeingTuple(tuple):  # type: ignore[type-arg]
    """A tuple that says it equals whatever it is compared with (Python asks a subclass on
    the right of == or != first)."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = tuple.__hash__


def test_an_aggregate_whose_sites_are_a_tuple_claiming_equality_is_an_invalid_message() -> None:
    """The aggregate names sites 1 and 2 in a tuple subclass that compares equal to the
    verified sites (1, 2, 3): taken as a tuple, it passed the claimed-sites check and the
    release was of two sites' names over three sites' sum. Its exact type is checked first:
    InvalidMessage, and the honest aggregate is released after it."""
    r = CkksRound(sites=3, vector_length=10)
    uploads, aggregate = r.run()
    with pytest.raises(InvalidMessage, match="aggregate"):
        release_average(r.holder, r.config,
                        replace(aggregate, sites=_AgreeingTuple((1, 2))), uploads, site_id=1)
    assert release_average(r.holder, r.config, aggregate, uploads, site_id=1).sites == (1, 2, 3)


def _refused_then_the_honest_counted(r: Any, evil: Any) -> Any:
    """``evil`` refused as InvalidMessage by the aggregator's role and the key holder's
    release, then every site's honest upload handled: the aggregator's role."""
    server = CkksServer(r.config, r.public)
    with pytest.raises(InvalidMessage):
        server.handle(evil)
    with pytest.raises(InvalidMessage):
        Release(r.holder, r.config, site_id=1).add(evil)
    for site in (1, 2, 3):
        server.handle(r.client(site).start())
    return server

def _raising(base: type) -> type:
    """A subclass of ``base`` (str or bytes) that raises from any comparison or len (a
    caller's object, not the wire's)."""

    def raises(self: object, *_: object) -> Any:
        raise ValueError("compared or measured")

    return type(f"_Raising{base.__name__.title()}", (base,), {
        "__eq__": raises, "__ne__": raises, "__hash__": base.__hash__, "__len__": raises})


_RaisingStr, _RaisingBytes = _raising(str), _raising(bytes)


@pytest.mark.parametrize("field", ["round_id", "key_id", "signature", "chunk"])
def test_an_upload_field_of_a_subclassed_type_is_an_invalid_message_and_the_round_goes_on(
        field: str) -> None:
    """An upload whose round id is a str subclass, or whose key id, signature or a chunk is
    a bytes subclass, is refused as the opaque InvalidMessage by the aggregator's server and
    by the key holder, before any comparison or len can raise something else from inside
    (a raw ValueError broke the round); the honest uploads are counted after it."""
    r = CkksRound(sites=3, vector_length=10)
    honest = r.client(3).start()
    if field == "chunk":
        evil = replace(honest, chunks=(_RaisingBytes(honest.chunks[0]), *honest.chunks[1:]))
    else:
        value = getattr(honest, field)
        lying: dict[str, Any] = {field: (_RaisingStr if field == "round_id"
                                         else _RaisingBytes)(value)}
        evil = replace(honest, **lying)
    server = _refused_then_the_honest_counted(r, evil)
    assert server.sites == (1, 2, 3)


# ---- range checks at the layout's edges, and sharded sums of unusual shapes -------------------


def test_an_element_just_past_sites_times_clip_in_the_last_element_is_refused() -> None:
    """As the test above, at the layout's last element (index vector_length - 1, just before
    the weight): the range check before flooding covers every element, not all but the last
    (the flooded check alone, clip * W plus the noise, would take clip + 1e-4 there)."""
    r = CkksRound(sites=3, vector_length=100)
    last = r.config.vector_length - 1
    for s in (1, 2):
        update = np.zeros(r.config.vector_length)
        update[last] = r.config.clip
        r.inputs[s] = (update, 1.0)
    row = np.zeros(r.config.preset_params.slots, dtype=np.complex128)
    row[last] = r.config.clip + 1e-4
    row[r.config.vector_length] = 1.0
    with pytest.raises(RefusedMessage, match="no honest round produces") as caught:
        _release_with(r, row)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE


def test_site_writing_into_the_first_padding_slot_alone_gets_no_release() -> None:
    """A value in the one slot just past the weight, every other padding slot zero: the
    padding check starts right after the weight, not a slot later."""
    r = CkksRound(sites=3, vector_length=100)
    row = _honest_looking_row(r)
    row[r.config.vector_length + 1] = 0.5
    with pytest.raises(RefusedMessage) as caught:
        _release_with(r, row)
    assert caught.value.reason is RefusalReason.OUT_OF_RANGE


def test_a_sharded_release_checks_a_weight_that_opens_its_shard() -> None:
    """vector_length = slots: the weight is the first slot of the second chunk, so the
    second worker shard's range starts at the weight (its offset into the layout is exactly
    vector_length). A site inflating its weight to 50 there must still be refused
    (OUT_OF_RANGE): the weight check covers offset 0 of a shard, not only later slots."""
    r = CkksRound(sites=3, vector_length=2048)  # 2 chunks: elements | weight, padding
    slots = r.config.preset_params.slots
    assert r.config.vector_length == slots and r.config.chunk_count == 2
    honest = [r.client(s).start() for s in (1, 2)]
    elements = np.full(slots, 0.25, dtype=np.complex128)
    weight = np.zeros(slots, dtype=np.complex128)
    weight[0] = 50.0
    evil = _signed(r, 3, (_encrypted_row(r, elements), _encrypted_row(r, weight)),
                   seeded=False)
    assert _sharded_refusal(r, (*honest, evil)) is RefusalReason.OUT_OF_RANGE


def test_a_sharded_release_refuses_an_aggregate_with_a_chunk_too_many() -> None:
    """The aggregate is the honest sum plus one more chunk: with the sum split over worker
    processes, each worker is handed its own range of the chunks, so a chunk past the last
    range was never looked at and the aggregate taken as the sum. Refused as a mismatch,
    before the round is spent; the honest aggregate is released after it."""
    r = CkksRound(sites=3, vector_length=3000)  # 2 chunks: one per worker
    uploads, aggregate = r.run()
    longer = replace(aggregate, chunks=(*aggregate.chunks, aggregate.chunks[-1]))
    release = Release(r.holder, r.config, site_id=1, workers=2)
    try:
        for u in uploads:
            release.add(u)
        with pytest.raises(RefusedMessage) as caught:
            release.finish(longer)
        assert caught.value.reason is RefusalReason.AGGREGATE_MISMATCH
        assert not r.holder.releases
        assert release.finish(aggregate).sites == (1, 2, 3)
    finally:
        release.close()


@pytest.mark.parametrize("chunk", ["truncated", "seeded", "empty"])
def test_an_aggregate_chunk_that_is_no_canonical_sum_is_a_mismatch(chunk: str) -> None:
    """An aggregate chunk that does not parse as a full canonical ciphertext (a sum is
    never seeded) is not the key holder's sum: AGGREGATE_MISMATCH, as documented, not the
    parser's InvalidMessage escaping the comparison; the round is not spent."""
    r = CkksRound(sites=3, vector_length=100)
    uploads, aggregate = r.run()
    first = aggregate.chunks[0]
    seeded = next(u for u in uploads if u.seeded).chunks[0]
    bad = {"truncated": first[:-1], "seeded": seeded, "empty": b""}[chunk]
    with pytest.raises(RefusedMessage) as caught:
        release_average(r.holder, r.config, replace(aggregate, chunks=(bad,)), uploads,
                        site_id=1)
    assert caught.value.reason is RefusalReason.AGGREGATE_MISMATCH
    assert not r.holder.releases


def test_a_release_with_more_workers_than_chunks_runs_as_many_as_there_are_chunks() -> None:
    """A key holder configured with more release workers than the round has chunks (a site
    with 4 workers, a 2-chunk model) releases exactly what the in-process release does:
    a worker with no chunk of its own is never started (its empty buffer could not be
    mapped)."""
    r = CkksRound(sites=3, vector_length=3000)  # 2 chunks
    uploads, aggregate = r.run()
    release = Release(r.holder, r.config, site_id=1, workers=4)
    try:
        for u in uploads:
            release.add(u)
        sharded = release.finish(aggregate)
    finally:
        release.close()
    single = release_average(KeyHolder.from_secret_context(r.holder.export_secret_context()),
                             r.config, aggregate, uploads, site_id=1)
    assert np.array_equal(sharded.average, single.average)
