"""Real processes on loopback: a federation in a temporary directory, the aggregator as a
subprocess (killable with SIGKILL and restartable on the same store), sites as subprocesses
running ``tests/service_site.py``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secagg.federation.kit import init_federation

ROOT = Path(__file__).resolve().parents[1]
SITE_SCRIPT = ROOT / "tests" / "service_site.py"
SHAPES = {"w": (40, 8), "b": (8,)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def initial_model(path: Path, shapes: dict[str, tuple[int, ...]] | None = None,
                  steps_dtype: str = "int64", float_dtype: str = "float32") -> Path:
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(0, 0.1, v).astype(float_dtype)
              for k, v in (shapes or SHAPES).items()}
    arrays["steps"] = np.array(0, dtype=steps_dtype)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def site_delta(site: int, round_number: int, size: int) -> np.ndarray:
    """What tests/service_site.py adds to the global model (deterministic, test data only)."""
    rng = np.random.default_rng(1000 * site + round_number)
    delta = rng.normal(0, 0.05, size)
    delta[-1] = 1.0  # the last tensor is the integer "steps" buffer: one more step per round
    return delta


def site_weight(site: int) -> int:
    return 100 * site


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@dataclass
class Federation:
    directory: Path
    sites: int
    protocol: str
    port: int

    @property
    def aggregator_config(self) -> Path:
        return self.directory / "aggregator" / "federation.toml"

    def site_dir(self, site: int) -> Path:
        return self.directory / "sites" / f"site-{site}"


def make_federation(tmp: Path, sites: int = 5, protocol: str = "masking", *,
                    rounds: int = 3, open_s: float = 20.0, stage_s: float = 4.0,
                    release_s: float = 30.0, key_holders: Sequence[int] = (1,),
                    shapes: dict[str, tuple[int, ...]] | None = None,
                    steps_dtype: str = "int64", float_dtype: str = "float32",
                    **overrides: Any) -> Federation:
    from secagg.federation.config import Deadlines

    port = free_port()
    model = initial_model(tmp / "init.npz", shapes, steps_dtype, float_dtype)
    d = tmp / "federation"
    init_federation(d, sites, protocol=protocol, key_holders=key_holders,
                    aggregator=f"localhost:{port}", initial_model=model, rounds=rounds,
                    deadlines=Deadlines(open=open_s, stage=stage_s, release=release_s),
                    max_samples=float(site_weight(sites)), **overrides)
    return Federation(d, sites, protocol, port)


def ckks_key_offer(fed: Federation, config: Any, round_id: str,
                   number: int = 1) -> tuple[int, Any, bytes]:
    """The key holder of round ``number`` of an in-process CKKS job: (holder, its signed
    announcement, its public context's bytes), as the SDK would make them."""
    from secagg.ckks import KeyHolder
    from secagg.federation.kit import SiteKit

    holder = config.key_holder_for(number)
    kit = SiteKit.load(fed.site_dir(holder))
    key = KeyHolder.generate(config.preset)
    announcement = key.announce(holder=holder, identity=kit.identity, epoch=round_id,
                                max_rounds=1)
    return holder, announcement, key.public_context().serialize()


_LIMIT_THEN_EXEC = ("import os, resource, sys; n = int(sys.argv[1]); "
                    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
                    "os.execv(sys.argv[2], sys.argv[2:])")


@dataclass
class Aggregator:
    federation: Federation
    store: Path | str  # a SQLite file or a database URL
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log_offset: int = 0
    lines: list[dict[str, Any]] = field(default_factory=list)
    open_files: int | None = None  # the process's open-files limit (soft and hard), if set
    # the command before "aggregator serve ..." (default: the real secagg command line)
    launcher: tuple[str, ...] = ("-m", "secagg.cli")
    listen: str | None = None  # --listen (default: the config's port)

    def start(self, *, wait: bool = True) -> None:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 (the process owns it)
        command = [sys.executable, *self.launcher, "aggregator", "serve", "--config",
                   str(self.federation.aggregator_config), "--store", str(self.store),
                   "--metrics", "127.0.0.1:0",
                   *(("--listen", self.listen) if self.listen else ())]
        if self.open_files is not None:
            # set by a small Python that then execs the command, never by a preexec_fn: one
            # makes subprocess fork this (gRPC-threaded) test process and run Python in the
            # child, where gRPC's fork handlers started a poller whose epoll descriptor
            # close_fds then closed ("epoll_wait error: Bad file descriptor"): the child died
            # before exec, and a test failed with "aggregator exited" (CI, once)
            command = [sys.executable, "-c", _LIMIT_THEN_EXEC, str(self.open_files), *command]
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env(), cwd=ROOT)
        log.close()
        if wait:
            self.wait_for(lambda e: e.get("event") == "serving", count=self.starts)

    def read(self) -> list[dict[str, Any]]:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        for raw in complete.splitlines():
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"raw": raw.decode(errors="replace")})
        return self.lines

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], *, count: int = 1,
                 timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if sum(1 for e in self.read() if predicate(e)) >= count:
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"aggregator exited: {self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting in the aggregator log: {self.tail()}")

    def tail(self, n: int = 15) -> str:
        return "\n".join(json.dumps(e) for e in self.read()[-n:])

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_aggregator(fed: Federation, tmp: Path, store: str | None = None) -> Aggregator:
    agg = Aggregator(fed, store or tmp / "aggregator.db", tmp / "aggregator.log")
    agg.start()
    return agg


def start_site(fed: Federation, site: int, out: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(SITE_SCRIPT), str(fed.site_dir(site)), str(out), *args],
        stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".err"), "wb"),
        env=env(), cwd=ROOT)


def run_sites(fed: Federation, tmp: Path, sites: Sequence[int] | None = None,
              extra: dict[int, Sequence[str]] | None = None,
              timeout: float = 240.0) -> dict[int, list[dict[str, Any]]]:
    """Run the sites to the end of the job; their per-round reports."""
    extra = extra or {}
    procs = {}
    for s in sites or range(1, fed.sites + 1):
        procs[s] = start_site(fed, s, tmp / f"site-{s}.jsonl", *extra.get(s, ()))
    end = time.monotonic() + timeout
    for s, p in procs.items():
        try:
            p.wait(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise AssertionError(f"site {s} did not finish: "
                                 f"{(tmp / f'site-{s}.err').read_text()[-2000:]}") from None
    return {s: read_reports(tmp / f"site-{s}.jsonl") for s in procs}


def read_reports(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fedavg(model: dict[str, np.ndarray], reports: dict[int, list[dict[str, Any]]],
           round_number: int, survivors: Sequence[int], clip: float,
           max_samples: float) -> np.ndarray:
    """Plaintext FedAvg of the clipped deltas the sites sent (tests/service_site.py)."""
    from secagg.model import FlatModel

    flat = FlatModel.from_arrays(model)
    total, weights = np.zeros(flat.size), 0.0
    for s in survivors:
        delta = site_delta(s, round_number, flat.size)
        norm = float(np.linalg.norm(delta[:-1]))  # the step counter is not in the norm
        if norm > clip:
            delta[:-1] *= clip / norm
        w = site_weight(s) / max_samples
        total += w * delta
        weights += w
    return flat.with_values(flat.values + total / weights).values


def iter_lines(path: Path) -> Iterator[str]:
    yield from path.read_text().splitlines()
