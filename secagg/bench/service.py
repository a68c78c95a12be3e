"""``secagg bench service``: one full round over mTLS on loopback, sites as separate processes.

Figures (all measured in the same run):
- ``round_s``: from the moment every site process is connected, holds the model and has
  "trained" (a barrier) until every site has the round's result (the new model, checked
  against its digest; the processes' exit is not counted);
- ``inproc_round_s``: the same protocol, sites and sizes in one process (no network, no
  store); ``overhead_ratio = round_s / inproc_round_s``;
- ``sites_cpu_s`` / ``aggregator_cpu_s``: CPU seconds the site processes (summed) and the
  aggregator spent within ``round_s``: on 2 cores the round cannot be shorter than half
  their sum;
- ``transport_floor_s``: the bytes every site sent and received in the round, moved at
  ``grpc_sink_mbps``: what the transport alone would take with no protocol, store or
  scheduling (``transport_floor_ratio`` = that over ``inproc_round_s``);
- ``bytes_per_site``: what a site sent (messages and chunks), median;
- ``aggregator_peak_rss_mb``: the aggregator's peak resident memory (VmHWM);
- ``grpc_sink_mbps``: raw chunk upload over the same mTLS on loopback into a servicer that
  discards what it gets; ``ingest_mbps``: the same upload into the aggregator (hashing every
  chunk and storing it), both from the same client code, same chunk size, same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

# within each site's upload budget (16 MiB, each chunk charged 64 KiB), with room for its round
SINK_BYTES_PER_SITE = 14 << 20


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (0 where /proc is not there)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _env() -> dict[str, str]:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env["GRPC_VERBOSITY"] = "ERROR"
    return env


def _upload_rate(kits: list[Any], port: int, per_site: int) -> float:
    """MB/s of chunk uploads, one connection per site in turn, over mTLS to ``port``."""
    import dataclasses

    from clients.transport import CHUNK_BYTES, Connection

    payloads = [os.urandom(per_site) for _ in kits]
    connections = []
    for kit in kits:
        kit = dataclasses.replace(kit, config=dataclasses.replace(
            kit.config, aggregator=f"localhost:{port}"))
        connections.append(Connection(kit, retry_seconds=30, call_timeout=120))
    # warm the channels (TLS handshakes) before timing
    for c in connections:
        c.upload(os.urandom(1000))
    began = time.perf_counter()
    for c, data in zip(connections, payloads, strict=True):
        c.upload(data)
    elapsed = time.perf_counter() - began
    for c in connections:
        c.close()
    del CHUNK_BYTES
    return len(kits) * per_site / elapsed / 1e6


def _sink_server(files: Any, ready: threading.Event, port_box: list[int],
                 stop: threading.Event) -> None:
    """A gRPC server over the aggregator's TLS material whose PutChunks discards."""
    import grpc

    from secagg.v1 import service_pb2, service_pb2_grpc

    class Sink(service_pb2_grpc.AggregationServicer):
        async def MissingChunks(self, request: Any, context: Any) -> Any:
            return service_pb2.ChunkIds(chunk_ids=list(request.chunk_ids))

        async def PutChunks(self, request_iterator: Any, context: Any) -> Any:
            count = 0
            async for _chunk in request_iterator:
                count += 1
            return service_pb2.PutChunksResponse(stored=count)

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
        service_pb2_grpc.add_AggregationServicer_to_server(  # type: ignore[no-untyped-call]
            Sink(), server)
        creds = grpc.ssl_server_credentials([(files.server_key, files.server_cert)],
                                            root_certificates=files.ca_cert,
                                            require_client_auth=True)
        port_box.append(server.add_secure_port("127.0.0.1:0", creds))
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.stop(grace=1)

    asyncio.run(main())


def _inproc(protocol: str, clients: int, params: int) -> float:
    rng = np.random.default_rng(0)  # test data only
    inputs = {s: (rng.normal(0, 0.01, params), 0.5) for s in range(1, clients + 1)}
    if protocol == "masking":
        from secagg.masking import RoundConfig, make_roster, simulate_round

        roster, identities = make_roster(clients)
        masking = RoundConfig("inproc", roster, params)
        began = time.perf_counter()
        report = simulate_round(masking, identities, inputs)
        elapsed = time.perf_counter() - began
        assert report.result is not None
        return elapsed
    from secagg.ckks import CkksClient, CkksRoundConfig, CkksServer, KeyHolder, release_average
    from secagg.masking import make_roster

    roster, identities = make_roster(clients)
    began = time.perf_counter()
    holder = KeyHolder.generate()
    announcement = holder.announce(holder=1, identity=identities[1], epoch="inproc")
    config = CkksRoundConfig("inproc", roster, announcement, (1,), params)
    public = holder.public_context()
    server = CkksServer(config, public)
    uploads = []
    for s in range(1, clients + 1):
        upload = CkksClient(config, s, identities[s], holder if s == 1 else public, inputs[s],
                            seeded=False).start()
        server.handle(upload)
        uploads.append(upload)
    release_average(holder, config, server.close_stage()[1], uploads, site_id=1)
    return time.perf_counter() - began


def run(protocol: str, clients: int, params: int, quiet: bool) -> dict[str, Any]:
    from aggregator.service import load_server_files
    from secagg.federation.config import Deadlines
    from secagg.federation.kit import SiteKit, init_federation

    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp_name:
        if os.environ.get("SECAGG_BENCH_KEEP"):
            tmp_name = tempfile.mkdtemp(prefix="secagg-bench-kept-")
        tmp = Path(tmp_name)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        np.savez(tmp / "model.npz", w=np.zeros(params, dtype=np.float32))
        fed = tmp / "fed"
        init_federation(fed, clients, protocol=protocol, aggregator=f"localhost:{port}",
                        initial_model=tmp / "model.npz", rounds=1, max_samples=100.0,
                        deadlines=Deadlines(open=600.0, stage=120.0, release=600.0))
        _say(quiet, f"bench service: {protocol}, {clients} site processes, {params:,} values")
        log = open(tmp / "aggregator.log", "wb")  # noqa: SIM115
        agg = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "secagg.cli", "aggregator", "serve", "--config",
             str(fed / "aggregator" / "federation.toml"), "--store", str(tmp / "agg.db"),
             "--metrics", "127.0.0.1:0",
             "--log-level", os.environ.get("SECAGG_BENCH_LOG", "warning")],
            stdout=log, stderr=log, env=_env())
        sites: list[subprocess.Popen[bytes]] = []
        try:
            kits = [SiteKit.load(fed / "sites" / f"site-{s}") for s in range(1, clients + 1)]
            _wait_port(port, agg)
            ingest = _upload_rate(kits, port, SINK_BYTES_PER_SITE)
            files = load_server_files(fed / "aggregator" / "federation.toml")
            ready, stop = threading.Event(), threading.Event()
            box: list[int] = []
            sink = threading.Thread(target=_sink_server, args=(files, ready, box, stop),
                                    daemon=True)
            sink.start()
            ready.wait(30)
            sink_mbps = _upload_rate(kits, box[0], SINK_BYTES_PER_SITE)
            stop.set()
            _say(quiet, f"  upload rate: aggregator {ingest:.0f} MB/s, gRPC sink "
                        f"{sink_mbps:.0f} MB/s")
            go = tmp / "go"
            for s in range(1, clients + 1):
                sites.append(subprocess.Popen(  # noqa: S603
                    [sys.executable, "-m", "secagg.bench.service_site",
                     str(fed / "sites" / f"site-{s}"), str(go), str(tmp / f"site-{s}.txt")],
                    env=_env(), stderr=open(tmp / f"site-{s}.err", "wb")))  # noqa: SIM115
            _wait_files([tmp / f"site-{s}.ready" for s in range(1, clients + 1)], sites)
            _say(quiet, "  all sites ready; round starts")
            agg_cpu = _cpu_s(agg.pid)
            began = time.time()
            go.touch()
            for p in sites:
                if p.wait(timeout=3600) != 0:
                    raise RuntimeError("a bench site failed: " + (
                        tmp / f"site-{sites.index(p) + 1}.err").read_text()[-2000:])
            peak = _peak_rss_mb(agg.pid)
            agg_cpu = _cpu_s(agg.pid) - agg_cpu
            reports = [(tmp / f"site-{s}.txt").read_text().split()
                       for s in range(1, clients + 1)]
            sent = [int(r[0]) for r in reports]
            round_s = max(float(r[1]) for r in reports) - began
            sites_cpu = sum(float(r[2]) for r in reports)
            moved = sum(int(r[0]) + int(r[3]) for r in reports)
        finally:
            for p in sites:
                if p.poll() is None:
                    p.kill()
            agg.terminate()
            agg.wait(timeout=30)
            log.close()
        _say(quiet, f"  round {round_s:.2f} s; in-process run follows")
        inproc = _inproc(protocol, clients, params)
        floor = moved / (sink_mbps * 1e6)
        return {
            "protocol": protocol, "clients": clients, "params": params,
            "round_s": round_s, "inproc_round_s": inproc, "overhead_ratio": round_s / inproc,
            "sites_cpu_s": sites_cpu, "aggregator_cpu_s": agg_cpu,
            "transport_floor_s": floor, "transport_floor_ratio": floor / inproc,
            "bytes_per_site": statistics.median(sent),
            "bytes_per_value": statistics.median(sent) / params,
            "aggregator_peak_rss_mb": peak,
            "grpc_sink_mbps": sink_mbps, "ingest_mbps": ingest,
            "ingest_ratio": ingest / sink_mbps,
        }


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("the aggregator exited")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(1.0)  # listening; give it a moment to finish recovering
                return
        time.sleep(0.1)
    raise RuntimeError("the aggregator did not start")


def _wait_files(paths: list[Path], procs: list[subprocess.Popen[bytes]],
                timeout: float = 1800) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(p.exists() for p in paths):
            return
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a bench site failed to start")
        time.sleep(0.1)
    raise RuntimeError("the sites did not get ready")


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
