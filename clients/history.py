"""What rounds this site has sent an update to, kept in its directory across restarts.

A lying aggregator that could run a round number twice, reporting the first as failed after it
had unmasked (or had the key holder release) it, would get two sums over the same updates and
choose which sites each covers: their difference is one site's update. Round ids already name
the federation, the job (``[job] id``) and the number (``FederationConfig.check_round_id``);
this record makes a site take part in each round number of a job at most once, and only in
increasing order, however often its training script restarts. A job started again on a fresh
store needs a new ``[job] id`` in every party's federation.toml.

The record is written (atomically, synced) before the first message of an update leaves the
site: a crash after that point costs the site that round, never a second sending.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from clients.errors import SiteError

HISTORY_FILE = "history.json"


class History:
    def __init__(self, directory: str | Path | None) -> None:
        self._path = None if directory is None else Path(directory).resolve() / HISTORY_FILE
        self._last: dict[str, int] = {}  # job id -> the last round number this site sent to
        if self._path is not None and self._path.exists():
            self._last = _read(self._path)

    def last_round(self, job: str) -> int:
        return self._last.get(job, 0)

    def check(self, job: str, round_number: int) -> str | None:
        """Why this site must not take part in ``round_number`` of ``job``, or None."""
        last = self.last_round(job)
        # defence: sdk.round-once
        if round_number <= last:
            return (f"this site already sent an update to round {last} of job {job!r}; it "
                    f"takes part in each round once, in order (a job started again needs a new "
                    f"[job] id)")
        return None

    def spend(self, job: str, round_number: int) -> None:
        """Record ``round_number`` as sent to, durably, before anything of the update leaves.
        Under an exclusive lock on the directory's history, re-read first: two ``Site``
        objects on one directory (a training script restarted while the old one still runs,
        two workers) cannot both send to one round."""
        if self._path is None:
            # defence: sdk.round-once-without-a-directory
            problem = self.check(job, round_number)
            if problem:
                raise SiteError(problem)
            self._last[job] = round_number
            return
        with _locked(self._path.with_name(f".{HISTORY_FILE}.lock")):
            # defence: sdk.round-once-across-processes
            if self._path.exists():
                for name, last in _read(self._path).items():
                    self._last[name] = max(self._last.get(name, 0), last)
            problem = self.check(job, round_number)
            if problem:
                raise SiteError(problem)
            self._last[job] = round_number
            self._write()

    def _write(self) -> None:
        assert self._path is not None
        data = json.dumps({"version": 1, "last_round": self._last}, sort_keys=True).encode()
        tmp = self._path.with_name(f".{HISTORY_FILE}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
            dir_fd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        # defence: sdk.history-write-failure-is-a-site-error
        except OSError as e:  # (the round stays spent in this process either way)
            raise SiteError(f"cannot record this round in {self._path}: {e.strerror}; the "
                            "update was not sent") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise SiteError(f"cannot lock {path}: {e.strerror}; the update was not sent") from None
    try:
        try:
            import fcntl  # (POSIX; elsewhere the record is kept without a lock)

            # defence: sdk.history-locked
            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:
            pass
        except OSError as e:
            raise SiteError(f"cannot lock {path}: {e.strerror}; the update was not sent"
                            ) from None
        yield
    finally:
        os.close(fd)  # (closing releases the lock)


def _read(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_bytes())
        last = data["last_round"]
        # defence: sdk.history-version
        if (data.get("version") != 1 or not isinstance(last, dict)
                or not all(isinstance(k, str) and type(v) is int and v >= 0
                           for k, v in last.items())):
            raise ValueError("unexpected content")
        return dict(last)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "it is not a round history"
        raise SiteError(f"cannot read {path}: {reason}; it records which rounds this site "
                        "took part in (restore it from a backup rather than delete it)") from None
