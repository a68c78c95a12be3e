"""The demo's orchestration guards, without the service: following the aggregator's log (a
failed process, a stuck run, stray log lines, late reports), the run's plan (who drops out,
DP-SGD really on) and its clean-up of the hospital data it copies."""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.demo import run as demo
from clients.demo.run import DemoOptions, RunResult


class _Proc:
    """A stand-in for a site or aggregator process: ``on_poll`` runs at each poll."""

    def __init__(self, code: int | None = None, on_poll: Any = None) -> None:
        self.code = code
        self.on_poll = on_poll
        self.polls = 0

    def poll(self) -> int | None:
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll(self.polls)
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        return 0


class _Model:
    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _follow(tmp_path: Path, sites: list[_Proc], aggregator: _Proc, *, rounds: int = 1,
            label: str = "secure (masking)", baseline: RunResult | None = None) -> RunResult:
    result = RunResult(label)
    options = DemoOptions(sites=len(sites), json=True)
    demo._follow(result, tmp_path, rounds, options, sites, aggregator,  # type: ignore[arg-type]
                 types.SimpleNamespace(x_test=None, y_test=None), _Model(),
                 lambda model, x, y: 0.5, label,
                 baseline or RunResult("plaintext FedAvg", accuracy=[0.5] * rounds))
    return result


def _event(event: str, round_number: int) -> str:
    return json.dumps({"event": event, "round_id": f"demo-round-{round_number}",
                       "time": "2026-01-01T00:00:00.000000Z"}) + "\n"


def _clock(monkeypatch: pytest.MonkeyPatch, step: float) -> None:
    """A clock that moves ``step`` seconds a poll; a run that polls 50 times is stuck."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += step
        if now[0] > 50 * step:
            raise AssertionError("the demo kept waiting")

    monkeypatch.setattr(demo, "time", types.SimpleNamespace(monotonic=lambda: now[0],
                                                            sleep=sleep))


def test_a_site_that_fails_ends_the_demo_with_its_name_not_a_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "aggregator.log").write_text("")
    _clock(monkeypatch, 1.0)
    sites = [_Proc(), _Proc(code=1), _Proc()]
    (tmp_path / "site-2.err").write_text("Traceback...\nclients.errors.RoundAborted: why\n\n")
    with pytest.raises(demo.DemoFailed,
                       match=r"site 2 stopped \(exit 1\) before round 1 ended: "
                             r"clients.errors.RoundAborted: why \(SECAGG_DEMO_KEEP"):
        _follow(tmp_path, sites, _Proc())


def test_an_aggregator_that_stops_cleanly_ends_the_demo_not_a_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM to the aggregator (an operator, a supervisor) stops it with status 0: the
    demo waited for its hour's timeout, saying nothing."""
    (tmp_path / "aggregator.log").write_text(
        '{"message": "shutting down", "event": "shutdown"}\n')
    _clock(monkeypatch, 1.0)
    with pytest.raises(demo.DemoFailed,
                       match=r"the aggregator stopped \(exit 0\) before round 1 ended: "
                             "shutting down"):
        _follow(tmp_path, [_Proc(), _Proc(), _Proc()], _Proc(code=0))


def test_a_demo_that_stops_moving_times_out(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "aggregator.log").write_text("")
    _clock(monkeypatch, 600.0)  # ten minutes a poll: the hour is up after six
    with pytest.raises(demo.DemoFailed, match="timed out in round 1"):
        _follow(tmp_path, [_Proc(), _Proc(), _Proc()], _Proc())


def test_stray_log_lines_missing_reports_and_an_aborted_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A line that is not JSON (a warning on the aggregator's stderr), a line read while the
    aggregator is half-way through writing it, sites that have not reported yet and a round
    that aborts: the round is shown as aborted, no traceback and no wait."""
    _clock(monkeypatch, 1.0)
    aborted = _event("round_aborted", 1)
    log = tmp_path / "aggregator.log"
    log.write_text("a warning, not JSON\n" + _event("round_opened", 1) + aborted[:20])

    def rest(polls: int) -> None:
        if polls == 2:
            with log.open("a") as f:
                f.write(aborted[20:])

    result = _follow(tmp_path, [_Proc(), _Proc(), _Proc()], _Proc(on_poll=rest))
    assert result.aborted == [1] and result.dropouts == [3]


def test_a_round_is_read_only_once_every_site_has_reported(tmp_path: Path) -> None:
    """The reporter's model lands before the other sites' reports: epsilon and dropouts are
    read once all sites have reported, not from the first report (an understated epsilon)."""
    (tmp_path / "aggregator.log").write_text(_event("round_opened", 1))
    np.savez(tmp_path / "model-round-1.npz", w=np.zeros(3, dtype=np.float32))

    def report(site: int, epsilon: float) -> None:
        with (tmp_path / f"site-{site}.jsonl").open("a") as f:
            f.write(json.dumps({"round": 1, "bytes_sent": 100, "survivors": [1, 2, 3],
                                "epsilon": epsilon}) + "\n")

    report(1, 1.0)

    def later(polls: int) -> None:
        if polls == 3:
            report(2, 2.0)
            report(3, 5.0)

    result = _follow(tmp_path, [_Proc(), _Proc(), _Proc()], _Proc(on_poll=later),
                     label="secure (masking, DP-SGD)")
    assert result.epsilon == [5.0] and result.dropouts == [0]


def test_a_dp_run_is_not_compared_with_the_plaintext_model(tmp_path: Path) -> None:
    """The DP-SGD model (GroupNorm) has another shape than the baseline's: no comparison."""
    (tmp_path / "aggregator.log").write_text(_event("round_opened", 1))
    np.savez(tmp_path / "model-round-1.npz", w=np.zeros(3, dtype=np.float32))
    for s in (1, 2, 3):
        (tmp_path / f"site-{s}.jsonl").write_text(json.dumps(
            {"round": 1, "bytes_sent": 100, "survivors": [1, 2, 3], "epsilon": 1.0}) + "\n")
    baseline = RunResult("plaintext FedAvg", accuracy=[0.5], models=[np.zeros(5)])
    result = _follow(tmp_path, [_Proc(), _Proc(), _Proc()], _Proc(),
                     label="secure (masking, DP-SGD)", baseline=baseline)
    assert result.model_diff == [None]


# ---- the run's plan -------------------------------------------------------------------------


def _plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, options: DemoOptions,
          fail: bool = False) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.delenv("SECAGG_DEMO_KEEP", raising=False)

    def baseline(dataset: Any, parts: Any, rounds: int, train: Any, clip: float,
                 drops: Any, options: Any) -> RunResult:
        calls.append({"run": "baseline", "drops": drops})
        return RunResult("plaintext FedAvg", accuracy=[0.5] * rounds, train_s=[0.1] * rounds)

    def secure(dataset: Any, parts: Any, rounds: int, train: Any, clip: float,
               deadlines: Any, protocol: str, drops: Any, work: Path, options: Any,
               dp: bool, baseline: Any) -> RunResult:
        work.mkdir(parents=True)
        (work / "site-1.npz").write_bytes(b"a hospital's images")
        calls.append({"run": protocol, "drops": drops, "train": train, "dp": dp, "work": work})
        if fail:
            raise RuntimeError("site 2 failed")
        return RunResult("secure", accuracy=[0.5] * rounds)

    monkeypatch.setattr(demo, "plaintext_fedavg", baseline)
    monkeypatch.setattr(demo, "secure_run", secure)
    monkeypatch.setattr(demo, "_summary", lambda *a: {})
    options.out, options.json = tmp_path, True
    if fail:
        with pytest.raises(RuntimeError):
            demo.run(options)
    else:
        demo.run(options)
    return calls


def test_who_drops_out_fits_the_sites_and_rounds(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """With 3 sites a round needs them all (either protocol): nobody drops (a drop aborted the
    round); with fewer rounds than the drop round, the drop comes in the last round."""
    calls = _plan(monkeypatch, tmp_path, DemoOptions(protocol="ckks", sites=3, rounds=2))
    assert [c["drops"] for c in calls] == [{}, {}]
    calls = _plan(monkeypatch, tmp_path, DemoOptions(protocol="ckks", sites=4, rounds=1))
    assert [c["drops"] for c in calls] == [{1: {4}}, {4: {1: "UPLOAD"}}]


def test_dp_sgd_run_trains_with_the_asked_privacy(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    calls = _plan(monkeypatch, tmp_path, DemoOptions(sites=3, rounds=1, dp=True,
                                                     noise_multiplier=2.5, max_grad_norm=0.5,
                                                     delta=1e-4))
    dp_run = calls[-1]
    assert dp_run["dp"] and dp_run["train"].dp
    assert (dp_run["train"].noise_multiplier, dp_run["train"].max_grad_norm,
            dp_run["train"].delta) == (2.5, 0.5, 1e-4)
    assert not calls[1]["dp"] and not calls[1]["train"].dp


def test_the_copies_of_the_sites_data_are_removed_even_when_a_run_fails(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _plan(monkeypatch, tmp_path, DemoOptions(sites=3, rounds=1), fail=True)
    work_root = calls[-1]["work"].parent
    assert not work_root.exists()


# ---- training and the model -------------------------------------------------------------------


def test_dp_model_has_no_batch_norm_and_its_trainer_spends_privacy() -> None:
    """Opacus refuses BatchNorm (it mixes samples); the DP trainer reports a growing epsilon."""
    from torch import nn

    from clients.demo.model import make_model
    from clients.demo.train import LocalTrainer, TrainConfig

    model = make_model(8, 3, dp=True, seed=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    rng = np.random.default_rng(0)
    x = rng.random((16, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 3, 16).astype(np.int64)
    trainer = LocalTrainer(model, x, y, TrainConfig(epochs=1, batch_size=8, dp=True), seed=1)
    trainer.train_round({k: v.clone() for k, v in trainer.module.state_dict().items()}, 1)
    eps = trainer.epsilon()
    assert eps is not None and eps > 0


def test_dp_noise_and_sampling_are_secret_and_fresh_each_round() -> None:
    """The DP trainer's noise, sampling and dropout came from torch generators seeded with
    (public seed, round): anyone could train the demo's public config on dummy data, replay
    the noise, and subtract it from the update it was to hide. Two DP trainers alike in
    everything now train apart; without DP, training stays deterministic given the seed
    (the demo's plaintext baseline relies on it)."""
    import torch

    from clients.demo.model import make_model
    from clients.demo.train import LocalTrainer, TrainConfig

    rng = np.random.default_rng(0)
    x = rng.random((32, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 3, 32).astype(np.int64)

    def trained(dp: bool) -> dict[str, Any]:
        model = make_model(8, 3, dp=dp, seed=0)
        trainer = LocalTrainer(model, x, y, TrainConfig(epochs=1, batch_size=8, dp=dp), seed=1)
        start = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        return trainer.train_round(start, 1)

    a, b = trained(True), trained(True)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    # which records each batch holds (Opacus's Poisson sampling, from the loader's
    # generator): secret too, else anyone replays the batches the epsilon counts as secret
    batches, seeds = [], []
    for _ in range(2):
        trainer = LocalTrainer(make_model(8, 3, dp=True, seed=0), x, y,
                               TrainConfig(epochs=1, batch_size=8, dp=True), seed=1)
        trainer.train_round({k: v.clone() for k, v in trainer.module.state_dict().items()}, 1)
        # the noise's generator and torch's global one (dropout) were seeded from secrets,
        # not from (seed, round): each on its own, as either alone lets the other be replayed
        seeds.append((trainer._noise.initial_seed(), torch.initial_seed()))
        batches.append([tuple(yb.tolist()) for _, yb in trainer.loader])
    assert batches[0] != batches[1]
    assert all(a != b and 1001 not in (a, b) for a, b in zip(*seeds, strict=True))
    c, d = trained(False), trained(False)
    assert all(torch.equal(c[k], d[k]) for k in c)


def test_a_run_that_fails_stops_every_process_it_started(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """However the secure run ends (here its follower raises), the aggregator and every
    site it started are stopped: none is left serving, or training, after the demo."""
    import subprocess

    from clients.demo.data import Dataset
    from clients.demo.train import TrainConfig

    started: list[Any] = []

    class FakePopen:
        def __init__(self, args: list[str], **kwargs: Any) -> None:
            self.args, self.stopped = args, ""
            started.append(self)

        def poll(self) -> int | None:
            return -9 if self.stopped else None

        def kill(self) -> None:
            self.stopped = "killed"

        def terminate(self) -> None:
            self.stopped = "terminated"

        def wait(self, timeout: float | None = None) -> int:
            return 0

    def stuck(*args: Any) -> None:
        raise RuntimeError("the follower failed")

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(demo, "_follow", stuck)
    monkeypatch.setattr(demo, "_listening_port", lambda *_args, **_kwargs: 50123)
    x = np.zeros((12, 1, 8, 8), dtype=np.float32)
    y = (np.arange(12) % 2).astype(np.int64)
    dataset = Dataset("tiny", x, y, x[:4], y[:4], ("a", "b"))
    parts = [np.arange(0, 4), np.arange(4, 8), np.arange(8, 12)]
    with pytest.raises(RuntimeError, match="the follower failed"):
        demo.secure_run(dataset, parts, 1, TrainConfig(), 1.0,
                        {"open": 10.0, "stage": 10.0, "release": 10.0}, "masking", {},
                        tmp_path / "work", DemoOptions(sites=3, json=True), False,
                        RunResult("plaintext FedAvg"))
    assert len(started) == 4  # the aggregator, then three sites
    assert started[0].stopped == "terminated"
    assert [p.stopped for p in started[1:]] == ["killed"] * 3


def test_sigterm_and_sighup_end_the_demo_as_ctrl_c_does() -> None:
    """SIGTERM, or SIGHUP (a closed ssh session), ended the demo's process at once: its
    aggregator served on and the work directory (the sites' copies of the images, the
    federation's keys) stayed. Both now raise KeyboardInterrupt, whose way out stops the
    processes and removes the directory; a SIGHUP ignored (nohup) stays ignored."""
    import os
    import signal

    seen: list[int] = []

    def record(signum: int, _frame: Any) -> None:  # (what the process had: kept alive)
        seen.append(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        before = signal.signal(sig, record)
        try:
            with pytest.raises(KeyboardInterrupt), demo._terminate_as_interrupt():
                os.kill(os.getpid(), sig)
                signal.sigtimedwait([], 0.5)  # (the handler runs at the next bytecode)
            assert signal.getsignal(sig) is record  # (given back as it was)
        finally:
            signal.signal(sig, before)
    assert seen == []
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with demo._terminate_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux")
def test_the_demos_processes_end_when_the_demo_is_killed(tmp_path: Path) -> None:
    """A SIGKILL of the demo (no handler runs) left its aggregator serving for good: its
    processes are told by the kernel (PR_SET_PDEATHSIG) and stop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    mark = tmp_path / "child"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from clients.demo.run import _children_end_with_us\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                     preexec_fn=_children_end_with_us())\n"
        f"open({str(mark)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(60)\n")], cwd=Path(__file__).resolve().parents[2])
    child = 0
    try:
        deadline = time.monotonic() + 60
        while not (mark.exists() and mark.read_text()):
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = int(mark.read_text())
        parent.kill()
        parent.wait()
        def alive() -> bool:
            try:
                return Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0] \
                    != "Z"
            except OSError:
                return False

        deadline = time.monotonic() + 10
        while alive():
            assert time.monotonic() < deadline, "the demo's child outlived it"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
