"""The SDK's tensor helpers: the update's L2 clip (integer counters excluded)."""

from __future__ import annotations

import numpy as np
import pytest

from clients import tensors
from clients.tensors import clip_l2, l2_norm
from secagg.errors import ConfigurationError
from secagg.model import FlatModel


def test_clip_scales_learned_values_to_the_bound_and_leaves_counters_alone() -> None:
    """A BatchNorm step counter grows by hundreds per epoch; counted in the norm it would
    shrink every weight of the update to nothing."""
    model = FlatModel.from_arrays({"w": np.zeros((2, 2), np.float32),
                                   "num_batches_tracked": np.array(0, np.int64)})
    delta = np.array([3.0, 4.0, 0.0, 0.0, 205.0])  # weights of norm 5, a counter of 205
    clipped, norm = clip_l2(delta, 1.0, model.integer_positions)
    assert norm == 5.0
    np.testing.assert_allclose(clipped[:4], [0.6, 0.8, 0.0, 0.0])
    assert clipped[4] == 205.0
    unclipped, _ = clip_l2(delta, 10.0, model.integer_positions)
    np.testing.assert_array_equal(unclipped, delta)
    # without a counter mask every entry counts (plain vectors)
    plain, norm = clip_l2(np.array([3.0, 4.0]), 1.0)
    assert norm == 5.0 and np.allclose(plain, [0.6, 0.8])


def test_a_bfloat16_state_dict_is_taken_and_its_precision_kept_for_the_digest() -> None:
    """torch's bfloat16 has no numpy dtype: its values come as float32 (which holds each
    exactly), and the site knows it trains in bfloat16 (the one-update rule rounds the
    round's model to it). A dtype numpy has not got and float32 cannot hold is a clear error
    naming the tensor and what to do."""
    torch = pytest.importorskip("torch")
    from secagg.errors import ConfigurationError
    from secagg.model import FlatModel

    model = FlatModel.from_arrays({"w": np.zeros(3, np.float32)})
    values, dtypes = tensors.flatten_with_dtypes(
        {"w": torch.tensor([0.5, 1.0078125, -3.0], dtype=torch.bfloat16)}, model)
    assert values.tolist() == [0.5, 1.0078125, -3.0] and dtypes == {"w": "bfloat16"}
    with pytest.raises(ConfigurationError, match=r"'w' is torch.float8_e4m3fn.*\.float\(\)"):
        tensors.flatten_like({"w": torch.zeros(3, dtype=torch.float8_e4m3fn)}, model)
    with pytest.raises(ConfigurationError, match="'w' cannot be read"):
        FlatModel.from_arrays({"w": torch.zeros(3, dtype=torch.bfloat16)})


def test_clip_in_place_scales_the_callers_array_and_gives_the_same_values() -> None:
    model = FlatModel.from_arrays({"w": np.zeros((2, 2), np.float32),
                                   "num_batches_tracked": np.array(0, np.int64)})
    delta = np.array([3.0, 4.0, 0.0, 0.0, 205.0])
    expected, norm = clip_l2(delta, 1.0, model.integer_positions)
    mine = delta.copy()
    out, norm_in_place = clip_l2(mine, 1.0, model.integer_positions, in_place=True)
    assert out is mine and norm_in_place == norm
    np.testing.assert_array_equal(out, expected)
    plain = np.array([3.0, 4.0])
    assert clip_l2(plain, 1.0, in_place=True)[0] is plain and np.allclose(plain, [0.6, 0.8])


BLOCK = 1 << 18


@pytest.mark.parametrize("size", [0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_l2_norm_is_numpys_norm_across_block_edges(size: int) -> None:
    values = np.random.default_rng(size).normal(0, 3, size)  # test data only
    assert l2_norm(values) == pytest.approx(float(np.linalg.norm(values)), rel=1e-12, abs=0)


def test_torch_tensors_keep_their_shapes_including_0_d() -> None:
    """BatchNorm's num_batches_tracked is a 0-d int64 tensor: it comes back 0-d (it came back
    shape (1,), and the SDK then refused its own output as the next state)."""
    torch = pytest.importorskip("torch")
    model = FlatModel.from_arrays({"w": np.ones((2, 3), np.float32),
                                   "num_batches_tracked": np.array(7, np.int64),
                                   "h": np.zeros(1, np.float16)})
    state = tensors.as_tensors(model.to_arrays(), "torch")
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "w": (2, 3), "num_batches_tracked": (), "h": (1,)}
    assert state["num_batches_tracked"].dtype == torch.int64
    back = tensors.flatten_like(state, model)
    assert np.array_equal(back, model.values)


def test_a_float_tensor_where_the_model_has_integers_is_refused() -> None:
    """Which entries are integer counters (left out of the clip) must agree between the
    caller's tensors and the round's spec: a spec that relabels a float weight int64 (an
    aggregator's lie) would otherwise take it out of the clip."""
    from secagg.errors import ConfigurationError

    model = FlatModel.from_arrays({"w": np.zeros(4, np.int64)})
    with pytest.raises(ConfigurationError, match="floating point where"):
        tensors.flatten_like({"w": np.ones(4, np.float32)}, model)
    floats = FlatModel.from_arrays({"w": np.zeros(4, np.float32)})
    assert tensors.flatten_like({"w": np.ones(4, np.float64)}, floats).sum() == 4  # cast


def test_a_state_dict_in_another_order_is_placed_by_name() -> None:
    """The same tensors in another order (an init file written from named_parameters() then
    named_buffers(), a state dict from state_dict()): each value lands on its own weight, by
    name, as load_state_dict places them; flattened in the dict's order they would land on
    the wrong weights (it was refused, with an error naming nothing)."""
    model = FlatModel.from_arrays({"a": np.zeros(2), "b": np.zeros(3), "c": np.zeros(1)})
    state = {"c": np.array([7.0]), "a": np.array([1.0, 2.0]), "b": np.array([3.0, 4.0, 5.0])}
    assert tensors.flatten_like(state, model).tolist() == [1, 2, 3, 4, 5, 7]


@pytest.mark.parametrize("lie", ["transposed", "renamed", "missing", "extra"])
def test_a_state_dict_that_is_not_the_models_layout_is_refused_naming_it(lie: str) -> None:
    """Same number of values, other layout (a transposed weight, another name): flattened as
    they are, the update would land on the wrong weights. Refused with a clear error naming
    the tensors, as are a missing and an extra tensor."""
    from secagg.errors import ConfigurationError

    model = FlatModel.from_arrays({"a": np.zeros((2, 3)), "b": np.zeros(4)})
    a, b = np.ones((2, 3)), np.ones(4)
    state = {
        "transposed": {"a": a.T, "b": b},
        "renamed": {"a": a, "c": b},
        "missing": {"a": a},
        "extra": {"a": a, "b": b, "c": np.ones(1)},
    }[lie]
    with pytest.raises(ConfigurationError, match="does not match the round's model") as e:
        tensors.flatten_like(state, model)
    assert {"transposed": "'a' has shape (3, 2), the model's is (2, 3)",
            "renamed": "missing ['b']; unexpected ['c']", "missing": "missing ['b']",
            "extra": "unexpected ['c']"}[lie] in str(e.value)
    assert tensors.flatten_like({"a": a, "b": b}, model).size == 10



@pytest.mark.parametrize("prefix", ["_module.", "_orig_mod.", "module."])
def test_a_wrapped_models_state_dict_is_refused_with_what_to_pass(prefix: str) -> None:
    """Opacus's GradSampleModule, torch.compile and DataParallel prefix every name: the
    refusal listed missing and unexpected names and left the engineer to see why. It now
    names the prefix and the wrapped module's state dict to pass; a mere rename does not
    get the hint."""
    from secagg.errors import ConfigurationError

    model = FlatModel.from_arrays({"fc.weight": np.zeros((2, 3)), "fc.bias": np.zeros(2)})
    wrapped = {prefix + "fc.weight": np.ones((2, 3)), prefix + "fc.bias": np.ones(2)}
    with pytest.raises(ConfigurationError) as e:
        tensors.flatten_like(wrapped, model)
    assert (f"every name has the prefix {prefix!r}: a wrapped model's state dict (pass the "
            f"wrapped module's, e.g. model.{prefix[:-1]}.state_dict())") in str(e.value)
    renamed = {prefix + "fc.weight": np.ones((2, 3)), "other.fc.bias": np.ones(2)}
    with pytest.raises(ConfigurationError) as e:
        tensors.flatten_like(renamed, model)
    assert "prefix" not in str(e.value)

def test_the_norm_of_large_finite_values_is_finite_and_they_are_clipped_not_zeroed() -> None:
    """Squares beyond float64 (values past ~1e154) made the norm infinite and the clip
    multiplied every value by bound / inf: an update of zeros. Scaled, the norm is right."""
    values = np.array([3e200, 4e200, 0.0])
    assert l2_norm(values) == pytest.approx(5e200, rel=1e-12)
    clipped, _ = clip_l2(values, 1.0)
    np.testing.assert_allclose(clipped, [0.6, 0.8, 0.0], rtol=1e-12)
    assert l2_norm(np.array([np.inf, 1.0])) == np.inf  # an infinite one stays infinite


def test_a_masked_array_in_a_state_dict_is_refused_not_sent_with_its_hidden_values() -> None:
    """np.asarray drops a masked array's mask: its masked entries (junk, here 999) went out
    as the site's values on the submit path, past FlatModel.from_arrays' own refusal."""
    from secagg.errors import ConfigurationError

    model = FlatModel.from_arrays({"w": np.zeros(4, np.float32)})
    hidden = np.ma.masked_array(np.array([0.1, 0.2, 999.0, 0.4]), mask=[0, 0, 1, 0])
    with pytest.raises(ConfigurationError, match="'w' is a numpy masked array"):
        tensors.flatten_like({"w": hidden}, model)
    with pytest.raises(ConfigurationError, match="'w' is a numpy masked array"):
        tensors.to_numpy({"w": hidden})
    assert tensors.flatten_like({"w": hidden.filled(0)}, model)[2] == 0


@pytest.mark.parametrize(("spec_dtype", "given", "value", "held"), [
    (np.uint8, np.int64, -1, 0),
    (np.uint8, np.int64, 256, 255),
    (np.int8, np.int32, -129, -128),
    # (65505 rounds to 65504, and the aggregator takes it; a site sends only what its dtype
    # holds exactly, leaving the rounding allowance to the protocols' error)
    (np.float16, np.float32, 65505.0, 65504.0),
    (np.float32, np.float64, 3.5e38, 3.4e38),
    # (an int64 -1 for a bool buffer reads as True, but was averaged as -1: the round's
    # result flipped the site's True to False and its False to True, unwarned)
    (np.bool_, np.int64, -1, 1),
    (np.bool_, np.int64, 2, 1),
])
def test_a_value_the_rounds_dtype_cannot_hold_is_refused_naming_the_tensor(
        spec_dtype: type, given: type, value: float, held: float) -> None:
    """A site's int64 copy of a uint8 buffer holding -1 (or a float32 copy of a float16 tensor
    holding 65505) passed the dtype-kind check and was sent; at a large weight the average
    was out of the tensor's range, the aggregator aborted the summed round, and every site,
    having sent against its model, could go no further: one site's input ended the job.
    Property: refused before anything is sent, naming the tensor and its dtype; the nearest
    value the dtype holds is taken."""
    model = FlatModel.from_arrays({"w": np.zeros(3, np.float32),
                                   "buf": np.zeros(2, spec_dtype)})
    state = {"w": np.zeros(3, np.float32), "buf": np.array([0, value], dtype=given)}
    with pytest.raises(ConfigurationError, match=rf"'buf' holds a value its dtype in the "
                                                 rf"round's model \({np.dtype(spec_dtype)}\)"):
        tensors.flatten_like(state, model)
    state["buf"] = np.array([0, held], dtype=given)
    assert tensors.flatten_like(state, model)[-1] == pytest.approx(held, rel=1e-6)


def test_a_list_numpy_cannot_take_is_refused_naming_the_tensor() -> None:
    """A state dict value that is a list of tensors needing grad, of bfloat16 or meta tensors,
    or a ragged list, raised from inside numpy or torch, naming no tensor."""
    import torch

    model = FlatModel.from_arrays({"w": np.zeros((2, 2), np.float32)})
    for bad in ([torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)],
                [torch.ones(2, dtype=torch.bfloat16)] * 2,
                [torch.ones(2, device="meta")] * 2,
                [[1.0, 2.0], [3.0]]):
        with pytest.raises(ConfigurationError, match=r"tensor 'w' cannot be read as an array"):
            tensors.flatten_like({"w": bad}, model)
    assert tensors.flatten_like({"w": [[1.0, 2.0], [3.0, 4.0]]}, model).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", [None, "abc", b"\x00\x01", {"nested": 1}, [None, None],
                                 np.zeros(2, dtype=[("a", "f4")])])
def test_a_value_that_is_no_tensor_is_named_as_such_not_as_a_dtype(bad: object) -> None:
    """A state dict entry of None or a string became an array of dtype object or str, and
    was refused as "unsupported dtype 'object'": a hospital engineer looked for a dtype
    problem. It is named for what it is, with its tensor."""
    model = FlatModel.from_arrays({"w": np.zeros(2, np.float32)})
    with pytest.raises(ConfigurationError,
                       match=rf"tensor 'w' is a {type(bad).__name__}, not a tensor"):
        tensors.flatten_like({"w": bad}, model)
    with pytest.raises(ConfigurationError, match="not a tensor or an array of numbers"):
        tensors.to_numpy({"w": bad})


def test_a_modules_extra_state_that_is_no_tensor_is_left_out() -> None:
    """A module with get_extra_state (a quantiser's or FP8 module's settings, a dict) put
    "lin._extra_state" in every state dict, and submit refused it ("a dict, not a tensor");
    init.npz, made by the README's recipe, has no such entry. It is left out; extra state
    that is a tensor, or any other name holding a dict, is still what it was."""
    model = FlatModel.from_arrays({"lin.weight": np.zeros(3, np.float32)})
    values = np.array([1.0, 2.0, 3.0], np.float32)
    for extra in ({"lin._extra_state": {"scale": 0.5}}, {"_extra_state": b"x"},
                  {"lin._extra_state": None}):
        got = tensors.flatten_like({"lin.weight": values, **extra}, model)
        assert got.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigurationError, match="unexpected"):
        tensors.flatten_like({"lin.weight": values, "lin._extra_state": np.zeros(1)}, model)
    with pytest.raises(ConfigurationError, match="is a dict"):
        tensors.flatten_like({"lin.weight": values, "lin.settings": {"scale": 0.5}}, model)
