"""A CKKS key holder whose training script restarted after announcing its round's key."""

from __future__ import annotations

import logging

import pytest

from clients.errors import AggregatorRefused
from clients.site import Round
from secagg.v1 import service_pb2
from tests.threat_model.test_site_sdk_lying_aggregator import HOLDER, _model_info, _site


@pytest.mark.parametrize("code", ["FAILED_PRECONDITION", "INVALID_ARGUMENT"])
def test_a_key_holder_whose_key_is_refused_as_already_announced_skips_the_round(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: str) -> None:
    """The key holder announced round 1's key, and its script restarted before it spent the
    round: the secret key went with the old process, and the aggregator refuses a second
    announcement (FAILED_PRECONDITION). The AggregatorRefused escaped rounds(), so the
    script died at every restart until the round's deadline; now the round is skipped with
    a warning and the site waits for the next. Any other refusal is still raised."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, conn = _site("ckks", info, payloads)
    site.site_id = HOLDER
    conn.then_done = True  # type: ignore[attr-defined]

    def refused(self: Round, kept: object = None) -> None:
        raise AggregatorRefused(code, "this site already answered this stage")

    monkeypatch.setattr(Round, "_announce_key", refused)
    if code != "FAILED_PRECONDITION":
        with pytest.raises(AggregatorRefused):
            next(site.rounds())
        return
    with caplog.at_level(logging.WARNING, logger="clients"):
        assert list(site.rounds()) == []
    assert "cannot be released" in caplog.text


def test_a_kept_round_key_is_private_durable_and_the_announced_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The key holder keeps its round's key beside its history (0600) with the aggregates it
    released under it; a restarted script takes it up only for that round and only if it is
    the key the round announces; a file whose key is not the one it names is not used."""
    import json
    import os

    from clients.history import History
    from secagg import wire
    from secagg.ckks import KeyHolder

    history = History(tmp_path)
    key = KeyHolder.generate()
    history.keep_key("job-1", 1, "hospitals/job-1/round-1", key)
    key.record_release("hospitals/job-1/round-1", b"\x07" * 32, 1)  # recorded on disk first
    path = history.key_path("job-1")
    assert path is not None
    assert path.stat().st_mode & 0o777 == 0o600
    back = history.load_key("job-1", "hospitals/job-1/round-1")
    assert back is not None and back.key_id == key.key_id
    assert back.releases == {"hospitals/job-1/round-1": b"\x07" * 32}
    assert history.load_key("job-1", "hospitals/job-1/round-2") is None

    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, _ = _site("ckks", info, payloads, directory=tmp_path)
    other = KeyHolder.generate()
    for announced, expected in ((other, None), (key, key.key_id)):
        info.ckks_key.CopyFrom(service_pb2.CkksKeyOffer(
            announcement=wire.announcement_to_proto(announced.announce(
                holder=HOLDER, identity=site.kit.identity, epoch=info.round_id))))
        found = site._kept_key(info)
        assert (found.key_id if found is not None else None) == expected

    kept = json.loads(path.read_text())
    kept["key_id"] = other.key_id.hex()  # names another key than the one it holds
    path.write_text(json.dumps(kept))
    os.chmod(path, 0o600)
    assert history.load_key("job-1", "hospitals/job-1/round-1") is None
    # (the record now names `other`: a drop of another key leaves it)
    history.drop_key("job-1", "hospitals/job-1/round-1", key.key_id)
    assert path.exists()
    history.drop_key("job-1", "hospitals/job-1/round-1", other.key_id)
    assert not path.exists()


def _kept(tmp_path):  # type: ignore[no-untyped-def]
    from clients.history import History
    from secagg.ckks import KeyHolder

    history = History(tmp_path)
    key = KeyHolder.generate()
    history.keep_key("job-1", 1, "hospitals/job-1/round-1", key)
    return history, key


@pytest.mark.parametrize("first", ["running", "restarted"])
def test_two_processes_holding_the_kept_key_release_one_aggregate_between_them(
        tmp_path, first: str) -> None:  # type: ignore[no-untyped-def]
    """A script restarted while the old one still waits for its release request (or a
    second Site on the directory) loads the kept key with the releases recorded so far; a
    lying aggregator then hands each process another aggregate (all sites; all but one),
    and the two releases were one site's update (a helper's race). Each release is recorded
    on disk, under the history's lock, before it is decrypted, and the other process's is
    refused; once the round's key is dropped, a process still holding it releases nothing."""
    from clients.history import History
    from secagg.errors import RefusalReason, RefusedMessage

    history, running = _kept(tmp_path)
    restarted = History(tmp_path).load_key("job-1", "hospitals/job-1/round-1")
    assert restarted is not None and restarted.releases == {}
    one, other = (running, restarted) if first == "running" else (restarted, running)
    one.record_release("hospitals/job-1/round-1", b"\x01" * 32, 1)
    one.record_release("hospitals/job-1/round-1", b"\x01" * 32, 1)  # the same again: taken
    with pytest.raises(RefusedMessage) as refused:
        other.record_release("hospitals/job-1/round-1", b"\x02" * 32, 1)
    assert refused.value.reason is RefusalReason.ALREADY_RELEASED
    other.record_release("hospitals/job-1/round-1", b"\x01" * 32, 1)  # the same: identical

    history.drop_key("job-1", "hospitals/job-1/round-1", running.key_id)
    late = _load(tmp_path)
    assert late is None
    with pytest.raises(RefusedMessage, match="is gone"):
        running.record_release("hospitals/job-1/round-2", b"\x03" * 32, 2)


def _load(tmp_path):  # type: ignore[no-untyped-def]
    from clients.history import History

    return History(tmp_path).load_key("job-1", "hospitals/job-1/round-1")


def test_a_kept_key_goes_when_its_round_is_not_the_running_one_or_others_can_read_it(
        tmp_path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    import os

    history, _ = _kept(tmp_path)
    path = history.key_path("job-1")
    assert path is not None
    history.drop_stale_key("job-1", 1)
    assert path.exists()  # (its round is the running one)
    history.drop_stale_key("job-1", 2)
    assert not path.exists()
    history, _ = _kept(tmp_path)
    history.drop_stale_key("job-2", 1)  # (another job's rounds: its key is its own)
    assert path.exists()
    history.drop_stale_key("job-1", 3)
    assert not path.exists()
    history, _ = _kept(tmp_path)
    history.drop_stale_key("job-1", 0)  # (the job is done)
    assert not path.exists()

    history, _ = _kept(tmp_path)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="clients.history"):
        assert history.load_key("job-1", "hospitals/job-1/round-1") is None
    assert "readable or writable by others" in caplog.text and not path.exists()


def test_a_process_holding_a_replaced_round_key_releases_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Process B released round 1 under the kept key and went on to hold round 2's (which
    replaces the file); process A, still holding round 1's key, loaded before B's release,
    would release another aggregate of round 1 with no record left to refuse it."""
    from clients.history import History
    from secagg.ckks import KeyHolder
    from secagg.errors import RefusedMessage

    history, b_key = _kept(tmp_path)
    a_key = History(tmp_path).load_key("job-1", "hospitals/job-1/round-1")
    assert a_key is not None
    b_key.record_release("hospitals/job-1/round-1", b"\x01" * 32, 1)
    history.keep_key("job-1", 2, "hospitals/job-1/round-2", KeyHolder.generate())
    with pytest.raises(RefusedMessage, match="replaced by another round"):
        a_key.record_release("hospitals/job-1/round-1", b"\x02" * 32, 1)


def test_jobs_sharing_a_directory_and_processes_on_later_rounds_keep_each_others_keys(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two jobs on one history directory (the README's advice, for the one-update rule) had
    one key file: job 2's key replaced job 1's, and job 1's release was refused, ending its
    job. And a process ending round 1 deleted the key another process on the directory had
    kept for round 2 (a helper's findings): keys are kept per job, and a round's end
    deletes its own key only."""
    from clients.history import History
    from secagg.ckks import KeyHolder

    history = History(tmp_path)
    one, two = KeyHolder.generate(), KeyHolder.generate()
    history.keep_key("job-1", 1, "hospitals/job-1/round-1", one)
    history.keep_key("job-2", 1, "hospitals/job-2/round-1", two)
    one.record_release("hospitals/job-1/round-1", b"\x01" * 32, 1)
    two.record_release("hospitals/job-2/round-1", b"\x02" * 32, 1)

    later = KeyHolder.generate()
    history.keep_key("job-1", 2, "hospitals/job-1/round-2", later)
    history.drop_key("job-1", "hospitals/job-1/round-1", one.key_id)  # the old round ends
    back = history.load_key("job-1", "hospitals/job-1/round-2")
    assert back is not None and back.key_id == later.key_id


def test_a_key_whose_write_failed_is_deleted_or_releases_nothing(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The write put the file in place and then failed (a directory fsync's EIO): the key
    was on disk with no record of its releases and no recorder, and a second process could
    release another aggregate (a helper's finding). The file is deleted; if it cannot be,
    every release under the key is recorded, and refused when it cannot be."""
    import clients.history as history_module
    from clients.errors import SiteError
    from clients.history import History
    from secagg.ckks import KeyHolder
    from secagg.errors import RefusedMessage

    written = history_module._write_private

    def half(path, data):  # type: ignore[no-untyped-def]
        written(path, data)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(history_module, "_write_private", half)
    history = History(tmp_path)
    key = KeyHolder.generate()
    with pytest.raises(SiteError, match="cannot keep"):
        history.keep_key("job-1", 1, "hospitals/job-1/round-1", key)
    assert list(tmp_path.glob("ckks-round-key-*")) == []
    assert History(tmp_path).load_key("job-1", "hospitals/job-1/round-1") is None

    monkeypatch.setattr(history_module, "_unlink_all", lambda path, quiet=True: False)
    stuck = KeyHolder.generate()
    with pytest.raises(SiteError, match="cannot keep"):
        history.keep_key("job-1", 1, "hospitals/job-1/round-1", stuck)
    with pytest.raises(RefusedMessage):
        stuck.record_release("hospitals/job-1/round-1", b"\x01" * 32, 1)


def test_a_key_that_cannot_be_deleted_is_logged_not_raised_through_the_rounds_loop(
        tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """An unlink refused (a history directory remounted read-only) raised an OSError out of
    rounds(), a generator whose frames are not cleared, with the kept key's record (the
    secret context) as a local: a crash reporter had the key (a helper's finding)."""
    import os

    history, _ = _kept(tmp_path)

    def refused(path):  # type: ignore[no-untyped-def]
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "unlink", refused)
    with caplog.at_level(logging.WARNING, logger="clients.history"):
        history.drop_stale_key("job-1", 2)
        history.drop_key("job-1", "hospitals/job-1/round-1", _.key_id)
    assert caplog.text.count("could not be deleted") == 2


def test_a_second_process_joining_the_round_does_not_replace_the_kept_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two processes on the directory joined one round before either announcement was
    visible: the second's key replaced the first's on disk, and whichever was announced,
    one of them could no longer release (an auditor's finding). The second is refused."""
    from clients.errors import SiteError
    from clients.history import History
    from secagg.ckks import KeyHolder

    _history, first = _kept(tmp_path)
    with pytest.raises(SiteError, match="another process"):
        History(tmp_path).keep_key("job-1", 1, "hospitals/job-1/round-1", KeyHolder.generate())
    first.record_release("hospitals/job-1/round-1", b"\x01" * 32, 1)  # still its own


def test_a_kept_key_whose_round_time_is_over_goes_at_the_next_connect(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A key holder away when its job ended, which never polls that job again, kept the key
    for good (with the aggregator's stored uploads, every site's update of that round):
    keys carry their round's time, and any job's expired key goes when a Site is made."""
    from clients.history import History
    from secagg.ckks import KeyHolder

    history = History(tmp_path)
    history.keep_key("old-job", 3, "hospitals/old-job/round-3", KeyHolder.generate(),
                     expires_in=0.0)
    history.keep_key("job-1", 1, "hospitals/job-1/round-1", KeyHolder.generate(),
                     expires_in=600.0)
    history.drop_expired_keys()
    assert history.key_path("old-job").exists() is False  # type: ignore[union-attr]
    assert history.key_path("job-1").exists()  # type: ignore[union-attr]


def test_a_key_holder_restarted_past_its_patience_in_a_waiting_round_keeps_its_key(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A key holder waits with a round that waits for its sites, for up to a day; its kept
    key expired at the round's patience (55 minutes), so a restart after it found the key
    gone and could not release the round: every update sent against its model was lost (a
    reviewer). The key is kept a patience past the site's deadline while the site stays in
    the round, rewritten once in most of a patience, and no longer once it has left."""
    import time

    import clients.history
    import clients.site
    from secagg.v1 import service_pb2

    first, conn = _holder(tmp_path)
    rnd = first._join(conn.info)
    assert rnd is not None and rnd._key is not None
    key = rnd._key
    patience = clients.site._round_patience(first.config)
    began_wall, began = time.time(), time.monotonic()
    clock = [0.0]
    monkeypatch.setattr(clients.site.time, "monotonic", lambda: began + clock[0])
    monkeypatch.setattr(clients.history.time, "time", lambda: began_wall + clock[0])
    writes = []
    extend = clients.history.History.extend_key
    monkeypatch.setattr(clients.history.History, "extend_key",
                        lambda self, *a, **k: (writes.append(a), extend(self, *a, **k)))
    waiting = service_pb2.RoundWaiting(sites_asking=1, sites_needed=3)
    while clock[0] < 6 * patience:  # (said waiting every 10 s, for six patiences)
        clock[0] += 10.0
        rnd._note_waiting(waiting)
    assert 5 <= len(writes) <= 6 * patience / (patience - 600) + 1
    again, conn = _holder(tmp_path)  # (a Site drops the expired keys as it is made)
    rnd = again._join(conn.info)
    assert rnd is not None and rnd._key is not None and rnd._key.key_id == key.key_id
    assert conn.offers == [key.key_id]
    # the site gone (a crash) for two patiences: the key goes at the next connect
    clock[0] += 2 * patience + 1
    _holder(tmp_path)  # (connects: drops the expired keys)
    assert clients.history.History(tmp_path).load_key(
        "job-1", "hospitals/job-1/round-1") is None


def test_an_io_error_reading_the_kept_key_neither_deletes_it_nor_takes_it_for_gone(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import clients.history as history_module

    history, key = _kept(tmp_path)
    path = history.key_path("job-1")

    def failing(p):  # type: ignore[no-untyped-def]
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(history_module, "_read_bytes", failing)
    history.drop_stale_key("job-1", 2)
    history.drop_key("job-1", "hospitals/job-1/round-1", key.key_id)
    assert path.exists()  # type: ignore[union-attr]


class _Accepting:
    """A lying aggregator's connection: GetRound answers ``info``; every upload and Submit is
    taken; the key announcements submitted are recorded."""

    def __init__(self, info, payloads) -> None:  # type: ignore[no-untyped-def]
        self.info, self.payloads, self.offers = info, payloads, []

    def call(self, method, request, timeout=None):  # type: ignore[no-untyped-def]
        if method == "GetRound":
            return self.info
        if method == "Submit" and request.HasField("ckks_key"):
            self.offers.append(bytes(request.ckks_key.announcement.key_id))
        return None

    def upload_and_send(self, data, send, **_):  # type: ignore[no-untyped-def]
        from secagg import wire

        return send(wire.Blob((b"\x09" * 32,), len(data)))

    def download(self, blob, **_):  # type: ignore[no-untyped-def]
        return self.payloads[blob.chunk_ids[0]]


def _holder(tmp_path, announced=None):  # type: ignore[no-untyped-def]
    """The key holder's Site on ``tmp_path``, shown round 1 of a CKKS job (announcing
    ``announced``'s key, or none yet), and its connection."""
    import types

    from clients.site import Site
    from secagg import wire
    from secagg.masking import make_roster
    from tests.threat_model.test_site_sdk_lying_aggregator import _site

    roster, identities = make_roster(5)
    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    if announced is not None:
        info.ckks_key.CopyFrom(service_pb2.CkksKeyOffer(
            announcement=wire.announcement_to_proto(announced.announce(
                holder=HOLDER, identity=identities[HOLDER], epoch=info.round_id))))
    config = _site("ckks", info, payloads)[0].config
    kit = types.SimpleNamespace(site_id=HOLDER, config=config, roster=roster,
                                identity=identities[HOLDER], directory=tmp_path)
    conn = _Accepting(info, payloads)
    return Site(kit, conn), conn  # type: ignore[arg-type]


def test_a_restarted_key_holder_announces_no_second_key_for_its_round(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A key holder restarted mid-round, shown the round without its key (or with another),
    made and announced a second key; a lying aggregator took both, gave each to other
    sites, and had the round released under each (the second by the restart after, with
    the kept first key): two averages over two sets of sites (a helper's attack). A round
    has one key of its holder's, the one its directory keeps: announced again, never
    replaced; a round announcing another key is skipped, and so is one whose directory
    another process keeps a key for."""
    from clients.history import History
    from secagg.ckks import KeyHolder

    first, conn = _holder(tmp_path)
    rnd = first._join(conn.info)
    assert rnd is not None and rnd._key is not None
    key = rnd._key
    assert conn.offers == [key.key_id]

    # restarted, shown the round with no key: the kept one is announced again
    again, conn = _holder(tmp_path)
    rnd = again._join(conn.info)
    assert rnd is not None and rnd._key is not None and rnd._key.key_id == key.key_id
    assert conn.offers == [key.key_id]

    # shown the round with its key: it takes part with it, announcing nothing
    taken, conn = _holder(tmp_path, announced=key)
    rnd = taken._join(conn.info)
    assert rnd is not None and rnd._key is not None and rnd._key.key_id == key.key_id
    assert conn.offers == []

    # shown the round with another key of this holder's: skipped, nothing announced
    other, conn = _holder(tmp_path, announced=KeyHolder.generate())
    assert other._join(conn.info) is None and conn.offers == []

    # the kept key unseen at the join (another process kept it meanwhile): not announced
    racing, conn = _holder(tmp_path)
    monkeypatch.setattr(History, "load_key", lambda self, job, round_id: None)
    assert racing._join(conn.info) is None and conn.offers == []
    monkeypatch.undo()
    back = History(tmp_path).load_key("job-1", "hospitals/job-1/round-1")
    assert back is not None and back.key_id == key.key_id


def test_a_kept_key_of_another_owner_or_format_is_not_used(
        tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """A 0600 key file another user owns (it could have written it: a shared directory, or
    a root-run script's) is deleted, not used; a record of another format is not read."""
    import json
    import os

    history, _ = _kept(tmp_path)
    path = history.key_path("job-1")
    assert path is not None
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)  # (the file is now another user's)
    with caplog.at_level(logging.WARNING, logger="clients.history"):
        assert history.load_key("job-1", "hospitals/job-1/round-1") is None
    assert "not this user's" in caplog.text and not path.exists()
    monkeypatch.undo()

    history, _ = _kept(tmp_path)
    kept = json.loads(path.read_text())
    kept["version"] = 2
    path.write_text(json.dumps(kept))
    os.chmod(path, 0o600)
    assert history.load_key("job-1", "hospitals/job-1/round-1") is None


def test_a_release_whose_record_cannot_be_read_is_refused(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Unrecorded, a release could be followed by another process's release of another
    aggregate of the round: an I/O error reading the record refuses it."""
    import clients.history as history_module
    from secagg.errors import RefusedMessage

    _, key = _kept(tmp_path)

    def failing(p):  # type: ignore[no-untyped-def]
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(history_module, "_read_bytes", failing)
    with pytest.raises(RefusedMessage, match="cannot be read"):
        key.record_release("hospitals/job-1/round-1", b"\x01" * 32, 1)
    assert key.releases == {}


def test_a_kept_keys_temporary_left_by_a_crash_goes_with_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A crash between writing a key's temporary and renaming it leaves the secret context
    in ``.ckks-round-key-*.json.tmp``: deleted with its key, by a stale-key sweep even
    when the key itself is gone, and, for a job never polled again, at the next connect."""
    from clients.history import History

    history, key = _kept(tmp_path)
    path = history.key_path("job-1")
    assert path is not None
    tmp = path.with_name(f".{path.name}.tmp")
    leftovers = []
    for drop in ("key", "stale", "expired"):
        tmp.write_bytes(path.read_bytes() if path.exists() else b"{\"context\": \"...\"")
        if drop == "key":
            history.drop_key("job-1", "hospitals/job-1/round-1", key.key_id)
        elif drop == "stale":
            assert not path.exists()
            history.drop_stale_key("job-1", 2)
        else:
            History(tmp_path).drop_expired_keys()
        leftovers.append((drop, sorted(p.name for p in tmp_path.glob("*ckks-round-key-*"))))
    assert leftovers == [("key", []), ("stale", []), ("expired", [])]


def test_the_as_trained_digest_is_checked_under_the_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Another process on the directory sent against the model as this site's tensors
    hold it (a nudge below their precision) after this one checked: recording the send
    re-reads the history under the lock and refuses on either digest."""
    from clients.errors import SiteError
    from clients.history import History

    here, there = History(tmp_path), History(tmp_path)
    model, nudged, as_trained = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    assert here.sent_against(as_trained) is None  # (this process's check: nothing yet)
    there.record_sent("job-1", 1, model, as_trained)
    with pytest.raises(SiteError, match="already sent an update"):
        here.record_sent("job-1", 2, nudged, as_trained)


def _key_files(tmp_path):  # type: ignore[no-untyped-def]
    return sorted(p.name for p in tmp_path.glob("*ckks-round-key-*"))


def test_a_key_whose_announcement_fails_goes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A key the aggregator did not take (a refusal other than "announced already") is no
    round's: not left on disk."""
    site, conn = _holder(tmp_path)

    def refusing(method, request, timeout=None):  # type: ignore[no-untyped-def]
        if method == "Submit":
            raise AggregatorRefused("INTERNAL", "the test's aggregator fails")
        return conn.info

    conn.call = refusing  # type: ignore[method-assign]
    with pytest.raises(AggregatorRefused):
        site._join(conn.info)
    assert _key_files(tmp_path) == []


def test_keys_of_ended_rounds_go_when_a_site_is_made_and_when_it_polls(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through the Site, not History alone: an expired key of any job goes when a Site is
    made; this job's key goes when the aggregator shows the job done."""
    from clients.history import History
    from secagg.ckks import KeyHolder

    History(tmp_path).keep_key("old-job", 3, "hospitals/old-job/round-3",
                               KeyHolder.generate(), expires_in=0.0)
    site, conn = _holder(tmp_path)
    assert _key_files(tmp_path) == []

    History(tmp_path).keep_key("job-1", 1, "hospitals/job-1/round-1", KeyHolder.generate())
    conn.info = service_pb2.RoundInfo(status=service_pb2.ROUND_STATUS_JOB_DONE)
    assert list(site.rounds()) == []
    assert _key_files(tmp_path) == []


def _spent_holder(tmp_path, model_w=None):  # type: ignore[no-untyped-def]
    """A key holder that announced round 1's key, kept it and spent the round (its script
    then restarted): a new Site on the directory, shown the round with that key (and, with
    ``model_w``, another model than the one it sent against)."""
    import numpy as np

    from secagg import wire
    from secagg.model import FlatModel

    first, conn = _holder(tmp_path)
    rnd = first._join(conn.info)
    assert rnd is not None and rnd._key is not None
    first._history.spend("job-1", 1, rnd.model.digest)
    site, conn = _holder(tmp_path, announced=rnd._key)
    if model_w is not None:
        model = FlatModel.from_arrays({"w": np.asarray(model_w, np.float32)})
        blob = wire.Blob((b"\x05" * 32,), len(model.to_bytes()))
        conn.info.model.CopyFrom(wire.model_to_proto(model, blob))
        conn.payloads[blob.chunk_ids[0]] = model.to_bytes()
    fetched: list[bytes] = []
    download = conn.download

    def recording(blob, **kw):  # type: ignore[no-untyped-def]
        fetched.append(bytes(blob.chunk_ids[0]))
        return download(blob, **kw)

    conn.download = recording  # type: ignore[method-assign]
    return site, conn, fetched


def test_a_resumed_release_that_fails_drops_its_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    site, conn, _ = _spent_holder(tmp_path)
    assert _key_files(tmp_path) != []
    assert site._resume_release(conn.info) is True  # (taken up; this aggregator fails it)
    assert _key_files(tmp_path) == []


def test_a_restarted_holder_releases_no_round_of_another_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The round shown after the restart starts from another model than the one the key
    holder sent against: not released (nothing fetched), and its key goes."""
    site, conn, fetched = _spent_holder(tmp_path, model_w=[1.0] * 8)
    assert site._resume_release(conn.info) is False
    assert fetched == [] and _key_files(tmp_path) == []


def test_a_submit_drops_its_round_key_as_it_ends_either_way(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The round's key goes as submit returns (or raises), not at some later poll: a
    script that stops after its last round left it on disk until its expiry."""
    import numpy as np

    from clients.errors import RoundAborted
    from secagg import wire
    from secagg.model import FlatModel

    for ends in ("completed", "refused"):
        for p in tmp_path.iterdir():
            p.unlink()
        site, conn = _holder(tmp_path)
        rnd = site._join(conn.info)
        assert rnd is not None and rnd._key is not None
        announced = wire.announcement_to_proto(rnd._key.announce(
            holder=HOLDER, identity=site.kit.identity, epoch=rnd.round_id))
        conn.info.ckks_key.CopyFrom(service_pb2.CkksKeyOffer(announcement=announced))
        if ends == "completed":
            monkeypatch.setattr(Round, "_run_ckks", lambda self, delta, weight: None)
            monkeypatch.setattr(Round, "_wait_for_end", lambda self, info=conn.info: info)
            monkeypatch.setattr(type(site), "_accept_result",
                                lambda self, info, model, released, bound: model)
            rnd.submit({"w": np.zeros(8, np.float32)}, weight=1)
        else:  # (the public context it is handed is not there: a refusal of the round)
            with pytest.raises(RoundAborted):
                rnd.submit({"w": np.zeros(8, np.float32)}, weight=1)
        monkeypatch.undo()
        assert _key_files(tmp_path) == [], ends
        assert isinstance(rnd.model, FlatModel)


def test_no_key_is_kept_for_a_round_already_sent_to(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A second process made before the first sent (its view of the history older) was
    shown the round after the first had sent, released and deleted its key: it kept and
    announced a new key, and the restart after it released the round again under that key
    (a helper's attack). keep_key re-reads the history under its lock: a round sent to gets
    no new key."""
    second, conn2 = _holder(tmp_path)  # (made before the round is sent to)
    first, conn = _holder(tmp_path)
    rnd = first._join(conn.info)
    assert rnd is not None and rnd._key is not None
    first._history.spend("job-1", 1, rnd.model.digest, key=(rnd.round_id, rnd._key.key_id))
    rnd._drop_key()  # (its round ended)
    assert _key_files(tmp_path) == []
    assert second._join(conn2.info) is None
    assert conn2.offers == [] and _key_files(tmp_path) == []


def test_a_key_kept_under_no_lock_is_not_announced(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The history's lock could not be taken (held past its timeout, or not opened): another
    process may be keeping its key for the round at that moment, so this one's is not
    announced (it was, unkept, and both were released); the script is told why (a lock that
    never works would otherwise skip every round with a warning)."""
    from clients.errors import SiteError
    from clients.history import History

    def stuck(self, *args):  # type: ignore[no-untyped-def]
        raise SiteError("the history's lock was not taken within 30 s")

    monkeypatch.setattr(History, "_keep_key", stuck)
    site, conn = _holder(tmp_path)
    with pytest.raises(SiteError, match="lock was not taken"):
        site._join(conn.info)
    assert conn.offers == []


def test_a_process_whose_key_was_not_kept_cannot_send_while_another_key_is_kept(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A key that could not be written is announced unkept; if another process then kept
    its own key for the round, the unkept one sent first and released, and a restart
    released the kept one. The round is sent to only with the key kept for it, if any."""
    import numpy as np

    from clients.errors import SiteError
    from clients.history import History, KeyNotWritten
    from secagg import wire

    real = History.keep_key

    def unwritable(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyNotWritten("cannot keep this key holder's round key: No space left on device")

    monkeypatch.setattr(History, "keep_key", unwritable)
    unkept, conn = _holder(tmp_path)
    rnd = unkept._join(conn.info)
    assert rnd is not None and rnd._key is not None and conn.offers == [rnd._key.key_id]
    monkeypatch.setattr(History, "keep_key", real)
    kept, conn2 = _holder(tmp_path)
    other = kept._join(conn2.info)
    assert other is not None and other._key is not None and _key_files(tmp_path) != []

    conn.info.ckks_key.CopyFrom(service_pb2.CkksKeyOffer(
        announcement=wire.announcement_to_proto(rnd._key.announce(
            holder=HOLDER, identity=unkept.kit.identity, epoch=rnd.round_id))))
    with pytest.raises(SiteError, match="keeps another key"):
        rnd.submit({"w": np.zeros(8, np.float32)}, weight=1)
    assert unkept._history.check("job-1", 1) is None  # (not spent: the kept key's may send)


def test_a_kept_key_that_cannot_be_read_is_neither_replaced_nor_sent_past(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """An I/O error reading the kept key (EIO, a file the site's user cannot read) was taken
    for no key: a second process kept its own over it, and sent to the round with a key
    that was not the kept one: two keys of one round. Both now refuse."""
    from clients.errors import SiteError
    from clients.history import AnotherKeyKept, History
    from secagg.ckks import KeyHolder

    history, _key = _kept(tmp_path)
    path = history.key_path("job-1")
    before = path.read_bytes()  # type: ignore[union-attr]

    def failing(self, p):  # type: ignore[no-untyped-def]
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(History, "_read_key", failing)
    other = KeyHolder.generate()
    with pytest.raises(AnotherKeyKept, match="cannot read"):
        History(tmp_path).keep_key("job-1", 1, "hospitals/job-1/round-1", other)
    assert path.read_bytes() == before  # type: ignore[union-attr]
    second = History(tmp_path)
    with pytest.raises(SiteError, match="cannot read"):
        second.spend("job-1", 1, b"\x01" * 32, key=("hospitals/job-1/round-1", other.key_id))
    assert History(tmp_path).check("job-1", 1) is None  # (not spent)


@pytest.mark.parametrize(("reason", "told"), [("OUT_OF_RANGE", True),
                                              ("AGGREGATE_MISMATCH", False),
                                              ("ALREADY_RELEASED", False)])
def test_the_key_holder_signs_a_refusal_only_of_a_sum_out_of_range(
        monkeypatch: pytest.MonkeyPatch, reason: str, told: bool) -> None:
    """The signed refusal says "out of range" (a site's doing, or the weights'): a sum the
    aggregator made wrongly (AGGREGATE_MISMATCH) must not be answered with it, or a lying
    aggregator holds the key holder's signature blaming the sites for its own forgery."""
    from types import SimpleNamespace

    from clients.errors import RoundAborted
    from secagg import wire
    from secagg.ckks import _seal
    from secagg.errors import RefusalReason, RefusedMessage

    def refuse(_aggregate: object) -> None:
        raise RefusedMessage(RefusalReason[reason])

    monkeypatch.setattr(_seal, "encoded_length", lambda _context, _kind: 7)
    monkeypatch.setattr(wire.Blob, "from_proto", staticmethod(lambda _p: None))
    monkeypatch.setattr(wire, "aggregate_from_ref", lambda _ref, _data: "aggregate")
    r = Round.__new__(Round)
    r.round_id = "r1"
    r._key = SimpleNamespace(seal_context=None)  # type: ignore[assignment]
    r._conn = SimpleNamespace(download=lambda *_a, **_k: b"")  # type: ignore[assignment]
    sent: list[object] = []
    r._tell_refusal = lambda _config, ids: sent.append(list(ids))  # type: ignore[method-assign, assignment]
    request = service_pb2.CkksReleaseRequest()
    request.aggregate.chunk_count = 1
    request.aggregate.chunks.size = 7
    request.aggregate.chunks.chunk_ids.append(b"\1" * 32)
    config = SimpleNamespace(roster=[1, 2, 3], chunk_count=1)
    with pytest.raises(RoundAborted, match=reason):
        r._verify_and_release(SimpleNamespace(finish=refuse), request, config)  # type: ignore[arg-type]
    assert sent == ([[b"\1" * 32]] if told else [])


@pytest.mark.parametrize("number", [0, 4, 2**64 - 1])
def test_a_round_the_site_refuses_takes_no_kept_key(tmp_path, number: int) -> None:  # type: ignore[no-untyped-def]
    """A running round 0, or one past the job's rounds (which the site refuses), was taken
    for "the round running now" and the key holder's kept key of round 1 was deleted: a
    restarted script then announced a second key for round 1. Refused rounds touch no
    kept key."""
    from clients.errors import RoundAborted
    from clients.history import History
    from secagg.ckks import KeyHolder

    site, conn = _holder(tmp_path)
    History(tmp_path).keep_key("job-1", 1, "hospitals/job-1/round-1", KeyHolder.generate())
    lie = service_pb2.RoundInfo()
    lie.CopyFrom(conn.info)
    lie.round, lie.round_id = number, f"hospitals/job-1/round-{number}"
    conn.info = lie
    with pytest.raises(RoundAborted):
        next(site.rounds())
    assert len(_key_files(tmp_path)) == 1
