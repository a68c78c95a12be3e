"""What the site SDK raises. Every refusal by the aggregator names its gRPC code and reason."""

from __future__ import annotations

from secagg.errors import SecAggError


def shown(text: str, limit: int = 1000) -> str:
    """``text`` as an error may carry it: control characters escaped (a line break, a
    terminal escape), at most ``limit`` characters. What the aggregator chose (a round id, an
    abort reason, a status's details) reaches the training script's logs through these
    errors: a lying aggregator forged whole log lines with a line break, and sent megabytes."""
    # defence: sdk.aggregator-text-shown-safely
    cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return cut if len(text) <= limit else f"{cut}... ({len(text)} characters)"


class SiteError(SecAggError):
    """Base class of the SDK's own errors."""


class DirectoryInUse(SiteError):
    """``Site.connect``: another process runs a Site of this site directory (or of its
    ``history_dir``)."""


class AggregatorRefused(SiteError):
    """The aggregator refused a call (code: the gRPC status name)."""

    def __init__(self, code: str, reason: str) -> None:
        reason = shown(reason)
        super().__init__(f"aggregator refused ({code}): {reason}")
        self.code = code
        self.reason = reason


class AnswerRefused(AggregatorRefused):
    """This site refused the aggregator's answer: it broke the protocol or the site's bounds
    (a chunk that does not match its id or was not asked for, a size past the site's limits,
    a transfer that made no progress or came slower than the slowest supported link).
    ``code``: a gRPC status name saying what kind of fault (``DATA_LOSS``, ``OUT_OF_RANGE``,
    ``INVALID_ARGUMENT``, ``RESOURCE_EXHAUSTED``, ``DEADLINE_EXCEEDED``), chosen by this
    SDK, not sent by the aggregator. A subclass of :class:`AggregatorRefused`, so that a
    handler of the aggregator's refusals catches these too."""

    def __init__(self, code: str, reason: str) -> None:
        reason = shown(reason)
        SiteError.__init__(self, f"this site refused the aggregator's answer ({code}): "
                                 f"{reason}")
        self.code = code
        self.reason = reason


class AggregatorUnavailable(SiteError):
    """The aggregator could not be reached, even after retrying."""


class RoundAborted(SiteError):
    """The round ended without a result for this site (the aggregator's reason, or this
    site's own abort). ``code``: what the aggregator answered, a gRPC status name
    (FAILED_PRECONDITION: it no longer takes this site's message, a dropout among others;
    ABORTED: the round aborted, also when its status said so), or None for this site's own
    refusals."""

    def __init__(self, round_id: str, reason: str, code: str | None = None) -> None:
        round_id, reason = shown(round_id, 200), shown(reason)
        super().__init__(f"round {round_id} aborted: {reason}" if code is None
                         else f"round {round_id} aborted ({code}): {reason}")
        self.round_id = round_id
        self.reason = reason
        self.code = code


class ModelMismatch(SiteError):
    """The round starts from a model other than the one this site holds (a model-inconsistency
    attack, or a site that missed a round): the site refuses to take part."""
