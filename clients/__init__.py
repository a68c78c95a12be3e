"""The site SDK that hospitals embed: :class:`Site` (see :mod:`clients.site`)."""

from clients.errors import (
    AggregatorRefused,
    AggregatorUnavailable,
    AnswerRefused,
    DirectoryInUse,
    ModelMismatch,
    RoundAborted,
    SiteError,
)
from clients.site import Round, Site

__all__ = ["AggregatorRefused", "AggregatorUnavailable", "AnswerRefused", "DirectoryInUse",
           "ModelMismatch", "Round", "RoundAborted", "Site", "SiteError"]
