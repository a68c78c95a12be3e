"""The aggregator's service handlers driven without gRPC: a call context and a service on a
fake job, for tests of what the handlers do with many calls at once."""

from __future__ import annotations

import types
from typing import Any

from aggregator.service import AggregationService, Core
from secagg.federation.config import FederationConfig


class Aborted(Exception):
    """What ``context.abort`` raises here (grpc.aio raises its AbortError)."""


class _CallState:
    abort_exception: BaseException | None = None


class FakeContext:
    """A call of ``site`` with ``remaining`` seconds to its deadline (None: no deadline).
    It aborts as grpc.aio's servicer context does: the exception is kept on the call's state
    before it is raised."""

    def __init__(self, site: int, remaining: float | None = None) -> None:
        self.site = site
        self.remaining = remaining
        self._rpc_state = _CallState()

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: Any, details: str) -> None:
        self._rpc_state.abort_exception = Aborted(f"{code}: {details}")
        raise self._rpc_state.abort_exception


def fake_service(core: Core, *, limits: dict[str, Any] | None = None,
                 **job: Any) -> AggregationService:
    """The service over ``core``, its job a namespace of ``job``'s attributes, each call's
    site the context's."""
    config = FederationConfig.from_dict({
        "federation": {"name": "hospitals", "protocol": "masking", "aggregator": "agg:443",
                       "trust_root": "00" * 32},
        **({"limits": limits} if limits else {})})

    async def site(context: FakeContext) -> int:
        return context.site

    service = AggregationService(core, types.SimpleNamespace(site=site, roster_size=5),  # type: ignore[arg-type]
                                 config)
    core.job = types.SimpleNamespace(**job)  # type: ignore[assignment]
    core.healthy = True
    return service
