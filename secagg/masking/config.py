"""Round configuration for pairwise masking, validated eagerly, with the threshold rules.

Threshold rules (semi-malicious server that may lie about dropouts, plus up to a fraction
``corrupt_fraction`` of colluding sites; Bonawitz et al. CCS 2017, section 6; Bell et al.
CCS 2020 for sparse graphs):

- complete graph (SecAgg): each secret has ``n`` share holders; require
  ``threshold > (n + corrupt_fraction * n) / 2`` and ``threshold <= n``.
- k-regular graph (SecAgg+): each secret has ``k + 1`` share holders (the ``k`` neighbours and
  the site itself); require ``threshold > (k + 1) * (1 + corrupt_fraction) / 2`` and
  ``threshold <= k + 1``. The neighbour graph is a Harary graph over a permutation of the
  roster derived from the round parameters, so every site computes it alone and the server
  cannot choose it. Choosing ``k`` large enough for ``n`` (Bell et al., Table 1: k grows as
  O(log n)) is the operator's decision; we refuse ``k < 4`` outright.

An unsafe threshold is refused with :class:`~secagg.errors.ConfigurationError`; ``threshold=None``
picks the smallest safe value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property

import numpy as np

from secagg._encoding import digest
from secagg.errors import ConfigurationError
from secagg.hazmat import signing
from secagg.hazmat.prg import MaskExpander
from secagg.hazmat.quantize import Quantizer

MIN_SITES = 3
MIN_NEIGHBORS = 4


def minimum_safe_threshold(share_holders: int, corrupt_fraction: float) -> int:
    """Smallest t with t > share_holders * (1 + corrupt_fraction) / 2."""
    bound = Fraction(share_holders) * (1 + Fraction(corrupt_fraction).limit_denominator(10**6)) / 2
    return math.floor(bound) + 1


@dataclass(frozen=True)
class RoundConfig:
    """Everything the sites and the server must agree on before a masking round starts.

    Parameters
    ----------
    round_id: a unique name for this round; every signature and derived key is bound to it.
    roster: site id (>= 1) -> that site's long-term Ed25519 public key (32 bytes).
    vector_length: number of update elements per site (the weight element is added on top).
    threshold: Shamir threshold; ``None`` picks the smallest safe value.
    neighbors: ``None`` for the complete graph, else k for a k-regular graph (SecAgg+).
    corrupt_fraction: the fraction of colluding sites the threshold must withstand.
    clip, max_weight, word_bits: quantisation (see :mod:`secagg.hazmat.quantize`).

    Notes
    -----
    The server learns the sum of the surviving sites' weighted updates and the sum of their
    weights, nothing else, as long as fewer than ``corrupt_fraction`` of the sites collude with
    it. It learns who dropped out. A round of fewer than 3 sites is refused: the sum would hand
    each site the other's input.
    """

    round_id: str
    roster: Mapping[int, bytes]
    vector_length: int
    threshold: int | None = None
    neighbors: int | None = None
    corrupt_fraction: float = 0.2
    clip: float = 1.0
    max_weight: float = 1.0
    word_bits: int = 32
    _resolved_threshold: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, str) or not self.round_id:
            raise ConfigurationError("round_id must be a non-empty string")
        if not isinstance(self.roster, Mapping) or len(self.roster) < MIN_SITES:
            raise ConfigurationError(f"roster must list at least {MIN_SITES} sites")
        for site, key in self.roster.items():
            if not isinstance(site, int) or isinstance(site, bool) or site < 1:
                raise ConfigurationError(f"roster site ids must be integers >= 1, got {site!r}")
            if not isinstance(key, bytes) or len(key) != signing.PUBLIC_KEY_BYTES:
                raise ConfigurationError(f"roster key of site {site} must be 32 bytes")
        if len(set(self.roster.values())) != len(self.roster):
            raise ConfigurationError("roster lists the same identity key for two sites")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ConfigurationError(f"vector_length must be >= 1, got {self.vector_length}")
        if not 0 <= self.corrupt_fraction < 1:
            raise ConfigurationError(
                f"corrupt_fraction must be in [0, 1), got {self.corrupt_fraction}"
            )
        n = len(self.roster)
        if self.neighbors is not None:
            k = self.neighbors
            if not MIN_NEIGHBORS <= k < n - 1:
                raise ConfigurationError(
                    f"neighbors must be in [{MIN_NEIGHBORS}, {n - 2}] for {n} sites "
                    f"(use neighbors=None for the complete graph), got {k}"
                )
            if k % 2 == 1 and n % 2 == 1:
                raise ConfigurationError(
                    f"neighbors={k} is odd: a k-regular graph needs an even number of sites, "
                    f"got {n}"
                )
        holders = self.share_holders
        safe = minimum_safe_threshold(holders, self.corrupt_fraction)
        t = safe if self.threshold is None else self.threshold
        if not isinstance(t, int) or not safe <= t <= holders:
            raise ConfigurationError(
                f"threshold must be in [{safe}, {holders}] for {holders} share holders and "
                f"corrupt_fraction={self.corrupt_fraction} (t > holders*(1+corrupt)/2), got {t}"
            )
        try:
            self.quantizer  # noqa: B018  (validates clip, max_weight, word_bits)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None
        object.__setattr__(self, "_resolved_threshold", t)

    @property
    def reconstruction_threshold(self) -> int:
        return self._resolved_threshold

    @property
    def share_holders(self) -> int:
        return len(self.roster) if self.neighbors is None else self.neighbors + 1

    @cached_property
    def sites(self) -> tuple[int, ...]:
        return tuple(sorted(self.roster))

    @cached_property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.clip, self.max_weight, len(self.roster), self.word_bits)

    @cached_property
    def params_digest(self) -> bytes:
        """Binds every signature of the round to all its parameters and the roster."""
        roster = b"".join(s.to_bytes(8, "big") + self.roster[s] for s in self.sites)
        return digest(
            "round-params", self.round_id, roster, self.vector_length,
            self.reconstruction_threshold, -1 if self.neighbors is None else self.neighbors,
            repr(float(self.corrupt_fraction)), repr(float(self.clip)),
            repr(float(self.max_weight)), self.word_bits,
        )

    @cached_property
    def _graph(self) -> dict[int, frozenset[int]]:
        sites = self.sites
        if self.neighbors is None:
            everyone = frozenset(sites)
            return {s: everyone for s in sites}
        order = _derived_permutation(sites, self.params_digest)
        n, k = len(order), self.neighbors
        graph: dict[int, set[int]] = {s: {s} for s in order}
        for i, s in enumerate(order):
            for d in range(1, k // 2 + 1):
                graph[s].add(order[(i + d) % n])
                graph[s].add(order[(i - d) % n])
            if k % 2 == 1:
                graph[s].add(order[(i + n // 2) % n])
        return {s: frozenset(v) for s, v in graph.items()}

    def neighbourhood(self, site: int) -> frozenset[int]:
        """The sites that ``site`` masks with and shares its secrets with, itself included."""
        return self._graph[site]


def _derived_permutation(sites: tuple[int, ...], seed: bytes) -> list[int]:
    """Fisher-Yates with unbiased (rejection-sampled) draws from an AES-CTR stream under seed."""
    stream = MaskExpander(4 * len(sites) + 64, word_bits=32).words(seed)
    order = list(sites)
    pos = 0
    for i in range(len(order) - 1, 0, -1):
        bound = i + 1
        limit = (2**32 // bound) * bound
        while True:
            if pos == stream.shape[0]:  # astronomically unlikely; extend deterministically
                stream = np.concatenate([stream, MaskExpander(
                    stream.shape[0] + 64, word_bits=32).words(digest("perm-ext", seed, pos))])
            draw = int(stream[pos])
            pos += 1
            if draw < limit:
                break
        j = draw % bound
        order[i], order[j] = order[j], order[i]
    return order
