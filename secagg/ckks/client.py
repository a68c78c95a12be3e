"""The site's role in a CKKS round (sans-I/O): encrypt one weighted update; if the site is a
key holder, decrypt and release the aggregate.

``start()`` returns the :class:`EncryptedUpdate` to upload; ``handle(EncryptedAggregate)``
returns the :class:`ReleasedAverage` (key holders only).

Release (why rounding): a CKKS decryption carries noise that depends on the secret key, and
publishing it can leak the key (Li and Micciancio, EUROCRYPT 2021). Before the average leaves a
key holder we add Gaussian flooding noise of the size of the CKKS error bound (from a CSPRNG)
and round the decrypted sums to a power-of-two grid at least as coarse as that bound, so the
released values carry none of the decryption noise's low bits.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tenseal import sealapi

from secagg._inputs import check_site
from secagg.ckks import _chunks, _seal
from secagg.ckks.keys import KeyHolder, PublicContext
from secagg.ckks.round import (
    CkksRoundConfig,
    CkksStage,
    EncryptedAggregate,
    EncryptedUpdate,
    ReleasedAverage,
)
from secagg.errors import (
    AbortReason,
    InvalidMessage,
    PreconditionError,
    ProtocolAbort,
    RefusalReason,
    RefusedMessage,
)
from secagg.hazmat import signing
from secagg.hazmat.prg import MaskExpander

ProgressCallback = Callable[[int, int], None]  # (chunks done, chunks total)
InputProvider = Callable[[], tuple[np.ndarray, float]]


class CkksClient:
    def __init__(
        self,
        config: CkksRoundConfig,
        site_id: int,
        identity: signing.IdentityKey,
        context: PublicContext | KeyHolder,
        model_input: tuple[np.ndarray, float] | InputProvider,
        *,
        seeded: bool | None = None,
        workers: int = 1,
        progress: ProgressCallback | None = None,
    ) -> None:
        check_site(config.roster, site_id, identity)
        if not callable(model_input):
            config.check_input(*model_input)  # a bad input fails here, not mid-round
        if context.key_id != config.key_id:
            raise RefusedMessage(RefusalReason.WRONG_KEY_ID, "context is not the round's key")
        if context.preset != config.preset_params:
            raise ValueError("context parameters differ from the round's preset")
        holds_key = isinstance(context, KeyHolder)
        if seeded is None:
            seeded = holds_key
        if seeded and not holds_key:
            raise ValueError("seeded encryption needs the secret key: this site has only the "
                             "public context (use seeded=False)")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.config = config
        self.site_id = site_id
        self._identity = identity
        self._context = context
        self._input = model_input
        self.seeded = seeded
        self.workers = workers
        self._progress = progress
        self.stage = CkksStage.UPLOAD

    def __repr__(self) -> str:
        return f"CkksClient(site_id={self.site_id}, stage={self.stage.name})"

    def start(self) -> EncryptedUpdate:
        if self.stage is not CkksStage.UPLOAD:
            raise PreconditionError(f"start is not valid in stage {self.stage.name}")
        update, weight = self._input() if callable(self._input) else self._input
        self._input = (np.empty(0), 0.0)
        rows = self.config.layout(update, weight)
        chunks = tuple(self._encrypt(rows))
        sig = self._identity.sign(EncryptedUpdate.signed_bytes(
            self.config.params_digest, self.site_id, self.config.key_id, self.seeded, chunks))
        self.stage = (CkksStage.RELEASE if self.site_id in self.config.key_holders
                      else CkksStage.COMPLETED)
        return EncryptedUpdate(self.config.round_id, self.config.key_id, self.site_id, chunks,
                               self.seeded, sig)

    def _encrypt(self, rows: np.ndarray) -> list[bytes]:
        total = rows.shape[0]
        report = self._progress or (lambda done, total: None)
        if self.workers == 1 or total < 2 * self.workers:
            encryptor = _chunks.ChunkEncryptor.for_context(self._context, self.seeded)
            out = []
            step = max(1, total // 20)
            for i, row in enumerate(rows, 1):
                out.append(encryptor.encrypt_row(row))
                if i % step == 0 or i == total:
                    report(i, total)
            return out
        context_bytes = (self._context.export_secret_context()
                         if isinstance(self._context, KeyHolder) and self.seeded
                         else self._public_bytes())
        blocks = np.array_split(rows, min(total, self.workers * 8))
        done = 0
        out = []
        with ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_chunks.worker_init, initargs=(context_bytes, self.seeded),
        ) as pool:
            for block_out in pool.map(_chunks.worker_encrypt, blocks):
                out.extend(block_out)
                done += len(block_out)
                report(done, total)
        return out

    def _public_bytes(self) -> bytes:
        ctx = self._context
        return (ctx.public_context() if isinstance(ctx, KeyHolder) else ctx).serialize()

    def handle(self, aggregate: EncryptedAggregate) -> ReleasedAverage:
        """Key holders: decrypt the round's aggregate and release the rounded average."""
        if self.stage is not CkksStage.RELEASE:
            raise PreconditionError(f"EncryptedAggregate is not valid in stage {self.stage.name}")
        assert isinstance(self._context, KeyHolder)
        released = release_average(self._context, self.config, aggregate)
        self.stage = CkksStage.COMPLETED
        return released


def _check_aggregate(holder: KeyHolder, config: CkksRoundConfig,
                     aggregate: EncryptedAggregate) -> None:
    if aggregate.round_id != config.round_id:
        raise RefusedMessage(RefusalReason.WRONG_ROUND)
    if aggregate.key_id != config.key_id or holder.key_id != config.key_id:
        raise RefusedMessage(RefusalReason.WRONG_KEY_ID)
    sites = aggregate.sites
    if len(set(sites)) != len(sites):
        raise RefusedMessage(RefusalReason.DUPLICATE_SITE)
    if not set(sites) <= set(config.roster):
        raise RefusedMessage(RefusalReason.UNKNOWN_SITE)
    if len(sites) < config.min_sites:
        raise ProtocolAbort(AbortReason.TOO_FEW_SURVIVORS,
                            f"aggregate of {len(sites)} sites, min_sites {config.min_sites}")
    if len(aggregate.chunks) != config.chunk_count:
        raise RefusedMessage(RefusalReason.WRONG_SHAPE)


def decrypt_aggregate(holder: KeyHolder, config: CkksRoundConfig,
                      aggregate: EncryptedAggregate) -> tuple[np.ndarray, float]:
    """Hazardous: the raw, noisy (weighted sum, weight sum). Never release these as they are;
    :func:`release_average` is the way out."""
    _check_aggregate(holder, config, aggregate)
    context = holder.seal_context
    scale = config.preset_params.scale
    decryptor = sealapi.Decryptor(context, holder.secret_key)
    encoder = sealapi.CKKSEncoder(context)
    slots = config.preset_params.slots
    values = np.empty(len(aggregate.chunks) * slots)
    for i, data in enumerate(aggregate.chunks):
        ct = _seal.load_ciphertext(context, data, scale=scale, kinds=(_seal.Kind.FULL,))
        plain = sealapi.Plaintext()
        decryptor.decrypt(ct, plain)
        values[i * slots:(i + 1) * slots] = encoder.decode_double(plain)
    n = config.vector_length
    return values[:n], float(values[n])


def _gaussian(count: int, sigma: float) -> np.ndarray:
    """N(0, sigma^2) samples from an AES-CTR stream under a fresh os.urandom key (Box-Muller)."""
    words = MaskExpander(2 * count, word_bits=32).view(os.urandom(32)).astype(np.float64)
    u1 = (words[:count] + 1.0) * 2.0**-32  # (0, 1]
    u2 = words[count:] * 2.0**-32
    return sigma * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def release_average(holder: KeyHolder, config: CkksRoundConfig,
                    aggregate: EncryptedAggregate) -> ReleasedAverage:
    """Decrypt the aggregate, flood and round it, and divide: the only safe way out."""
    weighted, weight_sum = decrypt_aggregate(holder, config, aggregate)
    bound = config.preset_params.noise_bound(len(aggregate.sites))
    grid = 2.0 ** math.ceil(math.log2(bound))
    noisy = np.append(weighted, weight_sum) + _gaussian(weighted.shape[0] + 1, bound)
    rounded = np.round(noisy / grid) * grid
    if rounded[-1] <= 0:
        raise InvalidMessage("aggregate")  # a true sum of weights is > 0
    return ReleasedAverage(rounded[:-1] / rounded[-1], float(rounded[-1]), aggregate.sites, grid)
