"""The controls runner end to end: each edit lands in a throw-away copy, never in the
repository, and each outcome is classified (caught, missed, invalid)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

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


def test_a_copy_that_imports_the_installed_package_fails_loudly(tmp_path: Path) -> None:
    # an empty directory has no secagg/: 'import secagg' would fall through to the editable
    # install, so the tests would never see an edit
    with Workspace(ROOT) as ws, pytest.raises(AuditError, match="outside the copy"):
        ws.check_imports(tmp_path)


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
