"""A pytest plugin the audit loads (``-p secagg.audit._pytest_plugin``) to record outcomes.

When ``SECAGG_AUDIT_OUTCOMES`` names a file, it writes there, as JSON, the outcome of every test
that ran (``passed``, ``failed``, ``error``, ``skipped``) and every collection error (CI's
default run records them so, with ``-p secagg.audit._pytest_plugin``, and the controls take
them as their baseline: ``--baseline-from``). It imports
nothing from pytest, so nothing under ``secagg`` depends on pytest at import time.

When ``SECAGG_AUDIT_LIFELINE`` names a file descriptor (the read end of a pipe whose write end
only the runner holds), a thread waits on it. End of file means the runner is gone (a SIGKILL
runs no handler, so the runner could not kill this process group itself): the run is
interrupted as Ctrl-C would (fixtures tear down: their servers, their databases), and whatever
of the process group is still running a grace period later, or at exit, is killed.

When ``SECAGG_AUDIT_MODULES`` names modules (comma-separated), it records, with the outcomes,
the file each was imported from in this process (those the tests imported): the runner then
need not import them in an interpreter of their own to show the copy's code was tested.

``SECAGG_AUDIT_RUN`` marks every process of one run: pytest and whatever it starts inherit it
in their environment, also those that make a session (and a process group) of their own, which
a kill of the group misses. ``kill_marked`` kills them by that mark.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any

ENV = "SECAGG_AUDIT_OUTCOMES"
LIFELINE_ENV = "SECAGG_AUDIT_LIFELINE"
RUN_ENV = "SECAGG_AUDIT_RUN"
MODULES_ENV = "SECAGG_AUDIT_MODULES"
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


_path: list[str] = []  # where this run's outcomes go (ENV, taken at configure)


def pytest_sessionfinish(session: Any, exitstatus: Any) -> None:
    path = _path[0] if _path else os.environ.get(ENV)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"outcomes": _outcomes, "collection_errors": _collection_errors,
                       "exit_status": int(exitstatus), "imported": _imported()}, f, indent=1)


def _imported() -> dict[str, str]:
    """The file each module named in SECAGG_AUDIT_MODULES was imported from, of those this
    process imported (one whose import failed is not in sys.modules)."""
    found = {}
    for name in filter(None, os.environ.get(MODULES_ENV, "").split(",")):
        where = getattr(sys.modules.get(name), "__file__", None)
        if isinstance(where, str):
            found[name] = where
    return found


def kill_marked(token: str, spare: int | None = None) -> None:
    """SIGKILL every process whose environment holds ``SECAGG_AUDIT_RUN=token`` (but
    ``spare``): a run's processes, wherever they are, sessions of their own included."""
    if not token:
        return
    mark = f"{RUN_ENV}={token}".encode()
    # (again while a pass finds some: one that forked during a pass leaves a child to the next)
    for _ in range(5):
        try:
            entries = os.listdir("/proc")
        except OSError:
            return
        found = False
        for entry in entries:
            if not entry.isdigit() or int(entry) == spare:
                continue
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
                # defence: audit.own-session-processes-killed
                if mark in environ.split(b"\0"):
                    os.kill(int(entry), signal.SIGKILL)
                    found = True
        if not found:
            return


def _kill_group(spare_self: bool = False) -> None:
    """SIGKILL this process's group (the runner starts pytest as a session's leader), or,
    ``spare_self``, the rest of it, so that this process's exit handlers still run; and
    first, every other process of this run (those in sessions of their own)."""
    kill_marked(os.environ.get(RUN_ENV, ""), spare=os.getpid())
    with contextlib.suppress(OSError):
        group = os.getpgrp()
        if group != os.getpid():  # (never a group this process does not lead)
            if not spare_self:
                os.kill(os.getpid(), signal.SIGKILL)
            return
        if not spare_self:
            os.killpg(group, signal.SIGKILL)
            return
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                        fields = f.read().rpartition(")")[2].split()
                    if int(fields[2]) == group:
                        os.kill(int(entry), signal.SIGKILL)


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
    atexit.register(_kill_group, spare_self=True)
    # (to the main thread: a signal to the process may be taken by this thread, and the
    # main thread, blocked in a call, would not see it until the call returned)
    # defence: audit.orphaned-tests-end-with-the-runner
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
    time.sleep(GRACE_SECONDS)
    _kill_group()


def pytest_configure(config: Any) -> None:
    # (taken from the environment: a pytest that a test starts, loading this plugin without
    # a file of its own, wrote its outcomes over this run's)
    # defence: audit.outcomes-file-not-inherited
    path = os.environ.pop(ENV, "")
    if path and not _path:
        _path.append(path)
    fd = os.environ.pop(LIFELINE_ENV, "")
    if fd.isdigit():
        # a runner started in the background by a script (`cmd &`) has SIGINT ignored, and
        # so had its pytest: the lifeline's interrupt did nothing, and the tests were killed
        # 30 s later without their teardown (an auditor's finding)
        # defence: audit.orphaned-tests-interruptible
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(OSError):
            os.set_inheritable(int(fd), False)  # (a test's own subprocesses do not hold it)
            threading.Thread(target=_watch, args=(int(fd),), name="audit-lifeline",
                             daemon=True).start()
