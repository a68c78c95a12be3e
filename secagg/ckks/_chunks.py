"""Encrypting rows of slots into serialised ciphertexts (our canonical format, see
:mod:`secagg.ckks._seal`), in this process or in workers.

TenSEAL's bindings hold the GIL and are single-threaded, so parallel encryption means several
processes; each gets the context as bytes over a pipe (never a file) and encrypts a block of
rows. The processes are a pool kept for the life of the process (:func:`shared_pool`).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from tenseal import sealapi

from secagg.ckks import _seal


class ChunkEncryptor:
    """Encode + encrypt + serialise rows. ``secret_key`` given: seeded symmetric encryption
    (kind SEEDED); otherwise public-key encryption (kind FULL)."""

    def __init__(self, seal_context: Any, scale: float, *, public_key: Any = None,
                 secret_key: Any = None) -> None:
        if (public_key is None) == (secret_key is None):
            raise ValueError("give exactly one of public_key and secret_key")
        self._context = seal_context
        self._scale = scale
        self._encoder = sealapi.CKKSEncoder(seal_context)
        self._seeded = secret_key is not None
        self._encryptor = sealapi.Encryptor(seal_context, secret_key if self._seeded
                                            else public_key)

    @classmethod
    def for_context(cls, context: Any, seeded: bool) -> ChunkEncryptor:
        """From a KeyHolder (seeded or not) or a PublicContext (public-key only)."""
        scale = context.preset.scale
        if seeded:
            return cls(context.seal_context, scale, secret_key=context.secret_key)
        return cls(context.seal_context, scale, public_key=context.public_key)

    def encrypt_row(self, row: np.ndarray) -> bytes:
        plain = sealapi.Plaintext()
        self._encoder.encode(row, self._scale, plain)
        if self._seeded:
            # The Serializable form keeps the second polynomial as a PRNG seed: half the bytes.
            return _seal.dump_ciphertext(self._encryptor.encrypt_symmetric(plain), self._context,
                                         scale=self._scale)
        ct = sealapi.Ciphertext(self._context)
        self._encryptor.encrypt(plain, ct)
        return _seal.dump_ciphertext(ct, self._context, scale=self._scale)


# --- worker processes ------------------------------------------------------------------
#
# One pool per process, started on first use and kept: starting a worker (a Python that
# imports TenSEAL) costs more than encrypting a million values, so a pool per round would
# make parallel encryption slower than serial. Each task carries the context bytes and a
# digest of them; a worker loads a context once and keeps the last few.

_worker_contexts: dict[tuple[bytes, bool], ChunkEncryptor] = {}


def worker_encrypt(key: bytes, context_bytes: bytes, seeded: bool,
                   rows: np.ndarray) -> list[bytes]:
    """In a worker: encrypt ``rows`` under the context ``context_bytes`` (digest ``key``)."""
    from secagg.ckks.keys import KeyHolder, PublicContext

    # a secret context (seeded encryption, a key holder's) is never kept: the pool outlives
    # the round, and its workers held up to four rounds' secret keys after their key files
    # were gone
    # defence: ckks.workers-keep-no-secret-context
    if seeded:
        secret = ChunkEncryptor.for_context(KeyHolder.from_secret_context(context_bytes), True)
        return [secret.encrypt_row(r) for r in rows]
    encryptor = _worker_contexts.get((key, seeded))
    if encryptor is None:
        context = PublicContext.load(context_bytes)
        if len(_worker_contexts) >= 4:
            _worker_contexts.clear()
        encryptor = _worker_contexts[(key, seeded)] = ChunkEncryptor.for_context(context, seeded)
    return [encryptor.encrypt_row(r) for r in rows]


_pool: ProcessPoolExecutor | None = None
_pool_workers = 0


def _end_with_parent(parent: int) -> None:
    """In each worker: exit once the process that started the pool is gone (a site killed
    with kill -9 left its encryption workers, and their semaphores, running under init)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="secagg-parent-watch").start()


def shared_pool(workers: int) -> ProcessPoolExecutor:
    """This process's encryption pool with ``workers`` processes (restarted if the count
    changes or a worker died)."""
    global _pool, _pool_workers
    if _pool is not None and (_pool_workers != workers or getattr(_pool, "_broken", False)):
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None
    if _pool is None:
        # defence: ckks.workers-end-with-their-parent
        _pool = ProcessPoolExecutor(max_workers=workers,
                                    mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_end_with_parent, initargs=(os.getpid(),))
        _pool_workers = workers
    return _pool


def shutdown_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None
