"""The site's role in a CKKS round (sans-I/O): encrypt one weighted update; if the site is a
key holder, verify and release the aggregate.

``start()`` returns the :class:`EncryptedUpdate` to upload; ``handle(ReleaseRequest)`` returns
the :class:`ReleasedAverage` (key holders only), through :mod:`secagg.ckks.release`, which
recomputes the sum from the signed uploads before decrypting anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from secagg._inputs import check_site, input_pair
from secagg.ckks import _chunks
from secagg.ckks.keys import KeyHolder, PublicContext
from secagg.ckks.release import release_average
from secagg.ckks.round import (
    CkksRoundConfig,
    CkksStage,
    EncryptedUpdate,
    ReleasedAverage,
    ReleaseRequest,
)
from secagg.errors import (
    WORKERS_GUARD_HINT,
    InvalidMessage,
    PreconditionError,
    RefusalReason,
    RefusedMessage,
    WorkersFailed,
)
from secagg.hazmat import signing
from secagg.hazmat.secret import scrubs_locals

ProgressCallback = Callable[[int, int], None]  # (chunks done, chunks total)
InputProvider = Callable[[], tuple[np.ndarray, float]]


class CkksClient:
    # defence: ckks.client.refusals-at-construction-leave-no-locals
    @scrubs_locals  # (a refused input: the update in the checks' frames)
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
        if not isinstance(config, CkksRoundConfig):
            raise TypeError(f"config must be a CkksRoundConfig, got {type(config).__name__}")
        site_id = check_site(config.roster, site_id, identity)
        # defence: ckks.client.input-checked-at-construction
        if not callable(model_input):
            config.check_input(*input_pair(model_input))  # a bad input fails here, not mid-round
        # defence: ckks.client.context-type
        if not isinstance(context, PublicContext | KeyHolder):
            raise TypeError("context must be the round's PublicContext (or the KeyHolder "
                            f"that made it), got {type(context).__name__}")
        # defence: ckks.client.context-is-the-rounds-key
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
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers must be an int, got {type(workers).__name__}")
        # defence: ckks.client.workers-at-least-one
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
        # (getattr: a half-built client, in a traceback's locals, made the report itself fail)
        stage = getattr(self, "stage", None)
        return (f"CkksClient(site_id={getattr(self, 'site_id', None)}, "
                f"stage={stage.name if stage is not None else None})")

    # defence: ckks.client.exceptions-leave-no-locals
    @scrubs_locals  # (its frames hold the site's update: hazmat.secret.scrub_locals)
    def start(self) -> EncryptedUpdate:
        if self.stage is not CkksStage.UPLOAD:
            raise PreconditionError(f"start is not valid in stage {self.stage.name}")
        update, weight = input_pair(self._input() if callable(self._input) else self._input)
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
        key = hashlib.sha256(context_bytes).digest()
        pool = _chunks.shared_pool(self.workers)
        futures: list[Any] = []
        done = 0
        out = []
        try:
            # a few blocks per worker: balanced, and progress to report (a worker that dies
            # while they are handed out breaks the pool at submit: named as below)
            # defence: ckks.workers-failed-at-submit-named
            try:
                for block in np.array_split(rows, min(total, self.workers * 4)):
                    futures.append(pool.submit(_chunks.worker_encrypt, key, context_bytes,
                                               self.seeded, block))
            except BrokenProcessPool:
                raise WorkersFailed(f"the encryption worker processes died: "
                                    f"{WORKERS_GUARD_HINT}") from None
            for future in futures:
                # (a worker that died, one that ran an unguarded training script's
                # Site.connect as it started among them, broke the pool: raw
                # multiprocessing text, or a hang while the copy ran the script)
                # defence: ckks.workers-failed-named
                try:
                    block_out = future.result()
                except BrokenProcessPool:
                    raise WorkersFailed(f"the encryption worker processes died: "
                                        f"{WORKERS_GUARD_HINT}") from None
                out.extend(block_out)
                done += len(block_out)
                report(done, total)
        finally:
            for future in futures:
                future.cancel()
        return out

    def _public_bytes(self) -> bytes:
        ctx = self._context
        return (ctx.public_context() if isinstance(ctx, KeyHolder) else ctx).serialize()

    def handle(self, request: ReleaseRequest) -> ReleasedAverage:
        """Key holders: verify the uploads, check the aggregate is their sum, release."""
        if self.stage is not CkksStage.RELEASE:
            raise PreconditionError(f"ReleaseRequest is not valid in stage {self.stage.name}")
        if not isinstance(request, ReleaseRequest):
            raise InvalidMessage("release request")
        assert isinstance(self._context, KeyHolder)
        released = release_average(self._context, self.config, request.aggregate,
                                   request.uploads, site_id=self.site_id)
        self.stage = CkksStage.COMPLETED
        return released
