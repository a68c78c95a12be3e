"""The aggregator's role in a CKKS round (sans-I/O): add ciphertexts, nothing else.

It holds a :class:`PublicContext` (no secret key) and one running sum of ``chunk_count``
ciphertexts, so memory is O(model size). TenSEAL's ciphertext copy needs the secret key, so
the sum starts as the first upload's own loaded ciphertexts and grows by in-place additions.
An upload is checked whole (round, key, site, shape, signature, every chunk parses at the
round's level and scale, in the canonical format of :mod:`secagg.ckks._seal`, of the kind its
signed ``seeded`` flag announces) before any of it is added: a refused upload leaves the sum
untouched. The aggregate goes out as full (non-seeded) ciphertexts in the same format.
"""

from __future__ import annotations

from typing import Any

from tenseal import sealapi

from secagg.ckks import _seal
from secagg.ckks.keys import KeyHolder, PublicContext
from secagg.ckks.round import (
    CkksRoundConfig,
    CkksStage,
    EncryptedAggregate,
    EncryptedUpdate,
    check_update_fields,
)
from secagg.errors import (
    AbortReason,
    ConfigurationError,
    PreconditionError,
    ProtocolAbort,
    RefusalReason,
    RefusedMessage,
)
from secagg.hazmat import signing
from secagg.metrics import MetricsListener, NullListener


class CkksServer:
    def __init__(self, config: CkksRoundConfig, context: PublicContext,
                 listener: MetricsListener | None = None) -> None:
        # The aggregator must never hold the secret key, whatever it is handed at run time.
        # defence: ckks.server.public-context-only
        if isinstance(context, KeyHolder) or not isinstance(context, PublicContext):
            raise RefusedMessage(RefusalReason.CONTEXT_HAS_SECRET_KEY,
                                 "the aggregator takes a PublicContext only")
        if not isinstance(config, CkksRoundConfig):
            raise ConfigurationError("config must be a CkksRoundConfig")
        # defence: ckks.server.context-is-the-rounds-key
        if context.key_id != config.key_id:
            raise RefusedMessage(RefusalReason.WRONG_KEY_ID, "public context is not the round's")
        if context.preset != config.preset_params:
            raise ConfigurationError("public context parameters differ from the round's preset")
        self.config = config
        self.stage = CkksStage.UPLOAD
        self._context = context
        self._evaluator = sealapi.Evaluator(context.seal_context)
        self._sum: list[Any] | None = None
        self._sites: list[int] = []
        self._listener = listener or NullListener()

    def __repr__(self) -> str:
        return f"CkksServer(round_id={self.config.round_id!r}, stage={self.stage.name})"

    @property
    def sites(self) -> tuple[int, ...]:
        return tuple(self._sites)

    def handle(self, update: EncryptedUpdate) -> None:
        """Check one upload whole, then add it. Raises (and adds nothing) if it is refused."""
        # defence: ckks.server.upload-stage
        if self.stage is not CkksStage.UPLOAD:
            raise PreconditionError(f"EncryptedUpdate is not valid in stage {self.stage.name}")
        config = self.config
        check_update_fields(update)
        # defence: ckks.server.upload-round
        if update.round_id != config.round_id:
            raise RefusedMessage(RefusalReason.WRONG_ROUND)
        # defence: ckks.server.upload-key
        if update.key_id != config.key_id:
            raise RefusedMessage(RefusalReason.WRONG_KEY_ID)
        # defence: ckks.server.upload-site-on-roster
        if update.site_id not in config.roster:
            raise RefusedMessage(RefusalReason.UNKNOWN_SITE)
        # defence: ckks.server.distinct-sites
        if update.site_id in self._sites:
            raise RefusedMessage(RefusalReason.DUPLICATE_SITE)
        # defence: ckks.server.upload-shape
        if len(update.chunks) != config.chunk_count:
            raise RefusedMessage(RefusalReason.WRONG_SHAPE,
                                 f"{len(update.chunks)} chunks, expected {config.chunk_count}")
        signed = EncryptedUpdate.signed_bytes(config.params_digest, update.site_id, update.key_id,
                                              update.seeded, update.chunks)
        # defence: ckks.server.upload-signature-verified
        signing.verify(config.roster[update.site_id], update.signature, signed)
        scale = config.preset_params.scale
        # defence: ckks.server.upload-kind-as-signed
        kinds = (_seal.Kind.SEEDED,) if update.seeded else (_seal.Kind.FULL,)
        # defence: ckks.server.whole-upload-parsed-before-adding
        loaded = [_seal.load_ciphertext(self._context.seal_context, c, scale=scale, kinds=kinds)
                  for c in update.chunks]
        if self._sum is None:
            self._sum = loaded
        else:
            for acc, ct in zip(self._sum, loaded, strict=True):
                _seal.add_inplace(self._evaluator, acc, ct)
        self._sites.append(update.site_id)

    def close_stage(self) -> dict[int, EncryptedAggregate]:
        """End the upload stage: the aggregate, addressed to each key holder."""
        if self.stage is not CkksStage.UPLOAD:
            raise PreconditionError(f"no stage to close in stage {self.stage.name}")
        # defence: ckks.server.min-sites
        if self._sum is None or len(self._sites) < self.config.min_sites:
            self.stage = CkksStage.ABORTED
            self._sum = None
            self._listener.round_aborted(self.config.round_id, "UPLOAD", "TOO_FEW_SURVIVORS")
            raise ProtocolAbort(AbortReason.TOO_FEW_SURVIVORS,
                                f"{len(self._sites)} uploads, min_sites {self.config.min_sites}")
        aggregate = EncryptedAggregate(
            self.config.round_id, self.config.key_id, tuple(sorted(self._sites)),
            tuple(_seal.dump_ciphertext(ct, self._context.seal_context,
                                        scale=self.config.preset_params.scale)
                  for ct in self._sum))
        self._sum = None
        self.stage = CkksStage.COMPLETED
        self._listener.stage_closed(self.config.round_id, "UPLOAD", len(self._sites))
        self._listener.round_completed(self.config.round_id, len(self._sites))
        return dict.fromkeys(self.config.key_holders, aggregate)
