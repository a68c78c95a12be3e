"""The federation config file (TOML): what every party of a federation agrees on.

Written by ``secagg federation init``, read by the aggregator and by every site. Every value is
checked when the file is loaded, naming the key in error (``[masking] neighbors must be ...``).
The round configurations of both protocols are built from it (:meth:`masking_round`,
:meth:`ckks_round`), so their own checks (thresholds, the SecAgg+ bound, CKKS headroom) run
before any round starts.

```toml
[federation]
name = "trial"
protocol = "masking"             # or "ckks"
aggregator = "localhost:50051"   # host:port the sites dial
trust_root = "<hex>"             # the roster signer's Ed25519 public key

[job]
rounds = 3
server_learning_rate = 1.0
initial_model = "model.npz"      # optional, relative to this file (numpy .npz, no pickle)
initial_model_digest = "<hex>"   # optional: the digest of round 1's model, which sites check

[update]
clip_norm = 1.0                  # each site's update (delta) is clipped to this L2 norm
max_samples = 10000              # weight = samples / max_samples

[masking]
neighbors = "complete"           # "complete", "auto" or an even k
threshold = "auto"               # or an integer
corrupt_fraction = 0.2
dropout_rate = 0.1
word_bits = 32

[ckks]
preset = "add-only-4096"
key_holders = [1]                # round r's key is made and released by key_holders[(r - 1) % len]
# min_sites = 4                  # default and least: colluders + 2 ([masking] corrupt_fraction)

[deadlines]                      # seconds
open = 600                       # from a round's opening until its first stage closes
stage = 60                       # every later stage
release = 600                    # CKKS: the key holder's verification and release

[limits]
max_message_bytes = 8388608
max_chunk_bytes = 4194304
max_vector_length = 100000000
max_sites = 10000
stream_idle_seconds = 60         # the most a 1 MiB chunk may take: links down to ~20 KB/s
upload_slots = 8                 # sites told to send their chunks at once (aggregator memory)
```
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from secagg.errors import ConfigurationError

PROTOCOLS = ("masking", "ckks")
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# The chunk size the SDK uploads in (clients/transport.py), and what the aggregator's upload
# budget assumes: [limits] max_chunk_bytes may not be below it (every honest chunk would be
# refused).
SDK_CHUNK_BYTES = 1024 * 1024


_KEYS = {
    "federation": {"name", "protocol", "aggregator", "trust_root"},
    "job": {"id", "rounds", "server_learning_rate", "initial_model", "initial_model_digest"},
    "update": {"clip_norm", "max_samples"},
    "masking": {"neighbors", "threshold", "corrupt_fraction", "dropout_rate", "word_bits"},
    "ckks": {"preset", "key_holders", "min_sites"},
    "deadlines": {"open", "stage", "release"},
    "limits": {"max_message_bytes", "max_chunk_bytes", "max_vector_length", "max_sites",
               "stream_idle_seconds", "upload_slots"},
}


def _get(table: Mapping[str, Any], section: str, key: str, kind: type | tuple[type, ...],
         default: Any = None) -> Any:
    value = table.get(key, default)
    if value is None:
        raise ConfigurationError(f"[{section}] {key} is missing")
    # defence: federation.config-finite
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError(f"[{section}] {key} must be finite, got {value!r}")
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigurationError(f"[{section}] {key} must be {_kind(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigurationError(f"[{section}] {key} must be {_kind(kind)}, got {value!r}")
    return value


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string",
                        bool: "true/false", list: "a list"}.get(k, k.__name__) for k in kinds)


def _positive(section: str, key: str, value: float, *, integer: bool = False) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"[{section}] {key} must be positive, got {value!r}")
    return value


def _wrong_type(config: FederationConfig) -> str | None:
    """The first field of a config made in Python (``init_federation(**overrides)``,
    ``dataclasses.replace``) whose type the TOML loader would refuse, named as the file does."""
    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    lim, dl = config.limits, config.deadlines
    checks: list[tuple[str, bool, str]] = [
        ("[federation] name", isinstance(config.name, str), "a string"),
        ("[federation] protocol", isinstance(config.protocol, str), "a string"),
        ("[federation] aggregator", isinstance(config.aggregator, str), "a string"),
        ("[federation] trust_root", isinstance(config.trust_root, bytes)
         and len(config.trust_root) == 32, "a 32-byte Ed25519 key"),
        ("[job] id", isinstance(config.job_id, str), "a string"),
        ("[job] rounds", integer(config.rounds), "an integer"),
        ("[job] initial_model_digest", config.initial_model_digest is None or (
            isinstance(config.initial_model_digest, bytes)
            and len(config.initial_model_digest) == 32), "32 bytes"),
        ("[masking] neighbors", config.neighbors in ("complete", "auto")
         or integer(config.neighbors), "\"complete\", \"auto\" or an even integer"),
        ("[masking] threshold", config.threshold == "auto" or integer(config.threshold),
         "\"auto\" or an integer"),
        ("[masking] word_bits", integer(config.word_bits), "an integer"),
        ("[ckks] preset", isinstance(config.preset, str), "a string"),
        ("[ckks] min_sites", config.min_sites is None or integer(config.min_sites),
         "an integer"),
        *((f"[limits] {k}", integer(getattr(lim, k)), "an integer")
          for k in ("max_message_bytes", "max_chunk_bytes", "max_vector_length", "max_sites",
                    "upload_slots")),
        *((name, number(value), "a number") for name, value in (
            ("[job] server_learning_rate", config.server_learning_rate),
            ("[update] clip_norm", config.clip_norm),
            ("[update] max_samples", config.max_samples),
            ("[masking] corrupt_fraction", config.corrupt_fraction),
            ("[masking] dropout_rate", config.dropout_rate),
            ("[deadlines] open", dl.open), ("[deadlines] stage", dl.stage),
            ("[deadlines] release", dl.release),
            ("[limits] stream_idle_seconds", lim.stream_idle_seconds))),
    ]
    for name, ok, kind in checks:
        if not ok:
            return f"{name} must be {kind}"
    return None


MAX_ROUNDS = 1_000_000
MAX_DEADLINE_SECONDS = 30 * 86_400  # a stage waiting 30 days for its sites is a stalled job


@dataclass(frozen=True)
class Deadlines:
    open: float = 600.0
    stage: float = 60.0
    release: float = 600.0


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    max_vector_length: int = 100_000_000
    max_sites: int = 10_000
    # as long as the SDK's shortest transfer deadline (60 s): a 1 MiB chunk may take that
    # long, so links down to ~20 KB/s upload (30 s refused links under ~35 KB/s)
    stream_idle_seconds: float = 60.0
    # how many sites the aggregator tells to send their chunks at once: ~3 MB of aggregator
    # memory each while they upload; more lets many sites on slow links upload side by side
    upload_slots: int = 8


@dataclass(frozen=True)
class FederationConfig:
    name: str
    protocol: str
    aggregator: str
    trust_root: bytes
    rounds: int = 3
    server_learning_rate: float = 1.0
    # names the job in every round id; a job started again on a fresh store needs a new one
    # (sites refuse a round they already took part in: clients.site.History)
    job_id: str = "job"
    initial_model: Path | None = None
    # the digest (FlatModel.digest) of the model round 1 starts from: a site holding no model
    # yet takes only a job that starts from it (the aggregator could otherwise hand every
    # site a first model of its own choosing; `federation init --model` writes it)
    initial_model_digest: bytes | None = None
    clip_norm: float = 1.0
    max_samples: float = 10_000.0
    neighbors: int | str = "complete"
    threshold: int | str = "auto"
    corrupt_fraction: float = 0.2
    dropout_rate: float = 0.1
    word_bits: int = 32
    preset: str = "add-only-4096"
    key_holders: tuple[int, ...] = (1,)
    min_sites: int | None = None
    deadlines: Deadlines = field(default_factory=Deadlines)
    limits: Limits = field(default_factory=Limits)

    # ---- files -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str) -> FederationConfig:
        path = Path(path)
        try:
            # ("utf-8-sig": a byte-order mark, which editors on Windows write, was "Invalid
            # statement (at line 1, column 1)")
            data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise ConfigurationError(f"config file {path} does not exist") from None
        except OSError as e:  # a directory, unreadable
            raise ConfigurationError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigurationError(f"config file {path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError(f"config file {path} is not valid TOML: {e}") from None
        # (arrays nested thousands deep: tomllib's RecursionError, ~3,000 lines of traceback
        # from `serve` and from Site.connect)
        # defence: config.nesting-is-a-configuration-error
        except RecursionError:
            raise ConfigurationError(f"config file {path} is not a federation config: its "
                                     "values are nested too deep") from None
        # (a value's error named the key, not the file: "[federation] protocol is missing"
        # for an empty file, where an operator holds several configs)
        try:
            return cls.from_dict(data, base=path.parent)
        # defence: config.errors-name-the-file
        except ConfigurationError as e:
            raise ConfigurationError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: Path | None = None) -> FederationConfig:
        def table(name: str) -> Mapping[str, Any]:
            value = data.get(name, {})
            # defence: config.tables-are-tables
            if not isinstance(value, Mapping):
                raise ConfigurationError(f"[{name}] must be a table")
            return value

        # a misspelt key or table would silently keep its default (a `clip_nrom` leaves the
        # clip at 1.0): everything must be known
        # defence: federation.config-keys-known
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ConfigurationError(f"unknown table(s) {unknown} in the federation config "
                                     f"(known: {sorted(_KEYS)})")
        for name, keys in _KEYS.items():
            value = data.get(name, {})
            extra = sorted(set(value) - keys) if isinstance(value, Mapping) else []
            if extra:
                raise ConfigurationError(f"unknown key(s) {extra} in [{name}] (known: "
                                         f"{sorted(keys)})")

        fed, job, upd = table("federation"), table("job"), table("update")
        msk, ck, dl, lim = table("masking"), table("ckks"), table("deadlines"), table("limits")
        protocol = _get(fed, "federation", "protocol", str)  # (one of PROTOCOLS: check())
        # defence: config.hex-fields-named
        try:
            trust_root = bytes.fromhex(_get(fed, "federation", "trust_root", str))
        except ValueError:
            raise ConfigurationError("[federation] trust_root must be hex") from None
        # (a second layer since check() refuses any trust root not of 32 bytes first:
        # config.field-types-when-made)
        if len(trust_root) != 32:
            raise ConfigurationError("[federation] trust_root must be a 32-byte Ed25519 key")
        initial = job.get("initial_model")
        # defence: config.initial-model-a-path
        if initial is not None and not isinstance(initial, str):
            raise ConfigurationError("[job] initial_model must be a path")
        pinned = job.get("initial_model_digest")
        try:
            initial_digest = None if pinned is None else bytes.fromhex(pinned)
        except (TypeError, ValueError):
            initial_digest = b""
        # defence: config.initial-digest-32-bytes
        if initial_digest is not None and len(initial_digest) != 32:
            raise ConfigurationError("[job] initial_model_digest must be 64 hex digits")
        neighbors = msk.get("neighbors", "complete")
        if not (neighbors in ("complete", "auto") or (isinstance(neighbors, int)
                                                      and not isinstance(neighbors, bool))):
            raise ConfigurationError("[masking] neighbors must be \"complete\", \"auto\" or an "
                                     f"even integer, got {neighbors!r}")
        threshold = msk.get("threshold", "auto")
        # (a second layer since check() refuses a threshold of another type first:
        # config.field-types-when-made)
        if not (threshold == "auto" or (isinstance(threshold, int)
                                        and not isinstance(threshold, bool))):
            raise ConfigurationError(f"[masking] threshold must be \"auto\" or an integer, "
                                     f"got {threshold!r}")
        holders = ck.get("key_holders", [1])
        if not isinstance(holders, list):  # (its items: check())
            raise ConfigurationError("[ckks] key_holders must be a non-empty list of distinct "
                                     "site ids")
        config = cls(
            name=_get(fed, "federation", "name", str, ""),
            protocol=protocol,
            aggregator=_get(fed, "federation", "aggregator", str),
            trust_root=trust_root,
            rounds=int(_positive("job", "rounds", _get(job, "job", "rounds", int, 3))),
            job_id=_get(job, "job", "id", str, "job"),
            server_learning_rate=float(_positive("job", "server_learning_rate", _get(
                job, "job", "server_learning_rate", (int, float), 1.0))),
            initial_model=None if initial is None else (base or Path(".")) / initial,
            initial_model_digest=initial_digest,
            clip_norm=float(_positive("update", "clip_norm", _get(
                upd, "update", "clip_norm", (int, float), 1.0))),
            max_samples=float(_positive("update", "max_samples", _get(
                upd, "update", "max_samples", (int, float), 10_000))),
            neighbors=neighbors,
            threshold=threshold,
            corrupt_fraction=float(_get(msk, "masking", "corrupt_fraction", (int, float), 0.2)),
            dropout_rate=float(_get(msk, "masking", "dropout_rate", (int, float), 0.1)),
            word_bits=_get(msk, "masking", "word_bits", int, 32),
            preset=_get(ck, "ckks", "preset", str, "add-only-4096"),
            key_holders=tuple(holders),
            min_sites=(None if ck.get("min_sites") is None or (  # (0: the default)
                type(ck.get("min_sites")) is int and ck.get("min_sites") == 0)
                       else _get(ck, "ckks", "min_sites", int)),
            deadlines=Deadlines(**{k: float(_positive("deadlines", k, _get(
                dl, "deadlines", k, (int, float), getattr(Deadlines(), k))))
                for k in ("open", "stage", "release")}),
            limits=Limits(
                max_message_bytes=int(_get(lim, "limits", "max_message_bytes", int,
                                           MAX_MESSAGE_BYTES)),
                max_chunk_bytes=int(_get(lim, "limits", "max_chunk_bytes", int,
                                         MAX_CHUNK_BYTES)),
                max_vector_length=int(_get(lim, "limits", "max_vector_length", int,
                                           100_000_000)),
                max_sites=int(_get(lim, "limits", "max_sites", int, 10_000)),
                stream_idle_seconds=float(_get(lim, "limits", "stream_idle_seconds",
                                               (int, float), 60.0)),
                upload_slots=int(_get(lim, "limits", "upload_slots", int, 8))),
        )
        config.check()
        return config

    def check(self) -> None:
        # (check() compared values whatever their type: init_federation(threshold=7.9) or
        # rounds=True wrote a federation every party refused, masking_round() truncated a
        # threshold of 7.9 to 7, and clip_norm="1" raised TypeError from math.isfinite)
        # defence: config.field-types-when-made
        wrong = _wrong_type(self)
        if wrong is not None:
            raise ConfigurationError(wrong)
        lim = self.limits
        # (only loading a config checked these: `init_federation(protocol="paillier")` or
        # with no key holders wrote a whole federation that every party then refused)
        # defence: config.protocol-and-holders-checked-when-made
        if self.protocol not in PROTOCOLS:
            raise ConfigurationError(f"[federation] protocol must be one of {PROTOCOLS}, "
                                     f"got {self.protocol!r}")
        # defence: config.key-holders-site-ids
        if (not isinstance(self.key_holders, tuple) or not self.key_holders
                or not all(type(h) is int and h >= 1 for h in self.key_holders)
                # (init refused [1, 1]; the config took it)
                or len(set(self.key_holders)) != len(self.key_holders)):
            raise ConfigurationError("[ckks] key_holders must be a non-empty list of distinct "
                                     "site ids")
        # ranges past which a value can only be a slip (a deadline of 1e300 s is "never", a
        # max_samples of 1e300 makes every real weight too small to encode): refused here, by
        # name, rather than as a stalled job or a refusal at every site's first submit
        # (a degree or threshold of -1 or 0 loaded, and was refused only as the first round
        # was made, without its key's name; the roster size bounds them further there)
        # defence: config.degree-and-threshold-ranges
        for name, value in (("[masking] neighbors", self.neighbors),
                            ("[masking] threshold", self.threshold)):
            if isinstance(value, int) and not 1 <= value < 1_000_000:
                raise ConfigurationError(f"{name} must be in [1, 1,000,000), got {value!r}")
        for name, number, low, high in (
                ("[job] rounds", self.rounds, 1, MAX_ROUNDS),
                ("[limits] max_sites", lim.max_sites, 3, 1_000_000),
                ("[limits] max_vector_length", lim.max_vector_length, 1, 2**31 - 1)):
            # defence: federation.config-ranges
            if not low <= number <= high:
                raise ConfigurationError(f"{name} must be in [{low}, {high:,}], got {number!r}")
        # (and below: a deadline or idle timeout of 1e-320 s closed every stage at once, a
        # clip_norm of 1e308 left the quantiser no resolution)
        for name, value, bottom, top in (
                ("[job] server_learning_rate", self.server_learning_rate, 1e-6, 1e6),
                ("[update] clip_norm", self.clip_norm, 1e-6, 1e6),
                ("[update] max_samples", self.max_samples, 0, 1e12),
                *((f"[deadlines] {k}", getattr(self.deadlines, k), 1, MAX_DEADLINE_SECONDS)
                  for k in ("open", "stage", "release")),
                ("[limits] stream_idle_seconds", lim.stream_idle_seconds, 1, 86_400)):
            # defence: config.number-ranges
            if not (math.isfinite(value) and value <= top
                    and (bottom <= value if bottom else value > 0)):
                lo = f"[{bottom:g}" if bottom else "(0"
                raise ConfigurationError(f"{name} must be in {lo}, {top:g}], got {value!r}")
        # defence: config.chunk-bytes-lower-bound
        if not SDK_CHUNK_BYTES <= lim.max_chunk_bytes <= MAX_CHUNK_BYTES:
            raise ConfigurationError(f"[limits] max_chunk_bytes must be in [{SDK_CHUNK_BYTES} "
                                     f"(the SDK's chunk), {MAX_CHUNK_BYTES}], got "
                                     f"{lim.max_chunk_bytes}")
        # defence: config.message-bytes-above-a-chunk
        if not lim.max_chunk_bytes + 4096 <= lim.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ConfigurationError(f"[limits] max_message_bytes must be in [max_chunk_bytes "
                                     f"+ 4096, {MAX_MESSAGE_BYTES}], got {lim.max_message_bytes}")
        # defence: config.upload-slots-bounded
        if not 1 <= lim.upload_slots <= 1024:
            raise ConfigurationError(f"[limits] upload_slots must be in [1, 1024], got "
                                     f"{lim.upload_slots}")
        # defence: config.fractions-in-range
        if not 0 <= self.corrupt_fraction < 1 or not 0 <= self.dropout_rate < 1:
            raise ConfigurationError("[masking] corrupt_fraction and dropout_rate must be in "
                                     "[0, 1)")
        # defence: config.word-bits-32-or-64
        if self.word_bits not in (32, 64):
            raise ConfigurationError(f"[masking] word_bits must be 32 or 64, got "
                                     f"{self.word_bits}")
        # defence: config.job-id-shape
        if (not isinstance(self.job_id, str) or not 1 <= len(self.job_id) <= 64
                or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in self.job_id)):
            raise ConfigurationError("[job] id must be 1-64 letters, digits, '-', '_' or '.', "
                                     f"got {self.job_id!r}")
        # the name starts every round id ("name/job/round-n") and names the CA: '/' made
        # one federation's round ids read as another's, and a line break or escape in it
        # reached every log line naming a round
        # defence: config.federation-name-shape
        if (not isinstance(self.name, str) or len(self.name) > 64
                or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in self.name)):
            raise ConfigurationError("[federation] name must be up to 64 letters, digits, '-', "
                                     f"'_' or '.', got {self.name!r}")
        from secagg.federation.kit import _dial_host, _port_ok

        # the port (as init checks it) and the host one a certificate can name ('http://host:1'
        # and 'a b:1' were loaded, served, and could not be dialled)
        # defence: config.aggregator-address-dialable
        if (not self.aggregator.rpartition(":")[0] or not _port_ok(self.aggregator)
                or _dial_host(self.aggregator) is None):
            raise ConfigurationError(f"[federation] aggregator must be host:port with a port "
                                     f"in 1-65535, got {self.aggregator!r}")
        from secagg.ckks.presets import PRESETS

        if self.preset not in PRESETS:
            raise ConfigurationError(f"[ckks] preset must be one of {sorted(PRESETS)}, got "
                                     f"{self.preset!r}")
        if self.min_sites is not None and not 1 <= self.min_sites <= self.limits.max_sites:
            raise ConfigurationError(f"[ckks] min_sites must be a number of sites, got "
                                     f"{self.min_sites}")

    def to_toml(self, *, base: Path | None = None) -> str:
        data: dict[str, Any] = {
            "federation": {"name": self.name, "protocol": self.protocol,
                           "aggregator": self.aggregator, "trust_root": self.trust_root.hex()},
            "job": {"id": self.job_id, "rounds": self.rounds,
                    "server_learning_rate": self.server_learning_rate},
            "update": {"clip_norm": self.clip_norm, "max_samples": self.max_samples},
            "masking": {"neighbors": self.neighbors, "threshold": self.threshold,
                        "corrupt_fraction": self.corrupt_fraction,
                        "dropout_rate": self.dropout_rate, "word_bits": self.word_bits},
            "ckks": {"preset": self.preset, "key_holders": list(self.key_holders),
                     **({} if self.min_sites is None else {"min_sites": self.min_sites})},
            "deadlines": {"open": self.deadlines.open, "stage": self.deadlines.stage,
                          "release": self.deadlines.release},
            "limits": {"max_message_bytes": self.limits.max_message_bytes,
                       "max_chunk_bytes": self.limits.max_chunk_bytes,
                       "max_vector_length": self.limits.max_vector_length,
                       "max_sites": self.limits.max_sites,
                       "stream_idle_seconds": self.limits.stream_idle_seconds,
                       "upload_slots": self.limits.upload_slots},
        }
        if self.initial_model_digest is not None:
            data["job"]["initial_model_digest"] = self.initial_model_digest.hex()
        if self.initial_model is not None:
            model = self.initial_model
            if base is not None and model.is_absolute() and model.is_relative_to(base):
                model = model.relative_to(base)
            data["job"]["initial_model"] = str(model)
        return tomli_w.dumps(data)

    # ---- the protocols' round configurations --------------------------------------------------

    @property
    def masking_neighbors(self) -> int | str | None:
        return None if self.neighbors == "complete" else self.neighbors

    @property
    def masking_threshold(self) -> int | None:
        return None if self.threshold == "auto" else int(self.threshold)

    def settings_digest(self) -> bytes:
        """A digest of the settings each party reads from its own copy of this config and
        that must agree for a round to mean what every site thinks: the protocol, the job,
        how a site clips and weighs its update ([update] clip_norm, max_samples: a site with
        another max_samples weighed itself wrongly, silently), and the protocols' parameters.
        The aggregator publishes its own with every round; a site whose own differs names
        its config as the cause, where it would otherwise see a refused signature or a
        wrong average. (Not a defence: a lying aggregator can publish any value, and gains
        nothing by it; deadlines, limits and addresses are each party's own.)"""
        import json

        from secagg._encoding import digest

        shared = {"protocol": self.protocol, "federation": self.name,
                  "trust_root": self.trust_root.hex(), "job": self.job_id,
                  "clip_norm": self.clip_norm, "max_samples": self.max_samples,
                  "neighbors": self.neighbors, "threshold": self.threshold,
                  "corrupt_fraction": self.corrupt_fraction,
                  "dropout_rate": self.dropout_rate, "word_bits": self.word_bits,
                  "preset": self.preset, "key_holders": list(self.key_holders),
                  "min_sites": self.min_sites}
        return digest("federation-settings", json.dumps(shared, sort_keys=True))

    def signed_settings_digest(self) -> bytes:
        """What the federation's trust root signs of this config (a site's ``settings.sig``,
        secagg.federation.kit): every setting of :meth:`settings_digest`, and the job's start
        and length (the initial model's digest, the rounds, the server learning rate). Not
        the addresses, deadlines or limits: each party's own, which a site may change."""
        from secagg._encoding import digest

        return digest("federation-signed-settings", self.settings_digest(),
                      (self.initial_model_digest or b"").hex(), self.rounds,
                      repr(float(self.server_learning_rate)))

    def key_holder_for(self, round_number: int) -> int:
        return self.key_holders[(round_number - 1) % len(self.key_holders)]

    def masking_round(self, round_id: str, roster: Mapping[int, bytes],
                      vector_length: int, *, model_digest: bytes) -> Any:
        """The masking round configuration (its checks run here: thresholds, the bound), bound
        to the digest of the model the round starts from."""
        from secagg.masking import RoundConfig

        return RoundConfig(round_id, roster, vector_length, threshold=self.masking_threshold,
                           neighbors=self.masking_neighbors,  # type: ignore[arg-type]
                           corrupt_fraction=self.corrupt_fraction,
                           dropout_rate=self.dropout_rate, clip=self.clip_norm, max_weight=1.0,
                           word_bits=self.word_bits, model_digest=model_digest)

    def round_id_for(self, round_number: int) -> str:
        """The id of this job's round ``round_number``: what the aggregator names it and the
        only name a site accepts for it."""
        return f"{self.name or 'federation'}/{self.job_id}/round-{round_number}"

    def check_round_id(self, round_id: str, round_number: int) -> None:
        """A round id names this federation, this job and this round number, within the
        job's rounds: the aggregator cannot replay a round under another job's name or run
        rounds beyond ``[job] rounds``."""
        # defence: federation.round-id-checked
        if (type(round_number) is not int or not 1 <= round_number <= self.rounds
                or round_id != self.round_id_for(round_number)):
            raise ConfigurationError(
                f"round id {round_id!r} is not round {round_number} of job {self.job_id!r} of "
                f"federation {self.name!r} (which has rounds 1 to {self.rounds})")

    def _ckks_parameters(self) -> dict[str, Any]:
        return {"preset": self.preset, "clip": self.clip_norm, "max_weight": 1.0,
                "min_sites": self.min_sites or 0, "corrupt_fraction": self.corrupt_fraction}

    def check_fits_roster(self, roster: Mapping[int, bytes]) -> Any:
        """Refuse settings no round of this roster could run (masking: a threshold outside
        its range, a SecAgg+ degree for too few sites; CKKS: min_sites beyond the roster, a
        key holder not on it); for masking, the round configuration they make (its
        threshold). Checked where a site connects, and where the operator signs settings or
        removes a site: each was found only at a round, one deadline after another."""
        if self.protocol == "masking":
            return self.masking_round(self.round_id_for(1), roster, 1, model_digest=bytes(32))
        missing = sorted(set(self.key_holders) - set(roster))
        if missing:
            raise ConfigurationError(f"[ckks] key_holders names site {missing[0]}, which the "
                                     "roster does not hold")
        self.check_ckks_roster(len(roster))
        return None

    def check_ckks_roster(self, sites: int) -> int:
        """Refuse, as a job starts, a CKKS configuration no round of a roster of ``sites``
        sites could use (min_sites beyond the roster or below the colluders' reach, a clip
        past the preset's headroom or float64's precision): each round's key announcement
        would otherwise be refused, one round deadline after another."""
        from secagg.ckks.round import check_round_parameters

        try:
            return check_round_parameters(sites, **self._ckks_parameters())
        except ConfigurationError as e:
            raise ConfigurationError(f"no CKKS round of this job could run with {sites} "
                                     f"sites: {e}") from None

    def ckks_round(self, round_number: int, round_id: str, roster: Mapping[int, bytes],
                   announcement: Any, vector_length: int, *, model_digest: bytes) -> Any:
        """The CKKS round configuration for a key announced by the key holder this
        federation's configuration names for ``round_number`` (never whoever the aggregator
        relays: a site encrypting to another holder would hand it its update), for this
        round (the announcement's epoch is the round id)."""
        from secagg.ckks import CkksRoundConfig

        self.check_round_id(round_id, round_number)
        holder = self.key_holder_for(round_number)
        # defence: federation.ckks-holder-pinned
        if getattr(announcement, "holder", None) != holder:
            raise ConfigurationError(
                f"round {round_number}'s key must be announced by site {holder} (the "
                f"federation's key holder for it), not by site "
                f"{getattr(announcement, 'holder', None)}")
        # (the announcement's epoch must be the round id: CkksRoundConfig checks it)
        return CkksRoundConfig(round_id, roster, announcement, (holder,), vector_length,
                               model_digest=model_digest, **self._ckks_parameters())
