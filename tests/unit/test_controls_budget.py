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
        time.sleep(0.4)
        return ControlResult(c, "caught", detail=c.tests[0], exit_code=1,
                             failed_tests=list(c.tests))

    monkeypatch.setattr(ControlRunner, "_attempt", attempt)
    monkeypatch.setattr(runner_module, "problems", lambda root, controls: {})
    controls = [_control(f"demo.c{i}") for i in range(3)]
    given = PytestRun(0, "", 0.0, {c.tests[0]: "passed" for c in controls}, {})
    run = ControlRunner(_Workspace(), jobs=1, budget=0.2,  # type: ignore[arg-type]
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
    order = [c.id for c in newest_first(repo, controls_file, controls)]
    assert order == ["c.dirty", "c.test", "c.entry", "c.file", "c.old", "c.old2"]
    # an uncommitted edit of an entry counts as newest too
    write(entry="c", old2="z")
    controls = parse_controls(controls_file.read_text())
    order = [c.id for c in newest_first(repo, controls_file, controls)]
    assert order[:2] == ["c.dirty", "c.old2"] or order[:2] == ["c.old2", "c.dirty"]
    assert order[2:] == ["c.test", "c.entry", "c.file", "c.old"]
    # no repository: the file's order
    plain = tmp_path / "plain"
    plain.mkdir()
    assert newest_first(plain, plain / "c.toml", controls) == controls


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
