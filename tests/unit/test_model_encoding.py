"""How a model travels: float16/float32 tensors in their own dtype, the rest as float64.

A published model's values are ones its tensors hold exactly (``with_values`` rounds them), so
the compact form loses nothing: the digest (over float64 values) is the same on both ends.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import wire
from secagg.errors import ConfigurationError, InvalidMessage
from secagg.model import FlatModel, TensorSpec


def _mixed() -> FlatModel:
    rng = np.random.default_rng(3)  # test data only
    return FlatModel.from_arrays({
        "conv": rng.normal(size=(3, 4)).astype(np.float32),
        "half": rng.normal(size=5).astype(np.float16),
        "empty": np.zeros((0, 2), np.float64),
        "bias": rng.normal(size=4).astype(np.float32),
        "double": rng.normal(size=3),
        "steps": np.array(7, np.int64),
        "flag": np.ones(2, bool)})


def test_float32_model_travels_at_four_bytes_a_value() -> None:
    model = FlatModel.from_arrays({"w": np.arange(1000, dtype=np.float32) / 7})
    data = model.to_bytes()
    assert len(data) == 4000
    assert FlatModel.encoded_sizes(model.spec) == (4000, 8000)
    back = FlatModel.from_bytes(model.spec, data)
    assert back.digest == model.digest
    np.testing.assert_array_equal(back.values, model.values)


def test_mixed_model_round_trips_and_sizes_add_up() -> None:
    model = _mixed()
    data = model.to_bytes()
    # 16 float32 + 5 float16 + 3 float64 + 1 int64 + 2 bool (the last three as float64)
    assert len(data) == 16 * 4 + 5 * 2 + (3 + 1 + 2) * 8
    assert FlatModel.from_bytes(model.spec, data).digest == model.digest


def test_the_all_float64_form_of_older_stores_is_still_read() -> None:
    model = _mixed()
    legacy = model.values.astype("<f8").tobytes()
    assert FlatModel.from_bytes(model.spec, legacy).digest == model.digest


@pytest.mark.parametrize("cut", [1, 4, 8])
def test_bytes_of_any_other_size_are_refused(cut: int) -> None:
    model = _mixed()
    with pytest.raises(ValueError, match="do not match"):
        FlatModel.from_bytes(model.spec, model.to_bytes()[:-cut])
    with pytest.raises(ValueError, match="do not match"):
        FlatModel.from_bytes(model.spec, model.to_bytes() + b"\0" * cut)


def test_an_average_is_rounded_to_what_each_tensor_holds() -> None:
    """FedAvg's float64 result is rounded per tensor, so the compact form is exact: without
    the rounding a site would rebuild other values and refuse the model's digest."""
    model = _mixed()
    new = model.with_values(model.values + 1 / 3)
    np.testing.assert_array_equal(new.values[:12], (model.values[:12] + 1 / 3).astype(np.float32))
    assert new.values[16] == float(np.float16(model.values[16] + 1 / 3))
    assert new.values[21:24].tolist() == (model.values[21:24] + 1 / 3).tolist()  # float64 kept
    assert FlatModel.from_bytes(new.spec, new.to_bytes()).digest == new.digest


@settings(max_examples=60, deadline=None)
@given(tensors=st.lists(st.tuples(st.sampled_from(["float16", "float32", "float64", "int32",
                                                   "uint8", "bool"]),
                                  st.integers(0, 6)), min_size=1, max_size=6),
       shift=st.floats(-100, 100, allow_nan=False))
def test_any_published_model_round_trips_exactly(tensors: list[tuple[str, int]],
                                                 shift: float) -> None:
    model = FlatModel.from_arrays({f"t{i}": np.zeros(n, dtype) for i, (dtype, n)
                                   in enumerate(tensors)})
    values = model.values + shift
    if not model.representable(values):  # (an early return here checked nothing)
        with pytest.raises(ConfigurationError, match="beyond its"):
            model.with_values(values)
        return
    new = model.with_values(values)
    back = FlatModel.from_bytes(new.spec, new.to_bytes())
    assert back.digest == new.digest
    assert len(new.to_bytes()) == FlatModel.encoded_sizes(new.spec)[0]


@settings(max_examples=60, deadline=None)
@given(tensors=st.lists(st.tuples(st.sampled_from(["float16", "float32", "float64", "int32"]),
                                  st.integers(0, 200_000)), min_size=1, max_size=4),
       cuts=st.lists(st.integers(1, 1 << 21), min_size=0, max_size=4),
       legacy=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_a_models_digest_worked_out_part_by_part_is_its_digest(
        tensors: list[tuple[str, int]], cuts: list[int], legacy: bool, seed: int) -> None:
    """FlatModel.digest_of_parts (how a site checks a first model before building it) is
    the digest of the model the joined parts make, however the bytes are cut (chunks of
    any size, across tensors and across payload_digest's 1 MiB blocks), in either form; a
    byte changed, or one too many or too few, is another digest or refused."""
    rng = np.random.default_rng(seed)
    model = FlatModel.from_arrays({f"t{i}": rng.standard_normal(n).astype(dtype)
                                   for i, (dtype, n) in enumerate(tensors)})
    data = model.values.tobytes() if legacy else model.to_bytes()
    ends = sorted({min(c, len(data)) for c in cuts} | {len(data)})
    parts = [data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    assert b"".join(parts) == data
    assert FlatModel.digest_of_parts(model.spec, parts) == model.digest
    if data:
        changed = bytearray(data)
        changed[len(data) // 2] ^= 1
        assert FlatModel.digest_of_parts(model.spec, [bytes(changed)]) != model.digest
        with pytest.raises(ValueError, match="do not match"):
            FlatModel.digest_of_parts(model.spec, [data[:-1]])
    with pytest.raises(ValueError, match="do not match"):
        FlatModel.digest_of_parts(model.spec, [data, b"\0"])


def test_float32_subnormals_are_flushed_so_sites_with_flush_to_zero_accept_the_model() -> None:
    """A training script that calls torch.set_flush_denormal(True) makes the CPU read a
    float32 subnormal as 0 when numpy widens it: the site would rebuild other float64 values
    than the digest binds and refuse an honest model. Models carry no float32 subnormals."""
    torch = pytest.importorskip("torch")
    from secagg import wire

    start = FlatModel.from_arrays({"w": np.array([1e-40, -3e-39, 0.5], np.float32),
                                   "h": np.array([1e-7, 0.25], np.float16)})
    assert start.values[:3].tolist() == [0.0, -0.0, 0.5]
    assert np.signbit(start.values[1])
    assert start.values[3] == float(np.float16(1e-7)) != 0.0  # float16 subnormals are kept
    published = start.with_values(np.array([2e-39, 0.5, -1e-45, 3e-6, 1.0]))
    assert published.values[:3].tolist() == [0.0, 0.5, -0.0]
    blob = wire.Blob((b"\0" * 32,), len(published.to_bytes()))
    # (set_flush_denormal returns whether the CPU supports it, not the previous state: the
    # default, off, is restored by hand, or flush-to-zero leaks into every later test)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        got = wire.model_from_proto(wire.model_to_proto(published, blob), published.to_bytes())
    finally:
        torch.set_flush_denormal(False)
    assert got.digest == published.digest


def test_subnormals_are_flushed_in_every_block_and_nothing_else_changes() -> None:
    """The flush runs block by block (64Ki values): subnormals at block edges and in the
    last, partial block go; zeros of either sign, normals and float64 tensors stay."""
    rng = np.random.default_rng(7)  # test data only
    size = 3 * (1 << 16) + 5
    w = rng.normal(0, 1, size).astype(np.float32)
    edges = [0, (1 << 16) - 1, 1 << 16, 2 * (1 << 16) + 1, size - 1]
    w[edges] = np.array([1e-40, -2e-39, 3e-45, -1e-44, 5e-39], np.float32)
    w[10], w[11] = 0.0, -0.0
    d = np.array([1e-300, -2e-310])  # float64 tensors keep their (float64) subnormals
    model = FlatModel.from_arrays({"w": w, "d": d})
    expected = w.astype(np.float64)
    expected[edges] = np.copysign(0.0, expected[edges])
    assert np.array_equal(model.values[:size], expected)
    assert np.array_equal(np.signbit(model.values[:size]), np.signbit(expected))
    assert model.values[size:].tolist() == d.tolist()


@pytest.mark.parametrize("dtype", ["float128", "complex64", "object", "U3", "S4", "datetime64"])
def test_tensors_of_unsupported_dtypes_are_refused(dtype: str) -> None:
    from secagg.errors import ConfigurationError

    if dtype == "float128" and not hasattr(np, "float128"):
        pytest.skip("no float128 on this platform")
    with pytest.raises(ConfigurationError, match="unsupported dtype"):
        FlatModel.from_arrays({"w": np.zeros(2, dtype=dtype)})


@pytest.mark.parametrize(("dtype", "value"), [("int64", 2**63 - 1), ("int64", -2**53 - 1),
                                              ("uint64", 2**64 - 1), ("uint64", 2**53 + 1)])
def test_64_bit_integers_a_float64_cannot_carry_are_refused_naming_the_tensor(
        dtype: str, value: int) -> None:
    """Beyond 2**53 a value would be rounded, and near 2**63 wrap round on the way back
    (int64 max came back as int64 min): the model every site receives would not be the one
    given, so `federation init` and the SDK refuse it where it is given."""
    from secagg.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"'step' holds integers beyond \+-2\*\*53"):
        FlatModel.from_arrays({"w": np.zeros(3, np.float32),
                               "step": np.array([0, value], dtype=dtype)})
    edge = FlatModel.from_arrays({"step": np.array([2**53, 0 if dtype == "uint64" else -2**53],
                                                   dtype=dtype)})
    assert edge.to_arrays()["step"].tolist() == [2**53, 0 if dtype == "uint64" else -2**53]


def test_a_spec_naming_a_tensor_twice_is_refused() -> None:
    """From the wire or a store: to_arrays would keep one of the two and drop the other."""
    from secagg.errors import ConfigurationError
    from secagg.model import TensorSpec

    spec = (TensorSpec("w", (2,), "float32"), TensorSpec("w", (2,), "float32"))
    with pytest.raises(ConfigurationError, match="names a tensor twice"):
        FlatModel(spec, np.zeros(4))


def test_a_bool_tensors_values_are_what_the_sites_hold() -> None:
    """FedAvg with a server learning rate above 1 can take a bool buffer to 2 or -1: the
    published values are 0 or 1 (and the digest that of the tensors the sites hold), the
    value saturating: above 0 is True, else False (a True every site turned False, at rate 2
    1 + 2 x -1 = -1, was published True when any nonzero value was)."""
    model = FlatModel.from_arrays({"flag": np.array([True, False, True, False]),
                                   "w": np.zeros(2, np.float32)})
    new = model.with_values(np.array([3.0, -1.0, 0.4, 0.6, 1.5, 2.5]))
    assert new.values[:4].tolist() == [1.0, 0.0, 0.0, 1.0]
    again = FlatModel.from_arrays(new.to_arrays())
    assert again.digest == new.digest


def test_a_published_64_bit_integer_stays_within_what_a_site_can_submit() -> None:
    """The aggregator publishes only models every site can hold and submit against: an
    int64 value past 2**53 (which from_arrays refuses at the site) is not representable."""
    model = FlatModel.from_arrays({"steps": np.array(5, np.int64)})
    assert model.representable(np.array([2.0**53]))
    assert not model.representable(np.array([2.0**53 + 2]))
    assert not model.representable(np.array([-(2.0**53) - 2]))


@pytest.mark.parametrize(("dtype", "value"), [
    ("int8", 300.0), ("int8", -129.0), ("uint64", -1.0), ("int64", 2.0**63), ("int32", 2.5),
    ("bool", 7.0), ("bool", -1e300), ("float32", 0.1), ("float32", 1e-40), ("float16", 0.1)],
    ids=["int8-300", "int8-neg", "uint64-neg", "int64-2**63", "int-fraction", "bool-7",
         "bool-huge", "float32-not-f32", "float32-subnormal", "float16-not-f16"])
def test_a_model_holds_only_values_its_tensors_hold_exactly(dtype: str, value: float) -> None:
    """Built directly, published by with_values or read off the wire, a value a tensor cannot
    hold (300 in int8 came back as 44, 2.5 in an integer tensor as 2, 7 in a bool as True)
    would sit under the digest of values no site's tensors have."""
    spec = FlatModel.from_arrays({"t": np.zeros(2, dtype)}).spec
    values = np.array([0.0, value])
    with pytest.raises(ConfigurationError, match=r"holds values its dtype .* cannot hold"):
        FlatModel(spec, values)
    data = values.tobytes()  # the all-float64 form: what a lying aggregator can send
    proto = wire.model_to_proto(FlatModel(spec, np.zeros(2)),
                                wire.Blob((hashlib.sha256(data).digest(),), len(data)))
    with pytest.raises(InvalidMessage, match="model"):
        wire.model_from_proto(proto, data)
    if dtype.startswith(("int", "uint")) and value != 2.5:  # out of range: refused, not wrapped
        with pytest.raises(ConfigurationError, match="beyond its tensor's range"):
            FlatModel(spec, np.zeros(2)).with_values(values)
    held = FlatModel(spec, np.zeros(2)).with_values(np.array([0.0, 1.0]))
    assert FlatModel(spec, held.values).digest == held.digest  # what with_values makes is held


def test_a_published_integer_at_zero_is_a_positive_zero() -> None:
    """rint(-1e-9) is -0.0: published so, its digest was not that of the 0 the sites hold,
    and a site rebuilding the model from its tensors (or an .npz) found another digest."""
    model = FlatModel.from_arrays({"counter": np.zeros(3, np.int64), "w": np.zeros(2)})
    new = model.with_values(np.array([-1e-9, -0.3, 0.0, -0.0, 1.0]))
    assert not np.any(np.signbit(new.values[:3]))
    assert np.signbit(new.values[3])  # a float tensor keeps its -0.0: the sites hold it
    assert FlatModel.from_arrays(new.to_arrays()).digest == new.digest


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((2, 3)), [0.0] * 6,
                                 np.array(["a"] * 6), np.zeros(6, dtype=object)],
                         ids=["short", "2d", "list", "str", "object"])
def test_with_values_and_representable_take_only_a_numeric_vector(bad: object) -> None:
    model = FlatModel.from_arrays({"w": np.zeros(6)})
    with pytest.raises(ConfigurationError, match="numeric vector of the model's 6 values"):
        model.with_values(bad)  # type: ignore[arg-type]
    assert model.representable(bad) is False  # type: ignore[arg-type]
    assert model.representable(np.zeros(6, np.int64)) is True


@pytest.mark.parametrize("bad", [None, [("w", np.zeros(2))], "w"], ids=["none", "pairs", "str"])
def test_from_arrays_takes_only_a_mapping(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="a model is a mapping of names to arrays"):
        FlatModel.from_arrays(bad)  # type: ignore[arg-type]


def test_a_masked_array_is_refused_rather_than_its_hidden_values_taken() -> None:
    masked = np.ma.MaskedArray([1.0, 99.0], mask=[False, True])
    with pytest.raises(ConfigurationError, match="masked array: fill it first"):
        FlatModel.from_arrays({"w": masked})
    assert FlatModel.from_arrays({"w": masked.filled(0.0)}).values.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(("name", "shape", "dtype"), [
    (None, (1,), "float32"), (5, (1,), "nope"), ("x", (True,), "float32"),
    ("x", (2.0,), "float32"), ("x", [2], "float32"), ("x", (2,), np.float32)],
    ids=["name-none", "name-int", "dim-bool", "dim-float", "shape-list", "dtype-type"])
def test_a_tensor_spec_of_the_wrong_types_is_refused(name: object, shape: object,
                                                     dtype: object) -> None:
    with pytest.raises(ConfigurationError, match="a tensor spec is a str name"):
        TensorSpec(name, shape, dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["int8", "uint64", "bool"])
def test_an_integer_or_bool_tensor_holds_no_negative_zero(dtype: str) -> None:
    """-0.0 compares equal to 0: a lying aggregator (or an older store) could serve the same
    tensors under another digest, which a site reloading them from its own arrays or an
    .npz would not find again. What an integer tensor holds is +0.0."""
    spec = FlatModel.from_arrays({"t": np.zeros(2, dtype)}).spec
    with pytest.raises(ConfigurationError, match="cannot hold exactly"):
        FlatModel(spec, np.array([0.0, -0.0]))
    assert FlatModel(spec, np.array([0.0, 0.0])).digest == FlatModel.from_arrays(
        {"t": np.zeros(2, dtype)}).digest


@pytest.mark.parametrize(("dtype", "value"), [("bool", np.nan), ("bool", np.inf),
                                              ("float16", 65520.0), ("int8", 127.6)])
def test_with_values_refuses_what_representable_refuses(dtype: str, value: float) -> None:
    """NaN in a bool tensor became True and 65510 in a float16 one was rounded down to 65504,
    where representable refused both (65510 is now taken by both: it rounds to 65504; 65520
    rounds to infinity): a CKKS key holder signed a result the aggregator then
    refused. Now with_values refuses them too."""
    model = FlatModel.from_arrays({"t": np.zeros(2, dtype)})
    values = np.array([0.0, value])
    assert model.representable(values) is False
    with pytest.raises(ConfigurationError, match="NaN or infinity, or a value beyond"):
        model.with_values(values)
    assert model.with_values(np.array([0.0, 1.0])).values.tolist() == [0.0, 1.0]


def test_a_tensor_name_the_aggregator_chose_is_cut_in_the_error() -> None:
    """A spec read off the wire names its tensors as the aggregator likes: a 10,000-character
    name went whole into the error a site logs and shows."""
    name = "n" * 10_000
    spec = FlatModel.from_arrays({name: np.zeros(2, "int8")}).spec
    with pytest.raises(ConfigurationError, match="cannot hold exactly") as caught:
        FlatModel(spec, np.array([300.0, 0.0]))
    assert len(str(caught.value)) < 300


def test_model_values_of_another_length_than_the_spec_are_refused() -> None:
    spec = FlatModel.from_arrays({"t": np.zeros(3, "float32")}).spec
    for wrong in (np.zeros(4), np.zeros(2), np.zeros((3, 1))):
        with pytest.raises(ConfigurationError, match="do not match the model spec"):
            FlatModel(spec, wrong)


def test_a_nan_in_a_model_names_its_tensor_not_its_values() -> None:
    """A state dict holds dozens of tensors: "model values contain NaN" left the engineer to
    search them all."""
    arrays = {"conv.weight": np.zeros((2, 3)), "fc.bias": np.array([0.123456, np.nan]),
              "fc.weight": np.array([np.inf])}
    with pytest.raises(ConfigurationError, match=r"NaN or infinity \(in tensor 'fc.bias'\)") \
            as caught:
        FlatModel.from_arrays(arrays)
    assert "0.123456" not in str(caught.value)


def test_an_empty_64_bit_integer_tensor_is_taken() -> None:
    """The int64 range check of from_arrays on a tensor with no values (a buffer torch keeps
    empty) raised numpy's "zero-size array" ValueError."""
    model = FlatModel.from_arrays({"w": np.ones(3, np.float32), "none": np.zeros(0, np.int64),
                                   "none_u": np.zeros((2, 0), np.uint64)})
    assert model.size == 3
    assert model.to_arrays()["none"].dtype == np.int64
    assert model.to_arrays()["none_u"].shape == (2, 0)


def test_with_values_leaves_the_callers_vector_as_it_was() -> None:
    """with_values rounds a copy: the aggregator's float64 average (or a site's) is not
    rounded in place behind its back."""
    model = FlatModel.from_arrays({"w": np.zeros(2, np.float32), "n": np.zeros(2, np.int64),
                                   "flag": np.zeros(1, bool)})
    values = np.array([0.1, 1e-40, 2.4, -0.3, 0.7])
    before = values.copy()
    made = model.with_values(values)
    assert np.array_equal(values, before)
    assert made.values.tolist() == [float(np.float32(0.1)), 0.0, 2.0, 0.0, 1.0]


def test_a_model_holding_a_float32_subnormal_is_refused() -> None:
    """A float32 subnormal reads as 0.0 at a site whose training turned on flush-to-zero,
    which would then refuse the model's digest while other sites take it: built directly or
    read off the wire, a model holds none (from_arrays and with_values flush them)."""
    spec = (TensorSpec("w", (2,), "float32"),)
    subnormal = float(np.float32(1e-40))
    assert subnormal != 0.0 and float(np.float32(subnormal)) == subnormal
    with pytest.raises(ConfigurationError, match="cannot hold exactly"):
        FlatModel(spec, np.array([1.0, subnormal]))
    with pytest.raises(ConfigurationError, match="cannot hold exactly"):
        FlatModel.from_bytes(spec, np.array([1.0, subnormal], dtype="<f4").tobytes())
    # float16 subnormals are values models use: kept
    half = float(np.float16(1e-6))
    assert FlatModel((TensorSpec("h", (1,), "float16"),), np.array([half])).values[0] == half


def test_a_model_with_nan_names_the_tensor_that_holds_it() -> None:
    spec = (TensorSpec("first", (2,), "float64"), TensorSpec("second", (2,), "float64"))
    for at, name in ((0, "first"), (1, "first"), (2, "second"), (3, "second")):
        values = np.zeros(4)
        values[at] = np.nan
        with pytest.raises(ConfigurationError, match=f"in tensor '{name}'"):
            FlatModel(spec, values)


def test_a_model_of_no_tensors_is_built_not_a_numpy_error() -> None:
    """from_arrays({}) is the empty model (the kit refuses it as a job's start, by name),
    not numpy's "need at least one array to concatenate"."""
    empty = FlatModel.from_arrays({})
    assert empty.size == 0 and empty.spec == () and empty.to_arrays() == {}
