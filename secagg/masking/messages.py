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
        return encode("advertise-keys", params_digest, site_id, enc_pk, mask_pk)


@dataclass(frozen=True)
class ShareKeys:
    site_id: int
    encrypted_shares: Mapping[int, bytes]  # recipient -> AES-GCM sealed share pair
    self_mask_commitment: bytes  # SHA-256 binding of the self-mask seed, checked at unmask
    signature: bytes

    @staticmethod
    def signed_bytes(
        session_id: bytes, site_id: int, shares: Mapping[int, bytes], commitment: bytes
    ) -> bytes:
        listing = b"".join(
            r.to_bytes(8, "big") + hashlib.sha256(shares[r]).digest() for r in sorted(shares)
        )
        # defence: masking.messages.share-keys-binds-session
        # defence: masking.messages.share-keys-binds-shares
        # defence: masking.messages.share-keys-binds-commitment
        return encode("share-keys", session_id, site_id, listing, commitment)


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
        return encode("masked-input", session_id, site_id, digest, list(partners))


@dataclass(frozen=True)
class ConsistencySignature:
    site_id: int
    signature: bytes  # over the survivor list

    @staticmethod
    def signed_bytes(session_id: bytes, survivors: tuple[int, ...]) -> bytes:
        # defence: masking.messages.consistency-binds-session
        # defence: masking.messages.consistency-binds-survivors
        return encode("consistency-check", session_id, sorted(survivors))


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
            return b"".join(s.to_bytes(8, "big") + m[s] for s in sorted(m))

        # defence: masking.messages.unmask-binds-session
        # defence: masking.messages.unmask-binds-self-mask-shares
        # defence: masking.messages.unmask-binds-key-shares
        return encode("unmask", session_id, site_id, listing(self_mask), listing(keys))


# ---- server -> site -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyDirectory:
    """Every site's advertised keys, exactly as signed."""

    entries: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class ShareDelivery:
    """The sealed shares addressed to one site, by sender."""

    encrypted_shares: Mapping[int, bytes]


@dataclass(frozen=True)
class SurvivorList:
    """The sites whose masked input the server accepted (to be signed in the consistency check),
    with the mask attestations of the recipient's surviving neighbours (SecAgg+ only)."""

    survivors: tuple[int, ...]
    attestations: Mapping[int, MaskAttestation] = field(default_factory=dict)


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[int, ...]
    survivor_signatures: Mapping[int, bytes]  # signer -> signature over the survivor list
    dropped: tuple[int, ...]  # sites that shared keys but sent no masked input


SiteMessage = AdvertiseKeys | ShareKeys | MaskedInput | ConsistencySignature | UnmaskResponse
ServerMessage = KeyDirectory | ShareDelivery | SurvivorList | UnmaskRequest
