"""Run weakened-build controls: remove each defence in a copy and check its tests then fail.

Results per control:

- ``caught``: pytest exited 1, a listed test failed without the defence;
- ``missed``: pytest exited 0, every listed test still passes: the defence is untested;
- ``invalid``: the control proves nothing as written: its find text does not match exactly
  once, a listed test does not exist or already fails without the edit (baseline), the edited
  file no longer imports, or pytest exited 2-5 (collection or usage error);
- ``timeout``: pytest ran longer than the control's timeout and was killed;
- ``not_run``: a run with a time budget (``budget``) had spent it before the control's turn.
  It proves nothing either way and fails nothing; the run says which were not run.

A control whose pytest run ends invalid (a crash, an interruption) or timed out is run once
more, and a listed test that fails on the unmodified baseline is run once more alone: one
flaky run on a loaded machine must not fail CI, and every second attempt is said on stderr
(``retried``, ``FLAKY``) and kept in the JSON (``attempts``), never hidden.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from secagg.audit import _pytest_plugin
from secagg.audit._workspace import PLUGIN_MODULE, Workspace, subprocess_env
from secagg.audit.controls import AuditError, Control, ControlError, function_id, problems

RESULTS = ("caught", "missed", "invalid", "timeout", "not_run")
# (`-m ""`: a test a control names is run whatever its marks; the project's own `-m 'not
# slow'` deselected a slow one, and its control could never run)
# defence: audit.listed-slow-tests-run
PYTEST_ARGS = ("-q", "-p", "no:cacheprovider", "-m", "")


@dataclass(frozen=True)
class PytestRun:
    exit_code: int | None  # None: killed at the timeout
    output: str
    seconds: float
    outcomes: dict[str, str]  # node id -> passed / failed / error / skipped
    collection_errors: dict[str, str]
    flaky: tuple[str, ...] = ()  # (the baseline's: failed, then passed when run again)
    imported: dict[str, str] = field(default_factory=dict)  # module -> file (MODULES_ENV)

    def failed(self) -> list[str]:
        return [k for k, v in self.outcomes.items() if v in ("failed", "error")]


# the pytest processes running now (each in its own session): ended with the run, however
# it ends (a SIGTERM ended the runner and left them running, orphans, for up to a
# control's timeout)
_running: dict[int, str] = {}  # pid -> its run's mark (SECAGG_AUDIT_RUN)
_running_lock = threading.Lock()
_stopping = threading.Event()


def stop_running() -> None:
    """Kill every pytest process group this process started and has not seen end, and start
    no more (the controls still queued end at once)."""
    _stopping.set()
    with _running_lock:
        runs = list(_running.items())
    for pid, token in runs:
        # defence: audit.sigterm-stops-the-tests
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _pytest_plugin.kill_marked(token)


def run_pytest(ws: Workspace, copy: Path, args: Sequence[str], *,
               timeout: float, modules: Sequence[str] = ()) -> PytestRun:
    """``python -m pytest ARGS`` with cwd and PYTHONPATH = ``copy``, recording each test's
    outcome (and where it imported ``modules`` from, those it imported); the whole process
    group is killed at the timeout."""
    if _stopping.is_set():
        raise AuditError("the run was stopped")
    fd, name = tempfile.mkstemp(prefix="outcomes-", suffix=".json", dir=ws.dir)
    os.close(fd)
    # The lifeline: pytest holds its read end, this process alone its write end. Were this
    # process killed (SIGKILL: no handler runs), the kernel closes the write end and the
    # plugin in pytest, reading end of file, ends its run (see _pytest_plugin).
    life_read, life_write = os.pipe()
    # every process of this run carries it, also one that leaves pytest's process group
    token = secrets.token_hex(16)
    began = time.perf_counter()
    try:
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
            [sys.executable, "-m", "pytest", "-p", PLUGIN_MODULE, *args], cwd=copy,
            env=subprocess_env(copy, {_pytest_plugin.ENV: name,
                                      _pytest_plugin.LIFELINE_ENV: str(life_read),
                                      _pytest_plugin.RUN_ENV: token,
                                      _pytest_plugin.MODULES_ENV: ",".join(modules)},
                               ws.plugin_dir),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, pass_fds=(life_read,))
    except BaseException:
        os.close(life_write)
        raise
    finally:
        os.close(life_read)
    try:
        with _running_lock:
            _running[proc.pid] = token
            if _stopping.is_set():  # (stopped as it started)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code = None
    finally:
        with _running_lock:
            _running.pop(proc.pid, None)
        os.close(life_write)
        # what the run left behind, in its group or in a session of its own (a test's
        # server that outlived it, or all of a killed run), ends with it: it held CPU and
        # ports through the controls after it (by its mark: pytest's pid is reaped by now,
        # and could be another's)
        # defence: audit.run-ends-its-own-sessions
        _pytest_plugin.kill_marked(token)
    seconds = time.perf_counter() - began
    try:
        data = json.loads(Path(name).read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        data = {}
    finally:
        Path(name).unlink(missing_ok=True)
    imported = data.get("imported", {})
    return PytestRun(code, out, seconds, dict(data.get("outcomes", {})),
                     dict(data.get("collection_errors", {})),
                     imported=dict(imported) if isinstance(imported, dict) else {})


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def matching(node_id: str, outcomes: Mapping[str, str]) -> dict[str, str]:
    """The outcomes of ``node_id``: itself if it names one parameter set, else every parameter
    set of the test function."""
    if node_id.endswith("]"):
        return {k: v for k, v in outcomes.items() if k == node_id}
    fid = function_id(node_id)
    return {k: v for k, v in outcomes.items() if function_id(k) == fid}


def failing(run: PytestRun, node_ids: Iterable[str]) -> list[str]:
    """Listed tests that did not pass in ``run`` (or were never collected)."""
    bad = []
    for t in node_ids:
        found = matching(t, run.outcomes)
        if not found:
            bad.append(f"{t} (not collected)")
        bad.extend(f"{k} ({v})" for k, v in sorted(found.items()) if v != "passed")
    return bad


_suites = itertools.count(1)


# what the listed tests may take, unmodified, in one run: every end-to-end test a control
# lists runs in it (600 s was passed by 1,146 listed tests, half of them end-to-end, and every
# control came out invalid; the whole default suite takes about 16 minutes)
BASELINE_SECONDS = 1800.0
IMPORT_CHECK_SECONDS = 120.0  # (the import check after a control's tests, at most)


def _shards(listed: Sequence[str], jobs: int) -> list[list[str]]:
    """``listed`` in at most ``jobs`` runs, each test file's tests in one run (its module
    and its fixtures set up once), the runs of about the same weight (an end-to-end test, a
    subprocess's start or more, weighs ten)."""
    by_file: dict[str, list[str]] = {}
    for t in listed:
        by_file.setdefault(t.split("::", 1)[0], []).append(t)

    def weight(path: str) -> int:
        return len(by_file[path]) * (10 if "/e2e/" in f"/{path}" else 1)

    shards: list[tuple[int, list[str]]] = [(0, []) for _ in range(max(1, jobs))]
    for path in sorted(by_file, key=lambda p: (-weight(p), p)):
        i = min(range(len(shards)), key=lambda k: shards[k][0])
        shards[i] = (shards[i][0] + weight(path), shards[i][1] + by_file[path])
    return [tests for _, tests in shards if tests] or [[]]


_RANK = _pytest_plugin._RANK  # (the plugin's order of outcomes, worst last)


def merged(runs: Sequence[PytestRun]) -> PytestRun:
    """One run of several side by side: every outcome, the worst exit (killed, then a crash
    or usage error, then a failure), the longest time."""
    if len(runs) == 1:
        return runs[0]
    codes = [r.exit_code for r in runs]
    code: int | None
    if None in codes:
        code = None
    else:
        code = max((c for c in codes if c is not None),
                   key=lambda c: (c not in (0, 1), c != 0))
    outcomes: dict[str, str] = {}
    for r in runs:  # (a test run in two, its worst outcome)
        for k, v in r.outcomes.items():
            if _RANK.get(v, 3) >= _RANK.get(outcomes.get(k, "passed"), 3):
                outcomes[k] = v
    return PytestRun(code, "\n".join(r.output for r in runs), max(r.seconds for r in runs),
                     outcomes, {k: v for r in runs for k, v in r.collection_errors.items()},
                     flaky=tuple(sorted({t for r in runs for t in r.flaky})))


def load_outcomes(path: Path) -> PytestRun:
    """The outcomes the plugin recorded in ``path`` (SECAGG_AUDIT_OUTCOMES), as a run."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        outcomes = data["outcomes"]
        if not isinstance(outcomes, dict) or not all(
                isinstance(k, str) and v in _RANK for k, v in outcomes.items()):
            raise ValueError("its outcomes are not test ids and outcomes")
        code = data.get("exit_status")
        return PytestRun(code if isinstance(code, int) else 1, "", 0.0, dict(outcomes),
                         dict(data.get("collection_errors") or {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise AuditError(f"cannot read the outcomes in {path}: {e}") from None


def run_suite(ws: Workspace, paths: Sequence[str], *, timeout: float) -> PytestRun:
    """Run ``paths`` unmodified in a copy of the base of its own (never the base: a test that
    writes a repository file would change what every later control tests), recording every
    test's outcome (a module that fails to import does not stop the others)."""
    # defence: audit.baseline-in-a-copy-of-its-own
    copy = ws.pristine_copy(f"suite-{next(_suites)}")
    try:
        return run_pytest(ws, copy, [*PYTEST_ARGS, "--continue-on-collection-errors", *paths],
                          timeout=timeout)
    finally:
        ws.remove_copy(copy)


@dataclass
class ControlResult:
    control: Control
    result: str
    seconds: float = 0.0
    detail: str = ""  # the failing test when caught; the reason otherwise
    exit_code: int | None = None
    output_tail: str = ""
    failed_tests: list[str] = field(default_factory=list)  # node ids that failed with the edit
    attempts: int = 1
    first_attempt: str = ""  # what the first attempt came to, when there were two
    # caught: how the listed test failed, pytest's first "E" line (a NameError, not an
    # assertion, says the edit broke the code rather than removed a defence: an auditor saw
    # no difference between the two)
    failure: str = ""

    def to_json(self) -> dict[str, Any]:
        c = self.control
        out: dict[str, Any] = {
            "id": c.id, "defence": c.defence, "file": c.file, "tests": list(c.tests),
            "result": self.result, "seconds": round(self.seconds, 2), "detail": self.detail,
            "exit_code": self.exit_code, "failed_tests": self.failed_tests,
            "attempts": self.attempts,
        }
        if self.first_attempt:
            out["first_attempt"] = self.first_attempt
        if self.failure:
            out["failure"] = self.failure
        if self.result != "caught" and self.output_tail:
            out["output_tail"] = self.output_tail
        return out


@dataclass
class ControlsRun:
    results: list[ControlResult]
    baseline: PytestRun | None
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        total = len(self.results)
        by = {r: [x for x in self.results if x.result == r] for r in RESULTS}
        caught = len(by["caught"])
        ran = total - len(by["not_run"])
        return {
            "caught": caught,
            "total": total,
            "ran": ran,
            # (none ran: no percentage, never "100%" of nothing)
            # defence: audit.no-percent-of-nothing
            "percent": round(100.0 * caught / ran, 1) if ran else None,
            **{r: len(by[r]) for r in RESULTS if r != "caught"},
            "misses": [{"id": x.control.id, "defence": x.control.defence} for x in by["missed"]],
            "invalid_controls": [{"id": x.control.id, "detail": x.detail} for x in by["invalid"]],
            "timeouts": [{"id": x.control.id, "seconds": round(x.seconds, 1)}
                         for x in by["timeout"]],
            "not_run_controls": [x.control.id for x in by["not_run"]],
        }

    @property
    def all_caught(self) -> bool:
        """Every control that ran was caught (one a budget left out proves nothing either
        way: the run names it)."""
        return all(r.result in ("caught", "not_run") for r in self.results)

    def to_json(self) -> dict[str, Any]:
        baseline = None
        if self.baseline is not None:
            listed = sorted({t for r in self.results for t in r.control.tests})
            baseline = {"tests": len(listed), "seconds": round(self.baseline.seconds, 2),
                        "failing": failing(self.baseline, listed),
                        "flaky": list(self.baseline.flaky)}
        return {**self.settings, "seconds": round(self.seconds, 1), "baseline": baseline,
                "controls": [r.to_json() for r in self.results], "summary": self.summary()}


class Progress:
    """The table on stderr: one line per control as it finishes."""

    def __init__(self, stream: TextIO | None, total: int) -> None:
        self.stream = stream
        self.total = total
        self.done = 0
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        if self.stream is not None:
            with self._lock:
                print(text, file=self.stream, flush=True)

    def header(self) -> None:
        self.say(f"{'':>9}  {'result':<8}{'seconds':>8}  {'control':<44}failing test / reason")

    def result(self, r: ControlResult) -> None:
        with self._lock:
            self.done += 1
            n = self.done
        width = len(str(self.total))
        detail = r.detail
        if r.result == "caught" and detail:
            detail = function_id(detail) + ("[...]" if detail.endswith("]") else "")
        detail = detail if len(detail) <= 90 else detail[:87] + "..."
        self.say(f"  [{n:>{width}}/{self.total}]  {r.result:<8}{r.seconds:>8.1f}  "
                 f"{r.control.id:<44}{detail}")
        if "SUSPECT" in r.failure:  # (said under its line: the table stays readable)
            self.say(f"      {r.failure}")


class ControlRunner:
    """Runs controls in a :class:`Workspace`, ``jobs`` at a time.

    With ``stop_at_first`` (the default) pytest runs with ``-x``: a control is settled by its
    first failing test. Without it every listed test runs under every control, so that the
    report can say exactly which tests catch which control.
    """

    def __init__(self, workspace: Workspace, *, jobs: int = 2, timeout: float = 300.0,
                 progress: TextIO | None = None, stop_at_first: bool = True,
                 budget: float | None = None) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.ws = workspace
        self.jobs = jobs
        self.timeout = timeout
        self.stream = progress
        self.stop_at_first = stop_at_first
        self._progress: Progress | None = None
        self._flaky: tuple[str, ...] = ()  # the baseline's flaky tests
        self.given: PytestRun | None = None  # outcomes of a run of this tree (baseline_from)
        # seconds from the run's start after which no control starts (CI's time limit: a
        # run that went past it failed CI with every control caught)
        self.budget = budget
        self._deadline = math.inf

    def _say(self, text: str) -> None:
        if self.stream is not None:
            print(text, file=self.stream, flush=True)

    def check_base(self) -> None:
        error = self.ws.check_imports(self.ws.base)
        if error is not None:
            raise AuditError(f"the unmodified repository does not import: {error}")

    def baseline(self, controls: Sequence[Control]) -> PytestRun:
        """Run the union of the listed tests on the unmodified base copy (those whose
        outcomes were given, ``given``, are not run again)."""
        listed = sorted({t for c in controls for t in c.tests})
        if self.given is not None:
            return self._given_baseline(listed, self.given)
        return self._run_baseline(listed)

    def _given_baseline(self, listed: list[str], given: PytestRun) -> PytestRun:
        """The listed tests' outcomes from a run of this work tree (CI's default run, which
        ran them all but the slow ones): its twelve minutes were the baseline's, again.
        Those it did not run are run; those that did not pass in it are run once more alone,
        as a baseline's."""
        have = [t for t in listed if matching(t, given.outcomes)]
        rest = [t for t in listed if not matching(t, given.outcomes)]
        self._say(f"baseline: the outcomes of {len(have)} of the {len(listed)} listed tests "
                  "are given (--baseline-from)")
        run = replace(given, outcomes={k: v for t in have
                                       for k, v in matching(t, given.outcomes).items()})
        bad = failing(run, have)
        if bad:
            run, bad = self._baseline_again(run, have, bad)
        self._say(f"baseline: {len(have) - len(bad)}/{len(have)} of them passed")
        for f in bad:
            self._say(f"  FAILS WITHOUT ANY EDIT: {f}")
        return merged([run, self._run_baseline(rest)]) if rest else run

    def _run_baseline(self, listed: list[str]) -> PytestRun:
        shards = _shards(listed, self.jobs)
        self._say(f"baseline: running the {len(listed)} listed tests unmodified"
                  f"{f' ({len(shards)} runs side by side)' if len(shards) > 1 else ''} ...")
        # (as the controls run: one pytest a core; a single run left a core idle for the
        # baseline's twelve minutes)
        with ThreadPoolExecutor(max_workers=len(shards)) as pool:
            run = merged(list(pool.map(
                lambda shard: run_suite(self.ws, shard,
                                        timeout=max(self.timeout, BASELINE_SECONDS)),
                shards)))
        if run.exit_code not in (0, 1):
            self._say(f"baseline: pytest exited with {run.exit_code}:\n{_tail(run.output)}")
        bad = failing(run, listed)
        if bad and run.exit_code is not None:
            run, bad = self._baseline_again(run, listed, bad)
        self._say(f"baseline: {len(listed) - len(bad)}/{len(listed)} listed tests pass "
                  f"unmodified ({run.seconds:.1f} s)")
        for f in bad:
            self._say(f"  FAILS WITHOUT ANY EDIT: {f}")
        return run

    def run(self, controls: Sequence[Control], baseline: PytestRun | None = None) -> ControlsRun:
        """Every control's result, in the order given. A control whose listed tests do not
        all pass on the baseline is invalid (it could not prove anything)."""
        began = time.perf_counter()
        self._deadline = math.inf if self.budget is None else began + self.budget
        self.check_base()
        # a listed test that does not exist would make pytest refuse the whole baseline run
        static = problems(self.ws.base, controls)
        spent = self.budget is not None and self.budget <= 0  # (no control will run)
        if baseline is None and spent:
            baseline = PytestRun(0, "", 0.0, {}, {})  # (none needed)
        elif baseline is None:
            baseline = self.baseline([c for c in controls if c.id not in static])
        self._flaky = baseline.flaky
        results: dict[str, ControlResult] = {}
        progress = self._progress = Progress(self.stream, len(controls))
        progress.header()
        runnable = []
        for c in controls:
            reasons = static.get(c.id, [])
            # defence: audit.budget-spent-runs-no-baseline
            bad = [] if spent else failing(baseline, c.tests)
            if bad and not reasons:
                reasons = ["listed test fails without the edit: " + ", ".join(bad)]
            if reasons:
                results[c.id] = ControlResult(c, "invalid", detail="; ".join(reasons))
                progress.result(results[c.id])
            else:
                runnable.append(c)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for c, r in zip(runnable, pool.map(self._run_one, runnable,
                                               range(len(runnable))), strict=True):
                results[c.id] = r
        return ControlsRun([results[c.id] for c in controls], baseline,
                           time.perf_counter() - began)

    def _baseline_again(self, run: PytestRun, listed: Sequence[str],
                        bad: list[str]) -> tuple[PytestRun, list[str]]:
        """Run the listed tests that failed on the baseline once more, alone; one that passes
        then is flaky (said), not a reason to call its controls invalid."""
        again = sorted({t for t in listed if failing(run, [t])})
        self._say(f"baseline: running the {len(again)} failing listed tests once more ...")
        second = run_suite(self.ws, again, timeout=max(self.timeout, BASELINE_SECONDS))
        outcomes = dict(run.outcomes)
        for t in again:
            outcomes.update(matching(t, second.outcomes))
        merged = PytestRun(run.exit_code, run.output, run.seconds + second.seconds, outcomes,
                           {**run.collection_errors, **second.collection_errors})
        still = failing(merged, listed)
        flaky = sorted(f.rsplit(" (", 1)[0] for f in set(bad) - set(still))
        for f in flaky:
            self._say(f"  FLAKY (failed, then passed when run again): {f}")
        # (kept in the run, so the report says it and a control it "catches" is confirmed)
        # defence: audit.flaky-baseline-kept
        return replace(merged, flaky=tuple(flaky)), still

    def _run_one(self, control: Control, index: int) -> ControlResult:
        # defence: audit.budget-starts-nothing-after-it
        if time.perf_counter() >= self._deadline:
            return ControlResult(control, "not_run", detail="the run's time budget was spent")
        result = self._attempt(control, index)
        # a run stopped (SIGTERM, Ctrl-C) killed its tests: no retry, no line blaming them
        # defence: audit.stopped-run-retries-nothing
        if _stopping.is_set():
            return result
        # nor once the budget is spent: a second attempt is a start, and CI's limit is hard
        # (the first attempt's result stands, and a timeout still fails the run)
        # defence: audit.budget-retries-nothing-after-it
        if time.perf_counter() >= self._deadline:
            if self._progress is not None:
                self._progress.result(result)
            return result
        # caught only by tests that were flaky on the baseline: it may be their flakiness,
        # not the edit (a comment-only control came out "caught"); confirmed by a second run
        flaky = {function_id(f) for f in self._flaky}
        # defence: audit.caught-by-flaky-tests-confirmed
        confirm = (result.result == "caught" and bool(result.failed_tests)
                   and all(function_id(t) in flaky for t in result.failed_tests))
        if confirm or result.result == "timeout" or (result.result == "invalid"
                                                     and result.exit_code is not None):
            first = f"{result.result}: {result.detail}"
            if self._progress is not None:
                self._progress.say(f"  retried {control.id}: its first attempt was {first}")
            result = self._attempt(control, index)
            result.attempts = 2
            result.first_attempt = first
        if self._progress is not None:
            self._progress.result(result)
        return result

    def _attempt(self, control: Control, index: int) -> ControlResult:
        began = time.perf_counter()
        try:
            edited = control.apply((self.ws.base / control.file).read_text(encoding="utf-8"))
        except (ControlError, OSError) as e:
            return ControlResult(control, "invalid", detail=str(e))
        copy = self.ws.make_copy(f"{index:03d}-{control.id}", control.file, edited)
        timeout = control.timeout or self.timeout
        modules = self.ws.modules_to_check(control.file)
        try:
            args = ["-x", *PYTEST_ARGS] if self.stop_at_first else [*PYTEST_ARGS]
            run = run_pytest(self.ws, copy, [*args, *control.tests], modules=modules,
                             timeout=max(1.0, timeout - (time.perf_counter() - began)))
            # the tests imported the edited module from the copy, in their own process: it
            # imports, and the copy's code was tested. Only one they did not import (it
            # failed to, or only a subprocess of theirs did) is imported in an interpreter
            # of its own: one for every control was a third of the controls' time. What
            # they did import is checked first (from outside the copy, the run stops).
            # defence: audit.tests-imports-resolve-in-the-copy
            self.ws.check_resolved(copy, run.imported,
                                   [m for m in modules if m in run.imported])
            # (not once the run is stopped: its killed tests recorded nothing)
            # defence: audit.edited-module-import-checked
            if not all(m in run.imported for m in modules) and not _stopping.is_set():
                error = self.ws.check_imports(copy, control.file,
                                              timeout=min(timeout, IMPORT_CHECK_SECONDS))
                if error is not None:
                    return ControlResult(control, "invalid", time.perf_counter() - began,
                                         detail=f"the edited {control.file} no longer "
                                                f"imports: {error}")
        finally:
            self.ws.remove_copy(copy)
        return classify(control, run, time.perf_counter() - began, timeout)


_SUSPECT = ("NameError", "UnboundLocalError", "ImportError", "ModuleNotFoundError",
            "SyntaxError", "IndentationError")


def _first_error(output: str) -> str:
    """pytest's first "E" line (the exception a failing test ended with), cut short; said as
    suspect when it is one an edit that breaks the code raises."""
    line = next((ln.removeprefix("E").strip() for ln in output.splitlines()
                 if ln.startswith("E ") and ln.removeprefix("E").strip()), "")
    line = line if len(line) <= 200 else line[:197] + "..."
    if line.split(":", 1)[0].rsplit(".", 1)[-1] in _SUSPECT:
        return f"{line} (SUSPECT: the edit may break the code, not remove a defence)"
    return line


def classify(control: Control, run: PytestRun, seconds: float, timeout: float) -> ControlResult:
    """caught / missed / invalid / timeout from a pytest run on the edited copy."""
    tail = _tail(run.output)
    # only a listed test's failure counts (a test the repository's own pytest configuration
    # adds, failing whatever the edit, made a control "caught")
    # defence: audit.caught-by-a-listed-test
    failed = sorted({k for t in control.tests for k, v in matching(t, run.outcomes).items()
                     if v in ("failed", "error")})
    if run.exit_code is None:
        return ControlResult(control, "timeout", seconds, detail=f"killed after {timeout:.0f} s",
                             output_tail=tail, failed_tests=failed)
    # (pytest's status alone said "caught" for an edit that ended the run with no test
    # failing, e.g. one that made the process exit: a listed test must have failed)
    # defence: audit.caught-needs-a-failed-test
    if run.exit_code == 1 and failed:
        # defence: audit.caught-says-how
        return ControlResult(control, "caught", seconds, detail=failed[0],
                             exit_code=1, failed_tests=failed, failure=_first_error(run.output))
    if run.exit_code == 1:
        return ControlResult(control, "invalid", seconds, exit_code=1, output_tail=tail,
                             detail="pytest failed, but no listed test did (the edit "
                                    "stopped the run itself?)")
    if run.exit_code == 0:
        return ControlResult(control, "missed", seconds,
                             detail="every listed test passes without the defence",
                             exit_code=0, output_tail=tail)
    kind = {2: "interrupted or collection error", 3: "internal error", 4: "usage error",
            5: "no tests collected"}.get(run.exit_code, "crashed")
    detail = f"pytest exit code {run.exit_code} ({kind})"
    errors = [ln for ln in run.output.splitlines() if ln.startswith(("E ", "ERROR"))]
    if errors:
        detail += ": " + errors[0].removeprefix("E").strip()
    return ControlResult(control, "invalid", seconds, detail=detail, exit_code=run.exit_code,
                         output_tail=tail, failed_tests=failed)
