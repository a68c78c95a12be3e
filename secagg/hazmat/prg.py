"""Mask expansion: an AES-256-CTR keystream under a full 256-bit seed, read as words.

Guarantees:
- the seed is the whole AES-256 key (never folded or truncated);
- word ``i`` of the stream for a seed is the same whether the stream is generated from 0 or
  from any ``start_word`` (the stream is seekable by 16-byte block), so a shard or a dropout
  recovery can regenerate any index range alone;
- words are little-endian ``uint32`` or ``uint64`` and arithmetic on them wraps modulo 2**bits.

The hot path writes the keystream into a reused buffer (``update_into``) and adds it in place:
no per-call allocation of mask-sized arrays.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_BLOCK = 16
WORD_DTYPES: dict[int, type[np.unsignedinteger]] = {32: np.uint32, 64: np.uint64}


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes | bytearray):
        raise TypeError("seed must be bytes")
    # defence: hazmat.prg.seed-length
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")


_zeros = b""


def _zero_input(nbytes: int) -> memoryview:
    """A shared, read-only run of zero bytes: CTR encrypts it into the keystream."""
    global _zeros
    if len(_zeros) < nbytes:
        _zeros = bytes(nbytes)
    return memoryview(_zeros)[:nbytes]


def word_dtype(word_bits: int) -> type[np.unsignedinteger]:
    # defence: hazmat.prg.word-bits-is-an-int
    # (32.0 or numpy.float64(32) would hash to the same key and slip through as a float)
    if not isinstance(word_bits, numbers.Integral) or isinstance(word_bits, bool):
        raise ValueError(f"word_bits must be the int 32 or 64, got {word_bits!r}")
    try:
        return WORD_DTYPES[int(word_bits)]
    except KeyError:
        raise ValueError(f"word_bits must be 32 or 64, got {word_bits!r}") from None


MAX_WORDS = 1 << 31  # the longest index range an expander covers (a vector and its weight)


class MaskExpander:
    """Expands seeds into mask words for one index range ``[start_word, start_word + length)``.

    One expander serves many seeds; it owns the scratch buffers so that expanding a mask
    allocates nothing. ``bytes_generated`` counts keystream bytes produced (for benchmarks).
    """

    def __init__(self, length: int, *, word_bits: int = 32, start_word: int = 0) -> None:
        try:  # ints (numpy's too), never floats: an index is exact
            length, start_word = operator.index(length), operator.index(start_word)
        except TypeError:
            raise ValueError("length and start_word must be integers") from None
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        # defence: hazmat.prg.start-non-negative
        if start_word < 0:
            raise ValueError(f"start_word must be >= 0, got {start_word}")
        # far beyond any vector (their length is below 2**31): a clear error, not a request
        # for exabytes; and the range ends within the 128-bit block counter, which would
        # otherwise wrap round and repeat the keystream
        # defence: hazmat.prg.index-range-bounded
        if length > MAX_WORDS:
            raise ValueError(f"length must be at most 2**31, got {length}")
        if (start_word + length) * word_dtype(word_bits)(0).itemsize > _BLOCK << 128:
            raise ValueError("the index range runs past the end of the 128-bit block counter")
        self.dtype = np.dtype(word_dtype(word_bits)).newbyteorder("<")
        self.length = length
        word_bytes = self.dtype.itemsize
        start_byte = start_word * word_bytes
        self._first_block = start_byte // _BLOCK
        self._skip = start_byte % _BLOCK
        self._nbytes = self._skip + length * word_bytes
        # update_into wants room for one block more than the input.
        self._buf = bytearray(self._nbytes + _BLOCK)
        self._words = np.frombuffer(self._buf, dtype=self.dtype, count=length, offset=self._skip)
        self.bytes_generated = 0

    def _fill(self, seed: bytes) -> np.ndarray:
        _check_seed(seed)
        # defence: hazmat.prg.seekable-counter
        counter = self._first_block.to_bytes(_BLOCK, "big")
        # defence: hazmat.prg.full-seed-key
        enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(counter)).encryptor()
        enc.update_into(_zero_input(self._nbytes), self._buf)
        self.bytes_generated += self._nbytes
        # defence: hazmat.prg.full-width-words
        return self._words

    def wipe(self) -> None:
        """Zero the scratch: it holds the last mask expanded until its next use."""
        np.frombuffer(self._buf, dtype=np.uint8)[:] = 0

    def words(self, seed: bytes) -> np.ndarray:
        """A fresh array of the mask words for ``seed`` (a copy; the scratch is reused)."""
        return self._fill(seed).copy()

    def view(self, seed: bytes) -> np.ndarray:
        """The mask words for ``seed`` in the expander's scratch: valid until its next use."""
        return self._fill(seed)

    def add_to(self, target: np.ndarray, seed: bytes) -> None:
        """``target += mask(seed)`` modulo 2**bits, in place."""
        np.add(target, self._fill(seed), out=target)

    def subtract_from(self, target: np.ndarray, seed: bytes) -> None:
        """``target -= mask(seed)`` modulo 2**bits, in place."""
        np.subtract(target, self._fill(seed), out=target)


def expand(seed: bytes, length: int, *, word_bits: int = 32, start_word: int = 0) -> np.ndarray:
    """The ``length`` mask words for ``seed`` starting at word ``start_word``."""
    return MaskExpander(length, word_bits=word_bits, start_word=start_word).words(seed)


MaskTerm = tuple[bytes, int]  # (seed, +1 to add its mask or -1 to subtract it)


def _apply_range(expander: MaskExpander, target: np.ndarray, terms: Sequence[MaskTerm]) -> None:
    try:
        for seed, sign in terms:
            if sign > 0:
                expander.add_to(target, seed)
            else:
                expander.subtract_from(target, seed)
    finally:
        # (the last pairwise or self mask stayed in the scratch of a RangeSplitMasker's
        # expanders, its helpers' included, which live as long as the masker, round after
        # round, and in a freed buffer otherwise: a core dump or swap held it)
        # defence: prg.scratch-wiped-after-use
        expander.wipe()


def _check_masking(target: object, terms: Sequence[MaskTerm], word_bits: int) -> None:
    """A flat vector of exactly ``word_bits``-bit words and signs of +1 or -1, or a clear error.

    Anything else was masked silently wrong: a uint32 target with 64-bit words took the low
    halves, an int64 or float64 one did not wrap at 2**32, a 2-D one took broadcast words, and
    a sign of 0, NaN or -7 subtracted the mask (5 added it).
    """
    # defence: prg.apply-masks-target
    dtype = np.dtype(word_dtype(word_bits))
    if not isinstance(target, np.ndarray) or target.ndim != 1 or target.dtype != dtype:
        got = (f"{type(target).__name__} {getattr(target, 'dtype', '')} "
               f"of shape {getattr(target, 'shape', '?')}")
        raise TypeError(f"target must be a flat array of {dtype} words, got {got}")
    # defence: prg.apply-masks-signs
    for term in terms:
        sign = term[1] if isinstance(term, tuple) and len(term) == 2 else None
        if isinstance(sign, bool) or not isinstance(sign, int) or sign not in (1, -1):
            raise ValueError(f"each mask term must be (seed, +1 or -1), got sign {sign!r}")


def apply_masks(target: np.ndarray, terms: Sequence[MaskTerm], *, word_bits: int = 32,
                splitter: RangeSplitMasker | None = None) -> int:
    """``target += sum(sign * mask(seed))`` modulo 2**bits; returns keystream bytes generated.

    With a :class:`RangeSplitMasker` for this length, the index range is shared between this
    process and the splitter's workers.
    """
    _check_masking(target, terms, word_bits)
    if splitter is not None and splitter.length == target.shape[0] and len(terms) > 1:
        return splitter.apply(target, terms)
    expander = MaskExpander(target.shape[0], word_bits=word_bits)
    _apply_range(expander, target, terms)
    return expander.bytes_generated


# ---- splitting the index range over processes --------------------------------------------
#
# cryptography's AES holds the GIL, so threads cannot share the keystream work; processes can.
# Because the stream is seekable, each process expands every seed over its own index range,
# writing its combined mask into shared memory: no vector crosses a pipe, only the seeds. The
# seeds are the caller's own secrets handed to its own worker processes (never logged).

_worker_state: dict[str, Any] = {}


def _worker_attach(shm_name: str, word_bits: int) -> None:
    from multiprocessing import shared_memory

    # The parent owns and unlinks the segment. A spawned worker shares the parent's resource
    # tracker, where registering the same name again is a no-op, so attaching is all we do.
    shm = shared_memory.SharedMemory(name=shm_name)
    _worker_state.update(shm=shm, word_bits=word_bits, expanders={})


def _worker_combined(terms: Sequence[MaskTerm], start_word: int, length: int,
                     shm_offset: int) -> int:
    word_bits = _worker_state["word_bits"]
    dtype = np.dtype(word_dtype(word_bits)).newbyteorder("<")
    out = np.ndarray((length,), dtype=dtype, buffer=_worker_state["shm"].buf,
                     offset=shm_offset * dtype.itemsize)
    key = (start_word, length)
    expanders: dict[tuple[int, int], MaskExpander] = _worker_state["expanders"]
    if key not in expanders:
        expanders[key] = MaskExpander(length, word_bits=word_bits, start_word=start_word)
    expander = expanders[key]
    before = expander.bytes_generated
    out[:] = 0
    _apply_range(expander, out, terms)
    return expander.bytes_generated - before


class PendingMasks:
    """Masks whose far ranges helper processes are expanding; apply them once, to one vector."""

    def __init__(self, owner: RangeSplitMasker, terms: list[MaskTerm],
                 futures: list[Any], lo: int) -> None:
        self._owner: RangeSplitMasker | None = owner
        self._terms, self._futures, self._lo = terms, futures, lo

    def apply_to(self, target: np.ndarray) -> int:
        """``target += sum(sign * mask(seed))``; returns keystream bytes generated."""
        if self._owner is None:
            raise RuntimeError("these masks were already applied")
        owner, self._owner = self._owner, None
        try:
            return owner._finish(target, self._terms, self._futures, self._lo)
        finally:
            self._terms = []


@contextlib.contextmanager
def _named_pool_failure() -> Iterator[None]:
    """A helper process that died (killed, out of memory) is WorkersFailed, not
    multiprocessing's raw BrokenProcessPool; the masker is then spent."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        yield
    # defence: prg.masker-workers-failed-named
    except BrokenProcessPool:
        from secagg.errors import WorkersFailed

        raise WorkersFailed("a masking helper process died: close this RangeSplitMasker and "
                            "start another") from None


class RangeSplitMasker:
    """Applies masks to vectors of one ``length``, splitting the index range over
    ``processes`` processes (this one included). Start once, reuse for every site and round
    of that length; close it (or use it as a context manager) when done."""

    def __init__(self, length: int, *, word_bits: int = 32, processes: int = 2) -> None:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context, shared_memory

        if processes < 2:
            raise ValueError(f"processes must be >= 2 to split, got {processes}")
        if length < processes:
            raise ValueError(f"length must be >= processes, got {length}")
        self.length = length
        self.word_bits = word_bits
        self.processes = processes
        self._dtype = np.dtype(word_dtype(word_bits)).newbyteorder("<")
        self._local: dict[int, MaskExpander] = {}
        # room for every range but this process's smallest share
        self._shm = shared_memory.SharedMemory(create=True,
                                               size=max(1, length * self._dtype.itemsize))
        self._pool = ProcessPoolExecutor(
            max_workers=processes - 1, mp_context=get_context("spawn"),
            initializer=_worker_attach, initargs=(self._shm.name, word_bits))

    def _bounds(self, local_share: float | None) -> list[int]:
        """Range boundaries, each on a 16-byte block: this process takes ``local_share`` of
        the range (default: an equal share), the helpers split the rest equally."""
        n, p = self.length, self.processes
        share = 1.0 / p if local_share is None else min(max(float(local_share), 0.05), 0.95)
        per_block = _BLOCK // self._dtype.itemsize
        lo = min(-(-int(n * share) // per_block) * per_block, n)
        step = -(-(n - lo) // (p - 1) // per_block) * per_block
        return [0] + [min(lo + i * step, n) for i in range(p - 1)] + [n]

    def apply(self, target: np.ndarray, terms: Sequence[MaskTerm]) -> int:
        return self.submit(terms).apply_to(target)

    def submit(self, terms: Sequence[MaskTerm], *, local_share: float | None = None
               ) -> PendingMasks:
        """Start the helper processes on their ranges now; the caller can do other work (say,
        quantise the input) before :meth:`PendingMasks.apply_to`, and then give itself a
        smaller ``local_share`` of the range. One pending at a time."""
        bounds = self._bounds(local_share)
        lo = bounds[1]
        with _named_pool_failure():
            futures = [
                self._pool.submit(_worker_combined, list(terms), start, end - start, start - lo)
                for start, end in itertools.pairwise(bounds[1:])
                if end > start
            ]
        return PendingMasks(self, list(terms), futures, lo)

    def _finish(self, target: np.ndarray, terms: Sequence[MaskTerm],
                futures: Sequence[Any], lo: int) -> int:
        if target.shape != (self.length,):
            with _named_pool_failure():
                for f in futures:
                    f.result()
            # (the helpers' combined mask is in the shared memory: not left there)
            # defence: prg.shared-mask-zeroed-on-refusal
            np.ndarray((self._shm.size,), dtype=np.uint8, buffer=self._shm.buf)[:] = 0
            raise ValueError(f"target must have shape ({self.length},), got {target.shape}")
        local = self._local.get(lo)
        if local is None:
            local = self._local[lo] = MaskExpander(lo, word_bits=self.word_bits)
        before = local.bytes_generated
        _apply_range(local, target[:lo], terms)
        with _named_pool_failure():
            generated: int = local.bytes_generated - before + sum(
                int(f.result()) for f in futures)
        far = np.ndarray((self.length - lo,), dtype=self._dtype, buffer=self._shm.buf)
        np.add(target[lo:], far, out=target[lo:])
        # (the combined mask, with the masked input, is the site's input: not left in the
        # shared memory until the masker is closed)
        # defence: prg.shared-mask-zeroed-after-use
        far[:] = 0
        del far
        return generated

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._shm.close()
        self._shm.unlink()

    def __enter__(self) -> RangeSplitMasker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
