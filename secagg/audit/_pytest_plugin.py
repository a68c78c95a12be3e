"""A pytest plugin the audit loads (``-p secagg.audit._pytest_plugin``) to record outcomes.

When ``SECAGG_AUDIT_OUTCOMES`` names a file, it writes there, as JSON, the outcome of every test
that ran (``passed``, ``failed``, ``error``, ``skipped``) and every collection error. It imports
nothing from pytest, so nothing under ``secagg`` depends on pytest at import time.
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "SECAGG_AUDIT_OUTCOMES"
_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
_outcomes: dict[str, str] = {}
_collection_errors: dict[str, str] = {}


def _record(node_id: str, outcome: str) -> None:
    if _RANK[outcome] >= _RANK[_outcomes.get(node_id, "passed")]:
        _outcomes[node_id] = outcome


def pytest_runtest_logreport(report: Any) -> None:
    if report.passed:
        if report.when == "call":
            _record(report.nodeid, "passed")
    elif report.skipped:
        _record(report.nodeid, "skipped")
    elif report.when == "call":
        _record(report.nodeid, "failed")
    else:  # setup or teardown raised
        _record(report.nodeid, "error")


def pytest_collectreport(report: Any) -> None:
    if report.failed:
        _collection_errors[report.nodeid] = str(report.longrepr)[-4000:]


def pytest_sessionfinish(session: Any, exitstatus: Any) -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"outcomes": _outcomes, "collection_errors": _collection_errors,
                       "exit_status": int(exitstatus)}, f, indent=1)
