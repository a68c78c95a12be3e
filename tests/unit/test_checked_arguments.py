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
