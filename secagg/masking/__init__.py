"""Pairwise masking (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020) as a pure library.

The roles are sans-I/O state machines: :class:`MaskingClient` for a site,
:class:`MaskingServer` for the untrusted aggregator. :func:`simulate_round` wires them in memory.
"""

from secagg.masking.client import MaskingClient
from secagg.masking.config import RoundConfig, minimum_safe_threshold
from secagg.masking.messages import Stage
from secagg.masking.server import AggregateResult, MaskingServer
from secagg.masking.simulation import SimulationReport, make_roster, simulate_round

__all__ = [
    "AggregateResult",
    "MaskingClient",
    "MaskingServer",
    "RoundConfig",
    "SimulationReport",
    "Stage",
    "make_roster",
    "minimum_safe_threshold",
    "simulate_round",
]
