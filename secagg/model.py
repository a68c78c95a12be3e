"""Models on the wire: a flat float64 vector plus the spec that rebuilds its tensors.

Nothing is ever unpickled: a model travels as its spec (names, shapes, dtypes) and its values,
and files are numpy ``.npz`` archives loaded with ``allow_pickle=False``.

In memory a model is one float64 vector. Every value a published model holds is one its
tensor's dtype can hold exactly (``with_values`` rounds float16/float32 tensors to their dtype
and integer tensors to integers), so on the wire (``to_bytes``) float16 and float32 tensors
travel in their own little-endian dtype: a float32 model is 4 bytes a value, not 8. Everything
else (float64, integer and boolean tensors such as BatchNorm's ``num_batches_tracked``) travels
as little-endian float64; integer tensors are rounded back to their dtype when the tensors are
rebuilt, so their average is the rounded average of the sites' values. ``from_bytes`` also
reads the all-float64 form that stores written before this encoding hold; the two forms have
the same size only when they are the same bytes.

The digest binds spec and float64 values (not the encoding): a round is bound to the digest of
the model it starts from, and a site refuses a round whose digest is not that of the model it
holds.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from secagg._encoding import (
    PAYLOAD_CHUNK_BYTES,
    digest,
    encode,
    payload_digest,
    payload_digest_of,
)
from secagg._inputs import is_masked_array
from secagg.errors import ConfigurationError

# what a tensor may be: what torch and numpy both hold and a float64 holds every value of
# (within 2**53 for the 64-bit integers); float128, complex, strings and objects are refused
SUPPORTED_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32",
                              "int64", "uint8", "uint16", "uint32", "uint64", "bool"})
MAX_TENSOR_VALUES = 1 << 40  # far above any [limits] max_vector_length; dims are bounded too
MAX_TENSOR_DIMS = 64  # numpy's most: no array, hence no honest tensor, has more
# tensors a model may have: far above a vision model's state dict (hundreds) or a large
# transformer's (thousands). A lying aggregator's spec of 360,000 one-value tensors (7.5 MB,
# within the message limit) cost a site 526 MB and 6.5 CPU seconds before it was refused.
MAX_MODEL_TENSORS = 1 << 16
_F8 = np.dtype("<f8")
_EXACT_INT = 1 << 53  # every integer of magnitude up to this is exactly a float64
_F4 = np.dtype("<f4")
_FLUSH_BLOCK = 1 << 16  # values per block of the subnormal flush (its temporaries)


def _wire_dtype(name: str) -> np.dtype:
    """How a tensor's values travel: float16/float32 in their own dtype, the rest as float64."""
    dtype = np.dtype(name)
    if dtype.kind == "f" and dtype.itemsize < 8:
        return dtype.newbyteorder("<")
    return _F8


def _spec_encoding(spec: tuple[TensorSpec, ...]) -> bytes:
    return encode("model-spec", *[encode("tensor", t.name, list(t.shape), t.dtype)
                                  for t in spec])


class _PartsReader:
    """Byte ranges of the concatenation of ``parts``, without concatenating them."""

    def __init__(self, parts: Sequence[bytes | memoryview]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts]).tolist()

    def read(self, offset: int, length: int) -> bytes:
        out = []
        i = bisect.bisect_right(self._starts, offset) - 1
        while length > 0:
            part = self._parts[i]
            piece = part[offset - self._starts[i]:offset - self._starts[i] + length]
            out.append(piece)
            offset += len(piece)
            length -= len(piece)
            i += 1
        return b"".join(out)


def _runs(spec: tuple[TensorSpec, ...]) -> list[tuple[int, int, np.dtype]]:
    """(start, end, wire dtype) over the flat vector, neighbours of one wire dtype merged."""
    runs: list[tuple[int, int, np.dtype]] = []
    pos = 0
    for t in spec:
        dtype = _wire_dtype(t.dtype)
        if runs and runs[-1][2] == dtype:
            runs[-1] = (runs[-1][0], pos + t.size, dtype)
        elif t.size:
            runs.append((pos, pos + t.size, dtype))
        pos += t.size
    return runs


def _flush_subnormals(values: np.ndarray, spec: tuple[TensorSpec, ...]) -> None:
    """Subnormal values of float32 tensors become zeros of their sign, in place.

    A site whose training script turned on flush-to-zero (``torch.set_flush_denormal``) reads
    a float32 subnormal off the wire as 0.0 (the CPU's float32-to-float64 conversion honours
    denormals-are-zero) and would then refuse the model's digest: models are made
    (``from_arrays``) and published (``with_values``) without them. A change below 1.2e-38 is
    nothing a model learns from. float16 is converted without that flag (numpy's conversion,
    and F16C's, ignore it) and its subnormals, down from 6.1e-5, are values models use: kept."""
    smallest = float(np.finfo(_F4).tiny)
    magnitude = np.empty(_FLUSH_BLOCK)  # small enough to stay in cache: three quick passes
    tiny = np.empty(_FLUSH_BLOCK, dtype=bool)
    for start, end, dtype in _runs(spec):
        if dtype != _F4:
            continue
        for block in range(start, end, _FLUSH_BLOCK):
            part = values[block:min(block + _FLUSH_BLOCK, end)]
            n = part.size
            np.abs(part, out=magnitude[:n])
            # defence: model.no-subnormals
            np.less(magnitude[:n], smallest, out=tiny[:n])
            np.copysign(0.0, part, out=part, where=tiny[:n])  # zeros stay as they are


# the float precisions a site may train in, by their significands' bits: bfloat16 (torch's;
# numpy has none) is what training in it, or autocast to it, reads of a float16, float32 or
# float64 tensor (bfloat16 and float16 are both 2 bytes: bfloat16 is the coarser)
# defence: model.training-floats-ranked-as-torch
TRAINING_FLOATS = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}


def _rounds_coarser(own: str, held: str) -> bool:
    """Whether a float tensor of dtype ``own`` loses precision loaded into one of ``held``."""
    if held not in TRAINING_FLOATS or own not in TRAINING_FLOATS:
        return False
    return TRAINING_FLOATS[held] < TRAINING_FLOATS[own]


def _as_held(values: np.ndarray, held: str) -> np.ndarray:
    """``values`` rounded as torch rounds them into a tensor of ``held`` (to float32 first,
    then to a 16-bit float from there: torch's casts from float64 go through float), back as
    float64."""
    with np.errstate(over="ignore"):  # (beyond a 16-bit float's range: inf, as held)
        single = values.astype(np.float32)
        if held == "float16":
            # defence: model.float16-rounded-through-float32
            return single.astype(np.float16).astype(np.float64)
        if held == "bfloat16":  # round to nearest even on the top 16 bits
            wide = single.view(np.uint32).astype(np.uint64)
            # defence: model.bfloat16-rounded-to-nearest-even
            wide += np.uint64(0x7FFF) + ((wide >> np.uint64(16)) & np.uint64(1))
            wide &= np.uint64(0xFFFF0000)
            rounded = wide.astype(np.uint32).view(np.float32)
            # (NaN is not a model value; a value past bfloat16's largest rounds to inf,
            # as torch's does)
            return rounded.astype(np.float64)
        return single.astype(np.float64)


def _int_bounds(dtype: np.dtype) -> tuple[int, int]:
    """The integers a model's integer tensor of ``dtype`` holds: its range, within +-2**53
    for the 64-bit ones (a float64 carries them exactly; from_arrays refuses the rest)."""
    iinfo = np.iinfo(dtype)
    return max(int(iinfo.min), -_EXACT_INT), min(int(iinfo.max), _EXACT_INT)


def _check_held_exactly(values: np.ndarray, spec: tuple[TensorSpec, ...]) -> None:
    """Every value is one its tensor holds exactly, so that the model's values and digest are
    those of the tensors ``to_arrays`` gives. Built directly or read off the wire, 300 in an
    int8 tensor came back as 44, 2.5 in an integer tensor as 2, 7 in a bool one as True and
    0.1 in a float32 one as 0.1000000015: each under the digest of values no site holds."""
    pos = 0
    for t in spec:
        chunk = values[pos:pos + t.size]
        pos += t.size
        dtype = np.dtype(t.dtype)
        if not chunk.size or dtype == _F8:
            continue
        # defence: model.values-held-exactly
        if dtype.kind == "b":
            held = bool(np.all((chunk == 0.0) | (chunk == 1.0)))
        elif dtype.kind in "iu":
            low, high = _int_bounds(dtype)
            held = bool(np.all(np.rint(chunk) == chunk)) and low <= chunk.min() and (
                chunk.max() <= high)
        else:  # float16/float32: the value survives the round trip through its dtype
            with np.errstate(over="ignore"):
                held = bool(np.array_equal(chunk.astype(dtype).astype(np.float64), chunk))
            if held and dtype == _F4:  # and float32 subnormals are flushed (_flush_subnormals)
                held = not np.any((chunk != 0.0) & (np.abs(chunk) < float(np.finfo(_F4).tiny)))
        # defence: model.integers-hold-no-negative-zero
        if dtype.kind in "biu" and held:  # and the zero they hold is +0.0 (with_values)
            held = not np.any(np.signbit(chunk) & (chunk == 0.0))
        # defence: model.tensor-name-cut-in-errors
        if not held:
            raise ConfigurationError(f"tensor {t.name[:64]!r} holds values its dtype "
                                     f"{t.dtype} cannot hold exactly")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model. Checked when made, whoever made it (a spec comes from the
    aggregator, the store or a file): a supported dtype, and dims whose product is computed
    exactly (an int64 product wraps: dims 2**40 and 2**40 * (2**24 - 1) once summed to 0
    values and let a lying aggregator name a 4 TiB download)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        # defence: model.spec-field-types
        # (a name of None made a spec whose digest raised TypeError; an int name with a bad
        # dtype raised from inside the error message; True passed as a dim of 1)
        if not isinstance(self.name, str) or not isinstance(self.dtype, str) or not (
                isinstance(self.shape, tuple)
                and all(type(d) is int for d in self.shape)):  # (no bool, no float)
            raise ConfigurationError(
                f"a tensor spec is a str name, a tuple of int dims and a str dtype; got "
                f"{type(self.name).__name__}, {type(self.shape).__name__} and "
                f"{type(self.dtype).__name__}")
        # defence: model.spec-checked
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigurationError(f"tensor {self.name[:64]!r} has unsupported dtype "
                                     f"{self.dtype[:32]!r}")
        # defence: model.spec-dims-non-negative
        if not all(isinstance(d, int) and 0 <= d <= MAX_TENSOR_VALUES for d in self.shape) or (
                math.prod(self.shape) > MAX_TENSOR_VALUES
                # defence: model.spec-dims-counted
                or len(self.shape) > MAX_TENSOR_DIMS):
            raise ConfigurationError(f"tensor {self.name[:64]!r} has an impossible shape")

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact (Python ints); 1 for a scalar


def _check_tensor_count(count: int) -> None:
    # defence: model.tensor-count-bounded
    if count > MAX_MODEL_TENSORS:
        raise ConfigurationError(f"a model of {count:,} tensors: at most {MAX_MODEL_TENSORS:,} "
                                 "(merge small tensors, or send them as one)")


@dataclass(frozen=True)
class FlatModel:
    spec: tuple[TensorSpec, ...]
    values: np.ndarray  # float64, length = sum of sizes

    def __post_init__(self) -> None:
        _check_tensor_count(len(self.spec))
        values = np.ascontiguousarray(self.values, dtype="<f8")
        # defence: model.values-match-the-spec
        if values.ndim != 1 or values.shape[0] != sum(t.size for t in self.spec):
            raise ConfigurationError("model values do not match the model spec")
        names = [t.name for t in self.spec]
        # defence: model.spec-names-distinct
        if len(set(names)) != len(names):
            raise ConfigurationError("model spec names a tensor twice")
        # defence: model.values-finite
        if not np.all(np.isfinite(values)):
            # (the tensor named, not its values: a state dict holds dozens)
            first = int(np.argmin(np.isfinite(values)))
            at, name = 0, "?"
            for t in self.spec:
                if first < at + t.size:
                    name = t.name
                    break
                at += t.size
            raise ConfigurationError(f"model values contain NaN or infinity (in tensor "
                                     f"{name!r:.80})")
        _check_held_exactly(values, self.spec)
        object.__setattr__(self, "values", values)

    @property
    def size(self) -> int:
        return int(self.values.shape[0])

    @cached_property
    def digest(self) -> bytes:
        return self.digest_now()

    def digest_now(self) -> bytes:
        """The digest of the values as they are now (``digest`` is worked out once: a holder
        that handed ``values`` out checks with this that nothing wrote into them)."""
        return digest("model", _spec_encoding(self.spec), payload_digest(self.values.data))

    @cached_property
    def training_digest(self) -> bytes:
        """The digest of what a site's training sees of this model: each tensor's name, shape
        and values, in name order, the values as float64 with -0.0 as 0.0; not the tensors'
        order or dtypes (a state dict is loaded by name and cast into the site's own
        tensors). The one-update-per-model rule (clients.history) keys on it: a model
        re-encoded (its tensors reordered, a float32 tensor declared float64, a zero's sign
        flipped) has another ``digest`` but trains the same, and is the same model to it."""
        # defence: model.integer-models-count-by-values
        return self._training_digest({}, counters=not self._has_floats)

    def training_digest_as(self, dtypes: Mapping[str, str]) -> bytes:
        """``training_digest`` of this model as tensors of ``dtypes`` (name -> a float
        precision of ``TRAINING_FLOATS``) hold it: a float tensor that a site trains in a
        less precise float than the model's (a float64 model loaded into float32 parameters,
        torch's default; bfloat16 training, or autocast) is hashed as that precision rounds
        it. A model nudged below the site's precision (2**-40 of each float64 value, a "new"
        model to the float64 digest) trains the same, and is the same model to the
        one-update rule; a tensor not named, of another kind or of a dtype at least as
        precise, as ``training_digest``.

        In a model with float tensors, integer and bool tensors count by name and shape, not
        values: a made-up result moving only a counter that training does not read
        (BatchNorm's ``num_batches_tracked``) gave the sites' exact updates again, and an
        honest round moves the float values too (one that moves none is the model published
        again, which the rule refuses anyway; so is a round that moves only the integers of
        a model whose float values are frozen). A model of integers and bools alone (counts,
        masks) counts by its values, or every round after the first were refused."""
        # (the usual case, a state dict of the model's own dtypes, is the cached digest: each
        # digest hashes the whole model, ten sites' at once on the upload's critical path)
        if not any(_rounds_coarser(t.dtype, dtypes[t.name]) for t in self.spec
                   if t.name in dtypes):
            return self.training_digest
        return self._training_digest(dtypes, counters=not self._has_floats)

    @cached_property
    def legacy_training_digest(self) -> bytes:
        """The training digest as sites recorded it before integer tensors were left out
        (their values counted): checked too, so a model sent against before an upgrade is
        still the same model to the rule (the same digest for a model without them)."""
        if not self._has_floats or all(np.dtype(t.dtype).kind == "f" for t in self.spec):
            return self.training_digest
        return self._training_digest({}, counters=True)

    @cached_property
    def _has_floats(self) -> bool:
        return any(np.dtype(t.dtype).kind == "f" for t in self.spec)

    def _training_digest(self, dtypes: Mapping[str, str], counters: bool) -> bytes:
        where, pos = {}, 0
        for t in self.spec:
            where[t.name] = (pos, pos + t.size, t.shape, t.dtype)
            pos += t.size
        parts = []
        # defence: model.training-digest-in-name-order
        for name in sorted(where):
            start, end, shape, own = where[name]
            # defence: model.training-digest-leaves-out-counters
            if np.dtype(own).kind != "f" and not counters:
                parts.append(encode("counter", name, list(shape)))
                continue
            values = self.values[start:end]
            held = dtypes.get(name)
            # defence: model.training-digest-as-the-site-holds-it
            if held is not None and _rounds_coarser(own, held):
                values = _as_held(values, held)
            # defence: model.training-digest-folds-signed-zeros
            values = values + 0.0  # (-0.0 + 0.0 is 0.0)
            parts.append(encode("tensor", name, list(shape)) + payload_digest(values.data))
        return digest("model-training", *parts)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, object]) -> FlatModel:
        """From named arrays (numpy arrays, or anything ``np.asarray`` takes), in order."""
        # defence: model.from-arrays-takes-a-mapping
        if not isinstance(arrays, Mapping):
            raise ConfigurationError(f"a model is a mapping of names to arrays; got "
                                     f"{type(arrays).__name__}")
        _check_tensor_count(len(arrays))  # (before any is read)
        spec, parts = [], []
        for name, value in arrays.items():
            # defence: model.no-masked-arrays
            # (np.asarray takes a masked array's hidden values as they are, silently)
            if is_masked_array(value):
                raise ConfigurationError(f"tensor {str(name)[:64]!r} is a masked array: fill "
                                         f"it first (.filled())")
            try:
                arr = np.asarray(value)
            except (TypeError, ValueError):  # e.g. a torch bfloat16 tensor: numpy has no such dtype
                raise ConfigurationError(f"tensor {str(name)[:64]!r} cannot be read as an array "
                                         f"of a supported dtype") from None
            # (TensorSpec refuses a dtype models do not carry, naming the tensor)
            spec.append(TensorSpec(str(name), tuple(int(d) for d in arr.shape), arr.dtype.name))
            # defence: model.int64-within-float64
            if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8 and arr.size and (
                    int(arr.min()) < -_EXACT_INT or int(arr.max()) > _EXACT_INT):
                # a float64 carries integers exactly up to 2**53: beyond, a value would be
                # rounded (or, near 2**63, wrap round on the way back) and the model a site
                # receives would not be the one given here
                raise ConfigurationError(
                    f"tensor {str(name)[:64]!r} holds integers beyond +-2**53, which the "
                    f"model's values (float64) cannot carry exactly")
            parts.append(arr.ravel())
        # one copy, converting as it goes (every supported kind casts to float64 safely)
        values = np.concatenate(parts, dtype=np.float64) if parts else np.zeros(0)
        _flush_subnormals(values, tuple(spec))
        return cls(tuple(spec), values)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The named arrays again, in their dtypes (integers and booleans rounded)."""
        out, pos = {}, 0
        for t in self.spec:
            chunk = self.values[pos:pos + t.size]
            pos += t.size
            dtype = np.dtype(t.dtype)
            if dtype.kind in ("i", "u", "b"):
                chunk = np.rint(chunk)
            out[t.name] = chunk.astype(dtype).reshape(t.shape)
        return out

    @property
    def integer_positions(self) -> np.ndarray:
        """A boolean mask of the values that belong to integer (or boolean) tensors."""
        return self._positions(("i", "u", "b"))

    @property
    def bool_positions(self) -> np.ndarray:
        """A boolean mask of the values that belong to boolean tensors."""
        return self._positions(("b",))

    def _positions(self, kinds: tuple[str, ...]) -> np.ndarray:
        mask = np.zeros(self.size, dtype=bool)
        pos = 0
        for t in self.spec:
            if np.dtype(t.dtype).kind in kinds:
                mask[pos:pos + t.size] = True
            pos += t.size
        return mask

    def representable(self, values: np.ndarray) -> bool:
        """Whether ``values`` (in this spec's layout) fit every tensor's dtype: finite, and in
        its range (a float32 tensor's values within +-3.4e38, an int8's within [-128, 127]
        once rounded), so that every site can hold the model they make."""
        # defence: model.representable-numeric-vector
        # (a list raised AttributeError, a str or object array TypeError from inside numpy)
        if not isinstance(values, np.ndarray) or values.dtype.kind not in "fiu":
            return False
        if values.shape != (self.size,) or not np.all(np.isfinite(values)):
            return False
        return self.beyond_range(values) is None

    def beyond_range(self, values: np.ndarray, *, strict: bool = False) -> str | None:
        """The name of the first tensor whose finite ``values`` (a float or integer vector in
        this spec's layout) its dtype cannot hold, or None. ``strict``: within the dtype's
        own largest and smallest, with no rounding allowance (a site's check of what it
        sends: the protocols' error, added to a value at the allowance's edge, crossed it)."""
        pos = 0
        for t in self.spec:
            chunk = values[pos:pos + t.size]
            pos += t.size
            dtype = np.dtype(t.dtype)
            if not chunk.size or dtype.kind not in ("f", "i", "u", "b"):
                continue
            least, most = chunk.min(), chunk.max()
            if dtype.kind == "b":
                # a site sends 0 or 1 (an int64 -1 given for a bool buffer reads as True, but
                # was averaged as -1, and the result flipped the site's values); the
                # aggregator takes any value, which saturates (with_values: above 0 is True)
                # defence: model.strict-bool-range
                if strict and (least < 0 or most > 1):
                    return t.name
                continue
            if dtype.kind == "f":
                # what the dtype rounds to a finite value: up to its largest plus half a step
                # (the protocols' error, ~1e-5, put an honest float16 buffer held at -65504
                # just past it, and the round was refused after every site had sent)
                # defence: model.representable-float-rounding
                finfo = np.finfo(dtype)
                top = finfo.max
                step = float(top) - float(np.nextafter(top, dtype.type(0)))  # its last step
                limit = float(top) + step / 2
                # defence: model.strict-range-for-what-a-site-sends
                if strict and (least < -float(top) or most > float(top)):
                    return t.name
                if least <= -limit or most >= limit:
                    return t.name
                continue
            # exactly, in Python ints (float(int64 max) rounds up to 2**63, which wraps)
            # (64-bit integers within +-2**53, as from_arrays takes them: a float64 carries
            # them exactly, and every site can submit against the model)
            # defence: model.representable-int64-within-float64
            low, high = _int_bounds(dtype)
            if strict and (least < low or most > high):
                return t.name
            if int(np.rint(least)) < low or int(np.rint(most)) > high:
                return t.name
        return None

    def with_values(self, values: np.ndarray) -> FlatModel:
        """The same spec with new values, each rounded to what its tensor holds: integer
        tensors' to integers, float16/float32 tensors' to their dtype. What ``representable``
        refuses (a value out of its tensor's range, NaN, infinity) is a ConfigurationError."""
        # defence: model.with-values-checked
        # (a wrong length raised IndexError, a 2-D array a broadcast error, from inside numpy)
        if not (isinstance(values, np.ndarray) and values.dtype.kind in "fiu"
                and values.shape == (self.size,)):
            raise ConfigurationError(f"values must be a numeric vector of the model's "
                                     f"{self.size} values")
        # defence: model.with-values-representable
        # (what representable refuses, with_values refuses too: NaN in a bool tensor became
        # True, and a float16 value in (65504, 65520) was rounded down to 65504, so a key
        # holder signed a result the aggregator then refused)
        if not self.representable(values):
            raise ConfigurationError("the values hold NaN or infinity, or a value beyond its "
                                     "tensor's range")
        values = np.array(values, dtype=np.float64)
        mask = self.integer_positions
        # + 0.0: an integer tensor holds no -0.0 (rint(-1e-9) is -0.0, under another digest
        # than the 0 the sites' tensors hold)
        # defence: model.integers-have-no-negative-zero
        values[mask] = np.rint(values[mask]) + 0.0
        # a bool tensor's value is 0 or 1, so the model's values and digest are those of the
        # tensors the sites hold; a value beyond (FedAvg at a server learning rate above 1)
        # saturates: above 0 is True, else False (nonzero-is-True took a True that every site
        # turned False, 1 + 2 x -1 = -1, to True)
        # defence: model.bools-are-0-or-1
        bools = self.bool_positions
        values[bools] = values[bools] > 0.0
        for start, end, dtype in _runs(self.spec):
            if dtype != _F8:
                # defence: model.canonical-values
                with np.errstate(over="ignore"):
                    values[start:end] = values[start:end].astype(dtype)
        _flush_subnormals(values, self.spec)
        return FlatModel(self.spec, values)

    @staticmethod
    def encoded_sizes(spec: tuple[TensorSpec, ...]) -> tuple[int, int]:
        """(bytes of ``to_bytes``, bytes of the all-float64 form) for a model of ``spec``."""
        size = sum(t.size for t in spec)
        return sum((end - start) * dtype.itemsize for start, end, dtype in _runs(spec)), 8 * size

    def to_bytes(self) -> bytes:
        """The values as they travel (module docstring): float16/float32 tensors in their
        dtype (exact for a model made by ``with_values`` or ``from_arrays``), the rest float64."""
        runs = _runs(self.spec)
        if all(dtype == _F8 for _, _, dtype in runs):
            return self.values.tobytes()
        return b"".join(self.values[start:end].astype(dtype).tobytes()
                        for start, end, dtype in runs)

    @classmethod
    def digest_of_parts(cls, spec: tuple[TensorSpec, ...],
                        parts: Sequence[bytes | memoryview]) -> bytes:
        """``from_bytes(spec, b"".join(parts)).digest``, worked out 1 MiB of values at a time:
        neither the joined bytes nor the model are built. A site checks a model it cannot
        size in advance (the first it fetches) this way: a lying aggregator naming a model of
        10^8 values in one 1 MiB chunk repeated had it build 1.7 GB before the digest
        refused it. ValueError on a size ``from_bytes`` refuses."""
        compact, legacy = cls.encoded_sizes(spec)
        total = sum(len(part) for part in parts)
        if total == legacy:
            runs = [(0, legacy // 8, _F8)]
        elif total == compact:
            runs = _runs(spec)
        else:
            raise ValueError("model bytes do not match the model spec")
        stream = _PartsReader(parts)
        step = PAYLOAD_CHUNK_BYTES // 8  # payload_digest's chunks, in float64 values
        block = np.empty(step, dtype=np.float64)
        hashes = []
        placed, offset = [], 0
        for start, end, dtype in runs:  # (each run's place in the bytes)
            placed.append((start, end, dtype, offset))
            offset += (end - start) * dtype.itemsize
        index = 0
        for first in range(0, legacy // 8, step):
            last = min(first + step, legacy // 8)
            pos = first
            while pos < last:
                start, end, dtype, offset = placed[index]
                if pos >= end:
                    index += 1
                    continue
                stop = min(end, last)
                block[pos - first:stop - first] = np.frombuffer(stream.read(
                    offset + (pos - start) * dtype.itemsize, (stop - pos) * dtype.itemsize),
                    dtype=dtype)
                pos = stop
            hashes.append(hashlib.sha256(block[:last - first].data).digest())
        return digest("model", _spec_encoding(spec), payload_digest_of(legacy, hashes))

    @classmethod
    def from_bytes(cls, spec: tuple[TensorSpec, ...], data: bytes | memoryview) -> FlatModel:
        """The model ``to_bytes`` wrote (or the all-float64 form); ValueError on any other
        size or on values no model holds (NaN, infinity)."""
        compact, legacy = cls.encoded_sizes(spec)
        if len(data) == legacy:
            return cls(spec, np.frombuffer(data, dtype=_F8).astype(np.float64))
        if len(data) != compact:
            raise ValueError("model bytes do not match the model spec")
        values = np.empty(legacy // 8, dtype=np.float64)
        offset = 0
        for start, end, dtype in _runs(spec):
            values[start:end] = np.frombuffer(data, dtype=dtype, count=end - start,
                                              offset=offset)
            offset += (end - start) * dtype.itemsize
        return cls(spec, values)

    def save_npz(self, path: Path | str) -> None:
        np.savez(Path(path), **self.to_arrays())  # type: ignore[arg-type]

    @classmethod
    def load_npz(cls, path: Path | str, *, max_values: int | None = None) -> FlatModel:
        """The named arrays of a ``numpy.savez`` archive, never unpickled. ``max_values``:
        refuse, before any array is read, an archive whose arrays' headers declare more
        values in all (a 4 MB archive declaring 10^9 float32 values took 23 GB to load)."""
        import zipfile

        path = Path(path)
        try:
            # np.load takes any other file for a pickle and says so (suggesting the unsafe
            # way to load it): only a zip archive is a model file here
            if not path.is_file():
                # (a FIFO, or a link in a loop, was "no such file")
                # defence: model.not-a-file-said-what-it-is
                what = ("a directory" if path.is_dir() else
                        "not a regular file" if path.exists() else
                        "a symbolic link that leads nowhere" if path.is_symlink() else
                        "no such file")
                raise ConfigurationError(f"cannot read model {path}: {what}")
            if not zipfile.is_zipfile(path):
                raise ConfigurationError(f"cannot read model {path}: not a .npz archive of "
                                         "named arrays (numpy.savez)")
            if max_values is not None:
                # defence: model.npz-declared-size-bounded
                declared = _declared_values(path)
                if declared > max_values:
                    raise ConfigurationError(
                        f"cannot read model {path}: its arrays declare {declared:,} values, "
                        f"more than [limits] max_vector_length ({max_values:,})")
            # defence: model.npz-never-unpickled
            with np.load(path, allow_pickle=False) as archive:
                return cls.from_arrays({name: archive[name] for name in archive.files})
        except OSError as e:
            raise ConfigurationError(f"cannot read model {path}: {e.strerror or e}") from None
        except zipfile.BadZipFile:
            raise ConfigurationError(f"cannot read model {path}: a damaged .npz archive"
                                     ) from None
        except ValueError as e:
            if isinstance(e, ConfigurationError):
                raise
            reason = ("it holds object arrays, which would need unpickling: refused"
                      if "pickle" in str(e) else str(e))
            raise ConfigurationError(f"cannot read model {path}: {reason}") from None


def _declared_values(path: Path) -> int:
    """How many values the arrays of a .npz archive declare in their headers, read without
    reading an array; a ValueError for a member that is no .npy array (np.load returned such
    a member's bytes whole, however large they decompress)."""
    import math
    import zipfile

    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(f)
                else:  # (2.0 and 3.0 share the header's layout)
                    shape, _, _ = np.lib.format.read_array_header_2_0(f)
            total += math.prod(int(n) for n in shape)
    return total
