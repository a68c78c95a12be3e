"""The aggregator's role in a masking round: a sans-I/O state machine holding no secret.

The driver (a test, the simulation, the gRPC service) hands site messages to
:meth:`MaskingServer.handle` as they arrive and calls :meth:`MaskingServer.close_stage` when a
stage's deadline passes (or every expected site has answered). ``close_stage`` returns the
messages to deliver, by recipient, or raises :class:`~secagg.errors.ProtocolAbort` when fewer
than ``threshold`` sites remain.

Memory is O(vector length): masked inputs are added into one running sum as they arrive and
never kept. A site message that fails its checks is refused (:class:`InvalidMessage` or
:class:`PreconditionError`) and that site is treated as dropped; it does not abort the round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from secagg._encoding import payload_digest
from secagg.errors import AbortReason, InvalidMessage, PreconditionError, ProtocolAbort
from secagg.hazmat import aead, shamir, signing
from secagg.hazmat.key_agreement import (
    PUBLIC_KEY_BYTES,
    exchange,
    key_class,
    private_key_from_bytes,
)
from secagg.hazmat.prg import SEED_BYTES, MaskTerm, RangeSplitMasker, apply_masks, word_dtype
from secagg.masking import _common
from secagg.masking.config import RoundConfig
from secagg.masking.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    KeyDirectory,
    MaskAttestation,
    MaskedInput,
    ServerMessage,
    ShareDelivery,
    ShareKeys,
    SiteMessage,
    Stage,
    SurvivorList,
    UnmaskRequest,
    UnmaskResponse,
    share_commitment,
)
from secagg.metrics import MetricsListener, NullListener

SEALED_SHARE_BYTES = aead.NONCE_BYTES + 2 * shamir.SHARE_BYTES + aead.TAG_BYTES


def _key_class(key: bytes) -> bytes | None:
    """The class of a 32-byte, canonical X25519 public key that is not a low-order point
    (``key_class``: keys of one class agree on every secret), or None."""
    if len(key) != PUBLIC_KEY_BYTES:
        return None
    try:
        return key_class(key)
    except InvalidMessage:
        return None


@dataclass(frozen=True)
class AggregateResult:
    """What the round reveals: sums over the survivors, never a single site's input."""

    weighted_sum: np.ndarray  # sum of weight * clip(update)
    weight_sum: float
    survivors: tuple[int, ...]
    error_bound: tuple[float, float]  # max abs error of (weighted_sum elements, weight_sum)

    @property
    def average(self) -> np.ndarray:
        """The weighted average update."""
        return self.weighted_sum / self.weight_sum


def _is_share(raw: bytes) -> bool:
    try:
        shamir.share_from_bytes(raw)
    except ValueError:
        return False
    return True


class MaskingServer:
    def __init__(self, config: RoundConfig, listener: MetricsListener | None = None, *,
                 splitter: RangeSplitMasker | None = None) -> None:
        self.config = config
        self._splitter = splitter
        self.stage = Stage.ADVERTISE_KEYS
        self.abort_reason: AbortReason | None = None
        self.result: AggregateResult | None = None
        self.mask_keystream_bytes = 0
        self._listener = listener or NullListener()
        self._t = config.reconstruction_threshold
        self._advertised: dict[int, AdvertiseKeys] = {}
        self._key_classes: dict[int, tuple[bytes, bytes]] = {}  # site -> (encryption, masking)
        self._session = b""
        self._share_keys: dict[int, ShareKeys] = {}
        self._running_sum = np.zeros(config.vector_length + 1, dtype=word_dtype(config.word_bits))
        self._masked_from: set[int] = set()
        self._attestations: dict[int, MaskAttestation] = {}
        self._minimum = config.minimum_participants
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._verified: dict[int, UnmaskResponse] = {}

    def __repr__(self) -> str:
        return f"MaskingServer(round_id={self.config.round_id!r}, stage={self.stage.name})"

    @property
    def participants(self) -> tuple[int, ...]:
        """Sites still in the round at the current stage."""
        current = {
            Stage.ADVERTISE_KEYS: self.config.roster.keys(),
            Stage.SHARE_KEYS: self._advertised.keys(),
            Stage.MASKED_INPUT: self._share_keys.keys(),
            Stage.CONSISTENCY_CHECK: self._survivors,
            Stage.UNMASK: self._signatures.keys(),
        }.get(self.stage, ())
        return tuple(sorted(current))

    # ---- receiving --------------------------------------------------------------------------

    def handle(self, message: SiteMessage) -> None:
        """Record one site message. Raises (and ignores the message) if it is refused."""
        expected = {
            AdvertiseKeys: Stage.ADVERTISE_KEYS,
            ShareKeys: Stage.SHARE_KEYS,
            MaskedInput: Stage.MASKED_INPUT,
            ConsistencySignature: Stage.CONSISTENCY_CHECK,
            UnmaskResponse: Stage.UNMASK,
        }.get(type(message))
        if expected is None:
            raise PreconditionError(f"unexpected message type {type(message).__name__}")
        # defence: masking.server.stage-checked
        if self.stage is not expected:
            raise PreconditionError(
                f"{type(message).__name__} is not valid in stage {self.stage.name}"
            )
        try:  # plain types only: ids that are ints, byte fields that are bytes, dicts
            # defence: masking.server.plain-fields
            message = message.normalized()
        except (TypeError, ValueError, AttributeError, RecursionError):
            raise InvalidMessage(type(message).__name__) from None
        site = message.site_id
        # defence: masking.server.participants-only
        if site not in self.participants:
            raise PreconditionError(f"site {site} is not a participant of stage {expected.name}")
        # defence: masking.server.one-answer-per-stage
        if site in self._received():
            raise PreconditionError(f"site {site} already answered stage {expected.name}")
        if isinstance(message, AdvertiseKeys):
            self._on_advertise(message)
        elif isinstance(message, ShareKeys):
            self._on_share_keys(message)
        elif isinstance(message, MaskedInput):
            self._on_masked_input(message)
        elif isinstance(message, ConsistencySignature):
            self._on_consistency(message)
        else:
            self._on_unmask(message)

    def _received(self) -> Mapping[int, object] | set[int]:
        table: dict[Stage, Mapping[int, object] | set[int]] = {
            Stage.ADVERTISE_KEYS: self._advertised,
            Stage.SHARE_KEYS: self._share_keys,
            Stage.MASKED_INPUT: self._masked_from,
            Stage.CONSISTENCY_CHECK: self._signatures,
            Stage.UNMASK: self._responses,
        }
        return table[self.stage]

    def _verify(self, site: int, signature: bytes, message: bytes) -> None:
        signing.verify(self.config.roster[site], signature, message)

    def _on_advertise(self, msg: AdvertiseKeys) -> None:
        # defence: masking.server.advertisement-verified
        self._verify(msg.site_id, msg.signature, AdvertiseKeys.signed_bytes(
            self.config.params_digest, msg.site_id, msg.encryption_public_key,
            msg.masking_public_key))
        # A key that is the wrong size, a copy of another key or a low-order point would make
        # every honest site abort on the directory: refuse it here and drop only this site.
        # (compared by class: a copy in another encoding agrees on every secret too)
        classes = [_key_class(k) for k in (msg.encryption_public_key, msg.masking_public_key)]
        taken = {c for pair in self._key_classes.values() for c in pair}
        # defence: masking.server.advertised-keys-sound
        enc, mask = classes
        if enc is None or mask is None or enc == mask or enc in taken or mask in taken:
            raise InvalidMessage("advertised keys")
        self._advertised[msg.site_id] = msg
        self._key_classes[msg.site_id] = (enc, mask)

    def _on_share_keys(self, msg: ShareKeys) -> None:
        allowed = (self.config.neighbourhood(msg.site_id) & self._advertised.keys()) - {msg.site_id}
        # exactly its neighbours in the directory, as an honest site seals: shares addressed
        # outside them would make honest non-neighbours abort, and a share left out for one
        # of them pushed that site under its threshold of senders (colluders chose who
        # dropped, and read the sum of the sites left)
        # defence: masking.server.share-recipients-are-neighbours
        if set(msg.encrypted_shares) != allowed:
            raise InvalidMessage("share recipients")
        # every sealed share is one pair of Shamir shares under AES-GCM, so its size is
        # known: a larger one made the delivery to its recipient exceed the message limit
        # (RESOURCE_EXHAUSTED at that site, which then dropped, and nothing named the
        # sender), and stayed in the store
        # defence: masking.server.sealed-share-size
        if any(not isinstance(c, bytes) or len(c) != SEALED_SHARE_BYTES
               for c in msg.encrypted_shares.values()):
            raise InvalidMessage("sealed share size")
        # defence: masking.server.commitment-size
        if len(msg.self_mask_commitment) != 32:
            raise InvalidMessage("commitment")
        # one 64-byte commitment pair per holder: the recipients and the site itself
        # defence: masking.server.share-commitments-complete
        if set(msg.share_commitments) != set(msg.encrypted_shares) | {msg.site_id} or any(
                len(c) != 64 for c in msg.share_commitments.values()):
            raise InvalidMessage("share commitments")
        # defence: masking.server.share-keys-verified
        self._verify(msg.site_id, msg.signature, ShareKeys.signed_bytes(
            self._session, msg.site_id, msg.encrypted_shares, msg.self_mask_commitment,
            msg.share_commitments))
        self._share_keys[msg.site_id] = msg

    def _on_masked_input(self, msg: MaskedInput) -> None:
        masked = msg.masked_input
        if (
            not isinstance(masked, np.ndarray)
            # defence: masking.server.masked-input-dtype
            or masked.dtype != self._running_sum.dtype
            # defence: masking.server.masked-input-shape
            or masked.shape != self._running_sum.shape
        ):
            raise InvalidMessage("masked input")
        site = msg.site_id
        # It must have masked with exactly the neighbours whose shares it was delivered.
        delivered = tuple(sorted(u for u, sk in self._share_keys.items()
                                 if site in sk.encrypted_shares))
        # defence: masking.server.partners-match-delivery
        if msg.partners != delivered:
            raise InvalidMessage("mask partners")
        digest = payload_digest(np.ascontiguousarray(masked).data)
        # defence: masking.server.masked-input-verified
        self._verify(site, msg.signature,
                     MaskAttestation.signed_bytes(self._session, site, digest, msg.partners))
        np.add(self._running_sum, masked, out=self._running_sum)
        self._masked_from.add(site)
        self._attestations[site] = MaskAttestation(msg.partners, digest, msg.signature)

    def _on_consistency(self, msg: ConsistencySignature) -> None:
        # defence: masking.server.consistency-signature-verified
        self._verify(msg.site_id, msg.signature,
                     ConsistencySignature.signed_bytes(self._session, self._survivors))
        self._signatures[msg.site_id] = msg.signature

    def _on_unmask(self, msg: UnmaskResponse) -> None:
        r = msg.site_id
        survivors = set(self._survivors)

        def held_by_r(owner: int) -> bool:  # r holds shares of owner's secrets (or is it)
            return owner in self._share_keys and r in self._share_keys[owner].share_commitments

        # only shares r holds, of survivors' self-masks and dropped sites' keys, each one
        # share long: a site signed 105,000 made-up entries (7.8 MB a round) and the
        # aggregator kept them, the round's record growing by that for good
        # defence: masking.server.unmask-shares-bounded
        if any(not (held_by_r(o) and o in survivors) for o in msg.self_mask_shares) or any(
                not (held_by_r(o) and o not in survivors) for o in msg.key_shares) or any(
                len(share) != shamir.SHARE_BYTES for table in (msg.self_mask_shares,
                                                               msg.key_shares)
                for share in table.values()):
            raise InvalidMessage("unmask shares")
        # defence: masking.server.unmask-response-verified
        self._verify(msg.site_id, msg.signature, UnmaskResponse.signed_bytes(
            self._session, msg.site_id, msg.self_mask_shares, msg.key_shares))
        self._responses[msg.site_id] = msg

    # ---- closing stages ---------------------------------------------------------------------

    def close_stage(self) -> dict[int, ServerMessage]:
        """End the current stage: the messages to deliver, by recipient site."""
        if self.stage in (Stage.COMPLETED, Stage.ABORTED):
            raise PreconditionError(f"no stage to close in stage {self.stage.name}")
        closing = self.stage
        received = sorted(self._received())
        try:
            needed = (self.config.consistency_quorum if closing is Stage.CONSISTENCY_CHECK
                      else self._minimum)
            # defence: masking.server.enough-answers-per-stage
            if len(received) < needed:
                raise ProtocolAbort(
                    AbortReason.TOO_FEW_SURVIVORS,
                    f"{len(received)} sites answered {closing.name}, at least {needed} needed",
                )
            out = self._close(closing, received)
        except ProtocolAbort as abort:
            self.stage = Stage.ABORTED
            self.abort_reason = abort.reason
            self._running_sum = np.zeros(0, dtype=self._running_sum.dtype)
            self._listener.round_aborted(self.config.round_id, closing.name, abort.reason.name)
            raise
        self._listener.stage_closed(self.config.round_id, closing.name, len(received))
        return out

    def _close(self, closing: Stage, received: list[int]) -> dict[int, ServerMessage]:
        if closing is Stage.ADVERTISE_KEYS:
            directory = KeyDirectory(tuple(self._advertised[s] for s in received))
            self._session = _common.session_id(self.config.params_digest, directory.entries)
            self.stage = Stage.SHARE_KEYS
            return dict.fromkeys(received, directory)
        if closing is Stage.SHARE_KEYS:
            self.stage = Stage.MASKED_INPUT
            return {
                v: ShareDelivery({
                    u: self._share_keys[u].encrypted_shares[v]
                    for u in received if v in self._share_keys[u].encrypted_shares
                })
                for v in received
            }
        if closing is Stage.MASKED_INPUT:
            self._survivors = tuple(received)
            self.stage = Stage.CONSISTENCY_CHECK
            if self.config.complete_graph:
                return dict.fromkeys(received, SurvivorList(self._survivors))
            alive = set(received)
            return {
                v: SurvivorList(self._survivors, {
                    u: self._attestations[u]
                    for u in sorted((alive & self.config.neighbourhood(v)) - {v})})
                for v in received
            }
        if closing is Stage.CONSISTENCY_CHECK:
            dropped = tuple(sorted(set(self._share_keys) - set(self._survivors)))
            request = UnmaskRequest(self._survivors, dict(self._signatures), dropped)
            self.stage = Stage.UNMASK
            return dict.fromkeys(received, request)
        self._unmask()
        self.stage = Stage.COMPLETED
        self._listener.round_completed(self.config.round_id, len(self._survivors))
        return {}

    def _verified_responses(self) -> dict[int, UnmaskResponse]:
        """The unmask responses whose every share matches its owner's signed commitment; a
        responder that reveals one wrong share is dropped whole (it cannot void the round)."""
        good: dict[int, UnmaskResponse] = {}
        for r, response in self._responses.items():
            ok = True
            for kind, table, half in (("self-mask", response.self_mask_shares, slice(0, 32)),
                                      ("masking-key", response.key_shares, slice(32, 64))):
                for owner, share in table.items():
                    pairs = (self._share_keys[owner].share_commitments
                             if owner in self._share_keys else {})
                    expected = pairs.get(r, b"")[half]
                    # defence: masking.server.revealed-shares-match-commitments
                    if share_commitment(self._session, owner, r, kind, share) != expected:
                        ok = False
                    # a share that is no field element (committed so by its dealer) drops
                    # its revealer like a wrong one: it aborted the round, naming the holder
                    # defence: masking.server.revealed-shares-in-the-field
                    ok = ok and _is_share(share)
            if ok:
                good[r] = response
        return good

    def _collect(self, owner: int, field: str) -> dict[int, int]:
        shares: dict[int, int] = {}
        for responder, response in self._verified.items():
            raw = getattr(response, field).get(owner)
            if raw is None:
                continue
            try:
                shares[responder] = shamir.share_from_bytes(raw)
            except ValueError:
                raise ProtocolAbort(AbortReason.MALFORMED_MESSAGE,
                                    f"share from site {responder}") from None
        if len(shares) < self._t:
            # (named: the abort blamed the shares' owner, or the honest sites that dropped
            # out, not the responders that revealed wrong shares)
            wrong = sorted(set(self._responses) - set(self._verified))
            raise ProtocolAbort(AbortReason.TOO_FEW_SURVIVORS,
                                f"{len(shares)} shares for site {owner}, threshold {self._t}"
                                + (f" (sites {wrong[:16]} revealed shares that do not "
                                   "match their dealers' signed commitments: none of their "
                                   "shares was counted)" if wrong else ""))
        return shares

    def _reconstruct(self, owner: int, field: str) -> bytes:
        try:
            return shamir.secret_to_bytes(
                shamir.reconstruct(self._collect(owner, field), self._t), SEED_BYTES)
        except ValueError:
            raise ProtocolAbort(AbortReason.RECONSTRUCTION_FAILED, f"site {owner}") from None

    def _unmask(self) -> None:
        total = self._running_sum
        terms: list[MaskTerm] = []
        self._verified = self._verified_responses()
        for u in self._survivors:
            seed = self._reconstruct(u, "self_mask_shares")
            commitment = _common.self_mask_commitment(self._session, u, seed)
            # defence: masking.server.self-mask-commitment-checked
            if commitment != self._share_keys[u].self_mask_commitment:
                raise ProtocolAbort(AbortReason.RECONSTRUCTION_FAILED, f"self mask of site {u}")
            terms.append((seed, -1))
        survivors = set(self._survivors)
        for v in sorted(set(self._share_keys) - survivors):
            private = private_key_from_bytes(self._reconstruct(v, "key_shares"))
            # defence: masking.server.masking-key-checked
            # (by class: the key v advertised may be its key in another encoding)
            if key_class(private.public_key().public_bytes_raw()) != self._key_classes[v][1]:
                raise ProtocolAbort(AbortReason.RECONSTRUCTION_FAILED, f"masking key of site {v}")
            for u in sorted(survivors & self.config.neighbourhood(v)):
                # defence: masking.server.unmasks-only-applied-pairs
                if u not in self._share_keys[v].encrypted_shares:
                    continue  # v sent u no share, so u never masked with v
                try:
                    shared = exchange(private, self._advertised[u].masking_public_key)
                except InvalidMessage:  # u signed a low-order key: no mask can be removed
                    raise ProtocolAbort(AbortReason.MALFORMED_MESSAGE,
                                        f"masking key of site {u}") from None
                seed = _common.pairwise_seed(shared, self._session, u, v)
                # u applied mask_sign(u, v) * mask(seed); take it back out.
                terms.append((seed, -_common.mask_sign(u, v)))
        # Every secret is reconstructed and checked before any mask is removed.
        self.mask_keystream_bytes += apply_masks(total, terms, word_bits=self.config.word_bits,
                                                 splitter=self._splitter)
        quantizer = self.config.quantizer
        n = len(self._survivors)
        weighted, weight_sum = quantizer.decode_sum(total, n)
        bound = quantizer.error_bound(n)
        # A site that sent garbage for its masked input cannot be unmasked into a plausible
        # sum by chance: refuse an aggregate no n clipped, weighted inputs can produce.
        # Each input is clip(update) * weight, so the sum's elements are within clip times the
        # weight sum: an average beyond clip is no average of the inputs.
        # defence: masking.server.aggregate-in-range
        clip = quantizer.clip
        if not (0 < weight_sum <= n * quantizer.max_weight + bound[1] and float(
                np.max(np.abs(weighted), initial=0.0)) <= clip * (weight_sum + bound[1])
                + bound[0]):
            raise ProtocolAbort(AbortReason.AGGREGATE_OUT_OF_RANGE,
                                "the unmasked sum is outside what the inputs can produce")
        self.result = AggregateResult(weighted, weight_sum, self._survivors, bound)
