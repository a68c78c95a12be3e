from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import ConfigurationError
from secagg.masking import RoundConfig, graph, make_roster, minimum_safe_threshold
from secagg.roster import Roster


def roster(n: int) -> Roster:
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


def test_auto_picks_the_smallest_k_meeting_the_bound_and_reports_it() -> None:
    config = RoundConfig("r", roster(100), 4, neighbors="auto")
    assert not config.complete_graph
    k, t = config.graph.neighbors, config.reconstruction_threshold
    assert (k, t) == (62, 21)  # n=100, corrupt 0.2, dropout 0.1, 2^-40
    assert config.neighbors == k and config.graph.failure_log2 <= -40
    assert config.consistency_quorum == 61 and config.max_missing_per_side == 10
    assert "k=62" in config.graph.describe() and "t=21" in config.graph.describe()
    # a smaller k misses the bound and is refused, naming the safe choice
    with pytest.raises(ConfigurationError, match=r"misses the 2\^-40 bound.*neighbors=62"):
        RoundConfig("r", config.roster, 4, neighbors=k - 2)
    # so is a threshold below the bound's, or above what dropouts leave
    with pytest.raises(ConfigurationError, match="misses"):
        RoundConfig("r", config.roster, 4, neighbors=k, threshold=t - 1)
    with pytest.raises(ConfigurationError, match="misses"):
        RoundConfig("r", config.roster, 4, neighbors=k, threshold=k)


def test_auto_falls_back_to_the_complete_graph_for_small_rosters() -> None:
    config = RoundConfig("r", roster(5), 4, neighbors="auto")
    assert config.complete_graph and config.neighbors is None
    assert config.reconstruction_threshold == minimum_safe_threshold(5, 0.2)


def test_sparse_graph_needs_the_signed_rosters_graph_seed() -> None:
    plain = dict(roster(100))
    with pytest.raises(ConfigurationError, match="graph seed"):
        RoundConfig("r", plain, 4, neighbors=62)


@pytest.mark.parametrize(("n", "k", "match"), [(20, 2, "neighbors"), (20, 19, "neighbors"),
                                                (100, 63, "even")])
def test_refuses_bad_neighbour_counts(n: int, k: int, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RoundConfig("r", roster(n), 4, neighbors=k)


@pytest.mark.parametrize(("n", "corrupt", "dropout"), [(40, 0.2, 0.1), (100, 0.05, 0.05),
                                                        (101, 0.0, 0.1)])
def test_k_regular_graph_is_regular_symmetric_and_agreed(n: int, corrupt: float,
                                                         dropout: float) -> None:
    r = roster(n)
    a = RoundConfig("r", r, 4, neighbors="auto", corrupt_fraction=corrupt, dropout_rate=dropout)
    k = a.graph.neighbors
    assert not a.complete_graph and k < n - 1
    b = RoundConfig("r", Roster(dict(reversed(list(r.items()))), r.graph_seed), 4, neighbors=k,
                    corrupt_fraction=corrupt, dropout_rate=dropout)
    for s in a.sites:
        hood = a.neighbourhood(s)
        left, right = a.windows(s)
        assert s in hood and len(hood) == k + 1 and hood == left | right | {s}
        assert len(left) == len(right) == k // 2
        assert all(s in a.neighbourhood(p) for p in hood)
        assert hood == b.neighbourhood(s)  # every site computes the same graph alone


def test_graph_depends_only_on_the_signed_roster_not_on_what_a_round_chooses() -> None:
    """Steering: the server picks round ids (and, in the old design, thereby the graph)."""
    r = roster(40)
    base = RoundConfig("r", r, 4, neighbors="auto")
    for i in range(50):
        other = RoundConfig(f"round-{i}", r, 4 + i, neighbors="auto")
        assert other.ring == base.ring
    reseeded = Roster(dict(r), bytes(32))
    assert RoundConfig("r", reseeded, 4, neighbors="auto").ring != base.ring


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"round_id": ""}, "round_id"),
        ({"vector_length": 0}, "vector_length"),
        ({"corrupt_fraction": 1.0}, "corrupt_fraction"),
        ({"clip": -1.0}, "clip"),
        ({"max_weight": 0.0}, "max_weight"),
        ({"word_bits": 8}, "word_bits"),
        ({"corrupt_fraction": -0.1}, "corrupt_fraction"),
        ({"corrupt_fraction": float("nan")}, "corrupt_fraction"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"security_bits": 39}, "security_bits"),
        ({"neighbors": 3.5}, "neighbors"),
        # an infinite product gave a ZeroDivisionError in the server's last stage ...
        ({"clip": 2.0**40, "max_weight": 2.0**40}, r"clip \* max_weight"),
        ({"clip": 1e300, "max_weight": 1e300}, "clip"),
        ({"clip": float("inf")}, "clip"),
        # ... and a subnormal clip a silently wrong aggregate
        ({"clip": 5e-324}, "clip"),
        ({"clip": 2.0**-40, "max_weight": 2.0**-40}, r"clip \* max_weight"),
        ({"threshold": 4.0}, "threshold"),
    ],
)
def test_refusals_name_the_parameter(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"round_id": "r", "roster": roster(5), "vector_length": 4}
    args.update(kwargs)
    with pytest.raises(ConfigurationError, match=match):
        RoundConfig(**args)  # type: ignore[arg-type]


def test_refuses_tiny_or_malformed_roster() -> None:
    with pytest.raises(ConfigurationError, match="roster must list at least 3 sites"):
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
    variants = [RoundConfig("r2", r, 4), RoundConfig("r", r, 5),
                RoundConfig("r", r, 4, threshold=6), RoundConfig("r", r, 4, clip=2.0),
                RoundConfig("r", r, 4, max_weight=2.0), RoundConfig("r", r, 4, word_bits=64),
                RoundConfig("r", r, 4, corrupt_fraction=0.1),
                RoundConfig("r", r, 4, dropout_rate=0.2),
                RoundConfig("r", r, 4, security_bits=41),
                RoundConfig("r", Roster(dict(r), bytes(32)), 4),
                RoundConfig("r", roster(6), 4),
                RoundConfig("r", r, 4, model_digest=bytes(32)),
                RoundConfig("r", r, 4, model_digest=bytes(31) + b"\x01")]
    digests = {v.params_digest for v in variants}
    assert base not in digests and len(digests) == len(variants)
    big = roster(40)
    sparse = {RoundConfig("r", big, 4, neighbors=k).params_digest for k in (26, 28)}
    assert len(sparse) == 2 and RoundConfig("r", big, 4).params_digest not in sparse
    # SecAgg+: the same k and quorum with another threshold is another round
    thresholds = {RoundConfig("r", big, 4, neighbors=26, threshold=t).params_digest
                  for t in (9, 10)}
    assert len(thresholds) == 2


def test_refuses_a_dropout_rate_that_leaves_fewer_sites_than_the_quorum() -> None:
    """Expected dropouts beyond n - q: an honest round could never gather the quorum."""
    r = roster(40)
    RoundConfig("r", r, 4, neighbors=26, dropout_rate=0.1)
    with pytest.raises(ConfigurationError, match="fewer than the consistency quorum"):
        RoundConfig("r", r, 4, neighbors=26, dropout_rate=0.45)


def test_auto_neighbours_pick_no_sparse_graph_whose_quorum_the_expected_dropouts_break() -> None:
    """300 sites, 20% corrupt, 45% dropping out: 165 expected survivors, below the
    consistency quorum of 181. A sparse graph (k=296) met the bound, but every round
    would abort at the consistency check: "auto" must fall back to the complete graph."""
    from secagg.masking import graph

    assert graph.expected_dropouts(300, 0.45) == 135
    assert graph.consistency_quorum(300, 0.2) == 181
    assert graph.find_sparse_parameters(300, 0.2, 0.45) is None
    assert graph.find_sparse_parameters(300, 0.2, 0.1) is not None


def test_the_ring_is_a_uniform_permutation_not_only_a_cycle() -> None:
    """Fisher-Yates draws j in [0, i]; in [0, i) (Sattolo's algorithm) it makes only the
    cyclic permutations: of 3 sites, 2 rings of the 6, none with a site in its own place, so
    whoever knows the roster narrows down every victim's neighbours."""
    from collections import Counter

    from secagg.masking.graph import ring_order

    rings = Counter(tuple(ring_order([1, 2, 3], i.to_bytes(32, "big"))) for i in range(600))
    assert len(rings) == 6 and min(rings.values()) >= 60, rings


def test_counts_of_colluders_and_dropouts_survive_float_rounding() -> None:
    """0.29 * 100 is 28.999999999999996 in floats: floor() lost the 29th colluder (a
    weaker bound than the one configured) and the 29th expected dropout."""
    from secagg.masking.graph import colluders, expected_dropouts

    assert colluders(100, 0.29) == 29 and expected_dropouts(100, 0.29) == 29
    assert colluders(100, 0.2) == 20 and colluders(7, 0.5) == 3


def test_auto_neighbours_keep_an_explicit_threshold() -> None:
    """neighbors="auto" with threshold=25: the found graph's own smallest t (21) was taken and
    the operator's 25 dropped unsaid; one below the bound's is still refused."""
    config = RoundConfig("r", roster(100), 4, neighbors="auto", threshold=25)
    assert config.graph.neighbors == 62 and config.reconstruction_threshold == 25
    with pytest.raises(ConfigurationError, match="misses"):
        RoundConfig("r", config.roster, 4, neighbors="auto", threshold=20)


def test_the_hypergeometric_tail_is_exact_at_its_edges() -> None:
    """P[X >= draws] is P[X = draws], not 0: dropped, a window wholly of colluders vanished
    from the bound (the SecAgg+ graph's E2 with m = 0)."""
    import math
    from fractions import Fraction

    from secagg.masking.graph import tail_log2

    def exact(population: int, successes: int, draws: int, at_least: int) -> float:
        total = math.comb(population, draws)
        p = sum(Fraction(math.comb(successes, x) * math.comb(population - successes,
                                                               draws - x), total)
                for x in range(at_least, min(successes, draws) + 1))
        return math.log2(p) if p else -math.inf

    for args in ((10, 5, 3, 3), (10, 5, 3, 2), (99, 19, 31, 31), (99, 19, 31, 10), (10, 2, 3, 3)):
        assert tail_log2(*args) == pytest.approx(exact(*args), rel=1e-9), args


def test_the_bound_is_the_sum_of_both_events_not_the_larger() -> None:
    import math

    from secagg.masking.graph import _union_log2, security_failure_log2, tail_log2

    n, k, t, m, corrupt = 100, 62, 20, 14, 20  # (both events possible)
    e1 = _union_log2(n, tail_log2(n - 1, corrupt, k, t))
    e2 = _union_log2(n, tail_log2(n - 1, corrupt, k // 2, k // 2 - m))
    assert abs(e1 - e2) < 30  # both count
    assert security_failure_log2(n, k, t, m, corrupt) == pytest.approx(
        math.log2(2.0**e1 + 2.0**e2))


@pytest.mark.parametrize("bad", ["bool-site-id", "site-id-2**63", "bytearray-key", "str-key"])
def test_refuses_roster_ids_and_keys_of_another_type_or_range(bad: str) -> None:
    """A roster is the federation's list of who may take part: site ids are ints in
    [1, 2**63) (True equals 1 but is no site id; 2**63 fits in no message's id field) and
    keys are 32 immutable bytes (a bytearray could change under a round that holds it, a
    str verifies no signature)."""
    keys = [k for _, k in sorted(roster(3).items())]
    plain: dict[object, object] = {1: keys[0], 2: keys[1], 3: keys[2]}
    if bad == "bool-site-id":
        plain = {True: keys[0], 2: keys[1], 3: keys[2]}
    elif bad == "site-id-2**63":
        plain = {1: keys[0], 2: keys[1], 2**63: keys[2]}
    elif bad == "bytearray-key":
        plain[3] = bytearray(keys[2])
    else:
        plain[3] = "k" * 32
    with pytest.raises(ConfigurationError, match="roster"):
        RoundConfig("r", plain, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"vector_length": True}, "vector_length"),
    ({"word_bits": np.int64(32)}, "word_bits"),
    ({"clip": True}, "clip"),
    ({"max_weight": True}, "max_weight"),
    ({"model_digest": bytes(31)}, "model_digest"),
    ({"model_digest": bytes(64)}, "model_digest"),
    ({"model_digest": bytearray(32)}, "model_digest"),
    ({"model_digest": "m" * 32}, "model_digest"),
], ids=["vector-length-bool", "word-bits-numpy", "clip-bool", "max-weight-bool",
        "digest-31-bytes", "digest-64-bytes", "digest-bytearray", "digest-str"])
def test_refuses_parameters_of_another_type_even_if_they_compare_equal(
        kwargs: dict[str, object], match: str) -> None:
    """Each parameter is bound into every signature of the round: a value that equals the
    right one (True == 1, numpy.int64(32) == 32) but is another type, or a model digest of
    another length or type, is refused when the config is made, not left to encode apart (or
    alike) at each site."""
    args: dict[str, object] = {"round_id": "r", "roster": roster(5), "vector_length": 4}
    args.update(kwargs)
    with pytest.raises(ConfigurationError, match=match):
        RoundConfig(**args)  # type: ignore[arg-type]


def test_a_plain_rosters_digest_binds_each_site_id_to_its_key() -> None:
    """The same keys in the same order under other site ids are another roster: a round's
    signatures (bound to the params digest) do not carry over to it."""
    keys = [k for _, k in sorted(roster(4).items())]
    one = RoundConfig("r", {1: keys[0], 2: keys[1], 3: keys[2], 4: keys[3]}, 4)
    other = RoundConfig("r", {1: keys[0], 2: keys[1], 3: keys[2], 5: keys[3]}, 4)
    assert one.roster_digest != other.roster_digest
    assert one.params_digest != other.params_digest


def test_auto_neighbours_with_a_plain_roster_take_the_complete_graph() -> None:
    """A plain {site: key} mapping has no signed graph seed: neighbors="auto" must not pick a
    sparse graph for it (its ring would have no seed the sites agree on), however large."""
    plain = dict(roster(100))
    config = RoundConfig("r", plain, 4, neighbors="auto")
    assert config.complete_graph and config.neighbors is None
    assert config.ring == config.sites


@pytest.mark.parametrize(("n", "k"), [(21, 20), (20, 20), (20, 22)])
def test_refuses_a_degree_of_the_whole_roster_or_more(n: int, k: int) -> None:
    """k = n - 1 is the complete graph (taken by its own rules, not the sparse bound), and
    k >= n would put a site in its own windows: refused, with the range of degrees named."""
    with pytest.raises(ConfigurationError, match=r"neighbors must be in \[4, "):
        graph.check_sparse_parameters(n, k, None, 0.2, 0.1, 40)


def test_auto_neighbours_never_pick_a_degree_below_the_minimum() -> None:
    """With no colluders and no dropouts every degree meets the bound; "auto" still takes
    k >= 4, the least an explicit k may be (a k of 2 it picked would be refused as written)."""
    found = graph.find_sparse_parameters(100, 0.0, 0.0, 40)
    assert found is not None and found.neighbors >= graph.MIN_NEIGHBORS


def test_ring_draws_past_the_last_whole_multiple_are_rejected_not_folded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fisher-Yates takes j = draw % (i + 1) only for draws below the largest multiple of
    i + 1 that fits in 32 bits: a draw above it, folded, would favour low j. With a stream
    whose first word is such a draw, that word is skipped; and a stream all of such draws
    is extended under a new key, not read again."""
    import numpy as np

    streams: dict[bytes, list[int]] = {}

    class Stream:
        def __init__(self, length: int, *, word_bits: int) -> None:
            self.length = length

        def words(self, key: bytes) -> np.ndarray:
            if streams and key in streams:
                raise AssertionError("the same key was read again")
            streams[key] = []
            first = len(streams) == 1
            head = [2**32 - 1, 2, 1] if first else [2, 1]
            return np.array(head + [0] * (self.length - len(head)), dtype=np.uint32)

    monkeypatch.setattr(graph, "MaskExpander", Stream)
    # i = 2 (bound 3): 2**32 - 1 is past 3 * floor(2**32 / 3) and skipped; 2 keeps site 3 in
    # place; i = 1: 1 keeps site 2. Folded, 2**32 - 1 % 3 = 0 would have swapped 3 and 1.
    assert graph.ring_order([1, 2, 3], b"seed") == [1, 2, 3]

    class Exhausted(Stream):
        def words(self, key: bytes) -> np.ndarray:
            if key in streams:
                raise AssertionError("the same key was read again")
            streams[key] = []
            if len(streams) == 1:
                return np.full(self.length, 2**32 - 1, dtype=np.uint32)
            return np.array([2, 1] + [0] * (self.length - 2), dtype=np.uint32)

    streams.clear()
    monkeypatch.setattr(graph, "MaskExpander", Exhausted)
    assert graph.ring_order([1, 2, 3], b"seed") == [1, 2, 3]
    assert len(streams) == 2
