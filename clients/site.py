"""The site SDK: what a hospital's training script calls.

```python
from clients import Site

site = Site.connect("federation/sites/site-3")
for rnd in site.rounds():
    model.load_state_dict(rnd.global_model)
    n = train(model, local_data)
    rnd.submit(model.state_dict(), weight=n)   # blocks until the round's average is out
```

``site.aggregate(state_dict, weight)`` is the one-shot form: it joins the next round and returns
the averaged state dict. The average comes back with the same names, shapes and dtypes; numpy
arrays work as well as torch tensors (``tensors="numpy"``/``"torch"``/``"auto"``).

What leaves the site: the delta between its trained state and the round's global model, L2-
clipped to ``[update] clip_norm``, weighted by ``weight / [update] max_samples`` and then masked
or encrypted by the protocol roles of :mod:`secagg`; never the plaintext. The site checks the
round's model digest against the model it holds and refuses a different one.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from clients import tensors
from clients.errors import (
    AggregatorRefused,
    AggregatorUnavailable,
    AnswerRefused,
    ModelMismatch,
    RoundAborted,
    SiteError,
)
from clients.history import (
    AnotherKeyKept,
    DirectoryClaim,
    History,
    KeyNotWritten,
    claim_directory,
    one_update_per_model,
)
from clients.progress import guarded as progress_guarded
from clients.transport import CLOSED, Connection, Progress
from secagg import wire
from secagg._norm import l2_norm
from secagg.ckks import CkksClient, KeyHolder, PublicContext, Release, _seal
from secagg.ckks.keys import public_context_length
from secagg.ckks.release import check_released_norm
from secagg.ckks.round import CkksStage
from secagg.errors import (
    WORKERS_GUARD_HINT,
    ConfigurationError,
    InvalidMessage,
    ProtocolAbort,
    RefusalReason,
    RefusedMessage,
    SecAggError,
    WorkersFailed,
)
from secagg.federation.config import SDK_CHUNK_BYTES, FederationConfig
from secagg.federation.kit import SiteKit
from secagg.hazmat.secret import scrubs_locals
from secagg.masking import MaskingClient, Stage
from secagg.masking.messages import MaskedInput
from secagg.masking.precision import result_bound
from secagg.model import TRAINING_FLOATS, FlatModel
from secagg.v1 import ckks_pb2, service_pb2

_log = logging.getLogger("clients")
POLL_MS = 10_000


# what answers that bring nothing new may bring in, on average: far above an honest "not
# yet" (a few bytes, or a round's info: its model's names and shapes); a lying aggregator
# padding each to the message limit and holding it just past the pacer's threshold had a
# site receive ~6 MB a second until the round's patience ran out (20 GB)
POLL_BYTES_PER_SECOND = 64 * 1024
# an update longer than this many times [update] clip_norm is told in the log (it goes out
# clipped, moving the model by the full clip in its direction: usually diverged training)
DIVERGED_CLIP_FACTOR = 1000.0
# what a "nothing new" answer may hold beyond the round's info the site joined with (an
# honest one repeats it, with its model's names and shapes: 4.6 MB for 65,536 tensors, which
# slept 70 s a poll) before its bytes pace the next poll: a round id, a survivor list
POLL_SLACK_BYTES = 64 * 1024


class _Pacer:
    """Long polls that come back early with nothing new are spaced out (0.1 s, doubling to
    5 s, with jitter): an honest aggregator answers "nothing new" only once the poll's wait
    is over, and a lying one answering at once (each reply up to the message limit) made a
    site call it a hundred times a second and receive gigabytes. And a poll's answer of
    ``nbytes`` takes at least ``nbytes / POLL_BYTES_PER_SECOND`` from its start to the next
    poll, however long it was held."""

    def __init__(self, allowance: int = POLL_SLACK_BYTES,
                 until: Callable[[], float] = lambda: math.inf) -> None:
        self._delay = 0.0
        self._random = random.SystemRandom()
        self._allowance = allowance  # bytes an answer may hold unpaced
        # (no sleep past it: the round's patience, read at each pause: a round waiting for
        # its sites moves it on)
        self._until = until

    def nothing_new(self, began: float, nbytes: int = 0) -> None:
        """A poll begun at ``began`` (time.monotonic()) brought nothing new, in ``nbytes``."""
        elapsed = time.monotonic() - began
        # defence: sdk.polls-paced-by-their-bytes
        owed = max(0, nbytes - self._allowance) / POLL_BYTES_PER_SECOND - elapsed
        # defence: sdk.long-polls-paced
        if elapsed >= POLL_MS / 2000:
            self._delay = 0.0
            pause = owed
        else:
            self._delay = min(max(2 * self._delay, 0.1), 5.0)
            pause = max(self._random.uniform(self._delay / 2, self._delay), owed)
        # defence: sdk.pacing-ends-with-the-patience
        pause = min(pause, max(0.0, self._until() - time.monotonic()) + 0.01)
        if pause > 0:
            time.sleep(pause)


# An honest aggregator ends a round within its stage deadlines: the open stage, five stages
# at most, the key holder's release. A site gives a round twice that, and five minutes more
# (an aggregator restarted mid-round starts the stage's deadline again), from its submit on.
ROUND_PATIENCE = 2.0
ROUND_GRACE_SECONDS = 300.0
# A round the aggregator says waits for its sites (its deadlines not yet running) is waited
# for, its patience running from when it is under way: for at most a day (the aggregator's
# word; it could hold a site as long by opening no round). A change in the sites it waits
# for is said at most once a minute.
WAITING_PATIENCE_SECONDS = 24 * 3600.0
WAITING_SAID_SECONDS = 60.0
KEY_WAIT_WAITING_SECONDS = 10.0  # (a CKKS site's key wait, while the round waits for its sites)
# A key holder's kept round key is kept a round's patience past the site's deadline in the
# round, extended once the deadline comes this near the key's end.
KEY_KEPT_MARGIN_SECONDS = 600.0


def _round_patience(config: Any) -> float:
    d = config.deadlines
    return float(ROUND_PATIENCE * (d.open + 5 * d.stage + d.release) + ROUND_GRACE_SECONDS)




_RUNNING = service_pb2.ROUND_STATUS_RUNNING
# what the aggregator answers a message to a round it no longer runs for this site: the
# wrong stage or a round no longer running (FAILED_PRECONDITION), an aborted round (ABORTED)
# lists in a stage's answer bounded by a payload's size (checked as it is read), not by the
# roster's sites (Site._count_entries)
_SIZE_BOUNDED_LISTS = frozenset({service_pb2.Blob.DESCRIPTOR.fields_by_name["chunk_ids"].full_name})
_ROUND_ENDED_CODES = frozenset({"FAILED_PRECONDITION", "ABORTED"})
_PROTOCOLS = {"masking": service_pb2.PROTOCOL_MASKING, "ckks": service_pb2.PROTOCOL_CKKS}


class AverageBound(NamedTuple):
    """How far a masking round's average can be from zero, for a site whose input is in it:
    ``l2`` over the learned values, ``element`` for each value (integer counters too)."""

    l2: float
    element: float


def _masked_average_bound(quantizer: Any, learned: int) -> AverageBound:
    """How long the average of a masking round can be, in L2 over the learned values and in
    each element (secagg.masking.precision.result_bound): public, the same for every site
    of the round (a bound built from this site's weight made its accept/refuse of a result
    an oracle on its sample count)."""
    # defence: sdk.masked-bound-independent-of-the-weight
    return AverageBound(*result_bound(quantizer, learned))


_STEP_BLOCK = 1 << 15  # values at once: 256 KiB float64 temporaries


def _steps(model: FlatModel, result: FlatModel) -> tuple[float, float]:
    """The shortest change of ``model``'s values that rounds to ``result``: its L2 over the
    learned values (integer tensors' counters aside), and its largest integer value's change
    (the counters, before rounding: less 0.5). Each float value's change is less half the
    gap between its result and the next value of its dtype toward the model's (what rounding
    to nearest can add; float32's flush of subnormals, below 1.2e-38, too): never a whole
    spacing at the result, which is infinite at a dtype's largest value (a result of
    +-65504 in a float16 tensor cost nothing, wherever the model was)."""
    learned_squares, counters = 0.0, 0.0
    pos = 0
    for t in model.spec:  # (in cache-sized blocks: a few quick passes over each)
        dtype = np.dtype(t.dtype)
        start, pos = pos, pos + t.size
        for block in range(start, pos, _STEP_BLOCK):
            end = min(block + _STEP_BLOCK, pos)
            got64, had64 = result.values[block:end], model.values[block:end]
            with np.errstate(over="ignore"):  # (a change near float64's largest: inf, refused)
                step = np.abs(got64 - had64)
            if dtype.kind == "f":
                got = got64.astype(dtype)
                toward = np.nextafter(got, had64.astype(dtype))
                # defence: sdk.result-rounding-slack-is-half-a-gap
                slack = np.abs(got.astype(np.float64) - toward.astype(np.float64)) / 2
                if dtype.itemsize == 4:
                    slack += float(np.finfo(dtype).tiny)
                # (float64's own rounding of the sum, relative: finite at any value)
                slack += np.abs(got64) * 2.0**-52
                np.subtract(step, slack, out=step)
            np.maximum(step, 0.0, out=step)
            if not step.size:
                continue
            if dtype.kind in "iub":
                counters = max(counters, float(step.max()))
            else:
                with np.errstate(over="ignore"):  # (squares past float64's range: inf, refused)
                    np.square(step, out=step)
                    learned_squares += float(step.sum())
    # (summed here without BLAS: np.dot's OpenBLAS threads spin ~0.1 CPU-s after it)
    return math.sqrt(learned_squares), counters


def _why(e: Exception) -> str:
    return str(e) if isinstance(e, SecAggError) else f"{type(e).__name__}: {e}"


def _sample_count(weight: object) -> float | None:
    """``weight`` as a float if it is a real number (a Python, numpy or 0-d torch scalar:
    what ``len``, ``y.sum()`` and ``mask.sum()`` return), not a bool, finite; else None."""
    import numbers

    if getattr(weight, "ndim", None) == 0 and hasattr(weight, "item"):
        # (a meta tensor's item() raised from inside torch)
        # defence: sdk.weight-item-error-named
        try:
            weight = weight.item()  # a 0-d array or tensor
        except (RuntimeError, TypeError, ValueError):
            return None
    if isinstance(weight, bool | np.bool_) or not isinstance(weight, numbers.Real):
        return None
    try:
        value = float(weight)
    except OverflowError:  # an int beyond any float
        return None
    return value if math.isfinite(value) else None


def _shown_weight(weight: object, samples: float | None) -> str:
    """A refused weight as its error shows it: a number as itself, anything else by its
    type and shape only. The value was echoed whole: a label tensor passed for ``len(y)``
    printed every patient's label into the exception (and the logs and crash reports it
    reaches), a string its text."""
    # defence: sdk.refused-weight-not-echoed
    if samples is not None:
        return f"{samples:g}"
    shape = getattr(weight, "shape", None)
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return f"a {type(weight).__name__} of shape {tuple(shape)}"
    return f"a {type(weight).__name__}"


# what a site is told beside the abort reasons whose cause it can act on (the aggregator's
# log says which; the reason alone named none)
_ABORT_HINTS = {
    "AGGREGATE_OUT_OF_RANGE": (
        "as the aggregator reports it: the round's sum is beyond what clipped updates make "
        "(a site past its clip) or, "
        "under CKKS, its weight sum too small for the key holder's release noise ([update] "
        "max_samples far above the sites' sample counts); no site sends twice against one "
        "model, so a round from the same model cannot follow"),
    "TOO_FEW_SURVIVORS": ("as the aggregator reports it: fewer sites than the federation's "
                          "threshold took part in time"),
}


def _explained(reason: str) -> str:
    """An aborted round's reason as the aggregator gave it, with what it means when it is
    one of _ABORT_HINTS' (the aggregator's text is shown as it is, never interpreted)."""
    hint = _ABORT_HINTS.get(reason)
    # defence: sdk.abort-reasons-explained
    return reason if hint is None else f"{reason} ({hint})"


def _warn_weight_below_release(config: FederationConfig, samples: float, sites: int,
                               learned: int, said: set[str]) -> None:
    """Warn when a CKKS round of the fewest sites a release takes (``min_sites``),
    each with this site's weight, would be refused by its key holder: its weight sum below
    the least whose release noise stays under a tenth of the clip. The README's advice for
    a sensitive sample count, weight=1, under the default max_samples of 10,000, did just
    that: every site spent round 1, the key holder refused it, and no site could send
    again against the job's model (one update per model), so the job ended after its first
    round. The fewest sites are the worst case: the least weight sum grows more slowly
    than the number of sites (a round a dropout took down to them was refused, where one
    of the whole roster was not)."""
    from secagg.ckks.presets import MAX_NOISE_SHARE, PRESETS, least_weight_sum
    from secagg.ckks.release import least_l2_weight_sum, release_noise_share
    from secagg.ckks.round import check_round_parameters

    fewest = check_round_parameters(sites, **config._ckks_parameters())
    params, clip = PRESETS[config.preset], config.clip_norm
    per_value = least_weight_sum(params, fewest, clip)
    least = max(per_value, least_l2_weight_sum(params, fewest, clip, max(learned, 1)))
    total = samples / config.max_samples * fewest
    # defence: sdk.small-ckks-weight-warned
    if total >= least:
        # taken, but with release noise (at its tail) of MAX_NOISE_SHARE of the clip at the
        # least weight sum, shrinking as the sum grows: cohorts of 34-54 samples under the
        # default max_samples came out 11-27% off FedAvg, with no word. The share of the
        # clip, in each value or over the update, whichever is larger (the element bound is
        # held to min(clip, 1): relative to a larger clip, less)
        share = max(release_noise_share(params, fewest, clip, total, max(learned, 1)),
                    MAX_NOISE_SHARE * per_value * min(clip, 1.0) / clip / total)
        # defence: sdk.noisy-ckks-weight-said
        if share <= NOISE_WARN_SHARE or "noise" in said:
            return
        said.add("noise")
        _log.warning(
            f"weight {samples:g} is light for [update] max_samples {config.max_samples:g}: in "
            f"a round of {fewest} sites this light the released average carries CKKS release "
            f"noise of up to about {100 * share:.2g}% of [update] clip_norm (less with more "
            "or heavier sites); keep max_samples near the sites' sample counts (said once)")
        return
    if "refused" in said:
        return
    said.add("refused")
    _log.warning(
        f"weight {samples:g} is small for [update] max_samples {config.max_samples:g}: a "
        f"round of {fewest} sites (the fewest the key holder releases) each this light would "
        f"be refused (its weight sum under {least * config.max_samples:.3g} samples: the "
        "release noise would swamp the average), and a refused round ends the job (no site "
        "sends twice against one model); keep max_samples near the sites' sample counts "
        "(weight=1 at every site: max_samples = 1)")


def _warn_diverged(model: FlatModel, delta: np.ndarray, norm: float, clip: float,
                   round_id: str, warned: set[str]) -> None:
    """Warn (naming the tensors that make most of it, not the norm: the update's) when the
    update is longer than DIVERGED_CLIP_FACTOR times the clip: finite but diverged values
    (1e30 in a float32 layer), or float buffers at a raw scale (BatchNorm's running variance
    of unnormalised inputs), went out clipped, scaling every learned change down to almost
    nothing, with no word. Once a site (``warned``): such buffers do so every round."""
    if not norm > DIVERGED_CLIP_FACTOR * clip or "" in warned:
        return
    warned.add("")
    counters = model.integer_positions  # (left out of the norm: clients.tensors.clip_l2)
    shares, pos = [], 0
    for t in model.spec:
        end = pos + t.size
        part = delta[pos:end][~counters[pos:end]]
        shares.append((float(np.dot(part, part)) if part.size else 0.0, t.name[:64]))
        pos = end
    top = [name for share, name in sorted(shares, reverse=True)[:3] if share > 0]
    _log.warning("round %s: the update's L2 norm is more than %g times [update] clip_norm, "
                 "most of it in %s; it goes out clipped to clip_norm, which scales every "
                 "change down with it (diverged training, or float buffers at a raw scale "
                 "such as BatchNorm's running statistics of unnormalised inputs? said once)",
                 round_id, DIVERGED_CLIP_FACTOR, top)


# CKKS: release noise (at its tail, in each value) above this share of the clip is said
NOISE_WARN_SHARE = 0.01
# an update longer than this many times [update] clip_norm is told in the log (once): it goes
# out scaled down by more than half, and the round averages clipped updates, not FedAvg's
CLIPPED_WARN_FACTOR = 2.0


def _warn_clipped(norm: float, clip: float, round_id: str, warned: set[str]) -> None:
    """Warn, once a site (``warned``), when the update goes out scaled down by more than
    half (its L2 norm more than CLIPPED_WARN_FACTOR times the clip: not the norm itself,
    the update's): with the default clip_norm of 1, ordinary training (updates of norm 2 to
    6) was scaled by 0.16-0.5 with no word, and the result was far from plain FedAvg. Left
    to _warn_diverged past DIVERGED_CLIP_FACTOR."""
    if not CLIPPED_WARN_FACTOR * clip < norm <= DIVERGED_CLIP_FACTOR * clip or "\0clip" in warned:
        return
    warned.add("\0clip")  # (no tensor's name: those are in the same set)
    _log.warning("round %s: the update's L2 norm is more than %g times [update] clip_norm "
                 "(%g); it goes out scaled down to clip_norm, so the round averages clipped "
                 "updates, not plain FedAvg's. If that is not meant, raise clip_norm near "
                 "your updates' size in every party's config (federation init --clip-norm, or "
                 "edit and federation sign-config) (said once)", round_id,
                 CLIPPED_WARN_FACTOR, clip)


def _warn_capped_counters(model: FlatModel, delta: np.ndarray, clip: float,
                          round_id: str, warned: set[str]) -> None:
    """Warn (naming the tensors, not their values) when an integer tensor changed by more
    than ``clip`` at some entry: the protocols encode each value within [-clip, clip], so
    that change is capped in the average (a step counter that grows faster lags behind).
    Once per tensor (``warned``: those already named): a counter does so every round."""
    counters = model.integer_positions
    if not counters.any():
        return
    names, pos = [], 0
    for t in model.spec:
        end = pos + t.size
        if (t.name not in warned and counters[pos:end].any()
                and np.any(np.abs(delta[pos:end]) > clip)):
            names.append(t.name[:64])
            warned.add(t.name)
        pos = end
    if names:
        _log.warning("round %s: integer tensors %s changed by more than [update] clip_norm "
                     "(%g) this round; each value's change is capped at it in the average "
                     "(the range the protocols encode), so they lag behind; and an average "
                     "change under half a unit rounds to none (with clip_norm below 0.5 they "
                     "never change) (said once)",
                     round_id, names[:5], clip)


def _check_options(workers: object, training_dtype: object) -> None:
    if type(workers) is not int or workers < 1:
        raise ConfigurationError(f"workers must be an integer >= 1, got {workers!r}")
    if training_dtype is not None and (not isinstance(training_dtype, str)
                                       or training_dtype not in TRAINING_FLOATS):
        raise ConfigurationError(f"training_dtype must be one of "
                                 f"{sorted(TRAINING_FLOATS)} or None, got {training_dtype!r}")


def check_used_before(kit: SiteKit, history_dir: str | Path | None = None) -> None:
    """Refuse a site directory whose roster or signed settings are older than (or another
    than, at the same version or serial) what this site has used: its history's record
    (``History.check_federation``, kept in ``history_dir``, by default the directory)."""
    History(history_dir if history_dir is not None else kit.directory).check_federation(
        kit.config.trust_root, kit.roster.version, kit.roster.digest, kit.settings_serial,
        kit.config.signed_settings_digest())


class Site:
    _closed = False  # (set by close)
    _claim: DirectoryClaim | None = None  # (set by connect: clients.history.claim_directory)

    def __init__(self, kit: SiteKit, connection: Connection, *, tensors_kind: str = "auto",
                 progress: Progress | None = None, workers: int = 1,
                 history_dir: str | Path | None = None,
                 training_dtype: str | None = None) -> None:
        _check_options(workers, training_dtype)
        self.training_dtype = training_dtype
        self.kit = kit
        # integer tensors warned of (_warn_capped_counters), and "" once an update far past
        # the clip was (_warn_diverged)
        self._capped_warned: set[str] = set()
        # (_warn_weight_below_release: what it said, each once: "refused", "noise")
        self._weight_warned: set[str] = set()
        self.workers = workers  # CKKS: processes to encrypt with, and (key holder) to release
        self.site_id = kit.site_id
        self.config = kit.config
        self._conn = connection
        self._tensors = tensors_kind
        self._progress = progress_guarded(progress)
        self._last_round = 0
        # the round last handed to the training script, until it is submitted to: offered
        # again by the next rounds() (or aggregate()) while it is still running
        self._pending: Round | None = None
        self._model_digest: bytes | None = None  # the model this site holds (last result)
        self._held_round = 0  # the round whose result (or starting model) that is
        # the names, shapes and dtypes of the job's models, once this process has held one:
        # every later model and result is fetched only if it has them (a result claiming
        # 1e8 float64 values, its blob one 4 MiB chunk named 200 times, cost 1.6 GB)
        self._spec: tuple[Any, ...] | None = None
        # the model this process holds (the result it took, or the round's it joined): a
        # round that starts from it is not fetched again (every site fetched each round's
        # model twice, as the last round's result and as this one's model: a site on a slow
        # link that could fetch it once in the open deadline missed every round after the first)
        self._held_model: FlatModel | None = None
        self._refused_beyond = False  # a running round past [job] rounds was refused
        # what a "nothing new" answer may hold unpaced: the last round's info as joined
        self._poll_allowance = POLL_SLACK_BYTES
        self._history = History(history_dir if history_dir is not None
                                else getattr(kit, "directory", None))
        # a kept round key whose round's time is over goes (its site was away as it ended)
        # defence: sdk.connect-drops-expired-keys
        self._history.drop_expired_keys()
        # a restarted training script holds what the last one held (clients.history)
        # defence: sdk.held-model-survives-restart
        held = self._history.held(self.config.job_id)
        if held is not None:
            self._held_round, self._model_digest = held
        elif self.config.initial_model_digest is not None:
            # a site that holds nothing yet holds the job's first model, as its config names
            # it: round 1 must start from it, and a later round must follow from it
            # defence: sdk.first-model-pinned
            self._model_digest = self.config.initial_model_digest

    @classmethod
    def connect(cls, site_dir: str | Path, *, tensors: str = "auto",
                progress: Progress | None = None, retry_seconds: float = 300.0,
                workers: int = 1, history_dir: str | Path | None = None,
                training_dtype: str | None = None) -> Site:
        """Load the site's directory (keys, certificates, signed roster, config) and connect.
        ``workers``: processes for CKKS encryption and, at the key holder, for verifying and
        releasing (CKKS work is CPU-bound and TenSEAL holds the GIL; a training script that
        calls this must then guard its entry point with ``if __name__ == "__main__":``).
        ``history_dir``: where the record of rounds sent to is kept (default: the site
        directory; give a writable one when that is mounted read-only, and keep it across
        restarts). ``training_dtype``: the float precision training computes in when it is
        coarser than the state dict's tensors ("bfloat16" or "float16" under
        ``torch.autocast``; a bfloat16 or float16 state dict says so itself): a site sends
        one update per model as training reads it, so a model moved below that precision
        is the model it already sent against."""
        # A worker process (workers > 1: started with spawn) imports the training script
        # again as it starts; unguarded, the copy ran the script as another instance of this
        # site: it spent later rounds in history.json, announced keys, and the parent hung
        # in encryption until the round aborted. The copy is refused here, which stops it.
        # defence: sdk.not-in-a-starting-worker
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            raise WorkersFailed(f"Site.connect was called by a worker process as it started: "
                                f"{WORKERS_GUARD_HINT}")
        # (checked before anything is loaded or dialled: workers=0 or "2" was taken, and a
        # CKKS site refused it only after spending its round, blaming the aggregator)
        # defence: sdk.site-options-checked-first
        if tensors not in ("auto", "numpy", "torch"):
            raise ConfigurationError(
                f"tensors must be 'auto', 'numpy' or 'torch', got {tensors!r}")
        _check_options(workers, training_dtype)
        progress_guarded(progress)  # (checked before anything is dialled)
        kit = SiteKit.load(site_dir)
        # with no first model pinned, the aggregator chose the model every site starts from
        # (an operator who added [job] initial_model to the aggregator's config only had
        # every site train from a model of its choosing, unwarned)
        # defence: sdk.first-model-required
        if kit.config.initial_model_digest is None:
            raise ConfigurationError(
                f"{Path(site_dir) / 'federation.toml'} pins no [job] initial_model_digest: the "
                "aggregator would choose the model this site starts from; ask the federation's "
                "operator for it (secagg federation init --model writes it)")
        # settings the roster cannot take (a threshold above its size, a SecAgg+ degree too
        # small for it, a key holder not on it) were found at the first submit, after the
        # round was spent, and told as "this site refused the aggregator's messages"
        # defence: sdk.masking-settings-checked-at-connect
        try:
            kit.config.check_fits_roster(kit.roster)
        except ConfigurationError as e:
            raise ConfigurationError(f"{Path(site_dir) / 'federation.toml'}: {e}") from None
        # (before anything is dialled: clients.history.History.check_federation)
        # defence: sdk.connect-checks-the-roster-version
        check_used_before(kit, history_dir)
        # a second process on the directory is told now, not at its first submit (after a
        # round's training for nothing)
        # defence: sdk.site-directory-claimed-beside-its-history
        claim = claim_directory(history_dir if history_dir is not None else kit.directory,
                                also=kit.directory)
        try:
            site = cls(kit, Connection(kit, retry_seconds=retry_seconds), tensors_kind=tensors,
                       progress=progress, workers=workers, history_dir=history_dir,
                       training_dtype=training_dtype)
        except BaseException:
            claim.release()
            raise
        site._claim = claim
        weakref.finalize(site, claim.release)  # (a Site let go unclosed lets it go too)
        return site

    def close(self) -> None:
        self._closed = True
        self._conn.close()
        if self._claim is not None:
            self._claim.release()

    def _check_open(self) -> None:
        # (grpc's error is a ValueError from deep inside, which the SDK then took for the
        # aggregator's doing)
        # defence: sdk.closed-site-named
        if self._closed:
            raise SiteError(CLOSED)

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Site(site_id={self.site_id}, federation={self.config.name!r})"

    # ---- rounds --------------------------------------------------------------------------------

    def rounds(self) -> Iterator[Round]:
        """The job's rounds as they open, until the job is done. A round this site already
        sent to (a training script restarted mid-round) is skipped with a warning: the site
        takes part from the next one. A round handed out before and not submitted to (a
        wrong argument refused, before anything was sent) is handed out again first, while
        the aggregator still runs it."""
        self._check_open()
        # (the round had been passed: aggregate() called again after a refused argument
        # waited for the next round while this one waited for this site, until its deadline)
        # defence: sdk.unsubmitted-round-offered-again
        pending, self._pending = self._pending, None
        if pending is not None and not pending._submitted and self._still_running(pending):
            self._pending = pending
            yield pending
        while True:
            info = self._next_round_info()
            # a kept round key of a round that ended while this site was away (or of the
            # job, now done) goes: keys are for their round only
            # (only for a round of this job as its config names it: a round 0 or one past the
            # job, which the site refuses below, took the key holder's kept key of the round
            # it runs, and a restart then announced a second key for it)
            # defence: sdk.polls-drop-stale-keys, sdk.refused-rounds-keep-the-key
            if info is None or (0 < info.round <= self.config.rounds
                                and self._is_own_round(info)):
                self._history.drop_stale_key(self.config.job_id,
                                             int(info.round) if info is not None else 0)
            if info is None:
                return
            spent = self._history.check(self.config.job_id, int(info.round))
            # (only a round of this job is skipped as spent: another's is refused)
            # defence: sdk.only-own-rounds-skipped-as-spent
            if spent and self._is_own_round(info):
                # defence: sdk.key-holder-restart-releases-its-round
                if self._resume_release(info):
                    continue
                _log.warning("skipping round %s: %s", info.round_id, spent)
                continue
            try:
                rnd = self._join(info)
            except SiteError:
                raise
            # defence: sdk.lies-are-refusals-join
            except Exception as e:  # what the aggregator sent does not hold, whatever raised
                raise RoundAborted(info.round_id, f"this site refused the round: {_why(e)}"
                                   ) from None
            if rnd is not None:
                self._pending = rnd
                yield rnd

    def _still_running(self, rnd: Round) -> bool:
        """Whether the aggregator still runs ``rnd`` (asked, not waited for)."""
        info: service_pb2.RoundInfo = self._conn.call(
            "GetRound", service_pb2.GetRoundRequest(after_round=rnd.number - 1, wait_ms=0),
            timeout=30)
        return (info.status == _RUNNING and info.round == rnd.number
                and info.round_id == rnd.round_id)

    def _is_own_round(self, info: service_pb2.RoundInfo) -> bool:
        try:
            self.config.check_round_id(info.round_id, int(info.round))
        except ConfigurationError:
            return False
        return True

    # defence: sdk.aggregate-leaves-no-locals
    @scrubs_locals  # (its frame holds the state dict: hazmat.secret.scrub_locals)
    def aggregate(self, state_dict: Mapping[str, Any], weight: float) -> dict[str, Any]:
        """One round: send ``state_dict`` (against the round's model) and return the average."""
        for rnd in self.rounds():
            return rnd.submit(state_dict, weight)
        raise SiteError("the job is over: no round to take part in")

    def _next_round_info(self) -> service_pb2.RoundInfo | None:
        pacer = _Pacer(self._poll_allowance)
        while True:
            began = time.monotonic()
            info: service_pb2.RoundInfo = self._conn.call(
                "GetRound", service_pb2.GetRoundRequest(after_round=self._last_round,
                                                        wait_ms=POLL_MS),
                timeout=POLL_MS / 1000 + 30)
            if info.status == service_pb2.ROUND_STATUS_JOB_DONE:
                # a job that ends before its last round (rounds aborted, or withheld: an
                # aggregator can always stop) is said, not taken as a job done: the site's
                # training script would run its "training finished" path with an early model
                # defence: sdk.early-job-end-said
                if self._held_round < self.config.rounds:
                    # (what the model is, not which round's: the model a round n started
                    # from was called "round n-1's result" when round n-1 had aborted, and
                    # read as rounds trained; an outside tester)
                    first = (self._held_round == 0
                             or self._model_digest == self.config.initial_model_digest)
                    _log.warning(
                        "the aggregator says job %s is over after %d of its %d rounds for "
                        "this site, which holds %s: the rounds after it aborted, were not "
                        "run, or ran without this site",
                        self.config.job_id, self._held_round, self.config.rounds,
                        "the job's first model (no round's result)" if first
                        else "the result of the last round it saw complete")
                return None
            # nothing new yet; or a round this site already passed, running or finished (an
            # honest aggregator answers rounds after ``after_round`` only: a lying one
            # announcing the round the site skipped, at once, again and again, had it spin
            # and log a warning each time), or a finished round beyond the job's rounds
            # (neither is news: the site still waits for its next round; a running round is
            # checked as it is joined)
            # defence: sdk.passed-rounds-are-not-news
            if (info.status == service_pb2.ROUND_STATUS_UNSPECIFIED
                    or (info.status != _RUNNING
                        and not self._last_round < info.round <= self.config.rounds)
                    or (info.status == _RUNNING and 0 < info.round <= self._last_round)):
                pacer.nothing_new(began, info.ByteSize())
                continue
            # a running round beyond the job's rounds is refused as it is joined (the first
            # one: later ones are not news), and is not a round this site passed: it made
            # 2**64-1 the round the site waits after, and the site never joined another
            # round of the job (its script catching RoundAborted polled for ever). So is a
            # running round 0 (no round of a job: refused, and then no news): answered at
            # once, again and again, it had a script catching RoundAborted take it unpaced
            # (3 GB in 20 s, padded to the message limit)
            # defence: sdk.rounds-beyond-the-job-not-passed
            # defence: sdk.round-zero-not-news
            if info.status == _RUNNING and not 0 < info.round <= self.config.rounds:
                if self._refused_beyond:
                    pacer.nothing_new(began, info.ByteSize())
                    continue
                self._refused_beyond = True
                return info
            self._last_round = max(self._last_round, info.round)  # (round 0 is refused)
            if info.status == _RUNNING:
                return info

    def _join(self, info: service_pb2.RoundInfo) -> Round | None:
        # What the round is comes from this site's own configuration, never from the
        # aggregator's announcement: the protocol (a masking federation run as CKKS would
        # hand the updates to a key holder, with none of masking's checks) and the round's
        # id (federation, job, number within [job] rounds). (rounds() skipped a round this
        # site already sent to: clients.history.)
        number, round_id = int(info.round), info.round_id
        # (a diagnostic: see FederationConfig.settings_digest)
        theirs = bytes(info.settings_digest)
        # defence: sdk.settings-digest-compared
        if theirs and theirs != self.config.settings_digest():
            raise RoundAborted(round_id, (
                "this site's federation.toml differs from the aggregator's in a setting every "
                "party must share (the protocol, [federation] name, [job] id, [update] "
                "clip_norm or max_samples, [masking], [ckks]): make it the federation's"))
        # (a diagnostic too: a site whose roster is older than the aggregator's, after
        # `federation sign` added or removed a site, was refused as "invalid signature")
        # defence: sdk.roster-digest-compared
        theirs = bytes(info.roster_digest)
        if theirs and theirs != self.kit.roster.digest:
            mine = self.kit.roster.version
            raise RoundAborted(round_id, (
                f"this site's roster (version {mine}) is not the aggregator's (version "
                f"{int(info.roster_version)}): copy the federation's current roster.bin into "
                "this site's directory" + (" (the federation signed a newer one)"
                                           if int(info.roster_version) > mine else "")))
        # defence: sdk.protocol-pinned
        if info.protocol != _PROTOCOLS[self.config.protocol]:
            raise RoundAborted(round_id, f"the aggregator runs this round as another protocol "
                                         f"than this federation's ({self.config.protocol})")
        try:
            self.config.check_round_id(round_id, number)
        except ConfigurationError as e:
            raise RoundAborted(round_id, str(e)) from None
        digest = bytes(info.model.digest)
        # defence: sdk.model-follows-held
        if self._model_digest is not None and digest != self._model_digest:
            self._follow_chain(info.round, digest)
        model = self._round_model(info.model)
        self._spec, self._held_model = model.spec, model
        # one update per model (clients.history): the aggregator reported a round this site
        # sent to as aborted, or published its model again as its result, or led the model
        # back to it (or to a re-encoding of it: the check is on what training sees), and
        # opens another from it: a second update against it would let it subtract two
        # rounds' sums that differ by one site (checked again, under the lock, as the update
        # is recorded before it leaves)
        # (and by the digest sites recorded before integer tensors were left out of it: a
        # model sent against before an upgrade is the same model after it)
        sent = (self._history.sent_against(model.training_digest)
                # defence: sdk.one-update-per-model-legacy-records
                or self._history.sent_against(model.legacy_training_digest))
        # defence: sdk.one-update-per-model
        if sent is not None and sent != (self.config.job_id, number):
            raise RoundAborted(round_id, one_update_per_model(
                sent, "the model this round starts from"))
        self._held_round = info.round - 1
        self._model_digest = model.digest
        rnd = Round(self, info, model)
        self._poll_allowance = rnd._poll_allowance
        if (info.protocol == service_pb2.PROTOCOL_CKKS
                and self.config.key_holder_for(rnd.number) == self.site_id):
            kept = self._history.load_key(self.config.job_id, round_id)
            announced = (bytes(info.ckks_key.announcement.key_id)
                         if info.HasField("ckks_key") else None)
            # defence: sdk.restarted-holder-takes-up-its-kept-key
            if kept is not None and announced == kept.key_id:
                # announced before a restart, and kept: it goes on
                _log.warning("round %s: this key holder restarted after announcing its key "
                             "(or another process uses this site directory: one Site per "
                             "site directory); it takes part with the key it kept", round_id)
                rnd._key = kept
                return rnd
            # a round has one key of this holder's, the one it keeps: a restarted script
            # shown the round without it (or with another) made a second, and a lying
            # aggregator that took both released the round under each, over two sets of
            # sites, the second by the restart after (a helper's finding). So the kept key
            # is announced again (the same announcement: its first may never have arrived),
            # and a round announcing another key, or a key the directory may keep for it
            # (another process's), is skipped
            # defence: sdk.one-key-per-round-at-the-holder
            if kept is not None and announced is not None:
                _log.warning("skipping round %s: it announces another key than the one this "
                             "key holder keeps for it", round_id)
                return None
            try:
                # defence: sdk.kept-key-announced-again
                rnd._announce_key(kept)
            except AnotherKeyKept as e:
                _log.warning("skipping round %s: this key holder's directory keeps another "
                             "key for it (%s)", round_id, e)
                return None
            except AggregatorRefused as e:
                # the round has a key already: this key holder's own, announced before its
                # training script restarted, whose secret key went with that process (not
                # kept: no history directory, or it could not be written, or it is another
                # key); no one can release this round, so it is skipped here, not raised at
                # every restart until the round's deadline
                # defence: sdk.key-holder-restart-skips-the-round
                if e.code != "FAILED_PRECONDITION":
                    raise
                _log.warning("skipping round %s: the aggregator refused this key holder's "
                             "key (%s): a key it announced before a restart is lost, and "
                             "this round cannot be released", round_id, e.reason)
                return None
        return rnd

    def _kept_key(self, info: service_pb2.RoundInfo) -> KeyHolder | None:
        """The key this key holder kept for the round, if it is the key the round announces
        (clients.history.History.keep_key)."""
        key = self._history.load_key(self.config.job_id, info.round_id)
        if key is None or not info.HasField("ckks_key"):
            return None
        # defence: sdk.kept-key-is-the-rounds
        if bytes(info.ckks_key.announcement.key_id) != key.key_id:
            return None
        return key

    @scrubs_locals  # (the kept key, and the release's decrypted sum below it)
    def _resume_release(self, info: service_pb2.RoundInfo) -> bool:
        """A CKKS key holder whose training script restarted after it sent its update (the
        round is spent in its history) releases the round with the key it kept: the round,
        and every site's update against its model, was lost. True if it took this up."""
        number = int(info.round)
        if (info.protocol != service_pb2.PROTOCOL_CKKS
                or self.config.key_holder_for(number) != self.site_id):
            return False
        key = self._kept_key(info)
        if key is None:
            return False
        held = self._history.held(self.config.job_id)
        # (the model it sent against is the round's: spend recorded it as held)
        # defence: sdk.resumed-release-of-the-model-sent-against
        if held is None or held != (number - 1, bytes(info.model.digest)):
            # (a round it cannot release: its key goes)
            self._history.drop_key(self.config.job_id, info.round_id, key.key_id)
            return False
        _log.warning("round %s: this key holder restarted after sending its update (or "
                     "another process uses this site directory: one Site per site "
                     "directory); it releases the round with the key it kept", info.round_id)
        try:
            model = self._download_model(info.model, "model", self._spec)
            if model.digest != held[1]:
                raise ModelMismatch("the round's model is not the one this site sent against")
            self._spec = model.spec
            announcement = wire.announcement_from_proto(info.ckks_key.announcement)
            config = self.config.ckks_round(number, info.round_id, self.kit.roster,
                                            announcement, model.size,
                                            model_digest=model.digest)
            rnd = Round(self, info, model)
            rnd._key, rnd._submitted = key, True
            rnd._release(config)
            end = rnd._wait_for_end()
            rnd.result = self._accept_result(end, model, rnd._released, None)
        except WorkersFailed:
            self._history.drop_key(self.config.job_id, info.round_id, key.key_id)
            raise
        # (a refusal, a release the aggregator counted before the restart, a round that
        # ended meanwhile: the site goes on to the next round, whose model it checks by the
        # chain of rounds, this one's signed result included)
        except Exception as e:
            _log.warning("round %s: the release after a restart did not complete: %s",
                         info.round_id, _why(e))
        # (not on Ctrl-C: the next restart takes it up again)
        # defence: sdk.resumed-release-drops-its-key
        self._history.drop_key(self.config.job_id, info.round_id, key.key_id)
        return True

    def _follow_chain(self, round_number: int, digest: bytes) -> None:
        """This site missed rounds (it dropped out, or joined late): accept the new model only
        if the rounds in between lead from the model it holds to it, each starting from the
        previous one's result (or, if it aborted, from the same model).

        The past rounds are read one at a time and only what the checks need is kept of each
        (its id and its two models' chunk lists and digests; their names, shapes and dtypes
        once, as every one must have the same): a lying aggregator padding each of a
        100-round job's answers to the message limit had a site hold them all, 9 MB a round,
        before checking any. And the walk as a whole has the round's patience (a step begun
        within it is finished): each answer held for a minute kept a site in it for hours."""
        current = self._model_digest
        # completed masking rounds, steps to check: (round id, model, result), the models
        # without their specs (``spec`` below)
        moved: list[tuple[str, service_pb2.Model, service_pb2.Model]] = []
        spec: tuple[Any, ...] | None = self._spec
        spec_proto: service_pb2.Model | None = None  # (a model holding only that spec)
        most = ids = 0  # (the most bytes and chunk ids a model of that spec has)
        # defence: sdk.missed-rounds-walk-bounded-in-time
        patience = _round_patience(self.config)
        end = time.monotonic() + patience

        def time_left() -> float:
            left = end - time.monotonic()
            if left <= 0:
                raise ModelMismatch(
                    f"the aggregator took longer than a round's patience ({patience:.0f} s) "
                    f"to show the rounds between the model this site holds (of round "
                    f"{self._held_round}) and round {round_number}'s")
            return left

        for j in range(self._held_round + 1, round_number):
            left = time_left()
            past: service_pb2.RoundInfo = self._conn.call(
                "GetRound", service_pb2.GetRoundRequest(after_round=j - 1, wait_ms=0),
                timeout=min(getattr(self._conn, "call_timeout", 60.0), left))
            # defence: sdk.missed-round-starts-from-held
            if past.round != j or bytes(past.model.digest) != current:
                break
            # the round's own id (federation, job, number): a key holder's signature of
            # another job's round 1 from the same model passed for this job's
            # defence: sdk.missed-rounds-named-by-this-config
            try:
                self.config.check_round_id(past.round_id, j)
            except ConfigurationError:
                break
            # defence: sdk.missed-round-moves-only-if-completed
            if past.status == service_pb2.ROUND_STATUS_COMPLETED:
                if self.config.protocol == "masking":
                    # every model of the job has the names, shapes and dtypes of the first
                    # (checked again as each is fetched): kept once, not once a round
                    kept = []
                    for m in (past.model, past.result):
                        if spec_proto is None:
                            spec_proto = service_pb2.Model(spec=m.spec)
                            spec = spec if spec is not None else wire.spec_from_proto(m.spec)
                            most = max(FlatModel.encoded_sizes(spec))
                            ids = -(-most // SDK_CHUNK_BYTES) + 1
                        # (and of no more chunks, bytes or digest than such a model has: a
                        # step is kept until the walk's end, and padded it held 8 MB a round)
                        # defence: sdk.missed-rounds-kept-small
                        if (m.spec != spec_proto.spec or len(m.data.chunk_ids) > ids
                                or m.data.size > most or len(m.digest) != 32):
                            raise ModelMismatch(
                                f"missed round {j}'s model is not a model of the job's names, "
                                "shapes and dtypes")
                        kept.append(service_pb2.Model(digest=m.digest, data=service_pb2.Blob(
                            chunk_ids=m.data.chunk_ids, size=m.data.size)))
                    moved.append((past.round_id, kept[0], kept[1]))
                # a CKKS round this site missed: its result is the one the key holder signed
                # defence: sdk.missed-ckks-results-signed
                if self.config.protocol == "ckks":
                    self._check_result_signature(past, current, bytes(past.result.digest))
                current = bytes(past.result.digest)
            del past  # (one answer held at a time)
        # defence: sdk.model-follows-held-across-missed-rounds
        if current != digest:
            raise ModelMismatch(
                f"round {round_number} starts from model {digest.hex()[:16]}, which does not "
                f"follow from the model this site holds ({(self._model_digest or b'').hex()[:16]})")
        # the chain holds by its digests (nothing fetched for one that does not); then each
        # masking round this site did not see end (it missed it, was told it dropped out or
        # that the round aborted, or restarted) moved the model no further than an honest
        # round's step can (the public bound: an aggregator claimed a round 1 that led from
        # the pinned first model to any model it liked, and a late site took it)
        fetched: FlatModel | None = None  # the last round's result, which the next starts from
        for round_id, start, result in moved:
            # (the downloads too: each step's two at the slowest link's pace, up to 300 s
            # and more each, kept a site in a walk of 100 rounds for 8 hours)
            # defence: sdk.missed-rounds-downloads-in-the-walks-time
            time_left()
            assert spec_proto is not None
            start.spec.extend(spec_proto.spec)
            result.spec.extend(spec_proto.spec)
            try:
                model = (fetched if fetched is not None and fetched.digest == bytes(start.digest)
                         else self._download_model(start, "model", self._spec))
                # (a result of the round's names, shapes and dtypes, or nothing is fetched)
                fetched = self._download_model(result, "result", model.spec)
            except InvalidMessage as e:
                raise ModelMismatch(f"missed round {round_id}: its model or result does not "
                                    f"hold ({e})") from None
            self._spec = model.spec
            del start.spec[:], result.spec[:]  # (one step's specs held at a time)
            # defence: sdk.missed-round-in-the-sum-bounded
            self._check_masked_step(model, fetched, self._public_bound(round_id, model))

    def _public_bound(self, round_id: str, model: FlatModel) -> AverageBound:
        """The bound every site of masking round ``round_id`` holds its average to."""
        config = self.config.masking_round(round_id, self.kit.roster, model.size,
                                           model_digest=model.digest)
        return _masked_average_bound(config.quantizer,
                                     int(np.count_nonzero(~model.integer_positions)))

    def _round_model(self, p: service_pb2.Model) -> FlatModel:
        """The model a round starts from: the one this process holds if it is that model
        (its digest binds its names, shapes, dtypes and values, and nothing has written into
        them since: rnd.result is the caller's), else fetched."""
        held = self._held_model
        # defence: sdk.held-model-not-fetched-again
        if (held is not None and bytes(p.digest) == held.digest
                # defence: sdk.held-model-intact
                and held.digest_now() == held.digest):
            return held
        return self._download_model(p, "model", self._spec)

    def _download_model(self, p: service_pb2.Model, what: str,
                        expected: tuple[Any, ...] | None = None) -> FlatModel:
        """A published model, its size bounded by its spec before a byte is fetched; with
        ``expected``, only a model of those names, shapes and dtypes is fetched at all."""
        spec = wire.spec_from_proto(p.spec)
        # the new model has the names, shapes and dtypes of the round's (the README's
        # promise), checked before its bytes are: a result's size is the model's
        # defence: sdk.result-spec-kept
        if expected is not None and spec != expected:
            raise ModelMismatch(f"the round's {what} is not a model of the round's names, "
                                "shapes and dtypes")
        length = sum(t.size for t in spec)
        # defence: sdk.model-download-bounded
        if length > self.config.limits.max_vector_length:
            raise AnswerRefused("OUT_OF_RANGE", f"the aggregator named a {what} of {length} "
                                                "values ([limits] max_vector_length)")
        # a model of no expected spec (the first this process fetches) is as large as the
        # aggregator says: its digest is checked before it is built, so that one chunk named
        # many times makes no site build a model of 10^8 values to refuse it
        # defence: sdk.unsized-model-checked-before-built
        check = None if expected is not None else (
            lambda parts: wire.check_model_parts(p, spec, parts))
        # defence: sdk.model-download-sized
        data = self._conn.download(wire.Blob.from_proto(p.data), progress=self._progress,
                                   what=what, max_size=max(FlatModel.encoded_sizes(spec)),
                                   check=check)
        return wire.model_from_proto(p, data)

    def _signable_result(self, model: FlatModel, released: Any, params: Any,
                         round_id: str) -> FlatModel | None:
        """The model a CKKS release (this key holder's) makes, if this site signs it: None
        for a release the aggregator's L2 check refuses (longer than the clip allows, or
        mostly noise: secagg.ckks.release.check_released_norm), checked here where a lying
        aggregator cannot skip it, or for one that takes a value out of its tensor's range
        (no honest release makes either)."""
        counters = model.integer_positions
        average = np.asarray(released.average, dtype=np.float64)
        learned = average[~counters] if counters.any() else average
        try:
            # defence: sdk.key-holder-checks-the-released-norm
            check_released_norm(params, len(released.sites), self.config.clip_norm,
                                released.weight_sum, l2_norm(learned),
                                int(learned.size))
            return self._result_of(model, average)
        except ProtocolAbort as e:
            _log.warning("round %s: this key holder does not sign the round's result: %s",
                         round_id, e)
        except (ValueError, ConfigurationError):
            _log.warning("round %s: this key holder does not sign the round's result: the "
                         "average takes a value out of its tensor's range (a site's update "
                         "past its limits: the round aborts as out of range)", round_id)
        return None

    def _result_of(self, model: FlatModel, average: np.ndarray) -> FlatModel:
        """The model a round's average makes, as the aggregator makes it (Job._next_model)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return model.with_values(model.values + self.config.server_learning_rate * average)

    def _check_result_signature(self, info: service_pb2.RoundInfo, model_digest: bytes,
                                result_digest: bytes) -> None:
        """A CKKS round's result is the one its key holder (named by this site's config, its
        key from the signed roster) signed: the model its release makes. Only the key holder
        and the aggregator see the average; before, the other sites took any model a lying
        aggregator published, so long as its digest matched its bytes."""
        holder = self.config.key_holder_for(int(info.round))
        # defence: sdk.ckks-result-signed-by-the-key-holder
        try:
            wire.verify_result(self.kit.roster[holder], bytes(info.result_signature),
                               round_id=info.round_id, model_digest=model_digest,
                               result_digest=result_digest)
        except (InvalidMessage, KeyError):
            raise ModelMismatch(f"round {int(info.round)}'s result is not the one its key holder "
                                f"(site {holder}) signed") from None

    def _check_masked_step(self, model: FlatModel, result: FlatModel,
                           bound: AverageBound) -> None:
        """Masking: no site sees the sum, so none can check the result to the bit; but the
        average of clipped updates is at most ``bound`` from zero (a site whose input is in
        it), so the result is at most the server learning rate times that from the round's
        model, in L2 and (counters too) in each value. Before, a lying aggregator could
        publish any model (a trap for the next round's updates); now it moves the model no
        further a round than an honest round can."""
        # (a result of the model's names, shapes and dtypes: _download_model)
        rate = self.config.server_learning_rate
        l2, counter = _steps(model, result)
        # defence: sdk.masked-result-within-the-clip-norm
        if not l2 <= rate * bound.l2 * (1 + 1e-9):
            raise ModelMismatch(
                f"the round's result moved the model by L2 {l2:.4g}, further than the average "
                f"of clipped updates can ({rate * bound.l2:.4g}: [update] clip_norm times [job] "
                "server_learning_rate, which must agree in every config; or the round's weight "
                "sum was too small for the quantiser, which the aggregator's log says: "
                "masking_precision_low)")
        # (an integer value is the rounded sum: half a step more)
        # defence: sdk.masked-result-counters-bounded
        if not counter <= rate * bound.element * (1 + 1e-9) + 0.5:
            raise ModelMismatch(
                f"the round's result moved an integer value by {counter:.4g}, further than "
                f"the average of clipped updates can ({rate * bound.element:.4g} and rounding)")

    def _accept_result(self, info: service_pb2.RoundInfo, model: FlatModel,
                       released: np.ndarray | None = None,
                       average_bound: AverageBound | None = None) -> FlatModel:
        """The round's result, checked; ``released``: the average this site released (a CKKS
        key holder), which the result must apply exactly as the aggregator applies it;
        ``average_bound``: how far the round's average can be from zero (masking, a site whose
        input is in the sum: _masked_average_bound)."""
        result = self._download_model(info.result, "result", model.spec)
        if released is not None:
            # the key holder knows the average: the result is the round's model plus the
            # server learning rate times it, to the bit (a lying aggregator published a
            # made-up result, and the key holder took it as the others did)
            # defence: sdk.key-holder-checks-the-result
            try:
                mine = self._result_of(model, released).digest
            except ConfigurationError:  # no model: the aggregator's result cannot be it
                mine = b""
            if mine != result.digest:
                raise ModelMismatch("the round's result is not the round's model plus the "
                                    "average this site released")
        elif self.config.protocol == "ckks":
            self._check_result_signature(info, model.digest, result.digest)
        elif average_bound is not None:
            self._check_masked_step(model, result, average_bound)
        self._model_digest, self._held_model = result.digest, result
        self._held_round = info.round
        self._history.hold(self.config.job_id, info.round, result.digest)
        return result


def _poll_slack(site: Any) -> int:
    return POLL_SLACK_BYTES + 16 * len(site.kit.roster)


def _honest_info_bytes(model: FlatModel) -> int:
    """The most an honest round's info can hold for ``model`` (its spec twice, as the model
    and its result, each with a chunk list of ``SDK_CHUNK_BYTES`` chunks or larger, plus
    ids, digests, a key offer and signatures): counted from what the site knows of the
    model, not from the answer's bytes."""
    spec = sum(len(t.name.encode()) + len(t.dtype) + 11 * len(t.shape) + 16 for t in model.spec)
    chunks = math.ceil(max(FlatModel.encoded_sizes(model.spec)) / SDK_CHUNK_BYTES) + 1
    return 2 * (spec + 40 * chunks + 128) + 16 * 1024


class Round:
    """One round as this site sees it.

    After ``submit``, ``survivors`` are the sites whose updates the round's sum holds, as
    far as this site can know them: masking, the survivor list it signed (every survivor
    signs the same list, or nobody unmasks); a CKKS key holder, the sites whose uploads it
    verified and released; any other CKKS site, the sites the key holder signed beside the
    result (empty if the aggregator's list is not the signed one)."""

    # what an answer bringing nothing new may hold unpaced (each round: its info as joined)
    _poll_allowance = POLL_SLACK_BYTES
    # a round said to wait for its sites: since when, and what was last said of it (_note_waiting)
    _waited_since: float | None = None
    _waiting_said: tuple[int, int, bool] | None = None
    _waiting_said_at = -math.inf
    _said_under_way = False
    _key_kept_until = -math.inf  # (the monotonic time the kept round key expires at)

    def __init__(self, site: Site, info: service_pb2.RoundInfo, model: FlatModel) -> None:
        self._site = site
        self._conn = site._conn
        self.number = int(info.round)
        self.round_id = info.round_id
        self.protocol = site.config.protocol  # (_join checked the announcement agrees)
        self.model = model
        self._key: KeyHolder | None = None
        self._submitted = False
        self._submitting = threading.Lock()  # (held while submit runs)
        self._trained_digest = b""  # (the model as the site's tensors hold it: set by submit)
        self.result: FlatModel | None = None
        self.survivors: tuple[int, ...] = ()
        # the sum's sites as this site knows them (signed or released): not the aggregator's
        self._known_survivors: tuple[int, ...] | None = None
        self._deadline = time.monotonic() + _round_patience(site.config)  # again at submit
        # what an answer bringing nothing new may hold unpaced: the round's info as joined
        # (no more than an honest info can hold: an aggregator padding the info a site
        # joined with to the message limit unpaced every poll after it, 100 MB a minute)
        # defence: sdk.poll-allowance-from-the-spec
        self._poll_allowance = (min(info.ByteSize(), _honest_info_bytes(model))
                                if model is not None else info.ByteSize()) + _poll_slack(site)
        self._released: np.ndarray | None = None  # the average this site released (key holder)
        # masking, once this site's input is in the sum: how long the round's average can be
        self._average_bound: AverageBound | None = None

    def __repr__(self) -> str:
        return f"Round(number={self.number}, round_id={self.round_id!r}, {self.protocol})"

    @property
    def global_model(self) -> dict[str, Any]:
        """The model the round starts from, as a state dict (torch tensors or numpy arrays)."""
        return tensors.as_tensors(self.model.to_arrays(), self._site._tensors)

    # (an exception leaves the SDK's frames without their locals, which held the site's
    # update, its seeds and the shares other sites sealed to it: hazmat.secret.scrub_locals)
    # defence: sdk.submit-leaves-no-locals
    @scrubs_locals
    def submit(self, state_dict: Mapping[str, Any], weight: float) -> dict[str, Any]:
        """Send this site's update and wait for the round's result: the new global model."""
        # (a second thread's call, made while the first ran, was told of restarts and job
        # ids by the history's record of the spent round: safe, but not what happened)
        # defence: sdk.one-submit-at-a-time
        if not self._submitting.acquire(blocking=False):
            raise SiteError("another thread is submitting to this round: a site submits "
                            "once a round")
        try:
            return self._submit_once(state_dict, weight)
        finally:
            self._submitting.release()

    def _submit_once(self, state_dict: Mapping[str, Any], weight: float) -> dict[str, Any]:
        # defence: sdk.submit-once-per-round-object
        if self._submitted:
            raise SiteError("this site already submitted to this round")
        # the average comes back as what was given: numpy arrays for a state of numpy arrays
        # (tensors="auto" made torch tensors of them wherever torch was installed)
        # defence: sdk.result-kind-follows-the-state
        kind = self._site._tensors
        if kind == "auto" and isinstance(state_dict, Mapping) and state_dict and all(
                isinstance(v, np.ndarray | np.generic) for v in state_dict.values()):
            kind = "numpy"
        # (before the round is spent: a closed connection sends nothing, and the site may
        # still take part in this round once connected again)
        # defence: sdk.submit-on-a-closed-site-spends-nothing
        self._site._check_open()
        config = self._site.config
        samples = _sample_count(weight)
        # defence: sdk.weight-within-max-samples
        if samples is None or not 0 < samples <= config.max_samples or (
                samples / config.max_samples <= 0):
            raise ConfigurationError(f"weight must be a number of samples in (0, "
                                     f"{config.max_samples:g}] ([update] max_samples), got "
                                     f"{_shown_weight(weight, samples)}")
        # one vector of the model's size, made by flattening and then worked on in place:
        # a large model is not copied for the delta and again for the clip
        delta, dtypes = tensors.flatten_with_dtypes(state_dict, self.model)
        # one update per model, as this site's tensors hold it: a float64 model nudged below
        # float32's precision (2**-40 of each value) was another model to the rule though a
        # float32 training script trained from it exactly as from the one it had sent an
        # update against (a helper's rerun, exact with deterministic training)
        computes = self._site.training_dtype
        # defence: sdk.training-dtype-rounds-the-model
        if computes is not None:  # (autocast: coarser than the tensors it keeps)
            dtypes = {name: computes if dtype in TRAINING_FLOATS
                      and TRAINING_FLOATS[computes] < TRAINING_FLOATS[dtype] else dtype
                      for name, dtype in dtypes.items()}
        trained = self.model.training_digest_as(dtypes)
        sent = self._site._history.sent_against(trained)
        # defence: sdk.one-update-per-model-as-trained
        if sent is not None and sent != (config.job_id, self.number):
            raise RoundAborted(self.round_id, one_update_per_model(
                sent, "the model this round starts from (as this site's tensors hold it)"))
        with np.errstate(over="ignore", invalid="ignore"):  # (an overflow is refused below)
            np.subtract(delta, self.model.values, out=delta)
            delta, norm = tensors.clip_l2(delta, config.clip_norm,
                                          self.model.integer_positions, in_place=True)
        # finite values whose difference from the model overflows float64 (1e308 - -1e308)
        # made an infinite delta, clipped to NaN: refused here, before the round is spent
        # defence: sdk.delta-finite
        if not math.isfinite(norm):
            raise ConfigurationError(
                "the update's difference from the round's model is not finite (values near "
                "float64's largest): check the trained state for diverged values")
        _warn_diverged(self.model, delta, norm, config.clip_norm, self.round_id,
                       self._site._capped_warned)
        # defence: sdk.clipped-update-said
        _warn_clipped(norm, config.clip_norm, self.round_id, self._site._capped_warned)
        _warn_capped_counters(self.model, delta, config.clip_norm, self.round_id,
                              self._site._capped_warned)
        # With a server learning rate above 1 the result, g + rate * average, can leave a
        # dtype's range though every site's values are in it (a uint8 buffer 250 -> 255 at
        # rate 2 is 260): the round was refused after every site had sent, ending the job.
        # Each site's own g + rate * delta in range keeps the average's in range (at rate <= 1
        # it lies between the model and values flatten_like checked).
        # defence: sdk.result-within-range-at-the-learning-rate
        rate = config.server_learning_rate
        if rate > 1.0:
            proposed = self.model.values + rate * delta
            counters = self.model.integer_positions  # (their change is capped at the clip)
            if counters.any():
                proposed[counters] = self.model.values[counters] + rate * np.clip(
                    delta[counters], -config.clip_norm, config.clip_norm)
            # (a bool result saturates, with_values making above 0 True and the rest False:
            # every site whose bool changed was refused at rates above 1)
            # defence: sdk.learning-rate-bools-saturate
            bools = self.model.bool_positions
            proposed[bools] = np.clip(proposed[bools], 0.0, 1.0)
            beyond = self.model.beyond_range(proposed, strict=True)
            if beyond is not None:
                dtype = next(t.dtype for t in self.model.spec if t.name == beyond)
                raise ConfigurationError(
                    f"with [job] server_learning_rate {rate:g}, this update would move tensor "
                    f"{beyond[:64]!r} past what its dtype ({dtype}) holds, and the round's "
                    "result could not be published: keep it further from the dtype's limits")
        scaled_weight = samples / config.max_samples
        if self.protocol == "ckks":
            _warn_weight_below_release(config, samples, len(self._site.kit.roster),
                                       int(np.count_nonzero(~self.model.integer_positions)),
                                       self._site._weight_warned)
        # this round number is spent from here on, whatever becomes of it (if it cannot be
        # recorded, nothing is sent and the round stays open to another call)
        # defence: sdk.submit-spends-with-its-key
        self._site._history.spend(config.job_id, self.number, self.model.digest,
                                  key=None if self._key is None else (self.round_id,
                                                                       self._key.key_id))
        # the arguments hold and the round is recorded: this is this site's one submission
        # (a wrong argument above leaves it free to call again)
        self._submitted = True
        self._trained_digest = trained
        self._deadline = time.monotonic() + _round_patience(config)
        self._keep_key_to_the_deadline()
        # a key holder's kept round key goes when its round has ended, either way (a
        # restart mid-round releases with it: clients.history.History.keep_key)
        try:
            try:
                if self.protocol == "masking":
                    self._run_masking(delta, scaled_weight)
                else:
                    self._run_ckks(delta, scaled_weight)
                info = self._wait_for_end()
                self.result = self._site._accept_result(info, self.model, self._released,
                                                        self._average_bound)
            # a round the aggregator ends or has ended (a submit past the deadline, an abort for
            # too few survivors) is RoundAborted, as documented: it came as AggregatorRefused,
            # and a training loop that caught RoundAborted ended there, missing the next rounds
            # defence: sdk.round-ended-is-round-aborted
            except AggregatorRefused as e:
                if e.code in _ROUND_ENDED_CODES:
                    why = e.reason if e.code == "ABORTED" else (
                        f"{e.reason} (the aggregator no longer takes this site's message in this "
                        "round: a stage's [deadlines] passed, the round ended, or the stage was "
                        "answered already)")
                    raise RoundAborted(self.round_id, why, code=e.code) from None
                # a message refused as invalid after the aggregator restarted with a new
                # roster (`federation remove-site`): "invalid signature" out of the script,
                # where a join names the roster (an outside operator)
                # defence: sdk.mid-round-roster-change-named
                if e.code == "INVALID_ARGUMENT":
                    changed = self._roster_changed()
                    if changed is not None:
                        raise RoundAborted(self.round_id, changed, code=e.code) from None
                raise
            # (WorkersFailed: this site's own set-up, named as such, not the aggregator's doing)
            except (SiteError, WorkersFailed):
                raise
            # every lie this site detects (a message, a context, a model that does not hold) is
            # a refusal of the round, never an internal exception out of the training loop
            # defence: sdk.lies-are-refusals-round
            except Exception as abort:  # (the caller's own input was checked above)
                raise RoundAborted(self.round_id, f"this site refused the aggregator's messages: "
                                                  f"{_why(abort)}") from None
        # (not on KeyboardInterrupt or SystemExit: the script is stopped, and its restart
        # releases the round with the kept key)
        # defence: sdk.submit-drops-its-round-key
        except Exception:
            self._drop_key()
            raise
        self._drop_key()
        self.survivors = self._survivors(info)
        # The aggregator acknowledged this site's update (an honest one acknowledges only what
        # it has counted, and sums every one it has counted), yet the sites the key holder
        # signed, or this key holder released, leave it out: a lying aggregator dropped it
        # from the sum, and this site believed it took part (a tester). The result, signed,
        # stays held (the next round starts from it); this round is refused, loudly.
        # defence: sdk.own-update-in-the-signed-sum
        if self.protocol == "ckks" and self.survivors \
                and self._site.site_id not in self.survivors:
            raise RoundAborted(self.round_id, (
                f"the aggregator acknowledged this site's update, but the round's average is "
                f"of sites {list(self.survivors)[:64]} alone, as the key holder "
                f"{'(this site) released it' if self._released is not None else 'signed'}: "
                "the aggregator left this site's update out of the sum (this site cannot send "
                "another against the same model; the round's result, which the next round "
                "starts from, is held)"))
        return tensors.as_tensors(self.result.to_arrays(), kind)

    def _roster_changed(self) -> str | None:
        """What to say if the aggregator's roster is no longer this site's (asked once; None
        if it is, or if the aggregator cannot tell now)."""
        try:
            info = self._info()
        except (AggregatorRefused, AggregatorUnavailable):
            return None
        theirs = bytes(info.roster_digest)
        roster = self._site.kit.roster
        if not theirs or theirs == roster.digest:
            return None
        return (f"the aggregator refused this site's message, and its roster (version "
                f"{int(info.roster_version)}) is no longer this site's (version "
                f"{roster.version}): copy the federation's current roster.bin into this "
                "site's directory and start the site again")

    def _survivors(self, info: service_pb2.RoundInfo) -> tuple[int, ...]:
        """The round's survivors: the ones this site signed or released, where it has them
        (a lying aggregator reported two sites where five were summed, hiding who an update
        was averaged with: said in the log); a CKKS site that is not the key holder, the ones
        the key holder signed (none, said in the log, if the aggregator's list is not them)."""
        # defence: sdk.survivors-are-the-signed-ones
        known = self._known_survivors
        # counted before any is read: no sum holds more sites than the roster has (900,000
        # ids, 8 MB, cost a site 95 MB to read, after the result was taken)
        sites = len(self._site.kit.roster)
        # defence: sdk.survivors-counted-first
        if len(info.survivors) > sites:
            _log.warning("round %s: the aggregator says %d sites are in the round's sum, more "
                         "than the roster's %d", self.round_id, len(info.survivors), sites)
            return known or ()
        claimed = tuple(sorted({int(s) for s in info.survivors}))
        if known is None and self.protocol == "ckks":
            holder = self._site.config.key_holder_for(int(info.round))
            # defence: sdk.ckks-survivors-signed-by-the-key-holder
            # (ids past an int64, a uint64 on the wire, are InvalidMessage: they raised
            # OverflowError out of submit, after the result was taken)
            try:
                wire.verify_sites(self._site.kit.roster[holder], bytes(info.sites_signature),
                                  round_id=self.round_id,
                                  result_digest=bytes(info.result.digest), sites=claimed)
            except (InvalidMessage, KeyError):
                _log.warning("round %s: the aggregator says sites %s are in the round's sum, "
                             "but the key holder (site %s) did not sign them: this site does "
                             "not know who its update was averaged with, nor whether it is in "
                             "the sum", self.round_id,
                             list(claimed)[:64], holder)
                return ()
            return claimed
        if known is None:
            return claimed
        if claimed != known:
            _log.warning("round %s: the aggregator says sites %s are in the round's sum; "
                         "this site %s sites %s", self.round_id, list(claimed)[:64],
                         "signed" if self.protocol == "masking" else "released",
                         list(known))
        return known

    def _drop_key(self) -> None:
        if self._key is not None:
            self._site._history.drop_key(self._site.config.job_id, self.round_id,
                                         self._key.key_id)

    # ---- plumbing --------------------------------------------------------------------------------

    def _progress(self, what: str, done: int, total: int) -> None:
        if self._site._progress:
            self._site._progress(what, done, total)

    def _submit(self, **message: Any) -> None:
        # (only the waits were bounded: past the round's patience, a site whose stage
        # answers came back "ready" still sent its Submits and uploads, hours more)
        # defence: sdk.sends-within-the-rounds-patience
        self._in_time()
        self._round_call("Submit", service_pb2.SubmitRequest(round_id=self.round_id, **message))

    def _round_call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """A call of this round, asked again while the aggregator lets the call's own deadline
        pass (DEADLINE_EXCEEDED: its store hung, and it answers UNAVAILABLE only once it
        notices) until the round's patience is spent (RoundAborted). Every call is
        idempotent: a Submit counted before its answer was lost is acknowledged again. A
        Submit or a stage's wait cut by its deadline left submit as AggregatorRefused, or
        aborted the round at once, where the long poll for the result waited on."""
        pacer = self._pacer()
        while True:
            began = time.monotonic()
            try:
                return self._conn.call(method, request, timeout=timeout)
            except AggregatorRefused as e:
                # defence: sdk.round-calls-outlive-a-deadline
                if e.code != "DEADLINE_EXCEEDED":
                    raise
                self._in_time()
                # (paced as "nothing new" is: answered at once, it was a hot loop)
                # defence: sdk.deadline-retry-paced
                pacer.nothing_new(began)

    def _upload_and_submit(self, data: bytes, what: str,
                           message: Callable[[wire.Blob], dict[str, Any]]) -> None:
        """Upload a payload and submit the message that refers to it (sent again if the
        aggregator lost its chunks: Connection.upload_and_send)."""
        self._in_time()
        self._conn.upload_and_send(data, lambda blob: self._submit(**message(blob)),
                                   progress=self._progress, what=what)

    def _pacer(self) -> _Pacer:
        # defence: sdk.pacing-follows-a-waiting-round
        return _Pacer(self._poll_allowance, lambda: self._deadline)

    def _receive(self, stage: int) -> service_pb2.ReceiveResponse:
        pacer = self._pacer()
        while True:
            began = time.monotonic()
            try:
                response: service_pb2.ReceiveResponse = self._round_call(
                    "Receive", service_pb2.ReceiveRequest(round_id=self.round_id, stage=stage,
                                                          wait_ms=POLL_MS),
                    timeout=POLL_MS / 1000 + 30)
            # (any refusal: a training loop catches RoundAborted, as documented)
            # defence: sdk.receive-refusal-is-round-aborted
            except AggregatorRefused as e:
                raise RoundAborted(self.round_id, e.reason, code=e.code) from None
            self._note_waiting(response.waiting)
            if response.ready:
                self._check_entry_counts(response)
                return response
            self._in_time()
            pacer.nothing_new(began, response.ByteSize())

    def _check_entry_counts(self, response: service_pb2.ReceiveResponse) -> None:
        """RoundAborted for a stage's answer with more entries in a list than the roster has
        sites (no honest one has: a key, a share, a survivor, an upload, a mask partner per
        site at most), counted before a Python object is made of any: a key directory padded
        to 8 MB cost a site 762 MB and 8 CPU seconds to refuse as DUPLICATE_SITE, and an
        attestation's partners padded to 8 MB, one level down, 271 MB."""
        kind = response.WhichOneof("message")
        if kind is not None:
            self._count_entries(kind, getattr(response, kind), len(self._site.kit.roster))

    def _count_entries(self, kind: str, message: Any, sites: int) -> None:
        """Every list and map in ``message`` and in the messages it holds, at any depth, has
        at most ``sites`` entries; a payload's chunk ids are bounded by its size instead."""
        for field in message.DESCRIPTOR.fields:
            if not field.is_repeated:
                if field.message_type is not None and message.HasField(field.name):
                    # defence: sdk.stage-answer-nested-entries-counted
                    self._count_entries(kind, getattr(message, field.name), sites)
                continue
            if field.full_name in _SIZE_BOUNDED_LISTS:
                continue
            entries = getattr(message, field.name)
            # defence: sdk.stage-answer-entries-counted
            if len(entries) > sites:
                raise RoundAborted(self.round_id, (
                    f"the aggregator's {kind} names {len(entries)} {field.name}, more than "
                    f"the roster's {sites} sites"))
            if field.message_type is None:
                continue
            if field.message_type.GetOptions().map_entry:
                if field.message_type.fields_by_name["value"].message_type is None:
                    continue
                entries = entries.values()
            for entry in entries:
                # defence: sdk.stage-answer-entries-of-entries-counted
                self._count_entries(kind, entry, sites)

    def _note_waiting(self, waiting: service_pb2.RoundWaiting) -> None:
        """The aggregator's word on whether the round waits for its sites (its deadlines not
        yet running): a site that came early gave the round up at its patience (55 minutes
        at the defaults) while the round still waited for the others, and its training
        script ended on RoundAborted. Waited for, and said, for at most
        WAITING_PATIENCE_SECONDS; the patience runs from when the round is under way."""
        now = time.monotonic()
        if waiting.sites_needed == 0:  # (not said: under way, or never waited)
            if self._waited_since is not None and self._waiting_said is not None:
                self._waiting_said = None
                # (a round under way never waits again: an aggregator saying "waiting" and
                # "under way" in turn got a false line after each "waits", two a minute)
                # defence: sdk.under-way-said-once
                if not self._said_under_way:
                    self._said_under_way = True
                    _log.info("round %d is under way: the sites it needs are online",
                              self.number)
            return
        if self._waited_since is None:
            # (from when the round's patience last began, at the join or the submit: a first
            # "waiting" just before it ran out held the site a day and two patiences)
            # defence: sdk.waiting-day-from-the-submit
            self._waited_since = min(now, self._deadline - _round_patience(self._site.config))
        # (a lying aggregator saying so for ever held the site no longer than a day)
        # defence: sdk.waiting-round-bounded
        if now - self._waited_since <= WAITING_PATIENCE_SECONDS:
            # defence: sdk.waiting-round-waited-for
            self._deadline = max(self._deadline, now + _round_patience(self._site.config))
            self._keep_key_to_the_deadline()
        said = (int(waiting.sites_asking), int(waiting.sites_needed),
                bool(waiting.waits_for_key_holder))
        # defence: sdk.waiting-said
        # defence: sdk.waiting-said-once-a-minute
        if said != self._waiting_said and now - self._waiting_said_at >= WAITING_SAID_SECONDS:
            self._waiting_said, self._waiting_said_at = said, now
            # (at least: under SecAgg+ it also needs enough of each one's neighbours)
            _log.info("round %d waits for its sites to come online (asking: %d, needed: at "
                      "least %d%s); this site waits with it (the round's deadlines begin once "
                      "enough are)", self.number, said[0], said[1],
                      ", its key holder among them" if said[2] else "")

    def _keep_key_to_the_deadline(self) -> None:
        """A key holder's kept round key lasts as long as the site may stay in the round: it
        expired at the round's patience from the join, and a holder waiting with a round
        for its sites (or training longer than that), restarted after it, found its key gone,
        and the round, with every update sent against its model, was lost. Kept a patience
        past the site's deadline, extended once the deadline comes within
        KEY_KEPT_MARGIN_SECONDS of the key's end: one write in most of a patience, and no
        longer than that past the site's stay (a key left by a crash goes at the first
        connect after it)."""
        if self._key is None or self.protocol != "ckks":
            return
        now = time.monotonic()
        # defence: sdk.kept-key-outlasts-a-waiting-round
        if self._deadline + KEY_KEPT_MARGIN_SECONDS > self._key_kept_until:
            self._key_kept_until = self._deadline + _round_patience(self._site.config)
            self._site._history.extend_key(self._site.config.job_id, self.round_id,
                                           self._key.key_id, self._key_kept_until - now)

    def _in_time(self) -> None:
        """RoundAborted once the round has outlasted what its deadlines allow: a lying
        aggregator answering every wait with "not yet" held a site in submit() for good."""
        # defence: sdk.round-waits-bounded
        if time.monotonic() > self._deadline:
            raise RoundAborted(self.round_id, "the aggregator did not end the round within "
                                              "twice what this federation's [deadlines] allow")

    def _info(self) -> service_pb2.RoundInfo:
        info: service_pb2.RoundInfo = self._conn.call(
            "GetRound", service_pb2.GetRoundRequest(after_round=self.number - 1, wait_ms=0))
        return info

    def _wait_for_end(self) -> service_pb2.RoundInfo:
        pacer = self._pacer()
        while True:
            began = time.monotonic()
            # a long poll the aggregator did not answer in time is no refusal (it left submit
            # as AggregatorRefused at one site while another, waiting elsewhere, was told
            # RoundAborted): asked again until the round's patience is spent
            # defence: sdk.result-wait-outlives-a-deadline
            info: service_pb2.RoundInfo = self._round_call(
                "GetRound", service_pb2.GetRoundRequest(
                    after_round=self.number - 1, wait_ms=POLL_MS, until_finished=True),
                timeout=POLL_MS / 1000 + 30)
            if info.status == service_pb2.ROUND_STATUS_COMPLETED:
                # the result of this round, not another's: what the site then holds (and
                # checks the next rounds' models against) is this round's result
                # defence: sdk.result-of-this-round
                if int(info.round) != self.number or info.round_id != self.round_id:
                    raise RoundAborted(self.round_id, "the aggregator answered with the result "
                                                      "of another round")
                return info
            if info.status == service_pb2.ROUND_STATUS_ABORTED:
                raise RoundAborted(self.round_id, _explained(info.abort_reason),
                                   code="ABORTED")
            self._note_waiting(info.waiting)
            self._in_time()
            pacer.nothing_new(began, info.ByteSize())

    # ---- masking ---------------------------------------------------------------------------------

    def _run_masking(self, delta: np.ndarray, weight: float) -> None:
        site = self._site
        # bound to the model this site computed its update against: sites handed different
        # models sign different round parameters and never complete a round together
        config = site.config.masking_round(self.round_id, site.kit.roster, self.model.size,
                                           model_digest=self.model.digest)
        client = MaskingClient(config, site.site_id, site.kit.identity, (delta, weight))
        # how far the round's average can be from zero: public (the same at every site), so
        # set before anything is sent (a result this site does not see end, because it was
        # told it dropped out or the round aborted, is checked with it in the chain of
        # missed rounds: _follow_chain)
        # defence: sdk.masked-average-bounded-once-in-the-sum
        self._average_bound = _masked_average_bound(
            config.quantizer, int(np.count_nonzero(~self.model.integer_positions)))
        if weight * config.quantizer.weight_scale < 1:  # (said here only: nothing changes)
            _log.warning("round %s: this site's weight is below the quantiser's resolution: "
                         "its update is mostly lost to rounding (raise the weight, or lower "
                         "[update] max_samples)", self.round_id)
        self._progress("stage ADVERTISE_KEYS", 0, 5)
        self._submit(advertise_keys=wire.advertise_to_proto(client.start()))
        steps: list[tuple[Stage, Callable[[service_pb2.ReceiveResponse], Any]]] = [
            (Stage.ADVERTISE_KEYS, lambda r: wire.directory_from_proto(r.key_directory)),
            (Stage.SHARE_KEYS, lambda r: wire.delivery_from_proto(r.share_delivery)),
            (Stage.MASKED_INPUT, lambda r: wire.survivors_from_proto(r.survivor_list)),
            (Stage.CONSISTENCY_CHECK,
             lambda r: wire.unmask_request_from_proto(r.unmask_request)),
        ]
        for done, (stage, decode) in enumerate(steps, 1):
            response = self._receive(stage.value)
            reply = client.handle(decode(response))
            if stage is Stage.SHARE_KEYS and client.unusable_share_senders:
                # skipped, not fatal (see MaskingClient): said here, since only this site
                # can see it, so an operator can ask who sealed them
                _log.warning("round %s: the shares sites %s sealed for this site did not open "
                             "and were skipped (a site or the aggregator altered them)",
                             self.round_id, list(client.unusable_share_senders))
            self._progress(f"stage {client.stage.name}", done, 5)
            self._send_masking(reply, config.word_bits)
        self._known_survivors = client.signed_survivors

    def _send_masking(self, reply: Any, word_bits: int) -> None:
        from secagg.masking.messages import (
            ConsistencySignature,
            ShareKeys,
            UnmaskResponse,
        )

        if isinstance(reply, ShareKeys):
            self._submit(share_keys=wire.share_keys_to_proto(reply))
        elif isinstance(reply, MaskedInput):
            bound = self._average_bound
            # the site's record of the bound it holds the round's result to (an auditor's
            # trail; the chain of missed rounds recomputes it, from public values only)
            if bound is not None and math.isfinite(bound.l2):
                self._site._history.record_in_sum(self._site.config.job_id, self.number, bound)
            # (recorded before the update leaves: clients.history, one update per model)
            # defence: sdk.masked-input-recorded-as-sent
            # defence: sdk.masked-input-records-the-model-as-trained
            self._site._history.record_sent(self._site.config.job_id, self.number,
                                            self.model.training_digest, self._trained_digest)
            self._upload_and_submit(
                wire.masked_input_bytes(reply, word_bits), "masked input",
                lambda blob: {"masked_input": wire.masked_input_to_ref(reply, blob, word_bits)})
        elif isinstance(reply, ConsistencySignature):
            self._submit(consistency_signature=wire.consistency_to_proto(reply))
        elif isinstance(reply, UnmaskResponse):
            self._submit(unmask_response=wire.unmask_to_proto(reply))

    # ---- CKKS ------------------------------------------------------------------------------------

    def _announce_key(self, kept: KeyHolder | None = None) -> None:
        """This site makes, announces and will release this round's key (``kept``: the key
        it kept for the round before a restart, announced again)."""
        site = self._site
        key = kept if kept is not None else KeyHolder.generate(site.config.preset)
        announcement = key.announce(holder=site.site_id, identity=site.kit.identity,
                                    epoch=self.round_id, max_rounds=1)
        self._key = key
        # kept before it is announced: a training script restarted in this round releases
        # it (Site._join, Site._resume_release), where the round was lost, and the job with
        # it (every site had sent against the round's model)
        try:
            if kept is None:
                # defence: sdk.key-holder-keeps-its-round-key
                site._history.keep_key(site.config.job_id, self.number, self.round_id, key,
                                       expires_in=_round_patience(site.config))
                self._key_kept_until = time.monotonic() + _round_patience(site.config)
        # defence: sdk.another-kept-key-not-announced
        except AnotherKeyKept:
            raise  # (never announced: Site._join skips the round)
        # (the key could not be written: its file went with the error, or, if it could not
        # be deleted, every release under the key is recorded first; any other SiteError,
        # a lock not taken, is raised: the key is not announced)
        # defence: sdk.key-unkept-for-want-of-the-lock-not-announced
        except KeyNotWritten as e:
            _log.warning("round %s: the key is not kept (%s): a restart in this round "
                         "cannot release it", self.round_id, e)
        try:
            self._upload_and_submit(
                key.public_context().serialize(), "public context",
                lambda blob: {"ckks_key": service_pb2.CkksKeyOffer(
                    announcement=wire.announcement_to_proto(announcement),
                    public_context=blob.to_proto())})
        # a key not announced is no round's: it goes (not on Ctrl-C, which may have come
        # after the announcement reached the aggregator: the restart takes it up)
        # defence: sdk.unannounced-key-dropped
        except Exception:
            site._history.drop_key(site.config.job_id, self.round_id, key.key_id)
            raise

    def _run_ckks(self, delta: np.ndarray, weight: float) -> None:
        site = self._site
        began = time.monotonic()
        info = self._info()
        delay = 0.05
        while not info.HasField("ckks_key"):
            # defence: sdk.key-wait-ends-with-the-round
            if info.status != _RUNNING:
                raise RoundAborted(self.round_id, _explained(info.abort_reason)
                                   or "no key was announced")
            self._note_waiting(info.waiting)
            self._in_time()
            # (and by its bytes: "no key yet" padded to 6 MB, answered at once, was 6 MB/s)
            # defence: sdk.key-wait-paced-by-its-bytes
            owed = (max(0, info.ByteSize() - self._poll_allowance)
                    / POLL_BYTES_PER_SECOND - (time.monotonic() - began))
            time.sleep(min(max(delay, owed), max(0.0, self._deadline - time.monotonic()) + 0.01))
            # (a second at most while the key holder is due; a round waiting for its sites,
            # its holder perhaps not yet online, is asked every 10 s, as a long poll is: a
            # second a time, its info and model's spec each time, for up to a day. Or a
            # twentieth of the open deadline, if less: the key seen late once the round is
            # under way is time lost from the uploads')
            # defence: sdk.key-wait-spaced-while-waiting
            top = (min(KEY_WAIT_WAITING_SECONDS, max(1.0, site.config.deadlines.open / 20))
                   if info.HasField("waiting") else 1.0)
            delay = min(delay * 1.5, top)
            began = time.monotonic()
            info = self._info()
        announcement = wire.announcement_from_proto(info.ckks_key.announcement)
        try:
            config = site.config.ckks_round(self.number, self.round_id, site.kit.roster,
                                            announcement, self.model.size,
                                            model_digest=self.model.digest)
        except ConfigurationError as e:
            raise RoundAborted(self.round_id, f"the round's key announcement is refused: {e}"
                               ) from None
        context: KeyHolder | PublicContext
        if self._key is not None:
            context = self._key
        else:
            # defence: sdk.context-download-bounded
            context = PublicContext.load(self._conn.download(
                wire.Blob.from_proto(info.ckks_key.public_context), what="public context",
                max_size=public_context_length(config.preset)),
                preset=config.preset)
        client = CkksClient(config, site.site_id, site.kit.identity, context, (delta, weight),
                            seeded=False, workers=site.workers,
                            progress=lambda d, t: self._progress("encrypt", d, t))
        upload = client.start()
        # defence: sdk.ciphertexts-recorded-as-sent
        site._history.record_sent(site.config.job_id, self.number,
                                  self.model.training_digest, self._trained_digest)
        self._upload_and_submit(b"".join(upload.chunks), "ciphertexts",
                                lambda blob: {"ckks_update": wire.update_to_ref(upload, blob)})
        if self._key is not None:
            self._release(config)

    def _verify_and_release(self, release: Release, request: Any, config: Any) -> Any:
        assert self._key is not None
        context = self._key.seal_context
        uploads = list(request.uploads)
        # defence: sdk.release-uploads-bounded
        if len(uploads) > len(config.roster):
            raise InvalidMessage("release request")

        def expected(kind: _seal.Kind) -> int:
            return int(config.chunk_count) * _seal.encoded_length(context, kind)

        # Sizes are checked against the round's layout before anything is downloaded or
        # split: the aggregator's chunk counts and blob sizes are claims.
        for done, ref in enumerate(uploads, 1):
            # a seeded ciphertext needs the secret key, which no site of a service federation
            # but its key holder holds, and no site makes one here: one could only be a site's
            # forgery (a second polynomial it chose by the seed), never worth decrypting
            # defence: sdk.release-uploads-full
            if ref.seeded:
                raise InvalidMessage("upload")
            size = expected(_seal.Kind.FULL)
            # defence: sdk.release-sizes-checked
            if ref.chunk_count != config.chunk_count or ref.chunks.size != size:
                raise InvalidMessage("upload")
            # an aggregator trickling each upload's download held the holder here for
            # (uploads) x (retries + size at the slowest pace), outside the round's time
            # defence: sdk.release-downloads-in-time
            self._in_time()
            data = self._conn.download(wire.Blob.from_proto(ref.chunks), max_size=size)
            release.add(wire.update_from_ref(ref, data))  # verify and re-add every upload
            self._progress("verify uploads", done, len(uploads))
        size = expected(_seal.Kind.FULL)
        # defence: sdk.release-aggregate-shaped
        if (request.aggregate.chunk_count != config.chunk_count
                or request.aggregate.chunks.size != size):
            raise InvalidMessage("aggregate")
        aggregate = wire.aggregate_from_ref(request.aggregate, self._conn.download(
            wire.Blob.from_proto(request.aggregate.chunks), max_size=size))
        try:
            return release.finish(aggregate)
        except SecAggError as e:
            # the one refusal an honest aggregator meets (a site's doing, or the weights'),
            # told to it so the round aborts now, not at its release deadline
            # defence: sdk.key-holder-tells-its-refusal
            if isinstance(e, RefusedMessage) and e.reason is RefusalReason.OUT_OF_RANGE:
                self._tell_refusal(config, request.aggregate.chunks.chunk_ids)
            raise RoundAborted(self.round_id, f"the key holder refused to release: {e}"
                               ) from None

    def _tell_refusal(self, config: Any, aggregate_chunk_ids: Any) -> None:
        """Send the aggregator this key holder's signed refusal of the round's sum as out of
        range (service.proto: CkksReleaseRefusal). It learns nothing its silence did not tell:
        the round was spent before anything was decrypted (Release.finish), so this is one bit
        a round. Best effort: if it is not counted the round aborts at its release deadline."""
        reason = ckks_pb2.REFUSAL_REASON_OUT_OF_RANGE  # (RefusalReason.OUT_OF_RANGE's value)
        signature = self._site.kit.identity.sign(wire.refusal_signed_bytes(
            config.params_digest, self._site.site_id, int(reason), aggregate_chunk_ids))
        try:
            self._submit(ckks_refusal=service_pb2.CkksReleaseRefusal(reason=reason,
                                                                     signature=signature))
        except SiteError as e:
            _log.warning("round %s: the aggregator did not take this key holder's refusal: %s",
                         self.round_id, _why(e))

    def _release(self, config: Any) -> None:
        assert self._key is not None
        request = self._receive(CkksStage.UPLOAD.value).ckks_release_request
        release = Release(self._key, config, site_id=self._site.site_id,
                          workers=self._site.workers)
        try:
            released = self._verify_and_release(release, request, config)
        finally:
            release.close()
        # (a kept key records the aggregate it releases with it, under the history's lock,
        # before decrypting: History.keep_key; another process holding it, a restarted
        # script, releases that aggregate again or none)
        self._released = np.asarray(released.average, dtype=np.float64)
        self._known_survivors = tuple(sorted(released.sites))
        # the model this release makes, signed: the other sites take only a result this
        # site signed (_accept_result), and this site only the one it computed
        result = self._site._signable_result(self.model, released, config.preset_params,
                                             self.round_id)
        if result is None:  # sent unsigned, for the aggregator to refuse
            signature = sites_signature = b""
        else:
            signature = self._site.kit.identity.sign(wire.result_signed_bytes(
                self.round_id, self.model.digest, result.digest))
            # (the sites, for the other sites' Round.survivors)
            sites_signature = self._site.kit.identity.sign(wire.sites_signed_bytes(
                self.round_id, result.digest, released.sites))
        self._upload_and_submit(
            wire.average_bytes(released.average), "release",
            lambda blob: {"ckks_release": wire.release_to_ref(
                released, blob, result_signature=signature, sites_signature=sites_signature)})
