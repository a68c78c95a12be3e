"""State dicts to and from flat vectors, clipping and deltas (torch imported only when used).

- names, shapes and dtypes are kept; integer buffers such as BatchNorm's
  ``num_batches_tracked`` are averaged as floats and rounded back to integers;
- the update a site sends is the delta between its trained state and the round's global model,
  clipped to the round's L2 bound (``[update] clip_norm``) before quantisation or encryption.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from secagg._inputs import is_masked_array
from secagg._norm import l2_norm
from secagg.errors import ConfigurationError
from secagg.model import FlatModel


def to_numpy(state: Mapping[str, Any], bfloat16: set[str] | None = None,
             ) -> dict[str, np.ndarray]:
    """A state dict's values as numpy arrays; a clear ConfigurationError for what is not a
    state dict or holds a tensor with no values numpy can take. A bfloat16 tensor (numpy has
    no such dtype) comes as float32, which holds its every value, its name added to
    ``bfloat16`` if given."""
    # defence: sdk.state-dict-is-a-mapping
    if not isinstance(state, Mapping):
        hint = (" (a module: pass model.state_dict())" if hasattr(state, "state_dict")
                else "")
        raise ConfigurationError(f"a state dict maps names to tensors; got "
                                 f"{type(state).__name__}{hint}")
    out = {}
    for name, value in state.items():
        # (keys 1 and "1" were one tensor, the second silently replacing the first)
        # defence: sdk.tensor-names-distinct-as-strings
        if str(name) in out:
            raise ConfigurationError(f"two tensors are named {str(name)[:64]!r}")
        if hasattr(value, "detach"):  # a torch tensor
            if str(getattr(value, "dtype", "")) == "torch.bfloat16":
                # defence: sdk.bfloat16-training-precision-kept
                if bfloat16 is not None:
                    bfloat16.add(str(name))
                value = value.float()
            value = _torch_values(str(name)[:64], value)
        # defence: sdk.no-masked-array
        # (np.asarray drops a masked array's mask: its masked entries, junk, went out as
        # values; FlatModel.from_arrays refuses one, but sees only what this returns)
        if is_masked_array(value):
            raise ConfigurationError(f"tensor {str(name)[:64]!r} is a numpy masked array: "
                                     "fill its masked entries first, e.g. .filled(0)")
        # (a list of tensors that need grad, are bfloat16 or on the meta device, or a ragged
        # list, raised from inside numpy or torch, naming no tensor)
        # defence: sdk.array-conversion-named
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ConfigurationError(
                f"tensor {str(name)[:64]!r} cannot be read as an array "
                f"({type(value).__name__}): {str(e).splitlines()[0][:120] if str(e) else ''}"
                " (give a tensor or an array: e.g. torch.stack(...).detach().float())"
            ) from None
        # (None or a string became an array of dtype object or str, told as an unsupported
        # dtype: not that the value is no tensor at all)
        # defence: sdk.non-numeric-value-named
        if array.dtype.kind in "OSUV":
            raise ConfigurationError(f"tensor {str(name)[:64]!r} is a {type(value).__name__}, "
                                     "not a tensor or an array of numbers")
        out[str(name)] = array
    return out


def _torch_values(name: str, tensor: Any) -> np.ndarray:
    # (each of these raised from inside torch: a traceback, or a misleading dtype message)
    # defence: sdk.torch-tensor-kinds-named
    layout = str(getattr(tensor, "layout", "torch.strided"))
    if layout != "torch.strided":
        raise ConfigurationError(f"tensor {name!r} is {layout.removeprefix('torch.')}: "
                                 "convert it first, e.g. .to_dense()")
    if getattr(tensor, "is_meta", False):
        raise ConfigurationError(f"tensor {name!r} is on the meta device and holds no "
                                 "values: load the trained weights first")
    from torch.nn.parameter import is_lazy

    # (a LazyLinear's UninitializedParameter raised torch's own ValueError, naming no tensor)
    # defence: sdk.lazy-parameters-named
    if is_lazy(tensor):
        raise ConfigurationError(f"tensor {name!r} is an uninitialized (lazy) parameter and "
                                 "holds no values: run a forward pass first")
    try:
        tensor = tensor.detach().cpu()
        if tensor.is_conj():
            tensor = tensor.resolve_conj()
        if tensor.is_neg():
            tensor = tensor.resolve_neg()
        return tensor.numpy()  # type: ignore[no-any-return]
    except TypeError:  # dtypes numpy has not got (bfloat16 is converted above)
        raise ConfigurationError(
            f"tensor {name!r} is {tensor.dtype}, which models do not carry "
            "(float16/32/64, bfloat16, integers, bool): convert it first, e.g. .float()"
            ) from None
    except RuntimeError as e:
        raise ConfigurationError(f"tensor {name!r} ({tensor.dtype}) cannot be read as an "
                                 f"array: {str(e).splitlines()[0][:120]}") from None


def as_tensors(arrays: Mapping[str, np.ndarray], kind: str) -> dict[str, Any]:
    """``kind``: "numpy", "torch", or "auto" (torch if it is installed)."""
    if kind == "numpy":
        return dict(arrays)
    try:
        import torch
    except ImportError:
        if kind == "torch":
            raise ConfigurationError("tensors='torch' needs torch installed") from None
        return dict(arrays)
    # np.require keeps a 0-d array 0-d (np.ascontiguousarray made BatchNorm's
    # num_batches_tracked shape (1,), and the SDK then refused its own output)
    # defence: sdk.tensor-shapes-kept
    return {name: torch.from_numpy(np.require(a, requirements="C")) for name, a in arrays.items()}


def flatten_like(state: Mapping[str, Any], model: FlatModel) -> np.ndarray:
    """The state's values as a vector in the model's layout; a clear error if they differ."""
    return flatten_with_dtypes(state, model)[0]


def _wrapped_hint(missing: list[str], extra: list[str]) -> str:
    """When every unexpected name is a missing one under one prefix (a wrapped module's
    state dict: Opacus's ``_module.``, torch.compile's ``_orig_mod.``, DataParallel's
    ``module.``), say so and what to pass instead."""
    if not missing or len(missing) != len(extra) or "." not in extra[0]:
        return ""
    prefix = extra[0][:extra[0].index(".") + 1]
    if sorted(e[len(prefix):] for e in extra if e.startswith(prefix)) != missing:
        return ""
    inner = prefix[:-1]
    return (f"every name has the prefix {prefix!r}: a wrapped model's state dict (pass the "
            f"wrapped module's, e.g. model.{inner}.state_dict())")


def _extra_state(name: object, value: object) -> bool:
    """Whether ``name: value`` is a module's non-tensor extra state (``_extra_state``)."""
    return (isinstance(name, str) and (name == "_extra_state" or name.endswith("._extra_state"))
            and not hasattr(value, "shape"))


def flatten_with_dtypes(state: Mapping[str, Any], model: FlatModel,
                        ) -> tuple[np.ndarray, dict[str, str]]:
    """``flatten_like``, and the dtype each of the state's tensors has (name -> numpy dtype
    name, or "bfloat16"): the precision the site trains in, which may be less than the
    model's."""
    bfloat16: set[str] = set()
    names = [t.name for t in model.spec]
    # a module's extra state that is no tensor (torch's get_extra_state: a quantiser's or
    # FP8 module's settings, a dict) is no value of the model: left out, as init.npz has it
    # not (the README's recipe), rather than refused as "a dict, not a tensor"
    # defence: sdk.extra-state-left-out
    if isinstance(state, Mapping) and any(_extra_state(k, v) for k, v in state.items()):
        known = set(names)
        state = {k: v for k, v in state.items() if k in known or not _extra_state(k, v)}
    arrays = to_numpy(state, bfloat16)
    # tensors are placed by name, as load_state_dict does: a state dict built in another
    # order (parameters, then buffers) is the same model, its values where the model's go
    # defence: sdk.state-dict-placed-by-name
    if list(arrays) != names and set(arrays) == set(names):
        arrays = {n: arrays[n] for n in names}
    flat = FlatModel.from_arrays(arrays)
    expected = {(t.name, t.shape) for t in model.spec}
    got = {(t.name, t.shape) for t in flat.spec}
    # (placed by name above, the tensors come in the model's order whenever the names match)
    # defence: sdk.state-dict-layout-shapes
    if expected != got:
        # (a tensor of another shape was "missing or reshaped ['w'], unexpected ['w']")
        want, have = dict(expected), dict(got)
        reshaped = sorted(n for n in want.keys() & have.keys() if want[n] != have[n])
        missing = sorted(want.keys() - have.keys())
        extra = sorted(have.keys() - want.keys())
        raise ConfigurationError(
            "the state dict does not match the round's model: " + "; ".join(part for part in (
                ", ".join(f"{n!r} has shape {tuple(have[n])}, the model's is {tuple(want[n])}"
                          for n in reshaped[:5]),
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {extra[:5]}" if extra else "",
                _wrapped_hint(missing, extra)) if part))
    # which entries are integers (counters, left out of the clip) is the caller's tensors'
    # say as much as the spec's: a float tensor where the model has an integer one (a spec
    # relabelled by the aggregator) would escape the clip
    # defence: sdk.dtype-kinds-match
    kinds = [t.name for t, mine in zip(model.spec, flat.spec, strict=True)
             if _is_float(t.dtype) != _is_float(mine.dtype)]
    if kinds:
        raise ConfigurationError(
            f"the state dict's tensors {kinds[:5]} are floating point where the round's model "
            "has integers, or the other way round")
    # A value the round's model cannot hold in that tensor's dtype (-1 given for a uint8
    # buffer, 65505 in a float32 copy of a float16 tensor) was sent: with a large enough
    # weight the average was out of range too, the aggregator aborted the summed round, and
    # every site, having sent against its model, could go no further: one site's input
    # ended the job. The averages of values each tensor holds are values it holds.
    # defence: sdk.values-within-the-rounds-dtypes
    beyond = model.beyond_range(flat.values, strict=True)
    if beyond is not None:
        dtype = next(t.dtype for t in model.spec if t.name == beyond)
        raise ConfigurationError(
            f"tensor {beyond[:64]!r} holds a value its dtype in the round's model ({dtype}) "
            "cannot hold: keep it in that dtype's range (e.g. load it into the model and "
            "take model.state_dict())")
    return flat.values, {t.name: "bfloat16" if t.name in bfloat16 else t.dtype
                         for t in flat.spec}


def _is_float(dtype: str) -> bool:
    return np.dtype(dtype).kind in "fc"


def clip_l2(delta: np.ndarray, bound: float, counters: np.ndarray | None = None, *,
            in_place: bool = False) -> tuple[np.ndarray, float]:
    """``delta`` scaled down to L2 norm ``bound`` if longer; (clipped, original norm).

    ``counters``: a mask of the entries of integer tensors (``FlatModel.integer_positions``,
    e.g. BatchNorm's ``num_batches_tracked``). They count steps, not learn: they are left out
    of the norm and not scaled (otherwise a counter's +200 per epoch would shrink every weight
    to nothing); the quantiser still clips each of them to ``[-clip, clip]`` per round.
    ``in_place``: scale ``delta`` itself (the caller owns it) instead of a copy."""
    # (a bound of NaN, 0, a negative number or inf left the update unclipped, silently: the
    # `norm > bound > 0` below is False for each; True clipped to 1; a str raised from '>')
    # defence: sdk.clip-bound-positive-finite
    if isinstance(bound, bool | np.bool_) or not isinstance(bound, numbers.Real) or not (
            math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a positive finite number, got {bound!r:.40}")
    if counters is not None and not counters.any():
        counters = None  # no integer tensors: no copy of the learned values
    learned = delta if counters is None else delta[~counters]
    norm = l2_norm(learned)
    if norm > bound > 0:
        if in_place:  # the caller's own array: no second copy of a large model
            if counters is None:
                delta *= bound / norm
            else:
                delta[~counters] *= bound / norm
            return delta, norm
        out = delta * (bound / norm)
        if counters is not None:
            out[counters] = delta[counters]
        return out, norm
    return delta, norm
