"""The round history (clients.history) makes a site take part in each round number once,
however its training script is run: two processes at once on one directory, a Site with no
directory, a history file written by another version."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clients.errors import SiteError
from clients.history import HISTORY_FILE, History

DIGEST = b"\x07" * 32


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
            history.spend("job-1", 3, DIGEST)
            outcomes.append("sent")
        except SiteError as e:
            outcomes.append("refused" if "already took part in round 3" in str(e)
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
    history.spend("job-1", 2, DIGEST)
    with pytest.raises(SiteError, match="already took part in round 2"):
        history.spend("job-1", 2, DIGEST)
    # (an older round: named as older, not as the round taken part in again)
    with pytest.raises(SiteError, match="already took part in round 2, after round 1 "):
        history.spend("job-1", 1, DIGEST)
    history.spend("job-1", 3, DIGEST)


@pytest.mark.parametrize("content", [
    {"version": 2, "last_round": {"job-1": 5}},
    {"last_round": {"job-1": 5}},
    {"version": 1, "last_round": {"job-1": 5}, "held": {"job-1": [4, "ab"]}},
    {"version": 1, "last_round": {"job-1": 5}, "held": {"job-1": [-1, "ab" * 32]}},
    {"version": 1, "last_round": {"job-1": 5}, "held": {"job-1": "ab" * 32}},
    {"version": 1, "last_round": {"job-1": 5}, "held": {"job-1": [4, "zz" * 32]}},
    {"version": 1, "last_round": {}, "federations": {"ab" * 32: [-1, "", 0, ""]}},
    {"version": 1, "last_round": {}, "federations": {"ab" * 32: ["3", "", 1, ""]}},
    {"version": 1, "last_round": {}, "federations": {"ab" * 32: [3, "ab", 1, ""]}},
    {"version": 1, "last_round": {}, "federations": {"ab" * 32: [3, 1]}},
    {"version": 1, "last_round": {}, "federations": {"ab": [3, "", 1, ""]}},
    {"version": 1, "last_round": {}, "federations": [["ab" * 32, 3, "", 1, ""]]},
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
        history.spend("job-1", 1, DIGEST)


def test_the_model_a_site_holds_is_kept_across_restarts_and_the_later_of_two_processes_wins(
        tmp_path: Path) -> None:
    """What ``Site`` checks the next round's model against after a restart: the model it
    trained from (recorded with the round it spent) or the result it accepted, whichever is
    later, also when two processes share the directory. A history written before the held
    model was kept reads as holding nothing."""
    (tmp_path / HISTORY_FILE).write_text(json.dumps({"version": 1, "last_round": {"job-1": 1}}))
    assert History(tmp_path).held("job-1") is None
    a, b = History(tmp_path), History(tmp_path)
    a.spend("job-1", 2, b"\x02" * 32)
    assert History(tmp_path).held("job-1") == (1, b"\x02" * 32)
    a.hold("job-1", 2, b"\x03" * 32)
    b.hold("job-1", 1, b"\x09" * 32)  # (a stale process: the later record is kept)
    assert History(tmp_path).held("job-1") == (2, b"\x03" * 32)
    assert History(tmp_path).last_round("job-1") == 2


def test_merging_an_older_history_never_takes_this_process_back(tmp_path: Path) -> None:
    """The file under a running site is replaced by an older one (a backup restored, a
    stale process's copy, a write of this process's that failed). The next merge takes the
    later of each record: the round number this process spent, the bound of the round its
    input is in, and the model it holds stay; the older file would have let it send to
    round 3 again and forget round 3's bound."""
    older = tmp_path / "older"
    older.mkdir()
    stale = History(older)
    stale.spend("job-1", 1, b"\x01" * 32)
    stale.record_in_sum("job-1", 1, (1.0, 1.0))
    stale.hold("job-1", 1, b"\x02" * 32)
    history = History(tmp_path)
    history.spend("job-1", 3, b"\x03" * 32)
    history.record_in_sum("job-1", 3, (2.0, 3.0))
    (tmp_path / HISTORY_FILE).write_bytes((older / HISTORY_FILE).read_bytes())
    history.hold("job-1", 2, b"\x04" * 32)  # merges the older file in, then writes
    for h in (history, History(tmp_path)):
        assert h.last_round("job-1") == 3 and h.check("job-1", 3) is not None
        assert h.in_sum("job-1", 3) == (2.0, 3.0)
        assert h.held("job-1") == (2, b"\x04" * 32)


def test_a_held_model_that_cannot_be_recorded_is_a_warning_not_a_lost_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The round's result is good whether or not the disk takes the record of it: the site
    keeps it in memory, says so in the log, and a restart checks from the earlier record."""
    history = History(tmp_path)
    history.spend("job-1", 1, b"\x01" * 32)

    def refuse(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("clients.history.os.fsync", refuse)
    with caplog.at_level("WARNING", logger="clients.history"):
        history.hold("job-1", 1, b"\x02" * 32)
    assert history.held("job-1") == (1, b"\x02" * 32)
    assert "not recorded" in caplog.text and "No space left" in caplog.text
    assert History(tmp_path).held("job-1") == (0, b"\x01" * 32)


def test_links_planted_in_a_shared_history_directory_are_never_written_through(
        tmp_path: Path) -> None:
    """A history_dir others can write to: a link at the history's temporary name had its
    target overwritten with the history; a link at the lock's name was created through.
    The temporary link is replaced by a new file (the target untouched); the lock's is a
    clear SiteError, nothing sent."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f".{HISTORY_FILE}.tmp").symlink_to(victim)
    History(shared).spend("job-1", 1, DIGEST)
    assert victim.read_text() == "precious"
    assert not (shared / HISTORY_FILE).is_symlink()
    assert History(shared).last_round("job-1") == 1

    elsewhere = tmp_path / "not-yet"
    (shared / f".{HISTORY_FILE}.lock").unlink()
    (shared / f".{HISTORY_FILE}.lock").symlink_to(elsewhere)
    with pytest.raises(SiteError, match=r"cannot lock.*not sent"):
        History(shared).spend("job-1", 2, DIGEST)
    assert not elsewhere.exists()


def test_a_history_directory_that_is_not_one_is_said_at_connect(tmp_path: Path) -> None:
    """A missing history_dir, or a file, was found out at the first submit, after training."""
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "file"):
        with pytest.raises(SiteError, match="is not a directory"):
            History(bad)


def test_a_history_nested_too_deep_is_a_site_error(tmp_path: Path) -> None:
    (tmp_path / HISTORY_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SiteError, match="not a round history"):
        History(tmp_path)


def test_a_planted_history_or_a_lock_held_for_good_is_an_error_not_a_hang(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user of a shared history_dir: history.json a link to a FIFO hung the site at
    connect (one to /dev/zero filled its memory); a lock held for good hung it after
    training, silently. Both are SiteErrors, in bounded time."""
    import fcntl
    import os

    from clients import history as history_module

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / HISTORY_FILE).symlink_to(tmp_path / "fifo")

    def within_5_s(call: Callable[[], object]) -> object:
        """What ``call`` returned or raised, run on a thread that may hang (None if so)."""
        outcome: list[object] = []

        def run() -> None:
            try:
                outcome.append(call())
            except SiteError as e:
                outcome.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=5)
        return outcome[0] if outcome else None

    assert isinstance(within_5_s(lambda: History(tmp_path)), SiteError)
    (tmp_path / HISTORY_FILE).unlink()
    # planted after connect (the directory check at connect refuses a FIFO there too): the
    # history is read again, under the lock, as the round is spent
    history = History(tmp_path)
    (tmp_path / HISTORY_FILE).symlink_to(tmp_path / "fifo")
    refused = within_5_s(lambda: history.spend("job-1", 1, DIGEST))
    assert isinstance(refused, SiteError), refused
    (tmp_path / HISTORY_FILE).unlink()

    monkeypatch.setattr(history_module, "HISTORY_LOCK_SECONDS", 0.3)
    held = os.open(tmp_path / f".{HISTORY_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's (an open file of its own)
        refused = within_5_s(lambda: History(tmp_path).spend("job-1", 1, DIGEST))
        assert isinstance(refused, SiteError) and "locked by another process" in str(refused)
        assert "not sent" in str(refused)
    finally:
        os.close(held)
    History(tmp_path).spend("job-1", 1, DIGEST)  # released: it goes ahead


def test_recording_a_held_model_waits_for_another_process_holding_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Recording what a site holds merges and writes under the directory's lock, as sending
    does: while another process holds it (mid-merge), nothing is written over its work; here
    it holds it past the bound, and the record is a warning, not a lost or torn file."""
    import fcntl
    import os

    from clients import history as history_module

    monkeypatch.setattr(history_module, "HISTORY_LOCK_SECONDS", 0.3)
    history = History(tmp_path)
    history.spend("job-1", 1, b"\x01" * 32)
    before = (tmp_path / HISTORY_FILE).read_bytes()
    fd = os.open(tmp_path / f".{HISTORY_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process, mid-merge
        with caplog.at_level("WARNING", logger="clients.history"):
            history.hold("job-1", 1, b"\x02" * 32)
    finally:
        os.close(fd)
    assert "not recorded" in caplog.text
    assert (tmp_path / HISTORY_FILE).read_bytes() == before
    assert history.held("job-1") == (1, b"\x02" * 32)  # kept in memory all the same


def test_every_model_an_update_was_sent_against_is_kept_across_restarts_and_jobs(
        tmp_path: Path) -> None:
    """What the one-update-per-model check reads: every model an update of this site left
    against, with its job and round. Kept across restarts; a history from before it was kept
    reads as none; a merge with an older file (a backup restored under a running site) loses
    none; a damaged record is a clear error, not a check skipped."""
    a, b, c = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
    (tmp_path / HISTORY_FILE).write_text(json.dumps({"version": 1, "last_round": {"job-1": 1}}))
    assert History(tmp_path).sent_against(a) is None
    older = tmp_path / "older"
    older.mkdir()
    History(older).record_sent("job-1", 1, a)
    history = History(tmp_path)
    history.record_sent("job-1", 1, a)
    history.record_sent("job-1", 2, b)
    history.record_sent("job-1", 2, b)  # (the same round's update, recorded again: as it was)
    assert History(tmp_path).sent_against(b) == ("job-1", 2)
    (tmp_path / HISTORY_FILE).write_bytes((older / HISTORY_FILE).read_bytes())
    history.record_sent("job-2", 1, c)  # merges the older file in, then writes
    for h in (history, History(tmp_path)):
        assert [h.sent_against(d) for d in (a, b, c)] == [("job-1", 1), ("job-1", 2),
                                                          ("job-2", 1)]
    assert History(None).sent_against(a) is None
    for damaged in ({"0a" * 32: ["job-1", 0]}, {"0a" * 31: ["job-1", 1]},
                    {"0a" * 32: [1, 1]}, {"0a" * 32: ["job-1", None]}, ["job-1"]):
        (tmp_path / HISTORY_FILE).write_text(json.dumps(
            {"version": 1, "last_round": {}, "sent": damaged}))
        with pytest.raises(SiteError, match="not a round history"):
            History(tmp_path)


@pytest.mark.parametrize("case", ["a-b-a", "another-job", "a-second-site-object",
                                  "no-directory"])
def test_no_second_update_is_recorded_against_a_model_whatever_came_between(
        tmp_path: Path, case: str) -> None:
    """Recording an update against a model this site already sent one against is refused,
    under the lock, before anything leaves: after other models in between (the aggregator
    led the model A -> B -> A: a record of the last model alone let the update through), in
    another job of the same directory, or from a second Site object on the directory made
    before the first sent (its own memory was stale)."""
    a, b = b"\x0a" * 32, b"\x0b" * 32
    first = History(None if case == "no-directory" else tmp_path)
    second = first if case in ("a-b-a", "another-job", "no-directory") else History(tmp_path)
    first.record_sent("job-1", 1, a)
    if case in ("a-b-a", "no-directory"):
        first.record_sent("job-1", 2, b)
    job, number = ("job-2", 1) if case == "another-job" else ("job-1", 3)
    assert second.sent_against(a) == ("job-1", 1)
    with pytest.raises(SiteError, match=r"already sent an update against this model \(job "
                                        r"'job-1', round 1\).*was not sent"):
        second.record_sent(job, number, a)
    assert second.sent_against(a) == ("job-1", 1)


def test_a_history_directory_or_file_others_can_change_is_refused_at_connect(
        tmp_path: Path) -> None:
    """A history_dir others can write (or a history file another user can write) was taken:
    whoever can change it can delete or roll back the record of the models this site sent
    updates against, so that it sends a second update against one, and an aggregator subtract
    the two sums to learn this site's update. Refused at connect, as a shared kit directory
    is; the same directory made private is taken."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SiteError, match=r"shared is writable by its group or other users.*"
                                        r"second update"):
        History(shared)
    shared.chmod(0o700)
    History(shared).spend("job-1", 1, DIGEST)
    (shared / HISTORY_FILE).chmod(0o666)
    with pytest.raises(SiteError, match=rf"{HISTORY_FILE} is writable by its group"):
        History(shared)
    (shared / HISTORY_FILE).chmod(0o600)
    inner = shared / "inner"
    inner.mkdir(mode=0o700)
    shared.chmod(0o777)  # a directory above it others can write: they can swap it
    with pytest.raises(SiteError, match="above the site's history directory"):
        History(inner)
    shared.chmod(0o700)
    assert History(inner).last_round("job-1") == 0


def test_the_history_is_written_whole_and_its_rename_made_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that takes a few bytes at a time still saves the whole history, and the
    directory is synced after the rename: without it a power cut can undo the rename, the
    history rolls back, and the site sends against a model again."""
    import os
    import stat

    import clients.history as history_module

    real_write, real_fsync = os.write, os.fsync
    synced: list[tuple[bool, str]] = []

    def short(fd: int, data: bytes | memoryview) -> int:
        return real_write(fd, bytes(data[:5]))

    def fsync(fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        synced.append((is_dir, HISTORY_FILE if (tmp_path / HISTORY_FILE).exists() else ""))
        real_fsync(fd)

    monkeypatch.setattr(history_module.os, "write", short)
    monkeypatch.setattr(history_module.os, "fsync", fsync)
    History(tmp_path).spend("job-1", 4, DIGEST)
    monkeypatch.undo()
    assert History(tmp_path).check("job-1", 4) is not None
    assert (False, "") in synced and synced[-1] == (True, HISTORY_FILE), synced


def test_the_newest_roster_and_settings_used_are_kept_across_processes_and_an_older_file(
        tmp_path: Path) -> None:
    """A roster, or signed settings, older than the site used (a rollback past remove-site,
    or past a hardening of the settings), or another one of the same version or serial (a
    sign cut short, a serial counter lost), is refused; the record survives a second process
    on the directory and an older history file put back."""
    from secagg.errors import ConfigurationError

    root, other = b"\x01" * 32, b"\x02" * 32
    r = {n: bytes([n]) * 32 for n in range(1, 9)}  # digests
    older = tmp_path / "older"
    older.mkdir()
    History(older).check_federation(root, 1, r[1], 1, r[1])
    first, second = History(tmp_path), History(tmp_path)
    first.check_federation(root, 3, r[3], 4, r[4])
    second.check_federation(other, 1, r[1], 1, r[1])  # another federation's: apart
    (tmp_path / HISTORY_FILE).write_bytes((older / HISTORY_FILE).read_bytes())
    second.check_federation(other, 2, r[2], 2, r[2])  # merges the older file in, then writes
    for h in (History(tmp_path), first, second):
        with pytest.raises(ConfigurationError, match="version 2, older than version 3"):
            h.check_federation(root, 2, r[2], 4, r[4])
        with pytest.raises(ConfigurationError, match="not the version-3 roster"):
            h.check_federation(root, 3, r[5], 4, r[4])
        with pytest.raises(ConfigurationError, match="serial 3, older than serial 4"):
            h.check_federation(root, 3, r[3], 3, r[3])
        with pytest.raises(ConfigurationError, match="not the serial-4 settings"):
            h.check_federation(root, 3, r[3], 4, r[6])
        h.check_federation(root, 3, r[3], 4, r[4])
        with pytest.raises(ConfigurationError, match="older"):
            h.check_federation(other, 1, r[1], 2, r[2])
    no_directory = History(None)
    no_directory.check_federation(root, 5, r[5], 5, r[5])
    with pytest.raises(ConfigurationError, match="older"):
        no_directory.check_federation(root, 4, r[4], 5, r[5])


def test_a_directory_stays_claimed_while_any_site_of_the_process_holds_it(tmp_path: Path) -> None:
    """Two Sites of one process share the directory's claim: closing the first leaves it
    locked for the second (another process is still refused at connect), and closing the
    last lets it go."""
    import subprocess
    import sys

    from clients.history import IN_USE_FILE, claim_directory

    probe = ("import fcntl, os, sys\n"
             "fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except OSError:\n    sys.exit(3)\n")

    def locked_elsewhere() -> bool:
        done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / IN_USE_FILE)],
                              timeout=60)
        return done.returncode == 3

    first, second = claim_directory(tmp_path), claim_directory(tmp_path)
    assert locked_elsewhere()
    first.release()
    first.release()  # (once per claim: a second release takes nothing of the other's)
    assert locked_elsewhere()
    second.release()
    assert not locked_elsewhere()
