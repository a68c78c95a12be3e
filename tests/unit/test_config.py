from __future__ import annotations

import pytest

from secagg.errors import ConfigurationError
from secagg.masking import RoundConfig, make_roster, minimum_safe_threshold


def roster(n: int) -> dict[int, bytes]:
    return make_roster(n)[0]


@pytest.mark.parametrize(("n", "corrupt", "safe"), [(10, 0.0, 6), (10, 0.2, 7), (100, 0.2, 61),
                                                    (100, 1 / 3, 67), (3, 0.0, 2)])
def test_minimum_safe_threshold(n: int, corrupt: float, safe: int) -> None:
    assert minimum_safe_threshold(n, corrupt) == safe
    assert safe > (n + corrupt * n) / 2 >= safe - 1


def test_default_threshold_is_the_smallest_safe_one() -> None:
    assert RoundConfig("r", roster(10), 4).reconstruction_threshold == 7


@pytest.mark.parametrize("t", [1, 5, 6])
def test_refuses_unsafe_threshold_complete_graph(t: int) -> None:
    with pytest.raises(ConfigurationError, match=r"threshold must be in \[7, 10\]"):
        RoundConfig("r", roster(10), 4, threshold=t)


def test_refuses_threshold_above_share_holders() -> None:
    with pytest.raises(ConfigurationError, match="threshold"):
        RoundConfig("r", roster(10), 4, threshold=11)


def test_k_regular_threshold_rule_uses_neighbourhood_size() -> None:
    # 7 share holders (6 neighbours + self): t > 7 * 1.2 / 2 = 4.2
    config = RoundConfig("r", roster(20), 4, neighbors=6)
    assert config.reconstruction_threshold == 5
    with pytest.raises(ConfigurationError, match=r"\[5, 7\]"):
        RoundConfig("r", roster(20), 4, neighbors=6, threshold=4)


@pytest.mark.parametrize(("n", "k", "match"), [(20, 2, "neighbors"), (20, 19, "neighbors"),
                                                (21, 5, "odd")])
def test_refuses_bad_neighbour_counts(n: int, k: int, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RoundConfig("r", roster(n), 4, neighbors=k)


@pytest.mark.parametrize(("n", "k"), [(20, 6), (20, 5), (31, 8), (100, 15)])
def test_k_regular_graph_is_regular_symmetric_and_agreed(n: int, k: int) -> None:
    r = roster(n)
    a = RoundConfig("r", r, 4, neighbors=k)
    b = RoundConfig("r", dict(reversed(list(r.items()))), 4, neighbors=k)
    for s in a.sites:
        hood = a.neighbourhood(s)
        assert s in hood and len(hood) == k + 1
        assert all(s in a.neighbourhood(p) for p in hood)
        assert hood == b.neighbourhood(s)  # every site computes the same graph alone
    other_round = RoundConfig("r2", r, 4, neighbors=k)
    assert any(a.neighbourhood(s) != other_round.neighbourhood(s) for s in a.sites)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"round_id": ""}, "round_id"),
        ({"vector_length": 0}, "vector_length"),
        ({"corrupt_fraction": 1.0}, "corrupt_fraction"),
        ({"clip": -1.0}, "clip"),
        ({"max_weight": 0.0}, "max_weight"),
        ({"word_bits": 8}, "word_bits"),
    ],
)
def test_refusals_name_the_parameter(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"round_id": "r", "roster": roster(5), "vector_length": 4}
    args.update(kwargs)
    with pytest.raises(ConfigurationError, match=match):
        RoundConfig(**args)  # type: ignore[arg-type]


def test_refuses_tiny_or_malformed_roster() -> None:
    with pytest.raises(ConfigurationError, match="at least 3"):
        RoundConfig("r", roster(2), 4)
    with pytest.raises(ConfigurationError, match="site ids"):
        RoundConfig("r", {0: b"a" * 32, 1: b"b" * 32, 2: b"c" * 32}, 4)
    with pytest.raises(ConfigurationError, match="32 bytes"):
        RoundConfig("r", {1: b"a" * 31, 2: b"b" * 32, 3: b"c" * 32}, 4)
    with pytest.raises(ConfigurationError, match="same identity"):
        RoundConfig("r", {1: b"a" * 32, 2: b"a" * 32, 3: b"c" * 32}, 4)


def test_params_digest_binds_every_parameter() -> None:
    r = roster(6)
    base = RoundConfig("r", r, 4).params_digest
    for changed in (RoundConfig("r2", r, 4), RoundConfig("r", r, 5),
                    RoundConfig("r", r, 4, threshold=6), RoundConfig("r", r, 4, clip=2.0),
                    RoundConfig("r", r, 4, word_bits=64)):
        assert changed.params_digest != base
