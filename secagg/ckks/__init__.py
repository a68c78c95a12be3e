"""CKKS aggregation with TenSEAL: sites encrypt, the aggregator adds, key holders release.

Roles: :class:`CkksClient` (a site; a key holder also decrypts) and :class:`CkksServer` (the
aggregator, public context only). Keys: :class:`KeyHolder`, :class:`PublicContext`.
Parameters: :mod:`secagg.ckks.presets`.
"""

from secagg.ckks.client import CkksClient
from secagg.ckks.keys import KeyAnnouncement, KeyHolder, PublicContext, SealedSecretContext
from secagg.ckks.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from secagg.ckks.release import Release, decrypt_verified_sum, release_average
from secagg.ckks.round import (
    CkksRoundConfig,
    CkksStage,
    EncryptedAggregate,
    EncryptedUpdate,
    ReleasedAverage,
    ReleaseRequest,
)
from secagg.ckks.server import CkksServer

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "CkksClient",
    "CkksRoundConfig",
    "CkksServer",
    "CkksStage",
    "EncryptedAggregate",
    "EncryptedUpdate",
    "KeyAnnouncement",
    "KeyHolder",
    "Preset",
    "PublicContext",
    "Release",
    "ReleaseRequest",
    "ReleasedAverage",
    "SealedSecretContext",
    "decrypt_verified_sum",
    "get_preset",
    "release_average",
]
