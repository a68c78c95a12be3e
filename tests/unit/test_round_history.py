"""The round history (clients.history) makes a site take part in each round number once,
however its training script is run: two processes at once on one directory, a Site with no
directory, a history file written by another version."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from clients.errors import SiteError
from clients.history import HISTORY_FILE, History


def test_two_processes_spending_one_round_at_once_cannot_both_send(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Site objects on one directory (a restarted script while the old one runs) spend
    round 3 at the same moment. Each re-reads the history under an exclusive lock: exactly
    one may send. (The write is slowed so that, unlocked, both would read before either
    wrote.)"""
    real = History._write

    def slow(self: History) -> None:
        time.sleep(0.3)
        real(self)

    monkeypatch.setattr(History, "_write", slow)
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def spend() -> None:
        history = History(tmp_path)
        start.wait()
        try:
            history.spend("job-1", 3)
            outcomes.append("sent")
        except SiteError as e:
            outcomes.append("refused" if "already sent an update to round 3" in str(e)
                            else f"failed: {e}")

    threads = [threading.Thread(target=spend) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["refused", "sent"]
    assert History(tmp_path).last_round("job-1") == 3


def test_a_site_with_no_history_directory_still_sends_to_a_round_once() -> None:
    history = History(None)
    history.spend("job-1", 2)
    with pytest.raises(SiteError, match="already sent an update to round 2"):
        history.spend("job-1", 2)
    with pytest.raises(SiteError):
        history.spend("job-1", 1)
    history.spend("job-1", 3)


@pytest.mark.parametrize("content", [
    {"version": 2, "last_round": {"job-1": 5}},
    {"last_round": {"job-1": 5}},
])
def test_a_history_of_another_version_is_refused_not_misread(
        tmp_path: Path, content: dict[str, object]) -> None:
    (tmp_path / HISTORY_FILE).write_text(json.dumps(content))
    with pytest.raises(SiteError, match="not a round history"):
        History(tmp_path)


def test_a_history_that_cannot_be_written_is_a_site_error_and_nothing_is_sent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = History(tmp_path)

    def refuse(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("clients.history.os.fsync", refuse)
    with pytest.raises(SiteError, match=r"No space left on device.*not sent"):
        history.spend("job-1", 1)
