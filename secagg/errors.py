"""The exceptions secagg raises, all in one place.

Callers catch :class:`SecAggError` for "anything secagg refused" of a message or a
configuration (:class:`ConfigurationError`). The protocol roles' checks of the caller's own
arguments (a site's update and weight: ``secagg._inputs``) raise plain ``ValueError`` or
``TypeError`` naming the offending parameter, as Python's own functions do: the caller's
mistake, not something secagg refused. Protocol outcomes have their own types. Any failure
to authenticate, decrypt or unmask is the single opaque :class:`InvalidMessage` (it never
says which check failed: no oracle for an attacker).
No message ever carries key material, seeds, shares or plaintext.
"""

from __future__ import annotations

import enum


class SecAggError(Exception):
    """Base class of every error secagg raises on purpose."""


class ConfigurationError(SecAggError, ValueError):
    """A round or preset parameter is invalid or unsafe. The message names the parameter."""


class WorkersFailed(ConfigurationError):
    """Worker processes (``workers`` > 1) died or could not start: usually a training script
    that did not guard its entry point, which every worker imports again."""


WORKERS_GUARD_HINT = ("a script that passes workers > 1 must guard its entry point with "
                      "`if __name__ == \"__main__\":` (each worker process imports it again)")


class PreconditionError(SecAggError):
    """An event arrived that is not valid in the current protocol state (e.g. wrong stage)."""


class InvalidMessage(SecAggError):
    """A message failed to authenticate, decrypt or parse. Deliberately opaque."""

    def __init__(self, what: str = "message") -> None:
        super().__init__(f"invalid {what}")


class RefusalReason(enum.Enum):
    """Why a well-formed message was refused (CKKS uploads, contexts)."""

    REFUSAL_REASON_UNSPECIFIED = 0
    WRONG_ROUND = 1
    WRONG_KEY_ID = 2
    UNKNOWN_SITE = 3
    DUPLICATE_SITE = 4
    WRONG_SHAPE = 5
    CONTEXT_HAS_SECRET_KEY = 6
    ALREADY_RELEASED = 7
    KEY_EXHAUSTED = 8
    AGGREGATE_MISMATCH = 9
    OUT_OF_RANGE = 10
    NOT_THE_RELEASING_HOLDER = 11


class RefusedMessage(SecAggError):
    """A well-formed message that does not belong here (wrong round, wrong key, ...).

    Unlike :class:`InvalidMessage` it says why: none of these reasons helps an attacker forge.
    """

    def __init__(self, reason: RefusalReason, detail: str = "") -> None:
        self.reason = reason
        super().__init__(reason.name if not detail else f"{reason.name}: {detail}")


class AbortReason(enum.Enum):
    """Why a role moved its round to the aborted state. One value per distinct refusal."""

    ABORT_REASON_UNSPECIFIED = 0
    TOO_FEW_SURVIVORS = 1
    BAD_SIGNATURE = 2
    UNKNOWN_SITE = 3
    DUPLICATE_SITE = 4
    DUPLICATE_KEY = 5
    OWN_KEY_MISSING_OR_ALTERED = 6
    WRONG_SIZE_KEY = 7
    SHARE_AUTHENTICATION_FAILED = 8
    UNEXPECTED_SHARE_SENDER = 9
    SELF_LISTED_AS_DROPPED = 10
    PEER_BOTH_ALIVE_AND_DROPPED = 11
    PEER_ALREADY_DROPPED = 12
    SURVIVOR_LIST_MISMATCH = 13
    RECONSTRUCTION_FAILED = 14
    MALFORMED_MESSAGE = 15
    TOO_MANY_MISSING_NEIGHBOURS = 16
    MASK_PARTNERS_INCOMPLETE = 17
    AGGREGATE_OUT_OF_RANGE = 18


class ProtocolAbort(SecAggError):
    """The round was aborted. ``reason`` is an :class:`AbortReason`; ``detail`` names ids only."""

    def __init__(self, reason: AbortReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        msg = reason.name if not detail else f"{reason.name}: {detail}"
        super().__init__(msg)
