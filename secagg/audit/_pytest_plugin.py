"""A pytest plugin the audit loads (``-p secagg.audit._pytest_plugin``) to record outcomes.

When ``SECAGG_AUDIT_OUTCOMES`` names a file, it writes there, as JSON, the outcome of every test
that ran (``passed``, ``failed``, ``error``, ``skipped``) and every collection error. It imports
nothing from pytest, so nothing under ``secagg`` depends on pytest at import time.

When ``SECAGG_AUDIT_LIFELINE`` names a file descriptor (the read end of a pipe whose write end
only the runner holds), a thread waits on it. End of file means the runner is gone (a SIGKILL
runs no handler, so the runner could not kill this process group itself): the run is
interrupted as Ctrl-C would (fixtures tear down: their servers, their databases), and whatever
of the process group is still running a grace period later, or at exit, is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

ENV = "SECAGG_AUDIT_OUTCOMES"
LIFELINE_ENV = "SECAGG_AUDIT_LIFELINE"
GRACE_SECONDS = 30.0
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


def _kill_group() -> None:
    with contextlib.suppress(OSError):
        if os.getpgrp() == os.getpid():  # the runner starts pytest as a session's leader
            os.killpg(os.getpgrp(), signal.SIGKILL)
        else:  # (never a group this process does not lead)
            os.kill(os.getpid(), signal.SIGKILL)


def _watch(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    # the runner is gone: nobody will read this run's outcomes, nor end it
    atexit.register(_kill_group)
    # defence: audit.orphaned-tests-end-with-the-runner
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(GRACE_SECONDS)
    _kill_group()


def pytest_configure(config: Any) -> None:
    fd = os.environ.pop(LIFELINE_ENV, "")
    if fd.isdigit():
        with contextlib.suppress(OSError):
            os.set_inheritable(int(fd), False)  # (a test's own subprocesses do not hold it)
            threading.Thread(target=_watch, args=(int(fd),), name="audit-lifeline",
                             daemon=True).start()
