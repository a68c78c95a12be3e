"""The weakened-build controls file is well formed, and every marked defence has a control.

Cheap static checks (no subprocess): running the controls is ``secagg threat-model controls``.
"""

from __future__ import annotations

import ast
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from secagg.audit.controls import (
    CONTROLS_FILE,
    AuditError,
    Control,
    ControlError,
    DefinedTests,
    load_controls,
    parse_controls,
    scan_markers,
    split_node_id,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def controls() -> list[Control]:
    loaded = load_controls(ROOT / CONTROLS_FILE)
    # (every test below passes on no controls at all; the marker test needs them, but says so
    # only per marker)
    assert len(loaded) >= 900, len(loaded)
    return loaded


def test_ids_are_unique_and_dotted(controls: list[Control]) -> None:
    counts = Counter(c.id for c in controls)
    assert [i for i, n in counts.items() if n > 1] == []
    raw_ids = re.findall(r'^id\s*=\s*"([^"]*)"', (ROOT / CONTROLS_FILE).read_text(), re.M)
    assert len(raw_ids) == len(controls)  # no entry lost to a TOML quirk
    assert all("." in c.id for c in controls)


def test_every_find_text_occurs_exactly_once_and_the_edit_changes_the_file(
    controls: list[Control],
) -> None:
    bad = []
    for c in controls:
        path = ROOT / c.file
        if not path.is_file():
            bad.append(f"{c.id}: {c.file} does not exist")
            continue
        source = path.read_text(encoding="utf-8")
        try:
            edited = c.apply(source)
        except ControlError as e:
            bad.append(str(e))
            continue
        assert edited != source
        if c.file.endswith(".py"):
            try:
                ast.parse(edited)
            except SyntaxError as e:
                bad.append(f"{c.id}: the edited {c.file} does not parse ({e.msg}, line {e.lineno})")
    assert bad == []


def test_every_listed_test_exists(controls: list[Control]) -> None:
    index = DefinedTests(ROOT)
    missing = [f"{c.id}: {t}" for c in controls for t in c.tests if not index.defines(t)]
    assert missing == []


PACKAGES = ("secagg", "aggregator", "clients")  # where defences are marked


def test_every_defence_marker_in_the_code_has_a_control(controls: list[Control]) -> None:
    ids = {c.id for c in controls}
    markers = [m for package in PACKAGES for m in scan_markers(ROOT, package)]
    for package in PACKAGES:
        assert any(m.file.startswith(f"{package}/") for m in markers), (
            f"no '# defence: <id>' markers found under {package}/")
    orphans = [f"{m.file}:{m.line}: {m.control_id}" for m in markers if m.control_id not in ids]
    assert orphans == []


def test_a_marked_control_points_at_the_file_that_carries_its_marker(
    controls: list[Control],
) -> None:
    by_id = {c.id: c for c in controls}
    wrong = [f"{m.file}:{m.line}: {m.control_id} edits {by_id[m.control_id].file}"
             for package in PACKAGES for m in scan_markers(ROOT, package)
             if m.control_id in by_id and by_id[m.control_id].file != m.file]
    assert wrong == []


# ---- the checker itself ----------------------------------------------------------------------

_ENTRY = '''
[[control]]
id = "demo.check"
defence = "a demo defence"
file = "secagg/_inputs.py"
find = 'if arr.ndim != 1:'
replace = 'if False:'
tests = ["tests/unit/test_inputs.py::test_check_update_refuses_naming_the_parameter"]
'''


def test_parser_refuses_duplicates_unknown_keys_and_bad_ids() -> None:
    assert [c.id for c in parse_controls(_ENTRY)] == ["demo.check"]
    with pytest.raises(AuditError, match="duplicate"):
        parse_controls(_ENTRY + _ENTRY)
    with pytest.raises(AuditError, match="unknown keys"):
        parse_controls(_ENTRY.replace("tests =", "test = 1\ntests ="))
    with pytest.raises(AuditError, match="dotted"):
        parse_controls(_ENTRY.replace('"demo.check"', '"Demo Check"'))
    with pytest.raises(AuditError, match="either"):
        parse_controls(_ENTRY.replace("find =", "edits = []\nfind ="))
    with pytest.raises(AuditError, match="relative"):
        parse_controls(_ENTRY.replace("secagg/_inputs.py", "/etc/passwd"))
    with pytest.raises(AuditError, match="node id"):
        parse_controls(_ENTRY.replace("::test_check", ":test_check"))


def test_parser_refuses_an_empty_file_and_a_timeout_that_is_not_finite() -> None:
    """An empty (or mistyped: `[[controls]]` is refused as an unknown key) controls file ran
    nothing and reported 100% caught, status 0; a timeout of inf was a traceback from the
    runner, nan was taken."""
    for empty in ("", "# nothing yet\n", "control = []\n"):
        with pytest.raises(AuditError, match="no controls"):
            parse_controls(empty)
    for bad in ("inf", "nan", "-1.0", "0", "true", '"60"', "1e10"):
        with pytest.raises(AuditError, match="positive, finite"):
            parse_controls(_ENTRY + f"timeout = {bad}\n")
    assert parse_controls(_ENTRY + "timeout = 30\n")[0].timeout == 30.0


def test_files_select_controls_by_their_path_from_the_root_wherever_the_command_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--files $(git diff --name-only)` gives paths from the repository's root: run from a
    sub-directory they were read against it, and a control naming `./secagg/x.py` was never
    selected by `secagg/x.py`: no control selected, status 0."""
    from secagg.audit.cli import select

    (tmp_path / "secagg" / "secagg").mkdir(parents=True)  # (both readings name a file)
    (tmp_path / "secagg" / "_inputs.py").write_text("")
    (tmp_path / "secagg" / "secagg" / "_inputs.py").write_text("")
    dotted = parse_controls(_ENTRY.replace('"secagg/_inputs.py"', '"./secagg/_inputs.py"'))
    assert dotted[0].file == "secagg/_inputs.py"
    monkeypatch.chdir(tmp_path / "secagg")
    for given in ("secagg/_inputs.py", str(tmp_path / "secagg" / "_inputs.py"), "_inputs.py"):
        assert [c.id for c in select(dotted, None, [given], tmp_path)] == ["demo.check"], given


def test_find_must_match_exactly_once() -> None:
    control = parse_controls(_ENTRY)[0]
    assert control.apply("x\nif arr.ndim != 1:\n") == "x\nif False:\n"
    with pytest.raises(ControlError, match="occurs 0 times"):
        control.apply("nothing here")
    with pytest.raises(ControlError, match="occurs 2 times"):
        control.apply("if arr.ndim != 1:\nif arr.ndim != 1:\n")


def test_node_ids_and_markers_are_read_as_written(tmp_path: Path) -> None:
    assert split_node_id("tests/a.py::TestX::test_y[1-2]") == ("tests/a.py", ("TestX", "test_y"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("class TestX:\n    def test_y(self): pass\n"
                                             "def test_z(): pass\n")
    index = DefinedTests(tmp_path)
    assert index.defines("tests/t.py::TestX::test_y[p]")
    assert index.defines("tests/t.py::test_z")
    assert not index.defines("tests/t.py::test_y")
    assert not index.defines("tests/missing.py::test_z")
    (tmp_path / "secagg").mkdir()
    (tmp_path / "secagg" / "m.py").write_text(
        '"""Mark defences with # defence: <id>."""\n'
        "x = 1  # defence: a.b, c.d\n")
    assert [(m.line, m.control_id) for m in scan_markers(tmp_path)] == [(2, "a.b"), (2, "c.d")]


def test_a_controls_file_that_is_a_fifo_or_not_utf8_is_one_line(tmp_path: Path) -> None:
    # (a FIFO was waited on for ever; a file not UTF-8 was a UnicodeDecodeError)
    import threading

    from secagg.audit.controls import AuditError, load_controls

    fifo = tmp_path / "controls.toml"
    os.mkfifo(fifo)

    def release() -> None:  # (an empty write end, after a while: a waiting read ends)
        for _ in range(50):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:  # (no reader yet, or none at all: refused at once)
                threading.Event().wait(0.1)

    threading.Thread(target=release, daemon=True).start()
    with pytest.raises(AuditError, match=re.escape(f"controls file {fifo}: not a regular file")):
        load_controls(fifo)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(AuditError, match=re.escape(f"controls file {binary}: not UTF-8 text")):
        load_controls(binary)
