"""A training job: rounds one after another, each a sans-I/O role fed from the wire and the store.

No protocol decision lives here: the roles (:class:`~secagg.masking.MaskingServer`,
:class:`~secagg.ckks.CkksServer`) decide; this module decodes what sites send, persists it,
hands it to the role, closes stages at their deadlines, and applies each released average to
the global model (FedAvg with a server learning rate).

Durability: a site message is acknowledged only after its event is committed in the same
transaction in which the role accepted it; a stage close is an event too. On start the job
replays the running round's events into a fresh role (:meth:`Job.recover`), which rebuilds the
same state, running sums included: the round completes with the result an uninterrupted run
would have given, and a resubmitted message is recognised (same event) and never counted twice.

Everything here runs on one thread (the service's core executor): no locks.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from aggregator.metrics import Metrics, NoMetrics
from aggregator.store import BlobRef, Event, Store, StoreError, split_chunks
from secagg import wire
from secagg._norm import l2_norm
from secagg.ckks import CkksServer, CkksStage, PublicContext, _seal
from secagg.ckks.keys import public_context_length
from secagg.ckks.presets import MAX_NOISE_SHARE, get_preset
from secagg.ckks.release import check_released_norm, least_l2_weight_sum, release_noise_share
from secagg.errors import (
    AbortReason,
    ConfigurationError,
    InvalidMessage,
    PreconditionError,
    ProtocolAbort,
    RefusalReason,
    RefusedMessage,
)
from secagg.federation.config import SDK_CHUNK_BYTES, FederationConfig
from secagg.masking import MaskingServer, Stage
from secagg.masking.messages import (
    KeyDirectory,
    ServerMessage,
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
)
from secagg.masking.precision import PRECISION_MARGIN, error_share
from secagg.model import FlatModel
from secagg.roster import Roster
from secagg.v1 import service_pb2

DROPOUTS_NAMED = 32  # sites a stage's close names as dropped out, one line each; then a count
PRESENCE_SECONDS = 60.0  # a site counts toward a waiting round this long after it last asked
MODEL_PROTOS_KEPT = 4  # wire forms of models kept for GetRound answers (Job._model_proto)
SERVED_CHUNK_BYTES = 1 << 20  # what the aggregator writes for sites to download (Job)

log = logging.getLogger("secagg.aggregator")

# status codes, named as gRPC names them (the service maps them; the core imports no gRPC)
INVALID_ARGUMENT = "INVALID_ARGUMENT"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
PERMISSION_DENIED = "PERMISSION_DENIED"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
ABORTED = "ABORTED"
UNAVAILABLE = "UNAVAILABLE"
NOT_FOUND = "NOT_FOUND"
T = TypeVar("T")

# What one stored chunk costs beyond its bytes, charged to its site's upload budget: a chunk's
# row can dirty one 64 KiB SQLite page (and its index's) in the write-ahead log, whatever its
# size. Charging bytes alone let a site store 3-byte chunks by the million (the WAL grew by
# ~6.4 KB a chunk: 2.8 GB in two rounds); charged a page each, a site's budget holds at most
# budget / 64 KiB chunks, and an honest upload (1 MiB chunks) pays 6 % more.
CHUNK_STORAGE_COST = 64 << 10


def _fresh_only(method: Callable[..., T]) -> Callable[..., T]:
    """A Job method that refuses (UNAVAILABLE) once the job is stale, and marks it stale when
    a store call fails inside it."""

    @functools.wraps(method)
    def guarded(self: Job, *args: Any, **kwargs: Any) -> T:
        # defence: service.stale-job-refuses
        if self.stale:
            raise ServiceError(UNAVAILABLE, "the job is reloading from the store")
        try:
            return method(self, *args, **kwargs)
        except (StoreError, SQLAlchemyError):
            self.stale = True
            raise

    return guarded


class ServiceError(Exception):
    """A refusal with its status code. The message names the reason, never a payload."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


MASKING_KIND_STAGE = {
    "advertise_keys": Stage.ADVERTISE_KEYS,
    "share_keys": Stage.SHARE_KEYS,
    "masked_input": Stage.MASKED_INPUT,
    "consistency_signature": Stage.CONSISTENCY_CHECK,
    "unmask_response": Stage.UNMASK,
}
CKKS_KIND_STAGE = {
    "ckks_key": CkksStage.KEY_ANNOUNCEMENT,
    "ckks_update": CkksStage.UPLOAD,
    "ckks_release": CkksStage.RELEASE,
    "ckks_refusal": CkksStage.RELEASE,  # the key holder's answer instead of a release
}


def _kind_stages(protocol: str) -> dict[str, Any]:
    """The stage each kind of site message belongs to, for a round of ``protocol``."""
    return MASKING_KIND_STAGE if protocol == "masking" else CKKS_KIND_STAGE


PURGE_DELAY = 3.0  # seconds after a round ends before its uploads are dropped
# refused messages a site may send to one stage of a round (Job.submit): each can make the
# job read and check the round's whole payload (a valid chunk list under a wrong signature)
REFUSED_MESSAGES_PER_STAGE = 3


@dataclass
class RoundView:
    """What GetRound tells a site about a round (rebuilt from the store after a restart)."""

    number: int
    round_id: str
    protocol: str
    status: int
    model: FlatModel
    model_blob: BlobRef
    stage: int = 0
    abort_reason: str = ""
    result: FlatModel | None = None
    result_blob: BlobRef | None = None
    survivors: tuple[int, ...] = ()
    ckks_key_holder: int = 0
    ckks_key: service_pb2.CkksKeyOffer | None = None
    result_signature: bytes = b""  # CKKS: the key holder's signature of the result
    sites_signature: bytes = b""  # CKKS: the key holder's signature of the survivors


@dataclass
class _Active:
    """The running round: its role and what the wire needs besides."""

    view: RoundView
    role: Any
    deadline: float
    expected: set[int]
    answered: set[int] = field(default_factory=set)
    outgoing: dict[int, dict[int, Any]] = field(default_factory=dict)  # stage -> site -> msg
    uploaded: dict[int, int] = field(default_factory=dict)  # site -> bytes stored this round
    readable: dict[int, set[bytes]] = field(default_factory=dict)  # site (0: all) -> chunk ids
    ckks_config: Any = None
    ckks_context: Any = None  # the round's public context (the sizes of its ciphertexts)
    ckks_uploads: dict[int, service_pb2.EncryptedUpdateRef] = field(default_factory=dict)
    ckks_aggregate: service_pb2.EncryptedAggregateRef | None = None
    ckks_release: tuple[np.ndarray, tuple[int, ...], wire.Blob, float, bytes,
                        bytes] | None = None
    ckks_refused: bool = False  # the key holder refused the sum as out of range (signed)
    stage_started: float = 0.0  # the job's clock when the current stage began
    # until as many sites as the round needs are asking for it (Job._seen), its deadlines do
    # not run: a round no one can finish yet waits for its sites
    waiting: bool = True
    # the round was opened waiting (its "waits" event: a store from before rounds waited has
    # none, and a message replayed there puts the round under way)
    opened_waiting: bool = False
    asked: dict[int, float] = field(default_factory=dict)  # site -> when it last asked
    enough_since: float | None = None  # since when as many sites as it needs are asking
    held_for_holder: bool = False  # (CKKS) they are, and it waits for its key holder
    swept: float = -math.inf  # when ``asked`` was last cleared of sites gone quiet
    claims: list[bytes] = field(default_factory=list)  # chunks the message being applied read
    refused: dict[tuple[int, int], int] = field(default_factory=dict)  # (stage, site) -> count


_GENERATIONS = itertools.count(1)


class Job:
    def __init__(self, config: FederationConfig, roster: Roster, store: Store,
                 initial_model: FlatModel, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[], None] | None = None,
                 metrics: Metrics | None = None) -> None:
        # defence: service.key-holders-on-roster
        if config.protocol == "ckks" and not set(config.key_holders) <= set(roster):
            raise ConfigurationError(f"[ckks] key_holders {list(config.key_holders)} must be "
                                     "sites of the roster")
        # the sites a round needs to end otherwise than aborted (masking: its least
        # participants; CKKS: min_sites); a round waits for that many (_seen). (Taken from
        # the start check, not checked again: a second check hid the first from its control)
        self._least_sites = check_job(config, roster, initial_model)
        self.config = config
        self._settings_digest = config.settings_digest()
        self.roster = roster
        self.store = store
        self._clock = clock
        self._on_change = on_change or (lambda: None)
        self.metrics = metrics or NoMetrics()
        self._initial = initial_model
        self.rounds: dict[int, RoundView] = {}
        self.active: _Active | None = None
        self.done = False
        self.model = initial_model
        # uploads of finished rounds are dropped by a tick a little later, not as the round
        # ends: freeing 40 MB holds the job's thread a fifth of a second or more, just when
        # every site asks for the result
        # (rounds before which to drop the uploads, when): each round's purge keeps its own
        # time; one pending purge pushed back at every round's end kept every upload of a
        # burst of fast rounds until 3 s passed with none ending (a helper: 90 MiB over six)
        self._purges: collections.deque[tuple[int, float]] = collections.deque()
        # the wire form of the models GetRound answers with, built once each (_model_proto)
        self._model_protos: dict[tuple[bytes, BlobRef], service_pb2.Model] = {}
        self._hot: tuple[dict[bytes, bytes], dict[bytes, bytes]] = ({}, {})
        self._public: set[bytes] = set()  # chunk ids of every round's model and result
        # set when a store call failed mid-change: what this job holds in memory may be ahead
        # of what was committed (a message applied whose event never committed), so it serves
        # nothing more; the service reloads a fresh job from the store
        self.stale = False
        # (round, {site: what the store holds of its uploads, charged as the budget charges
        # it}) as recovered: the upload budget starts from it, not from nothing (a restart
        # gave every site a new budget) nor from what was charged before (chunks the store
        # lost are sent again)
        self.stored_uploads: tuple[int | None, dict[int, int]] = (None, {})
        self.generation = next(_GENERATIONS)  # jobs made later (reloads) have larger ones

    # ---- start, recovery ----------

    def _check_binding(self, bound: tuple[bytes, str], name: str) -> None:
        # defence: service.store-of-this-federation
        if bound[0] != self.config.trust_root:
            raise ConfigurationError(
                "the store belongs to another federation (it was bound to another trust "
                "root than this configuration's [federation] trust_root): start this job on "
                "a new store, or run that federation's aggregator on it")
        if bound[1] != name:
            raise ConfigurationError(
                f"the store belongs to another job ({bound[1]!r}); this configuration's "
                f"rounds are named {self.config.round_id_for(1)!r} and on: start a new job "
                "on a new store, or restore the [federation] name and [job] id")

    def _bind(self, bound: tuple[bytes, str] | None, name: str) -> None:
        if bound is None:  # (another aggregator that bound it first is checked against)
            self._check_binding(self.store.bind_job(self.config.trust_root, name), name)

    def recover(self) -> None:
        """Load the job from the store; replay the running round, or open the next one."""
        # a store is bound to one federation (its trust root) and one job at first start:
        # another federation's store, its job started from the same model under the same
        # default name and job id, was served to this one's sites as its own
        name = self.config.round_id_for(0).rsplit("/", 1)[0]
        bound = self.store.job_binding()
        if bound is not None:
            self._check_binding(bound, name)
        rows = self.store.rounds()
        if not rows:
            self._bind(bound, name)
            try:
                self._save_model(self._initial)
                self._open(1, self._initial)
            except IntegrityError:  # (what the other's inserts left: said, not a bare error)
                raise ConfigurationError(
                    "another aggregator started this job on the same store at the same "
                    "moment: run one aggregator per store") from None
            return
        # defence: service.store-of-this-job
        first = rows[0]
        if first.round == 1 and first.model_digest != self._initial.digest:
            raise ConfigurationError(
                "the store holds a job that started from another model than this "
                "configuration's [job] initial_model (another federation's or job's store, or "
                "the model file changed under a running job): start a new job on a new store, "
                "or restore the model file")
        last_id = rows[-1].round_id
        if last_id != self.config.round_id_for(rows[-1].round):
            # (sites accept only this config's round ids: a store of another job, or a config
            # whose [job] id or name changed under a running job, would run rounds no site joins)
            raise ConfigurationError(
                f"the store holds rounds of another job ({last_id!r}); this configuration's "
                f"rounds are named {self.config.round_id_for(rows[-1].round)!r}: start a new "
                "job on a new store, or restore the [federation] name and [job] id")
        # (a store of the first schema, with rounds, is bound only once they passed: a start
        # refused by them bound it, and the store's own job was then refused for good)
        # defence: service.store-bound-only-after-the-checks
        self._bind(bound, name)
        for row in rows:
            model = self._load_model(row.model_digest)
            view = RoundView(row.round, row.round_id, row.protocol, _STATUS[row.status], model,
                             self._model_blob(row.model_digest))
            self._public.update(view.model_blob.chunk_ids)
            if row.status == "completed":
                view.result = self._load_model(row.result_digest)
                view.result_blob = self._model_blob(row.result_digest)
                self._public.update(view.result_blob.chunk_ids)
                view.survivors = tuple(json.loads(row.survivors or "[]"))
                if row.protocol == "ckks":
                    # defence: service.result-signature-recovered
                    (view.result_signature,
                     view.sites_signature) = self._recorded_signatures(row.round)
            view.abort_reason = row.abort_reason or ""
            self.rounds[row.round] = view
        last = rows[-1]
        view = self.rounds[last.round]
        self._purges = collections.deque(
            [(last.round if last.status == "running" else last.round + 1, 0.0)])
        if last.status == "running":
            self.model = view.model
            self.active = self._start_role(view)
            self._replay(view)
            # defence: job.recovered-budget-charges-chunks
            self.stored_uploads = (last.round, {
                site: nbytes + n * CHUNK_STORAGE_COST
                for site, (nbytes, n) in self.store.round_uploads(last.round).items()})
            log.info("recovered round", extra={"event": "round_recovered",
                                               "round_id": view.round_id})
            if self.active is not None:
                self.metrics.round_recovered(view.number, view.stage,
                                             len(self.active.answered))
                self.metrics.round_waiting(self.active.waiting)
        else:
            self.model = view.result if view.result is not None else view.model
            self._next_or_done(last.round)

    def _recorded_signatures(self, number: int) -> tuple[bytes, bytes]:
        """The key holder's result and sites signatures of a completed CKKS round, from its
        release as recorded (the events outlive their round)."""
        payload = self.store.event_payload(number, "message", CkksStage.RELEASE.value,
                                           self.config.key_holder_for(number))
        request = service_pb2.SubmitRequest()
        if payload is not None:
            request.ParseFromString(payload)
        return (bytes(request.ckks_release.result_signature),
                bytes(request.ckks_release.sites_signature))

    def _replay(self, view: RoundView) -> None:
        active = self.active
        assert active is not None
        for event in self.store.events(view.number):
            # each event is one the live path would have recorded at this point of the
            # round (its kind, the stage the round is at, a site expected there that has not
            # answered, a message of that stage for this round); any other means the store
            # was damaged or edited under the job: refused, not replayed as far as it goes
            # defence: service.replay-refuses-unknown-events, service.replay-checks-the-stage
            # defence: service.replay-checks-the-message-kind, service.replay-checks-the-round-id
            # defence: service.replay-checks-each-close
            # (a site the stage does not expect is refused by the protocol roles as well)
            if event.kind == "message" and event.stage == view.stage:
                request = service_pb2.SubmitRequest()
                request.ParseFromString(event.payload)
                stage = _kind_stages(view.protocol).get(request.WhichOneof("message"))
                if (request.round_id != view.round_id
                        or stage is None or int(stage.value) != view.stage
                        or event.site not in active.expected or event.site in active.answered):
                    raise ServiceError(UNAVAILABLE, "the store's events do not replay: a "
                                                    f"message of round {view.number} does "
                                                    "not fit where it was recorded")
                self._apply(active, event.site, request, replay=True)
            elif event.kind == "close" and event.stage == view.stage and event.site == 0:
                self._close(active, replay=True)
            # defence: job.under-way-replayed
            elif (event.kind == "under_way" and event.stage == view.stage and event.site == 0
                  and active.waiting):
                self._under_way(active, record=False, tell=False)
            # (a store of the thirty-sixth session's build: no "waits" event, so its first
            # message replayed put the round under way, and the under_way recorded after it
            # no longer fitted: the round did not recover; a reviewer)
            # defence: job.older-stores-under-way-replays
            elif (event.kind == "under_way" and event.stage == view.stage and event.site == 0
                  and not active.opened_waiting):
                pass
            # defence: job.opened-waiting-replayed
            elif (event.kind == "waits" and event.stage == view.stage and event.site == 0
                  and event.stage == _opening_stage(view.protocol) and not event.payload
                  and active.waiting and not active.answered and not active.opened_waiting):
                active.opened_waiting = True
            else:
                raise ServiceError(UNAVAILABLE, "the store's events do not replay: an event "
                                                f"of round {view.number} ({event.kind!r}, "
                                                f"stage {event.stage}) does not fit the round")
            if self.active is not active:
                return  # the round finished during replay (its end was not recorded yet)
        # the last message a stage waited for was counted, and the aggregator stopped before
        # it recorded the close: close it now, as counting it would have (the stage would
        # otherwise wait out its deadline, and a CKKS round stayed at its key stage while
        # every site, holding the key, was refused its upload)
        # defence: service.replay-closes-an-answered-stage
        if active.answered and active.answered >= active.expected:
            self._close(active)

    # ---- rounds ----------

    def _open(self, number: int, model: FlatModel) -> None:
        round_id = self.config.round_id_for(number)
        # (recorded with the round: a restart while it waits keeps it waiting)
        # defence: job.opened-waiting-recorded
        self.store.open_round(number, round_id, self.config.protocol, model.digest,
                              first=Event(number, "waits", _opening_stage(self.config.protocol),
                                          0, b""))
        view = RoundView(number, round_id, self.config.protocol, service_pb2.ROUND_STATUS_RUNNING,
                         model, self._model_blob(model.digest))
        self._public.update(view.model_blob.chunk_ids)
        self.rounds[number] = view
        self.model = model
        self.active = self._start_role(view)
        log.info("round opened", extra={"event": "round_opened", "round_id": round_id,
                                        "count": self._least_sites})
        self.metrics.round_opened(view.protocol, number, view.stage)
        self.metrics.round_waiting(True)
        self._on_change()

    def _start_role(self, view: RoundView) -> _Active:
        now = self._clock()
        readable = {0: set(view.model_blob.chunk_ids)}
        if view.protocol == "masking":
            config = self.config.masking_round(view.round_id, self.roster, view.model.size,
                                               model_digest=view.model.digest)
            role = MaskingServer(config)
            view.stage = Stage.ADVERTISE_KEYS.value
            return _Active(view, role, now + self.config.deadlines.open,
                           set(role.participants), readable=readable, stage_started=now)
        view.stage = CkksStage.KEY_ANNOUNCEMENT.value
        view.ckks_key_holder = self.config.key_holder_for(view.number)
        # the key holder announces as soon as it joins the round: as long as sites may take
        # to join (open), not one later stage
        return _Active(view, None, now + self.config.deadlines.open, {view.ckks_key_holder},
                       readable=readable, stage_started=now)

    def _seen(self, site: int, active: _Active) -> None:
        """``site`` asks for ``active``, which waits for its sites. A round's deadlines do not
        run until as many sites as it needs are asking for it (for the round, or for one of
        its stages' answers; each within PRESENCE_SECONDS: a site that asked once and went
        away is not counted for good); then it is under way, its open deadline from that
        moment. An aggregator started before its sites came online aborted round after round
        for want of them and ended the job with none trained (an outside tester, as an
        operator). Waiting loses nothing (no round of fewer sites can finish). No site can
        hold a round by it; one can only start a round's clock, as its message always
        could."""
        now = self._clock()
        changed = site not in active.asked
        active.asked[site] = now
        # (swept once a second, and the count and the graph looked at only when the sites
        # asking changed: every waiting site asks each second, and a look over 10,000 sites
        # at each ask was 10^8 steps a second on the job's thread)
        if now - active.swept >= 1.0:
            active.swept = now
            # defence: job.presence-expires
            for gone in [s for s, at in active.asked.items() if now - at > PRESENCE_SECONDS]:
                del active.asked[gone]
                changed = True
        # defence: job.round-waits-for-its-sites
        if len(active.asked) < self._least_sites:
            active.enough_since = None
            return
        if active.enough_since is None:
            active.enough_since = now
        if not changed and not active.held_for_holder:
            return
        active.held_for_holder = self._waits_for_holder(active, now)
        if not active.held_for_holder and self._graph_holds(active):
            self._under_way(active)

    def _waits_for_holder(self, active: _Active, now: float) -> bool:
        """CKKS: whether the round waits for its key holder, not among the sites asking. A
        round under way without it aborted at its open deadline (no key announced), and the
        next, its sites all online, went under way at once: a key holder an hour later than
        the others spent six rounds at the defaults, and ended a job of three untrained. No
        CKKS round ends without its key holder, so waiting for it loses nothing: for good
        with one key holder (every round needs it), and with several for one open deadline
        once the others are online (one gone for good would stop the job at its first
        round, where the other holders' rounds can go on)."""
        holder = active.view.ckks_key_holder
        if not holder or holder in active.asked:
            return False
        # defence: job.ckks-round-waits-for-its-key-holder
        if len(set(self.config.key_holders)) <= 1:
            return True
        # defence: job.ckks-round-waits-for-one-of-its-key-holders-a-while
        return active.enough_since is None or now - active.enough_since < \
            self.config.deadlines.open

    @staticmethod
    def _graph_holds(active: _Active) -> bool:
        """Whether the sites asking make a key directory every one of them takes: SecAgg+
        lets each site's neighbourhood miss at most ``max_missing_per_side`` on a side, and a
        round under way with 4 of 6 sites (its threshold and quorum met) was refused by every
        one of them, TOO_MANY_MISSING_NEIGHBOURS, round after round (an outside tester)."""
        config = getattr(active.role, "config", None)
        limit = getattr(config, "max_missing_per_side", None)
        if config is None or limit is None:
            return True  # (the complete graph; CKKS)
        # defence: job.waits-for-a-graph-its-sites-take
        return bool(config.worst_missing_window(frozenset(active.asked))[1] <= limit)

    def _under_way(self, active: _Active, *, record: bool = True, tell: bool = True) -> None:
        """The round stops waiting: recorded (a restart does not make a round under way wait
        again: its sites, some past it, would not all ask for it again; ``record`` False where
        a message's event records it, or in a replay), and told (``tell``: not in a replay)."""
        # defence: job.under-way-recorded
        if record:
            with self.store.transaction() as conn:
                self.store.record_event(conn, Event(active.view.number, "under_way",
                                                    active.view.stage, 0, b""))
        active.waiting = False
        active.asked = {}
        now = self._clock()
        active.deadline = now + self.config.deadlines.open
        active.stage_started = now  # (the stage's duration is not the wait's)
        self.metrics.round_waiting(False)
        if tell:
            log.info("round under way", extra={
                "event": "round_under_way", "round_id": active.view.round_id,
                "count": self._least_sites})
            self._on_change()

    def _next_or_done(self, finished: int) -> None:
        self.active = None
        if finished >= self.config.rounds:
            self.done = True
            completed = sum(v.status == service_pb2.ROUND_STATUS_COMPLETED
                            for v in self.rounds.values())
            # (a job whose every round aborted trained nothing: said as such)
            # defence: job.untrained-job-done-warned
            log.log(logging.INFO if completed else logging.WARNING,
                    "job done: %d of %d rounds completed", completed, len(self.rounds),
                    extra={"event": "job_done", "count": completed})
            self.metrics.job_done()
            self._on_change()
            return
        self._open(finished + 1, self.model)

    # ---- what sites ask ----------

    @_fresh_only
    def round_info(self, after_round: int, site: int = 0) -> service_pb2.RoundInfo | None:
        """The first round after ``after_round``, or JOB_DONE, or None (not open yet), as
        ``site`` is told of it (0: not a site's question, which a waiting round answers too)."""
        active = self.active
        # a site asking for the running round counts toward the sites it waits for; so does
        # one asking for a round after it (it left the round after a day said waiting, or
        # sent to it already): online, and the round is not held for it for good (it waited
        # on with every site past it; under way, it ends, and the next, which they join, opens)
        # defence: job.asking-sites-are-present
        # defence: job.sites-past-the-round-are-present
        if (site and active is not None and active.waiting
                and after_round + 1 >= active.view.number):
            self._seen(site, active)
        numbers = sorted(n for n in self.rounds if n > after_round)
        if not numbers:
            if self.done:
                return service_pb2.RoundInfo(status=service_pb2.ROUND_STATUS_JOB_DONE,
                                             total_rounds=self.config.rounds)
            return None
        return self._info(self.rounds[numbers[0]])

    @_fresh_only
    def info(self, round_id: str) -> service_pb2.RoundInfo:
        return self._info(self._view(round_id))

    def _view(self, round_id: str) -> RoundView:
        for view in self.rounds.values():
            if view.round_id == round_id:
                return view
        raise ServiceError(NOT_FOUND, "no such round")

    def _info(self, view: RoundView) -> service_pb2.RoundInfo:
        info = service_pb2.RoundInfo(
            round=view.number, round_id=view.round_id,
            protocol=(service_pb2.PROTOCOL_MASKING if view.protocol == "masking"
                      else service_pb2.PROTOCOL_CKKS),
            status=view.status,  # type: ignore[arg-type]
            stage=view.stage, abort_reason=view.abort_reason,
            model=self._model_proto(view.model, view.model_blob),
            total_rounds=self.config.rounds, survivors=list(view.survivors),
            ckks_key_holder=view.ckks_key_holder, result_signature=view.result_signature,
            sites_signature=view.sites_signature,
            # defence: service.settings-digest-published
            settings_digest=self._settings_digest,
            # defence: service.roster-digest-published
            roster_digest=self.roster.digest, roster_version=self.roster.version)
        active = self.active
        waiting = self._waiting(active) if active is not None and active.view is view else None
        if waiting is not None:
            info.waiting.CopyFrom(waiting)
        if view.ckks_key is not None:
            info.ckks_key.CopyFrom(view.ckks_key)
        if view.result is not None and view.result_blob is not None:
            info.result.CopyFrom(self._model_proto(view.result, view.result_blob))
        return info

    def _waiting(self, active: _Active) -> service_pb2.RoundWaiting | None:
        """What a site is told of a round waiting for its sites (None once under way): a site
        that came early gave the round up at its patience (55 minutes at the defaults), a
        RoundAborted its training script ended on, while the round still waited for the
        others; told, it waits for them and says why."""
        # defence: job.under-way-not-waiting
        if not active.waiting:
            return None
        # defence: job.waiting-told
        return service_pb2.RoundWaiting(sites_asking=len(active.asked),
                                        sites_needed=self._least_sites,
                                        waits_for_key_holder=self._waits_for_holder(
                                            active, self._clock()))

    def _model_proto(self, model: FlatModel, ref: BlobRef) -> service_pb2.Model:
        """The wire form of a round's model or result, built once: every site's every poll is
        answered with it, and a spec of 65,536 tensors takes the job's thread 120 ms to build
        (a copy of the built one, 7 ms). The digest binds the spec and the values; the few
        kept are the running round's model and result and the last round's."""
        key = (model.digest, ref)
        # defence: job.model-proto-built-once
        proto = self._model_protos.get(key)
        if proto is None:
            proto = wire.model_to_proto(model, _blob(ref))
            while len(self._model_protos) >= MODEL_PROTOS_KEPT:
                del self._model_protos[next(iter(self._model_protos))]
            self._model_protos[key] = proto
        return proto

    @_fresh_only
    def submit(self, site: int, request: service_pb2.SubmitRequest) -> bool:
        """Count one site message; True if it was a repeat of one already counted."""
        kind = request.WhichOneof("message")
        view = self._view(request.round_id)  # NOT_FOUND if unknown
        if kind in _kind_stages(view.protocol):
            # a message counted just before the aggregator could answer (it was killed, the
            # connection broke) comes again from its site, perhaps after its round ended
            # (it was the last one the round waited for): the same bytes are the same
            # message, acknowledged again, never counted twice, and the site goes on
            repeat = self.store.event_payload(view.number, "message",
                                              self._stage_of(view, kind), site)
            # defence: service.repeat-acknowledged-after-the-round
            if repeat is not None and repeat == _stored_form(request):
                return True
        active = self._active_for(request.round_id)
        stage = self._stage_of(active.view, kind)
        claimed = _claimed_site(request, kind)
        # (site 0 is no site: a message naming none is malformed, not another site's)
        # defence: service.message-names-a-site
        if claimed == 0:
            raise ServiceError(INVALID_ARGUMENT, "the message names no site (site_id is unset)")
        # (and again where each kind is parsed: the site a message is of is its certificate's)
        # defence: service.messages-of-the-calling-site
        if claimed is not None and claimed != site:
            log.warning("refused: message names another site", extra={
                "event": "identity_refused", "site_id": site, "round_id": active.view.round_id})
            raise ServiceError(PERMISSION_DENIED,
                               f"site {site} may not send a message of site {claimed}")
        # (the same message again was acknowledged above: this one differs)
        # defence: service.one-message-per-stage
        if self.store.event_payload(active.view.number, "message", stage, site) is not None:
            raise ServiceError(FAILED_PRECONDITION, "this site already answered this stage")
        # defence: service.message-of-the-current-stage
        if stage != active.view.stage:
            raise ServiceError(FAILED_PRECONDITION,
                               f"the round is at stage {active.view.stage}, not {stage}")
        # defence: service.stage-participants-only
        if site not in active.expected:
            raise ServiceError(FAILED_PRECONDITION,
                               f"site {site} is not a participant of this stage")
        # A refused message costs the job what it read to refuse it: one that names the
        # round's whole payload (its chunks uploaded once) under a wrong signature made the
        # job read and check 16 MiB each time, ~50 times a second from one site, while every
        # honest call waited. Past a few refusals in a stage a site's messages to it are
        # refused before any work (an honest site sends one; a lost chunk's retry is
        # FAILED_PRECONDITION, found before a byte is read, and not counted).
        # defence: service.refused-messages-bounded
        if active.refused.get((stage, site), 0) >= REFUSED_MESSAGES_PER_STAGE:
            raise ServiceError(RESOURCE_EXHAUSTED, f"this site's messages to stage {stage} were "
                                                   f"refused {REFUSED_MESSAGES_PER_STAGE} times: "
                                                   "it may send no more to it")
        # (the message is serialised only now: a site sending 8 MiB messages to a finished
        # round, or out of turn, made the job's thread serialise each before refusing it)
        payload = _stored_form(request)
        try:
            with self.store.transaction() as conn:
                self.store.record_event(conn, Event(active.view.number, "message", stage,
                                                    site, payload))
                active.claims = []
                self._apply(active, site, request, replay=False)  # raises: nothing recorded
                # what the message refers to is this round's until the round is purged
                self.store.claim_chunks(conn, active.claims, active.view.number)
        except ServiceError as e:
            if e.code != FAILED_PRECONDITION:
                active.refused[stage, site] = active.refused.get((stage, site), 0) + 1
            raise
        log.info("message counted", extra={"event": "message_counted", "site_id": site,
                                           "round_id": active.view.round_id, "stage": stage})
        self.metrics.message_counted(stage)
        if active.answered >= active.expected:
            self._close(active)
        return False

    def _active_for(self, round_id: str) -> _Active:
        active = self.active
        # defence: job.submit-to-the-running-round-only
        if active is None or active.view.round_id != round_id:
            view = self._view(round_id)  # NOT_FOUND if unknown
            # defence: service.submit-to-an-aborted-round-is-aborted
            if view.status == service_pb2.ROUND_STATUS_ABORTED:
                raise ServiceError(ABORTED, f"the round aborted: {view.abort_reason}")
            raise ServiceError(FAILED_PRECONDITION, "the round is not running")
        return active

    def _stage_of(self, view: RoundView, kind: str | None) -> int:
        table = _kind_stages(view.protocol)
        if kind not in table:
            raise ServiceError(INVALID_ARGUMENT, f"message {kind!r} does not belong to this "
                                                 "round's protocol")
        return int(table[kind].value)

    @_fresh_only
    def receive(self, site: int, round_id: str, stage: int) -> service_pb2.ReceiveResponse:
        view = self._view(round_id)
        # defence: service.receive-of-an-aborted-round-is-aborted
        if view.status == service_pb2.ROUND_STATUS_ABORTED:
            raise ServiceError(ABORTED, f"the round aborted: {view.abort_reason}")
        # (a stage no message of the round's protocol closes was waited on, "not yet", for
        # as long as the site asked)
        # defence: service.receive-stage-of-the-protocol
        if stage not in {int(s.value) for s in _kind_stages(view.protocol).values()}:
            raise ServiceError(INVALID_ARGUMENT, f"a {view.protocol} round has no stage {stage}")
        active = self.active
        if active is None or active.view is not view:
            raise ServiceError(FAILED_PRECONDITION, "the round is not running")
        # (a site waiting for a stage's answer, its message sent, asks for the round too)
        # defence: job.waiting-sites-are-present
        if active.waiting:
            self._seen(site, active)
        messages = active.outgoing.get(stage)
        if messages is None:
            return service_pb2.ReceiveResponse(ready=False, waiting=self._waiting(active))
        message = messages.get(site)
        # defence: service.dropped-site-told-at-once
        if message is None:
            raise ServiceError(FAILED_PRECONDITION,
                               f"site {site} dropped out of the round at stage {stage}")
        return _receive_response(message)

    # ---- chunks ----------

    def may_read(self, site: int, chunk_id: bytes) -> bool:
        if chunk_id in self._public:  # every round's starting model and result
            return True
        active = self.active
        # defence: job.no-reads-after-the-job
        if active is None:
            return False
        # what every site may read (key 0), and what this site's stage grants it alone
        # defence: service.chunks.read-granted-per-site
        return chunk_id in active.readable.get(0, set()) or chunk_id in active.readable.get(
            site, set())

    def upload_limit(self, site: int) -> int:
        """What a site may store in the current round, as UploadBudget charges it (each chunk
        its bytes and CHUNK_STORAGE_COST): twice what the round needs from it (in the SDK's
        1 MiB chunks), plus 16 MiB. What it needs is computed from the round's own layout:
        a fixed bytes-per-value for CKKS was below what the larger presets send (50 B a
        value at nvflare-default), and honest uploads of large models were refused."""
        active = self.active
        if active is None:
            return 0
        size = active.view.model.size + 1
        if active.view.protocol == "masking":
            expected = size * self.config.word_bits // 8
        else:
            preset = get_preset(self.config.preset)
            ciphertext = 2 + 2 * preset.poly_modulus_degree * preset.data_bits // 8
            # defence: service.upload-budget-from-the-layout
            expected = -(-size // preset.slots) * ciphertext
            if site == active.view.ckks_key_holder:  # its public context, the released average
                expected += public_context_length(preset) + 8 * size
        chunks = max(1, -(-expected // SDK_CHUNK_BYTES))
        return 2 * (expected + chunks * CHUNK_STORAGE_COST) + (16 << 20)

    @property
    def current_round(self) -> int | None:
        return None if self.active is None else self.active.view.number

    @property
    def current_stage(self) -> tuple[int, int] | None:
        """(round, stage) of the running round; read from other threads (a stale answer only
        reorders who uploads first)."""
        active = self.active
        return None if active is None else (active.view.number, active.view.stage)

    # ---- deadlines ----------

    def purge(self, *, now: bool = True) -> None:
        """Drop the uploads of finished rounds (on the ticker once due, and at shutdown)."""
        before = None
        # defence: job.finished-uploads-purged-after-delay
        while self._purges and (now or self._clock() >= self._purges[0][1]):
            before = self._purges.popleft()[0]
        if before is not None:
            try:
                self.store.purge_chunks_before(before)
            except BaseException:
                # (kept for the next try: a purge a full disk refused was forgotten)
                # defence: job.failed-purge-kept
                self._purges.appendleft((before, self._clock()))
                raise

    def _schedule_purge(self, before: int) -> None:
        """Drop the uploads of the rounds before ``before`` PURGE_DELAY from now; a purge
        already pending keeps its time."""
        # defence: job.purge-not-postponed
        self._purges.append((before, self._clock() + PURGE_DELAY))

    @_fresh_only
    def tick(self) -> None:
        self.purge(now=False)
        active = self.active
        # defence: job.waiting-round-has-no-deadline
        if active is not None and not active.waiting and self._clock() >= active.deadline:
            log.info("stage deadline", extra={"event": "stage_deadline",
                                              "round_id": active.view.round_id,
                                              "stage": active.view.stage})
            self._close(active)

    # ---- applying messages and closes (live and replay) ----------

    def _apply(self, active: _Active, site: int, request: service_pb2.SubmitRequest, *,
               replay: bool) -> None:
        kind = request.WhichOneof("message")
        try:
            if active.view.protocol == "masking":
                self._apply_masking(active, site, kind, request)
            else:
                self._apply_ckks(active, site, kind, request)
        except ServiceError as e:
            refusal = e
        except (InvalidMessage, RefusedMessage, ConfigurationError) as e:
            refusal = ServiceError(INVALID_ARGUMENT, f"refused: {e}")
        except PreconditionError as e:
            refusal = ServiceError(FAILED_PRECONDITION, str(e))
        else:
            active.answered.add(site)
            # a message replayed to a round of a store from before rounds waited (no "waits"
            # event) puts it under way: it holds no under_way event, and its sites may no
            # longer ask for it. A round opened waiting waits on after a restart: its sites
            # wait with it and ask again (put under way, a restart during a long wait ran its
            # deadlines with the others still offline: TOO_FEW_SURVIVORS; a reviewer)
            # defence: job.a-replayed-message-puts-the-round-under-way
            # defence: job.a-round-opened-waiting-waits-after-a-restart
            if active.waiting and replay and not active.opened_waiting:
                self._under_way(active, record=False, tell=False)
            return
        # a message the job counted and recorded, refused when it is replayed: not the site's
        # doing (it is not on the call) but the store's, damaged or edited under the job
        if replay:
            raise ServiceError(UNAVAILABLE, "the store's events do not replay: a recorded "
                                            f"message is refused now ({refusal}); if the "
                                            "federation config changed since the round began "
                                            "(its [update], [masking] or [ckks] settings make "
                                            "the round's parameters, which sites sign), "
                                            "restore it, or start a new [job] id") from None
        raise refusal from None

    def _apply_masking(self, active: _Active, site: int, kind: str | None,
                       request: service_pb2.SubmitRequest) -> None:
        role: MaskingServer = active.role
        if kind == "advertise_keys":
            msg: Any = wire.advertise_from_proto(request.advertise_keys)
        elif kind == "share_keys":
            msg = wire.share_keys_from_proto(request.share_keys)
        elif kind == "masked_input":
            ref = request.masked_input
            # the round's word size (a message claiming another is refused just below)
            word = wire.WORD_DTYPES[role.config.word_bits].itemsize
            # defence: job.masked-input-exact-size
            data = self._read(wire.Blob.from_proto(ref.masked_input),
                              size=word * (role.config.vector_length + 1))
            msg = wire.masked_input_from_ref(ref, data, word_bits=role.config.word_bits,
                                             length=role.config.vector_length + 1)
        elif kind == "consistency_signature":
            msg = wire.consistency_from_proto(request.consistency_signature)
        else:
            msg = wire.unmask_from_proto(request.unmask_response)
        if msg.site_id != site:
            raise ServiceError(PERMISSION_DENIED,
                               f"site {site} may not send a message of site {msg.site_id}")
        role.handle(msg)

    def _apply_ckks(self, active: _Active, site: int, kind: str | None,
                    request: service_pb2.SubmitRequest) -> None:
        view = active.view
        if kind == "ckks_key":
            # defence: service.only-the-key-holder-announces
            if site != view.ckks_key_holder:
                raise ServiceError(PERMISSION_DENIED, "only this round's key holder announces")
            offer = request.ckks_key
            announcement = wire.announcement_from_proto(offer.announcement)
            # defence: service.announcement-holder (the epoch the CKKS round config checks too)
            if announcement.holder != site or announcement.epoch != view.round_id:
                raise ServiceError(INVALID_ARGUMENT, "the announcement is not for this round")
            config = self.config.ckks_round(view.number, view.round_id, self.roster,
                                            announcement, view.model.size,
                                            model_digest=view.model.digest)
            blob = wire.Blob.from_proto(offer.public_context)
            # defence: service.payload.context-bounded
            context = PublicContext.load(
                self._read(blob, size=public_context_length(config.preset)),
                preset=config.preset)
            active.role = CkksServer(config, context)
            active.ckks_context = context
            active.ckks_config = config
            view.ckks_key = offer
            active.readable[0] |= set(blob.chunk_ids)
        elif kind == "ckks_update":
            ref = request.ckks_update
            if ref.site_id != site:
                raise ServiceError(PERMISSION_DENIED,
                                   f"site {site} may not send an upload of site {ref.site_id}")
            # defence: service.upload-ciphertext-count
            if ref.chunk_count != active.ckks_config.chunk_count:
                raise ServiceError(INVALID_ARGUMENT, "wrong number of ciphertexts")
            # (seeded needs the secret key: the service's sites hold the public context, and
            # the SDK never sends one; taken, it was a forged second polynomial the key holder
            # then decrypted against)
            # defence: service.ckks-uploads-full
            if ref.seeded:
                raise ServiceError(INVALID_ARGUMENT, "a seeded upload needs the secret key, which "
                                                     "this federation's sites do not hold")
            size = ref.chunk_count * _seal.encoded_length(active.ckks_context.seal_context,
                                                          _seal.Kind.FULL)
            update = wire.update_from_ref(ref, self._read(wire.Blob.from_proto(ref.chunks),
                                                          size=size))
            active.role.handle(update)
            active.ckks_uploads[site] = ref
        elif kind == "ckks_refusal":
            self._apply_refusal(active, site, request.ckks_refusal)
        else:
            if site != view.ckks_key_holder:
                raise ServiceError(PERMISSION_DENIED, "only this round's key holder releases")
            ref_r = request.ckks_release
            # defence: job.ckks-release-exact-size
            data = self._read(wire.Blob.from_proto(ref_r.average), size=8 * view.model.size)
            released = wire.release_from_ref(ref_r, data, round_id=view.round_id,
                                             length=view.model.size)
            # refused now, not at the close (signed: an average no model holds is refused)
            try:
                new: FlatModel | None = self._next_model(view, released.average)
            except ServiceError:
                # unsigned, it is the key holder's word that the sum is out of range (its SDK
                # makes this check too, and signs no model it cannot hold): taken, for the
                # close to abort the round as out of range at once. Refused, it left the
                # round to wait out the release deadline and abort as TOO_FEW_SURVIVORS
                # (one site's integer buffer pushed past its dtype; an outside tester)
                # defence: job.unsigned-release-no-model-holds-taken
                if ref_r.result_signature or ref_r.sites_signature:
                    raise
                new = None
            # the key holder signs the model its release makes; the aggregator publishes that
            # signature beside the result, so every site can check the result with the roster
            # alone (a release this aggregator would apply otherwise is refused now: the same
            # [job] server_learning_rate is the usual reason)
            # A release the L2 check refuses comes unsigned (the key holder makes the check
            # too, where a lying aggregator cannot skip it): taken unsigned, for the close to
            # abort the round as out of range; it is never published.
            try:
                self._check_released_norm(active, released.average, len(released.sites),
                                          released.weight_sum)
            except ProtocolAbort:
                signed = False
            else:
                signed = new is not None
            # an unsigned release carries no signature (a 6 MiB one rode along, unchecked,
            # and was recorded for good); a signed one's is verified below
            # defence: service.release-unsigned-carries-no-signature
            if not signed and (ref_r.result_signature or ref_r.sites_signature):
                raise ServiceError(INVALID_ARGUMENT, "a release the L2 check refuses comes "
                                                     "unsigned: it carries no signature")
            # defence: service.release-signs-the-result
            try:
                if signed and new is not None:
                    wire.verify_result(self.roster[site], ref_r.result_signature,
                                       round_id=view.round_id, model_digest=view.model.digest,
                                       result_digest=new.digest)
            except InvalidMessage:
                raise ServiceError(INVALID_ARGUMENT, "the release's result signature does not "
                                   "sign the model this aggregator makes of the average (does "
                                   "[job] server_learning_rate agree in every config?)") from None
            # defence: service.release.sites-exactly-the-uploads (each once: the published
            # survivors are this list)
            if sorted(released.sites) != sorted(active.ckks_uploads):
                raise ServiceError(INVALID_ARGUMENT, "the release covers other sites than the "
                                                     "round's uploads")
            # the key holder signs the sites too, published as the survivors' signature: the
            # other sites report who their update was averaged with from it
            # defence: service.release-signs-the-sites
            # (an empty one is taken, as a key holder's SDK from before sites signatures sends:
            # the other sites then report no survivors; it is their check, not this one, that
            # a lying aggregator must pass)
            try:
                if signed and new is not None and ref_r.sites_signature:
                    wire.verify_sites(self.roster[site], ref_r.sites_signature,
                                      round_id=view.round_id, result_digest=new.digest,
                                      sites=released.sites)
            except InvalidMessage:
                raise ServiceError(INVALID_ARGUMENT, "the release's sites signature does not "
                                                     "sign the sites it covers") from None
            # applied when the stage closes, outside this message's transaction
            active.ckks_release = (released.average, released.sites,
                                   wire.Blob.from_proto(ref_r.average), released.weight_sum,
                                   bytes(ref_r.result_signature), bytes(ref_r.sites_signature))

    def _apply_refusal(self, active: _Active, site: int,
                       refusal: service_pb2.CkksReleaseRefusal) -> None:
        """The key holder's signed refusal of the sum as out of range: the round aborts as
        the stage closes (at once: the key holder is the stage's one participant), not at
        the release deadline. The one bit it tells, the key holder's silence told before."""
        # (layered: the stage's one participant is the key holder, and submit() refuses
        # anyone else first, FAILED_PRECONDITION)
        if site != active.view.ckks_key_holder:
            raise ServiceError(PERMISSION_DENIED, "only this round's key holder refuses its sum")
        # defence: job.refusal-out-of-range-only
        if refusal.reason != RefusalReason.OUT_OF_RANGE.value:
            raise ServiceError(INVALID_ARGUMENT, "a key holder refuses a sum for one reason "
                                                 "the aggregator does not know: out of range")
        # defence: job.refusal-signed-by-the-key-holder
        try:
            assert active.ckks_aggregate is not None  # (the release stage's request)
            wire.verify_refusal(self.roster[site], refusal.signature,
                                params_digest=active.ckks_config.params_digest, site_id=site,
                                reason=refusal.reason,
                                aggregate_chunk_ids=active.ckks_aggregate.chunks.chunk_ids)
        except InvalidMessage:
            raise ServiceError(INVALID_ARGUMENT, "the refusal's signature is not the key "
                                                 "holder's for this round") from None
        active.ckks_refused = True

    def _close(self, active: _Active, *, replay: bool = False) -> None:
        view = active.view
        if active is not self.active:
            return
        if not replay:
            with self.store.transaction() as conn:
                self.store.record_event(conn, Event(view.number, "close", view.stage, 0, b""))
        dropped = sorted(active.expected - active.answered)
        closing, missing = view.stage, len(dropped)
        answered = len(active.answered)
        started, active.stage_started = active.stage_started, self._clock()
        try:
            if view.protocol == "masking":
                self._close_masking(active)
            else:
                self._close_ckks(active)
        except ProtocolAbort as abort:
            # the detail names ids only (whose secret could not be rebuilt: the site whose
            # shares were junk, or too few answers): the operator's lead to who failed it
            self._abort(active, abort.reason.name, abort.detail)
            return
        except ServiceError as e:
            # defence: job.close-store-trouble-not-an-abort
            if e.code != INVALID_ARGUMENT:
                raise  # the store's trouble: the round is replayed once it answers again
            # defence: service.close.bad-result-aborts (what the round's messages make is no
            # model: deterministic, so a replay would fail the same way, and the job would
            # recover into the same failure every second, for good)
            self._abort(active, "AGGREGATE_OUT_OF_RANGE")
            return
        finally:
            if not replay:
                # the stage the job is at now: the closed round's next, the next round's
                # first, or none (a stage closed after the close had opened the next round,
                # or ended the job, showed the closed round's "stage 6" all through it)
                # defence: metrics.current-stage-after-the-close
                now = self.active
                self.metrics.stage_closed(view.protocol, closing, missing,
                                          active.stage_started - started,
                                          now.view.stage if now is not None else 0)
                log.info("stage closed", extra={"event": "stage_closed",
                                                "round_id": view.round_id, "stage": closing,
                                                "count": answered})
                # who the stage waited for in vain, by name: the operator's call to make
                # (the metric counts them; the aggregator knows them anyway)
                # defence: job.dropouts-named
                for site in dropped[:DROPOUTS_NAMED]:
                    log.warning("site dropped out", extra={
                        "event": "site_dropped", "round_id": view.round_id, "stage": closing,
                        "site_id": site})
                if len(dropped) > DROPOUTS_NAMED:
                    log.warning("sites dropped out", extra={
                        "event": "site_dropped", "round_id": view.round_id, "stage": closing,
                        "count": len(dropped) - DROPOUTS_NAMED})
        # a stage that closed because every site it expected answered, while the round still
        # waited (sites asking more than PRESENCE_SECONDS apart), moved the round past its
        # opening stages with its deadlines still not running: no later stage would ever
        # end for a site that dropped. Past them, a round is under way.
        # defence: job.past-the-opening-stages-under-way
        if self.active is active and active.waiting and not _opening(active.view):
            active.waiting = False
            active.asked = {}
            self.metrics.round_waiting(False)
        self._on_change()

    def _close_masking(self, active: _Active) -> None:
        role: MaskingServer = active.role
        closing = role.stage
        out = role.close_stage()
        if role.stage is Stage.COMPLETED:
            result = role.result
            assert result is not None
            self._check_clip_norm(active.view.model, result.weighted_sum, result.weight_sum,
                                  result.error_bound)
            self._note_masking_precision(active, result.weight_sum, result.error_bound)
            average = result.weighted_sum / result.weight_sum
            self._complete(active, average, result.survivors, None, result.weight_sum)
            return
        active.outgoing[closing.value] = dict(out)
        active.view.stage = role.stage.value
        active.expected = set(role.participants)
        active.answered = set()
        active.deadline = self._clock() + self.config.deadlines.stage

    def _close_ckks(self, active: _Active) -> None:
        view = active.view
        if view.stage == CkksStage.KEY_ANNOUNCEMENT.value:
            # defence: job.ckks-unannounced-key-aborts
            if active.role is None:
                raise ProtocolAbort(_abort_reason("TOO_FEW_SURVIVORS"),
                                    "the key holder did not announce a key")
            view.stage = CkksStage.UPLOAD.value
            active.expected = set(self.roster)
            active.answered = set()
            active.deadline = self._clock() + self.config.deadlines.open
            return
        if view.stage == CkksStage.UPLOAD.value:
            server: CkksServer = active.role
            aggregate = server.close_stage()[active.ckks_config.key_holders[0]]
            data = b"".join(aggregate.chunks)
            blob = self.store.write_blob(data, chunk_bytes=self._served_chunk_bytes,
                                         round_number=view.number)
            active.ckks_aggregate = wire.aggregate_to_ref(aggregate, _blob(blob))
            holder = view.ckks_key_holder
            # defence: job.release-inputs-granted-to-holder
            readable = active.readable.setdefault(holder, set())
            readable |= set(blob.chunk_ids)
            for ref in active.ckks_uploads.values():
                readable |= {bytes(c) for c in ref.chunks.chunk_ids}
            request = service_pb2.CkksReleaseRequest(
                aggregate=active.ckks_aggregate,
                uploads=[active.ckks_uploads[s] for s in sorted(active.ckks_uploads)])
            active.outgoing[CkksStage.UPLOAD.value] = {holder: request}
            view.stage = CkksStage.RELEASE.value
            active.expected = {holder}
            active.answered = set()
            active.deadline = self._clock() + self.config.deadlines.release
            return
        # defence: job.refusal-aborts-the-round
        if active.ckks_refused:
            raise ProtocolAbort(_abort_reason("AGGREGATE_OUT_OF_RANGE"),
                                "the key holder refused the sum: its values are out of range "
                                "(a site's upload past its limits, or weights too small for "
                                "the release noise; the key holder sees the sum only, so no "
                                "site is named)")
        if active.ckks_release is None:
            raise ProtocolAbort(_abort_reason("TOO_FEW_SURVIVORS"),
                                "the key holder did not release the average (it is gone, it "
                                "refused the sum, out of range or not the uploads' sum, which "
                                "any one site can cause, or this aggregator refused its "
                                "release: its own error and this log say which)")
        (average, sites, release_blob, weight_sum, signature,
         sites_signature) = active.ckks_release
        self._check_released_norm(active, average, len(sites), weight_sum)
        self._note_ckks_precision(active, len(sites), weight_sum)
        view.result_signature, view.sites_signature = signature, sites_signature
        self._complete(active, average, sites, release_blob, weight_sum)

    def _check_released_norm(self, active: _Active, average: np.ndarray, sites: int,
                             weight_sum: float) -> None:
        """The L2 check of _check_clip_norm for a CKKS release (secagg.ckks.release.
        check_released_norm): the key holder checks each element only, and one site past the
        SDK's clip moved the model by L2 9.0 with clip_norm 1; and a weight sum too small for
        the flooding noise made an average of noise (L2 22 for clip_norm 1), published."""
        length, d = _learned_norm(active.view.model, average)
        check_released_norm(active.ckks_config.preset_params, sites, self.config.clip_norm,
                            weight_sum, length, d)

    def _complete(self, active: _Active, average: np.ndarray, survivors: tuple[int, ...],
                  release_blob: wire.Blob | None, weight_sum: float) -> None:
        view = active.view
        new = self._next_model(view, average)
        self._save_model(new)
        if release_blob is None:
            stored = self.store.write_blob(wire.average_bytes(average),
                                           chunk_bytes=self._served_chunk_bytes,
                                           round_number=None)
        else:
            stored = BlobRef(release_blob.chunk_ids, release_blob.size)
        with self.store.transaction() as conn:
            self.store.record_release(conn, view.number, stored, weight_sum, survivors)
            self.store.finish_round(conn, view.number, "completed", result_digest=new.digest,
                                    survivors=survivors)
            # the released history outlives the round: the key holder's release chunks too
            self.store.claim_chunks(conn, list(stored.chunk_ids), None)
        view.status = service_pb2.ROUND_STATUS_COMPLETED
        view.result = new
        view.result_blob = self._model_blob(new.digest)
        self._public.update(view.result_blob.chunk_ids)
        view.survivors = tuple(survivors)
        view.stage = (Stage.COMPLETED.value if view.protocol == "masking"
                      else CkksStage.COMPLETED.value)
        self.model = new
        log.info("round completed", extra={"event": "round_completed",
                                           "round_id": view.round_id})
        self.metrics.round_finished(view.protocol, None)
        self._schedule_purge(view.number + 1)
        self._next_or_done(view.number)

    def _next_model(self, view: RoundView, average: np.ndarray) -> FlatModel:
        """The model a round's average makes, if every site can hold it: an average that
        would take a value out of its tensor's range (a key holder releasing 1e39 for a
        float32 weight, or sums that overflow over rounds) is refused, never published."""
        # defence: service.average-fits-the-model
        if average.shape != (view.model.size,) or not np.all(np.isfinite(average)):
            raise ServiceError(INVALID_ARGUMENT, "the average does not fit the model")
        with np.errstate(over="ignore", invalid="ignore"):
            values = view.model.values + self.config.server_learning_rate * average
        # (with_values refuses what representable refuses: model.with-values-representable)
        try:
            return view.model.with_values(values)
        except ConfigurationError:
            raise ServiceError(INVALID_ARGUMENT, "the average would take the model out of "
                                                 "its tensors' range") from None

    def _check_clip_norm(self, model: FlatModel, weighted_sum: np.ndarray, weight_sum: float,
                         error: tuple[float, float]) -> None:
        """Refuse (abort the round) a masked sum no clipped inputs can make. Each site sends
        weight * delta with the delta's learned values (integer tensors' counters aside)
        clipped to L2 norm ``clip_norm``: their sum's learned values are within
        clip_norm * weight_sum of zero, give or take the quantiser's error. The masking role
        checks each element only (it knows no model): one site sending +clip in every
        element, at three times the largest weight, moved the published model 33 times as
        far as any site within its limits could (L2 31 against 0.94)."""
        # defence: service.masked-sum-within-the-clip-norm
        norm, d = _learned_norm(model, weighted_sum)
        element, weight = error
        limit = (self.config.clip_norm * (weight_sum + weight) * (1 + 1e-9)
                 + math.sqrt(d) * element)
        if not norm <= limit:
            raise ProtocolAbort(AbortReason.AGGREGATE_OUT_OF_RANGE,
                                "the unmasked sum is longer than clipped inputs can make")

    def _note_masking_precision(self, active: _Active, weight_sum: float,
                                error: tuple[float, float]) -> None:
        """Warn the operator when a masking round's weight sum is small for the quantiser:
        the average's rounding error (up to ``error`` over the weight sum) is then a
        visible share of clip_norm, and nothing else would say so (weights of 100 samples
        under ``max_samples = 1e6`` made averages off by ~1% of clip_norm, silently). A round
        within the margin is never refused by an honest site (secagg.masking.precision)."""
        learned = int(np.count_nonzero(~active.view.model.integer_positions))
        share = error_share(error, weight_sum, learned, self.config.clip_norm)
        # defence: service.masking-precision-warned
        if share > PRECISION_MARGIN:
            log.warning(
                f"round's average may be off by up to {share:.2g} x clip_norm (L2): its weight "
                f"sum {weight_sum:.3g} is small for the quantiser; bring [update] max_samples "
                "nearer the sites' sample counts (weights nearer 1), or set [masking] "
                "word_bits = 64", extra={"event": "masking_precision_low",
                                         "round_id": active.view.round_id})

    def _note_ckks_precision(self, active: _Active, sites: int, weight_sum: float) -> None:
        """Warn the operator when a CKKS round's weight sum is small for its preset: the
        release's flooding noise over the weight sum may then be off by more than the share
        of clip_norm masking warns at (PRECISION_MARGIN), and nothing else would say so until
        a round is spent and refused as noise (above MAX_NOISE_SHARE:
        secagg.ckks.release.check_released_norm)."""
        learned = int(np.count_nonzero(~active.view.model.integer_positions))
        noise = release_noise_share(active.ckks_config.preset_params, sites,
                                    self.config.clip_norm, weight_sum, learned)
        # defence: service.ckks-precision-warned
        if noise > PRECISION_MARGIN:
            log.warning(
                f"round's average may be off by up to {noise:.2g} x clip_norm (L2) from the "
                f"release noise (refused above {MAX_NOISE_SHARE:g}): its weight sum "
                f"{weight_sum:.3g} is small for preset {self.config.preset!r}; bring [update] "
                "max_samples nearer the sites' sample counts (weights nearer 1), raise "
                "clip_norm, or use a preset with less noise",
                extra={"event": "ckks_precision_low", "round_id": active.view.round_id})

    def _abort(self, active: _Active, reason: str, detail: str = "") -> None:
        view = active.view
        with self.store.transaction() as conn:
            self.store.finish_round(conn, view.number, "aborted", abort_reason=reason)
        view.status = service_pb2.ROUND_STATUS_ABORTED
        view.abort_reason = reason
        view.stage = (Stage.ABORTED.value if view.protocol == "masking"
                      else CkksStage.ABORTED.value)
        log.warning(f"round aborted: {detail}" if detail else "round aborted", extra={
            "event": "round_aborted", "round_id": view.round_id, "reason": reason})
        self.metrics.round_finished(view.protocol, reason)
        self._schedule_purge(view.number + 1)
        self._next_or_done(view.number)

    # ---- models ----------

    @property
    def _served_chunk_bytes(self) -> int:
        """Chunk size of what this aggregator writes for sites to download (models, averages,
        the CKKS aggregate). A download stream holds the chunk it is sending, so 50 sites
        fetching a 4 MB model at once hold 50 MiB, not 200 (4 MiB chunks)."""
        return min(SERVED_CHUNK_BYTES, self.config.limits.max_chunk_bytes)

    def _save_model(self, model: FlatModel) -> None:
        data = model.to_bytes()
        blob = self.store.write_blob(data, chunk_bytes=self._served_chunk_bytes,
                                     round_number=None)
        spec = json.dumps([[t.name, list(t.shape), t.dtype] for t in model.spec])
        self.store.save_model(model.digest, spec, blob)
        self._keep_hot(blob, data)

    def _keep_hot(self, blob: BlobRef, data: bytes) -> None:
        """Keep the chunks of the two newest models (a round's start and its result, public)
        in memory: every site downloads them, at the same moment."""
        pieces = split_chunks(data, self._served_chunk_bytes)
        self._hot = (self._hot[-1], dict(zip(blob.chunk_ids, pieces, strict=True)))

    def hot_chunk(self, cid: bytes) -> bytes | None:
        """A chunk of one of the two newest models, from memory (any thread may ask)."""
        for chunks in self._hot:
            found = chunks.get(cid)
            if found is not None:
                return found
        return None

    def _load_model(self, digest: bytes) -> FlatModel:
        found = self.store.load_model(digest)
        if found is None:
            raise ServiceError(UNAVAILABLE, "the store lacks a model it refers to")
        spec_json, blob = found
        from secagg.model import TensorSpec

        spec = tuple(TensorSpec(n, tuple(s), d) for n, s, d in json.loads(spec_json))
        try:
            model = FlatModel.from_bytes(spec, self.store.read_blob(blob))
        except ValueError:  # (ConfigurationError is one)
            model = None
        # defence: service.stored-model-digest
        if model is None or model.digest != digest:
            raise ServiceError(UNAVAILABLE, "a stored model does not match its digest")
        return model

    def _model_blob(self, digest: bytes) -> BlobRef:
        found = self.store.load_model(digest)
        if found is None:
            raise ServiceError(UNAVAILABLE, "the store lacks a model it refers to")
        return found[1]

    def _read(self, blob: wire.Blob, *, size: int | None = None,
              limit: int | None = None) -> bytes:
        """The payload a site's message refers to. Its size and chunk list are the site's
        claims: they are checked against ``size`` (what the round needs, when it is known)
        or ``limit``, and against the stored chunks' sizes, before one byte of data is read,
        so a lie is INVALID_ARGUMENT (never a store failure, which would restart the job and
        its deadlines for everyone) and no message makes the job read more than the round's
        own payload (a chunk named 400 times, or 240,000 times)."""
        # defence: service.payload.sized-before-read
        if size is not None and blob.size != size:
            raise ServiceError(INVALID_ARGUMENT, f"the payload holds {blob.size} bytes; this "
                                                 f"message needs {size}")
        # with ``size`` known it is the bound (a CKKS upload takes 25-50 bytes a value)
        if size is None and blob.size > (limit if limit is not None else
                                         16 * (self.config.limits.max_vector_length + 1)
                                         + (64 << 20)):
            raise ServiceError(RESOURCE_EXHAUSTED, "payload larger than this message needs")
        ids = list(blob.chunk_ids)
        # defence: service.payload.chunk-count-before-lookup (each chunk holds a byte or more)
        # defence: service.payload.chunks-hold-a-page-on-average
        # (and a payload's chunks hold CHUNK_STORAGE_COST bytes each on average: one byte a
        # chunk let a message of 8 MiB name one tiny chunk 246,000 times, each a lookup on
        # the job's thread, 31 s of it, again and again, while every honest call waited)
        if not 0 < len(ids) <= -(-blob.size // CHUNK_STORAGE_COST):
            raise ServiceError(INVALID_ARGUMENT, f"a payload of {blob.size} bytes cannot be "
                                                 f"{len(ids)} chunks")
        sizes = self.store.chunk_sizes(ids)
        missing = len(set(ids) - sizes.keys())
        # defence: service.payload.chunks-present
        if missing:
            raise ServiceError(FAILED_PRECONDITION, f"{missing} chunks of the payload "
                                                    "have not been uploaded")
        # defence: service.payload.chunks-add-up
        if sum(sizes[c] for c in ids) != blob.size:
            raise ServiceError(INVALID_ARGUMENT, "the payload's chunks do not add up to the "
                                                 "size it claims")
        data = self.store.read_blob(BlobRef(blob.chunk_ids, blob.size))
        if self.active is not None:
            self.active.claims.extend(blob.chunk_ids)
        return data


def _stored_form(request: service_pb2.SubmitRequest) -> bytes:
    """What is stored of a site message (for good: the events outlive their round), which is
    what the roles read: fields this aggregator does not know are dropped, not kept beside
    the message (a site padded each message with 8 MiB of them, which no signature covers:
    40 MB of store a round that no purge took)."""
    # defence: service.unknown-fields-not-stored
    request.DiscardUnknownFields()
    return request.SerializeToString(deterministic=True)


def check_job(config: FederationConfig, roster: Roster, initial_model: FlatModel) -> int:
    """ConfigurationError for a job no round of which could run: checked as the job starts,
    and by `aggregator serve` before it binds its port (a threshold, a graph or a vector
    length out of range was reported after the "listening" line). Returns the sites a round
    needs to end otherwise than aborted (masking: its least participants; CKKS: min_sites)."""
    # defence: service.start-roster-within-max-sites
    if len(roster) > config.limits.max_sites:
        raise ConfigurationError(f"the roster has {len(roster)} sites, [limits] max_sites "
                                 f"is {config.limits.max_sites}")
    # (checked before anything is stored: a store whose round 1 holds an empty model could
    # never run, even after the model file was fixed)
    if initial_model.size < 1:
        raise ConfigurationError("the job's initial model has no values")
    # defence: service.start-model-within-max-vector-length
    if initial_model.size > config.limits.max_vector_length:
        raise ConfigurationError(f"the model has {initial_model.size} values, [limits] "
                                 f"max_vector_length is {config.limits.max_vector_length}")
    if config.protocol == "ckks":
        # defence: service.start-ckks-round-parameters
        least: int = config.check_ckks_roster(len(roster))
        _check_releasable(config, len(roster), initial_model)
        return least
    # (round 1's parameters: every round's are these, but for the round id)
    # defence: service.start-masking-round-parameters
    made = config.masking_round(config.round_id_for(1), roster, initial_model.size,
                                model_digest=initial_model.digest)
    return int(made.minimum_participants)


def _check_releasable(config: FederationConfig, sites: int, model: FlatModel) -> None:
    """A CKKS job some round of which could be released: the L2 check of a release refuses a
    weight sum below least_l2_weight_sum (the noise over it above a tenth of clip_norm); if
    every site at full weight (max_samples samples: weight 1) is below it, every round would
    be spent and refused, which only shows once the sites have trained and encrypted."""
    learned = int(np.count_nonzero(~model.integer_positions))
    least = least_l2_weight_sum(get_preset(config.preset), sites, config.clip_norm, learned)
    # defence: service.start-ckks-releasable
    if not sites * 1.0 >= least:
        raise ConfigurationError(
            f"no CKKS round of this job could be released: at {learned} learned values and "
            f"[update] clip_norm {config.clip_norm:g}, the release noise of preset "
            f"{config.preset!r} stays under a tenth of clip_norm only for a weight sum of "
            f"{least:.3g} or more, and {sites} sites at full weight sum to {sites}; raise "
            "clip_norm, or use more sites or a preset with less noise")


def _learned_norm(model: FlatModel, values: np.ndarray) -> tuple[float, int]:
    """The L2 norm of ``values``' learned entries (integer tensors' counters aside, as the
    SDK clips them: clients.tensors.clip_l2), and how many there are."""
    counters = model.integer_positions
    learned = values[~counters] if counters.any() else values
    return l2_norm(learned), int(learned.size)  # (without BLAS: secagg._norm)


def _claimed_site(request: service_pb2.SubmitRequest, kind: str | None) -> int | None:
    """The site id a message names in its own fields (checked before anything else)."""
    if kind in ("ckks_key", "ckks_release", "ckks_refusal") or kind is None:
        return None
    if kind == "ckks_update":
        return int(request.ckks_update.site_id)
    return int(getattr(request, kind).site_id)


_STATUS = {"running": service_pb2.ROUND_STATUS_RUNNING,
           "completed": service_pb2.ROUND_STATUS_COMPLETED,
           "aborted": service_pb2.ROUND_STATUS_ABORTED}


def _abort_reason(name: str) -> Any:
    from secagg.errors import AbortReason

    return AbortReason[name]


def _opening_stage(protocol: str) -> int:
    """The stage a round of ``protocol`` opens at (Job._start_role)."""
    if protocol == "masking":
        return int(Stage.ADVERTISE_KEYS.value)
    return int(CkksStage.KEY_ANNOUNCEMENT.value)


def _opening(view: RoundView) -> bool:
    """Whether the round is at a stage a round waits for its sites in: masking's keys,
    CKKS's key and uploads (Job._seen)."""
    if view.protocol == "masking":
        return view.stage == Stage.ADVERTISE_KEYS.value
    return view.stage in (CkksStage.KEY_ANNOUNCEMENT.value, CkksStage.UPLOAD.value)


def _blob(ref: BlobRef) -> wire.Blob:
    return wire.Blob(ref.chunk_ids, ref.size)


def _receive_response(message: ServerMessage | service_pb2.CkksReleaseRequest
                      ) -> service_pb2.ReceiveResponse:
    if isinstance(message, KeyDirectory):
        return service_pb2.ReceiveResponse(ready=True,
                                           key_directory=wire.directory_to_proto(message))
    if isinstance(message, ShareDelivery):
        return service_pb2.ReceiveResponse(ready=True,
                                           share_delivery=wire.delivery_to_proto(message))
    if isinstance(message, SurvivorList):
        return service_pb2.ReceiveResponse(ready=True,
                                           survivor_list=wire.survivors_to_proto(message))
    if isinstance(message, UnmaskRequest):
        return service_pb2.ReceiveResponse(
            ready=True, unmask_request=wire.unmask_request_to_proto(message))
    if isinstance(message, service_pb2.CkksReleaseRequest):
        return service_pb2.ReceiveResponse(ready=True, ckks_release_request=message)
    raise TypeError(type(message).__name__)
