"""What the site SDK raises. Every refusal by the aggregator names its gRPC code and reason."""

from __future__ import annotations

from secagg.errors import SecAggError


class SiteError(SecAggError):
    """Base class of the SDK's own errors."""


class AggregatorRefused(SiteError):
    """The aggregator refused a call (code: the gRPC status name)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"aggregator refused ({code}): {reason}")
        self.code = code
        self.reason = reason


class AggregatorUnavailable(SiteError):
    """The aggregator could not be reached, even after retrying."""


class RoundAborted(SiteError):
    """The round ended without a result (the aggregator's reason, or this site's own abort)."""

    def __init__(self, round_id: str, reason: str) -> None:
        super().__init__(f"round {round_id} aborted: {reason}")
        self.round_id = round_id
        self.reason = reason


class ModelMismatch(SiteError):
    """The round starts from a model other than the one this site holds (a model-inconsistency
    attack, or a site that missed a round): the site refuses to take part."""
