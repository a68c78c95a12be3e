"""An in-process masking round: sites and server wired together in memory.

Used by the tests, the benchmark and ``secagg demo``. A site can be made to drop out at any
stage (it sends nothing from that stage on). Messages pass by reference, as the service will
pass them after deserialisation; nothing here is on the protocol's trust path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from secagg.errors import ProtocolAbort
from secagg.hazmat.prg import RangeSplitMasker
from secagg.hazmat.signing import IdentityKey
from secagg.masking.client import InputProvider, MaskingClient
from secagg.masking.config import RoundConfig
from secagg.masking.messages import ServerMessage, Stage
from secagg.masking.server import AggregateResult, MaskingServer
from secagg.metrics import MetricsListener
from secagg.roster import Roster

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class SimulationReport:
    result: AggregateResult | None
    abort: ProtocolAbort | None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    client_mask_seconds: dict[int, float] = field(default_factory=dict)
    client_stage_seconds: dict[str, list[float]] = field(default_factory=dict)
    mask_keystream_bytes: int = 0
    client_aborts: dict[int, ProtocolAbort] = field(default_factory=dict)


def make_roster(sites: int) -> tuple[Roster, dict[int, IdentityKey]]:
    """Fresh identity keys for sites 1..sites (generated now, never stored) and their roster,
    with a fresh graph seed as the roster signer would draw it."""
    keys = {s: IdentityKey.generate() for s in range(1, sites + 1)}
    return Roster.new({s: k.public_bytes for s, k in keys.items()}), keys


def simulate_round(
    config: RoundConfig,
    identities: Mapping[int, IdentityKey],
    inputs: Mapping[int, tuple[np.ndarray, float] | InputProvider],
    *,
    dropouts: Mapping[int, Stage] | None = None,
    listener: MetricsListener | None = None,
    progress: ProgressCallback | None = None,
    splitter: RangeSplitMasker | None = None,
) -> SimulationReport:
    """Run one round. ``dropouts[site] = stage`` makes ``site`` go silent from ``stage`` on.

    A round that aborts returns a report with ``abort`` set (and ``result`` None). A
    ``splitter`` (for ``vector_length + 1`` words) shares mask expansion with its worker
    processes; every role uses it in turn, as they run one after another here.
    """
    dropouts = dropouts or {}
    clients = {
        s: MaskingClient(config, s, identities[s], inputs[s], splitter=splitter)
        for s in config.sites
    }
    server = MaskingServer(config, listener, splitter=splitter)
    report = SimulationReport(result=None, abort=None)

    def alive(site: int, stage: Stage) -> bool:
        dropped_at = dropouts.get(site)
        return site not in report.client_aborts and (
            dropped_at is None or dropped_at.value > stage.value)

    outgoing: dict[int, ServerMessage] = {}
    for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT,
                  Stage.CONSISTENCY_CHECK, Stage.UNMASK):
        began = time.perf_counter()
        senders = [s for s in config.sites if alive(s, stage)]
        if stage is not Stage.ADVERTISE_KEYS:
            senders = [s for s in senders if s in outgoing]
        for done, site in enumerate(senders, 1):
            client = clients[site]
            try:
                c0 = time.perf_counter()
                reply = client.start() if stage is Stage.ADVERTISE_KEYS else client.handle(
                    outgoing[site])
                spent = time.perf_counter() - c0
                report.client_stage_seconds.setdefault(stage.name, []).append(spent)
                if stage is Stage.MASKED_INPUT:
                    report.client_mask_seconds[site] = spent
            except ProtocolAbort as abort:
                report.client_aborts[site] = abort
                continue
            s0 = time.perf_counter()
            server.handle(reply)
            report.server_seconds += time.perf_counter() - s0
            if progress:
                progress(stage.name, done, len(senders))
        s0 = time.perf_counter()
        try:
            outgoing = server.close_stage()
        except ProtocolAbort as abort:
            report.abort = abort
            return report
        finally:
            report.server_seconds += time.perf_counter() - s0
            report.stage_seconds[stage.name] = time.perf_counter() - began
    report.result = server.result
    report.mask_keystream_bytes = server.mask_keystream_bytes + sum(
        c.mask_keystream_bytes for c in clients.values())
    return report
