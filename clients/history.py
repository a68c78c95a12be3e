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

It also keeps, per job, the model the site holds (the digest of the last round's result it
accepted, or of the model it last trained from) and the round that model belongs to, so that a
restarted training script still accepts only a model that follows from it (``Site._join``):
without it, an aggregator could hand every restarted site a model of its own making.

And every model this site sent an update against (by ``FlatModel.training_digest``: what
training sees of it, so a re-encoding is the same model; and by ``training_digest_as`` the
dtypes of the state the site submitted, so a float64 model moved below the precision of the
site's float32 training is the same model too), in any job kept in this directory,
with the job and round it was for (``sent_against``): a site sends one update per model. An
aggregator that reported a round aborted after summing it (or published its model again as
its result, or led the model A -> B -> A) and opened another round from the same model,
without one site, had the other sites train again from it: with deterministic training
(full-batch, or seeded apart from the round), the difference of the two sums was that site's
update, exactly, under either protocol (helpers' attacks). The record is checked and written
under the lock, after taking in what another process on the directory recorded, before the
update leaves: neither a restart nor a second Site on the directory can send twice against
one model.

And, per job, the last masking round whose sum holds this site's input, with how far that
round's average can be from zero (``in_sum``): an auditor's record of the bound the site
holds that round's result to. The site itself does not read it back: a site that did not see
the round's result (told the round aborted, or restarted while it waited) checks the result
it later finds in the chain of rounds it missed against the same bound, recomputed from
public values (``Site._follow_chain``).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from clients.errors import DirectoryInUse, SiteError
from secagg.ckks.keys import KeyHolder
from secagg.errors import ConfigurationError, RefusalReason, RefusedMessage, SecAggError
from secagg.federation.kit import check_history_directory, directory_path
from secagg.hazmat.secret import scrubs_locals

HISTORY_FILE = "history.json"
IN_USE_FILE = ".site-in-use.lock"  # locked by the process a Site of the directory runs in
KEY_FILE_PREFIX = "ckks-round-key-"  # a CKKS key holder's key for a job's running round

_log = logging.getLogger("clients.history")


class AnotherKeyKept(SiteError):
    """``History.keep_key``: the directory may keep another key for the round (another
    process's, or one kept before a restart), or the round was sent to already: this key
    must not be announced (two keys of one round, each released over other sites, are one
    site's update)."""


class KeyNotWritten(SiteError):
    """``History.keep_key``: the key could not be written, and no file holds it (or every
    release under it is recorded first, and refused if it cannot be)."""


NOT_SENT = "; the update was not sent"  # what a failure to record a spent round means


class History:
    def __init__(self, directory: str | Path | None) -> None:
        # (a missing one, or a file, was found out only at the first submit, after training)
        if directory is not None:
            directory = directory_path(directory, "history directory")
        # defence: sdk.history-dir-checked
        if directory is not None and not Path(directory).is_dir():
            raise SiteError(f"the history directory {directory} is not a directory (it must "
                            "exist, be writable, and be kept across restarts)")
        if directory is not None:
            try:
                check_history_directory(Path(directory),
                                        (HISTORY_FILE, f".{HISTORY_FILE}.lock", IN_USE_FILE))
            except ConfigurationError as e:
                raise SiteError(str(e)) from None
        self._path = None if directory is None else Path(directory).resolve() / HISTORY_FILE
        self._last: dict[str, int] = {}  # job id -> the last round number this site sent to
        # job id -> (round, digest): the model this site holds and the round it belongs to
        self._held: dict[str, tuple[int, bytes]] = {}
        # job id -> (round, (L2 bound, element bound)): the last round whose sum holds this
        # site's input, and how far that round's average can be from zero
        self._in_sum: dict[str, tuple[int, tuple[float, float]]] = {}
        # training digest (FlatModel.training_digest) -> (job id, round): every model an
        # update of this site was computed against, and the round it was sent to
        self._sent: dict[bytes, tuple[str, int]] = {}
        # trust root (hex) -> the highest roster version this site has used under it and
        # that roster's digest, the highest settings serial and those settings' digest (hex)
        self._federations: dict[str, tuple[int, str, int, str]] = {}
        if self._path is not None and self._path.exists():
            (self._last, self._held, self._in_sum, self._sent,
             self._federations) = _read(self._path)

    def check_federation(self, trust_root: bytes, roster_version: int, roster_digest: bytes,
                         settings_serial: int, settings_digest: bytes) -> None:
        """Refuse a roster, or signed settings, older than this site has already used under
        the same trust root, or another one under the same version or serial; record newer
        ones. Every roster a federation's signer signed stays validly signed, and so do its
        settings: a roster from before ``remove-site``, put back in a site's directory by
        whoever carries its files, brought the removed site (a colluder, or one whose keys
        leaked) back into the sums, and settings from before a hardening (a higher
        threshold, another CKKS key holder) took it back; a sign cut short left a second
        roster of one version, and a lost serial file a second settings of one serial (a
        helper's attacks). A failure to record is logged, not raised (nothing is sent here;
        what is in use was checked)."""
        if self._path is not None and self._path.exists():
            self._merge()
        key = trust_root.hex()
        seen = self._federations.get(key, (0, "", 0, ""))
        roster = (roster_version, roster_digest.hex())
        settings = (settings_serial, settings_digest.hex())
        # defence: sdk.roster-never-rolled-back
        if roster[0] < seen[0] or (roster[0] == seen[0] and roster[1] != seen[1]):
            raise ConfigurationError(
                f"the roster is version {roster_version}, " + (
                    f"older than version {seen[0]}, which this site has already used: an old "
                    "roster (one from before a site was removed) is refused"
                    if roster[0] < seen[0] else
                    "but not the version-" + str(seen[0]) + " roster this site has already "
                    "used (two rosters of one version: one of them from a sign cut short)")
                + "; ask the federation's operator for its current roster.bin")
        # defence: sdk.settings-never-rolled-back
        if settings[0] < seen[2] or (settings[0] == seen[2] and settings[1] != seen[3]):
            raise ConfigurationError(
                f"the config's signed settings are serial {settings_serial}, " + (
                    f"older than serial {seen[2]}, which this site has already used: old "
                    "settings are refused" if settings[0] < seen[2] else
                    f"but not the serial-{seen[2]} settings this site has already used (two "
                    "settings of one serial)")
                + "; ask the federation's operator for its current federation.toml and "
                "settings.sig")
        newest = (*max(roster, seen[:2]), *max(settings, seen[2:]))
        if newest != seen:
            self._federations[key] = newest
            self._save("the roster and settings this site uses")

    def sent_against(self, model_digest: bytes) -> tuple[str, int] | None:
        """The job and round of an update this site sent against the model whose
        ``training_digest`` is ``model_digest``, or None (re-read: another Site on the
        directory may have sent since)."""
        if self._path is not None and self._path.exists():
            self._merge()
        return self._sent.get(model_digest)

    def record_sent(self, job: str, round_number: int, *model_digests: bytes) -> None:
        """Record, durably and before it leaves, that ``round_number``'s update (computed
        against the model whose training digests are ``model_digests``: the model's, and the
        model's as the site's tensors hold it) is being sent. A SiteError, and nothing is
        sent, if this site already sent an update against that model (in another round or
        job: checked here, under the lock, after taking in what another process recorded)
        or if it cannot be recorded."""
        def add() -> None:
            # defence: sdk.every-digest-checked-when-recorded
            for model_digest in model_digests:
                found = self._sent.get(model_digest)
                # defence: sdk.sent-model-checked-when-recorded
                if found is not None and found != (job, round_number):
                    raise SiteError(one_update_per_model(found) + NOT_SENT)
            for model_digest in model_digests:
                self._sent[model_digest] = (job, round_number)

        if self._path is None:
            add()
            return
        with _locked(self._path.with_name(f".{HISTORY_FILE}.lock")):
            self._merge()
            add()
            self._write()

    def in_sum(self, job: str, round_number: int) -> tuple[float, float] | None:
        """The bound on ``round_number``'s average, if this site's input is in its sum."""
        found = self._in_sum.get(job)
        return found[1] if found is not None and found[0] == round_number else None

    def record_in_sum(self, job: str, round_number: int, bound: tuple[float, float]) -> None:
        """Record that this site's input is in ``round_number``'s sum, with the bound on its
        average (logged, not raised, if it cannot be written: the running round still checks
        its result with the bound it holds)."""
        self._in_sum[job] = (round_number, (float(bound[0]), float(bound[1])))
        self._save("the round this site's input is in")

    def last_round(self, job: str) -> int:
        return self._last.get(job, 0)

    def held(self, job: str) -> tuple[int, bytes] | None:
        """The model this site holds in ``job`` (the round it belongs to, its digest), or None
        before its first round."""
        return self._held.get(job)

    def hold(self, job: str, round_number: int, digest: bytes) -> None:
        """Record the model this site now holds (a round's result it accepted). A failure to
        record it is logged, not raised: the result is good, and the next round's model is
        then checked from what was recorded before."""
        self._held[job] = (round_number, digest)
        self._save("the model this site holds")

    def _save(self, what: str) -> None:
        """Write the history (merged with another process's) under its lock; a failure is
        logged, naming ``what`` went unrecorded, not raised."""
        if self._path is None:
            return
        try:
            # (nothing is being sent here: the failure says only what went unrecorded)
            # defence: sdk.history-records-under-the-lock
            with _locked(self._path.with_name(f".{HISTORY_FILE}.lock"), after=""):
                self._merge()
                self._write(after="")
        except SiteError as e:
            _log.warning("%s was not recorded: %s", what, e)

    def check(self, job: str, round_number: int) -> str | None:
        """Why this site must not take part in ``round_number`` of ``job``, or None."""
        last = self.last_round(job)
        # defence: sdk.round-once
        if round_number <= last:
            # (a round is recorded before its first message leaves: one interrupted before
            # anything left was reported as "already sent an update")
            # (an older round than the last named the last as the one taken part in again)
            which = (f"round {last}" if round_number == last else
                     f"round {last}, after round {round_number}")
            return (f"this site already took part in {which} of job {job!r} (a round is "
                    f"recorded before its first message leaves, and not taken up again if "
                    f"interrupted); it takes part in each round once, in order (a job started "
                    f"again needs a new [job] id)")
        return None

    def spend(self, job: str, round_number: int, model_digest: bytes,
              key: tuple[str, bytes] | None = None) -> None:
        """Record ``round_number`` as sent to, durably, before anything of the update leaves,
        with the model the update is against (the round's, which this site now holds).
        Under an exclusive lock on the directory's history, re-read first: two ``Site``
        objects on one directory (a training script restarted while the old one still runs,
        two workers) cannot both send to one round. ``key``: a CKKS key holder's (round id,
        key id), refused if the directory keeps another key for the round."""
        if self._path is None:
            # defence: sdk.round-once-without-a-directory
            problem = self.check(job, round_number)
            if problem:
                raise SiteError(problem)
            self._last[job] = round_number
            self._held[job] = (round_number - 1, model_digest)
            return
        with _locked(self._path.with_name(f".{HISTORY_FILE}.lock")):
            # defence: sdk.round-once-across-processes
            self._merge()
            problem = self.check(job, round_number)
            if problem:
                raise SiteError(problem)
            if key is not None:
                self._check_own_key(job, *key)
            self._last[job] = round_number
            self._held[job] = (round_number - 1, model_digest)
            self._write()

    def _merge(self) -> None:
        """Take in what another process on this directory recorded (the later of each, and
        every model sent against)."""
        assert self._path is not None
        if self._path.exists():
            last, held, in_sum, sent, federations = _read(self._path)
            for root, theirs in federations.items():
                mine = self._federations.get(root, (0, "", 0, ""))
                # defence: sdk.history-merge-keeps-the-later-roster
                self._federations[root] = (*max(mine[:2], theirs[:2]),
                                           *max(mine[2:], theirs[2:]))
            for name, n in last.items():
                # defence: sdk.history-merge-keeps-the-later-round
                self._last[name] = max(self._last.get(name, 0), n)
            for name, h in held.items():
                if name not in self._held or h[0] > self._held[name][0]:
                    self._held[name] = h
            for name, b in in_sum.items():
                # defence: sdk.history-merge-keeps-the-later-bound
                if name not in self._in_sum or b[0] > self._in_sum[name][0]:
                    self._in_sum[name] = b
            for model, jr in sent.items():
                # defence: sdk.history-merge-keeps-every-sent
                self._sent.setdefault(model, jr)

    def _write(self, after: str = NOT_SENT) -> None:
        assert self._path is not None
        data = json.dumps({"version": 1, "last_round": self._last,
                           "held": {job: [n, digest.hex()] for job, (n, digest)
                                    in self._held.items()},
                           "in_sum": {job: [n, list(bound)] for job, (n, bound)
                                      in self._in_sum.items()},
                           "sent": {digest.hex(): [job, n] for digest, (job, n)
                                    in self._sent.items()},
                           "federations": {root: list(seen) for root, seen
                                           in self._federations.items()}},
                          sort_keys=True).encode()
        try:
            _write_private(self._path, data)
        # defence: sdk.history-write-failure-is-a-site-error
        except OSError as e:  # (the round stays spent in this process either way)
            raise SiteError(f"cannot record this round in {self._path}: {e.strerror}"
                            f"{after}") from None

    # ---- a CKKS key holder's round key --------------------------------------------------------

    def key_path(self, job: str) -> Path | None:
        """Where this site keeps its round key in ``job`` (one file a job: jobs sharing the
        history directory keep theirs apart), or None without a history directory."""
        if self._path is None:
            return None
        # defence: sdk.kept-key-per-job
        return self._path.with_name(
            f"{KEY_FILE_PREFIX}{hashlib.sha256(job.encode()).hexdigest()[:16]}.json")

    @scrubs_locals  # (the secret context passes through its frame)
    def keep_key(self, job: str, round_number: int, round_id: str, key: KeyHolder,
                 expires_in: float = 86400.0) -> None:
        """Keep this key holder's key for the round (``key_path``: 0600, durably) and have
        every release under it recorded there first (``_record_release``): a training script
        restarted mid-round then releases its round (``load_key``), where the round, and with
        it every site's update against its model, was lost. Called before the key is
        announced; one file a job, for its running round (``drop_key`` at its end,
        ``drop_stale_key`` at the next). Without a history directory, nothing is kept. A
        SiteError if it cannot be written: the file is then deleted, or if that fails too,
        every release under the key is refused (a file may hold it with no record); one if
        another process on the directory keeps another key for the round. ``expires_in``: the
        seconds after which the round is over whatever became of it (``drop_expired_keys``)."""
        path = self.key_path(job)
        if path is None:
            return
        # (any other SiteError, the lock not taken or the history unreadable, is raised as
        # it is: the key is not announced, and the script is told why)
        self._keep_key(path, job, round_number, round_id, key, expires_in)

    def _keep_key(self, path: Path, job: str, round_number: int, round_id: str,
                  key: KeyHolder, expires_in: float) -> None:
        recorder = functools.partial(self._record_release, job, key.key_id)
        with _locked(self._lock_path(), after=""):
            # a round this directory sent to has had its key (kept, or gone with the
            # process that sent): a new one for it, kept by a process whose view of the
            # history was older, was released by the next restart as the round's second
            # (a helper's finding)
            # defence: sdk.no-key-kept-for-a-spent-round
            self._merge()
            if self.check(job, round_number):
                raise AnotherKeyKept(f"round {round_id!r} was sent to already (by another "
                                     "process on this directory)")
            # (an unreadable key is not taken for no key: it would be replaced)
            # defence: sdk.unreadable-kept-key-not-replaced
            try:
                kept = self._read_key(path)
            except OSError as e:
                raise AnotherKeyKept(f"cannot read {path}: {e.strerror}") from None
            # (two processes on the directory joining one round: the second's key, never
            # announced if the first's was, replaced the first's, whose releases were then
            # refused as "replaced")
            # defence: sdk.kept-key-not-replaced-within-its-round
            if (kept is not None and kept.get("round_id") == round_id
                    and kept.get("key_id") != key.key_id.hex()):
                raise AnotherKeyKept(f"another process on {path.parent} keeps a key for "
                                     f"round {round_id!r}")
            try:
                self._write_key(path, {
                    "version": 1, "job": job, "round": round_number, "round_id": round_id,
                    "expires": time.time() + max(0.0, float(expires_in)),
                    "key_id": key.key_id.hex(),
                    "releases": {r: d.hex() for r, d in key.releases.items()},
                    "context": base64.b64encode(key.export_secret_context()).decode()})
            except SiteError as e:
                # (the write can fail after the file was put in place: a directory fsync's
                # EIO. A file left holding the key with no record of its releases would let
                # another process release another aggregate: deleted, or, if it cannot be,
                # every release is recorded, and refused when it cannot be)
                # defence: sdk.kept-key-failed-write-leaves-no-key
                if not _unlink_all(path):
                    key.release_recorder = recorder
                raise KeyNotWritten(str(e)) from None
        # defence: sdk.kept-key-releases-recorded
        key.release_recorder = recorder

    @scrubs_locals
    def load_key(self, job: str, round_id: str) -> KeyHolder | None:
        """The key kept for ``round_id`` with the releases made under it (every further
        release recorded first, as ``keep_key``'s), or None: none kept, another round's, or
        unusable (logged; one that others could read or write is deleted)."""
        path = self.key_path(job)
        if path is None:
            return None
        try:
            with _locked(self._lock_path(), after=""):
                kept = self._read_key(path)
        except (SiteError, OSError) as e:
            _log.warning("the round key in %s cannot be read: %s", path,
                         getattr(e, "strerror", None) or e)
            return None
        if kept is None or kept.get("round_id") != round_id:
            return None
        try:
            releases = {str(r): bytes.fromhex(d) for r, d in kept["releases"].items()}
            key = KeyHolder.from_secret_context(base64.b64decode(kept.pop("context")),
                                                releases=releases)
            # defence: sdk.kept-key-is-the-recorded-one
            if key.key_id.hex() != kept["key_id"]:
                raise ValueError("another key")
        except (KeyError, TypeError, ValueError, AttributeError, SecAggError) as e:
            _log.warning("the round key in %s cannot be used: %s", path, type(e).__name__)
            return None
        key.release_recorder = functools.partial(self._record_release, job, key.key_id)
        return key

    @scrubs_locals
    def _record_release(self, job: str, key_id: bytes, round_id: str, aggregate: bytes) -> None:
        """Record, under the history's lock and before it is decrypted, that the kept key
        releases ``aggregate`` for ``round_id``; refuse what another process holding the key
        (a script restarted while the old one still runs, a second Site on the directory)
        released, or spent, first: two releases of two aggregates are one site's update."""
        path = self.key_path(job)
        assert path is not None
        with _locked(self._lock_path(), after=""):
            try:
                kept = self._read_key(path)
            # defence: sdk.kept-key-unreadable-record-refuses
            except OSError as e:
                raise RefusedMessage(RefusalReason.ALREADY_RELEASED, f"the kept key's record "
                                     f"of its releases cannot be read: {e.strerror}") from None
            # (the record of what was released under the key went with it: a process still
            # holding the key after its round ended, or after another round's key replaced
            # it, could release an aggregate other than the one released)
            if kept is None:
                raise RefusedMessage(RefusalReason.ALREADY_RELEASED,
                                     f"the kept key of round {round_id!r} is gone (another "
                                     "process on this directory ended its round)")
            # defence: sdk.kept-key-is-still-the-rounds
            if kept.get("round_id") != round_id or kept.get("key_id") != key_id.hex():
                raise RefusedMessage(RefusalReason.ALREADY_RELEASED,
                                     f"the kept key of round {round_id!r} was replaced by "
                                     "another round's (another process on this directory)")
            releases = kept.get("releases")
            if not isinstance(releases, dict):
                raise RefusedMessage(RefusalReason.ALREADY_RELEASED, "the kept key's record "
                                     "of its releases cannot be read")
            previous = releases.get(round_id)
            # defence: sdk.kept-key-release-recorded-first
            if previous is not None and previous != aggregate.hex():
                raise RefusedMessage(RefusalReason.ALREADY_RELEASED,
                                     f"round {round_id!r} was already decrypted for other "
                                     "uploads (by another process holding the kept key)")
            releases[round_id] = aggregate.hex()
            try:
                self._write_key(path, kept)
            except SiteError as e:
                raise RefusedMessage(RefusalReason.ALREADY_RELEASED,
                                     f"the release cannot be recorded with the kept key: "
                                     f"{e}") from None

    @scrubs_locals
    def extend_key(self, job: str, round_id: str, key_id: bytes, expires_in: float) -> None:
        """Have the key ``key_id`` kept for ``round_id`` expire no sooner than ``expires_in``
        seconds from now: the site stays in its round longer than it was kept for (a round
        waiting for its sites, for up to a day; a training run longer than the round's
        patience), and a restart after it found the key gone, and lost the round. Only that
        key; a failure is logged, not raised (the key then expires as it was kept)."""
        def extend(path: Path, kept: dict[str, Any] | None) -> None:
            if kept is None or not _is_the_key(kept, round_id, key_id):
                return
            until = time.time() + max(0.0, float(expires_in))
            expires = kept.get("expires")
            if isinstance(expires, int | float) and expires >= until:
                return
            kept["expires"] = until
            self._write_key(path, kept)

        self._on_kept_key(job, "kept longer", extend)

    def drop_key(self, job: str, round_id: str, key_id: bytes) -> None:
        """Delete the key ``key_id`` kept for ``round_id`` (its round is over: keys are fresh
        per round); not another round's or another key, which another process on the
        directory may hold now. A failure is logged, not raised."""
        def drop(path: Path, kept: dict[str, Any] | None) -> None:
            # defence: sdk.kept-key-dropped-only-for-its-round
            if kept is None or _is_the_key(kept, round_id, key_id):
                _unlink_all(path, quiet=False)

        self._on_kept_key(job, "deleted", drop)

    def _on_kept_key(self, job: str, done: str,
                     act: Callable[[Path, dict[str, Any] | None], None]) -> None:
        """``act`` on the key kept in ``job`` (None if none), under the history's lock; a
        failure is logged as the key not ``done``, not raised."""
        path = self.key_path(job)
        if path is None:
            return
        try:
            with _locked(self._lock_path(), after=""):
                act(path, self._read_key(path))
        except (SiteError, OSError) as e:
            _log.warning("the round key in %s could not be %s: %s", path, done,
                         getattr(e, "strerror", None) or e)

    @scrubs_locals
    def drop_stale_key(self, job: str, round_number: int) -> None:
        """Delete the key kept in ``job`` if it is not for ``round_number`` (the round
        running now): its round ended while this site was away, or the job did
        (``round_number`` 0). A failure is logged, not raised."""
        path = self.key_path(job)
        # defence: sdk.stale-key-temporary-swept
        if path is None or not (path.exists() or _tmp(path).exists()):
            return
        try:
            with _locked(self._lock_path(), after=""):
                kept = self._read_key(path)
                # defence: sdk.stale-round-key-deleted
                if kept is None or kept.get("round") != round_number:
                    _unlink_all(path, quiet=False)
        except (SiteError, OSError) as e:
            _log.warning("the round key in %s could not be deleted: %s", path,
                         getattr(e, "strerror", None) or e)

    @scrubs_locals
    def drop_expired_keys(self) -> None:
        """Delete every kept round key (of any job) whose round is over by its time: a key
        holder away when its job ended, which never polls that job again, kept it for good.
        A failure is logged, not raised."""
        if self._path is None:
            return
        for path in sorted(self._path.parent.glob(f"{KEY_FILE_PREFIX}*.json")):
            try:
                with _locked(self._lock_path(), after=""):
                    kept = self._read_key(path)
                    expires = kept.get("expires") if kept is not None else None
                    # defence: sdk.expired-round-keys-deleted
                    if kept is None or not isinstance(expires, int | float) or (
                            expires < time.time()):
                        _unlink_all(path, quiet=False)
            except (SiteError, OSError) as e:
                _log.warning("the round key in %s could not be deleted: %s", path,
                             getattr(e, "strerror", None) or e)
        # a key's temporary left by a crash mid-write (every key is written under the lock:
        # under it, none is being written) holds the secret context as well, under a name
        # the glob above does not match; a job never polled again kept it for good
        # defence: sdk.orphan-key-temporaries-deleted
        for tmp in sorted(self._path.parent.glob(f".{KEY_FILE_PREFIX}*.json.tmp")):
            try:
                with _locked(self._lock_path(), after=""):
                    os.unlink(tmp)
            except FileNotFoundError:
                pass
            except (SiteError, OSError) as e:
                _log.warning("the round key's temporary %s could not be deleted: %s", tmp,
                             getattr(e, "strerror", None) or e)

    def _check_own_key(self, job: str, round_id: str, key_id: bytes) -> None:
        """(Under the lock.) The round is sent to by the process whose key is the one kept
        for it, if one is: a process whose key was not kept (its write failed, or its lock
        timed out) sent first and released, and the restart after released the kept one."""
        path = self.key_path(job)
        assert path is not None
        # defence: sdk.unreadable-kept-key-not-sent-past
        try:
            kept = self._read_key(path)
        except OSError as e:
            raise SiteError(f"cannot read {path}: {e.strerror}") from None
        # defence: sdk.round-spent-only-with-its-kept-key
        if (kept is not None and kept.get("round_id") == round_id
                and kept.get("key_id") != key_id.hex()):
            raise SiteError(f"this directory keeps another key for round {round_id!r} (another "
                            "process's): this process's key is not the round's")

    def _lock_path(self) -> Path:
        assert self._path is not None
        return self._path.with_name(f".{HISTORY_FILE}.lock")

    @scrubs_locals
    def _write_key(self, path: Path, kept: dict[str, Any]) -> None:
        try:
            _write_private(path, json.dumps(kept).encode())
        except OSError as e:
            raise SiteError(f"cannot keep this key holder's round key in "
                            f"{path.parent}: {e.strerror}") from None

    @scrubs_locals
    def _read_key(self, path: Path) -> dict[str, Any] | None:
        """The kept key's record, or None (none, or unusable: logged; one another user could
        read or write is deleted, as it may be known). An OSError but a missing file is
        raised."""
        try:
            info = os.lstat(path)
            # defence: sdk.kept-key-private, sdk.kept-key-owned
            if info.st_mode & 0o077 or info.st_uid != os.geteuid():
                _log.warning("the round key in %s is readable or writable by others, or "
                             "not this user's: deleted, not used", path)
                _unlink_all(path)
                return None
            kept = json.loads(_read_bytes(path))
        except FileNotFoundError:
            return None
        # (an I/O error says nothing of the key: raised, never taken for "no key", which
        # deleted a live one or refused its release as gone)
        except ValueError as e:  # (content: unusable, whoever wrote it)
            _log.warning("the round key in %s cannot be read: %s", path, type(e).__name__)
            return None
        # defence: sdk.kept-key-format-checked
        if not isinstance(kept, dict) or kept.get("version") != 1:
            _log.warning("the round key in %s cannot be read: unexpected content", path)
            return None
        return kept


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _unlink_all(path: Path, quiet: bool = True) -> bool:
    """Delete ``path`` and its temporary; True if neither is left (``quiet``: an OSError is
    a False; else raised)."""
    # defence: sdk.kept-key-temporary-deleted-with-it
    for p in (path, _tmp(path)):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError:
            if not quiet:
                raise
            return False
    return True


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, atomically and durably, readable by its owner only."""
    tmp = _tmp(path)
    # a new file, never one found there: a link planted at the temporary name (in a
    # shared history_dir) had its target overwritten with the history
    # defence: sdk.history-temp-never-followed
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # (a leftover of a crash, or a planted link: not its target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        # defence: sdk.history-written-whole
        while view:  # (a write may take fewer bytes than it was given)
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        # (without it a power cut can undo the rename: the history rolls back)
        # defence: sdk.history-rename-durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def one_update_per_model(found: tuple[str, int], model: str = "this model") -> str:
    """Why a site sends no second update against a model (``found``: the job and round of
    its first)."""
    return (f"this site already sent an update against {model} (job {found[0]!r}, round "
            f"{found[1]}): a second one would let the aggregator subtract the sums of two "
            "rounds over other sites and learn one site's update, so a site sends one update "
            "per model (a job must start from a model no site has trained from in this "
            "federation)")


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
HISTORY_LOCK_SECONDS = 30.0  # another Site on the directory holds it for one write at most
MAX_HISTORY_BYTES = 16 << 20  # (about 100 bytes a round sent to: some 160,000 rounds)


def _flock_within(fd: int, path: Path, fcntl: Any, after: str) -> None:
    """The exclusive lock, or a SiteError after HISTORY_LOCK_SECONDS: a lock held for good
    (by another user of a shared history_dir) hung the site after training, silently."""
    # defence: sdk.history-lock-bounded
    end = time.monotonic() + HISTORY_LOCK_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= end:
                raise SiteError(f"{path} has been locked by another process for "
                                f"{HISTORY_LOCK_SECONDS:g} s (another Site on this history "
                                f"directory?){after}") from None
            time.sleep(0.05)


_claims_lock = threading.Lock()
# lock file -> [its descriptor, Sites holding it, the process that locked it]
_claims: dict[Path, list[int]] = {}


class DirectoryClaim:
    """This process's claim on a site's directories (``claim_directory``), until
    ``release``."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths: list[Path] | None = paths

    def release(self) -> None:
        with _claims_lock:
            paths, self._paths = self._paths, None
            for path in paths or ():
                held = _claims.get(path)
                if held is None or held[2] != os.getpid():
                    continue  # (a forked child's copy: the lock is its parent's)
                held[1] -= 1
                if held[1] == 0:
                    del _claims[path]
                    os.close(held[0])  # (closing releases the lock)


def claim_directory(directory: str | Path, also: str | Path | None = None) -> DirectoryClaim:
    """Lock ``directory``'s IN_USE_FILE (and, where it can be written, ``also``'s: the site
    directory, when the history is kept elsewhere) for this process, or refuse with
    DirectoryInUse naming the process that holds it. Two processes on one site directory
    stayed safe (the record is checked under a lock before anything leaves) but the second
    was told only at its first submit, after training a round for nothing; now it is told
    at connect. Two processes of one site that keep their histories apart (each its own
    ``history_dir``) were never safe, each sending against the models the other had sent
    against: the site directory's lock refuses the second too (unless that directory is
    read-only, the one reason to keep the history elsewhere).

    Sites of one process share the claim (each is safe beside the other as before). The
    lock is a POSIX record lock, which belongs to the process: a process that ends lets it
    go, and a child forked from the training script (a DataLoader worker) holds none of it
    (an ``flock`` would have been shared with the child, which kept the directory locked
    after its parent closed its Site, in the parent's name)."""
    folders = [(Path(directory).resolve(), False)]
    if also is not None and Path(also).resolve() != folders[0][0]:
        folders.append((Path(also).resolve(), True))
    taken: list[Path] = []
    try:
        for folder, optional in folders:
            if _claim(folder / IN_USE_FILE, folder, optional=optional):
                taken.append(folder / IN_USE_FILE)
    except BaseException:
        DirectoryClaim(taken).release()
        raise
    return DirectoryClaim(taken)


def _claim(path: Path, directory: Path, optional: bool) -> bool:
    """Lock one IN_USE_FILE (True), or for an ``optional`` one that cannot be written
    (a read-only site directory), nothing (False)."""
    with _claims_lock:
        held = _claims.get(path)
        if held is not None and held[2] != os.getpid():
            # a forked child's copy of its parent's registry: the parent's lock, not ours
            del _claims[path]
            with contextlib.suppress(OSError):
                os.close(held[0])  # (a record lock is the process's: the parent keeps it)
            held = None
        if held is not None:
            held[1] += 1
            return True
        try:  # (never through a link: its target would be truncated and written to)
            fd = os.open(path, os.O_CREAT | os.O_RDWR | _NOFOLLOW, 0o600)
        except OSError as e:
            if optional and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return False
            raise SiteError(f"cannot lock {path}: {e.strerror}") from None
        try:
            import fcntl  # (POSIX; elsewhere a second process is told at its submit)
        except ImportError:
            _claims[path] = [fd, 1, os.getpid()]
            return True
        try:
            # defence: sdk.directory-claimed-at-connect
            fcntl.lockf(fd, fcntl.LOCK_NB | fcntl.LOCK_EX)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DirectoryInUse(
                    f"another process{holder} runs a Site of {directory} (a training "
                    "script of this site already running?): one process per site; stop it "
                    "first, or wait for it to end") from None
            raise SiteError(f"cannot lock {path}: {e.strerror}") from None
        try:  # (the holder's pid, for the next process's message only)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass
        _claims[path] = [fd, 1, os.getpid()]
        return True


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 16, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {int(text)})" if text.isdigit() and len(text) <= 10 else ""


def _read_bytes(path: Path) -> bytes:
    """The history file's bytes: a regular file, not followed through a link, bounded (a link
    to a FIFO hung the site at connect, one to /dev/zero filled its memory)."""
    # defence: sdk.history-read-regular-file
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_HISTORY_BYTES:
            raise ValueError("not a regular file of a history's size")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_HISTORY_BYTES + 1)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path, after: str = NOT_SENT) -> Iterator[None]:
    try:
        # defence: sdk.history-lock-never-followed
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    except OSError as e:
        raise SiteError(f"cannot lock {path}: {e.strerror}{after}") from None
    try:
        try:
            import fcntl  # (POSIX; elsewhere the record is kept without a lock)

            # defence: sdk.history-locked
            _flock_within(fd, path, fcntl, after)
        except ImportError:
            pass
        except OSError as e:
            raise SiteError(f"cannot lock {path}: {e.strerror}{after}") from None
        yield
    finally:
        os.close(fd)  # (closing releases the lock)


def _read(path: Path) -> tuple[dict[str, int], dict[str, tuple[int, bytes]],
                              dict[str, tuple[int, tuple[float, float]]],
                              dict[bytes, tuple[str, int]],
                              dict[str, tuple[int, str, int, str]]]:
    try:
        data = json.loads(_read_bytes(path))
        last = data["last_round"]
        held = data.get("held", {})  # (absent in a history written before it was kept)
        in_sum = data.get("in_sum", {})  # (likewise)
        sent = data.get("sent", {})  # (likewise)
        federations = data.get("federations", {})  # (likewise)
        # defence: sdk.history-version
        if (data.get("version") != 1 or not isinstance(last, dict)
                or not all(isinstance(k, str) and type(v) is int and v >= 0
                           for k, v in last.items())):
            raise ValueError("unexpected content")
        # defence: sdk.history-held-checked
        if not isinstance(held, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and len(v) == 2
                and type(v[0]) is int and v[0] >= 0 and isinstance(v[1], str)
                and len(v[1]) == 64 for k, v in held.items()):
            raise ValueError("unexpected content")
        # defence: sdk.history-in-sum-checked
        if not isinstance(in_sum, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and len(v) == 2
                and type(v[0]) is int and v[0] > 0 and isinstance(v[1], list)
                and len(v[1]) == 2 and all(type(x) is float and x > 0 for x in v[1])
                for k, v in in_sum.items()):
            raise ValueError("unexpected content")
        # defence: sdk.history-sent-checked
        if not isinstance(sent, dict) or not all(
                isinstance(k, str) and len(k) == 64 and isinstance(v, list) and len(v) == 2
                and isinstance(v[0], str) and type(v[1]) is int and v[1] > 0
                for k, v in sent.items()):
            raise ValueError("unexpected content")
        # defence: sdk.history-rosters-checked
        if not isinstance(federations, dict) or not all(
                isinstance(k, str) and len(k) == 64 and isinstance(v, list) and len(v) == 4
                and type(v[0]) is int and v[0] >= 0 and type(v[2]) is int and v[2] >= 0
                and all(isinstance(x, str) and len(x) in (0, 64) for x in (v[1], v[3]))
                for k, v in federations.items()):
            raise ValueError("unexpected content")
        return (dict(last), {k: (v[0], bytes.fromhex(v[1])) for k, v in held.items()},
                {k: (v[0], (v[1][0], v[1][1])) for k, v in in_sum.items()},
                {bytes.fromhex(k): (v[0], v[1]) for k, v in sent.items()},
                {k: (v[0], v[1], v[2], v[3]) for k, v in federations.items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        reason = e.strerror if isinstance(e, OSError) else "it is not a round history"
        raise SiteError(f"cannot read {path}: {reason}; it records which rounds this site "
                        "took part in and which models it sent against: put back only a copy "
                        "as recent as this site's last round (an older one, or none, would let "
                        "an aggregator have this site send against a model again); without "
                        "one, take part only in a new job") from None


def _is_the_key(kept: dict[str, Any], round_id: str, key_id: bytes) -> bool:
    """Whether the kept key is ``key_id``, kept for ``round_id``."""
    return (kept.get("round_id"), kept.get("key_id")) == (round_id, key_id.hex())
