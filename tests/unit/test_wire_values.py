"""What the wire layer lets through of values a peer sends: a released average's weight sum,
a model's bytes. Anything a lying aggregator or key holder could put there is InvalidMessage
(a refusal of the round), never a value the training script then uses or a ValueError that
blames the site's own configuration."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from secagg import wire
from secagg.errors import ConfigurationError, InvalidMessage
from secagg.model import FlatModel
from secagg.v1 import service_pb2


@pytest.mark.parametrize("weight_sum", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_release_whose_weight_sum_is_not_a_positive_number_is_refused(
        weight_sum: float) -> None:
    """The key holder's weight sum scales the average into FedAvg's update: NaN would
    poison the model, 0 or a negative sum flip or blow it up."""
    data = np.full(4, 0.5).astype("<f8").tobytes()
    ref = service_pb2.ReleasedAverageRef(weight_sum=weight_sum, sites=[1, 2, 3], grid=2.0**-20)
    with pytest.raises(InvalidMessage, match="released average"):
        wire.release_from_ref(ref, data, round_id="r", length=4)
    ref.weight_sum = 1.5
    assert wire.release_from_ref(ref, data, round_id="r", length=4).weight_sum == 1.5


@pytest.mark.parametrize("grid", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_release_whose_grid_is_not_a_positive_number_is_refused(grid: float) -> None:
    """The grid is only reported (to the operator and the training script), but a report of
    "rounded to a nan grid" is a lie the key holder should not be able to tell."""
    data = np.full(4, 0.5).astype("<f8").tobytes()
    ref = service_pb2.ReleasedAverageRef(weight_sum=1.5, sites=[1, 2, 3], grid=grid)
    with pytest.raises(InvalidMessage, match="released average"):
        wire.release_from_ref(ref, data, round_id="r", length=4)
    ref.grid = 2.0**-20
    assert wire.release_from_ref(ref, data, round_id="r", length=4).grid == 2.0**-20


@pytest.mark.parametrize("lie", ["short", "nan"])
def test_a_model_whose_bytes_do_not_fit_its_spec_is_an_invalid_message(lie: str) -> None:
    """Bytes one value short of the spec, or a NaN in them, from the aggregator: the site
    refuses the round (InvalidMessage), not a ValueError out of numpy or a ConfigurationError
    naming the site's own config."""
    model = FlatModel.from_arrays({"w": np.zeros(4, np.float32)})
    good = model.to_bytes()
    data = good[:-4] if lie == "short" else np.array(
        [0, 0, np.nan, 0], np.float32).tobytes()
    proto = wire.model_to_proto(model, wire.Blob((hashlib.sha256(data).digest(),), len(data)))
    with pytest.raises(InvalidMessage, match="model"):
        wire.model_from_proto(proto, data)
    assert wire.model_from_proto(proto, good).digest == model.digest


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_model_with_a_value_that_is_not_finite_cannot_be_made(bad: float) -> None:
    """At the aggregator's start (the initial model) and at `federation init`: refused, not a
    job whose every round the sites refuse."""
    with pytest.raises(ConfigurationError, match="NaN or infinity"):
        FlatModel.from_arrays({"w": np.array([0.0, bad])})


def test_a_spec_of_more_tensors_than_a_model_may_have_is_refused_before_any_is_read() -> None:
    """A lying aggregator's spec of 360,000 one-value tensors (7.5 MB, within the message
    limit) cost a site 526 MB and 6.5 CPU seconds before the model was refused. The tensors
    are counted first; a spec at the bound is read."""
    from secagg.model import MAX_MODEL_TENSORS

    model = service_pb2.Model()
    model.spec.extend(service_pb2.Tensor(name=f"t{i}", shape=[1], dtype="float32")
                      for i in range(MAX_MODEL_TENSORS + 1))
    with pytest.raises(InvalidMessage, match="model spec"):
        wire.spec_from_proto(model.spec)
    del model.spec[-1]
    assert len(wire.spec_from_proto(model.spec)) == MAX_MODEL_TENSORS


def test_a_tensor_of_more_dims_than_numpy_holds_is_refused_before_its_dims_are_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying aggregator's spec of one tensor of 8.3 million dims of 1 (their product 1)
    cost a site 203 MB and a second before anything was refused. No array has more than 64
    dims (numpy's most): a spec naming more is refused before a tensor is made, one of 64
    is read."""
    from secagg.model import TensorSpec

    made: list[int] = []

    def recording(name: str, shape: tuple[int, ...], dtype: str) -> TensorSpec:
        made.append(len(shape))
        return TensorSpec(name, shape, dtype)

    monkeypatch.setattr(wire, "TensorSpec", recording)
    model = service_pb2.Model()
    model.spec.add(name="ok", shape=[1], dtype="float32")
    model.spec.add(name="deep", shape=[1] * 65, dtype="float32")
    with pytest.raises(InvalidMessage, match="model spec"):
        wire.spec_from_proto(model.spec)
    assert made == []
    del model.spec[-1].shape[-1]
    assert [t.shape for t in wire.spec_from_proto(model.spec)] == [(1,), (1,) * 64]


def test_the_tensor_bound_is_the_documented_65536() -> None:
    """README: a model of more than 65,536 tensors is refused. The test above builds its
    spec from the constant it checks, so a bound raised to 2^20 (a spec of a million
    one-value tensors then read before refusal) passed it: here the count is the README's."""
    model = service_pb2.Model()
    model.spec.extend(service_pb2.Tensor(name=f"t{i}", shape=[1], dtype="float32")
                      for i in range(65_537))
    with pytest.raises(InvalidMessage, match="model spec"):
        wire.spec_from_proto(model.spec)


def test_a_model_of_more_tensors_than_a_model_may_have_is_refused_naming_the_bound() -> None:
    """The same bound for a model made here (a state dict, a model file): said with the
    count, before an array is read."""
    from secagg.model import MAX_MODEL_TENSORS

    arrays = {f"t{i}": np.zeros(1, np.float32) for i in range(MAX_MODEL_TENSORS + 1)}
    with pytest.raises(ConfigurationError, match=f"{MAX_MODEL_TENSORS + 1:,} tensors"):
        FlatModel.from_arrays(arrays)
    del arrays[f"t{MAX_MODEL_TENSORS}"]
    assert len(FlatModel.from_arrays(arrays).spec) == MAX_MODEL_TENSORS
@pytest.mark.parametrize("lie", ["one-value-short", "one-value-long", "empty", "odd-bytes"])
def test_a_release_of_another_length_than_the_round_is_refused(lie: str) -> None:
    """The released average's bytes hold exactly the round's vector: fewer values (or a
    tail that is no whole float64) would be a shorter average taken as the model's update,
    more would be values the round never had."""
    good = np.full(4, 0.5).astype("<f8").tobytes()
    data = {"one-value-short": good[:-8], "one-value-long": good + good[:8], "empty": b"",
            "odd-bytes": good[:-3]}[lie]
    ref = service_pb2.ReleasedAverageRef(weight_sum=1.5, sites=[1, 2, 3], grid=2.0**-20)
    with pytest.raises(InvalidMessage, match="released average"):
        wire.release_from_ref(ref, data, round_id="r", length=4)
    assert wire.release_from_ref(ref, good, round_id="r", length=4).average.shape == (4,)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_release_whose_average_holds_a_value_that_is_not_finite_is_refused(
        bad: float) -> None:
    """A NaN or infinity in the released average (not its weight sum) would go into the
    model's update and poison every later round: refused at the wire."""
    data = np.array([0.5, bad, 0.5, 0.5]).astype("<f8").tobytes()
    ref = service_pb2.ReleasedAverageRef(weight_sum=1.5, sites=[1, 2, 3], grid=2.0**-20)
    with pytest.raises(InvalidMessage, match="released average"):
        wire.release_from_ref(ref, data, round_id="r", length=4)


@pytest.mark.parametrize("ids", [[b"\x01" * 31], [b"\x01" * 33], [bytes(32), b""], []])
def test_a_blob_whose_chunk_ids_are_no_sha256_or_missing_is_refused(ids: list[bytes]) -> None:
    """A blob names its chunks by SHA-256 (32 bytes each); a blob of a positive size names at
    least one. Anything else is refused as the message is decoded."""
    with pytest.raises(InvalidMessage, match="blob"):
        wire.Blob.from_proto(service_pb2.Blob(chunk_ids=ids, size=10))
    assert wire.Blob.from_proto(service_pb2.Blob(chunk_ids=[bytes(32)], size=10)).size == 10
    assert wire.Blob.from_proto(service_pb2.Blob(chunk_ids=[], size=0)).chunk_ids == ()


@pytest.mark.parametrize("lie", ["other-word-bits", "unknown-word-bits", "one-word-short",
                                 "one-word-long", "half-a-word-more"])
def test_a_masked_input_of_another_word_size_or_length_is_refused(lie: str) -> None:
    """A masked input's words are the round's (word_bits, vector length): the round's
    length in 32-bit words in a 64-bit round, or a length off by a word (or by less), is
    refused as the message is decoded, not summed modulo the wrong word size or at the
    wrong length."""
    length = 4
    good = np.arange(length, dtype="<u8").tobytes()
    word_bits, data = {
        "other-word-bits": (32, np.arange(length, dtype="<u4").tobytes()),
        "unknown-word-bits": (16, good),
        "one-word-short": (64, good[:-8]),
        "one-word-long": (64, good + good[:8]),
        "half-a-word-more": (64, good + good[:4]),
    }[lie]
    ref = service_pb2.MaskedInputRef(site_id=2, word_bits=word_bits, partners=[1, 3],
                                     signature=bytes(64))
    with pytest.raises(InvalidMessage, match="masked input"):
        wire.masked_input_from_ref(ref, data, word_bits=64, length=length)
    ref.word_bits = 64
    taken = wire.masked_input_from_ref(ref, good, word_bits=64, length=length)
    assert taken.masked_input.dtype == np.uint64 and list(taken.masked_input) == [0, 1, 2, 3]
