"""Checks on what a site hands to a protocol role, shared by both protocols.

Errors name the parameter and never echo values of the update itself.
"""

from __future__ import annotations

import decimal
import numbers
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from secagg.hazmat import signing


def input_pair(model_input: object) -> tuple[Any, Any]:
    """``(update, weight)`` from what a site gave as its input (or its provider returned), or a
    clear error: None or a tuple of another length raised "argument after * must be an
    iterable" or "too many values to unpack", naming neither the input nor the pair."""
    # defence: inputs.an-update-weight-pair, inputs.a-list-pair-is-a-pair
    if not isinstance(model_input, tuple | list) or len(model_input) != 2:
        raise TypeError("the model input must be an (update, weight) pair, or a callable "
                        f"returning one, got {type(model_input).__name__}"
                        + (f" of length {len(model_input)}"
                           if isinstance(model_input, tuple | list) else ""))
    update, weight = model_input
    return update, weight


def is_masked_array(value: object) -> bool:
    """Whether ``value`` is a numpy masked array, without importing numpy.ma where nothing
    has (~50 ms of a site's CPU, each round's first: ``np.ma`` is a lazy import): no masked
    array exists before numpy.ma is imported."""
    ma = sys.modules.get("numpy.ma")
    return ma is not None and isinstance(value, ma.MaskedArray)


def check_update(update: object, weight: object, *, max_weight: float,
                 length: int | None = None) -> tuple[np.ndarray, float]:
    """The update as a flat numeric array and the weight as a float, or a clear error."""
    # defence: inputs.no-masked-array
    # (np.asarray drops a masked array's mask: its masked entries, junk, were sent as values)
    if is_masked_array(update):
        raise TypeError("update must be a plain array, got a numpy masked array "
                        "(fill its masked entries first: update.filled(0))")
    arr = np.asarray(update)
    # defence: inputs.flat-update
    if arr.ndim != 1:
        raise ValueError(f"update must be a flat vector, got shape {arr.shape}")
    # defence: inputs.update-length
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"update must have shape ({length},), got {arr.shape}")
    # defence: inputs.numeric-update
    # (by dtype kind: numpy counts timedelta64 as an integer type, and it failed mid-round)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"update must be numeric, got dtype {arr.dtype}")
    # defence: inputs.finite-update
    if not np.all(np.isfinite(arr)):
        raise ValueError("update contains NaN or infinity")
    # defence: inputs.update-as-float64
    # Every role works in float64 from here. Kept as float16 or float32, numpy computed the
    # quantiser's products in that type: float16 overflowed to inf (a silently wrong
    # average), float32 lost precision beyond the documented error bound. A longdouble
    # beyond float64's range becomes +-inf, which the clip takes to +-clip like any value
    # beyond it.
    with np.errstate(over="ignore"):
        arr = np.asarray(arr, dtype=np.float64)
    # defence: inputs.weight-is-a-real-number
    # (float() also took the str "0.5" and True)
    if not isinstance(weight, numbers.Real | decimal.Decimal) or isinstance(
            weight, bool | np.bool_):
        raise TypeError(f"weight must be a number, got {type(weight).__name__}")
    try:
        w = float(weight)
    except OverflowError:
        raise ValueError("weight is beyond the float range") from None
    # defence: inputs.weight-positive, inputs.weight-bounded
    if not (np.isfinite(w) and 0 < w <= max_weight):
        # The weight (a site's sample count) is not echoed: errors reach logs.
        raise ValueError(f"weight must be in (0, {max_weight}] and finite")
    return arr, w


def check_site(roster: Mapping[int, bytes], site_id: object,
               identity: signing.IdentityKey) -> int:
    """The site id as a plain int (a numpy integer is one; a bool or a float is not), on the
    roster under ``identity``'s key, or a clear error."""
    # defence: inputs.site-id-an-integer
    if isinstance(site_id, bool | np.bool_) or not isinstance(site_id, numbers.Integral):
        raise TypeError(f"site_id must be an integer, got {type(site_id).__name__}")
    # defence: inputs.site-id-as-int
    site_id = int(site_id)
    if not isinstance(identity, signing.IdentityKey):
        raise TypeError(f"identity must be a signing.IdentityKey, got {type(identity).__name__}")
    # defence: inputs.site-on-roster
    if site_id not in roster:
        raise ValueError(f"site_id {site_id} is not on the round's roster")
    # defence: inputs.identity-matches-roster
    if roster[site_id] != identity.public_bytes:
        raise ValueError(f"identity does not match the roster's key for site {site_id}")
    return site_id
