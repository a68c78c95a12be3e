"""The canonical CKKS ciphertext format (secagg/ckks/_seal.py): one ciphertext, one encoding,
of a length fixed by (preset, kind), parsed strictly; every refusal is InvalidMessage."""

from __future__ import annotations

import struct
import zlib
from functools import cache
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tenseal import sealapi

from secagg.ckks import KeyHolder, PublicContext, _seal
from secagg.ckks._seal import Kind, dump_ciphertext, encoded_length, load_ciphertext
from secagg.errors import InvalidMessage
from tests.ckks_kit import CkksRound

PRESETS = ["add-only-4096", "add-only-8192", "nvflare-default"]
# (seeded, full) byte lengths: 2 + [64 +] polys * N * sum(data prime bits) / 8
EXACT_LENGTHS = {
    "add-only-4096": (2 + 64 + 4096 * 50 // 8, 2 + 2 * 4096 * 50 // 8),  # 25666, 51202
    "add-only-8192": (2 + 64 + 8192 * 60 // 8, 2 + 2 * 8192 * 60 // 8),  # 61506, 122882
    "nvflare-default": (2 + 64 + 8192 * 100 // 8, 2 + 2 * 8192 * 100 // 8),  # 102466, 204802
}
NTT_FLAG_OFFSET = 16 + 32  # SEAL header, parms_id


class Kit:
    """A key holder with the sealapi objects a test needs."""

    def __init__(self, preset: str) -> None:
        self.holder = KeyHolder.generate(preset)
        self.preset = self.holder.preset
        self.ctx = self.holder.seal_context
        self.scale = self.preset.scale
        self.encoder = sealapi.CKKSEncoder(self.ctx)
        self.decryptor = sealapi.Decryptor(self.ctx, self.holder.secret_key)
        self.symmetric = sealapi.Encryptor(self.ctx, self.holder.secret_key)
        self.public = sealapi.Encryptor(self.ctx, self.holder.public_key)

    def encrypt(self, x: np.ndarray, kind: Kind) -> Any:
        """A seeded Serializable<Ciphertext> or a full Ciphertext of ``x``."""
        plain = sealapi.Plaintext()
        self.encoder.encode(x, self.scale, plain)
        if kind is Kind.SEEDED:
            return self.symmetric.encrypt_symmetric(plain)
        ct = sealapi.Ciphertext(self.ctx)
        self.public.encrypt(plain, ct)
        return ct

    def decrypt(self, ct: Any) -> np.ndarray:
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ct, plain)
        return np.array(self.encoder.decode_double(plain))

    def load(self, data: Any, **kwargs: Any) -> Any:
        return load_ciphertext(self.ctx, data, scale=self.scale, **kwargs)

    def values(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).uniform(-1, 1, self.preset.slots)


@cache
def kit(preset: str = "add-only-4096") -> Kit:
    return Kit(preset)


@cache
def good(kind: Kind) -> bytes:
    """Our bytes of one ciphertext of kind ``kind`` at the default preset."""
    k = kit()
    return dump_ciphertext(k.encrypt(k.values(), kind), k.ctx, scale=k.scale)


def _with_coefficient(data: bytes, value: int, index: int = 0) -> bytes:
    """``data`` with packed coefficient ``index`` replaced (no range check on the way)."""
    spec = _seal._layout(kit().ctx).kinds[Kind(data[1])]
    start = len(data) - spec.packer.nbytes
    coefficients = spec.packer.unpack(data[start:]).copy()
    coefficients[index] = value
    return data[:start] + spec.packer.pack(coefficients)


# --- round trips and lengths ----------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name.lower())
@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_decrypts_to_the_encrypted_values_at_the_exact_length(
        preset: str, kind: Kind) -> None:
    k = kit(preset)
    x = k.values(1)
    data = dump_ciphertext(k.encrypt(x, kind), k.ctx, scale=k.scale)
    assert data[:2] == bytes((_seal.FORMAT_VERSION, kind))
    assert len(data) == encoded_length(k.ctx, kind) == EXACT_LENGTHS[preset][kind - 1]
    ct = k.load(data)
    assert (ct.size(), ct.is_ntt_form(), ct.scale) == (2, True, k.scale)
    assert ct.parms_id() == k.ctx.first_parms_id()
    assert float(np.max(np.abs(k.decrypt(ct) - x))) < 1e-6
    # a loaded ciphertext is a full one; its encoding is unique, so dumping it is stable
    full = dump_ciphertext(ct, k.ctx, scale=k.scale)
    assert full[1] == Kind.FULL and dump_ciphertext(k.load(full), k.ctx, scale=k.scale) == full
    if kind is Kind.FULL:
        assert full == data


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name.lower())
def test_rebuilt_seal_bytes_are_exactly_what_seal_saves(kind: Kind) -> None:
    """The reverse-engineered layout: our rebuild equals SEAL's own (decompressed) members."""
    k = kit()
    obj = k.encrypt(k.values(2), kind)
    data = dump_ciphertext(obj, k.ctx, scale=k.scale)
    layout = _seal._layout(k.ctx)
    spec = layout.kinds[kind]
    seed = data[2:2 + _seal.SEED_BYTES] if kind is Kind.SEEDED else b""
    coefficients = spec.packer.unpack(data[len(data) - spec.packer.nbytes:])
    rebuilt = _seal._rebuild(layout, kind, coefficients, seed, k.scale)
    assert rebuilt[16:] == _seal._uncompressed_members(obj)
    assert int.from_bytes(rebuilt[8:16], "little") == len(rebuilt) and rebuilt[5] == 0


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "public-key"])
def test_bytes_per_value_of_an_upload_at_the_default_preset(seeded: bool) -> None:
    # 10 full chunks: 20479 update values + the weight
    r = CkksRound(sites=3, vector_length=10 * 2048 - 1)
    client = r.client(1, seeded=seeded)
    upload = client.start()
    per_chunk = 2 + (64 + 4096 * 50 // 8 if seeded else 2 * 4096 * 50 // 8)
    assert [len(c) for c in upload.chunks] == [per_chunk] * 10
    per_value = upload.nbytes / (10 * 2048)
    expected = 12.5 + 66 / 2048 if seeded else 25.0 + 2 / 2048  # 12.532 / 25.001 B/value
    assert per_value == pytest.approx(expected, abs=1e-12)


def test_key_id_hashes_the_public_key_coefficients_not_the_zstd_bytes() -> None:
    holder = kit().holder
    public = PublicContext.load(holder.public_context().serialize())
    a = _seal.public_key_coefficients(holder.public_key, holder.seal_context)
    b = _seal.public_key_coefficients(public.public_key, public.seal_context)
    n, primes = 4096, 2  # the key level holds the special prime too
    assert a == b and len(a) == 2 * primes * n * 8
    assert public.key_id == holder.key_id


def test_dump_refuses_what_load_could_not_rebuild_exactly() -> None:
    k = kit("nvflare-default")
    ct = k.encrypt(k.values(), Kind.FULL)
    with pytest.raises(ValueError):
        dump_ciphertext(ct, k.ctx, scale=2.0 * k.scale)  # another scale
    sealapi.Evaluator(k.ctx).mod_switch_to_next_inplace(ct)
    with pytest.raises(ValueError):
        dump_ciphertext(ct, k.ctx, scale=k.scale)  # below the first data level


# --- bit packing ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(20, 60), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_bit_packing_is_the_documented_little_endian_layout(widths: list[int],
                                                            seed: int) -> None:
    n = 64  # a whole number of words for any width
    all_widths = np.repeat(np.array(widths, dtype=np.uint64), n)
    rng = np.random.default_rng(seed)
    values = np.array([int(rng.integers(0, 2**int(b), dtype=np.uint64)) for b in all_widths],
                      dtype=np.uint64)
    packer = _seal._BitPacker(all_widths)
    packed = packer.pack(values)
    reference, offset = 0, 0
    for v, b in zip(values.tolist(), all_widths.tolist(), strict=True):
        reference |= v << offset
        offset += b
    assert packed == reference.to_bytes(offset // 8, "little")
    assert np.array_equal(packer.unpack(packed), values)


# --- refusals -------------------------------------------------------------------------------


def test_ciphertext_not_in_ntt_form_is_refused_before_anything_is_added() -> None:
    """The attack: SEAL loads a ciphertext flagged "not in NTT form" and adding it throws. Our
    format has no such flag (load always rebuilds NTT form); the rebuilt bytes with the flag
    cleared still load in SEAL, and our post-load check refuses them."""
    k = kit()
    data = good(Kind.FULL)
    layout = _seal._layout(k.ctx)
    spec = layout.kinds[Kind.FULL]
    coefficients = spec.packer.unpack(data[2:])
    seal_bytes = bytearray(_seal._rebuild(layout, Kind.FULL, coefficients, b"", k.scale))
    assert seal_bytes[NTT_FLAG_OFFSET] == 1
    seal_bytes[NTT_FLAG_OFFSET] = 0
    raw = sealapi.Ciphertext(k.ctx)
    _seal._load_into(raw, k.ctx, bytes(seal_bytes))  # SEAL itself accepts it ...
    assert not raw.is_ntt_form()
    acc = k.load(good(Kind.FULL))
    with pytest.raises(ValueError, match="NTT form mismatch"):  # ... and adding it throws
        sealapi.Evaluator(k.ctx).add_inplace(acc, raw)
    with pytest.raises(InvalidMessage):  # our loader refuses it after SEAL's load
        _seal._load_seal_bytes(k.ctx, layout, bytes(seal_bytes), k.scale)
    with pytest.raises(InvalidMessage):  # and SEAL's format is never ours
        k.load(bytes(seal_bytes))
    assert k.load(data).is_ntt_form()


def _seal_encodings(kind: Kind) -> dict[str, bytes]:
    """The same ciphertext as SEAL would take it: zstd (as saved), uncompressed, zlib."""
    k = kit()
    data = good(kind)
    ct = k.load(data)  # a seeded one comes back full; fine, SEAL's save of it
    zstd = _seal.save_bytes(ct)
    members = _seal._uncompressed_members(ct)
    header = bytearray(zstd[:16])
    none = bytes(header[:5]) + b"\x00" + bytes(header[6:8]) + struct.pack(
        "<Q", 16 + len(members)) + members
    deflated = zlib.compress(members)
    zl = bytes(header[:5]) + b"\x01" + bytes(header[6:8]) + struct.pack(
        "<Q", 16 + len(deflated)) + deflated
    return {"seal-zstd": zstd, "seal-uncompressed": none, "seal-zlib": zl}


@pytest.mark.parametrize("encoding", ["seal-zstd", "seal-uncompressed", "seal-zlib"])
def test_seal_format_bytes_where_ours_are_expected_are_refused(encoding: str) -> None:
    k = kit()
    seal_bytes = _seal_encodings(Kind.FULL)[encoding]
    # SEAL would load every one of these encodings of one ciphertext ...
    raw = sealapi.Ciphertext(k.ctx)
    _seal._load_into(raw, k.ctx, seal_bytes)
    assert dump_ciphertext(raw, k.ctx, scale=k.scale) == good(Kind.FULL)
    # ... we take exactly one
    with pytest.raises(InvalidMessage):
        k.load(seal_bytes)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name.lower())
@pytest.mark.parametrize("change", ["one-byte-short", "one-byte-long", "50MB-trailing-junk",
                                    "empty", "prefix-only"])
def test_any_other_length_is_refused(kind: Kind, change: str) -> None:
    data = good(kind)
    bad = {
        "one-byte-short": data[:-1],
        "one-byte-long": data + b"\x00",
        "50MB-trailing-junk": data + bytes(50 * 2**20),
        "empty": b"",
        "prefix-only": data[:2],
    }[change]
    with pytest.raises(InvalidMessage):
        kit().load(bad)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name.lower())
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("value", ["prime", "prime+1", "all-ones"])
def test_coefficient_equal_to_or_above_its_prime_is_refused(kind: Kind, where: str,
                                                            value: str) -> None:
    layout = _seal._layout(kit().ctx)
    q, bits = layout.primes[0], layout.bits[0]
    v = {"prime": q, "prime+1": q + 1, "all-ones": 2**bits - 1}[value]
    index = 0 if where == "first" else -1
    with pytest.raises(InvalidMessage):
        kit().load(_with_coefficient(good(kind), v, index))
    assert kit().load(_with_coefficient(good(kind), q - 1, index)).size() == 2  # q-1 is fine


@pytest.mark.parametrize("prefix", [(0, 1), (2, 1), (255, 1), (1, 0), (1, 3), (1, 255)])
def test_wrong_version_or_unknown_kind_is_refused(prefix: tuple[int, int]) -> None:
    for kind in Kind:
        with pytest.raises(InvalidMessage):
            kit().load(bytes(prefix) + good(kind)[2:])


def test_kind_the_caller_does_not_accept_is_refused() -> None:
    with pytest.raises(InvalidMessage):
        kit().load(good(Kind.SEEDED), kinds=(Kind.FULL,))
    with pytest.raises(InvalidMessage):
        kit().load(good(Kind.FULL), kinds=(Kind.SEEDED,))
    # a seeded body relabelled as full (or back) has the other kind's length
    with pytest.raises(InvalidMessage):
        kit().load(bytes((1, Kind.FULL)) + good(Kind.SEEDED)[2:])
    with pytest.raises(InvalidMessage):
        kit().load(bytes((1, Kind.SEEDED)) + good(Kind.FULL)[2:])


NON_BYTES = {
    "none": lambda d: None,
    "int": lambda d: 7,
    "str": lambda d: d.decode("latin-1"),
    "list": list,
    "bytearray": bytearray,
    "memoryview": memoryview,
    "numpy": lambda d: np.frombuffer(d, dtype=np.uint8),
}


@pytest.mark.parametrize("form", sorted(NON_BYTES))
def test_non_bytes_input_is_refused(form: str) -> None:
    with pytest.raises(InvalidMessage):
        kit().load(NON_BYTES[form](good(Kind.FULL)))


def test_wrong_context_or_scale_is_refused_opaquely() -> None:
    data = good(Kind.FULL)
    for context in (None, "context", kit("add-only-8192").ctx):
        with pytest.raises(InvalidMessage):
            load_ciphertext(context, data, scale=kit().scale)
    for scale in (float("nan"), "scale"):
        with pytest.raises(InvalidMessage):
            load_ciphertext(kit().ctx, data, scale=scale)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([1, 1, 1, 0, 2]), kind=st.sampled_from([1, 2, 1, 2, 0, 3]),
       length_kind=st.sampled_from(list(Kind)), seed=st.integers(0, 2**64 - 1),
       fill=st.sampled_from(["random", "random", "ones", "zeros", "high-bits"]))
def test_random_bytes_of_the_right_length_never_crash_and_load_only_as_valid_ciphertexts(
        version: int, kind: int, length_kind: Kind, seed: int, fill: str) -> None:
    k = kit()
    size = encoded_length(k.ctx, length_kind) - 2
    rng = np.random.default_rng(seed)
    body = {
        "random": rng.bytes(size),
        "ones": b"\xff" * size,
        "zeros": bytes(size),
        "high-bits": (rng.integers(0, 256, size, dtype=np.uint8) | 0xF0).tobytes(),
    }[fill]
    try:
        ct = k.load(bytes((version, kind)) + body)
    except InvalidMessage:
        event("refused")
        return
    event("loaded")
    assert (version, kind) == (1, length_kind)
    assert (ct.size(), ct.is_ntt_form(), ct.scale) == (2, True, k.scale)
    assert ct.parms_id() == k.ctx.first_parms_id()
    acc = k.load(good(Kind.FULL))
    sealapi.Evaluator(k.ctx).add_inplace(acc, ct)  # adds without throwing


def test_a_zero_body_of_each_kind_loads_and_no_other_header_does() -> None:
    """The property above checks what loads only when a random draw happens to load; here,
    deterministically: a header of the format's version and the length's own kind with an
    all-zero body (every coefficient 0, below every modulus) loads as a ciphertext of the
    round's parameters, and the same body under any other version or kind is refused."""
    k = kit()
    for kind in Kind:
        size = encoded_length(k.ctx, kind) - 2
        ct = k.load(bytes((1, kind)) + bytes(size))
        assert (ct.size(), ct.is_ntt_form(), ct.scale) == (2, True, k.scale)
        for header in ((0, kind), (2, kind), (1, 0), (1, 3), (1, 3 - kind)):
            with pytest.raises(InvalidMessage):
                k.load(bytes(header) + bytes(size))


# --- reading SEAL's own output: only the layout we know -------------------------------------


class _Saved:
    """Stands in for a SEAL object: its ``save(path)`` writes the given bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.data)


def _seal_object(members: bytes, *, compr: int = 0, magic: int = 0xA15E,
                 size: int | None = None) -> _Saved:
    major, minor = _seal._version()
    total = 16 + len(members) if size is None else size
    return _Saved(struct.pack("<HBBBBHQ", magic, 16, major, minor, compr, 0, total) + members)


def _zstd_frame(payload: bytes, *, content_size: int | None) -> bytes:
    """One zstd frame holding ``payload`` as a raw block: with a 4-byte content size field,
    or (None) with none, so that its content size is unknown."""
    if content_size is None:
        header = bytes((0x00, 0x00))  # no content size, not single-segment; window 1 KB
    else:
        header = bytes((0xA0,)) + struct.pack("<I", content_size)  # 4-byte size, single segment
    block = ((len(payload) << 3) | 1).to_bytes(3, "little")  # last block, raw
    return b"\x28\xb5\x2f\xfd" + header + block + payload


def test_what_seal_saved_is_read_only_in_the_layout_and_compressions_we_know() -> None:
    """The key id and every dumped ciphertext are derived from SEAL's serialisation: a
    header that is not SEAL's (magic, size), a compression that does not decompress, or a
    zstd frame that names no content size (or the wrong one) is a ValueError, not members
    read from bytes that are something else."""
    members = _seal._uncompressed_members(kit().load(good(Kind.FULL)))
    assert _seal._uncompressed_members(_seal_object(members)) == members
    assert _seal._uncompressed_members(_seal_object(zlib.compress(members), compr=1)) == members
    assert _seal._uncompressed_members(
        _seal_object(_zstd_frame(members[:1000], content_size=1000), compr=2)) == members[:1000]
    bad = {
        "magic": _seal_object(members, magic=0xA15F),
        "size": _seal_object(members, size=17 + len(members)),
        "short": _Saved(b"\x5e\xa1\x10"),
        "compression-mode": _seal_object(members, compr=3),
        "zlib-corrupt": _seal_object(zlib.compress(members)[:-4], compr=1),
        "zstd-not-a-frame": _seal_object(members, compr=2),
        "zstd-unknown-size": _seal_object(_zstd_frame(members[:1000], content_size=None),
                                          compr=2),
        "zstd-size-too-large": _seal_object(_zstd_frame(members[:1000], content_size=1 << 27),
                                            compr=2),
        "zstd-short-of-its-size": _seal_object(_zstd_frame(members[:1000], content_size=1001),
                                               compr=2),
    }
    for name, obj in bad.items():
        with pytest.raises(ValueError):
            _seal._uncompressed_members(obj)
            pytest.fail(name)


def test_seal_ciphertext_members_are_parsed_strictly() -> None:
    """SEAL's ``Ciphertext`` members (after the header) parse only in the layout the module
    docstring gives: another DynArray header, bytes after the array that are not exactly one
    Blake2xb PRNG info, or another PRNG type are a ValueError."""
    k = kit()
    full = _seal._uncompressed_members(k.encrypt(k.values(), Kind.FULL))
    seeded = _seal._uncompressed_members(k.encrypt(k.values(), Kind.SEEDED))
    assert _seal._parse_members(full).seed is None
    assert len(_seal._parse_members(seeded).seed or b"") == _seal.SEED_BYTES
    array_at = _seal._PREAMBLE.size
    info_at = len(seeded) - _seal._PRNG_INFO_BYTES

    def changed(raw: bytes, at: int, value: bytes) -> bytes:
        return raw[:at] + value + raw[at + len(value):]

    bad = {
        "array-magic": changed(full, array_at, b"\x5f\xa1"),
        "array-compressed": changed(full, array_at + 5, b"\x02"),
        "array-reserved": changed(full, array_at + 6, b"\x01"),
        "full-then-junk": full + bytes(_seal._PRNG_INFO_BYTES),
        "seeded-then-junk": seeded + b"junk",
        "seeded-cut": seeded[:-1],
        "prng-magic": changed(seeded, info_at, b"\x5f\xa1"),
        "prng-type": changed(seeded, info_at + 16, b"\x02"),
        "prng-size": changed(seeded, info_at + 8,
                             struct.pack("<Q", _seal._PRNG_INFO_BYTES + 4)),
        "truncated": full[:20],
    }
    for name, raw in bad.items():
        with pytest.raises(ValueError):
            _seal._parse_members(raw)
            pytest.fail(name)
