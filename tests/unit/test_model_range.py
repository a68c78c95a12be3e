"""A model the sites can hold: every value finite and within its tensor's dtype. The
aggregator refuses to publish anything else, and a site refuses to load anything else (a
lying aggregator could otherwise hand it 1e39 for a float32 weight: infinities once loaded)."""

from __future__ import annotations

import numpy as np
import pytest

from secagg import wire
from secagg.errors import InvalidMessage
from secagg.model import FlatModel


def _model() -> FlatModel:
    return FlatModel.from_arrays({"w": np.zeros(3, np.float32), "h": np.zeros(2, np.float16),
                                  "d": np.zeros(2, np.float64), "i8": np.zeros(2, np.int8),
                                  "n": np.array(0, np.int64), "b": np.zeros(1, bool)})


@pytest.mark.parametrize(("position", "value", "fits"), [
    (0, 3.0e38, True), (0, 3.5e38, False), (0, -3.5e38, False),
    (3, 65504.0, True), (3, 70000.0, False),
    # what float16 rounds to 65504, not to infinity: the protocols' error at the limit
    (3, 65519.9, True), (3, -65504.00003, True), (3, 65520.0, False), (3, -65520.0, False),
    (0, float(np.finfo(np.float32).max) + 1.0e31, True),
    (0, float(np.finfo(np.float32).max) + 1.1e31, False),
    (5, 1e300, True), (5, np.inf, False), (5, np.nan, False),
    (7, 127.4, True), (7, 127.6, False), (8, -128.4, True), (8, -128.6, False),
    (9, 2.0**53, True), (10, 5.0, True),
    # float(int64 max) is 2**63: compared as floats, 2**63 passed and wrapped to -2**63; and
    # 64-bit integers are published only within +-2**53, what a float64 carries exactly and
    # what from_arrays takes from a site (beyond, no site could submit against the model)
    (9, 2.0**63, False), (9, 2.0**62, False), (9, 2.0**53 + 2, False), (9, -2.0**63, False),
    (9, -2.0**53, True),
])
def test_values_beyond_a_tensors_dtype_are_not_representable(position: int, value: float,
                                                             fits: bool) -> None:
    model = _model()
    values = model.values.copy()
    values[position] = value
    assert model.representable(values) is fits


def test_a_site_refuses_a_published_model_its_tensors_cannot_hold() -> None:
    model = _model()
    values = model.values.copy()
    values[0] = 1e39  # a float64 digest binds it; float32 cannot hold it
    lying = object.__new__(FlatModel)  # as a lying aggregator makes it: no checks
    object.__setattr__(lying, "spec", model.spec)
    object.__setattr__(lying, "values", values)
    blob = wire.Blob((b"\x00" * 32,), 8 * lying.size)
    data = wire.average_bytes(lying.values)
    with pytest.raises(InvalidMessage):
        wire.model_from_proto(wire.model_to_proto(lying, blob), data)
    assert wire.model_from_proto(wire.model_to_proto(model, blob),
                                 wire.average_bytes(model.values)).digest == model.digest


def test_uint64_values_are_compared_exactly_at_the_top_of_the_range() -> None:
    model = FlatModel.from_arrays({"u": np.zeros(1, np.uint64)})
    assert model.representable(np.array([2.0**53]))
    assert not model.representable(np.array([2.0**53 + 2]))
    assert not model.representable(np.array([2.0**64]))  # would wrap to 0


@pytest.mark.parametrize(("position", "value"), [
    (3, 65504.5), (3, -65519.0), (0, float(np.finfo(np.float32).max) + 1e31),
    (7, 127.4), (8, -128.3)])
def test_what_a_site_sends_is_held_to_the_dtype_strictly(position: int, value: float) -> None:
    """What the aggregator takes (rounded into the dtype) a site does not send: the protocols'
    error, added to a value at the rounding allowance's edge (65519.99999 for float16; a
    counter at 254 + 2 x 0.7499999 at a learning rate of 2), crossed it, and the round was
    refused after every site had sent. Property: strict refuses these, lenient takes them."""
    model = _model()
    values = model.values.copy()
    values[position] = value
    assert model.beyond_range(values) is None
    assert model.beyond_range(values, strict=True) == model.spec[
        [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5][position]].name
