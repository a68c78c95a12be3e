"""secagg: secure aggregation for federated learning.

The public face. Hospital engineers use the SDK in :mod:`clients`; the protocols live in
:mod:`secagg.masking` (pairwise masking) and :mod:`secagg.ckks` (TenSEAL); primitives are in
:mod:`secagg.hazmat`. Errors are in :mod:`secagg.errors`.
"""

from secagg.errors import (
    AbortReason,
    ConfigurationError,
    InvalidMessage,
    PreconditionError,
    ProtocolAbort,
    SecAggError,
)

__all__ = [
    "AbortReason",
    "ConfigurationError",
    "InvalidMessage",
    "PreconditionError",
    "ProtocolAbort",
    "SecAggError",
]
__version__ = "0.1.0"
