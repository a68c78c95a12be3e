"""The SecAgg+ neighbour graph and the bound that chooses its degree k and threshold t.

The graph
---------
A Harary graph H(k, n), k even: the roster's sites sit on a ring in the order of a permutation
drawn from the roster's graph seed (:mod:`secagg.roster`), and each site is adjacent to the
k/2 sites on either side (its *left* and *right* windows). Because the permutation is uniform,
the k neighbours of a fixed site are a uniformly random k-subset of the other n - 1 sites, and
each of its windows a uniformly random k/2-subset.

Threat model
------------
At most C = floor(corrupt_fraction * n) sites collude with the aggregator; they are fixed
independently of the graph seed (it is drawn when the roster is signed, after their keys are
fixed). The aggregator may lie: about who dropped out, about which shares it delivered, and by
showing different sites different messages. Honest dropouts, D = floor(dropout_rate * n) of them
at random, matter only for whether an honest round finishes.

What the sites enforce (``secagg/masking/client.py``)
------------------------------------------------------
1. One survivor list. A site reveals shares only for the survivor list signed by at least
   q = floor(n(1 + corrupt_fraction)/2) + 1 roster sites. Two lists with q signers each share
   more than C signers, so some honest site signed both: impossible. All honest sites act on
   the same list L.
2. Both ends of every live edge mask. A site signs L only if every live neighbour sent it its
   shares (so it masked with them), and only if every live neighbour's signed masked-input
   attestation names it and its other live neighbours as mask partners.
3. No gap. For every survivor in L, at most m (``max_missing_per_side``) of the k/2 sites in
   each of its windows are missing from L. Every revealing site checks this for the whole list.

The argument
------------
Call R the sites that are missing from L or collude. The aggregator can unmask more than the
sum of all honest survivors H only if (E1) some site has at least t colluding neighbours, who
then hold t shares of its secrets, or (E2) H falls apart. H falls apart only if the ring holds a
run of at least k/2 consecutive sites of R, since every two consecutive members of H closer
than that are adjacent; the honest survivor just after such a run has its whole left window in
R, at most m of it missing by rule 3, so (E2) some left window holds at least k/2 - m colluders.
If neither happens, H is connected and every edge in it carries a pairwise mask applied at both
ends (rule 2) whose seed the aggregator cannot compute (neither end's key is ever revealed by
an honest site: rule 1), so the masked inputs of H reveal only their sum. Rule 2 reaches the
edges between survivors that never sign L as well: a survivor's self-mask is removed only
with t shares of it, more than the colluders hold (not E1), so some honest neighbour of each
survivor signs L, and it signs only if that survivor's attestation names all of the
survivor's live neighbours.

    P(E1) <= n * P[Hyp(n - 1, C, k) >= t],    P(E2) <= n * P[Hyp(n - 1, C, k/2) >= k/2 - m]

and we require P(E1) + P(E2) <= 2**-security_bits (at least 40, as Bell et al., CCS 2020, and
Google fcp's ``graph_parameter_finder`` do). Correctness: with D random dropouts some window
misses more than m sites with probability at most 2n * P[Hyp(n - 1, D, k/2) > m], which m keeps
below 2**-correctness_bits (20); every secret then keeps at least k - 2m live share holders, so
t <= k - 2m lets the round finish, and n - D >= q lets the quorum form.

The complete graph needs none of this: it is connected whatever is removed, and t > (n + C)/2
doubles as the quorum (the fewest colluders that could serve two lists is 2t - n > C).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from secagg._encoding import digest
from secagg.errors import ConfigurationError
from secagg.hazmat.prg import MaskExpander

MIN_SECURITY_BITS = 40
CORRECTNESS_BITS = 20
MIN_NEIGHBORS = 4
_SMALL = 1e-9  # keeps floor(fraction * n) from losing a site to float rounding


def colluders(sites: int, corrupt_fraction: float) -> int:
    # defence: masking.graph.colluders-survive-rounding
    return math.floor(corrupt_fraction * sites + _SMALL)


def expected_dropouts(sites: int, dropout_rate: float) -> int:
    return math.floor(dropout_rate * sites + _SMALL)


def consistency_quorum(sites: int, corrupt_fraction: float) -> int:
    """Smallest q with q > sites * (1 + corrupt_fraction) / 2: two quorums share an honest site."""
    # defence: masking.graph.quorum-counts-colluders
    return (sites + colluders(sites, corrupt_fraction)) // 2 + 1


@lru_cache(maxsize=4096)
def _log_tails(population: int, successes: int, draws: int) -> tuple[float, ...]:
    """ln P[X >= x] for x = 0..draws+1, X ~ Hypergeometric(population, successes, draws)."""
    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    total = log_comb(population, draws)
    lo, hi = max(0, draws - (population - successes)), min(successes, draws)
    logs = [-math.inf] * (draws + 2)
    for i in range(lo, hi + 1):
        logs[i] = log_comb(successes, i) + log_comb(population - successes, draws - i) - total
    tails = [-math.inf] * (draws + 2)
    acc = -math.inf
    for x in range(draws, -1, -1):
        acc = _logaddexp(acc, logs[x])
        tails[x] = min(acc, 0.0)
    return tuple(tails)


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


def tail_log2(population: int, successes: int, draws: int, at_least: int) -> float:
    """log2 P[X >= at_least] for X ~ Hypergeometric(population, successes, draws)."""
    if at_least <= 0:
        return 0.0
    # defence: masking.graph.tail-counts-all-draws
    if at_least > draws:
        return -math.inf
    return _log_tails(population, successes, draws)[at_least] / math.log(2)


def _union_log2(count: int, log2_p: float) -> float:
    # defence: masking.graph.union-bound-over-sites
    return -math.inf if log2_p == -math.inf else math.log2(count) + log2_p


def max_missing_per_side(sites: int, neighbors: int, dropout_rate: float,
                         correctness_bits: int = CORRECTNESS_BITS) -> int:
    """The smallest m such that D random dropouts leave more than m of some site's k/2-window
    missing with probability at most 2**-correctness_bits."""
    half = neighbors // 2
    d = expected_dropouts(sites, dropout_rate)
    for m in range(half + 1):
        if _union_log2(2 * sites, tail_log2(sites - 1, d, half, m + 1)) <= -correctness_bits:
            return m
    return half


def security_failure_log2(sites: int, neighbors: int, threshold: int, missing_per_side: int,
                          corrupt: int) -> float:
    """log2 of the bound P(E1) + P(E2) (see the module docstring)."""
    half = neighbors // 2
    # defence: masking.graph.bound-counts-threshold-event
    e1 = _union_log2(sites, tail_log2(sites - 1, corrupt, neighbors, threshold))
    # defence: masking.graph.bound-counts-window-event
    # defence: masking.graph.window-event-counts-missing-sites
    e2 = _union_log2(sites, tail_log2(sites - 1, corrupt, half, half - missing_per_side))
    if e1 == -math.inf:
        return e2
    if e2 == -math.inf:
        return e1
    # defence: masking.graph.bound-sums-both-events
    return math.log2(2.0**e1 + 2.0**e2) if max(e1, e2) > -1000 else max(e1, e2) + 1


@dataclass(frozen=True)
class GraphParameters:
    """The resolved graph of a round and the bound it meets.

    ``neighbors`` is k (``sites - 1`` for the complete graph); ``threshold`` is t;
    ``consistency_quorum`` is q; ``max_missing_per_side`` is m (k-regular only, else None);
    ``failure_log2`` is log2 of the bound on the probability that the aggregator, with the
    assumed colluders, learns more than the survivors' sum (``-inf``: never, as for the
    complete graph).
    """

    sites: int
    neighbors: int
    threshold: int
    consistency_quorum: int
    max_missing_per_side: int | None
    failure_log2: float
    complete: bool

    def describe(self) -> str:
        if self.complete:
            return (f"complete graph: t={self.threshold} of {self.sites}, consistency quorum "
                    f"{self.consistency_quorum} (deterministic: no failure probability)")
        bound = ("0 (impossible with this many colluders)" if self.failure_log2 == -math.inf
                 else f"2^{self.failure_log2:.1f}")
        return (f"k-regular graph: k={self.neighbors}, t={self.threshold}, at most "
                f"{self.max_missing_per_side} missing per side, consistency quorum "
                f"{self.consistency_quorum}; P(aggregator learns more than the sum) <= {bound}")


def _sparse_candidate(sites: int, k: int, corrupt: int, dropout_rate: float,
                      security_bits: int) -> GraphParameters | None:
    half = k // 2
    m = max_missing_per_side(sites, k, dropout_rate)
    if m >= half:
        return None
    e2 = _union_log2(sites, tail_log2(sites - 1, corrupt, half, half - m))
    if e2 > -security_bits:
        return None
    for t in range(2, k - 2 * m + 1):
        bound = security_failure_log2(sites, k, t, m, corrupt)
        if bound <= -security_bits:
            return GraphParameters(sites, k, t, 0, m, bound, complete=False)
    return None


def check_inputs(sites: object, corrupt_fraction: object, dropout_rate: object,
                 security_bits: object) -> None:
    """Refuse what the two functions below cannot size a graph for (RoundConfig calls this
    too, so there is one check): a security_bits of -5 returned a graph with P(failure) <=
    2^4.7, a negative corrupt_fraction a threshold of 2, and a NaN dropout_rate raised
    ValueError from math.floor."""
    def fraction(v: object) -> bool:
        return (isinstance(v, int | float) and not isinstance(v, bool)
                and 0 <= v < 1)  # (NaN fails the comparison)

    wrong = next((f"{name} must be {kind}, got {value!r:.40}" for name, value, ok, kind in (
        ("sites", sites, type(sites) is int and sites >= 1, "a positive integer"),
        ("corrupt_fraction", corrupt_fraction, fraction(corrupt_fraction), "in [0, 1)"),
        ("dropout_rate", dropout_rate, fraction(dropout_rate), "in [0, 1)"),
        ("security_bits", security_bits, type(security_bits) is int
         and MIN_SECURITY_BITS <= security_bits <= 256,
         f"an integer in [{MIN_SECURITY_BITS}, 256]")) if not ok), None)
    # defence: masking.graph.inputs-checked
    if wrong is not None:
        raise ConfigurationError(wrong)


# (typed: 100.0 found 100's cached answer, never checked)
# defence: masking.graph.cache-typed
@lru_cache(maxsize=256, typed=True)
def find_sparse_parameters(sites: int, corrupt_fraction: float, dropout_rate: float,
                           security_bits: int = MIN_SECURITY_BITS) -> GraphParameters | None:
    """The smallest even k (and its smallest t) meeting the bound, or None if only the
    complete graph does (small rosters)."""
    check_inputs(sites, corrupt_fraction, dropout_rate, security_bits)
    corrupt = colluders(sites, corrupt_fraction)
    quorum = consistency_quorum(sites, corrupt_fraction)
    # (a sparse graph whose quorum the expected dropouts break aborts every round)
    # defence: masking.graph.auto-keeps-the-quorum
    if sites - expected_dropouts(sites, dropout_rate) < quorum:
        return None
    for k in range(MIN_NEIGHBORS, sites - 1, 2):
        found = _sparse_candidate(sites, k, corrupt, dropout_rate, security_bits)
        if found is not None:
            return GraphParameters(sites, k, found.threshold, quorum,
                                   found.max_missing_per_side, found.failure_log2, False)
    return None


def check_sparse_parameters(sites: int, neighbors: int, threshold: int | None,
                            corrupt_fraction: float, dropout_rate: float,
                            security_bits: int) -> GraphParameters:
    """Resolve and check an explicit k (and t, or the smallest safe t); refuse a miss."""
    check_inputs(sites, corrupt_fraction, dropout_rate, security_bits)
    # defence: masking.graph.integer-degree-and-threshold
    if (isinstance(neighbors, bool) or not isinstance(neighbors, int)
            or (threshold is not None and (isinstance(threshold, bool)
                                           or not isinstance(threshold, int)))):
        raise ConfigurationError(f"neighbors and threshold must be integers, got "
                                 f"{neighbors!r:.20} and {threshold!r:.20}")
    n, k = sites, neighbors
    if not MIN_NEIGHBORS <= k < n - 1:
        if n - 2 < MIN_NEIGHBORS:  # (the range said was empty: "[4, 3]")
            raise ConfigurationError(
                f"{n} sites are too few for a sparse graph (neighbors needs at least "
                f"{MIN_NEIGHBORS + 2} sites): use the complete graph (neighbors = \"complete\" in "
                "federation.toml, None from Python)")
        raise ConfigurationError(
            f"neighbors must be in [{MIN_NEIGHBORS}, {n - 2}] for {n} sites (or \"complete\" "
            f"(None from Python) or \"auto\"), got {k}")
    # defence: masking.graph.even-degree
    if k % 2:
        raise ConfigurationError(f"neighbors must be even (a Harary graph H(k, n)), got {k}")
    corrupt = colluders(n, corrupt_fraction)
    quorum = consistency_quorum(n, corrupt_fraction)
    # defence: masking.graph.quorum-survives-dropouts
    if n - expected_dropouts(n, dropout_rate) < quorum:
        raise ConfigurationError(
            f"dropout_rate={dropout_rate} leaves fewer than the consistency quorum of {quorum} "
            f"of {n} sites (corrupt_fraction={corrupt_fraction})")
    m = max_missing_per_side(n, k, dropout_rate)
    highest = k - 2 * m
    if threshold is None:
        found = _sparse_candidate(n, k, corrupt, dropout_rate, security_bits)
        t = found.threshold if found is not None else highest
    else:
        t = threshold
    bound = security_failure_log2(n, k, t, m, corrupt) if m < k // 2 else 0.0
    # defence: masking.graph.explicit-parameters-meet-the-bound
    # defence: masking.graph.threshold-within-k-minus-2m
    if highest < 2 or bound > -security_bits or not 2 <= t <= highest:
        best = find_sparse_parameters(n, corrupt_fraction, dropout_rate, security_bits)
        hint = (f"the smallest safe choice is neighbors={best.neighbors}, "
                f"threshold={best.threshold}" if best is not None
                else "only the complete graph (neighbors = \"complete\") is safe for this roster")
        why = (f"up to {m} of each {k // 2}-site window may drop out, leaving no threshold "
               "that lets the round finish" if highest < 2 else
               f"P(failure) <= 2^{bound:.1f} and threshold must be in [2, {highest}]")
        shown = t if threshold is not None else "auto"
        raise ConfigurationError(
            f"neighbors={k}, threshold={shown} misses the 2^-{security_bits} bound for {n} sites "
            f"with corrupt_fraction={corrupt_fraction} and dropout_rate={dropout_rate}: "
            f"{why}; {hint} (or use neighbors='auto')")
    return GraphParameters(n, k, t, quorum, m, bound, complete=False)


# ---- the ring ----------------------------------------------------------------------------


def ring_order(sites: Sequence[int], seed: bytes) -> list[int]:
    """A uniform permutation of ``sites`` from ``seed``: Fisher-Yates with rejection-sampled
    draws from an AES-256-CTR stream, so every site computes the same ring alone."""
    # defence: masking.graph.ring-keyed-by-graph-seed
    key = digest("harary-ring", seed, list(sites))
    stream = MaskExpander(4 * len(sites) + 64, word_bits=32).words(key)
    order = list(sites)
    pos = 0
    for i in range(len(order) - 1, 0, -1):
        bound = i + 1
        limit = (2**32 // bound) * bound
        while True:
            if pos == stream.shape[0]:  # astronomically unlikely; extend deterministically
                key = digest("harary-ring-extend", key)
                stream = MaskExpander(stream.shape[0], word_bits=32).words(key)
                pos = 0
            draw = int(stream[pos])
            pos += 1
            if draw < limit:
                break
        # defence: masking.graph.ring-uniform
        j = draw % bound
        order[i], order[j] = order[j], order[i]
    return order


def worst_missing_window(order: Sequence[int], half: int, survivors: frozenset[int]
                         ) -> tuple[int, int]:
    """(site, missing) for the survivor whose left or right window of ``half`` sites has the
    most sites missing from ``survivors``; (0, 0) if there is no survivor."""
    n = len(order)
    missing = [0 if s in survivors else 1 for s in order]
    prefix = [0]
    for x in missing + missing + missing:
        prefix.append(prefix[-1] + x)

    def count(start: int, length: int) -> int:  # positions start .. start+length-1 (mod n)
        a = start % n + n
        return prefix[a + length] - prefix[a]

    worst, worst_site = 0, 0
    for i, site in enumerate(order):
        if missing[i]:
            continue
        here = max(count(i - half, half), count(i + 1, half))
        if here > worst:
            worst, worst_site = here, site
    return worst_site, worst
