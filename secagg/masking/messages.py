"""The messages of a masking round, as plain immutable values (no I/O, no serialisation).

Names match ``protos/secagg/v1/masking.proto``. Site -> server messages carry an Ed25519
signature by the sender's identity key over :func:`signed_bytes`, which binds the stage, the
session (or, before the session exists, the round parameters) and the sender.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from secagg._encoding import encode, payload_digest


class Stage(enum.Enum):
    STAGE_UNSPECIFIED = 0
    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    CONSISTENCY_CHECK = 4
    UNMASK = 5
    COMPLETED = 6
    ABORTED = 7


# ---- plain values only ---------------------------------------------------------------------
#
# A message may come from an adversary who builds Python objects, not protobuf: an int subclass
# equal to one site id but hashing apart from it, a dict whose iteration repeats a key, a deeply
# nested tuple that crashes hashing. Every role therefore rebuilds what it receives from plain
# types first (``normalized()``), checking each id is an ``int`` in [1, 2**63) and each byte
# field is ``bytes``; anything else is malformed (ValueError) before any check, set or count.

MAX_ID = 2**63


def plain_id(value: object) -> int:
    # defence: masking.messages.plain-ids
    if type(value) is not int or not 0 < value < MAX_ID:
        raise ValueError("a site id must be an int in [1, 2**63)")
    return value


def plain_ids(values: object) -> tuple[int, ...]:
    if type(values) not in (tuple, list):
        raise ValueError("a list of site ids must be a tuple or list")
    return tuple(plain_id(v) for v in values)  # type: ignore[attr-defined]


def plain_bytes(value: object) -> bytes:
    if type(value) is not bytes:
        raise ValueError("a byte field must be bytes")
    return value


def plain_map(value: object, convert: object = plain_bytes) -> dict[int, object]:
    # defence: masking.messages.plain-maps
    if type(value) is not dict:
        raise ValueError("a map must be a dict")
    return {plain_id(k): convert(v) for k, v in dict.items(value)}  # type: ignore[operator]


# ---- site -> server -------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys:
    site_id: int
    encryption_public_key: bytes  # X25519, for share encryption
    masking_public_key: bytes  # X25519, for pairwise mask seeds
    signature: bytes

    @staticmethod
    def signed_bytes(params_digest: bytes, site_id: int, enc_pk: bytes, mask_pk: bytes) -> bytes:
        # defence: masking.messages.advertise-binds-round
        # defence: masking.messages.advertise-binds-encryption-key
        # defence: masking.messages.advertise-binds-masking-key
        # defence: masking.messages.signatures-bind-the-sender
        return encode("advertise-keys", params_digest, site_id, enc_pk, mask_pk)

    def normalized(self) -> AdvertiseKeys:
        return AdvertiseKeys(plain_id(self.site_id), plain_bytes(self.encryption_public_key),
                             plain_bytes(self.masking_public_key), plain_bytes(self.signature))


@dataclass(frozen=True)
class ShareKeys:
    """A site's sealed shares for its neighbours, with commitments the server checks them by.

    ``share_commitments[holder]`` is the 64-byte pair (commitment to the holder's share of the
    self-mask seed, commitment to its share of the masking key), for every holder including the
    site itself: at unmask the server checks each revealed share against it and drops a
    responder that reveals a wrong one, so one bad share cannot void the round.
    """

    site_id: int
    encrypted_shares: Mapping[int, bytes]  # recipient -> AES-GCM sealed share pair
    self_mask_commitment: bytes  # SHA-256 binding of the self-mask seed, checked at unmask
    share_commitments: Mapping[int, bytes]  # holder -> commitments to its two shares (64 B)
    signature: bytes

    @staticmethod
    def signed_bytes(
        session_id: bytes, site_id: int, shares: Mapping[int, bytes], commitment: bytes,
        share_commitments: Mapping[int, bytes],
    ) -> bytes:
        listing = b"".join(
            r.to_bytes(8, "big") + hashlib.sha256(shares[r]).digest() for r in sorted(shares)
        )
        commitments = b"".join(h.to_bytes(8, "big") + share_commitments[h]
                               for h in sorted(share_commitments))
        # defence: masking.messages.share-keys-binds-session
        # defence: masking.messages.share-keys-binds-shares
        # defence: masking.messages.share-keys-binds-commitment
        # defence: masking.messages.share-keys-binds-share-commitments
        # defence: masking.messages.signatures-bind-the-sender
        return encode("share-keys", session_id, site_id, listing, commitment, commitments)

    def normalized(self) -> ShareKeys:
        return ShareKeys(plain_id(self.site_id), plain_map(self.encrypted_shares),  # type: ignore[arg-type]
                         plain_bytes(self.self_mask_commitment),
                         plain_map(self.share_commitments),  # type: ignore[arg-type]
                         plain_bytes(self.signature))


def share_commitment(session_id: bytes, owner: int, holder: int, kind: str,
                     share: bytes) -> bytes:
    """SHA-256 commitment to one Shamir share (kind "self-mask" or "masking-key"); a share is a
    uniformly random 521-bit field element, so the commitment hides it."""
    # defence: masking.commitment-binds-session, masking.commitment-binds-owner
    # defence: masking.commitment-binds-holder, masking.commitment-binds-kind
    return hashlib.sha256(encode("share-commitment", session_id, owner, holder, kind,
                                 share)).digest()


@dataclass(frozen=True)
class MaskedInput:
    """The masked vector, and the site's signed statement of whom it masked with.

    The signature covers the payload's digest and the partners, so that it doubles as an
    attestation that the server forwards to the site's neighbours (:class:`MaskAttestation`):
    they check that the site masked with every live neighbour before revealing its self-mask.
    """

    site_id: int
    masked_input: np.ndarray  # words modulo 2**word_bits, length vector_length + 1
    partners: tuple[int, ...]  # the sites it applied pairwise masks with, ascending
    signature: bytes

    @staticmethod
    def signed_bytes(session_id: bytes, site_id: int, masked: np.ndarray,
                     partners: tuple[int, ...]) -> bytes:
        data = np.ascontiguousarray(masked).data
        return MaskAttestation.signed_bytes(session_id, site_id, payload_digest(data), partners)

    def normalized(self) -> MaskedInput:
        if type(self.masked_input) is not np.ndarray:
            raise ValueError("masked input must be a numpy array")
        return MaskedInput(plain_id(self.site_id), self.masked_input,
                           plain_ids(self.partners), plain_bytes(self.signature))


@dataclass(frozen=True)
class MaskAttestation:
    """A site's signed masked-input statement without the vector: (partners, digest)."""

    partners: tuple[int, ...]
    payload_digest: bytes
    signature: bytes

    @staticmethod
    def signed_bytes(session_id: bytes, site_id: int, digest: bytes,
                     partners: tuple[int, ...]) -> bytes:
        # defence: masking.messages.masked-input-binds-session
        # defence: masking.messages.masked-input-binds-payload
        # defence: masking.messages.masked-input-binds-partners
        # defence: masking.messages.signatures-bind-the-sender
        return encode("masked-input", session_id, site_id, digest, list(partners))

    def normalized(self) -> MaskAttestation:
        return MaskAttestation(plain_ids(self.partners), plain_bytes(self.payload_digest),
                               plain_bytes(self.signature))


@dataclass(frozen=True)
class ConsistencySignature:
    site_id: int
    signature: bytes  # over the survivor list

    @staticmethod
    def signed_bytes(session_id: bytes, survivors: tuple[int, ...]) -> bytes:
        # defence: masking.messages.consistency-binds-session
        # defence: masking.messages.consistency-binds-survivors
        return encode("consistency-check", session_id, sorted(survivors))

    def normalized(self) -> ConsistencySignature:
        return ConsistencySignature(plain_id(self.site_id), plain_bytes(self.signature))


@dataclass(frozen=True)
class UnmaskResponse:
    site_id: int
    self_mask_shares: Mapping[int, bytes]  # survivor -> share of its self-mask seed
    key_shares: Mapping[int, bytes]  # dropped site -> share of its masking private key
    signature: bytes

    @staticmethod
    def signed_bytes(
        session_id: bytes, site_id: int, self_mask: Mapping[int, bytes], keys: Mapping[int, bytes]
    ) -> bytes:
        def listing(m: Mapping[int, bytes]) -> bytes:
            # each share length-prefixed: no two different maps encode alike
            return b"".join(s.to_bytes(8, "big") + len(m[s]).to_bytes(8, "big") + m[s]
                            for s in sorted(m))

        # defence: masking.messages.unmask-binds-session
        # defence: masking.messages.unmask-binds-self-mask-shares
        # defence: masking.messages.unmask-binds-key-shares
        # defence: masking.messages.signatures-bind-the-sender
        return encode("unmask", session_id, site_id, listing(self_mask), listing(keys))

    def normalized(self) -> UnmaskResponse:
        return UnmaskResponse(plain_id(self.site_id),
                              plain_map(self.self_mask_shares),  # type: ignore[arg-type]
                              plain_map(self.key_shares),  # type: ignore[arg-type]
                              plain_bytes(self.signature))


# ---- server -> site -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyDirectory:
    """Every site's advertised keys, exactly as signed."""

    entries: tuple[AdvertiseKeys, ...]

    def normalized(self) -> KeyDirectory:
        if type(self.entries) not in (tuple, list):
            raise ValueError("entries must be a tuple")
        entries = []
        for e in self.entries:
            if type(e) is not AdvertiseKeys:
                raise ValueError("a directory entry must be AdvertiseKeys")
            entries.append(e.normalized())
        return KeyDirectory(tuple(entries))


@dataclass(frozen=True)
class ShareDelivery:
    """The sealed shares addressed to one site, by sender."""

    encrypted_shares: Mapping[int, bytes]

    def normalized(self) -> ShareDelivery:
        return ShareDelivery(plain_map(self.encrypted_shares))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SurvivorList:
    """The sites whose masked input the server accepted (to be signed in the consistency check),
    with the mask attestations of the recipient's surviving neighbours (SecAgg+ only)."""

    survivors: tuple[int, ...]
    attestations: Mapping[int, MaskAttestation] = field(default_factory=dict)

    def normalized(self) -> SurvivorList:
        def attestation(a: object) -> MaskAttestation:
            if type(a) is not MaskAttestation:
                raise ValueError("an attestation must be a MaskAttestation")
            return a.normalized()

        return SurvivorList(plain_ids(self.survivors),
                            plain_map(self.attestations, attestation))  # type: ignore[arg-type]


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[int, ...]
    survivor_signatures: Mapping[int, bytes]  # signer -> signature over the survivor list
    dropped: tuple[int, ...]  # sites that shared keys but sent no masked input

    def normalized(self) -> UnmaskRequest:
        return UnmaskRequest(plain_ids(self.survivors),
                             plain_map(self.survivor_signatures),  # type: ignore[arg-type]
                             plain_ids(self.dropped))


SiteMessage = AdvertiseKeys | ShareKeys | MaskedInput | ConsistencySignature | UnmaskResponse
ServerMessage = KeyDirectory | ShareDelivery | SurvivorList | UnmaskRequest
