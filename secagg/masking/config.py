"""Round configuration for pairwise masking, validated eagerly, with the graph and threshold rules.

Complete graph (SecAgg, ``neighbors=None``): every site masks with every other and shares its
secrets with all ``n`` sites. The threshold must satisfy ``t > n(1 + corrupt_fraction)/2`` and
``t >= 3`` (a sum of two sites hands each the other's update); it is also the consistency
quorum, so two survivor lists would need ``2t - n`` colluders to both pass (more than there
are). This holds with certainty.

Sparse graph (SecAgg+, ``neighbors=k`` or ``neighbors="auto"``): each site masks with and shares
its secrets among its ``k`` neighbours in a Harary graph drawn from the signed roster's graph
seed (:mod:`secagg.roster`), so neither the aggregator nor colluding sites can choose it. The
survivor list needs signatures from a quorum of the *whole* roster, and ``(k, t)`` must meet a
bound of at most ``2**-security_bits`` on the probability that the aggregator learns more than
the survivors' sum; :mod:`secagg.masking.graph` states the argument. ``neighbors="auto"`` picks
the smallest ``k`` that meets it (or the complete graph, for small rosters); an explicit ``k``
or ``threshold`` that misses it is refused with :class:`~secagg.errors.ConfigurationError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Literal

import numpy as np

from secagg._encoding import digest
from secagg.errors import ConfigurationError
from secagg.hazmat import signing
from secagg.hazmat.prg import MAX_WORDS, word_dtype
from secagg.hazmat.quantize import Quantizer
from secagg.masking import graph
from secagg.roster import Roster

MIN_SITES = 3
MIN_NEIGHBORS = graph.MIN_NEIGHBORS
# clip, max_weight and their product must lie in [2**-64, 2**64]: beyond, the quantiser's scale
# overflows to infinity or underflows into subnormals and the aggregate is silently wrong.
MIN_RANGE = 2.0**-64
MAX_RANGE = 2.0**64


def minimum_safe_threshold(share_holders: int, corrupt_fraction: float) -> int:
    """Smallest t with t > share_holders * (1 + corrupt_fraction) / 2."""
    bound = Fraction(share_holders) * (1 + Fraction(corrupt_fraction).limit_denominator(10**6)) / 2
    # defence: masking.config.safe-threshold-strictly-above
    return math.floor(bound) + 1


def _check_range(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and MIN_RANGE <= v <= MAX_RANGE):
        raise ConfigurationError(f"{name} must be a finite number in [2**-64, 2**64], got {v}")
    return v


def _check_model_digest(value: object) -> None:
    if not isinstance(value, bytes) or len(value) not in (0, 32):
        raise ConfigurationError("model_digest must be 32 bytes (or empty: no model)")


@dataclass(frozen=True)
class RoundConfig:
    """Everything the sites and the server must agree on before a masking round starts.

    Parameters
    ----------
    round_id: a unique name for this round; every signature and derived key is bound to it.
        A site must take part in a round id at most once (the SDK records it in
        ``history.json`` before a site's first message leaves): a key advertisement is
        signed over the round's parameters alone, so an aggregator that runs a round id
        again can replay, in the second run, the advertisement of a site it marked dropped
        in the first (whose masking key the first run's revealed shares gave it).
    roster: the federation's :class:`~secagg.roster.Roster` (site id -> Ed25519 identity key,
        plus the graph seed). A plain ``{site: key}`` mapping is accepted for the complete graph.
    vector_length: number of update elements per site (the weight element is added on top).
    threshold: Shamir threshold; ``None`` picks the smallest safe value (at least 3).
    neighbors: ``None`` for the complete graph; an even k for a k-regular graph (SecAgg+);
        ``"auto"`` for the smallest k that meets the bound.
    corrupt_fraction: the fraction of sites that may collude with the aggregator.
    dropout_rate: the fraction of sites expected to drop out (SecAgg+ sizes its tolerance of
        missing neighbours from it; a round with more dropouts may abort, never leak).
    security_bits: SecAgg+ only; the bound is ``2**-security_bits`` (at least 40).
    clip, max_weight, word_bits: quantisation (see :mod:`secagg.hazmat.quantize`).
    model_digest: the digest of the model the round's updates are computed against (32
        bytes), or empty for a round with no model. Every signature of the round is bound to
        it, so sites handed different models never complete a round together: an aggregator
        cannot give the other sites a model whose updates are zero where it wants one site's
        alone, and read that site's update off the sum.

    Notes
    -----
    The server learns the sum of the surviving sites' weighted updates and the sum of their
    weights, nothing else, as long as at most ``corrupt_fraction`` of the sites collude with it
    (for SecAgg+, except with probability at most :attr:`failure_bound`). It learns who dropped
    out, and it chooses, by claiming dropouts, which honest sites the sum covers: at least
    ``consistency_quorum - colluders`` of them. A round of fewer than 3 sites is refused: the
    sum would hand each site the other's input.
    """

    round_id: str
    roster: Mapping[int, bytes]
    vector_length: int
    threshold: int | None = None
    neighbors: int | Literal["auto"] | None = None
    corrupt_fraction: float = 0.2
    dropout_rate: float = 0.1
    security_bits: int = graph.MIN_SECURITY_BITS
    clip: float = 1.0
    max_weight: float = 1.0
    word_bits: int = 32
    model_digest: bytes = b""
    _graph: graph.GraphParameters = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, str) or not self.round_id:
            raise ConfigurationError("round_id must be a non-empty string")
        _check_model_digest(self.model_digest)
        # defence: masking.config.at-least-three-sites
        if not isinstance(self.roster, Mapping) or len(self.roster) < MIN_SITES:
            raise ConfigurationError(f"roster must list at least {MIN_SITES} sites")
        for site, key in self.roster.items():
            if type(site) is not int or not 1 <= site < 2**63:
                raise ConfigurationError(
                    f"roster site ids must be integers in [1, 2**63), got {site!r}")
            if not isinstance(key, bytes) or len(key) != signing.PUBLIC_KEY_BYTES:
                raise ConfigurationError(f"roster key of site {site} must be 32 bytes")
        # defence: masking.config.distinct-identity-keys
        if len(set(self.roster.values())) != len(self.roster):
            raise ConfigurationError("roster lists the same identity key for two sites")
        if (isinstance(self.vector_length, bool) or not isinstance(self.vector_length, int)
                # defence: masking.config.vector-length-bounded
                or not 1 <= self.vector_length < MAX_WORDS):
            # (with the weight, at most MAX_WORDS = 2**31 values: what the mask expander
            # covers, and far beyond any model a site sends)
            raise ConfigurationError(
                f"vector_length must be in [1, 2**31 - 1], got {self.vector_length}")
        # defence: masking.config.graph-inputs-checked-once
        graph.check_inputs(len(self.roster), self.corrupt_fraction, self.dropout_rate,
                           self.security_bits)
        if type(self.word_bits) is not int:
            raise ConfigurationError(f"word_bits must be an integer, got {self.word_bits!r}")
        clip = _check_range("clip", self.clip)
        max_weight = _check_range("max_weight", self.max_weight)
        _check_range("clip * max_weight", clip * max_weight)
        if self.threshold is not None and (
                isinstance(self.threshold, bool) or not isinstance(self.threshold, int)):
            raise ConfigurationError(f"threshold must be an integer, got {self.threshold!r}")
        object.__setattr__(self, "_graph", self._resolve_graph())
        try:
            self.quantizer  # noqa: B018  (validates word_bits against the roster size)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None

    def _resolve_graph(self) -> graph.GraphParameters:
        n = len(self.roster)
        k = self.neighbors
        if k == "auto":
            found = (graph.find_sparse_parameters(n, self.corrupt_fraction, self.dropout_rate,
                                                  self.security_bits)
                     if isinstance(self.roster, Roster) else None)
            k = None if found is None else found.neighbors
            object.__setattr__(self, "neighbors", k)
            # defence: masking.config.auto-keeps-an-explicit-threshold
            if found is not None and self.threshold is None:
                return found
        if k is None:
            # and never below three: every site receives the released sum, and a sum of two
            # hands each of them the other's update (a lying aggregator has only to claim the
            # third of a 3-site federation dropped). With n >= 4, t > n/2 is at least 3 anyway.
            # defence: masking.config.sum-of-at-least-three
            safe = max(minimum_safe_threshold(n, self.corrupt_fraction), MIN_SITES)
            t = safe if self.threshold is None else self.threshold
            # defence: masking.config.threshold-at-least-safe
            # defence: masking.config.threshold-at-most-holders
            if not safe <= t <= n:
                raise ConfigurationError(
                    f"threshold must be in [{safe}, {n}] for {n} share holders and "
                    f"corrupt_fraction={self.corrupt_fraction} (t > n*(1+corrupt)/2, and at "
                    f"least {MIN_SITES}: a sum of two sites reveals each to the other), got {t}")
            return graph.GraphParameters(n, n - 1, t, t, None, -math.inf, complete=True)
        if isinstance(k, bool) or not isinstance(k, int):
            raise ConfigurationError(f"neighbors must be an even integer, None or 'auto', "
                                     f"got {k!r}")
        # defence: masking.config.sparse-graph-needs-signed-seed
        if not isinstance(self.roster, Roster):
            raise ConfigurationError(
                "a k-regular graph needs the signed roster's graph seed: pass a "
                "secagg.roster.Roster (neither the aggregator nor the sites may choose the graph)")
        return graph.check_sparse_parameters(n, k, self.threshold, self.corrupt_fraction,
                                             self.dropout_rate, self.security_bits)

    # ---- resolved parameters ---------------------------------------------------------------

    @property
    def graph(self) -> graph.GraphParameters:
        return self._graph

    @property
    def complete_graph(self) -> bool:
        return self._graph.complete

    @property
    def reconstruction_threshold(self) -> int:
        return self._graph.threshold

    @property
    def consistency_quorum(self) -> int:
        """Signatures from this many roster sites make a survivor list the round's only one."""
        return self._graph.consistency_quorum

    @property
    def max_missing_per_side(self) -> int | None:
        return self._graph.max_missing_per_side

    @property
    def failure_bound(self) -> float:
        """Bound on the probability that the aggregator learns more than the survivors' sum
        (0.0 for the complete graph)."""
        return 0.0 if self._graph.failure_log2 == -math.inf else 2.0**self._graph.failure_log2

    @property
    def share_holders(self) -> int:
        return self._graph.neighbors + 1

    @property
    def minimum_participants(self) -> int:
        """Fewer sites than this at any stage and the round cannot finish."""
        return max(self.reconstruction_threshold, self.consistency_quorum)

    @cached_property
    def sites(self) -> tuple[int, ...]:
        return tuple(sorted(self.roster))

    @cached_property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.clip, self.max_weight, len(self.roster), self.word_bits)

    @property
    def quantizer_dtype(self) -> type[np.unsignedinteger]:
        return word_dtype(self.word_bits)

    @cached_property
    def roster_digest(self) -> bytes:
        if isinstance(self.roster, Roster):
            return self.roster.digest
        listing = b"".join(s.to_bytes(8, "big") + self.roster[s] for s in self.sites)
        return digest("plain-roster", listing)

    @cached_property
    def params_digest(self) -> bytes:
        """Binds every signature of the round to all its parameters and the roster."""
        g = self._graph
        return digest(
            # defence: masking.config.params-binds-round-id, masking.config.params-binds-roster
            # defence: masking.config.params-binds-vector-length
            "round-params", self.round_id, self.roster_digest, self.vector_length,
            # defence: masking.config.params-binds-threshold, masking.config.params-binds-neighbors
            g.threshold, -1 if g.complete else g.neighbors, g.consistency_quorum,
            -1 if g.max_missing_per_side is None else g.max_missing_per_side,
            # defence: masking.config.params-binds-corrupt-fraction
            # defence: masking.config.params-binds-dropout-rate
            repr(float(self.corrupt_fraction)), repr(float(self.dropout_rate)),
            # defence: masking.config.params-binds-security-bits, masking.config.params-binds-clip
            # defence: masking.config.params-binds-max-weight
            self.security_bits, repr(float(self.clip)), repr(float(self.max_weight)),
            # defence: masking.config.params-binds-word-bits
            self.word_bits,
            # defence: masking.config.params-binds-model
            *((self.model_digest,) if self.model_digest else ()),
        )

    # ---- the graph ---------------------------------------------------------------------------

    @cached_property
    def ring(self) -> tuple[int, ...]:
        """Sites in ring order (SecAgg+); the sorted sites for the complete graph."""
        if self.complete_graph:
            return self.sites
        # defence: masking.config.graph-ignores-round-id
        assert isinstance(self.roster, Roster)
        return tuple(graph.ring_order(self.sites, self.roster.graph_seed))

    @cached_property
    def _windows(self) -> dict[int, tuple[frozenset[int], frozenset[int]]]:
        order, n = self.ring, len(self.ring)
        if self.complete_graph:
            others = frozenset(order)
            return {s: (others - {s}, frozenset()) for s in order}
        half = self._graph.neighbors // 2
        return {
            s: (frozenset(order[(i - d) % n] for d in range(1, half + 1)),
                frozenset(order[(i + d) % n] for d in range(1, half + 1)))
            for i, s in enumerate(order)
        }

    def windows(self, site: int) -> tuple[frozenset[int], frozenset[int]]:
        """The k/2 sites before and after ``site`` on the ring (SecAgg+). For the complete
        graph: (everyone else, empty)."""
        return self._windows[site]

    @cached_property
    def _graph_sets(self) -> dict[int, frozenset[int]]:
        return {s: left | right | {s} for s, (left, right) in self._windows.items()}

    def neighbourhood(self, site: int) -> frozenset[int]:
        """The sites that ``site`` masks with and shares its secrets with, itself included."""
        return self._graph_sets[site]

    def worst_missing_window(self, survivors: frozenset[int]) -> tuple[int, int]:
        """(site, missing) for the survivor with the most neighbours missing from
        ``survivors`` on one side (SecAgg+); (0, 0) for the complete graph."""
        if self.complete_graph:
            return 0, 0
        return graph.worst_missing_window(self.ring, self._graph.neighbors // 2, survivors)
