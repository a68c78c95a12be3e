"""Arguments given from Python (not a TOML file) are checked as the loader checks them."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from clients.tensors import clip_l2
from secagg.errors import ConfigurationError
from secagg.federation.config import FederationConfig
from secagg.masking import graph

_BASE = FederationConfig(name="t", protocol="masking", aggregator="localhost:50051",
                         trust_root=b"\0" * 32)


@pytest.mark.parametrize(("key", "value"), [
    ("threshold", 7.9), ("threshold", True), ("threshold", "8"), ("neighbors", 4.0),
    ("rounds", True), ("rounds", 2.5), ("word_bits", 32.0), ("min_sites", 4.5),
    ("min_sites", True), ("max_samples", True), ("clip_norm", "1"),
])
def test_config_made_in_python_refuses_what_the_file_would(key: str, value: object) -> None:
    _BASE.check()
    with pytest.raises(ConfigurationError, match=key):
        replace(_BASE, **{key: value}).check()


@pytest.mark.parametrize("bound", [math.nan, 0.0, -1.0, math.inf, True, "1", None])
def test_clip_bound_must_be_positive_finite(bound: object) -> None:
    with pytest.raises(ValueError, match="bound"):
        clip_l2(np.array([3.0, 4.0]), bound)  # type: ignore[arg-type]
    assert np.allclose(clip_l2(np.array([3.0, 4.0]), np.float64(1.0))[0], [0.6, 0.8])


@pytest.mark.parametrize(("call", "args"), [
    ("find_sparse_parameters", (100, 0.2, 0.1, -5)),
    ("find_sparse_parameters", (100, 0.2, math.nan, 40)),
    ("find_sparse_parameters", (100, -0.5, 0.1, 40)),
    ("check_sparse_parameters", (100, 20, None, -0.5, 0.1, 40)),
    ("check_sparse_parameters", (100, 20, 15.5, 0.2, 0.1, 40)),
    ("check_sparse_parameters", (100, 20, None, 0.2, 0.1, 0)),
])
def test_graph_helpers_check_their_inputs(call: str, args: tuple) -> None:
    with pytest.raises(ConfigurationError):
        getattr(graph, call)(*args)


@pytest.mark.parametrize(("key", "value"), [
    ("security_bits", -5), ("security_bits", 40.0), ("security_bits", 257),
    ("dropout_rate", math.nan), ("dropout_rate", 1.0), ("corrupt_fraction", -0.5),
    ("corrupt_fraction", True),
])
def test_round_config_refuses_what_the_graph_cannot_size(key: str, value: object) -> None:
    """RoundConfig relies on the graph helpers' one check (for a complete graph too, which
    never asks them for a graph)."""
    from secagg.masking import RoundConfig, make_roster

    roster = make_roster(5)[0]
    RoundConfig("r", roster, 4)
    with pytest.raises(ConfigurationError, match=key):
        RoundConfig("r", roster, 4, **{key: value})  # type: ignore[arg-type]


def test_the_ckks_key_api_names_a_wrong_argument() -> None:
    """Programming slips under the SDK: each a clear error at the call, not an AttributeError
    from inside, an OverflowError from the encoder, or an announcement signed for key holder
    True that every site then refuses as another holder's."""
    from secagg.ckks.keys import KeyHolder
    from secagg.ckks.presets import get_preset
    from secagg.masking.simulation import make_roster

    with pytest.raises(TypeError, match="preset"):
        KeyHolder.generate(123)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unknown preset"):
        get_preset(["x"])  # type: ignore[arg-type]
    key = KeyHolder.generate()
    _, identities = make_roster(3)
    for holder in (True, "1", 0, -1, 1.0):
        with pytest.raises(ValueError, match="holder"):
            key.announce(holder=holder, identity=identities[1], epoch="r")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_rounds"):
        key.announce(holder=1, identity=identities[1], epoch="r", max_rounds=2**32)
    with pytest.raises(TypeError, match="identity"):
        key.announce(holder=1, identity=None, epoch="r")  # type: ignore[arg-type]
    assert key.announce(holder=1, identity=identities[1], epoch="r",
                        max_rounds=2**32 - 1).holder == 1


def test_two_tensors_of_one_name_as_strings_are_refused() -> None:
    from clients.tensors import to_numpy

    with pytest.raises(ConfigurationError, match="two tensors are named '1'"):
        to_numpy({1: np.ones(2), "1": np.zeros(3)})
    assert set(to_numpy({"a": np.ones(2), "b": np.zeros(3)})) == {"a", "b"}


@pytest.mark.parametrize(("key", "value"), [("neighbors", -1), ("neighbors", 0),
                                            ("threshold", 0), ("threshold", -1),
                                            ("threshold", 2**64)])
def test_a_masking_degree_or_threshold_out_of_range_is_refused_as_the_file_loads(
        key: str, value: int) -> None:
    base = {"federation": {"name": "t", "protocol": "masking", "aggregator": "localhost:50051",
                           "trust_root": "00" * 32}}
    with pytest.raises(ConfigurationError, match=rf"\[masking\] {key} must be in"):
        FederationConfig.from_dict({**base, "masking": {key: value}})
    FederationConfig.from_dict({**base, "masking": {key: 8}})


@pytest.mark.parametrize("trust_root", [b"\0" * 31, b"\0" * 33, "00" * 32, None])
def test_config_made_in_python_refuses_a_trust_root_that_is_no_32_byte_key(
        trust_root: object) -> None:
    """The trust root every party pins: one of 31 bytes, or its hex string, made a federation
    no party could load (the loader's own length check is only the TOML file's)."""
    with pytest.raises(ConfigurationError, match=r"\[federation\] trust_root must be a 32-byte"):
        replace(_BASE, trust_root=trust_root).check()  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "value"), [
    ("initial_model_digest", b"x"), ("initial_model_digest", "00" * 32),
    ("aggregator", 5), ("server_learning_rate", True), ("corrupt_fraction", "0.2"),
    ("dropout_rate", "0.1"), ("max_samples", "5"), ("preset", ["a"]),
])
def test_config_made_in_python_names_each_wrongly_typed_field(key: str, value: object) -> None:
    """A pinned model digest of another length was accepted; the others raised TypeError or
    AttributeError from inside instead of naming the field."""
    replace(_BASE, initial_model_digest=b"\1" * 32).check()
    with pytest.raises(ConfigurationError, match=key):
        replace(_BASE, **{key: value}).check()  # type: ignore[arg-type]


@pytest.mark.parametrize("sites", [0, -3, 100.0, True, "100"])
def test_graph_helpers_refuse_a_roster_size_that_is_no_positive_integer(sites: object) -> None:
    with pytest.raises(ConfigurationError, match="sites must be a positive integer"):
        graph.find_sparse_parameters(sites, 0.2, 0.1, 40)
    with pytest.raises(ConfigurationError, match="sites must be a positive integer"):
        graph.check_sparse_parameters(sites, 62, None, 0.2, 0.1, 40)  # type: ignore[arg-type]


def test_a_roster_size_equal_to_one_already_answered_is_still_checked() -> None:
    """find_sparse_parameters is cached, and 100.0 is the same key as 100 to a plain cache:
    once 100 had been answered, 100.0 got its answer unchecked (a test failed only when
    another ran before it)."""
    graph.find_sparse_parameters(100, 0.2, 0.1, 40)
    with pytest.raises(ConfigurationError, match="sites must be a positive integer"):
        graph.find_sparse_parameters(100.0, 0.2, 0.1, 40)  # type: ignore[arg-type]


@pytest.mark.parametrize("neighbors", [62.0, True, "62"])
def test_graph_helpers_refuse_a_degree_that_is_no_integer(neighbors: object) -> None:
    with pytest.raises(ConfigurationError, match="neighbors and threshold must be integers"):
        graph.check_sparse_parameters(100, neighbors, None, 0.2, 0.1, 40)  # type: ignore[arg-type]
    assert graph.check_sparse_parameters(100, 62, None, 0.2, 0.1, 40).neighbors == 62


def test_a_ckks_release_names_a_wrong_holder_worker_count_or_upload_list() -> None:
    """A Release made of the round's public context (its key id is the round's) is a
    TypeError naming the holder, not an AttributeError from the sum's set-up; a worker count
    that is not an integer >= 1 a ValueError naming it; uploads that are no iterable, or an
    upload that is no EncryptedUpdate, the opaque InvalidMessage (the aggregator's
    ReleaseRequest), not a raw TypeError or AttributeError."""
    from secagg.ckks import Release, release_average
    from secagg.errors import InvalidMessage
    from tests.ckks_kit import CkksRound

    r = CkksRound(sites=3, vector_length=10)
    with pytest.raises(TypeError, match="holder must be a KeyHolder"):
        Release(r.public, r.config, site_id=1)  # type: ignore[arg-type]
    for workers in (0, -1, "2", 2.5, True, None):
        with pytest.raises(ValueError, match="workers must be an integer >= 1"):
            Release(r.holder, r.config, site_id=1, workers=workers)  # type: ignore[arg-type]
    uploads, aggregate = r.run()
    for bad in (None, 5):
        with pytest.raises(InvalidMessage, match="uploads"):
            release_average(r.holder, r.config, aggregate, bad, site_id=1)  # type: ignore[arg-type]
    for listed in ([None], [*uploads[:2], object()]):  # an upload that is no EncryptedUpdate
        with pytest.raises(InvalidMessage, match="upload"):
            release_average(r.holder, r.config, aggregate, listed, site_id=1)  # type: ignore[arg-type]
    assert not r.holder.releases
    assert release_average(r.holder, r.config, aggregate, iter(uploads), site_id=1).sites == (
        1, 2, 3)
