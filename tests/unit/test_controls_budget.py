"""The weakened-build controls within a time budget, the newest first, and faster copies.

CI's controls ran past its 90 minutes on a slow evening and failed with every control caught.
With ``--budget`` the run starts no control once the budget is spent, runs the controls that
changed most recently first (their entry, the file they edit, the tests they list), and names
each one it left out. The copies also get pytest's rewritten test modules, compiled once, and
are made in memory (/dev/shm) where there is one: a copy took 0.85 s on this machine's disk.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from secagg.audit import runner as runner_module
from secagg.audit._recency import newest_first
from secagg.audit.controls import Control, Edit, parse_controls
from secagg.audit.runner import ControlResult, ControlRunner, ControlsRun, PytestRun


class _Workspace:
    base = Path("/nonexistent")

    def check_imports(self, *a: Any, **k: Any) -> None:
        return None


def _control(cid: str, file: str = "secagg/x.py", test: str = "tests/test_x.py::test_x"
             ) -> Control:
    return Control(id=cid, defence="d", file=file, edits=(Edit("a", "b"),), tests=(test,))


def test_a_spent_budget_starts_no_control_and_the_run_says_which_were_not_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []

    def attempt(self: Any, c: Control, i: int) -> ControlResult:
        started.append(c.id)
        time.sleep(1.5)
        return ControlResult(c, "caught", detail=c.tests[0], exit_code=1,
                             failed_tests=list(c.tests))

    monkeypatch.setattr(ControlRunner, "_attempt", attempt)
    monkeypatch.setattr(runner_module, "problems", lambda root, controls: {})
    controls = [_control(f"demo.c{i}") for i in range(3)]
    given = PytestRun(0, "", 0.0, {c.tests[0]: "passed" for c in controls}, {})
    run = ControlRunner(_Workspace(), jobs=1, budget=1.0,  # type: ignore[arg-type]
                        progress=io.StringIO()).run(controls, baseline=given)
    assert started == ["demo.c0"]
    assert [r.result for r in run.results] == ["caught", "not_run", "not_run"]
    s = run.summary()
    assert (s["caught"], s["ran"], s["total"], s["not_run"]) == (1, 1, 3, 2)
    assert s["not_run_controls"] == ["demo.c1", "demo.c2"] and s["percent"] == 100.0
    assert run.all_caught  # (what was not run fails nothing; it is named)
    # without a budget every control runs
    started.clear()
    ControlRunner(_Workspace(), jobs=1,  # type: ignore[arg-type]
                  progress=io.StringIO()).run(controls, baseline=given)
    assert started == ["demo.c0", "demo.c1", "demo.c2"]
    # a budget spent before the run (CI's time gone): no control, no baseline, no "100%"
    started.clear()

    def no_baseline(*a: Any) -> PytestRun:
        raise AssertionError("a baseline ran for controls that will not run")

    monkeypatch.setattr(ControlRunner, "baseline", no_baseline)
    run = ControlRunner(_Workspace(), jobs=1, budget=0.0,  # type: ignore[arg-type]
                        progress=io.StringIO()).run(controls)
    assert started == [] and [r.result for r in run.results] == ["not_run"] * 3
    assert run.summary()["percent"] is None and run.summary()["ran"] == 0


def test_no_second_attempt_starts_once_the_budget_is_spent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry is a start: a timed-out control retried after the budget ran CI past its
    limit. Its first attempt's result stands (a timeout still fails the run)."""
    attempts: list[str] = []

    def attempt(self: Any, c: Control, i: int) -> ControlResult:
        attempts.append(c.id)
        time.sleep(1.5)
        return ControlResult(c, "timeout", detail="killed after 300 s")

    monkeypatch.setattr(ControlRunner, "_attempt", attempt)
    monkeypatch.setattr(runner_module, "problems", lambda root, controls: {})
    controls = [_control("demo.slow")]
    given = PytestRun(0, "", 0.0, {controls[0].tests[0]: "passed"}, {})
    run = ControlRunner(_Workspace(), jobs=1, budget=1.0,  # type: ignore[arg-type]
                        progress=io.StringIO()).run(controls, baseline=given)
    assert attempts == ["demo.slow"] and run.results[0].result == "timeout"
    assert run.results[0].attempts == 1 and not run.all_caught
    # within the budget it is retried, as before
    attempts.clear()
    ControlRunner(_Workspace(), jobs=1, budget=60.0,  # type: ignore[arg-type]
                  progress=io.StringIO()).run(controls, baseline=given)
    assert attempts == ["demo.slow", "demo.slow"]


def test_the_command_names_every_control_its_budget_left_out(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    from secagg.audit import _workspace
    from secagg.cli import main

    class Fake:
        dir = Path("/nonexistent")
        files: tuple[str, ...] = ()

        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def __enter__(self) -> Fake:
            return self

        def __exit__(self, *a: object) -> None:
            pass

    seen: dict[str, Any] = {}

    def run(self: ControlRunner, chosen: list[Control]) -> ControlsRun:
        seen["budget"], seen["ids"] = self.budget, [c.id for c in chosen]
        seen["given"] = None if self.given is None else self.given.outcomes
        results = [ControlResult(c, "caught" if i == 0 else "not_run",
                                 detail=c.tests[0] if i == 0 else "")
                   for i, c in enumerate(chosen)]
        return ControlsRun(results, None, 1.0)

    monkeypatch.setattr(_workspace, "Workspace", Fake)
    monkeypatch.setattr(ControlRunner, "run", run)
    root = tmp_path / "repo"
    (root / "secagg").mkdir(parents=True)
    (root / "secagg" / "x.py").write_text("a = 1\n")
    (root / "controls.toml").write_text("".join(
        _entry(f"c.n{i}", "secagg/x.py", "tests/test_x.py::test_x") for i in range(5)))
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "first")
    args = ["threat-model", "controls", "--repo", str(root), "--controls",
            str(root / "controls.toml")]
    assert main([*args, "--budget", "600", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["summary"]
    n = out["total"]
    assert n == 5 and seen["budget"] == 600.0 and out["not_run"] == n - 1 and out["ran"] == 1
    main([*args, "--budget", "600"])
    err = capsys.readouterr().err
    assert "caught 1/1 (100.0%)" in err and "budget 600 s (the newest first)" in err
    assert f"NOT RUN: {n - 1} of {n} controls, the budget of 600 s was spent" in err
    listed = err.split("--only):", 1)[1].split()
    assert sorted(listed) == sorted(seen["ids"][1:])
    # a budget already spent (CI's time gone before the controls): none run, each named
    assert main([*args, "--budget", "-5"]) == 0 and seen["budget"] == 0.0
    assert f"NOT RUN: {n - 1} of {n}" in capsys.readouterr().err
    # the outcomes of CI's default run and of its slow run, both taken
    files = []
    for name, test in (("default", "tests/test_x.py::test_x"), ("slow", "tests/test_y.py::t")):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps({"outcomes": {test: "passed"}, "exit_status": 0}))
    assert main([*args, "--baseline-from", *map(str, files)]) == 0
    assert seen["given"] == {"tests/test_x.py::test_x": "passed", "tests/test_y.py::t": "passed"}


def _git(repo: Path, *args: str, when: int = 4_000_000_000) -> None:
    env = {**os.environ, "GIT_AUTHOR_DATE": f"{when} +0000",
           "GIT_COMMITTER_DATE": f"{when} +0000", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True,
                   timeout=60)


def _git_repo_with_a_file(repo: Path) -> Path:
    (repo / "secagg").mkdir(parents=True)
    (repo / "secagg" / "__init__.py").write_text("")
    _git(repo, "init", "-q")
    return repo


def _entry(cid: str, file: str, test: str, replace: str = "b") -> str:
    return (f'[[control]]\nid = "{cid}"\ndefence = "d"\nfile = "{file}"\nfind = "a"\n'
            f'replace = "{replace}"\ntests = ["{test}"]\n\n')


def test_a_budgeted_run_takes_the_most_recently_changed_controls_first(tmp_path: Path) -> None:
    """A control's time is the newest change to its entry, its file or its tests' files;
    uncommitted work is newest of all, even beside commits dated after the clock (git blame
    dates an uncommitted line now); ties keep the file's order."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    names = ["old", "file", "entry", "test", "dirty", "old2"]
    for n in names:
        (repo / f"{n}.py").write_text("a = 1\n")
        (repo / f"test_{n}.py").write_text("def test_x():\n    pass\n")
    controls_file = repo / "controls.toml"

    def write(**replaces: str) -> None:
        controls_file.write_text("".join(
            _entry(f"c.{n}", f"{n}.py", f"test_{n}.py::test_x", replaces.get(n, "b"))
            for n in names))

    write()
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first", when=4_000_000_000)
    (repo / "file.py").write_text("a = 2\n")
    _git(repo, "commit", "-qam", "file", when=4_000_000_100)
    write(entry="c")
    _git(repo, "commit", "-qam", "entry", when=4_000_000_200)
    (repo / "test_test.py").write_text("def test_x():\n    assert True\n")
    _git(repo, "commit", "-qam", "test", when=4_000_000_300)
    (repo / "dirty.py").write_text("a = 3\n")  # (not committed)
    controls = parse_controls(controls_file.read_text())
    ordered, why = newest_first(repo, controls_file, controls)
    assert why == ""
    order = [c.id for c in ordered]
    assert order == ["c.dirty", "c.test", "c.entry", "c.file", "c.old", "c.old2"]
    # an uncommitted edit of an entry counts as newest too
    write(entry="c", old2="z")
    controls = parse_controls(controls_file.read_text())
    order = [c.id for c in newest_first(repo, controls_file, controls)[0]]
    assert order[:2] == ["c.dirty", "c.old2"] or order[:2] == ["c.old2", "c.dirty"]
    assert order[2:] == ["c.test", "c.entry", "c.file", "c.old"]
    # a selection: an entry ends where the next entry of the file starts, selected or not
    picked = [c for c in controls if c.id in ("c.file", "c.entry")]
    assert [c.id for c in newest_first(repo, controls_file, picked)[0]] == ["c.entry", "c.file"]
    # no repository, a shallow clone: the file's order, and why
    plain = tmp_path / "plain"
    plain.mkdir()
    ordered, why = newest_first(plain, plain / "c.toml", controls)
    assert ordered == controls and "git does not say" in why
    _git(repo, "commit", "-qam", "all", when=4_000_000_400)
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)],
                   check=True, capture_output=True, timeout=60)
    ordered, why = newest_first(shallow, shallow / "controls.toml", controls)
    assert ordered == controls and "shallow clone" in why


def test_every_copy_gets_pytests_rewritten_tests_and_an_edited_test_runs_as_edited(
        tmp_path: Path) -> None:
    """Each control's pytest rewrote its test modules anew (the cache could not be written),
    most of a second for a large one. The base's are made once and copied; one whose source
    was edited, even to the same size and time stamp, is not used."""
    from _pytest.assertion import rewrite

    from secagg.audit._workspace import Workspace, subprocess_env

    repo = tmp_path / "repo"
    for rel, text in {"secagg/__init__.py": "", "tests/__init__.py": "",
                      "tests/test_k.py": "def test_k():\n    assert 1 == 1\n"}.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    _git(repo, "init", "-q")
    with Workspace(repo) as ws:
        copy = ws.make_copy("edited", "tests/test_k.py", "def test_k():\n    assert 1 == 2\n")
        pristine = ws.pristine_copy("pristine")
        name = "test_k" + rewrite.PYC_TAIL
        for where in (copy, pristine):
            assert (where / "tests" / "__pycache__" / name).is_file()
        assert rewrite._read_pyc(pristine / "tests" / "test_k.py",
                                 pristine / "tests" / "__pycache__" / name) is not None
        edited, base = copy / "tests" / "test_k.py", (ws.base / "tests" / "test_k.py").stat()
        os.utime(edited, ns=(base.st_atime_ns, base.st_mtime_ns))
        assert edited.stat().st_size == base.st_size
        for where, code in ((copy, 1), (pristine, 0)):
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   "tests/test_k.py"], cwd=where, env=subprocess_env(where),
                                  capture_output=True, text=True, timeout=120, check=False)
            assert proc.returncode == code, proc.stdout


def test_workspaces_are_made_in_memory_unless_tmpdir_says_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from secagg.audit import _workspace

    memory, elsewhere = tmp_path / "shm", tmp_path / "tmp"
    elsewhere.mkdir()
    monkeypatch.setattr(_workspace, "MEMORY_DIR", memory)
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    monkeypatch.delenv("TMPDIR", raising=False)
    assert _workspace.workspaces_dir() == elsewhere  # (no such directory)
    memory.mkdir()
    assert _workspace.workspaces_dir() == memory
    monkeypatch.setattr(_workspace, "_MEMORY_FREE", 1 << 62)  # (not a GiB free)
    assert _workspace.workspaces_dir() == elsewhere
    monkeypatch.setattr(_workspace, "_MEMORY_FREE", 1)
    monkeypatch.setenv("TMPDIR", str(elsewhere))  # (the user's word)
    assert _workspace.workspaces_dir() == elsewhere
    monkeypatch.delenv("TMPDIR")
    memory.chmod(0o500)
    try:
        if not os.access(memory, os.W_OK):  # (root writes anyway)
            assert _workspace.workspaces_dir() == elsewhere
    finally:
        memory.chmod(0o700)
    with _workspace.Workspace(_git_repo_with_a_file(tmp_path / "repo")) as ws:
        assert ws.dir.parent == memory


def test_stale_workspaces_are_swept_in_memory_and_in_the_temporary_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that chose the disk (memory nearly full, TMPDIR set) swept only there: the
    workspaces of killed runs stayed in memory for good, and kept it full."""
    import tempfile

    from secagg.audit import _workspace

    memory, disk = tmp_path / "shm", tmp_path / "tmp"
    memory.mkdir()
    disk.mkdir()
    monkeypatch.setattr(_workspace, "MEMORY_DIR", memory)
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    stale = []
    for top in (memory, disk):
        stale.append(top / f"{_workspace.PREFIX}stale")
        stale[-1].mkdir()
        (stale[-1] / _workspace.OWNER).write_text(
            f"{gone.pid} 1 {_workspace._namespace()}")
    assert sorted(_workspace.sweep_stale()) == sorted(stale)
    assert not any(p.exists() for p in stale)
    # and --keep's copies stay on disk, not in memory
    monkeypatch.delenv("TMPDIR", raising=False)
    assert _workspace.workspaces_dir(keep=True) == disk


def test_only_bytecode_pytest_checks_against_its_source_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest 8 wrote its rewritten tests' bytecode checked by the source's time stamp and
    size: an edit of the same size in the same second ran the base's test. Such a file is
    not made (each control then rewrites its tests)."""
    import importlib.util
    import marshal

    from _pytest.assertion import rewrite

    from secagg.audit._workspace import _rewritten_bytecode

    src = tmp_path / "test_k.py"
    src.write_text("def test_k():\n    assert 1 == 1\n")
    made = _rewritten_bytecode(src)
    assert made is not None and made.read_bytes()[4:8] == b"\x03\x00\x00\x00"
    made.unlink()

    def by_time(fp: Any, source_hash: bytes, co: Any) -> None:  # (pytest 8's header)
        fp.write(importlib.util.MAGIC_NUMBER)
        fp.write(b"\x00\x00\x00\x00" + b"\x00" * 8)
        fp.write(marshal.dumps(co))

    monkeypatch.setattr(rewrite, "_write_pyc_fp", by_time)
    assert _rewritten_bytecode(src) is None
    assert not list((tmp_path / "__pycache__").glob("test_k*"))
