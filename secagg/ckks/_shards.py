"""A key holder's running sum, split by chunk into shards, in this process or in workers.

Verifying uploads and releasing is the key holder's cost: every upload's chunks are parsed
and added, and the sum is compared with the aggregator's and decrypted. TenSEAL holds the GIL,
so using more than one core means processes; and the sum must stay where it was added (moving
a SEAL ciphertext costs more than adding it). So each shard owns a fixed range of chunk
indices for the whole round: shard ``w`` parses, adds, compares and decrypts only its range.

An upload is added to every shard or to none: each shard first parses its part and reports;
only if all parts parse do the shards commit them to their sums (two phases), so a malformed
chunk anywhere leaves the sum untouched.

Workers are started with ``spawn`` and get the secret context as bytes over their pipe (never
a file), like the encryption workers (:mod:`secagg.ckks._chunks`). Chunks and decoded slots
pass through a buffer each worker shares with this process alone (an anonymous memfd); the
small control messages between this process and its own workers are pickled.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import multiprocessing
import os
import weakref
from collections.abc import Collection, Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from tenseal import sealapi

from secagg.ckks import _seal
from secagg.ckks._flood import gaussian
from secagg.errors import WORKERS_GUARD_HINT, InvalidMessage, SecAggError, WorkersFailed

# a worker's answer to one command (a range of one upload's chunks: well under a second for
# 1M values) is waited for this long at most, then the worker is ended and the sum broken
WORKER_ANSWER_SECONDS = 300.0


class ShardState:
    """One shard's running sum, its comparison with the aggregator's, and its decryption."""

    def __init__(self, seal_context: Any, secret_key: Any, scale: float, slots: int) -> None:
        self._context = seal_context
        self._secret_key = secret_key
        self._scale = scale
        self._slots = slots
        self._evaluator = sealapi.Evaluator(seal_context)
        self.sum: list[Any] | None = None
        self._pending: list[Any] | None = None
        self._released: np.ndarray | None = None

    def load(self, chunks: Sequence[bytes], kinds: Collection[_seal.Kind]) -> bool:
        """Parse this shard's part of one upload (phase one). False: not canonical."""
        try:
            self._pending = [_seal.load_ciphertext(self._context, c, scale=self._scale,
                                                   kinds=kinds) for c in chunks]
        except InvalidMessage:
            self._pending = None
            return False
        return True

    def commit(self) -> None:
        """Add the part parsed by :meth:`load` to the sum (phase two)."""
        loaded, self._pending = self._pending, None
        if loaded is None:
            raise RuntimeError("commit without a loaded part")
        if self.sum is None:
            self.sum = loaded
        else:
            for acc, ct in zip(self.sum, loaded, strict=True):
                _seal.add_inplace(self._evaluator, acc, ct)

    def drop(self) -> None:
        self._pending = None

    def is_my_sum(self, chunks: Sequence[bytes]) -> bool:
        """Whether ``chunks`` are, exactly, this shard's sum. Each claimed chunk is parsed
        canonically and the sum subtracted from it: equal means the difference has a zero
        second polynomial (SEAL's "transparent"; with it zero the decryption is the first
        polynomial alone and involves no key) and a zero first polynomial. Only that key-free
        difference is ever decrypted, and only tested for zero: the aggregator's bytes
        themselves are never decrypted (a chosen (0, c) would decrypt to c * s)."""
        # defence: ckks.release.decrypts-only-its-own-sum
        if self.sum is None or len(chunks) != len(self.sum):
            return False
        decryptor = sealapi.Decryptor(self._context, self._secret_key)
        plain = sealapi.Plaintext()
        for mine, data in zip(self.sum, chunks, strict=True):
            try:
                theirs = _seal.load_ciphertext(self._context, data, scale=self._scale,
                                               kinds=(_seal.Kind.FULL,))
            except InvalidMessage:
                return False
            # SEAL raises when the result is transparent (the equal case): checked below
            with contextlib.suppress(RuntimeError):
                self._evaluator.sub_inplace(theirs, mine)
            # defence: ckks.release.difference-is-key-free
            if not theirs.is_transparent():
                return False
            decryptor.decrypt(theirs, plain)
            # defence: ckks.release.difference-is-zero
            if not plain.is_zero():
                return False
        return True

    def check_range(self, offset: int, n: int, bound: float, max_element: float,
                    max_weight: float) -> bool:
        """Decrypt this shard's own sum (its first slot is slot ``offset`` of the round's
        layout: ``n`` elements, then the weight sum, then padding) and check that every slot
        is one an honest round produces: imaginary parts and padding within the noise bound,
        elements within ``max_element`` and the weight sum at most ``max_weight`` (each plus
        the bound). The real parts to release are kept for :meth:`flood`."""
        values = self.decrypt().reshape(-1)
        self._released = None
        elements = values.real[:max(0, min(values.size, n - offset))]
        weight_at = n - offset
        weight = values.real[weight_at] if 0 <= weight_at < values.size else None
        padding = values[max(0, n + 1 - offset):]
        ok = (
            # defence: ckks.release.range-imaginary-parts
            float(np.max(np.abs(values.imag))) <= bound
            # defence: ckks.release.range-padding
            and (padding.size == 0 or float(np.max(np.abs(padding))) <= bound)
            # defence: ckks.release.range-elements
            and (elements.size == 0 or float(np.max(np.abs(elements))) <= max_element + bound)
            # (a weight sum too small, or not positive, is refused once flooded: the release's
            # noise floor, which implies it is positive, in secagg.ckks.release)
            # defence: ckks.release.range-weight-sum
            and (weight is None or weight <= max_weight + bound)
        )
        if ok:
            self._released = values.real[:max(0, min(values.size, n + 1 - offset))].copy()
        return ok

    def flood(self, offset: int, key: bytes, sigma: float, grid: float) -> np.ndarray:
        """The kept real parts (after :meth:`check_range` passed) plus this shard's range of
        the flooding noise, rounded to ``grid``. Once: the values are then forgotten."""
        values, self._released = self._released, None
        if values is None:
            raise RuntimeError("flood before a passed range check")
        # defence: ckks.release.flooding-added
        noisy = gaussian(values.size, sigma, key, start=offset)
        noisy += values
        noisy /= grid  # a power of two: exact
        np.rint(noisy, out=noisy)
        noisy *= grid
        return noisy

    def decrypt(self) -> np.ndarray:
        """The decoded slots of this shard's own sum, ``(chunks, slots)`` complex."""
        if self.sum is None:
            raise RuntimeError("nothing summed")
        decryptor = sealapi.Decryptor(self._context, self._secret_key)
        encoder = sealapi.CKKSEncoder(self._context)
        values = np.empty((len(self.sum), self._slots), dtype=np.complex128)
        plain = sealapi.Plaintext()
        for i, ct in enumerate(self.sum):
            decryptor.decrypt(ct, plain)
            values[i] = np.fromiter(encoder.decode_complex(plain), dtype=np.complex128,
                                    count=self._slots)
        return values


# --- workers --------------------------------------------------------------------------------
#
# Chunks go to a worker, and decoded slots come back, through a buffer shared with that worker
# alone: an anonymous memfd whose descriptor is passed over the worker's socket (no name in
# any file system). Only offsets and lengths are pickled. A buffer holds the worker's range of
# chunks at the longest canonical length (what an honest message needs) and its slots.


class _Buffer:
    """A worker's shared buffer: ``[input: chunks | output: released values]``."""

    def __init__(self, fd: int, input_bytes: int, output_bytes: int) -> None:
        self.fd = fd
        self.input_bytes = input_bytes
        self.map = mmap.mmap(fd, input_bytes + output_bytes)
        self.released = np.frombuffer(self.map, dtype=np.float64, count=output_bytes // 8,
                                      offset=input_bytes)

    def write(self, chunks: Sequence[bytes]) -> list[int] | None:
        """Copy ``chunks`` in; their lengths, or None if they do not fit (never honest)."""
        lengths = [len(c) for c in chunks]
        # (a lying aggregator's oversized chunk: a raw error from the buffer, not a refusal)
        # defence: ckks.shards.chunks-fit-the-buffer
        if sum(lengths) > self.input_bytes:
            return None
        pos = 0
        for c in chunks:
            self.map[pos:pos + len(c)] = c
            pos += len(c)
        return lengths

    def read(self, lengths: Sequence[int]) -> list[bytes]:
        out, pos = [], 0
        for n in lengths:
            out.append(self.map[pos:pos + n])
            pos += n
        return out


def _worker_main(conn: Connection) -> None:
    """A shard worker: initialise from the secret context, then run commands until told to
    exit or the pipe closes. Errors are reported by type name only (no values)."""
    from secagg.ckks.keys import KeyHolder

    fd = reduction.recv_handle(conn)
    state: ShardState | None = None
    buffer: _Buffer | None = None
    while True:
        try:
            command, args = conn.recv()
        except (EOFError, OSError):
            return
        if command == "exit":
            return
        try:
            result: Any = None
            if command == "init":
                context_bytes, scale, slots, input_bytes, output_bytes = args
                holder = KeyHolder.from_secret_context(context_bytes)
                state = ShardState(holder.seal_context, holder.secret_key, scale, slots)
                buffer = _Buffer(fd, input_bytes, output_bytes)
            elif state is None or buffer is None:
                raise RuntimeError("not initialised")
            elif command == "load":
                lengths, kinds = args
                result = state.load(buffer.read(lengths), kinds)
            elif command == "is_my_sum":
                result = state.is_my_sum(buffer.read(args[0]))
            elif command == "check_range":
                result = state.check_range(*args)
            elif command == "flood":
                noisy = state.flood(*args)
                buffer.released[:noisy.size] = noisy
                result = noisy.size
            elif command in ("commit", "drop"):
                getattr(state, command)()
            else:
                raise RuntimeError("unknown command")
            conn.send(("ok", result))
        except Exception as e:  # reported, never raised across the pipe with its values
            conn.send(("error", type(e).__name__))


class _Worker:
    def __init__(self, context_bytes: bytes, scale: float, slots: int, chunks: int,
                 chunk_bytes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True,
                                   name="secagg-release-shard")
        self.process.start()
        child.close()
        input_bytes, output_bytes = chunks * chunk_bytes, chunks * slots * 8
        fd = os.memfd_create("secagg-release-shard", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, input_bytes + output_bytes)
            reduction.send_handle(self.conn, fd, self.process.pid)
            self.buffer = _Buffer(fd, input_bytes, output_bytes)
        except BaseException:
            os.close(fd)
            raise
        self.conn.send(("init", (context_bytes, scale, slots, input_bytes, output_bytes)))

    def send(self, command: str, *args: Any) -> None:
        try:
            self.conn.send((command, args))
        except (OSError, ValueError):
            raise WorkersFailed(f"a release worker process died: {WORKERS_GUARD_HINT}"
                                ) from None

    def recv(self) -> Any:
        try:
            # a worker that neither answers nor dies (stopped with SIGSTOP, or swapped out
            # for good) held its key holder in this call for ever, past every round's end
            # defence: ckks.shards.worker-answer-bounded
            if not self.conn.poll(WORKER_ANSWER_SECONDS):
                self.process.kill()
                raise WorkersFailed(f"a release worker process gave no answer in "
                                    f"{WORKER_ANSWER_SECONDS:g} s (stopped?); it was ended")
            status, result = self.conn.recv()
        except (EOFError, OSError):
            raise WorkersFailed(f"a release worker process died: {WORKERS_GUARD_HINT}"
                                ) from None
        if status != "ok":
            raise SecAggError(f"a release worker failed ({result})")
        return result


def _stop(workers: list[_Worker]) -> None:
    for w in workers:
        with contextlib.suppress(Exception):
            w.conn.send(("exit", ()))
    for w in workers:
        w.process.join(timeout=5)
        if w.process.is_alive():
            w.process.kill()
        w.conn.close()
        with contextlib.suppress(Exception):
            w.buffer.released = np.empty(0)  # drop the view first
            w.buffer.map.close()
        os.close(w.buffer.fd)


class ShardedSum:
    """The key holder's sum over ``chunk_count`` chunks, in ``workers`` shards: the shards
    run in worker processes if ``workers`` > 1 (started at construction, so their start-up
    overlaps the first downloads), else in this process."""

    def __init__(self, holder: Any, scale: float, slots: int, chunk_count: int,
                 workers: int = 1) -> None:
        workers = max(1, min(workers, chunk_count))
        bounds = np.linspace(0, chunk_count, workers + 1).round().astype(int)
        self._ranges = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self._slots = slots
        self._local: ShardState | None = None
        self._workers: list[_Worker] = []
        self._broken = False
        if workers == 1:
            self._local = ShardState(holder.seal_context, holder.secret_key, scale, slots)
        else:
            context_bytes = holder.export_secret_context()
            longest = max(_seal.encoded_length(holder.seal_context, k) for k in _seal.Kind)
            try:
                for r in self._ranges:
                    self._workers.append(_Worker(context_bytes, scale, slots,
                                                 r.stop - r.start, longest))
            finally:
                self._finalizer = weakref.finalize(self, _stop, self._workers)
            for w in self._workers:
                w.recv()  # initialised

    @property
    def local(self) -> ShardState | None:
        """The in-process shard (``workers`` == 1), for tests."""
        return self._local

    def _gather(self) -> list[Any]:
        """Every worker's answer to the command just sent. All are read even when one failed
        (an unread answer would be taken for the next command's), and then the sum is
        unusable: the shards no longer hold one sum."""
        results: list[Any] = []
        failure: SecAggError | None = None
        for w in self._workers:
            try:
                results.append(w.recv())
            except SecAggError as e:
                failure = failure or e
                results.append(None)
        # defence: ckks.release.worker-answers-all-read
        if failure is not None:
            self._broken = True
            raise failure
        return results

    def _check_usable(self) -> None:
        if self._broken:
            raise SecAggError("a release worker failed earlier: this sum cannot be released")

    def _broadcast(self, command: str) -> list[Any]:
        self._check_usable()
        for w in self._workers:
            w.send(command)
        return self._gather()

    def _with_chunks(self, command: str, chunks: Sequence[bytes], *args: Any) -> bool:
        """Send each worker its range of ``chunks`` through its buffer: all workers' answers
        (False at once if a range does not fit its buffer: no honest message is that long)."""
        self._check_usable()
        lengths = [w.buffer.write(chunks[r]) for w, r in zip(self._workers, self._ranges,
                                                              strict=True)]
        # defence: ckks.shards.unfit-range-refused
        if any(n is None for n in lengths):
            return False
        for w, n in zip(self._workers, lengths, strict=True):
            w.send(command, n, *args)
        return all(self._gather())

    def add(self, chunks: Sequence[bytes], kinds: Collection[_seal.Kind]) -> None:
        """Add one upload's chunks, all or nothing; ``InvalidMessage`` if any is malformed."""
        kinds = tuple(kinds)
        if self._local is not None:
            loaded = self._local.load(chunks, kinds)
        else:
            loaded = self._with_chunks("load", chunks, kinds)
        # defence: ckks.release.upload-all-or-nothing
        if not loaded:
            if self._local is not None:
                self._local.drop()
            else:
                self._broadcast("drop")
            raise InvalidMessage("ciphertext")
        if self._local is not None:
            self._local.commit()
        else:
            self._broadcast("commit")

    def is_my_sum(self, chunks: Sequence[bytes]) -> bool:
        if len(chunks) != self._ranges[-1].stop:
            return False
        if self._local is not None:
            return self._local.is_my_sum(chunks)
        return self._with_chunks("is_my_sum", chunks)

    def check_range(self, n: int, bound: float, max_element: float, max_weight: float) -> bool:
        """Every shard decrypts its own sum and checks its slots (see ShardState)."""
        offsets = [r.start * self._slots for r in self._ranges]
        if self._local is not None:
            return self._local.check_range(0, n, bound, max_element, max_weight)
        self._check_usable()
        for w, offset in zip(self._workers, offsets, strict=True):
            w.send("check_range", offset, n, bound, max_element, max_weight)
        # defence: ckks.release.every-shard-in-range
        return all(self._gather())

    def flood(self, key: bytes, sigma: float, grid: float) -> np.ndarray:
        """The released values (elements, then the weight sum), flooded and rounded."""
        if self._local is not None:
            return self._local.flood(0, key, sigma, grid)
        self._check_usable()
        for w, r in zip(self._workers, self._ranges, strict=True):
            w.send("flood", r.start * self._slots, key, sigma, grid)
        sizes = self._gather()
        return np.concatenate([w.buffer.released[:size]
                               for w, size in zip(self._workers, sizes, strict=True)])

    def decrypt(self) -> np.ndarray:
        """Hazardous (noise measurements only; in-process shards only): all decoded slots,
        flat, in chunk order, without range checks or flooding."""
        if self._local is None:
            raise RuntimeError("raw decryption is only available in-process")
        return self._local.decrypt().reshape(-1)

    def stop_soon(self) -> None:
        """Tell the workers to exit, without waiting (:meth:`close` waits)."""
        for w in self._workers:
            with contextlib.suppress(Exception):
                w.conn.send(("exit", ()))

    def close(self) -> None:
        if self._workers:
            self._finalizer()
