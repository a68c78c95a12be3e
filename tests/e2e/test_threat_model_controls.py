"""The controls runner end to end: each edit lands in a throw-away copy, never in the
repository, and each outcome is classified (caught, missed, invalid)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from secagg.audit import AuditError
from secagg.audit._workspace import Workspace, subprocess_env
from secagg.cli import main

ROOT = Path(__file__).resolve().parents[2]
AEAD = "secagg/hazmat/aead.py"
UNIT = "tests/unit/test_aead.py"

CONTROLS = f'''
[[control]]
id = "demo.caught"
defence = "fresh nonces"
file = "{AEAD}"
find = 'nonce = os.urandom(NONCE_BYTES)'
replace = 'nonce = bytes(NONCE_BYTES)'
tests = ["{UNIT}::test_two_seals_of_the_same_plaintext_use_different_nonces"]

[[control]]
id = "demo.missed"
defence = "a test of the round trip does not test the nonce"
file = "{AEAD}"
find = 'nonce = os.urandom(NONCE_BYTES)'
replace = 'nonce = bytes(NONCE_BYTES)'
tests = ["{UNIT}::test_seal_then_open_round_trips"]

[[control]]
id = "demo.comment-only"
defence = "a comment is no defence: an edit of one proves nothing"
file = "{AEAD}"
find = '# defence: hazmat.aead.random-nonce'
replace = '# nothing'
tests = ["{UNIT}::test_seal_then_open_round_trips"]

[[control]]
id = "demo.undefined-name"
defence = "an edit that reads a name the file never defines raises wherever it runs"
file = "{AEAD}"
find = 'nonce = os.urandom(NONCE_BYTES)'
replace = 'nonce = os.urandom(NONCE_BYTES_NOWHERE)'
tests = ["{UNIT}::test_seal_then_open_round_trips"]

[[control]]
id = "demo.breaks-import"
defence = "an edit that breaks the import proves nothing"
file = "{AEAD}"
find = 'import os'
replace = 'import os_that_does_not_exist'
tests = ["{UNIT}::test_seal_then_open_round_trips"]

[[control]]
id = "demo.not-found"
defence = "a find text that is not in the file"
file = "{AEAD}"
find = 'this text is nowhere in the file'
replace = 'x'
tests = ["{UNIT}::test_seal_then_open_round_trips"]
'''


def test_controls_are_classified_and_the_repository_is_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    controls = tmp_path / "controls.toml"
    controls.write_text(CONTROLS)
    before = hashlib.sha256((ROOT / AEAD).read_bytes()).hexdigest()
    code = main(["threat-model", "controls", "--repo", str(ROOT), "--controls", str(controls),
                 "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert hashlib.sha256((ROOT / AEAD).read_bytes()).hexdigest() == before
    results = {c["id"]: c for c in out["controls"]}
    assert {k: v["result"] for k, v in results.items()} == {
        "demo.caught": "caught", "demo.missed": "missed", "demo.breaks-import": "invalid",
        "demo.not-found": "invalid", "demo.comment-only": "invalid",
        "demo.undefined-name": "invalid",
    }
    # (an auditor's findings: a comment-only edit was "caught" by a flaky test, and
    # ``x < zero`` by a test of the happy path that the NameError broke)
    assert "changes no code" in results["demo.comment-only"]["detail"]
    assert "NONCE_BYTES_NOWHERE" in results["demo.undefined-name"]["detail"]
    assert results["demo.caught"]["failed_tests"] == [
        f"{UNIT}::test_two_seals_of_the_same_plaintext_use_different_nonces"]
    assert "no longer imports" in results["demo.breaks-import"]["detail"]
    assert "occurs 0 times" in results["demo.not-found"]["detail"]
    assert out["summary"]["caught"] == 1 and out["summary"]["total"] == 6
    assert out["summary"]["misses"] == [{
        "id": "demo.missed", "defence": "a test of the round trip does not test the nonce"}]
    assert out["baseline"]["failing"] == [] and out["baseline"]["flaky"] == []
    assert code == 1  # not everything was caught
    # what did not count is named again after the table, where a CI log's tail keeps it
    tail = captured.err.rsplit("caught 1/6", 1)[1]
    assert "MISSED demo.missed" in tail
    assert "INVALID demo.breaks-import: the edited" in tail
    assert "INVALID demo.not-found:" in tail


def test_controls_take_their_baseline_from_a_run_of_the_tree_when_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """CI's default run records every test's outcome (the plugin, SECAGG_AUDIT_OUTCOMES):
    given them, the controls run no baseline of their own, and a listed test that failed
    there (and again alone) makes its control invalid."""
    import subprocess
    import sys

    controls = tmp_path / "controls.toml"
    controls.write_text(CONTROLS.split("[[control]]\nid = \"demo.missed\"")[0])
    outcomes = tmp_path / "outcomes.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "secagg.audit._pytest_plugin", UNIT], cwd=ROOT, check=True, timeout=300,
                   env={**os.environ, "SECAGG_AUDIT_OUTCOMES": str(outcomes)},
                   capture_output=True)
    recorded = json.loads(outcomes.read_text())["outcomes"]
    test = f"{UNIT}::test_two_seals_of_the_same_plaintext_use_different_nonces"
    assert recorded[test] == "passed"
    args = ["threat-model", "controls", "--repo", str(ROOT), "--controls", str(controls),
            "--baseline-from", str(outcomes), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["controls"][0]["result"] == "caught"
    assert "the outcomes of 1 of the 1 listed tests are given" in captured.err
    assert "running the" not in captured.err
    outcomes.write_text(json.dumps({"outcomes": {test: "failed"}, "exit_status": 1}))
    assert main(args) == 0  # (it passes alone: flaky, and the control is still caught)
    assert "FLAKY" in capsys.readouterr().err


def test_a_copy_that_imports_the_installed_package_fails_loudly(tmp_path: Path) -> None:
    # an empty directory has no secagg/: 'import secagg' would fall through to the editable
    # install, so the tests would never see an edit
    repo = _git_repo(tmp_path / "repo", {"secagg/__init__.py": ""})
    (tmp_path / "empty").mkdir()
    with Workspace(repo) as ws, pytest.raises(AuditError, match="outside the copy"):
        ws.check_imports(tmp_path / "empty")


def test_a_copys_edit_is_imported_though_the_bases_bytecode_is_copied(tmp_path: Path) -> None:
    """Every copy gets the base's bytecode (compiled once: each control's tests compiled the
    whole project anew). An edited file's must never be used: the edit below keeps the
    file's size and modification time, which is all a time-stamped bytecode file checks."""
    import subprocess
    import sys

    repo = _git_repo(tmp_path / "repo", {"secagg/__init__.py": "",
                                         "secagg/k.py": "VALUE = 12\n",
                                         "secagg/other.py": "VALUE = 1\n"})
    with Workspace(repo) as ws:
        copy = ws.make_copy("edited", "secagg/k.py", "VALUE = 13\n")
        edited = copy / "secagg" / "k.py"
        base = (ws.base / "secagg" / "k.py").stat()
        os.utime(edited, ns=(base.st_atime_ns, base.st_mtime_ns))
        assert edited.stat().st_size == base.st_size
        cached = copy / "secagg" / "__pycache__"
        assert {p.name.split(".")[0] for p in cached.iterdir()} >= {"k", "other", "__init__"}
        out = subprocess.run(
            [sys.executable, "-c", "import secagg.k as k, secagg.other as o; "
             "print(k.VALUE, k.__file__, o.__cached__)"],
            cwd=copy, env=subprocess_env(copy), capture_output=True, text=True, check=True,
            timeout=120).stdout.split()
        assert out[0] == "13" and Path(out[1]).resolve() == edited.resolve()
        assert Path(out[2]).resolve().is_relative_to(copy.resolve())


def test_controls_run_pytest_as_on_a_desk_even_on_ci(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """On CI pytest explains a failed assert untruncated; for two tuples of ciphertext bytes
    that explanation took longer than a control's timeout, so a caught control was reported
    as timed out. The copies' pytest must not see the CI variables."""
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("BUILD_NUMBER", "7")
    env = subprocess_env(tmp_path)
    assert "CI" not in env and "BUILD_NUMBER" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)


def test_a_report_directory_that_cannot_be_written_is_said_before_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    """`threat-model run --out FILE` ran the whole suite, then failed to write the report."""
    from secagg.audit import report

    ran: list[bool] = []
    monkeypatch.setattr(report, "build_report", lambda *a, **k: ran.append(True))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["threat-model", "run", "--out", str(a_file)]) == 2
    assert not ran and "cannot write the report" in capsys.readouterr().err


def _git_repo(repo: Path, files: dict[str, str]) -> Path:
    import subprocess

    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    subprocess.run(["git", "init", "-q", str(repo)], check=True, timeout=60)
    return repo


def test_a_test_writing_a_file_in_place_reaches_neither_the_base_nor_later_copies(
        tmp_path: Path) -> None:
    """The copies were hard links of the base: a test that rewrote a tracked file in place
    (``open(path, "w")``) rewrote the base's file, and every later control ran on it."""
    repo = _git_repo(tmp_path / "repo", {"edited.txt": "e", "shared.txt": "pristine"})
    with Workspace(repo) as ws:
        first = ws.make_copy("first", "edited.txt", "weakened")
        with open(first / "shared.txt", "w") as f:  # in place, as a careless test would
            f.write("tainted")
        second = ws.make_copy("second", "edited.txt", "weakened again")
        assert (ws.base / "shared.txt").read_text() == "pristine"
        assert (second / "shared.txt").read_text() == "pristine"
    assert (repo / "shared.txt").read_text() == "pristine"


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead and not yet reaped by whoever adopted it, does
    not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _kill_once_marked(runner: Any, mark: Path) -> int:
    """Wait until the runner's child has written its pid to ``mark``, then SIGKILL the
    runner; the child's pid."""
    import signal
    import time

    deadline = time.monotonic() + 120
    while not mark.exists() or not mark.read_text():
        assert runner.poll() is None and time.monotonic() < deadline, "the child never started"
        time.sleep(0.1)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    return int(mark.read_text())


def _gone_within(pid: int, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _running(pid)


_RUNNER = '''
import sys
from pathlib import Path
from secagg.audit._workspace import Workspace
from secagg.audit.runner import run_pytest
ws = Workspace(Path(sys.argv[1]))
print(ws.dir, flush=True)
copy = ws.make_copy("c", "edited.txt", "x")
run_pytest(ws, copy, ["-q", "-p", "no:cacheprovider", "test_sleeps.py"], timeout=300)
'''

_SLEEPS = '''
import atexit, os, subprocess, sys, time
from pathlib import Path

MARK = Path(os.environ["AUDIT_TEST_MARK"])
atexit.register(lambda: MARK.with_suffix(".atexit").write_text("ran"))

def test_sleeps():
    # (in the group, without the run's mark: the kill of the group alone ends it)
    unmarked = {k: v for k, v in os.environ.items() if k != "SECAGG_AUDIT_RUN"}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             env=unmarked)
    MARK.with_suffix(".child").write_text(str(child.pid))
    loner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             start_new_session=True)
    MARK.with_suffix(".loner").write_text(str(loner.pid))
    MARK.write_text(str(os.getpid()))
    try:
        time.sleep(120)
    finally:
        MARK.with_suffix(".teardown").write_text("ran")
'''


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_a_runner_killed_with_sigkill_leaves_no_tests_running_and_its_copies_are_swept(
        tmp_path: Path, sigint_ignored: bool) -> None:
    """A SIGKILL of the runner runs no handler: its pytest processes (sessions of their own)
    ran on to their end, and its copies stayed in the temporary directory for good. Its tests
    now end (torn down as on Ctrl-C) and the next workspace made removes its copies; also
    when the runner was started with SIGINT ignored (`cmd &` in a script), which its pytest
    inherited (an auditor's finding: killed 30 s later, untorn)."""
    import signal
    import subprocess
    import sys

    from secagg.audit._workspace import OWNER, PREFIX, _owner_text, sweep_stale

    repo = _git_repo(tmp_path / "repo", {"edited.txt": "e", "test_sleeps.py": _SLEEPS})
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    mark = tmp_path / "mark"
    env = {**os.environ, "TMPDIR": str(tmp), "AUDIT_TEST_MARK": str(mark)}
    runner = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, str(repo)], env=env, stdout=subprocess.PIPE, text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored
        else None)
    pytest_pid = 0
    try:
        assert runner.stdout is not None
        workspace = Path(runner.stdout.readline().strip())
        pytest_pid = _kill_once_marked(runner, mark)
        assert _gone_within(pytest_pid, 20), "the dead runner's pytest is still running"
        assert mark.with_suffix(".teardown").read_text() == "ran"  # interrupted, not killed
        # its exit handlers ran, and what it left running in its group was killed
        assert mark.with_suffix(".atexit").read_text() == "ran"
        child = int(mark.with_suffix(".child").read_text())
        assert _gone_within(child, 10), "the dead runner's test left its child running"
        # and one in a session of its own, which a kill of the group misses
        loner = int(mark.with_suffix(".loner").read_text())
        assert _gone_within(loner, 10), "the dead runner's test left its own session running"
    finally:
        if runner.poll() is None:
            runner.kill()
        if pytest_pid:  # (the defence missing: no orphan left, the test's child either)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pytest_pid, signal.SIGKILL)
        if mark.with_suffix(".loner").exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(mark.with_suffix(".loner").read_text()), signal.SIGKILL)
    # a live owner's workspace, one with no owner file (--keep) and one with an owner file
    # that is not one stay; the dead runner's goes
    live = tmp / f"{PREFIX}live"
    live.mkdir()
    (live / OWNER).write_text(_owner_text())
    kept = tmp / f"{PREFIX}kept"
    kept.mkdir()
    odd = tmp / f"{PREFIX}odd"
    odd.mkdir()
    (odd / OWNER).write_text("not a pid")
    assert workspace.parent == tmp and workspace.is_dir()
    assert sweep_stale(tmp) == [workspace]
    assert not workspace.exists() and live.is_dir() and kept.is_dir() and odd.is_dir()


def test_a_listed_test_marked_slow_is_run(tmp_path: Path) -> None:
    """The project's `-m 'not slow'` (its pytest addopts) deselected a slow test a control
    named: the control could never run. A listed test runs whatever its marks."""
    from secagg.audit.runner import run_suite

    repo = _git_repo(tmp_path / "repo", {
        "pyproject.toml": "[tool.pytest.ini_options]\naddopts = \"-m 'not slow'\"\n"
                          "markers = [\"slow: long\"]\n",
        "test_s.py": "import pytest\n\n\n@pytest.mark.slow\ndef test_slow():\n    pass\n",
    })
    with Workspace(repo) as ws:
        run = run_suite(ws, ["test_s.py::test_slow"], timeout=120)
    assert run.outcomes == {"test_s.py::test_slow": "passed"}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_what_a_run_leaves_in_a_session_of_its_own_ends_with_the_run(tmp_path: Path) -> None:
    """A test's process that made a session of its own (a server started with
    start_new_session, left running) outlived its control's run, and a killed run's such
    processes outlived the kill of its group: through every later control they held CPU and
    ports. Every process of a run carries its mark, and the run's end kills them by it."""
    import signal

    from secagg.audit.runner import run_pytest

    mark = tmp_path / "loner"
    repo = _git_repo(tmp_path / "repo", {"edited.txt": "e", "test_leaves.py": (
        "import os, subprocess, sys\nfrom pathlib import Path\n\n\ndef test_leaves():\n"
        "    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                         start_new_session=True)\n"
        "    Path(os.environ['AUDIT_TEST_MARK']).write_text(str(p.pid))\n")})
    os.environ["AUDIT_TEST_MARK"] = str(mark)
    try:
        with Workspace(repo) as ws:
            copy = ws.make_copy("c", "edited.txt", "x")
            run = run_pytest(ws, copy, ["-q", "-p", "no:cacheprovider", "test_leaves.py"],
                             timeout=120)
        assert run.outcomes == {"test_leaves.py::test_leaves": "passed"}
        assert _gone_within(int(mark.read_text()), 10), "the run's own session outlived it"
    finally:
        del os.environ["AUDIT_TEST_MARK"]
        if mark.exists() and _running(int(mark.read_text())):
            os.kill(int(mark.read_text()), signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_only_a_workspace_whose_owner_is_known_gone_is_swept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An owner file names a pid, its start time and its pid namespace. Swept: a pid no
    process has, a zombie's, or one another process took since (same number, another start
    time). Kept: the live owner's, another namespace's (its pids are not ours to read), and
    everything where there is no /proc (every pid would look gone: every other run's live
    workspace was removed)."""
    import subprocess
    import sys
    import time

    from secagg.audit import _workspace
    from secagg.audit._workspace import OWNER, PREFIX, _owner_text, sweep_stale

    ours = _owner_text()
    pid, start, namespace = ours.split()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True, timeout=60)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # (never waited for, until below)
    try:
        deadline = time.monotonic() + 30
        while _running(zombie.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        zombie_start = Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[19]
        owners = {
            "current": ours,
            "reused": f"{pid} {int(start) + 1} {namespace}",
            "gone": f"{ended.stdout.strip()} 1 {namespace}",
            "zombie": f"{zombie.pid} {zombie_start} {namespace}",
            "elsewhere": f"{ended.stdout.strip()} 1 pid:[1]",
        }
        for name, text in owners.items():
            (tmp_path / f"{PREFIX}{name}").mkdir()
            (tmp_path / f"{PREFIX}{name}" / OWNER).write_text(text)
        monkeypatch.setattr(_workspace, "PROC", tmp_path / "no-proc")
        assert sweep_stale(tmp_path) == []
        monkeypatch.undo()
        assert sorted(p.name for p in sweep_stale(tmp_path)) == sorted(
            f"{PREFIX}{n}" for n in ("reused", "gone", "zombie"))
        assert (tmp_path / f"{PREFIX}current").is_dir()
        assert (tmp_path / f"{PREFIX}elsewhere").is_dir()
    finally:
        zombie.wait(timeout=30)


def test_a_kept_workspace_is_never_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--keep`` leaves the copies for the user: the workspace has no owner file, so no
    later run's sweep removes it, even if its runner was killed."""
    import tempfile

    from secagg.audit._workspace import OWNER

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # (workspaces are made there, not in memory)
    repo = _git_repo(tmp_path / "repo", {"edited.txt": "e"})
    with Workspace(repo, keep=True) as kept:
        assert kept.dir.parent == tmp_path
        assert not (kept.dir / OWNER).exists()
    with Workspace(repo) as other:  # (its sweep)
        assert (other.dir / OWNER).exists()
    assert kept.base.is_dir()


def test_a_baseline_writing_a_repository_file_leaves_the_base_as_it_was(tmp_path: Path) -> None:
    """The baseline ran in the base copy itself: a listed test that rewrote a repository file
    changed what every later control tested (an auditor's finding: a control that removed
    nothing came out caught). It runs in a copy of its own."""
    from secagg.audit.runner import run_suite

    repo = _git_repo(tmp_path / "repo", {
        "mod.py": "VALUE = 1\n",
        "test_rewrites.py": "from pathlib import Path\n\n\ndef test_rewrites():\n"
                            "    Path(__file__).with_name('mod.py').write_text('VALUE = 2\\n')\n",
    })
    with Workspace(repo) as ws:
        run = run_suite(ws, ["test_rewrites.py"], timeout=120)
        assert run.outcomes == {"test_rewrites.py::test_rewrites": "passed"}
        assert (ws.base / "mod.py").read_text() == "VALUE = 1\n"
        copy = ws.make_copy("later", "test_rewrites.py", "")
        assert (copy / "mod.py").read_text() == "VALUE = 1\n"
    assert (repo / "mod.py").read_text() == "VALUE = 1\n"


def test_an_absolute_link_into_the_repository_leads_into_the_copy(tmp_path: Path) -> None:
    """A link committed as an absolute path into the repository (tests/notes -> /repo/README)
    was copied as it was: from every copy it led back into the real repository, and a test
    wrote there through it. In the copies it leads to the copy's own file."""
    repo = _git_repo(tmp_path / "repo", {"README.md": "real", "edited.txt": "e"})
    (repo / "docs").mkdir()
    (repo / "docs" / "notes.md").symlink_to(repo / "README.md")
    (repo / "docs" / "outside.md").symlink_to(tmp_path / "elsewhere.md")
    with Workspace(repo) as ws:
        copy = ws.make_copy("c", "edited.txt", "x")
        with open(copy / "docs" / "notes.md", "a") as f:  # as a careless test would
            f.write(" written")
        assert (copy / "README.md").read_text() == "real written"
        assert os.readlink(copy / "docs" / "outside.md") == str(tmp_path / "elsewhere.md")
    assert (repo / "README.md").read_text() == "real"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_an_import_check_that_hangs_ends_with_a_killed_runner(tmp_path: Path) -> None:
    """The import check of an edited module that loops at import outlived a runner killed
    with SIGKILL, at full CPU, for ever (an auditor's finding): it has a lifeline too."""
    import signal
    import subprocess
    import sys

    mark = tmp_path / "mark"
    repo = _git_repo(tmp_path / "repo", {
        "secagg/__init__.py": "",
        "secagg/loop.py": "import os\nfrom pathlib import Path\n"
                          "Path(os.environ['AUDIT_TEST_MARK']).write_text(str(os.getpid()))\n"
                          "while True:\n    pass\n",
    })
    script = ("import sys\nfrom pathlib import Path\n"
              "from secagg.audit._workspace import Workspace\n"
              "ws = Workspace(Path(sys.argv[1]))\n"
              "copy = ws.pristine_copy('c')\n"
              "ws.check_imports(copy, 'secagg/loop.py', timeout=300)\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    runner = subprocess.Popen([sys.executable, "-c", script, str(repo)],
                              env={**os.environ, "TMPDIR": str(tmp), "AUDIT_TEST_MARK": str(mark)})
    pid = 0
    try:
        pid = _kill_once_marked(runner, mark)
        assert _gone_within(pid, 20), "the dead runner's import check is still running"
    finally:
        if runner.poll() is None:
            runner.kill()
        if pid and _running(pid):
            os.kill(pid, signal.SIGKILL)
