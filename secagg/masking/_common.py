"""Derivations both roles compute identically: session id, pairwise seeds, share sealing."""

from __future__ import annotations

from collections.abc import Iterable

from secagg._encoding import digest, encode
from secagg.hazmat.key_agreement import derive_pair_key
from secagg.masking.messages import AdvertiseKeys

PURPOSE_MASK = "pairwise-mask-seed"
# defence: masking.share-keys-separate-from-mask-seeds
PURPOSE_SHARE = "share-encryption"


def session_id(params_digest: bytes, entries: Iterable[AdvertiseKeys]) -> bytes:
    """SHA-256 over the round parameters and every advertised key, in site order."""
    # defence: masking.session-binds-site-ids, masking.session-binds-encryption-keys
    # defence: masking.session-binds-masking-keys
    listing = b"".join(
        e.site_id.to_bytes(8, "big") + e.encryption_public_key + e.masking_public_key
        for e in sorted(entries, key=lambda e: e.site_id)
    )
    # defence: masking.common.session-binds-directory
    return digest("session", params_digest, listing)


def pairwise_seed(shared_secret: bytes, session: bytes, a: int, b: int) -> bytes:
    return derive_pair_key(shared_secret, session_id=session, purpose=PURPOSE_MASK, site_a=a,
                           site_b=b)


def share_key(shared_secret: bytes, session: bytes, a: int, b: int) -> bytes:
    return derive_pair_key(shared_secret, session_id=session, purpose=PURPOSE_SHARE, site_a=a,
                           site_b=b)


def share_associated_data(session: bytes, sender: int, receiver: int) -> bytes:
    # defence: masking.common.share-ad-binds-direction
    return encode("share-ad", session, sender, receiver, "share-keys")


def self_mask_commitment(session: bytes, site: int, seed: bytes) -> bytes:
    # defence: masking.common.commitment-binds-seed
    return digest("self-mask-commitment", session, site, seed)


def mask_sign(owner: int, peer: int) -> int:
    """+1 if ``owner`` adds the pair's mask, -1 if it subtracts it (the lower id adds)."""
    # defence: masking.common.pair-masks-cancel
    return 1 if owner < peer else -1
