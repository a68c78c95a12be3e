"""Prometheus metrics for operators, served on their own port (``--metrics HOST:PORT``).

What they count is what happened to rounds, stages, sites and bytes; labels are bounded
(protocol, stage number, abort reason, status code, SQL operation), never a site id, a round id, a
payload or anything derived from one. Each aggregator has its own registry (tests run several).

- ``secagg_rounds_started_total{protocol}``, ``secagg_rounds_completed_total{protocol}``,
  ``secagg_rounds_aborted_total{protocol,reason}``
- ``secagg_round_sites{stage}``: sites whose message for that stage was counted in the current
  round (reset when a round opens); ``secagg_current_round``, ``secagg_current_stage``
- ``secagg_dropouts_total{protocol,stage}``: sites expected at a stage but missing when it
  closed (its deadline passed)
- ``secagg_refused_total{code}``: requests refused (uploads, messages, identities), by gRPC
  status code
- ``secagg_tls_refused_total{reason}``: TLS handshakes refused (no certificate, another CA,
  expired), by TLS reason (a fixed set, else "other")
- ``secagg_bytes_received_total``, ``secagg_bytes_sent_total``: chunk payload bytes
- ``secagg_calls_paced_total``: calls held back because their site outran its work budget
  (a site flooding the aggregator; honest sites stay far below it)
- ``secagg_stage_duration_seconds{protocol,stage}``: from a stage's start to its close
- ``secagg_store_latency_seconds{operation}``: each SQL statement (select, insert, update,
  delete, other), on the store's connections
- ``secagg_serving``: 1 while gRPC health says SERVING, 0 otherwise
- ``secagg_certificate_expiry_timestamp_seconds{certificate}``: when the aggregator's TLS
  certificate (``server``) and its federation's CA certificate (``ca``) end (alert on it)
- ``secagg_round_waiting``: 1 while the running round waits for as many sites as it needs
  to be asking for it (it is told to none, and its deadlines do not run, until they are)
- ``secagg_job_done``: 1 once the job's last round has ended (``secagg_rounds_completed_total``
  says how many of them completed)

Beside ``/metrics`` the port answers ``/readyz`` (200 while SERVING, 503 otherwise) and
``/livez`` (200 while the aggregator's event loop beats, 503 once it has not for
HEARTBEAT_STALE_SECONDS, as both then do): probes for an orchestrator, which has no site's
client certificate to call gRPC's health service with.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rounds_started = Counter("secagg_rounds_started", "Rounds opened",
                                      ["protocol"], registry=r)
        self.rounds_completed = Counter("secagg_rounds_completed", "Rounds completed",
                                        ["protocol"], registry=r)
        self.rounds_aborted = Counter("secagg_rounds_aborted", "Rounds aborted",
                                      ["protocol", "reason"], registry=r)
        self.round_sites = Gauge("secagg_round_sites",
                                 "Sites whose message for a stage was counted this round",
                                 ["stage"], registry=r)
        self.current_round = Gauge("secagg_current_round", "The running round (0: none)",
                                   registry=r)
        self.current_stage = Gauge("secagg_current_stage", "The running round's stage",
                                   registry=r)
        self.dropouts = Counter("secagg_dropouts", "Sites missing when a stage closed",
                                ["protocol", "stage"], registry=r)
        self.refused = Counter("secagg_refused", "Requests refused, by gRPC status code",
                               ["code"], registry=r)
        self.tls_refused = Counter("secagg_tls_refused",
                                   "TLS handshakes refused (no, expired or foreign certificate)",
                                   ["reason"], registry=r)
        self.bytes_received = Counter("secagg_bytes_received", "Chunk bytes received",
                                      registry=r)
        self.bytes_sent = Counter("secagg_bytes_sent", "Chunk bytes sent", registry=r)
        self.uploads_waiting = Gauge("secagg_uploads_waiting",
                                     "Sites waiting for an upload slot", registry=r)
        self.calls_paced = Counter(
            "secagg_calls_paced", "Calls held back because their site outran its work budget",
            registry=r)
        self.uploads_unadmitted = Counter(
            "secagg_uploads_unadmitted",
            "Sites told to send without an upload slot (none came free within their deadline)",
            registry=r)
        self.stage_duration = Histogram("secagg_stage_duration_seconds",
                                        "From a stage's start to its close",
                                        ["protocol", "stage"], buckets=STAGE_BUCKETS,
                                        registry=r)
        self.store_latency = Histogram("secagg_store_latency_seconds",
                                       "SQL statement latency on the store",
                                       ["operation"], buckets=STORE_BUCKETS, registry=r)
        self.serving = Gauge("secagg_serving",
                             "1 while the aggregator serves rounds (gRPC health SERVING)",
                             registry=r)
        self.round_waiting_gauge = Gauge(
            "secagg_round_waiting",
            "1 while the running round waits for as many sites as it needs", registry=r)
        self.job_done_gauge = Gauge("secagg_job_done", "1 once the job's last round has ended",
                                    registry=r)
        self.certificate_expiry = Gauge(
            "secagg_certificate_expiry_timestamp_seconds",
            "When the aggregator's TLS certificate (server) and its CA's (ca) end, Unix time",
            ["certificate"], registry=r)
        self.is_serving = False
        self.beat = 0.0  # time.monotonic() of the event loop's last heartbeat (0: none yet)
        self._stages_seen: set[str] = set()

    # ---- rounds and stages (called on the job's thread) ----------

    def round_opened(self, protocol: str, number: int, stage: int) -> None:
        self.rounds_started.labels(protocol).inc()
        for stage_label in self._stages_seen:
            self.round_sites.labels(stage_label).set(0)
        self.current_round.set(number)
        self.current_stage.set(stage)

    def round_recovered(self, number: int, stage: int, answered: int) -> None:
        """After a restart: the replayed round's place (counters restart at zero)."""
        self.current_round.set(number)
        self.current_stage.set(stage)
        self._stages_seen.add(str(stage))
        self.round_sites.labels(str(stage)).set(answered)

    def message_counted(self, stage: int) -> None:
        self._stages_seen.add(str(stage))
        self.round_sites.labels(str(stage)).inc()

    def stage_closed(self, protocol: str, stage: int, missing: int, seconds: float,
                     next_stage: int) -> None:
        if missing:
            self.dropouts.labels(protocol, str(stage)).inc(missing)
        self.stage_duration.labels(protocol, str(stage)).observe(seconds)
        self.current_stage.set(next_stage)

    def round_finished(self, protocol: str, aborted_reason: str | None) -> None:
        if aborted_reason is None:
            self.rounds_completed.labels(protocol).inc()
        else:
            self.rounds_aborted.labels(protocol, aborted_reason).inc()
        self.current_stage.set(0)

    def round_waiting(self, waiting: bool) -> None:
        self.round_waiting_gauge.set(1 if waiting else 0)

    def job_done(self) -> None:
        self.current_round.set(0)
        self.round_waiting_gauge.set(0)
        self.job_done_gauge.set(1)

    # ---- the store ----------

    def watch_engine(self, engine: Any) -> None:
        """Time every SQL statement on ``engine``'s connections."""
        import sqlalchemy as sa

        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            conn.info.setdefault("secagg_started", []).append(time.perf_counter())

        def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            started = conn.info.get("secagg_started")
            if started:
                verb = statement.lstrip().split(" ", 1)[0].lower()
                operation = verb if verb in ("select", "insert", "update", "delete") else "other"
                self.store_latency.labels(operation).observe(time.perf_counter() - started.pop())

        sa.event.listen(engine, "before_cursor_execute", before)
        sa.event.listen(engine, "after_cursor_execute", after)


class NoMetrics(Metrics):
    """For a Job used without a service (tests, tools): counts into a registry nobody reads."""


# defence: metrics.connection-limits-by-default
METRICS_CONNECTIONS = 64  # connections served at once; more are closed at once
METRICS_CONNECTIONS_PER_HOST = 4  # from one address (a scraper needs one)
METRICS_IDLE_SECONDS = 10.0  # a connection that sends nothing for this long is closed
HEARTBEAT_STALE_SECONDS = 30.0  # /livez and /readyz fail once the loop has not beaten for this


def _unspecified(bound: str) -> bool:
    """Whether an address bound is every interface's (0.0.0.0, ::, or :: as ::ffff:0.0.0.0),
    however it was written (0:PORT and [::0]:PORT bind the same)."""
    import ipaddress

    try:
        address = ipaddress.ip_address(bound.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    # defence: metrics.mapped-unspecified-warned
    return address.is_unspecified or bool(mapped is not None and mapped.is_unspecified)


def serve_metrics(metrics: Metrics, listen: str) -> tuple[Any, int]:
    """Serve ``/metrics`` on ``listen`` (HOST:PORT; port 0 picks one): (server, port).

    prometheus_client's own server gives every connection a thread for as long as it stays
    open: 1,000 idle connections were 1,000 threads. This one serves at most
    METRICS_CONNECTIONS at once, METRICS_CONNECTIONS_PER_HOST from one address (so one host
    holding connections open does not shut the scraper out), and closes a connection idle
    for METRICS_IDLE_SECONDS. The port is for a monitoring network, not the internet: many
    hosts together can still fill it."""
    import io
    import socket
    import socketserver
    import sys
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    from prometheus_client import make_wsgi_app

    host, _, port = listen.rpartition(":")
    # defence: metrics.loopback-by-default
    host = host.strip("[]") or "127.0.0.1"
    family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][0]

    class Handler(WSGIRequestHandler):
        timeout = METRICS_IDLE_SECONDS

        def log_message(self, format: str, *args: Any) -> None:
            pass  # (stderr is the JSON log)

        def get_stderr(self) -> Any:
            # wsgiref printed a failed request's traceback here (stderr, the JSON log); the
            # app below answers what it can, this keeps whatever else fails out of the log
            return io.StringIO()

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True
        request_queue_size = 64

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.lock = threading.Lock()
            self.open_total = 0
            self.open_by_host: dict[str, int] = {}

        def _take(self, host: str) -> bool:
            with self.lock:
                # defence: metrics.connections-bounded
                if (self.open_total >= METRICS_CONNECTIONS
                        or self.open_by_host.get(host, 0) >= METRICS_CONNECTIONS_PER_HOST):
                    return False
                self.open_total += 1
                self.open_by_host[host] = self.open_by_host.get(host, 0) + 1
                return True

        def _give(self, host: str) -> None:
            with self.lock:
                self.open_total -= 1
                self.open_by_host[host] -= 1
                # defence: metrics.closed-hosts-forgotten
                if not self.open_by_host[host]:
                    del self.open_by_host[host]

        def process_request(self, request: Any, client_address: Any) -> None:
            host = str(client_address[0])
            if not self._take(host):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._give(host)
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._give(str(client_address[0]))

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # an idle connection timed out: nothing for the log (it is JSON only)

    app = make_wsgi_app(metrics.registry)

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        # probes that need no client certificate (gRPC's health service needs a site's): a
        # probe of the gRPC port without one fails its TLS handshake, serving or not
        path = environ.get("PATH_INFO", "")
        if path in ("/readyz", "/livez"):
            # (answered on this thread: an event loop that stalled, gRPC health timing out,
            # still had both say 200; they now need its heartbeat)
            # defence: metrics.probes-need-the-loops-heartbeat
            alive = time.monotonic() - metrics.beat < HEARTBEAT_STALE_SECONDS
            # defence: metrics.ready-probe-follows-health
            ready = alive and (path == "/livez" or metrics.is_serving)
            start_response("200 OK" if ready else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [b"ok\n" if ready else b"not serving\n"]
        # a request prometheus_client cannot answer (an Accept header of "text/plain;
        # version=abc" raised TypeError in it) is a 400, not a 500 with a traceback
        # defence: metrics.bad-request-answered
        try:
            return app(environ, start_response)
        except Exception:
            start_response("400 Bad Request", [("Content-Type", "text/plain")], sys.exc_info())
            return [b"bad request\n"]

    server = Server((host, int(port)), Handler)
    server.set_app(guarded)
    threading.Thread(target=server.serve_forever, name="secagg-metrics", daemon=True).start()
    bound = int(server.server_address[1])
    # /metrics is plain HTTP with no client certificate: on every interface, anyone who can
    # reach the host reads the job's progress and which sites are active (it was silent)
    # defence: metrics.every-interface-warned
    if _unspecified(str(server.server_address[0])):
        import logging

        logging.getLogger("secagg.aggregator").warning(
            f"metrics are served over plain HTTP on every interface ({listen}): bind them to "
            f"a private address (e.g. 127.0.0.1:{bound}) or keep the port behind a firewall",
            extra={"event": "metrics_on_every_interface"})
    return server, bound
