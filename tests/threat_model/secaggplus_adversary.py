"""A lying aggregator with colluding sites, driving honest MaskingClients by hand.

The adversary knows everything a server and its colluders know: every message, the colluders'
identity keys (it signs anything in their name) and every share the colluders hold. It tries to
strip every mask from one honest victim's masked input. :meth:`Adversary.recover` returns the
victim's decoded input if it got both the victim's self-mask seed and its masking key (or every
pairwise seed it needs), else None.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from secagg.errors import PreconditionError, ProtocolAbort
from secagg.hazmat import shamir
from secagg.hazmat.key_agreement import exchange, private_key_from_bytes
from secagg.hazmat.prg import SEED_BYTES, apply_masks
from secagg.hazmat.signing import IdentityKey
from secagg.masking import MaskingClient, RoundConfig, _common, messages
from secagg.masking.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    KeyDirectory,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    SurvivorList,
    UnmaskRequest,
    UnmaskResponse,
)


@dataclass
class Adversary:
    config: RoundConfig
    identities: Mapping[int, IdentityKey]
    inputs: Mapping[int, tuple[np.ndarray, float]]
    colluders: frozenset[int]
    clients: dict[int, MaskingClient] = field(init=False)
    aborts: dict[int, ProtocolAbort] = field(init=False, default_factory=dict)
    advertised: dict[int, AdvertiseKeys] = field(init=False, default_factory=dict)
    share_keys: dict[int, ShareKeys] = field(init=False, default_factory=dict)
    masked: dict[int, MaskedInput] = field(init=False, default_factory=dict)
    signatures: dict[tuple[int, ...], dict[int, bytes]] = field(init=False, default_factory=dict)
    responses: dict[int, UnmaskResponse] = field(init=False, default_factory=dict)
    delivered: dict[int, set[int]] = field(init=False, default_factory=dict)
    session: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        self.clients = {s: MaskingClient(self.config, s, self.identities[s], self.inputs[s])
                        for s in self.config.sites}

    @property
    def honest(self) -> list[int]:
        return [s for s in self.config.sites if s not in self.colluders]

    def _send(self, site: int, message: object) -> object | None:
        try:
            return self.clients[site].handle(message)  # type: ignore[arg-type]
        except ProtocolAbort as abort:
            self.aborts[site] = abort
            return None
        except PreconditionError:
            return None

    # ---- the honest-looking first stages, with the adversary's choices -----------------------

    def keys_and_shares(self, withhold: Mapping[int, Iterable[int]] | None = None) -> None:
        """Advertise keys and share them; ``withhold[v]`` = senders whose shares v never gets."""
        for s, c in self.clients.items():
            self.advertised[s] = c.start()
        directory = KeyDirectory(tuple(self.advertised[s] for s in self.config.sites))
        self.session = _common.session_id(self.config.params_digest, directory.entries)
        for s in self.config.sites:
            reply = self._send(s, directory)
            if isinstance(reply, ShareKeys):
                self.share_keys[s] = reply
        withhold = withhold or {}
        for v in self.config.sites:
            blocked = set(withhold.get(v, ()))
            delivery = ShareDelivery({u: sk.encrypted_shares[v]
                                      for u, sk in self.share_keys.items()
                                      if v in sk.encrypted_shares and u not in blocked})
            self.delivered[v] = set(delivery.encrypted_shares)
            reply = self._send(v, delivery)
            if isinstance(reply, MaskedInput):
                self.masked[v] = reply

    def survivor_list(self, survivors: Iterable[int]) -> SurvivorList:
        """The list, with the attestations a SecAgg+ site needs (if the core has them)."""
        alive = tuple(sorted(survivors))
        attestation = getattr(messages, "MaskAttestation", None)
        if attestation is None or self.config.neighbors is None:
            return SurvivorList(alive)
        from secagg._encoding import payload_digest

        atts = {
            u: attestation(m.partners, payload_digest(np.ascontiguousarray(m.masked_input).data),
                           m.signature)
            for u, m in self.masked.items() if u in alive
        }
        return SurvivorList(alive, atts)

    def show(self, site: int, survivors: Iterable[int]) -> None:
        """Show ``site`` a survivor list; record its signature if it signs."""
        listing = self.survivor_list(survivors)
        reply = self._send(site, listing)
        if isinstance(reply, ConsistencySignature):
            self.signatures.setdefault(listing.survivors, {})[site] = reply.signature

    def collude_sign(self, survivors: Iterable[int]) -> None:
        alive = tuple(sorted(survivors))
        for c in self.colluders:
            if c in alive:
                self.signatures.setdefault(alive, {})[c] = self.identities[c].sign(
                    ConsistencySignature.signed_bytes(self.session, alive))

    def request_unmask(self, site: int, survivors: Iterable[int]) -> None:
        alive = tuple(sorted(survivors))
        dropped = tuple(sorted(set(self.share_keys) - set(alive)))
        request = UnmaskRequest(alive, dict(self.signatures.get(alive, {})), dropped)
        reply = self._send(site, request)
        if isinstance(reply, UnmaskResponse):
            self.responses[site] = reply

    # ---- the payoff --------------------------------------------------------------------------

    def _shares(self, owner: int, kind: int) -> dict[int, int]:
        out: dict[int, int] = {}
        for site, resp in self.responses.items():
            table = resp.self_mask_shares if kind == 0 else resp.key_shares
            if owner in table:
                out[site] = shamir.share_from_bytes(table[owner])
        for c in self.colluders:  # colluders hand over every share they hold, of both kinds
            held = self.clients[c]._held_shares.get(owner)
            if held is not None:
                out[c] = shamir.share_from_bytes(held[kind])
        return out

    def _private_key(self, site: int) -> object | None:
        """A site's masking private key: a colluder's own, or reconstructed from key shares."""
        if site in self.colluders:
            return private_key_from_bytes(self.clients[site]._masking_key.export_private_bytes())
        shares = self._shares(site, 1)
        t = self.config.reconstruction_threshold
        if len(shares) < t:
            return None
        try:
            return private_key_from_bytes(
                shamir.secret_to_bytes(shamir.reconstruct(shares, t), SEED_BYTES))
        except ValueError:
            return None

    def recover(self, victim: int) -> np.ndarray | None:
        """The victim's decoded (weighted, clipped) input, if every mask can be stripped: its
        self-mask seed, and for each partner either end's masking key."""
        t = self.config.reconstruction_threshold
        if victim not in self.masked:
            return None
        seed_shares = self._shares(victim, 0)
        if len(seed_shares) < t:
            return None
        try:
            seed = shamir.secret_to_bytes(shamir.reconstruct(seed_shares, t), SEED_BYTES)
        except ValueError:
            return None
        mine = self._private_key(victim)
        y = self.masked[victim].masked_input.copy()
        terms = [(seed, -1)]
        for p in sorted(self.delivered[victim]):  # whom the victim masked with
            if mine is not None:
                shared = exchange(mine, self.advertised[p].masking_public_key)  # type: ignore[arg-type]
            else:
                theirs = self._private_key(p)
                if theirs is None:
                    return None
                shared = exchange(theirs, self.advertised[victim].masking_public_key)  # type: ignore[arg-type]
            terms.append((_common.pairwise_seed(shared, self.session, victim, p),
                          -_common.mask_sign(victim, p)))
        apply_masks(y, terms, word_bits=self.config.word_bits)
        weighted, _ = self.config.quantizer.decode_sum(y, 1)
        return weighted

    def exposed(self, victim: int) -> bool:
        got = self.recover(victim)
        if got is None:
            return False
        update, weight = self.inputs[victim]
        truth = np.clip(update, -self.config.clip, self.config.clip) * weight
        return bool(np.max(np.abs(got - truth)) < 1e-3)
