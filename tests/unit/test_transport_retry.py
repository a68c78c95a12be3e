"""The site's retry rule: UNAVAILABLE and CANCELLED (a call the aggregator's shutdown cut off)
are retried; every other status is a refusal at once."""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest

from clients.errors import AggregatorRefused, AggregatorUnavailable
from clients.transport import Connection


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"{self._code.name} from the test"


def _connection(retry_seconds: float = 5.0) -> Any:
    conn = Connection.__new__(Connection)  # no channel: _retry only needs these
    conn.retry_seconds = retry_seconds
    conn._random = random.SystemRandom()
    return conn


def _failing(codes: list[grpc.StatusCode]) -> Any:
    calls = []

    def attempt() -> str:
        calls.append(1)
        if len(calls) <= len(codes):
            raise _Status(codes[len(calls) - 1])
        return "answer"

    return attempt, calls


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_transient_statuses_are_retried(code: grpc.StatusCode) -> None:
    attempt, calls = _failing([code, code])
    assert _connection()._retry(attempt) == "answer"
    assert len(calls) == 3


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT])
def test_refusals_surface_at_once_naming_the_code(code: grpc.StatusCode) -> None:
    attempt, calls = _failing([code])
    with pytest.raises(AggregatorRefused, match=code.name):
        _connection()._retry(attempt)
    assert len(calls) == 1


def test_retries_stop_after_retry_seconds() -> None:
    attempt, _ = _failing([grpc.StatusCode.CANCELLED] * 1000)
    with pytest.raises(AggregatorUnavailable, match="stayed unavailable"):
        _connection(retry_seconds=0.3)._retry(attempt)
