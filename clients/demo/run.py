"""The demo's orchestration: a federation in a temporary directory, the aggregator and one
process per site over mTLS on loopback, a plaintext FedAvg baseline on the same splits, seeds
and local training (in this process), and the report: per-round lines, a summary table, a PNG
plot and a JSON summary. Nothing in the secure run bypasses the wire."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.demo.data import Dataset, dirichlet_split, load
from clients.demo.train import TrainConfig
from secagg.errors import ConfigurationError, SecAggError

ROOT = Path(__file__).resolve().parents[2]
ALPHA = 0.5
SEED = 7


class DemoFailed(SecAggError):
    """A process of the demo failed or stopped before the job ended (one line)."""


@dataclass
class DemoOptions:
    protocol: str = "masking"  # masking, ckks or both
    sites: int = 5
    rounds: int | None = None
    dataset: str = "digits"
    dp: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    out: Path | None = None
    json: bool = False
    drop_round: int = 2


@dataclass
class RunResult:
    label: str
    accuracy: list[float] = field(default_factory=list)
    round_s: list[float] = field(default_factory=list)
    bytes_per_site: list[float] = field(default_factory=list)
    dropouts: list[int] = field(default_factory=list)
    epsilon: list[float | None] = field(default_factory=list)
    aborted: list[int] = field(default_factory=list)
    seconds: float = 0.0
    train_s: list[float] = field(default_factory=list)  # baseline: all sites' training per round
    models: list[np.ndarray] = field(default_factory=list)  # the baseline's global models
    # max |secure global model - plaintext global model| per round: in round 1 both average
    # the same updates, so it is the protocol's error alone; later the runs may drift apart
    model_diff: list[float | None] = field(default_factory=list)


def _say(options: DemoOptions, text: str) -> None:
    print(text, file=sys.stderr if options.json else sys.stdout, flush=True)


def _defaults(dataset: Dataset) -> tuple[int, TrainConfig, dict[str, float]]:
    """(rounds, local training, deadlines) for a data set."""
    if dataset.name == "digits":
        return 15, TrainConfig(epochs=2, lr=0.05, momentum=0.9, batch_size=32), {
            "open": 20.0, "stage": 4.0, "release": 30.0}
    big = len(dataset.y_train) > 20_000
    return 20, TrainConfig(epochs=1, lr=0.05, momentum=0.9, batch_size=64), {
        "open": 600.0 if big else 60.0, "stage": 10.0, "release": 120.0}


# ---- the plaintext baseline ------------------------------------------------------------------


def plaintext_fedavg(dataset: Dataset, parts: list[np.ndarray], rounds: int,
                     train: TrainConfig, clip_norm: float, drops: dict[int, set[int]],
                     options: DemoOptions) -> RunResult:
    """FedAvg in this process on the same splits, seeds and local training; a site that drops
    out of a round in the secure run is left out of that round here too."""
    import torch

    from clients.demo.model import make_model
    from clients.demo.train import LocalTrainer, accuracy
    from clients.tensors import clip_l2, to_numpy
    from secagg.model import FlatModel

    torch.set_num_threads(int(os.environ.get("SECAGG_DEMO_THREADS", "1")))  # sites share the cores
    result = RunResult("plaintext FedAvg")
    began = time.perf_counter()
    global_model = make_model(dataset.image_size, len(dataset.classes), seed=SEED)
    flat = FlatModel.from_arrays(to_numpy(global_model.state_dict()))
    trainers = {s: LocalTrainer(make_model(dataset.image_size, len(dataset.classes), seed=SEED),
                                dataset.x_train[idx], dataset.y_train[idx], train,
                                seed=SEED + s) for s, idx in enumerate(parts, 1)}
    max_samples = max(t.samples for t in trainers.values())
    for r in range(1, rounds + 1):
        state = {k: torch.from_numpy(np.ascontiguousarray(v))
                 for k, v in flat.to_arrays().items()}
        total = np.zeros(flat.size)
        weights = 0.0
        train_s = 0.0
        for s, trainer in trainers.items():
            if s in drops.get(r, set()):
                continue
            t0 = time.perf_counter()
            trained = FlatModel.from_arrays(to_numpy(trainer.train_round(state, r)))
            train_s += time.perf_counter() - t0
            delta, _ = clip_l2(trained.values - flat.values, clip_norm, flat.integer_positions)
            # the quantiser's range, as in the secure run: each value within [-clip, clip]
            # (this moves only integer counters, which clip_l2 leaves unscaled)
            delta = np.clip(delta, -clip_norm, clip_norm)
            w = trainer.samples / max_samples
            total += w * delta
            weights += w
        flat = flat.with_values(flat.values + total / weights)
        result.train_s.append(train_s)
        result.models.append(flat.values.copy())
        global_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                      for k, v in flat.to_arrays().items()})
        result.accuracy.append(accuracy(global_model, dataset.x_test, dataset.y_test))
    result.seconds = time.perf_counter() - began
    return result


# ---- the secure run over the service -------------------------------------------------------------


def _listening_port(log: Path, aggregator: subprocess.Popen[bytes],
                    timeout: float = 120.0) -> int:
    """The port the aggregator's log says it listens on, once it does; a RuntimeError with
    the log's last lines if it exits first or takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            with contextlib.suppress(ValueError, AttributeError, IndexError):
                event = json.loads(line)
                if event.get("event") == "listening":
                    return int(str(event["peer"]).rsplit("->", 1)[1])
        if aggregator.poll() is not None or time.monotonic() > deadline:
            raise DemoFailed(f"the aggregator did not start ({_exit(aggregator.poll())}): "
                             f"{_last_line(text) or 'no log'}")
        time.sleep(0.05)


def _exit(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"


def _last_line(text: str) -> str:
    """The last line of a log that says something (a JSON log line's message and reason, or
    a traceback's last line), shortened."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line:
            continue
        with contextlib.suppress(ValueError, AttributeError):
            event = json.loads(line)
            line = " ".join(str(event[k]) for k in ("message", "reason") if event.get(k))
        return line[:300]
    return ""


def _children_end_with_us() -> Any:
    """For Popen's preexec_fn: the child is sent SIGTERM when the demo's process ends,
    however it ends (a SIGKILL of the demo left its aggregator serving for good). prctl is
    looked up here, in the parent: the child, forked beside other threads, runs no import."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, term = os.getpid(), int(signal.SIGTERM)

    def end_with_the_demo() -> None:
        # defence: demo.children-end-with-the-demo
        prctl(1, term)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # (the demo died before the call: nobody to tell us)
            os.kill(os.getpid(), term)

    return end_with_the_demo


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # six processes share two cores
    return env


def secure_run(dataset: Dataset, parts: list[np.ndarray], rounds: int, train: TrainConfig,
               clip_norm: float, deadlines: dict[str, float], protocol: str,
               drops: dict[int, dict[int, str]], work: Path, options: DemoOptions,
               dp: bool, baseline: RunResult) -> RunResult:
    from clients.demo.model import make_model
    from clients.demo.train import accuracy
    from clients.tensors import to_numpy
    from secagg.federation.config import Deadlines
    from secagg.federation.kit import init_federation

    label = f"secure ({protocol}{', DP-SGD' if dp else ''})"
    result = RunResult(label)
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    for s, idx in enumerate(parts, 1):
        np.savez(work / "data" / f"site-{s}.npz", x=dataset.x_train[idx],
                 y=dataset.y_train[idx])
    model = make_model(dataset.image_size, len(dataset.classes), dp=dp, seed=SEED)
    np.savez(work / "initial.npz", **to_numpy(model.state_dict()))  # type: ignore[arg-type]
    fed = work / "federation"
    init_federation(fed, options.sites, protocol=protocol, key_holders=(1, 2),
                    aggregator="localhost:50051", initial_model=work / "initial.npz",
                    name="demo", rounds=rounds, clip_norm=clip_norm,
                    max_samples=float(max(len(p) for p in parts)),
                    deadlines=Deadlines(**deadlines))
    plan = {"image_size": dataset.image_size, "classes": len(dataset.classes), "dp": dp,
            "seed": SEED, "train": asdict(train), "reporter": 1,
            "drops": {str(s): {str(r): stage for r, stage in rs.items()}
                      for s, rs in drops.items()}}
    (work / "demo.json").write_text(json.dumps(plan))
    log = open(work / "aggregator.log", "wb")  # noqa: SIM115 (the aggregator owns it)
    # The aggregator takes a free port itself and the sites are told it: a port picked here
    # and bound later could be taken meanwhile (the metrics server's own port 0, or a site's
    # connection to itself), and the aggregator then exited 2 (CI, once).
    # defence: demo.aggregator-port-taken-by-the-aggregator
    aggregator = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "secagg.cli", "aggregator", "serve", "--config",
         str(fed / "aggregator" / "federation.toml"), "--store", str(work / "aggregator.db"),
         "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
        stdout=log, stderr=log, env=_env(), cwd=ROOT, preexec_fn=_children_end_with_us())
    try:
        port = _listening_port(work / "aggregator.log", aggregator)
    except BaseException:
        aggregator.kill()
        aggregator.wait()
        raise
    for s in range(1, options.sites + 1):  # ([federation] aggregator is each party's own)
        config = fed / "sites" / f"site-{s}" / "federation.toml"
        config.write_text(config.read_text().replace('aggregator = "localhost:50051"',
                                                     f'aggregator = "localhost:{port}"', 1))
    sites = [subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "clients.demo.site", str(fed / "sites" / f"site-{s}"),
         str(work)], stdout=subprocess.DEVNULL,
        stderr=open(work / f"site-{s}.err", "wb"), env=_env(), cwd=ROOT,  # noqa: SIM115
        preexec_fn=_children_end_with_us())
        for s in range(1, options.sites + 1)]
    began = time.perf_counter()
    try:
        _follow(result, work, rounds, options, sites, aggregator, dataset, model, accuracy,
                label, baseline)
    finally:
        # (a run that fails or is interrupted leaves no aggregator or site behind)
        # defence: demo.processes-stopped-when-the-run-ends
        for p in sites:
            if p.poll() is None:
                p.kill()
        aggregator.terminate()
        try:
            aggregator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            aggregator.kill()
        log.close()
    result.seconds = time.perf_counter() - began
    return result


def _follow(result: RunResult, work: Path, rounds: int, options: DemoOptions,
            sites: list[subprocess.Popen[bytes]], aggregator: subprocess.Popen[bytes],
            dataset: Dataset, model: Any, accuracy: Any, label: str,
            baseline: RunResult) -> None:
    """Show progress from the aggregator's log and evaluate each round's model as it lands."""
    import torch
    from tqdm.auto import tqdm

    from secagg.model import FlatModel

    bar = tqdm(total=rounds, desc=label, unit="round", file=sys.stderr, leave=False,
               mininterval=0.5, disable=not sys.stderr.isatty())
    _header(options, dp=train_is_dp(label))
    stage_names = {1: "keys", 2: "shares", 3: "masked inputs", 4: "consistency",
                   5: "unmask"} if "masking" in label else {5: "key", 1: "uploads",
                                                            2: "release"}
    events: list[dict[str, Any]] = []
    offset = 0
    opened: dict[str, float] = {}
    aborted: set[int] = set()
    done = 0
    deadline = time.monotonic() + 3600
    while done < rounds:
        # defence: demo.follow-times-out
        if time.monotonic() > deadline:
            raise DemoFailed(f"the demo timed out in round {done + 1}")
        with open(work / "aggregator.log", "rb") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.splitlines():
            # defence: demo.stray-log-lines-skipped
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
            e = events[-1]
            if e.get("event") == "round_opened":
                opened[e["round_id"]] = _ts(e["time"])
            elif e.get("event") == "message_counted":
                bar.set_postfix_str(f"{stage_names.get(int(e.get('stage') or 0), '')}: "
                                    f"site {e.get('site_id')}")
            elif e.get("event") in ("round_completed", "round_aborted"):
                result.round_s.append(_ts(e["time"]) - opened.get(e["round_id"], _ts(e["time"])))
                if e.get("event") == "round_aborted":
                    aborted.add(int(e["round_id"].rsplit("-", 1)[1]))
        path = work / f"model-round-{done + 1}.npz"
        reports = _reports(work, options.sites, done + 1)
        if done + 1 in aborted:  # no new model: the round's accuracy is the previous one's
            result.accuracy.append(result.accuracy[-1] if result.accuracy else float("nan"))
            result.model_diff.append(None)
            result.bytes_per_site.append(0.0)
            result.dropouts.append(options.sites)
            result.epsilon.append(result.epsilon[-1] if result.epsilon else None)
            result.aborted.append(done + 1)
            done += 1
            bar.clear()
            _line(options, result, baseline, done - 1)
            bar.update(1)
        # defence: demo.round-read-after-every-report
        elif path.exists() and len(reports) == options.sites:
            time.sleep(0.05)
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
            # defence: demo.dp-model-not-compared
            if train_is_dp(label) or done >= len(baseline.models):
                result.model_diff.append(None)  # another model (GroupNorm): not comparable
            else:
                secure = FlatModel.from_arrays(arrays).values
                result.model_diff.append(float(np.max(np.abs(secure - baseline.models[done]))))
            acc = accuracy(model, dataset.x_test, dataset.y_test)
            result.accuracy.append(acc)
            sent = [r["bytes_sent"] for r in reports.values() if "dropped" not in r]
            result.bytes_per_site.append(float(np.median(sent)) if sent else 0.0)
            survivors: list[int] = next(
                (r["survivors"] for r in reports.values() if "survivors" in r), [])
            result.dropouts.append(options.sites - len(survivors))
            eps = [r["epsilon"] for r in reports.values() if r.get("epsilon") is not None]
            result.epsilon.append(max(eps) if eps else None)
            done += 1
            bar.clear()
            _line(options, result, baseline, done - 1)
            bar.update(1)
        for p in [*sites, aggregator]:
            code = p.poll()
            # (an aggregator that stopped with status 0, told to by SIGTERM, left the demo
            # waiting for its hour's timeout, saying nothing)
            # defence: demo.failed-process-ends-the-demo
            if code not in (None, 0) or (p is aggregator and code is not None):
                who = "the aggregator" if p is aggregator else f"site {sites.index(p) + 1}"
                name = "aggregator.log" if p is aggregator else f"site-{sites.index(p) + 1}.err"
                said = _last_line((work / name).read_text(errors="replace")
                                  if (work / name).exists() else "")
                raise DemoFailed(f"{who} stopped ({_exit(code)}) before round {done + 1} "
                                 f"ended{': ' + said if said else ''} (SECAGG_DEMO_KEEP=1 keeps "
                                 "the work directory, logs and all)")
        time.sleep(0.1)
    bar.close()
    for p in sites:
        p.wait(timeout=120)


def _reports(work: Path, sites: int, round_number: int) -> dict[int, dict[str, Any]]:
    out = {}
    for s in range(1, sites + 1):
        path = work / f"site-{s}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["round"] == round_number:
                out[s] = r
    return out


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.strptime(text[:-1], "%Y-%m-%dT%H:%M:%S.%f").timestamp()


# ---- the demo ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _terminate_as_interrupt() -> Any:
    """SIGTERM, and SIGHUP (a closed terminal or ssh session), end the demo as Ctrl-C does:
    its processes are stopped and the work directory (the sites' copies of the images, the
    federation's keys) removed. They ended the demo's process at once, and left the
    aggregator serving and the work directory behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    kept = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        # (a demo started under nohup keeps SIGHUP ignored)
        if signal.getsignal(sig) is not signal.SIG_IGN:
            # defence: demo.terminate-cleans-up
            kept[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


def run(options: DemoOptions) -> dict[str, Any]:
    with _terminate_as_interrupt():
        return _run(options)


def _run(options: DemoOptions) -> dict[str, Any]:
    began = time.perf_counter()
    # (made first: a --out that is a file was refused only after the data set was read)
    if options.out:
        out = Path(options.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            # (a directory it cannot write, /proc or a read-only mount, failed at the end)
            # defence: demo.out-writable-before-work
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as e:
            cause = e.strerror or type(e).__name__
            why = ("not a directory" if out.exists() and not out.is_dir()
                   else f"cannot write into it ({cause})" if out.is_dir() else cause)
            raise ConfigurationError(f"cannot use {out} as the output directory: {why}"
                                     ) from None
    if options.dataset.startswith("folder:"):
        _say(options, f"secagg demo: reading the images of {options.dataset[len('folder:'):]}")
    dataset = load(options.dataset, seed=SEED)
    parts = dirichlet_split(dataset.y_train, options.sites, ALPHA, SEED)
    rounds, train, deadlines = _defaults(dataset)
    rounds = options.rounds or rounds
    clip_norm = 10.0
    # One site drops out in one round, if the round can complete without it: a sum covers at
    # least 3 sites in either protocol (CKKS's min_sites, masking's threshold), so with 3
    # sites nobody may drop.
    # defence: demo.no-dropout-with-three-sites
    dropper = options.sites if options.sites >= 4 else None
    drop_round = min(options.drop_round, rounds)
    protocols = ["masking", "ckks"] if options.protocol == "both" else [options.protocol]
    _say(options, f"secagg demo: {options.sites} hospital sites train a CNN on "
                  f"{dataset.name} ({len(dataset.y_train):,} training images split non-IID, "
                  f"Dirichlet alpha={ALPHA}; {len(dataset.y_test):,} held out), {rounds} rounds")
    _say(options, "  sites: " + ", ".join(f"{s}: {len(p)} images" for s, p in
                                          enumerate(parts, 1)))
    # (which folders became classes, and with how many images, was shown nowhere: a hidden
    # folder taken for a class, or images left out, went unseen)
    counts = _class_counts(dataset)
    _say(options, "  classes: " + ", ".join(f"{name} ({n} train / {t} test)"
                                            for name, (n, t) in counts.items()))
    if dataset.skipped:
        _say(options, f"  {dataset.skipped} file(s) in the class folders are not images of a "
                      "kind the demo reads and were left out")
    if dropper is not None:
        _say(options, f"  site {dropper} loses its connection in round {drop_round}; that "
                      "round completes without it")
    else:
        _say(options, f"  no site drops out: with {options.sites} sites a round needs them "
                      "all (a sum covers at least 3 sites, in either protocol)")
    if not options.out:
        out = Path(tempfile.mkdtemp(prefix="secagg-demo-"))
    work_root = Path(tempfile.mkdtemp(prefix="secagg-demo-work-"))
    results: list[RunResult] = []
    try:
        _say(options, "\n  training plaintext FedAvg in this process (the baseline)")
        baseline = plaintext_fedavg(dataset, parts, rounds, train, clip_norm,
                                    {drop_round: {dropper}} if dropper else {}, options)
        results.append(baseline)
        if len(dataset.y_train) > 20_000:
            # Sites train after a round opens, so its first deadline must cover training; a
            # site that drops out silently is known only when it passes. Sized from the
            # baseline's training time on this machine (all sites one after another): ample
            # for the sites training side by side, far shorter than a fixed 10 minutes.
            slowest = max(baseline.train_s)
            deadlines = {**deadlines, "open": max(60.0, 4 * slowest)}
        for protocol in protocols:
            stage = "SHARE_KEYS" if protocol == "masking" else "UPLOAD"
            drops = {dropper: {drop_round: stage}} if dropper else {}
            _say(options, f"\n  running {protocol} over mTLS: aggregator + {options.sites} site "
                          "processes")
            secure = secure_run(dataset, parts, rounds, train, clip_norm, deadlines, protocol,
                                drops, work_root / protocol, options, dp=False,
                                baseline=baseline)
            results.append(secure)
        if options.dp:
            # defence: demo.dp-run-trains-with-dp-sgd
            dp_train = TrainConfig(**{**asdict(train), "dp": True,
                                      "noise_multiplier": options.noise_multiplier,
                                      "max_grad_norm": options.max_grad_norm,
                                      "delta": options.delta})
            _say(options, f"\n  running {protocols[0]} with DP-SGD (Opacus; noise multiplier "
                          f"{options.noise_multiplier}, max grad norm {options.max_grad_norm},"
                          f" delta {options.delta})")
            # per-sample gradients (Opacus) make local training several times slower
            dp_deadlines = {**deadlines, "open": deadlines["open"] * 4}
            dp_result = secure_run(dataset, parts, rounds, dp_train, clip_norm, dp_deadlines,
                                   protocols[0], {dropper: {drop_round: "SHARE_KEYS"
                                                            if protocols[0] == "masking"
                                                            else "UPLOAD"}} if dropper else {},
                                   work_root / "dp", options, dp=True, baseline=baseline)
            results.append(dp_result)
    finally:
        # defence: demo.site-data-copies-removed
        if not os.environ.get("SECAGG_DEMO_KEEP"):
            shutil.rmtree(work_root, ignore_errors=True)
    summary = _summary(options, dataset, rounds, results, out, time.perf_counter() - began)
    return summary


def _class_counts(dataset: Dataset) -> dict[str, tuple[int, int]]:
    return {name: (int(np.sum(dataset.y_train == i)), int(np.sum(dataset.y_test == i)))
            for i, name in enumerate(dataset.classes)}


def train_is_dp(label: str) -> bool:
    return "DP" in label


def _header(options: DemoOptions, *, dp: bool) -> None:
    _say(options, f"  {'round':>5} {'secure acc':>10} {'plaintext':>10} {'bytes/site':>11} "
                  f"{'round s':>8} {'dropouts':>8}" + ("  max epsilon" if dp else ""))


def _line(options: DemoOptions, secure: RunResult, baseline: RunResult, i: int) -> None:
    eps = secure.epsilon[i] if i < len(secure.epsilon) else None
    round_s = secure.round_s[i] if i < len(secure.round_s) else float("nan")
    _say(options, f"  {i + 1:>5} {secure.accuracy[i]:>10.4f} {baseline.accuracy[i]:>10.4f} "
                  f"{secure.bytes_per_site[i]:>11,.0f} {round_s:>8.2f} "
                  f"{secure.dropouts[i]:>8}" + (f"  {eps:11.2f}" if eps is not None else "")
                  + ("  (round aborted)" if i + 1 in secure.aborted else ""))


def _summary(options: DemoOptions, dataset: Dataset, rounds: int, results: list[RunResult],
             out: Path, seconds: float) -> dict[str, Any]:
    baseline = results[0]
    plot = out / "accuracy.png"
    _plot(results, plot, dataset.name)
    runs = []
    for r in results:
        entry: dict[str, Any] = {
            "label": r.label, "final_accuracy": r.accuracy[-1] if r.accuracy else None,
                 "accuracy": r.accuracy, "seconds": r.seconds}
        if r is not baseline:
            entry.update(round_s=r.round_s, bytes_per_site=r.bytes_per_site,
                         dropouts=r.dropouts, aborted_rounds=r.aborted,
                         gap_vs_plaintext_pp=100 * (r.accuracy[-1] - baseline.accuracy[-1]),
                         model_max_abs_diff_vs_plaintext=r.model_diff)
            if any(e is not None for e in r.epsilon):
                entry.update(epsilon=r.epsilon, delta=options.delta,
                             accuracy_cost_pp=100 * (baseline.accuracy[-1] - r.accuracy[-1]))
        runs.append(entry)
    summary = {"dataset": dataset.name, "sites": options.sites, "rounds": rounds,
               "classes": {name: {"train": n, "test": t}
                           for name, (n, t) in _class_counts(dataset).items()},
               "skipped_files": dataset.skipped,
               "alpha": ALPHA, "seed": SEED, "runs": runs, "plot": str(plot),
               "seconds": seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(options, "\n  summary")
    _say(options, f"  {'run':<32} {'final acc':>9} {'vs plaintext':>12} {'time s':>8}")
    for e in runs:
        gap = e.get("gap_vs_plaintext_pp")
        _say(options, f"  {e['label']:<32} {e['final_accuracy']:>9.4f} "
                      f"{'' if gap is None else f'{gap:+.2f} pp':>12} {e['seconds']:>8.1f}")
    if options.dp:
        _say(options, "  DP-SGD and secure aggregation compose: the aggregator sums updates that "
                      "each site trained with DP-SGD; epsilon is each site's own guarantee.")
    _say(options, f"  the aggregator saw only sums; plot: {plot}; summary: "
                  f"{out / 'summary.json'}")
    return summary


def _plot(results: list[RunResult], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(range(1, len(r.accuracy) + 1), r.accuracy, marker="o", label=r.label)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Federated training on {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
