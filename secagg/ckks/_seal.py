"""Our canonical wire format for CKKS ciphertexts, and in-memory SEAL (de)serialisation.

Why our own format: SEAL's ``load`` accepts one ciphertext under many encodings (uncompressed,
zlib, zstd at any level, bytes past the header's size) and metadata we never want (a
ciphertext flagged "not in NTT form" loads, then makes ``Evaluator.add_inplace`` throw). And
SEAL's zstd output depends on the zstd build, so re-serialising and comparing is no check.
Here one ciphertext has exactly one encoding, of a length fixed by (context, kind)::

    offset 0    1 byte   FORMAT_VERSION (1)
    offset 1    1 byte   kind: Kind.SEEDED (1) or Kind.FULL (2)
    SEEDED:     64 bytes the Blake2xb PRNG seed SEAL expands into the second polynomial,
                then the first polynomial
    FULL:       the first, then the second polynomial
    polynomial  for each data prime q_i of the first data level, in the context's order:
                the N coefficients (NTT form, each < q_i), bit-packed little-endian at exactly
                q_i.bit_count() bits each (value j holds bits [j*b, (j+1)*b) of the row; rows
                are whole bytes, no padding bits)

Nothing else travels: parms_id (first data level), NTT form, size 2, N, the scale and the
correction factor (1) are implied by the round's context and preset and rebuilt on load.
:func:`load_ciphertext` checks the exact length, version and kind, every coefficient against
its prime, then rebuilds SEAL's uncompressed bytes, has SEAL load them (SEAL expands the seed
and re-validates), and checks the result again. Every failure is the opaque
:class:`~secagg.errors.InvalidMessage`.

``sealapi`` (TenSEAL 0.3.18) saves only through ``save(path)``, always with SEAL's default
compression (zstd in the wheels), and gives no access to the seed of a seeded ciphertext. So
:func:`dump_ciphertext` lets SEAL save, then *decompresses* (decompression, unlike
compression, gives the same bytes whatever the zstd build: SEAL's uncompressed layout) with
the zstd that the ``sealapi`` extension itself exports, and parses that layout strictly.
Paths: we give ``sealapi`` the path of an anonymous in-memory file (``memfd_create``), so
nothing touches a disk.

SEAL's uncompressed layout (SEAL 4.x, as reverse-engineered and checked in
tests/unit/test_ckks_wire.py): a 16-byte header (magic 0xA15E, header size 16, version major,
minor, compression mode, 2 reserved zero bytes, total size uint64), then ``Ciphertext``'s
members: parms_id (4 x uint64), is_ntt_form (1 byte), size, poly_modulus_degree,
coeff_modulus_size (uint64 each), scale (double), correction_factor (uint64), then the
coefficients as a nested ``DynArray`` (its own 16-byte header, uint64 count, the uint64
values). A seeded ciphertext's ``DynArray`` holds only the first polynomial and is followed by
a ``UniformRandomGeneratorInfo`` (its own 16-byte header, PRNG type 1 byte, seed 64 bytes).
"""

from __future__ import annotations

import ctypes
import enum
import importlib
import math
import os
import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
from tenseal import sealapi

from secagg.errors import InvalidMessage

FORMAT_VERSION = 1
SEED_BYTES = 64


class Kind(enum.IntEnum):
    """What the bytes after the 2-byte prefix hold."""

    SEEDED = 1  # PRNG seed + first polynomial (symmetric encryption: Serializable<Ciphertext>)
    FULL = 2  # both polynomials (public-key encryption, sums)


ANY_KIND: frozenset[Kind] = frozenset(Kind)

# --- SEAL's own serialisation -------------------------------------------------------------

_SEAL_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr mode, reserved, size
_PREAMBLE = struct.Struct("<4QBQQQdQ")  # parms_id, ntt, size, N, coeff_mod size, scale, cf
_COUNT = struct.Struct("<Q")
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
_PRNG_BLAKE2XB = 1  # SEAL's default PRNG (prng_type::blake2xb)
_PRNG_INFO_BYTES = _HEADER.size + 1 + SEED_BYTES
_MAX_UNCOMPRESSED = 1 << 26  # far above any preset's object (a public key at N=32768 is ~8 MB)


def save_bytes(obj: Any) -> bytes:
    """SEAL's serialisation of ``obj`` (anything with ``save(path)``), as SEAL compresses it."""
    fd = os.memfd_create("secagg-seal", os.MFD_CLOEXEC)
    try:
        obj.save(f"/proc/self/fd/{fd}")
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def _load_into(obj: Any, context: Any, data: bytes) -> None:
    fd = os.memfd_create("secagg-seal", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        obj.load(context, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class _Zstd:
    """ZSTD_decompress from the zstd statically linked into (and exported by) ``sealapi``."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(importlib.import_module("_sealapi_cpp").__file__)
        self._decompress = lib.ZSTD_decompress
        self._decompress.restype = ctypes.c_size_t
        self._decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                                     ctypes.c_size_t]
        self._is_error = lib.ZSTD_isError
        self._is_error.restype = ctypes.c_uint
        self._is_error.argtypes = [ctypes.c_size_t]
        self._content_size = lib.ZSTD_getFrameContentSize
        self._content_size.restype = ctypes.c_ulonglong
        self._content_size.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

    def decompress(self, data: bytes) -> bytes:
        size = self._content_size(data, len(data))
        if size > _MAX_UNCOMPRESSED:  # also ZSTD_CONTENTSIZE_UNKNOWN / _ERROR (2^64 - 1, - 2)
            raise ValueError("zstd frame without a usable content size")
        out = bytearray(size)
        got = self._decompress((ctypes.c_char * size).from_buffer(out), size, data, len(data))
        if self._is_error(got) or got != size:
            raise ValueError("zstd decompression failed")
        return bytes(out)


_zstd: _Zstd | None = None


def _uncompressed_members(obj: Any) -> bytes:
    """The members SEAL saved for ``obj``, uncompressed (whatever compression SEAL used)."""
    global _zstd
    data = save_bytes(obj)
    if len(data) < _HEADER.size:
        raise ValueError("SEAL output shorter than its header")
    magic, header_size, _, _, compr, reserved, size = _HEADER.unpack_from(data)
    if (magic, header_size, reserved, size) != (_SEAL_MAGIC, _HEADER.size, 0, len(data)):
        raise ValueError("unexpected SEAL header")
    body = data[_HEADER.size:]
    if compr == _COMPR_NONE:
        return body
    if compr == _COMPR_ZLIB:
        try:
            return zlib.decompress(body)
        except zlib.error:
            raise ValueError("zlib decompression failed") from None
    if compr == _COMPR_ZSTD:
        if _zstd is None:
            _zstd = _Zstd()
        return _zstd.decompress(body)
    raise ValueError(f"unknown SEAL compression mode {compr}")


_seal_version: tuple[int, int] | None = None


def _version() -> tuple[int, int]:
    """(major, minor) of the linked SEAL, as it writes them into its headers."""
    global _seal_version
    if _seal_version is None:
        _, _, major, minor, _, _, _ = _HEADER.unpack_from(save_bytes(sealapi.Plaintext()))
        _seal_version = (major, minor)
    return _seal_version


def _header(size: int) -> bytes:
    return _HEADER.pack(_SEAL_MAGIC, _HEADER.size, *_version(), _COMPR_NONE, 0, size)


@dataclass(frozen=True)
class _Members:
    """A SEAL ciphertext's saved members (uncompressed)."""

    parms_id: tuple[int, ...]
    ntt_form: int
    size: int
    poly_modulus_degree: int
    coeff_modulus_size: int
    scale: float
    correction_factor: int
    coefficients: np.ndarray  # uint64, SEAL's order: polynomial, then prime, then coefficient
    seed: bytes | None  # seeded: the PRNG seed of the second polynomial


def _parse_members(raw: bytes) -> _Members:
    """Strictly parse SEAL's uncompressed ``Ciphertext`` members (see the module docstring)."""
    try:
        return _parse_members_unchecked(raw)
    except struct.error:
        raise ValueError("SEAL ciphertext members are truncated") from None


def _parse_members_unchecked(raw: bytes) -> _Members:
    *parms_id, ntt, size, n, k, scale, cf = _PREAMBLE.unpack_from(raw)
    pos = _PREAMBLE.size
    magic, header_size, _, _, compr, reserved, array_bytes = _HEADER.unpack_from(raw, pos)
    (count,) = _COUNT.unpack_from(raw, pos + _HEADER.size)
    if ((magic, header_size, compr, reserved) != (_SEAL_MAGIC, _HEADER.size, _COMPR_NONE, 0)
            or array_bytes != _HEADER.size + _COUNT.size + 8 * count):
        raise ValueError("unexpected SEAL DynArray header")
    start = pos + _HEADER.size + _COUNT.size
    end = pos + array_bytes
    if end > len(raw):
        raise ValueError("SEAL DynArray runs past the end")
    coefficients = np.frombuffer(raw, dtype="<u8", count=count, offset=start)
    seed = None
    if end != len(raw):
        if len(raw) - end != _PRNG_INFO_BYTES:
            raise ValueError("unexpected bytes after the SEAL DynArray")
        magic, header_size, _, _, compr, reserved, info_bytes = _HEADER.unpack_from(raw, end)
        if ((magic, header_size, compr, reserved, info_bytes)
                != (_SEAL_MAGIC, _HEADER.size, _COMPR_NONE, 0, _PRNG_INFO_BYTES)
                or raw[end + _HEADER.size] != _PRNG_BLAKE2XB):
            raise ValueError("unexpected SEAL PRNG info")
        seed = raw[end + _HEADER.size + 1:]
    return _Members(tuple(parms_id), ntt, size, n, k, scale, cf, coefficients, seed)


def canonical_members(obj: Any) -> bytes:
    """SEAL's uncompressed serialisation of ``obj``'s members: the same bytes whatever SEAL's
    compression or zstd build (for deriving values from keys)."""
    return _uncompressed_members(obj)


def public_key_coefficients(public_key: Any, context: Any) -> bytes:
    """The public key's coefficients (uint64 little-endian, SEAL's order): a canonical form
    that does not depend on SEAL's compression or on the zstd build (for the key id)."""
    m = _parse_members(_uncompressed_members(public_key))
    parms = context.key_context_data().parms()
    n, k = parms.poly_modulus_degree(), len(parms.coeff_modulus())
    if (m.parms_id != tuple(context.key_parms_id()) or m.size != 2 or m.seed is not None
            or (m.poly_modulus_degree, m.coeff_modulus_size) != (n, k)
            or m.coefficients.shape[0] != 2 * n * k):
        raise ValueError("not a public key of this context")
    return m.coefficients.tobytes()


class _KeyLayout:
    """What a context implies about its public key: two polynomials at the key level (every
    prime, the special one included), NTT form, scale 1, bit-packed like a ciphertext."""

    def __init__(self, context: Any) -> None:
        parms = context.key_context_data().parms()
        if parms.scheme().name != "CKKS":
            raise ValueError("not a CKKS context")
        moduli = parms.coeff_modulus()
        self.parms_id = tuple(context.key_parms_id())
        self.n = parms.poly_modulus_degree()
        self.primes = tuple(m.value() for m in moduli)
        bits = tuple(m.bit_count() for m in moduli)
        self.values = np.tile(np.repeat(np.array(self.primes, dtype=np.uint64), self.n), 2)
        self.packer = _BitPacker(np.tile(np.repeat(np.array(bits, dtype=np.uint64), self.n), 2))
        self.length = self.packer.nbytes


def public_key_length(context: Any) -> int:
    """The exact byte length of :func:`dump_public_key`'s output under ``context``."""
    return _KeyLayout(context).length


def dump_public_key(public_key: Any, context: Any) -> bytes:
    """The public key's coefficients, bit-packed (see :func:`public_key_seal_bytes`)."""
    layout = _KeyLayout(context)
    coefficients = np.frombuffer(public_key_coefficients(public_key, context), dtype="<u8")
    if bool((coefficients >= layout.values).any()):
        raise ValueError("public key coefficient above its prime")
    return layout.packer.pack(coefficients)


def public_key_seal_bytes(context: Any, data: bytes | memoryview) -> bytes:
    """SEAL's uncompressed bytes of the public key our packed ``data`` describes, or
    :class:`InvalidMessage`: only the exact length and coefficients below their primes pass,
    and nothing but one size-2 key-level ciphertext can come out (no compression, no other
    parameters, nothing for SEAL's parser to size from the input)."""
    layout = _KeyLayout(context)
    if len(data) != layout.length:
        raise InvalidMessage("public key")
    coefficients = layout.packer.unpack(data)
    # defence: ckks.seal.public-key-coefficients-below-primes
    if bool((coefficients >= layout.values).any()):
        raise InvalidMessage("public key")
    return _rebuild(layout, Kind.FULL, coefficients, b"", 1.0)


# --- bit packing --------------------------------------------------------------------------


class _BitPacker:
    """Packs a fixed sequence of values of fixed widths (<= 60 bits) into a little-endian bit
    string: value j occupies bits [o_j, o_j + b_j), o_j = b_0 + ... + b_{j-1}. Vectorised: a
    value spans at most two 64-bit words, and values c = ceil(64 / min width) apart never share
    a word, so each residue class mod c is one scatter with unique indices."""

    def __init__(self, widths: np.ndarray) -> None:
        widths = widths.astype(np.uint64)
        total = int(widths.sum())
        if total % 64 or int(widths.max()) > 60 or int(widths.min()) < 1:
            raise ValueError("widths must be in [1, 60] and fill whole 64-bit words")
        offsets = np.concatenate(([0], np.cumsum(widths)[:-1])).astype(np.uint64)
        self.nbytes = total // 8
        self._words = total // 64
        self._w = (offsets >> np.uint64(6)).astype(np.intp)
        self._w1 = self._w + 1
        self._s = offsets & np.uint64(63)
        self._s_hi = np.uint64(63) - self._s
        self._mask = (np.uint64(1) << widths) - np.uint64(1)
        step = math.ceil(64 / int(widths.min()))
        self._classes = [slice(r, None, step) for r in range(step)]

    def pack(self, values: np.ndarray) -> bytes:
        one = np.uint64(1)
        lo = values << self._s
        hi = (values >> one) >> self._s_hi  # the bits past the first word; 0 if none
        words = np.zeros(self._words + 1, dtype="<u8")
        for c in self._classes:
            words[self._w[c]] |= lo[c]
        for c in self._classes:
            words[self._w1[c]] |= hi[c]
        return words[:-1].tobytes()

    def unpack(self, data: bytes | memoryview) -> np.ndarray:
        one = np.uint64(1)
        words = np.zeros(self._words + 1, dtype="<u8")
        words[:-1] = np.frombuffer(data, dtype="<u8")
        lo = words[self._w] >> self._s
        hi = (words[self._w1] << one) << self._s_hi
        values: np.ndarray = (lo | hi) & self._mask
        return values


@dataclass(frozen=True)
class _KindLayout:
    polys: int  # polynomials sent in full
    length: int  # exact byte length of our encoding
    primes: np.ndarray  # the prime of each packed value (uint64)
    packer: _BitPacker


class _Layout:
    """Everything the round's context implies about a ciphertext at its first data level."""

    def __init__(self, context: Any) -> None:
        data = context.first_context_data()
        parms = data.parms()
        if parms.scheme().name != "CKKS":
            raise ValueError("not a CKKS context")
        moduli = parms.coeff_modulus()
        self.parms_id = tuple(context.first_parms_id())
        self.n = parms.poly_modulus_degree()
        self.primes = tuple(m.value() for m in moduli)
        self.bits = tuple(m.bit_count() for m in moduli)
        self.kinds: dict[Kind, _KindLayout] = {}
        for kind, polys in ((Kind.SEEDED, 1), (Kind.FULL, 2)):
            primes = np.tile(np.repeat(np.array(self.primes, dtype=np.uint64), self.n), polys)
            widths = np.tile(np.repeat(np.array(self.bits, dtype=np.uint64), self.n), polys)
            packer = _BitPacker(widths)
            seed = SEED_BYTES if kind is Kind.SEEDED else 0
            self.kinds[kind] = _KindLayout(polys, 2 + seed + packer.nbytes, primes, packer)

    def length(self, kind: Kind) -> int:
        return self.kinds[kind].length


_layouts: dict[tuple[int, ...], _Layout] = {}


def _layout(context: Any) -> _Layout:
    # parms_id is SEAL's hash of the encryption parameters (N, primes, scheme): a safe key.
    key = tuple(context.first_parms_id())
    layout = _layouts.get(key)
    if layout is None:
        if len(_layouts) > 16:
            _layouts.clear()
        layout = _layouts[key] = _Layout(context)
    return layout


def encoded_length(context: Any, kind: Kind) -> int:
    """The exact byte length of a ciphertext of ``kind`` under ``context``."""
    return _layout(context).length(kind)


# --- our format ---------------------------------------------------------------------------


def dump_ciphertext(ciphertext: Any, context: Any, *, scale: float) -> bytes:
    """Our canonical bytes for a SEAL ``Ciphertext`` (kind FULL) or the
    ``Serializable<Ciphertext>`` of ``Encryptor.encrypt_symmetric`` (kind SEEDED).

    Raises ``ValueError`` for anything :func:`load_ciphertext` would not rebuild exactly: not
    size 2, not in NTT form, not at the context's first data level, another scale.
    """
    layout = _layout(context)
    m = _parse_members(_uncompressed_members(ciphertext))
    kind = Kind.FULL if m.seed is None else Kind.SEEDED
    spec = layout.kinds[kind]
    if (m.parms_id != layout.parms_id or m.ntt_form != 1 or m.size != 2
            or m.poly_modulus_degree != layout.n or m.coeff_modulus_size != len(layout.primes)
            # defence: ckks.seal.dump-at-the-given-scale
            or m.scale != scale or m.correction_factor != 1
            or m.coefficients.shape != spec.primes.shape
            or bool((m.coefficients >= spec.primes).any())):
        raise ValueError("ciphertext is not a size-2, NTT-form ciphertext at the context's "
                         "first data level and the given scale")
    prefix = bytes((FORMAT_VERSION, kind)) + (m.seed or b"")
    return prefix + spec.packer.pack(m.coefficients)


def _rebuild(layout: _Layout | _KeyLayout, kind: Kind, coefficients: np.ndarray, seed: bytes,
             scale: float) -> bytes:
    """SEAL's uncompressed serialisation of the ciphertext our fields describe (a public key
    is saved as its ciphertext: at the key level, scale 1)."""
    array_bytes = _HEADER.size + _COUNT.size + 8 * coefficients.shape[0]
    info_bytes = _PRNG_INFO_BYTES if kind is Kind.SEEDED else 0
    total = _HEADER.size + _PREAMBLE.size + array_bytes + info_bytes
    parts = [
        _header(total),
        _PREAMBLE.pack(*layout.parms_id, 1, 2, layout.n, len(layout.primes), scale, 1),
        _header(array_bytes),
        _COUNT.pack(coefficients.shape[0]),
        coefficients.astype("<u8", copy=False).tobytes(),
    ]
    if kind is Kind.SEEDED:
        parts += [_header(_PRNG_INFO_BYTES), bytes((_PRNG_BLAKE2XB,)), seed]
    return b"".join(parts)


def _load_seal_bytes(context: Any, layout: _Layout, data: bytes, scale: float) -> Any:
    """Have SEAL load ``data`` (its own format), then check what came out."""
    ct = sealapi.Ciphertext(context)
    try:
        _load_into(ct, context, data)
    except Exception:  # sealapi raises bare C++ errors (RuntimeError, ValueError, ...)
        raise InvalidMessage("ciphertext") from None
    # defence: ckks.seal.loaded-ntt-form-rechecked
    if (ct.size() != 2 or not ct.is_ntt_form() or tuple(ct.parms_id()) != layout.parms_id
            # defence: ckks.seal.loaded-scale-rechecked
            or ct.scale != scale or ct.poly_modulus_degree() != layout.n
            or ct.coeff_modulus_size() != len(layout.primes)):
        raise InvalidMessage("ciphertext")
    return ct


def add_inplace(evaluator: Any, accumulator: Any, ciphertext: Any) -> None:
    """``accumulator += ciphertext`` for two ciphertexts :func:`load_ciphertext` made (or sums
    of them). SEAL adds, then throws if the result is "transparent" (its second polynomial
    zero): a running sum can pass through that state (two sites each sending a second
    polynomial of zeros, or one sending the negation of another's, which a seeded upload
    shows), and the sum is then right and must stay usable: the throw would leave an upload
    half-counted. Transparency is harmless here: a transparent sum decrypts without the key
    to what it holds, and the key holder checks every sum it decrypts. Any other error is
    raised."""
    try:
        evaluator.add_inplace(accumulator, ciphertext)
    except RuntimeError:
        # defence: ckks.seal.transparent-sum-kept
        if not accumulator.is_transparent():
            raise


def load_ciphertext(context: Any, data: bytes, *, scale: float,
                    kinds: Collection[Kind] = ANY_KIND) -> Any:
    """A fresh, add-ready ciphertext from our bytes, or :class:`InvalidMessage`.

    Only the exact length for the kind, version ``FORMAT_VERSION``, a kind in ``kinds`` and
    coefficients below their primes are accepted; the result is a size-2, NTT-form
    ciphertext at the context's first data level with the given scale (so adding it with
    :func:`add_inplace` can neither throw nor mix levels).
    """
    try:
        # defence: ckks.seal.bytes-only
        if not isinstance(data, bytes):
            raise InvalidMessage("ciphertext")
        layout = _layout(context)
        # defence: ckks.seal.format-version
        if len(data) < 2 or data[0] != FORMAT_VERSION or data[1] not in ANY_KIND:
            raise InvalidMessage("ciphertext")
        kind = Kind(data[1])
        spec = layout.kinds[kind]
        # defence: ckks.seal.accepted-kinds
        if kind not in kinds or len(data) != spec.length:
            raise InvalidMessage("ciphertext")
        start = 2 + (SEED_BYTES if kind is Kind.SEEDED else 0)
        coefficients = spec.packer.unpack(memoryview(data)[start:])
        if bool((coefficients >= spec.primes).any()):
            raise InvalidMessage("ciphertext")
        seal = _rebuild(layout, kind, coefficients, data[2:start], scale)
        return _load_seal_bytes(context, layout, seal, scale)
    except InvalidMessage:
        raise
    except Exception:  # a wrong-typed argument, an exotic context: still opaque
        raise InvalidMessage("ciphertext") from None
