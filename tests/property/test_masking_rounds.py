"""Masking rounds under arbitrary dropout patterns at every stage.

The aggregate must equal exactly the decoded sum of the survivors' *quantised* inputs (the
encodings each site actually produced), or the round must abort cleanly with
TOO_FEW_SURVIVORS when fewer than the threshold remain at some stage.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secagg.errors import AbortReason
from secagg.hazmat.prg import word_dtype
from secagg.hazmat.quantize import Quantizer
from secagg.masking import RoundConfig, Stage, make_roster, simulate_round

STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY_CHECK,
          Stage.UNMASK]
LENGTH = 12


def _run(sites: int, dropouts: dict[int, Stage], *, neighbors: int | str | None = None,
         word_bits: int = 32) -> None:
    roster, identities = make_roster(sites)
    config = RoundConfig("prop", roster, vector_length=LENGTH, neighbors=neighbors,
                         word_bits=word_bits)
    rng = np.random.default_rng(sites)
    inputs = {s: (rng.uniform(-1.5, 1.5, LENGTH), float(rng.uniform(0.05, 1.0)))
              for s in config.sites}
    encodings: dict[int, np.ndarray] = {}
    real_encode = Quantizer.encode

    def recording_encode(self: Quantizer, update: np.ndarray, weight: float,
                         **kwargs: int | None) -> np.ndarray:
        out = real_encode(self, update, weight, **kwargs)
        site = next(s for s, (u, _) in inputs.items() if u is update)
        encodings[site] = out.copy()
        return out

    with mock.patch.object(Quantizer, "encode", recording_encode):
        report = simulate_round(config, identities, inputs, dropouts=dropouts)

    def after(stage: Stage) -> set[int]:
        return {s for s in config.sites
                if s not in dropouts or dropouts[s].value > stage.value}

    t = config.minimum_participants
    enough = all(len(after(stage)) >= t for stage in STAGES)
    if neighbors is None:
        assert (report.result is not None) == enough, (report.abort, report.client_aborts)
    if report.result is None:
        assert report.abort is not None
        assert report.abort.reason is AbortReason.TOO_FEW_SURVIVORS
        return
    # In a k-regular graph a site whose neighbourhood falls below t, or whose windows miss too
    # many neighbours, aborts on its own (and is then one more dropout); in the complete graph
    # that cannot happen while the round lives.
    allowed = {AbortReason.TOO_FEW_SURVIVORS, AbortReason.TOO_MANY_MISSING_NEIGHBOURS}
    assert all(a.reason in allowed for a in report.client_aborts.values())
    if neighbors is None:
        assert not report.client_aborts
    survivors = after(Stage.MASKED_INPUT) - set(report.client_aborts)
    assert set(report.result.survivors) == survivors
    total = np.zeros(LENGTH + 1, dtype=word_dtype(word_bits))
    for s in survivors:
        total += encodings[s]
    expected, expected_weight = config.quantizer.decode_sum(total, len(survivors))
    np.testing.assert_array_equal(report.result.weighted_sum, expected)
    assert report.result.weight_sum == expected_weight
    # and within the documented bound of the exact weighted sum of clipped inputs
    exact = sum(np.clip(inputs[s][0], -1, 1) * inputs[s][1] for s in survivors)
    assert np.all(np.abs(report.result.weighted_sum - exact) <= report.result.error_bound[0])


@st.composite
def dropout_pattern(draw: st.DrawFn, sites: int) -> dict[int, Stage]:
    dropped = draw(st.lists(st.integers(1, sites), unique=True, max_size=sites))
    return {s: draw(st.sampled_from(STAGES)) for s in dropped}


@given(st.integers(3, 9).flatmap(lambda n: st.tuples(st.just(n), dropout_pattern(n))))
def test_complete_graph_any_dropouts(case: tuple[int, dict[int, Stage]]) -> None:
    sites, dropouts = case
    _run(sites, dropouts)


@given(dropout_pattern(12))
def test_k_regular_graph_any_dropouts(dropouts: dict[int, Stage]) -> None:
    _run(12, dropouts, neighbors=8)  # the smallest safe k for 12 sites


@pytest.mark.parametrize("word_bits", [32, 64])
def test_no_dropouts_both_word_sizes(word_bits: int) -> None:
    _run(6, {}, word_bits=word_bits)


def test_k_regular_graph_with_one_dropout_is_exact() -> None:
    _run(40, {3: Stage.MASKED_INPUT, 17: Stage.SHARE_KEYS}, neighbors="auto")


def test_k_regular_graph_round_with_dropouts_completes_at_its_own_threshold() -> None:
    """SecAgg+ shares each secret among k + 1 sites with a threshold t well below the
    roster-wide quorum: the server rebuilds each secret from t shares (not from a quorum's
    worth, which a neighbourhood with dropouts no longer holds), and the round completes,
    exactly.
    (_run above returns early on any abort of a k-regular round.)"""
    roster, identities = make_roster(40)
    config = RoundConfig("prop", roster, vector_length=LENGTH, neighbors="auto")
    assert not config.complete_graph
    assert config.reconstruction_threshold < config.consistency_quorum
    rng = np.random.default_rng(40)
    inputs = {s: (rng.uniform(-1.5, 1.5, LENGTH), float(rng.uniform(0.05, 1.0)))
              for s in config.sites}
    # three ring-neighbours of one site drop (at most m = 4 of a window may): that site's
    # secrets keep k + 1 - 3 = 24 holders, fewer than the quorum of 25, at least t = 9
    dropped = set(config.ring[1:4])
    assert len(dropped) <= (config.max_missing_per_side or 0)
    assert config.share_holders - len(dropped) < config.consistency_quorum
    report = simulate_round(config, identities, inputs,
                            dropouts=dict.fromkeys(dropped, Stage.MASKED_INPUT))
    assert report.result is not None, (report.abort, report.client_aborts)
    survivors = set(config.sites) - dropped - set(report.client_aborts)
    assert set(report.result.survivors) == survivors
    exact = sum(np.clip(inputs[s][0], -1, 1) * inputs[s][1] for s in survivors)
    assert np.all(np.abs(report.result.weighted_sum - exact) <= report.result.error_bound[0])
