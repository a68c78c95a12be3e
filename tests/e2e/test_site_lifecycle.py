"""A Site used after it was closed: a clear SiteError, and nothing spent; sites that come
online long after the aggregator started."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from clients import Site
from clients.errors import DirectoryInUse, SiteError
from tests.service_kit import make_federation, run_sites, start_aggregator


def test_a_closed_site_says_so_and_does_not_spend_its_round(tmp_path: Path) -> None:
    """rounds() and submit() on a closed Site raised grpc's "Cannot invoke RPC on closed
    channel!" from deep inside; submit's was reported as the aggregator's doing, and the
    round was recorded as spent, so the site, connected again, skipped a round it had sent
    nothing to. Now: a SiteError naming the closed connection, and the reconnected site
    joins the same round."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = start_aggregator(fed, tmp_path)
    try:
        site = Site.connect(fed.site_dir(1), tensors="numpy", retry_seconds=30)
        rnd = next(site.rounds())
        state = {name: np.asarray(value) for name, value in rnd.global_model.items()}
        site.close()
        with pytest.raises(SiteError, match="connection is closed"):
            next(site.rounds())
        with pytest.raises(SiteError, match="connection is closed"):
            rnd.submit(state, weight=1)
        with Site.connect(fed.site_dir(1), tensors="numpy", retry_seconds=30) as again:
            # not skipped: nothing was sent. (Asked in a thread, bounded: a site that skipped
            # it waits for round 2 while round 1 waits for its sites, and the test hung in
            # the weakened build until the controls' timeout killed it)
            joined: list[int] = []
            asking = threading.Thread(
                target=lambda: joined.append(next(again.rounds()).number), daemon=True)
            asking.start()
            asking.join(30)
            assert joined == [rnd.number], "the reconnected site did not join its round"
    finally:
        agg.stop()


def test_a_site_whose_config_differs_in_max_samples_is_told_so_by_the_round(
        tmp_path: Path) -> None:
    """Site 3 was given a config with another [update] max_samples (signed: the operator
    changed it for site 3 alone): it weighed itself by another scale than the others, and
    the average came out wrong, silently. The aggregator publishes its settings' digest with
    the round; site 3 refuses the round naming its config, and sends nothing. (Changed in
    transit, unsigned, the config is refused at connect: test_federation_in_transit.)"""
    import re

    from secagg.federation.kit import CONFIG_FILE, sign_settings

    fed = make_federation(tmp_path, 3, "masking", rounds=1, open_s=4.0)
    path = fed.site_dir(3) / CONFIG_FILE
    text = path.read_text()
    path.write_text(re.sub(r"(?m)^max_samples = .*$", "max_samples = 3000.0", text))
    sign_settings(fed.directory, path)
    agg = start_aggregator(fed, tmp_path)
    try:
        with Site.connect(fed.site_dir(3), tensors="numpy", retry_seconds=30) as site, \
                pytest.raises(SiteError, match=r"federation\.toml differs from the aggregator's"):
            next(site.rounds())
    finally:
        agg.stop()
    assert not any(e.get("site_id") == 3 for e in agg.read()
                   if e.get("event") == "message_counted")


def test_a_site_whose_roster_is_older_than_the_aggregators_is_told_so_by_the_round(
        tmp_path: Path) -> None:
    """The operator removed site 4 (a new roster, version 2, for the aggregator); site 1
    still held version 1. Its messages were refused as "invalid signature", and its rounds()
    waited on. The aggregator publishes its roster's digest and version with the round: site
    1 refuses the round naming both versions and what to do, and sends nothing."""
    from secagg.federation.kit import remove_site

    fed = make_federation(tmp_path, 4, "masking", rounds=1, open_s=4.0)
    remove_site(fed.directory, 4)
    agg = start_aggregator(fed, tmp_path)
    try:
        with Site.connect(fed.site_dir(1), tensors="numpy", retry_seconds=30) as site, \
                pytest.raises(SiteError, match=r"this site's roster \(version 1\) is not the "
                                               r"aggregator's \(version 2\).*roster\.bin.*newer"):
            next(site.rounds())
    finally:
        agg.stop()
    assert not any(e.get("site_id") == 1 for e in agg.read()
                   if e.get("event") == "message_counted")


def test_a_site_whose_roster_changed_mid_round_is_told_so(tmp_path: Path) -> None:
    """Site 1 joined round 1; the operator removed site 4 and restarted the aggregator with
    the new roster, as the README says. Site 1's message was refused "invalid signature",
    an AggregatorRefused out of the training script, naming no roster (an outside
    operator). It is a RoundAborted naming both roster versions and what to do."""
    from clients.errors import RoundAborted
    from secagg.federation.kit import remove_site

    fed = make_federation(tmp_path, 4, "masking", rounds=1)
    agg = start_aggregator(fed, tmp_path)
    try:
        with Site.connect(fed.site_dir(1), tensors="numpy", retry_seconds=60) as site:
            rnd = next(site.rounds())
            state = {name: np.asarray(value) for name, value in rnd.global_model.items()}
            agg.stop()
            remove_site(fed.directory, 4)
            agg.start()
            with pytest.raises(RoundAborted, match=r"its roster \(version 2\) is no longer "
                                                   r"this site's \(version 1\).*roster\.bin"):
                rnd.submit(state, weight=10)
    finally:
        agg.stop()


def test_a_site_whose_config_pins_no_first_model_refuses_to_connect(tmp_path: Path) -> None:
    """A federation made without --model pinned no first model in the sites' configs: the
    operator then named a model in the aggregator's config only, and every site trained
    from a model of the aggregator's choosing, unwarned. Site.connect refuses such a
    config, naming the setting, before it dials."""
    from secagg.errors import ConfigurationError
    from secagg.federation.kit import init_federation

    init_federation(tmp_path / "fed", 3)
    with pytest.raises(ConfigurationError, match="initial_model_digest"):
        Site.connect(tmp_path / "fed" / "sites" / "site-1", retry_seconds=1)


def test_a_progress_callback_that_raises_costs_the_site_nothing(tmp_path: Path) -> None:
    """A training script's progress bar raised: on gRPC's request-stream thread the upload
    failed as "Exception iterating requests!" (UNKNOWN, blamed on the aggregator); in a stage
    the round was refused as the aggregator's doing and spent, and the others waited out the
    stage's deadline. Now the callback's first exception is logged once, no report follows,
    and the site's round completes with every site in it."""
    from tests.service_kit import run_sites

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = start_aggregator(fed, tmp_path)
    try:
        reports = run_sites(fed, tmp_path, extra={1: ("--broken-progress", "0:0")})
    finally:
        agg.stop()
    for s in (1, 2, 3):
        (report,) = reports[s]
        assert "error" not in report, report
        assert report["survivors"] == [1, 2, 3]
    assert reports[1][0]["progress_calls"] == 1  # (no report after the first raised)
    err = (tmp_path / "site-1.err").read_text()
    assert err.count("the progress callback raised RuntimeError (the progress bar broke)") == 1


_HOLD = """
import sys
from clients import Site
history = sys.argv[2] if len(sys.argv) > 2 else None
site = Site.connect(sys.argv[1], tensors="numpy", history_dir=history)
print("held", flush=True)
sys.stdin.read()
"""


def _other_process_connects(site_dir: Path, history_dir: Path | None = None,
                            ) -> subprocess.CompletedProcess[str]:
    extra = [] if history_dir is None else [str(history_dir)]
    return subprocess.run([sys.executable, "-c", _HOLD, str(site_dir), *extra], input="",
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])


def test_a_second_process_on_a_site_directory_is_told_at_connect(tmp_path: Path) -> None:
    """Two processes on one site directory stayed safe (the history is checked under a lock
    before an update leaves) but the second was told only at its first submit, after
    training a round for nothing. Now Site.connect refuses, naming the process that holds
    the directory; Sites of one process share it, and closing (or letting go) the last one,
    or the holder ending, frees it."""
    import gc

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(fed.site_dir(1))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(DirectoryInUse, match=rf"another process \(pid {holder.pid}\) runs "
                                                 r"a Site of .*site-1"):
            Site.connect(fed.site_dir(1), tensors="numpy")
        Site.connect(fed.site_dir(2), tensors="numpy").close()  # (another site's: free)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    first = Site.connect(fed.site_dir(1), tensors="numpy")  # the holder ended: free
    second = Site.connect(fed.site_dir(1), tensors="numpy")  # one process: shared
    first.close()
    assert "DirectoryInUse" in _other_process_connects(fed.site_dir(1)).stderr
    second.close()
    assert _other_process_connects(fed.site_dir(1)).returncode == 0
    unclosed = Site.connect(fed.site_dir(1), tensors="numpy")
    assert "DirectoryInUse" in _other_process_connects(fed.site_dir(1)).stderr
    del unclosed
    gc.collect()
    assert _other_process_connects(fed.site_dir(1)).returncode == 0



def test_two_processes_of_a_site_with_separate_histories_are_refused_too(
        tmp_path: Path) -> None:
    """Two processes of one site, each keeping its history in its own history_dir, each
    sent against the models the other had sent against (two updates against one model: an
    aggregator's difference of two sums is one site's update). The site directory is
    claimed beside the history's, so the second is refused at connect however its history
    is kept; a site directory that cannot be written is not claimed (history_dir is how a
    read-only one is run)."""
    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    first, second = tmp_path / "history-a", tmp_path / "history-b"
    first.mkdir(mode=0o700)
    second.mkdir(mode=0o700)
    with Site.connect(fed.site_dir(1), tensors="numpy", history_dir=first):
        assert "DirectoryInUse" in _other_process_connects(fed.site_dir(1), second).stderr
        assert "DirectoryInUse" in _other_process_connects(fed.site_dir(1)).stderr
    assert _other_process_connects(fed.site_dir(1), second).returncode == 0


def test_a_child_forked_by_the_training_script_holds_no_claim(tmp_path: Path) -> None:
    """A DataLoader worker forked while the Site was open shared its flock: with the Site
    closed and connected again while the child lived, the parent was refused "another
    process (pid <its own>)". The claim is a POSIX record lock, the process's own: a forked
    child holds none of it (and, connecting itself, is refused as another process)."""
    import os
    import signal

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    site = Site.connect(fed.site_dir(1), tensors="numpy")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # (the child: try to connect, report, then linger like a worker)
        try:
            os.close(read)
            try:
                Site.connect(fed.site_dir(1), tensors="numpy")
                os.write(write, b"connected")
            except DirectoryInUse:
                os.write(write, b"refused")
            os.close(write)
            signal.pause()
        finally:
            os._exit(0)
    try:
        os.close(write)
        assert os.read(read, 64) == b"refused"
        site.close()
        with Site.connect(fed.site_dir(1), tensors="numpy"):
            pass  # (the child lives on: the claim was never its)
        assert _other_process_connects(fed.site_dir(1)).returncode == 0
    finally:
        os.close(read)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_site_closed_and_then_collected_lets_go_of_its_share_only(tmp_path: Path) -> None:
    """Sites of one process share the claim, each holding a share of it: a Site closed
    (twice, then collected, its finalizer run) gives up its own share once, not the other
    Site's, which still keeps the directory from a second process."""
    import gc

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    first = Site.connect(fed.site_dir(1), tensors="numpy")
    second = Site.connect(fed.site_dir(1), tensors="numpy")
    first.close()
    first.close()
    del first
    gc.collect()
    assert "DirectoryInUse" in _other_process_connects(fed.site_dir(1)).stderr
    second.close()
    assert _other_process_connects(fed.site_dir(1)).returncode == 0


def test_a_refused_or_failed_connect_keeps_no_claim(tmp_path: Path) -> None:
    """A connect refused for the site directory (another process holds it) after its
    history_dir was claimed, or one that failed after its claim (a bad retry_seconds),
    let nothing go: the history directory stayed locked in this process's name, and a
    descriptor was kept each try, until the process ended. Both let go of all they took."""
    import os

    from secagg.errors import ConfigurationError

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    history = tmp_path / "history"
    history.mkdir(mode=0o700)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(fed.site_dir(1))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        descriptors = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else 0
        with pytest.raises(DirectoryInUse):
            Site.connect(fed.site_dir(1), tensors="numpy", history_dir=history)
        if descriptors:
            assert len(os.listdir("/proc/self/fd")) == descriptors  # (none kept)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    assert _other_process_connects(fed.site_dir(1), history).returncode == 0
    with pytest.raises(ConfigurationError, match="retry_seconds"):
        Site.connect(fed.site_dir(2), tensors="numpy", retry_seconds=-1)
    assert _other_process_connects(fed.site_dir(2)).returncode == 0


def test_a_link_at_the_in_use_file_is_refused_not_followed(tmp_path: Path) -> None:
    """The in-use file is opened without following a link (it is truncated and written
    with the holder's pid): a link there is refused, its target untouched, whether the
    file is the history's or the site directory's beside a separate history_dir (whose
    claim is skipped for a read-only directory only, not for any error)."""
    from clients.history import IN_USE_FILE

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    history = tmp_path / "history"
    history.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_text("keep me")
    target.chmod(0o600)
    (fed.site_dir(1) / IN_USE_FILE).symlink_to(target)
    for history_dir in (None, history):
        with pytest.raises(SiteError, match="cannot lock"):
            Site.connect(fed.site_dir(1), tensors="numpy", history_dir=history_dir)
    assert target.read_text() == "keep me"


def test_a_read_only_site_directory_with_a_history_dir_connects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """history_dir is how a read-only site directory is run: its in-use file, which cannot
    be made there, is not claimed (the history directory's is), and Site.connect goes on."""
    import errno
    import os

    from clients.history import IN_USE_FILE

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    history = tmp_path / "history"
    history.mkdir(mode=0o700)
    lock = fed.site_dir(1).resolve() / IN_USE_FILE
    real_open = os.open

    def read_only(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if Path(str(path)) == lock:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(os, "open", read_only)  # (clients.history opens it through os)
        site = Site.connect(fed.site_dir(1), tensors="numpy", history_dir=history)
    try:
        assert "DirectoryInUse" in _other_process_connects(fed.site_dir(1), history).stderr
    finally:
        site.close()


def test_an_in_use_file_others_can_write_is_refused(tmp_path: Path) -> None:
    """The in-use file is checked as the history's own files are: one its group or other
    users can write (who could lock it, keeping the site out, or write a pid) is refused."""
    from clients.history import IN_USE_FILE

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    lock = fed.site_dir(1) / IN_USE_FILE
    lock.touch()
    lock.chmod(0o666)
    with pytest.raises(SiteError, match="writable by its group or other users"):
        Site.connect(fed.site_dir(1), tensors="numpy")


def test_sites_that_come_online_long_after_the_aggregator_train_every_round(
        tmp_path: Path) -> None:
    """An aggregator started before its sites (here three open deadlines before) aborted
    round after round for want of them and ended the job untrained, saying "job done"; a
    site then online was told the job was over (an outside tester, as an operator). Its
    rounds now wait for their sites: the job trains every round, as if they had been on
    time, and the aggregator's log says the round waited."""
    import time

    # (open 8 s: once under way, each site downloads, trains and sends its keys within it,
    # on a machine the test run loads; 2 s was missed once, 4 s once with two runs at once)
    fed = make_federation(tmp_path, 3, "masking", rounds=2, open_s=8.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        agg.wait_for(lambda e: e.get("event") == "round_opened")
        time.sleep(2 * 8.0 + 1.0)  # (both rounds' open deadlines, had they run)
        reports = run_sites(fed, tmp_path, timeout=180)
        agg.wait_for(lambda e: e.get("event") == "job_done")
    finally:
        agg.stop()
    events = agg.read()
    assert not [e for e in events if e.get("event") == "round_aborted"]
    assert sum(e.get("event") == "round_under_way" for e in events) == 2
    for site in (1, 2, 3):
        assert [r["round"] for r in reports[site]] == [1, 2], reports[site]
    done = next(e for e in events if e.get("event") == "job_done")
    assert done["message"] == "job done: 2 of 2 rounds completed"


def test_a_site_that_comes_early_waits_past_its_patience_for_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Site 1 came online long before the others: it trained, sent its keys, and waited for
    them for its round patience (twice the round's deadlines plus five minutes), then gave
    the round up (RoundAborted, its training script ended) while the round still waited for
    its sites. The aggregator says the round waits: the site waits with it past its
    patience, says why, and takes part when the others come. (The five minutes of grace
    taken out here, and the twice made a half, so the patience is 13.5 s.)"""
    import logging
    import time

    import clients.site

    monkeypatch.setattr(clients.site, "ROUND_GRACE_SECONDS", 0.0)
    monkeypatch.setattr(clients.site, "ROUND_PATIENCE", 0.5)
    fed = make_federation(tmp_path, 3, "masking", rounds=1, open_s=6.0, stage_s=4.0,
                          release_s=1.0)
    agg = start_aggregator(fed, tmp_path)
    try:
        with Site.connect(fed.site_dir(1), tensors="numpy", retry_seconds=30) as site, \
                caplog.at_level(logging.INFO, logger="clients"):
            patience = clients.site._round_patience(site.config)
            assert patience == 13.5
            rnd = next(site.rounds())
            state = {name: np.asarray(value) for name, value in rnd.global_model.items()}
            outcome: list[object] = []

            def submit() -> None:
                try:
                    outcome.append(rnd.submit(state, weight=10))
                except Exception as e:
                    outcome.append(e)

            waiting = threading.Thread(target=submit, daemon=True)
            waiting.start()
            waiting.join(1.5 * patience)
            assert waiting.is_alive(), f"site 1 gave the round up: {outcome}"
            began = time.monotonic()
            reports = run_sites(fed, tmp_path, sites=[2, 3], timeout=120)
            waiting.join(max(1.0, 60 - (time.monotonic() - began)))
        assert len(outcome) == 1 and isinstance(outcome[0], dict), outcome
        assert [r["round"] for r in reports[2]] == [1]
        said = caplog.text
        assert "round 1 waits for its sites to come online (asking: 1, needed: at least 3)" in said
        assert "round 1 is under way" in said
    finally:
        agg.stop()
