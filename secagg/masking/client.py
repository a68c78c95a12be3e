"""The site's role in a masking round: a sans-I/O state machine.

Feed it the server's messages with :meth:`MaskingClient.handle`; it returns the message to send
back. It does no networking, sleeping or storage. Any misbehaviour it can detect moves it to
``Stage.ABORTED`` and raises :class:`~secagg.errors.ProtocolAbort` with a named reason; a
message that is not valid in the current stage raises
:class:`~secagg.errors.PreconditionError`.

Security invariants it enforces (each has a test in ``tests/threat_model``; the argument that
they suffice is in :mod:`secagg.masking.graph`):
- it signs only what it checked; every neighbour's advertised keys must carry that neighbour's
  signature (in SecAgg every site is a neighbour; in SecAgg+ it uses no other site's keys);
- it aborts on a key directory that omits or alters its own keys, duplicates a key or a site,
  names an unknown site, or lists fewer than ``threshold`` sites of its neighbourhood;
- a share that fails to authenticate aborts the round; it is never used;
- it signs a survivor list only if every surviving neighbour sent it shares (so it masked with
  them), the list keeps enough of the round (quorum) and, in SecAgg+, no survivor misses more
  than ``max_missing_per_side`` neighbours on one side and every surviving neighbour's signed
  attestation names all of that neighbour's surviving neighbours as mask partners;
- it answers one unmask request, only for the list it signed and only with signatures on that
  list from at least ``consistency_quorum`` roster sites (so all honest sites act on one list),
  and never reveals both the self-mask share and the key share of the same peer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import NoReturn

import numpy as np

from secagg._inputs import check_site, check_update, input_pair
from secagg.errors import AbortReason, InvalidMessage, PreconditionError, ProtocolAbort
from secagg.hazmat import aead, shamir, signing
from secagg.hazmat.key_agreement import PUBLIC_KEY_BYTES, AgreementKey, key_class
from secagg.hazmat.prg import SEED_BYTES, MaskTerm, RangeSplitMasker, apply_masks
from secagg.hazmat.secret import scrubs_locals
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

InputProvider = Callable[[], tuple[np.ndarray, float]]

_SHARE_PAIR_BYTES = 2 * shamir.SHARE_BYTES
# This process also quantises while the helpers expand masks, so it keeps a smaller share of
# the index range. Measured here: quantising a vector costs about as much as expanding 5.5
# masks over its whole length.
_QUANTISE_COST_IN_MASKS = 5.5


def _local_mask_share(terms: int, processes: int) -> float:
    """The share of the range that balances this process (quantise + its share of ``terms``
    masks) against each of the other ``processes - 1`` (their shares of the masks)."""
    return max(0.05, (terms - _QUANTISE_COST_IN_MASKS * (processes - 1)) / (terms * processes))


_SPENT = AgreementKey.generate()  # stands in for a private key this site has forgotten


class _LocalInputError(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _field_elements(pair: bytes) -> bool:
    """Whether a share pair's two halves, read as integers, are field elements (below
    PRIME); their lengths are checked on their own, before."""
    half = shamir.SHARE_BYTES
    # (two comparisons, not a generator expression: a generator's frame, holding a share
    # half, is left as it is when an exception's frames are cleared)
    # defence: masking.client.both-share-halves-in-the-field
    return (int.from_bytes(pair[:half], "big") < shamir.PRIME
            and int.from_bytes(pair[half:], "big") < shamir.PRIME)


class MaskingClient:
    """One site in one masking round.

    ``model_input`` is either ``(update, weight)`` or a callable returning it, called once at the
    masked-input stage (so a site can train while keys are exchanged).

    One client per site per ``config.round_id``, ever: the caller records the round as spent
    before the first message leaves (see :class:`RoundConfig`; ``clients.Site`` does).
    """

    # defence: masking.client.refusals-at-construction-leave-no-locals
    @scrubs_locals  # (a refused input: the update in the checks' frames)
    def __init__(
        self,
        config: RoundConfig,
        site_id: int,
        identity: signing.IdentityKey,
        model_input: tuple[np.ndarray, float] | InputProvider,
        *,
        splitter: RangeSplitMasker | None = None,
    ) -> None:
        if not isinstance(config, RoundConfig):
            raise TypeError(f"config must be a RoundConfig, got {type(config).__name__}")
        site_id = check_site(config.roster, site_id, identity)
        if not callable(model_input):  # a bad input fails here, not in the middle of a round
            check_update(*input_pair(model_input), max_weight=config.max_weight,
                         length=config.vector_length)
        self.config = config
        self.site_id = site_id
        self._identity = identity
        self._input = model_input
        self._splitter = splitter
        self.stage = Stage.ADVERTISE_KEYS
        self.abort_reason: AbortReason | None = None
        self.mask_keystream_bytes = 0
        self._neighbourhood = config.neighbourhood(site_id)
        self._t = config.reconstruction_threshold
        self._encryption_key = AgreementKey.generate()
        self._masking_key = AgreementKey.generate()
        self._session = b""
        self._directory: dict[int, AdvertiseKeys] = {}
        self._self_mask_seed = b""
        # shares I hold, by owner: (self-mask seed share, masking-key share), each 66 bytes
        self._held_shares: dict[int, tuple[bytes, bytes]] = {}
        self._share_senders: frozenset[int] = frozenset()
        # senders whose sealed share to this site did not open (skipped: see ShareDelivery)
        self.unusable_share_senders: tuple[int, ...] = ()
        self._signed_survivors: tuple[int, ...] = ()
        # defence: masking.client.quorum-is-roster-wide
        self._q = config.consistency_quorum

    def __repr__(self) -> str:
        # (getattr: a half-built client, in a traceback's locals, made the report itself fail)
        stage = getattr(self, "stage", None)
        return (f"MaskingClient(site_id={getattr(self, 'site_id', None)}, "
                f"stage={stage.name if stage is not None else None})")

    def __reduce__(self) -> NoReturn:
        raise TypeError("MaskingClient holds secrets and cannot be pickled")

    # ---- driving ----------------------------------------------------------------------------

    @property
    def signed_survivors(self) -> tuple[int, ...]:
        """The survivor list this site signed (sorted; empty before it signs one): the sites
        whose masked inputs the round's sum holds, as every survivor's signature fixes it."""
        return self._signed_survivors

    def start(self) -> AdvertiseKeys:
        """The first message of the round."""
        self._require(Stage.ADVERTISE_KEYS, "start")
        enc_pk = self._encryption_key.public_bytes
        mask_pk = self._masking_key.public_bytes
        sig = self._sign(
            AdvertiseKeys.signed_bytes(self.config.params_digest, self.site_id, enc_pk, mask_pk)
        )
        self.stage = Stage.SHARE_KEYS
        return AdvertiseKeys(self.site_id, enc_pk, mask_pk, sig)

    # defence: masking.client.exceptions-leave-no-locals
    @scrubs_locals  # (its frames hold seeds and shares: hazmat.secret.scrub_locals)
    def handle(self, message: ServerMessage) -> SiteMessage:
        """Process one server message and return the reply. Raises on refusal (see module doc)."""
        handlers: dict[type, tuple[Stage, Callable[..., SiteMessage]]] = {
            KeyDirectory: (Stage.SHARE_KEYS, self._on_key_directory),
            ShareDelivery: (Stage.MASKED_INPUT, self._on_share_delivery),
            SurvivorList: (Stage.CONSISTENCY_CHECK, self._on_survivor_list),
            UnmaskRequest: (Stage.UNMASK, self._on_unmask_request),
        }
        try:
            expected, handler = handlers[type(message)]
        except KeyError:
            raise PreconditionError(f"unexpected message type {type(message).__name__}") from None
        self._require(expected, type(message).__name__)
        try:
            try:
                # defence: masking.client.plain-fields
                return handler(message.normalized())
            except _LocalInputError as e:
                # defence: masking.client.input-error-forgets-secrets
                self._forget()  # the input is gone: nothing secret stays for a retry to use
                # (and the round is over for this client: left at its stage, a retry was told
                # that no share opened, blaming the peers for the site's own input)
                # defence: masking.client.input-error-ends-the-round
                self.stage = Stage.ABORTED
                raise e.error from None
            # defence: masking.client.malformed-server-message-aborts
            except (TypeError, ValueError, AttributeError, KeyError, IndexError,
                    ArithmeticError, RecursionError):
                # Fields of the wrong type or shape: the server sent something no honest
                # server sends. One named abort, never a traceback from deep inside.
                raise ProtocolAbort(AbortReason.MALFORMED_MESSAGE,
                                    type(message).__name__) from None
        except ProtocolAbort as abort:
            self._abort(abort.reason)
            raise

    # ---- stages -----------------------------------------------------------------------------

    def _on_key_directory(self, msg: KeyDirectory) -> ShareKeys:
        directory: dict[int, AdvertiseKeys] = {}
        seen_keys: set[bytes] = set()
        for entry in msg.entries:
            # defence: masking.client.directory-known-sites
            if entry.site_id not in self.config.roster:
                raise ProtocolAbort(AbortReason.UNKNOWN_SITE, f"site {entry.site_id}")
            # defence: masking.client.directory-one-entry-per-site
            if entry.site_id in directory:
                raise ProtocolAbort(AbortReason.DUPLICATE_SITE, f"site {entry.site_id}")
            for key in (entry.encryption_public_key, entry.masking_public_key):
                # defence: masking.client.directory-key-size
                if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                    raise ProtocolAbort(AbortReason.WRONG_SIZE_KEY, f"site {entry.site_id}")
                # compared by class (key_class): a copy of a key in another encoding agrees
                # on every secret with it, as the copy itself does
                try:
                    cls = key_class(key)
                except InvalidMessage:  # low-order or not canonical: the server refuses these
                    raise ProtocolAbort(AbortReason.MALFORMED_MESSAGE,
                                        f"key of site {entry.site_id}") from None
                # defence: masking.client.directory-distinct-keys
                if cls in seen_keys:
                    raise ProtocolAbort(AbortReason.DUPLICATE_KEY, f"site {entry.site_id}")
                seen_keys.add(cls)
            # defence: masking.client.directory-verifies-neighbours
            if entry.site_id in self._neighbourhood:  # the only keys this site will use
                self._verify(entry.site_id, entry.signature, AdvertiseKeys.signed_bytes(
                    self.config.params_digest, entry.site_id, entry.encryption_public_key,
                    entry.masking_public_key))
            directory[entry.site_id] = entry
        mine = directory.get(self.site_id)
        # defence: masking.client.own-keys-in-directory
        if (
            mine is None
            or mine.encryption_public_key != self._encryption_key.public_bytes
            or mine.masking_public_key != self._masking_key.public_bytes
        ):
            raise ProtocolAbort(AbortReason.OWN_KEY_MISSING_OR_ALTERED)
        holders = sorted(self._neighbourhood & directory.keys())
        # defence: masking.client.directory-threshold
        self._require_at_least(len(holders), "sites with advertised keys in the neighbourhood")
        # defence: masking.client.directory-windows
        self._check_windows(frozenset(holders), "key directory")
        self._directory = directory
        self._session = _common.session_id(self.config.params_digest, directory.values())

        # defence: masking.client.self-mask-seed-random
        self._self_mask_seed = os.urandom(SEED_BYTES)
        # defence: masking.client.self-mask-shared-at-threshold
        seed_shares = shamir.split(shamir.secret_from_bytes(self._self_mask_seed), self._t, holders)
        key_shares = shamir.split(
            # defence: masking.client.masking-key-shared-at-threshold
            shamir.secret_from_bytes(self._masking_key.export_private_bytes()), self._t, holders
        )
        sealed: dict[int, bytes] = {}
        share_commitments: dict[int, bytes] = {}
        for peer in holders:
            pair = (shamir.share_to_bytes(seed_shares[peer]),
                    shamir.share_to_bytes(key_shares[peer]))
            share_commitments[peer] = (
                share_commitment(self._session, self.site_id, peer, "self-mask", pair[0])
                + share_commitment(self._session, self.site_id, peer, "masking-key", pair[1]))
            if peer == self.site_id:
                self._held_shares[peer] = pair
                continue
            key = self._share_key(peer)
            sealed[peer] = aead.seal(key, pair[0] + pair[1], _common.share_associated_data(
                self._session, self.site_id, peer))
        commitment = _common.self_mask_commitment(self._session, self.site_id, self._self_mask_seed)
        sig = self._sign(ShareKeys.signed_bytes(self._session, self.site_id, sealed, commitment,
                                                share_commitments))
        self.stage = Stage.MASKED_INPUT
        return ShareKeys(self.site_id, sealed, commitment, share_commitments, sig)

    def _on_share_delivery(self, msg: ShareDelivery) -> MaskedInput:
        allowed = (self._neighbourhood & self._directory.keys()) - {self.site_id}
        for sender in msg.encrypted_shares:
            # defence: masking.client.share-senders-are-neighbours
            if sender not in allowed:
                raise ProtocolAbort(AbortReason.UNEXPECTED_SHARE_SENDER, f"site {sender}")
        senders = frozenset(msg.encrypted_shares)
        # defence: masking.client.share-senders-threshold
        self._require_at_least(len(senders) + 1, "share senders in the neighbourhood")
        # defence: masking.client.share-senders-windows
        self._check_windows(senders | {self.site_id}, "share senders")
        # A share that does not open, or opens to the wrong length, is skipped: never stored,
        # never revealed. Only its sender (or the server relaying it) can make it so, and it
        # is needed only to help rebuild that sender's secrets: this site still masks with
        # the sender (the pair seed comes from the key agreement, not from the share). An
        # abort here let colluding sites seal junk to a chosen honest site, push it out of the
        # round and read the sum of the sites left. If no share opens at all, this site's
        # view of the round is not its peers' (another session, a split key directory):
        # that aborts.
        unusable: list[int] = []
        for sender in sorted(senders):
            try:
                plain = aead.open_sealed(
                    self._share_key(sender), msg.encrypted_shares[sender],
                    _common.share_associated_data(self._session, sender, self.site_id))
            except InvalidMessage:
                plain = b""
            # defence: masking.client.share-pair-length
            if len(plain) != _SHARE_PAIR_BYTES:
                # defence: masking.client.bad-share-skipped
                unusable.append(sender)
                continue
            # two 66-byte values that are not field elements (>= PRIME), sealed and committed
            # by their dealer: held and revealed at unmask, they made the server abort the
            # round naming this site, not the dealer; skipped like a share that does not open
            # defence: masking.client.shares-are-field-elements
            if not _field_elements(plain):
                unusable.append(sender)
                continue
            self._held_shares[sender] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :])
        # defence: masking.client.share-authentication-aborts
        if senders and len(unusable) == len(senders):
            raise ProtocolAbort(AbortReason.SHARE_AUTHENTICATION_FAILED,
                                f"no share opens (from sites {unusable[:8]})")
        self.unusable_share_senders = tuple(unusable)
        self._share_senders = senders

        terms: list[MaskTerm] = [(self._self_mask_seed, 1)]
        for peer in sorted(senders):
            seed = _common.pairwise_seed(
                self._exchange(self._masking_key, self._directory[peer].masking_public_key, peer),
                self._session, self.site_id, peer)
            terms.append((seed, _common.mask_sign(self.site_id, peer)))
        # Helper processes (if any) expand their share of the masks while we quantise.
        pending = (self._splitter.submit(
                       terms, local_share=_local_mask_share(len(terms), self._splitter.processes))
                   if self._splitter is not None
                   and self._splitter.length == self.config.vector_length + 1 else None)
        try:
            update, weight = input_pair(self._input() if callable(self._input) else self._input)
            masked = self.config.quantizer.encode(update, weight,
                                                  length=self.config.vector_length)
        # defence: masking.client.provider-error-is-local
        # (any exception: a KeyError or ZeroDivisionError from the site's own training code was
        # reported as a malformed message from the server, its cause hidden)
        except Exception as e:
            if pending is not None:
                pending.apply_to(np.zeros(self.config.vector_length + 1,
                                          dtype=self.config.quantizer_dtype))
            raise _LocalInputError(e) from e  # the site's own input: not the server's fault
        finally:
            self._input = (np.empty(0), 0.0)  # drop our reference to the plaintext
        if pending is not None:
            self.mask_keystream_bytes += pending.apply_to(masked)
        else:
            self.mask_keystream_bytes += apply_masks(masked, terms,
                                                     word_bits=self.config.word_bits)
        del terms
        # defence: masking.client.attests-true-partners
        partners = tuple(sorted(senders))
        sig = self._sign(MaskedInput.signed_bytes(self._session, self.site_id, masked, partners))
        self.stage = Stage.CONSISTENCY_CHECK
        return MaskedInput(self.site_id, masked, partners, sig)

    def _on_survivor_list(self, msg: SurvivorList) -> ConsistencySignature:
        # defence: masking.client.survivor-ids-checked
        survivors = tuple(msg.survivors)
        self._check_ids(survivors)
        # defence: masking.client.survivor-list-includes-self
        if self.site_id not in survivors:
            raise ProtocolAbort(AbortReason.SELF_LISTED_AS_DROPPED)
        alive = frozenset(survivors)
        shared = self._share_senders | {self.site_id}
        # defence: masking.client.survivors-masked-with-me
        if not alive & self._neighbourhood <= shared:
            raise ProtocolAbort(AbortReason.PEER_ALREADY_DROPPED,
                                "a survivor in the neighbourhood never shared keys")
        self._require_at_least(len(alive & self._neighbourhood), "survivors in the neighbourhood")
        # defence: masking.client.survivor-list-quorum
        if len(alive) < self._q:
            raise ProtocolAbort(AbortReason.TOO_FEW_SURVIVORS,
                                f"{len(alive)} survivors, consistency quorum {self._q}")
        if not self.config.complete_graph:
            # defence: masking.client.no-gap-checked
            self._check_no_gap(alive)
            # defence: masking.client.attestations-checked
            self._check_attestations(alive, msg.attestations)
        self._signed_survivors = tuple(sorted(survivors))
        sig = self._sign(ConsistencySignature.signed_bytes(self._session, self._signed_survivors))
        self.stage = Stage.UNMASK
        return ConsistencySignature(self.site_id, sig)

    def _check_no_gap(self, alive: frozenset[int]) -> None:
        """Rule 3 of :mod:`secagg.masking.graph`, for every survivor of the round."""
        limit = self.config.max_missing_per_side
        assert limit is not None
        site, missing = self.config.worst_missing_window(alive)
        # defence: masking.client.no-gap-tolerance-is-m
        if missing > limit:
            raise ProtocolAbort(AbortReason.TOO_MANY_MISSING_NEIGHBOURS,
                                f"site {site} misses {missing} neighbours on one side, "
                                f"at most {limit}")

    def _check_attestations(self, alive: frozenset[int],
                            attestations: Mapping[int, MaskAttestation]) -> None:
        """Rule 2: every surviving neighbour masked with all of its surviving neighbours."""
        for peer in sorted((alive & self._neighbourhood) - {self.site_id}):
            attestation = attestations.get(peer)
            # defence: masking.client.attestation-required
            if not isinstance(attestation, MaskAttestation):
                raise ProtocolAbort(AbortReason.MASK_PARTNERS_INCOMPLETE,
                                    f"no attestation from site {peer}")
            partners = attestation.partners
            if not isinstance(partners, tuple) or not all(
                    isinstance(p, int) and not isinstance(p, bool) for p in partners) or not (
                    isinstance(attestation.payload_digest, bytes)
                    and len(attestation.payload_digest) == 32):
                raise ProtocolAbort(AbortReason.MALFORMED_MESSAGE, f"attestation of site {peer}")
            # defence: masking.client.attestation-signature-verified
            self._verify(peer, attestation.signature, MaskAttestation.signed_bytes(
                self._session, peer, attestation.payload_digest, partners))
            needed = (alive & self.config.neighbourhood(peer)) - {peer}
            # defence: masking.client.attestation-covers-live-neighbours
            if not needed <= set(partners):
                raise ProtocolAbort(AbortReason.MASK_PARTNERS_INCOMPLETE,
                                    f"site {peer} did not mask with every live neighbour")

    def _on_unmask_request(self, msg: UnmaskRequest) -> UnmaskResponse:
        # defence: masking.client.unmask-for-the-signed-list
        if tuple(sorted(msg.survivors)) != self._signed_survivors or len(
            set(msg.survivors)) != len(msg.survivors):
            raise ProtocolAbort(AbortReason.SURVIVOR_LIST_MISMATCH)
        survivors = set(self._signed_survivors)
        signed = ConsistencySignature.signed_bytes(self._session, self._signed_survivors)
        verified = 0
        # Signatures from anywhere in the roster count: the quorum binds the whole round, so
        # no two honest sites ever act on different lists (a neighbourhood count would not).
        # Once the quorum is verified the rest adds nothing: they are not checked.
        for signer in sorted(msg.survivor_signatures):
            # defence: masking.client.unmask-signers-on-the-list
            if signer not in survivors:
                raise ProtocolAbort(AbortReason.SURVIVOR_LIST_MISMATCH, f"signer {signer}")
            if verified < self._q:
                # defence: masking.client.unmask-signatures-verified
                self._verify(signer, msg.survivor_signatures[signer], signed)
                verified += 1
        # defence: masking.client.unmask-needs-quorum
        if verified < self._q:
            raise ProtocolAbort(AbortReason.TOO_FEW_SURVIVORS,
                                f"{verified} signatures on the survivor list, quorum {self._q}")

        # defence: masking.client.dropped-ids-checked
        dropped = tuple(msg.dropped)
        self._check_ids(dropped)
        # defence: masking.client.self-not-dropped
        if self.site_id in dropped:
            raise ProtocolAbort(AbortReason.SELF_LISTED_AS_DROPPED)
        both = survivors & set(dropped)
        # defence: masking.client.never-alive-and-dropped
        if both:
            raise ProtocolAbort(AbortReason.PEER_BOTH_ALIVE_AND_DROPPED, f"sites {sorted(both)}")
        mine = self._share_senders | {self.site_id}
        dropped_here = set(dropped) & self._neighbourhood
        already_dead = dropped_here - mine
        # defence: masking.client.no-already-dropped-peer
        if already_dead:
            raise ProtocolAbort(AbortReason.PEER_ALREADY_DROPPED, f"sites {sorted(already_dead)}")
        # defence: masking.client.dropped-list-matches-signed-list
        if dropped_here != mine - survivors:
            raise ProtocolAbort(AbortReason.SURVIVOR_LIST_MISMATCH,
                                "dropped list disagrees with the signed survivors")

        # Disjoint by the checks above: no peer gets both of its shares revealed.
        # defence: masking.client.self-mask-shares-only-of-survivors
        self_mask = {p: self._held_shares[p][0] for p in sorted(mine & survivors)
                     if p in self._held_shares}
        # defence: masking.client.key-shares-only-of-dropped
        keys = {p: self._held_shares[p][1] for p in sorted(dropped_here)
                if p in self._held_shares}
        sig = self._sign(UnmaskResponse.signed_bytes(self._session, self.site_id, self_mask, keys))
        # defence: masking.client.one-unmask-only
        self._forget()
        self.stage = Stage.COMPLETED
        return UnmaskResponse(self.site_id, self_mask, keys, sig)

    # ---- helpers ----------------------------------------------------------------------------

    def _require(self, stage: Stage, event: str) -> None:
        if self.stage is not stage:
            raise PreconditionError(f"{event} is not valid in stage {self.stage.name}")

    def _require_at_least(self, count: int, what: str) -> None:
        if count < self._t:
            raise ProtocolAbort(AbortReason.TOO_FEW_SURVIVORS,
                                f"{count} {what}, threshold {self._t}")

    def _check_windows(self, present: frozenset[int], what: str) -> None:
        """SecAgg+: at most ``max_missing_per_side`` of each window may be absent."""
        limit = self.config.max_missing_per_side
        if limit is None:
            return
        for window in self.config.windows(self.site_id):
            missing = len(window - present)
            # defence: masking.client.window-tolerance-is-m
            if missing > limit:
                raise ProtocolAbort(AbortReason.TOO_MANY_MISSING_NEIGHBOURS,
                                    f"{missing} neighbours on one side missing from the "
                                    f"{what}, at most {limit}")

    def _check_ids(self, ids: tuple[int, ...]) -> None:
        if len(set(ids)) != len(ids):
            raise ProtocolAbort(AbortReason.DUPLICATE_SITE)
        unknown = [i for i in ids if i not in self.config.roster]
        if unknown:
            # (a few named: a lying aggregator's million unknown ids made a 16 MB text)
            # defence: masking.client.unknown-sites-named-briefly
            raise ProtocolAbort(AbortReason.UNKNOWN_SITE, f"sites {unknown[:16]}" + (
                f" and {len(unknown) - 16} more" if len(unknown) > 16 else ""))

    def _abort(self, reason: AbortReason) -> None:
        self.stage = Stage.ABORTED
        self.abort_reason = reason
        # defence: masking.client.abort-forgets-secrets
        self._forget()

    def _forget(self) -> None:
        """Once the round is over for this site, nothing secret stays in it: shares, the
        self-mask seed, both private keys and the plaintext input."""
        self._held_shares.clear()
        self._self_mask_seed = b""
        # defence: masking.client.completion-forgets-secrets
        self._input = (np.empty(0), 0.0)
        self._encryption_key = _SPENT
        self._masking_key = _SPENT

    def _sign(self, message: bytes) -> bytes:
        return self._identity.sign(message)

    def _verify(self, site: int, signature: bytes, message: bytes) -> None:
        try:
            signing.verify(self.config.roster[site], signature, message)
        except InvalidMessage:
            raise ProtocolAbort(AbortReason.BAD_SIGNATURE, f"site {site}") from None

    @staticmethod
    def _exchange(own: AgreementKey, peer_public: bytes, peer: int) -> bytes:
        try:
            return own.exchange(peer_public)
        # (a second layer under the key directory's check: an all-zero secret is a public mask)
        # defence: masking.client.exchange-refuses-low-order-keys
        except InvalidMessage:  # a signed but low-order key: the peer itself misbehaves
            raise ProtocolAbort(AbortReason.MALFORMED_MESSAGE, f"key of site {peer}") from None

    def _share_key(self, peer: int) -> bytes:
        shared = self._exchange(self._encryption_key,
                                self._directory[peer].encryption_public_key, peer)
        return _common.share_key(shared, self._session, self.site_id, peer)

