"""``secagg threat-model {controls,run}``: registered on the main parser by :func:`add_parser`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from secagg.audit.controls import (
    CONTROLS_FILE,
    MAX_TIMEOUT,
    AuditError,
    Control,
    load_controls,
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT:  # (inf was a traceback)
        raise argparse.ArgumentTypeError(f"must be > 0 and at most {MAX_TIMEOUT:.0f}, got {text}")
    return value


def _budget(text: str) -> float:
    """A budget in seconds: zero or less (a CI that had spent its time before the controls)
    runs none of them, and says so."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if value != value or value > MAX_TIMEOUT:  # (nan; inf)
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT:.0f}, got {text}")
    return max(0.0, value)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``threat-model`` with its ``controls`` and ``run`` subcommands."""
    tm = subparsers.add_parser(
        "threat-model", help="weakened-build controls and the threat-model report",
        description="Prove the security tests can fail: remove each defence in a copy of the "
                    "repository and check that the tests listed for it then fail.")
    sub = tm.add_subparsers(dest="threat_model_command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repo", type=Path, default=None,
                        help="repository root (default: the git work tree of the current "
                             "directory)")
    common.add_argument("--controls", type=Path, default=None,
                        help=f"controls file (default: REPO/{CONTROLS_FILE})")
    common.add_argument("--jobs", type=_positive_int, default=2,
                        help="controls run concurrently (default: 2)")
    common.add_argument("--timeout", type=_positive_float, default=300.0,
                        help="seconds per control before it is killed (default: 300)")
    common.add_argument("--keep", action="store_true",
                        help="keep the temporary copies (their path is printed) for debugging")

    controls = sub.add_parser(
        "controls", parents=[common], help="run the weakened-build controls",
        description="Run each control: apply its edit in a copy, run its tests, and report "
                    "caught / missed / invalid / timeout. Exit status 0 only if all are caught.")
    controls.add_argument("--only", nargs="+", metavar="ID", default=None,
                          help="run only these control ids")
    controls.add_argument("--files", nargs="+", metavar="PATH", default=None,
                          help="run only the controls whose file is one of these (for CI on a "
                               "change: --files $(git diff --name-only main))")
    controls.add_argument("--baseline-from", type=Path, nargs="+", default=None, metavar="FILE",
                          help="the listed tests' outcomes from runs of this same work tree, "
                               "as recorded by `SECAGG_AUDIT_OUTCOMES=FILE pytest -p "
                               "secagg.audit._pytest_plugin` (CI's default run): those tests "
                               "are not run again for the baseline")
    controls.add_argument("--budget", type=_budget, default=None, metavar="SECONDS",
                          help="start no control after SECONDS (CI's time limit); the controls "
                               "then run newest first (those whose entry, edited file or "
                               "tests changed most recently), and those left are named as not "
                               "run, which fails nothing")
    controls.add_argument("--list", action="store_true",
                          help="list the selected controls and exit without running them")
    controls.add_argument("--json", action="store_true",
                          help="print the results as JSON on stdout (progress stays on stderr)")
    controls.set_defaults(func=_controls_command)

    run = sub.add_parser(
        "run", parents=[common], help="run tests/threat_model/ and the controls; write a report",
        description="Run the threat-model suite and every control, then write "
                    "DIR/threat-model-report.md and DIR/threat-model-report.json.")
    run.add_argument("--out", type=Path, required=True, metavar="DIR",
                     help="directory for the report")
    run.set_defaults(func=_run_command)


def _root(args: argparse.Namespace) -> Path:
    from secagg.audit._workspace import repository_root

    return repository_root((args.repo or Path.cwd()).resolve())


def _load(args: argparse.Namespace, root: Path) -> list[Control]:
    return load_controls(args.controls or root / CONTROLS_FILE)


def _relative(root: Path, text: str) -> str:
    """A --files path as a control names its file: relative to the repository's root, as
    `git diff --name-only` prints it, wherever the command runs from (from a sub-directory
    it was read against that, and every control went unselected, status 0)."""
    path = Path(text)
    # defence: audit.files-from-the-root
    candidates = [path] if path.is_absolute() else [root / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.exists() and candidate.resolve().is_relative_to(root.resolve()):
            return candidate.resolve().relative_to(root.resolve()).as_posix()
    return path.as_posix()


def select(controls: list[Control], only: list[str] | None, files: list[str] | None,
           root: Path) -> list[Control]:
    chosen = controls
    if only:
        known = {c.id for c in controls}
        unknown = [i for i in only if i not in known]
        if unknown:
            raise AuditError(f"unknown control id(s): {', '.join(unknown)}")
        chosen = [c for c in chosen if c.id in set(only)]
    if files is not None:
        wanted = {_relative(root, f) for f in files}
        # (a typo or a directory selected nothing, and the run said "100%" of nothing with
        # status 0: a path that is no file is an error; a file no control edits is not, as
        # `--files $(git diff --name-only main)` names such files)
        # defence: audit.files-must-be-files
        missing = sorted(w for w in wanted if not (root / w).is_file()
                         and not any(c.file == w for c in controls))
        if missing:
            raise AuditError(f"--files names no file of the repository: {', '.join(missing)}")
        chosen = [c for c in chosen if c.file in wanted]
        # (an id asked for by --only, dropped by --files, was silently not run)
        # defence: audit.only-not-dropped-by-files
        if only and len(chosen) < len(set(only)):
            dropped = sorted(set(only) - {c.id for c in chosen})
            raise AuditError(f"--only names controls of files --files leaves out: "
                             f"{', '.join(dropped)}")
    return chosen


def _settings(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from secagg.audit._workspace import revision

    commit, dirty = revision(root)
    return {"repository": {"root": str(root), "commit": commit, "dirty": dirty},
            "controls_file": str(args.controls or CONTROLS_FILE), "jobs": args.jobs,
            "timeout": args.timeout}


@contextlib.contextmanager
def _end_through_finally_on_sigterm() -> Iterator[None]:
    """A SIGTERM (CI's timeout, an operator) ends the run through its ``finally`` blocks, so
    the throw-away copies in the temporary directory are removed (killed by the default
    action, a run left them behind)."""
    import signal

    from secagg.audit.runner import stop_running

    def end(signum: int, _frame: object) -> None:
        # (the controls' pytest processes run in sessions of their own: a SIGTERM ended
        # the runner and left them running, and the queued controls still started; a
        # Ctrl-C, which the terminal sends to the runner's group alone, waited for them,
        # up to a control's timeout, and then retried them: an auditor's finding)
        # defence: audit.sigint-stops-the-tests
        stop_running()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(128 + signum)

    try:
        before = signal.signal(signal.SIGTERM, end)
    except ValueError:  # (not the main thread: left as it is)
        yield
        return
    before_int = signal.signal(signal.SIGINT, end)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, before_int)


def _controls_command(args: argparse.Namespace) -> int:
    with _end_through_finally_on_sigterm():
        return _controls(args)


def _controls(args: argparse.Namespace) -> int:
    from secagg.audit._recency import newest_first
    from secagg.audit._workspace import Workspace
    from secagg.audit.runner import ControlRunner, load_outcomes, merged

    try:
        root = _root(args)
        chosen = select(_load(args, root), args.only, args.files, root)
        order = ""
        if args.budget is not None:
            chosen, why = newest_first(root, args.controls or root / CONTROLS_FILE, chosen)
            order = f" (the file's order: {why})" if why else " (the newest first)"
        if args.list:
            for c in chosen:
                print(f"{c.id:<44} {c.file:<32} {c.defence}")
            return 0
        if not chosen:
            # (only files no control edits, as a change's `git diff` may name: nothing to
            # run; the paths were checked to be files, the ids to be run, in select())
            print("secagg threat-model: no control edits the files given", file=sys.stderr)
            if args.json:
                print(json.dumps({**_settings(args, root), "controls": [],
                                  "summary": {"caught": 0, "total": 0, "ran": 0, "not_run": 0,
                                              "percent": None}}))
            return 0
        budget = "" if args.budget is None else f", budget {args.budget:.0f} s{order}"
        print(f"secagg threat-model controls: {len(chosen)} controls, {args.jobs} jobs, "
              f"timeout {args.timeout:.0f} s{budget}", file=sys.stderr)
        with Workspace(root, keep=args.keep) as ws:
            print(f"workspace: {ws.dir} ({len(ws.files)} files, uncommitted work included)",
                  file=sys.stderr)
            runner = ControlRunner(ws, jobs=args.jobs, timeout=args.timeout, progress=sys.stderr,
                                   budget=args.budget)
            if args.baseline_from:
                runner.given = merged([load_outcomes(f) for f in args.baseline_from])
            result = runner.run(chosen)
        result.settings = _settings(args, root)
    except AuditError as e:
        print(f"secagg threat-model: error: {e}", file=sys.stderr)
        return 2
    s = result.summary()
    percent = "no control ran" if s["percent"] is None else f"{s['percent']:.1f}%"
    print(f"caught {s['caught']}/{s['ran']} ({percent}), {s['missed']} missed, "
          f"{s['invalid']} invalid, {s['timeout']} timed out, in {result.seconds:.1f} s",
          file=sys.stderr)
    if s["not_run"]:
        # (never silent: what a budget left out is named, and by how to run it)
        # defence: audit.budget-names-what-it-left
        print(f"  NOT RUN: {s['not_run']} of {s['total']} controls, the budget of "
              f"{args.budget or 0:.0f} s was spent (those changed longest ago; run them with "
              "--only):", file=sys.stderr)
        ids = s["not_run_controls"]
        for i in range(0, len(ids), 4):
            print("    " + " ".join(ids[i:i + 4]), file=sys.stderr)
    for m in s["misses"]:
        print(f"  MISSED {m['id']}: {m['defence']}", file=sys.stderr)
    # repeated after the table: a CI log often keeps only its tail
    for m in s["invalid_controls"]:
        print(f"  INVALID {m['id']}: {m['detail']}", file=sys.stderr)
    for m in s["timeouts"]:
        print(f"  TIMED OUT {m['id']} after {m['seconds']} s", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    return 0 if result.all_caught else 1


def _run_command(args: argparse.Namespace) -> int:
    with _end_through_finally_on_sigterm():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from secagg.audit.report import build_report, prepare_out, write_report

    began = time.perf_counter()
    try:
        # defence: audit.out-checked-first
        prepare_out(args.out)
        root = _root(args)
        controls = _load(args, root)
        print(f"secagg threat-model run: {len(controls)} controls, {args.jobs} jobs",
              file=sys.stderr)
        report = build_report(root, controls, jobs=args.jobs, timeout=args.timeout,
                              keep=args.keep, progress=sys.stderr,
                              settings=_settings(args, root))
        md, js = write_report(report, args.out)
    except AuditError as e:
        print(f"secagg threat-model: error: {e}", file=sys.stderr)
        return 2
    c = report.counts()
    s = report.controls.summary()
    print(f"threat model: {c['passed']}/{c['tests']} attacks defeated; controls caught "
          f"{s['caught']}/{s['total']} ({s['percent']:.1f}%); {time.perf_counter() - began:.0f} s",
          file=sys.stderr)
    print(f"wrote {os.path.relpath(md)} and {os.path.relpath(js)}", file=sys.stderr)
    return 0 if report.ok else 1
