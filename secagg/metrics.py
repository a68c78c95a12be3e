"""The metrics-listener interface the protocol roles report to.

The core imports no metrics library; adapters (Prometheus, logs) implement this at the edge.
Listeners receive round ids, stage names, counts and reasons: never a payload, key or share.
"""

from __future__ import annotations

from typing import Protocol


class MetricsListener(Protocol):
    def stage_closed(self, round_id: str, stage: str, participants: int) -> None: ...
    def round_aborted(self, round_id: str, stage: str, reason: str) -> None: ...
    def round_completed(self, round_id: str, survivors: int) -> None: ...


class NullListener:
    def stage_closed(self, round_id: str, stage: str, participants: int) -> None:
        pass

    def round_aborted(self, round_id: str, stage: str, reason: str) -> None:
        pass

    def round_completed(self, round_id: str, survivors: int) -> None:
        pass
