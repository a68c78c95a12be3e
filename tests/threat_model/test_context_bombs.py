"""Adversary: a CKKS key holder (or an aggregator relaying for one) whose public context is
built to exhaust whoever parses it, or to make them encrypt under parameters it chose.

TenSEAL's own context format carries whatever the sender put in: Galois keys (a few hundred
KB of zstd-compressed zeros parse into gigabytes, on the aggregator's job thread and on every
site), relinearisation keys, a secret key, custom parameters, a NaN scale. So a public context
never travels in TenSEAL's format: on the wire it is a preset's name and the public key's
bit-packed coefficients, of one exact length per preset, and the TenSEAL context is rebuilt
from the named preset (:meth:`secagg.ckks.keys.PublicContext.load`). The property tested: for
any input, either TenSEAL is handed only bytes we wrote, holding the preset's parameters and
one public key, or the input is refused (:class:`InvalidMessage`) before TenSEAL sees it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tenseal import sealapi

from secagg.ckks import KeyHolder, PublicContext, _seal
from secagg.ckks.keys import CONTEXT_FORMAT_VERSION, MAX_CONTEXT_BYTES, public_context_length
from secagg.ckks.presets import PRESETS
from secagg.errors import InvalidMessage

PRESET = "add-only-4096"


@pytest.fixture(scope="module")
def holder() -> KeyHolder:
    return KeyHolder.generate(PRESET)


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Every byte string handed to TenSEAL's context parser during the test."""
    seen: list[bytes] = []
    real = ts.context_from

    def recording(data: bytes, *args: Any, **kwargs: Any) -> Any:
        seen.append(bytes(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(ts, "context_from", recording)
    yield seen


def _tenseal_public(holder: KeyHolder, *, galois: bool) -> bytes:
    context = holder._context.copy()
    context.make_context_public(generate_galois_keys=False, generate_relin_keys=False)
    if galois:
        # what the key holder controls: keys generated before making the context public
        context = holder._context.copy()
        context.generate_galois_keys()
        context.make_context_public(generate_galois_keys=False, generate_relin_keys=False)
    return bytes(context.serialize(save_public_key=True, save_secret_key=False,
                                   save_galois_keys=galois, save_relin_keys=False))


def _to_length(data: bytes, length: int) -> bytes:
    return data[:length] + bytes(max(0, length - len(data)))


def _with_coefficient(data: bytes, value: int) -> bytes:
    """Our format with the first coefficient (bits [0, 50) of the key) set to ``value``."""
    name = PRESET.encode()
    start = 2 + len(name)
    word = int.from_bytes(data[start:start + 8], "little")
    word = (word & ~((1 << 50) - 1)) | value
    return data[:start] + word.to_bytes(8, "little") + data[start + 8:]


def _first_prime(holder: KeyHolder) -> int:
    return int(holder.seal_context.key_context_data().parms().coeff_modulus()[0].value())


LIES: dict[str, Callable[[KeyHolder, bytes], bytes]] = {
    # TenSEAL's format, as sent before: with Galois keys (the memory bomb), at any length
    "tenseal-with-galois-keys": lambda h, ok: _tenseal_public(h, galois=True),
    "tenseal-with-galois-keys-at-the-exact-length": lambda h, ok: _to_length(
        _tenseal_public(h, galois=True), len(ok)),
    "tenseal-public-context": lambda h, ok: _tenseal_public(h, galois=False),
    "tenseal-secret-context": lambda h, ok: h.export_secret_context(),
    # our format, lying
    "another-version": lambda h, ok: bytes((CONTEXT_FORMAT_VERSION + 1,)) + ok[1:],
    "unknown-preset": lambda h, ok: ok[:2] + b"add-only-4097" + ok[2 + len(PRESET):],
    "name-longer-than-the-data": lambda h, ok: bytes((CONTEXT_FORMAT_VERSION, 255)) + ok[2:],
    "one-byte-short": lambda h, ok: ok[:-1],
    "one-byte-long": lambda h, ok: ok + b"\x00",
    "coefficient-equal-to-its-prime": lambda h, ok: _with_coefficient(ok, _first_prime(h)),
    "coefficient-at-its-width": lambda h, ok: _with_coefficient(ok, (1 << 50) - 1),
    "empty": lambda h, ok: b"",
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_context_not_in_our_exact_format_is_refused_before_tenseal_parses_it(
        holder: KeyHolder, parsed: list[bytes], lie: str) -> None:
    genuine = holder.public_context().serialize()
    data = LIES[lie](holder, genuine)
    with pytest.raises(InvalidMessage):
        PublicContext.load(data)
    with pytest.raises(InvalidMessage):
        PublicContext.load(data, preset=PRESET)
    assert parsed == [], "TenSEAL parsed a context the sender wrote"


def test_a_context_of_another_preset_is_refused_where_the_round_names_its_preset(
        parsed: list[bytes]) -> None:
    """A genuine context of another preset: the aggregator and the sites name the round's."""
    other = KeyHolder.generate("add-only-8192").public_context().serialize()
    assert PublicContext.load(other).preset.name == "add-only-8192"
    parsed.clear()
    with pytest.raises(InvalidMessage):
        PublicContext.load(other, preset=PRESET)
    assert parsed == []


def test_what_tenseal_parses_is_the_presets_parameters_and_one_public_key(
        holder: KeyHolder, parsed: list[bytes]) -> None:
    public = PublicContext.load(holder.public_context().serialize(), preset=PRESET)
    assert len(parsed) == 1
    context = public._context
    assert context.is_public() and not context.has_secret_key()
    assert not context.has_galois_keys() and not context.has_relin_keys()
    assert public.preset == PRESETS[PRESET] and context.global_scale == PRESETS[PRESET].scale
    assert public.key_id == holder.key_id
    # and it encrypts to the holder: a site that loaded it is a working site
    encoder = sealapi.CKKSEncoder(public.seal_context)
    plain = sealapi.Plaintext()
    encoder.encode([1.5, -2.25], public.preset.scale, plain)
    ct = sealapi.Ciphertext(public.seal_context)
    sealapi.Encryptor(public.seal_context, public.public_key).encrypt(plain, ct)
    out = sealapi.Plaintext()
    sealapi.Decryptor(holder.seal_context, holder.secret_key).decrypt(ct, out)
    values = encoder.decode_double(out)
    assert abs(values[0] - 1.5) < 1e-6 and abs(values[1] + 2.25) < 1e-6


def test_every_presets_context_has_its_exact_length_and_the_bound_covers_them() -> None:
    for name in PRESETS:
        data = KeyHolder.generate(name).public_context().serialize()
        assert len(data) == public_context_length(name) <= MAX_CONTEXT_BYTES
        # far below what TenSEAL's format with Galois keys parsed into (hundreds of MB)
        assert len(data) < 1 << 20


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.data_too_large])
@given(seed=st.binary(min_size=32, max_size=32), below=st.booleans())
def test_random_coefficients_in_the_format_load_as_a_key_or_are_refused(
        seed: bytes, below: bool) -> None:
    """Any bytes of the right header and length: a public key (of nobody's secret key: the
    key id, bound by the holder's signed announcement, refuses it in a round) or
    InvalidMessage, never another error or a context with anything else in it."""
    rng = np.random.default_rng(np.frombuffer(seed, dtype=np.uint64))
    context = PublicContext.load(KeyHolder.generate(PRESET).public_context().serialize())
    layout = _seal._KeyLayout(context.seal_context)
    values = rng.integers(0, np.iinfo(np.uint64).max, layout.values.shape[0],
                          dtype=np.uint64, endpoint=True)
    values %= (layout.values if below else np.uint64(1) << np.uint64(50))
    name = PRESET.encode()
    data = (bytes((CONTEXT_FORMAT_VERSION, len(name))) + name + layout.packer.pack(values))
    try:
        public = PublicContext.load(data, preset=PRESET)
    except InvalidMessage:
        assert not below
        return
    assert bool((values < layout.values).all())
    assert not public._context.has_galois_keys() and not public._context.has_secret_key()


def test_a_key_holder_offering_a_galois_key_context_is_refused_and_the_round_goes_on(
        tmp_path: Path) -> None:
    """End to end in the job: the offer is INVALID_ARGUMENT (its size is not the preset's
    context), nothing is parsed, and the genuine offer is still taken afterwards."""
    from aggregator.job import ServiceError
    from secagg import wire
    from secagg.v1 import service_pb2
    from tests.service_kit import ckks_key_offer
    from tests.threat_model.test_lying_payload_refs import _ckks_federation, _put, _round_one

    fed, config, roster, store = _ckks_federation(tmp_path)
    try:
        job, info = _round_one(config, roster, store)
        holder, announcement, data = ckks_key_offer(fed, config, info.round_id)
        offer = service_pb2.CkksKeyOffer(announcement=wire.announcement_to_proto(announcement))
        bomb = _tenseal_public(KeyHolder.generate(config.preset), galois=True)
        for lie in (bomb, _to_length(bomb, len(data))):
            offer.public_context.CopyFrom(wire.Blob((_put(store, lie, holder),),
                                                    len(lie)).to_proto())
            with pytest.raises(ServiceError) as caught:
                job.submit(holder, service_pb2.SubmitRequest(round_id=info.round_id,
                                                             ckks_key=offer))
            assert caught.value.code == "INVALID_ARGUMENT"
            assert job.active is not None and job.active.ckks_config is None
        offer.public_context.CopyFrom(wire.Blob((_put(store, data, holder),),
                                                len(data)).to_proto())
        job.submit(holder, service_pb2.SubmitRequest(round_id=info.round_id, ckks_key=offer))
        assert job.active.ckks_config is not None
    finally:
        store.close()


def test_a_malformed_tenseal_context_in_process_is_a_clear_error(holder: KeyHolder) -> None:
    """In process (a key holder's own context, a sealed secret context from another holder)
    TenSEAL contexts are still taken: a NaN, infinite, negative or zero scale (TenSEAL's
    setter refuses some; its parser takes them all) is InvalidMessage, not a ValueError from
    deep inside."""
    from secagg.ckks import keys

    parms, seal_context = keys._preset_parameters(PRESET)
    key = _seal.public_key_seal_bytes(
        seal_context, holder.public_context().serialize()[2 + len(PRESET):])
    for scale in (float("nan"), float("inf"), -1.0, 0.0):
        public = (keys._pb_bytes(1, key) + keys._varint(2 << 3) + keys._varint(7)
                  + keys._varint(3 << 3 | 1) + struct.pack("<d", scale))
        context = ts.context_from(keys._pb_bytes(1, parms) + keys._pb_bytes(2, public))
        with pytest.raises(InvalidMessage):
            PublicContext(context)
