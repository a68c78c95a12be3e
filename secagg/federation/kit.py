"""Writing a trial federation: the CA, the roster signer, the aggregator's kit and one kit per site.

Layout of ``secagg federation init --dir DIR``::

    DIR/federation.toml              the federation config (public)
    DIR/roster.bin                   the signed roster (public)
    DIR/ca/ca.crt, ca/ca.key         the CA (keep ca.key offline)
    DIR/trust-root/signer.key        the roster signer's Ed25519 key (keep offline)
    DIR/aggregator/                  server.crt, server.key, ca.crt, federation.toml, roster.bin
    DIR/sites/site-<id>/             client.crt, client.key, identity.key, ca.crt,
                                     federation.toml, settings.sig, roster.bin,
                                     trust-root.pin

Private keys are written 0600 and each one exists in exactly one directory: no private key is
copied from one party's directory to another's. With ``secagg federation csr`` a site makes its
own TLS key, identity key and request, so that nothing private ever travels; the operator then
signs it with ``secagg federation sign``, which also re-signs the roster with the new site in it.
A site takes the federation's files only under the trust root it pinned (``trust-root.pin``,
signed with its identity key: :func:`write_trust_pin`), given to it out of band.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secagg.errors import ConfigurationError, InvalidMessage
from secagg.federation import pki
from secagg.federation.config import FederationConfig, Limits
from secagg.federation.pki import read_private_key
from secagg.hazmat import signing
from secagg.hazmat.secret import SecretBytes, reveal
from secagg.hazmat.signing import IdentityKey
from secagg.roster import Roster, RosterSigner, SignedRoster, signed_settings_message
from secagg.v1 import roster_pb2

CONFIG_FILE = "federation.toml"
ROSTER_FILE = "roster.bin"


# ---- the signed roster on disk ------------------------------------------------------------


def roster_to_bytes(signed: SignedRoster) -> bytes:
    r = signed.roster
    msg = roster_pb2.SignedRoster(
        roster=roster_pb2.Roster(
            federation=r.federation, version=r.version, graph_seed=r.graph_seed,
            sites=[roster_pb2.RosterSite(site_id=s, identity_public_key=r[s]) for s in r]),
        signature=signed.signature)
    return msg.SerializeToString(deterministic=True)


def roster_from_bytes(data: bytes) -> SignedRoster:
    msg = roster_pb2.SignedRoster()
    try:
        msg.ParseFromString(data)
    except Exception:  # protobuf's DecodeError and friends
        raise InvalidMessage("roster") from None
    sites = {int(s.site_id): bytes(s.identity_public_key) for s in msg.roster.sites}
    # defence: roster.sites-distinct
    if len(sites) != len(msg.roster.sites):
        raise InvalidMessage("roster")
    try:
        roster = Roster(sites, bytes(msg.roster.graph_seed), federation=msg.roster.federation,
                        version=msg.roster.version)
    except ConfigurationError:
        raise InvalidMessage("roster") from None
    return SignedRoster(roster, bytes(msg.signature))


def load_roster(path: Path, trust_root: bytes) -> Roster:
    """The roster at ``path``, if the federation's trust root signed it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"roster file {path} does not exist") from None
    # (a damaged file was called "not signed by the federation's trust root", as if it were
    # another federation's)
    try:
        signed = roster_from_bytes(data)
    except InvalidMessage:
        raise ConfigurationError(f"roster file {path} is damaged (not a signed roster: "
                                 "truncated, or another file): copy it again") from None
    try:
        return signed.open(trust_root)
    except InvalidMessage:
        raise ConfigurationError(f"roster file {path} is not signed by the federation's "
                                 "trust root (another federation's roster, or the config's "
                                 "[federation] trust_root is another federation's)") from None


# ---- identity keys on disk ----------------------------------------------------------------


def identity_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_identity(path: Path) -> IdentityKey:
    data = read_private_key(path)
    try:
        key = serialization.load_pem_private_key(reveal(data), password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(f"{path} is not an unencrypted PEM private key") from None
    # defence: kit.identity-ed25519
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} is not an Ed25519 private key")
    return IdentityKey(key)


# ---- the trust root a site accepted ------------------------------------------------------

PIN_FILE = "trust-root.pin"
PIN_CONTEXT = b"secagg/v1 site trust root pin\x00"
MAX_PIN_BYTES = 4096  # (a pin is ~200 bytes)


def parse_trust_root(text: object) -> bytes:
    """A federation's trust root as its operator reads it out: 64 hex digits (the
    ``[federation] trust_root`` of the operator's own federation.toml, as ``init`` prints it);
    spaces and colons between them are allowed."""
    if isinstance(text, bytes) and len(text) == 32:
        return text
    value = b""
    if isinstance(text, str):
        try:
            value = bytes.fromhex("".join(text.split()).replace(":", ""))
        except ValueError:
            value = b""
    # defence: federation.trust-root-32-bytes
    if len(value) != 32:
        raise ConfigurationError(
            f"a trust root is 64 hex digits (the federation's [federation] trust_root, which "
            f"its operator gives each site out of band), got {text!r:.80}")
    return value


def write_trust_pin(d: Path, identity: IdentityKey, trust_root: bytes) -> None:
    """Pin, in a site's directory, the federation's trust root the site accepted (from the
    operator, out of band), signed with the site's identity key: whoever carries the
    federation's files to the site cannot write a pin of their own without that key."""
    pin = {"trust_root": trust_root.hex(),
           "signature": identity.sign(PIN_CONTEXT + trust_root).hex()}
    pki.write_public(d / PIN_FILE, json.dumps(pin, indent=2).encode())


def _read_small(path: Path, limit: int) -> bytes:
    """A small public file's bytes: a regular file of at most ``limit`` bytes (a FIFO there
    would hang the read, a link to /dev/zero fill the memory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise ValueError("not a small regular file")
        return f.read(limit + 1)


def _read_site_file(path: Path, what: str, missing: str) -> bytes:
    """A pin's or a settings signature's bytes; a ConfigurationError saying ``missing`` if
    there is none, or what is wrong with the file."""
    try:
        return _read_small(path, MAX_PIN_BYTES)
    except FileNotFoundError:
        raise ConfigurationError(missing) from None
    except OSError as e:
        raise ConfigurationError(f"cannot read {path}: {e.strerror}") from None
    # (a FIFO there hung the site at connect, a link to /dev/zero filled its memory)
    # defence: federation.pin-read-bounded
    except ValueError:
        raise ConfigurationError(f"{path} is not a regular file of at most {MAX_PIN_BYTES} "
                                 f"bytes ({what} is)") from None


def load_trust_pin(d: Path, identity: IdentityKey) -> bytes:
    """The trust root this site pinned (:func:`write_trust_pin`), if its identity key signed
    the pin."""
    path = d / PIN_FILE
    data = _read_site_file(path, "a trust root pin", (
        f"site directory {d} lacks {PIN_FILE}, the federation trust root this site "
        "accepted (`federation init` and `federation csr --trust-root` write it): ask the "
        "federation's operator for the trust root out of band, never from the files you "
        f"were sent, and run `secagg federation pin --dir {d} --trust-root HEX`"))
    try:
        pin = json.loads(data)
        trust_root = bytes.fromhex(pin["trust_root"])
        signature = bytes.fromhex(pin["signature"])
        if len(trust_root) != 32:
            raise ValueError("not a key")
        # defence: federation.pin-signed-by-the-sites-identity
        signing.verify(identity.public_bytes, signature, PIN_CONTEXT + trust_root)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, InvalidMessage):
        raise ConfigurationError(
            f"{path} is not a trust root pinned by this site's identity key (damaged, or "
            "written by someone else): ask the federation's operator for the trust root out "
            f"of band and run `secagg federation pin --dir {d} --trust-root HEX`") from None
    return trust_root


def pin_trust_root(directory: Path | str, trust_root: object, *,
                   replace: bool = False) -> bytes:
    """Pin ``trust_root`` in an existing site directory (``secagg federation pin``). A pin of
    another root is replaced only with ``replace``: a note in a parcel saying "your pin is
    outdated, run pin ..." replaced it silently."""
    d = directory_path(directory, "site directory")
    value = parse_trust_root(trust_root)
    try:
        identity = load_identity(d / "identity.key")
    except FileNotFoundError:
        raise ConfigurationError(f"{d} holds no identity.key: pin the trust root in a site's "
                                 "directory") from None
    except OSError as e:
        raise ConfigurationError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        pinned: bytes | None = load_trust_pin(d, identity)
    except ConfigurationError:
        pinned = None  # (none, or not this site's: nothing of this site's to keep)
    # defence: federation.pin-kept-unless-replaced
    if pinned is not None and pinned != value and not replace:
        raise ConfigurationError(
            f"{d} pins another trust root ({pinned.hex()[:16]}...): a federation's trust root "
            "does not change; to pin a new federation's (confirmed with its operator out of "
            "band), give --replace")
    write_trust_pin(d, identity, value)
    return value


# ---- the federation's signature over its shared settings ------------------------------------

SETTINGS_SIG_FILE = "settings.sig"
SETTINGS_SERIAL_FILE = "trust-root/settings.serial"  # the federation's last serial (operator's)


def write_settings_signature(d: Path, config: FederationConfig, signer: RosterSigner,
                             serial: int) -> None:
    """Sign, with the federation's roster signer, the settings of ``config`` every party
    shares (``FederationConfig.signed_settings_digest``) and their ``serial``, into
    ``d/settings.sig``."""
    pki.write_public(d / SETTINGS_SIG_FILE, _settings_sig_bytes(config, signer, serial))


def _settings_sig_bytes(config: FederationConfig, signer: RosterSigner, serial: int) -> bytes:
    signature = signer.sign_settings(config.signed_settings_digest(), serial)
    return json.dumps({"serial": serial, "signature": signature.hex()}, indent=2).encode()


def check_settings_signature(d: Path, config: FederationConfig) -> int:
    """The serial of a site's config's shared settings, if its (pinned) trust root signed
    them; a ConfigurationError otherwise."""
    return _verified_settings_sig(d, config)[0]


def _verified_settings_sig(d: Path, config: FederationConfig) -> tuple[int, bytes]:
    """check_settings_signature's serial and the bytes of the settings.sig it verified (sign
    hands on those bytes, not a second read of a file that may have changed since)."""
    path = d / SETTINGS_SIG_FILE
    remedy = ("the federation's operator signs them with `secagg federation sign-config` "
              "(init and sign write settings.sig)")
    data = _read_site_file(path, "a settings signature", (
        f"directory {d} lacks {SETTINGS_SIG_FILE}, the federation's signature over the "
        f"settings every party shares: {remedy}"))
    try:
        record = json.loads(data)
        serial = record["serial"]
        if type(serial) is not int or not 1 <= serial < 2**63:
            raise ValueError("not a serial")
        signature = bytes.fromhex(record["signature"])
        # defence: federation.settings-signed-by-the-trust-root
        signing.verify(config.trust_root, signature,
                       signed_settings_message(config.signed_settings_digest(), serial))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, InvalidMessage):
        raise ConfigurationError(
            f"the shared settings of {d / CONFIG_FILE} (the protocol, [job] id, rounds and "
            "initial model, [update], [masking], [ckks]) are not the ones the federation's "
            f"trust root signed in {path}: whoever carried the files may have changed them; "
            f"{remedy}") from None
    return int(serial), data


def _next_settings_serial(fed: Path) -> int:
    """The federation's next settings serial: above the one its counter
    (trust-root/settings.serial, the operator's) and its own settings.sig hold. A counter
    lost (a directory rebuilt from the offline keys) restarted at 1, and a second settings
    of one serial passed a site's record (a helper's attack); one that is no positive
    integer is refused."""
    path = fed / SETTINGS_SERIAL_FILE
    try:
        text = _read_small(path, 64).decode("ascii").strip()
        last = int(text) if text.isdigit() else -1
    except FileNotFoundError:
        last = 0
    except (OSError, ValueError, UnicodeDecodeError):
        last = -1
    # defence: federation.settings-serial-file-checked
    if last < 0:
        raise ConfigurationError(f"{path}, the federation's last settings serial, is not a "
                                 "positive integer: restore it (sites refuse a serial below "
                                 "one they have used)")
    try:  # (the serial the federation's own settings were last signed with: a floor)
        signed = json.loads(_read_small(fed / SETTINGS_SIG_FILE, MAX_PIN_BYTES))["serial"]
        signed = signed if type(signed) is int else 0
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        signed = 0
    # defence: federation.settings-serial-increases
    serial = max(last, signed) + 1
    pki.write_public(path, f"{serial}\n".encode())
    return serial


def sign_settings(federation: Path | str, config_path: Path | str | None = None, *,
                  describe: Callable[[FederationConfig, Any, int], None] | None = None) -> Path:
    """``secagg federation sign-config``: sign the shared settings of ``config_path`` (by
    default the federation's own federation.toml) with the federation's roster signer and
    its next serial, into settings.sig beside it. Returns that file's path. ``describe``:
    told, under the federation's lock, the config signed, its masking round configuration
    (None for CKKS) and the serial."""
    fed = Path(federation)
    path = Path(config_path) if config_path is not None else fed / CONFIG_FILE
    own = FederationConfig.load(fed / CONFIG_FILE)
    with _federation_lock(fed):
        signer = _federation_signer(fed, own)
        config = FederationConfig.load(path)
        config.check()
        # defence: federation.sign-config-own-trust-root
        if signer.public_key != config.trust_root:
            raise ConfigurationError(f"{path} names another trust root than this federation's "
                                     "signer: it is not this federation's config")
        # settings the roster cannot take are never signed (sites refuse them at connect)
        roster = load_roster(fed / ROSTER_FILE, signer.public_key)
        # defence: federation.sign-config-refuses-what-the-roster-cannot-take
        made = config.check_fits_roster(roster)
        _check_model_within_limit(config)
        serial = _next_settings_serial(fed)
        write_settings_signature(path.parent, config, signer, serial)
        if describe is not None:
            describe(config, made, serial)
    return path.parent / SETTINGS_SIG_FILE


def _check_model_within_limit(config: FederationConfig) -> None:
    """Refuse settings whose job model (a new job's, larger than the last: init wrote the
    last one's size as ``[limits] max_vector_length``) is more values than the config's limit:
    the aggregator would not start, and every site would refuse the model as the aggregator's
    lie. Read from the archive's headers; a model that cannot be read is the aggregator's to
    name as it starts."""
    from secagg.model import _declared_values

    path = config.initial_model
    if path is None or not Path(path).is_file():
        return
    try:
        declared = _declared_values(Path(path))
    except (OSError, ValueError, zipfile.BadZipFile):
        return
    # defence: federation.sign-config-model-within-the-limit
    if declared > config.limits.max_vector_length:
        raise ConfigurationError(
            f"the job's model {path} holds {declared:,} values, more than [limits] "
            f"max_vector_length ({config.limits.max_vector_length:,}): the aggregator would "
            "not start and every site would refuse it; raise the limit in the config you "
            "sign (it is each party's own: every site needs it too)")


# what a site's and the aggregator's directories hold that others must not be able to
# change (check_kit_directory)
SITE_ENTRIES = (CONFIG_FILE, ROSTER_FILE, "ca.crt", "client.crt", "client.key", "identity.key",
                PIN_FILE, SETTINGS_SIG_FILE)
AGGREGATOR_ENTRIES = (CONFIG_FILE, ROSTER_FILE, "ca.crt", "server.crt", "server.key")


def directory_path(directory: object, what: str) -> Path:
    """``directory`` (a str or an os.PathLike of one) as a Path; a ConfigurationError naming
    ``what`` for anything else (bytes, None and 3 raised pathlib's TypeError)."""
    # defence: kit.directory-argument-typed
    if isinstance(directory, str | os.PathLike):
        with contextlib.suppress(TypeError):  # (a PathLike of bytes)
            return Path(directory)
    raise ConfigurationError(f"the {what} must be a path (str or pathlib.Path), got "
                             f"{type(directory).__name__}")


def check_history_directory(d: Path, entries: Sequence[str]) -> None:
    """Refuse a site's history directory (clients.history) another user could change, as
    :func:`check_kit_directory` refuses its kit's: a user who could delete or roll back the
    record of the models this site sent updates against could have it send a second update
    against one, and an aggregator subtract two sums to learn one site's update. It was not
    checked: a 0777 ``history_dir``, or a history file another user owned at 0666, was
    taken."""
    # defence: sdk.history-directory-not-shared
    _check_not_shared(d, inside=entries, kind="the site's history directory",
                      holds="the record of the models this site sent updates against (a "
                            "second update against one lets an aggregator learn this site's "
                            "update)")


def check_kit_directory(d: Path, entries: Sequence[str]) -> None:
    """Refuse a site's or the aggregator's directory another user could change (the
    directory, its ``entries`` or a directory above it: _check_not_shared). Only `sign`,
    `remove-site` and `init` checked: the aggregator served, and a site connected, from a
    0777 directory whose config (its trust root), roster and CA anyone could replace."""
    # defence: federation.kit-directory-not-shared
    _check_not_shared(d, inside=entries)


@dataclass(frozen=True)
class SiteKit:
    """A site's directory, loaded: everything ``clients.Site.connect`` needs."""

    directory: Path
    site_id: int
    config: FederationConfig
    roster: Roster
    identity: IdentityKey
    ca_pem: bytes
    cert_pem: bytes
    tls_key: SecretBytes = field(repr=False)  # the TLS private key: never in a repr
    settings_serial: int = 0  # the serial of the signed settings (settings.sig)

    @property
    def key_pem(self) -> bytes:
        """The TLS private key's PEM bytes (for gRPC's credentials)."""
        return reveal(self.tls_key)

    @classmethod
    def load(cls, directory: Path | str) -> SiteKit:
        d = directory_path(directory, "site directory")
        if not d.is_dir():
            raise ConfigurationError(f"site directory {d} does not exist" if not d.exists()
                                     else f"{d} is not a directory (a site directory holds "
                                          "its keys, certificates, roster and config)")
        check_kit_directory(d, SITE_ENTRIES)
        config = FederationConfig.load(d / CONFIG_FILE)
        roster = load_roster(d / ROSTER_FILE, config.trust_root)
        try:
            cert_pem = (d / "client.crt").read_bytes()
            key_pem = read_private_key(d / "client.key")
            ca_pem = (d / "ca.crt").read_bytes()
        except FileNotFoundError as e:
            raise ConfigurationError(f"site directory {d} lacks {Path(e.filename).name}"
                                     ) from None
        except OSError as e:
            raise ConfigurationError(f"cannot read {e.filename}: {e.strerror}") from None
        pki.check_tls_files(key_pem, cert_pem, ca_pem, d, chain_to_ca=True)
        site_id = pki.site_id_from_pem(cert_pem)
        if site_id is None:
            raise ConfigurationError(f"{d / 'client.crt'} names no site")
        try:
            identity = load_identity(d / "identity.key")
        except FileNotFoundError:
            raise ConfigurationError(f"site directory {d} lacks identity.key") from None
        except OSError as e:
            raise ConfigurationError(f"cannot read {e.filename}: {e.strerror}") from None
        # defence: federation.kit-identity-is-the-rosters
        if roster.get(site_id) != identity.public_bytes:
            # (another site's client.crt beside this site's identity.key was told as a wrong
            # identity key of that other site)
            owner = next((s for s, k in roster.items() if k == identity.public_bytes), None)
            if owner is not None:
                raise ConfigurationError(
                    f"site {site_id}'s identity key is not the roster's: {d / 'client.crt'} is "
                    f"site {site_id}'s certificate, but identity.key is site {owner}'s (the "
                    f"files of two sites are mixed in {d})")
            raise ConfigurationError(f"site {site_id}'s identity key is not the roster's")
        # The files that name the federation (its config's trust root, then the roster that
        # root signs) reach a site from its operator, through hands that may be the
        # aggregator's (ca.crt too, which no root vouches for: a CA of theirs only lets them
        # stand in for the aggregator, whom every message's roster signature distrusts): a
        # whole federation of someone else's making (their CA and signer, a roster of their
        # sites beside this one), taken as this site's, had its update alone in a "sum" (a
        # helper's attack on csr/sign). The site trusts only the root it pinned.
        # defence: federation.kit-trust-root-pinned
        pinned = load_trust_pin(d, identity)
        if pinned != config.trust_root:
            raise ConfigurationError(
                f"{d / CONFIG_FILE} names the trust root {config.trust_root.hex()[:16]}..., not "
                f"{pinned.hex()[:16]}..., the one this site pinned: these files are another "
                "federation's (check the trust root with the federation's operator, out of "
                "band, before using them)")
        # and the settings every party shares, which the same hands carry: a site told
        # another key holder encrypted to whoever that was, one told a lower threshold shared
        # its keys more thinly, one told another initial model trained from it
        # defence: federation.kit-settings-signed
        serial = check_settings_signature(d, config)
        return cls(d, site_id, config, roster, identity, ca_pem, cert_pem, key_pem, serial)


# ---- init --------------------------------------------------------------------------------


def init_federation(directory: Path | str, sites: int, *, protocol: str = "masking",
                    key_holders: Sequence[int] = (1,), hosts: Sequence[str] = (),
                    aggregator: str = "localhost:50051", name: str = "trial",
                    initial_model: Path | None = None, **overrides: object) -> FederationConfig:
    """Write a whole trial federation into ``directory`` (which must be empty or absent)."""
    d = Path(directory)
    if (d / INIT_INCOMPLETE).exists():
        raise ConfigurationError(f"{d} holds a federation whose `init` was cut short (it has "
                                 "no aggregator directory): remove it and run init again")
    if d.exists() and any(d.iterdir()):
        raise ConfigurationError(f"{d} is not empty: refusing to overwrite a federation")
    # an existing directory keeps its mode: one others can write let any local user swap
    # the config's trust root and the roster for the operator's next `sign` to re-sign
    # defence: federation.init-refuses-a-shared-directory
    _check_not_shared(d)
    if not 3 <= sites <= 10_000:
        raise ConfigurationError(f"--sites must be in [3, 10000], got {sites}")
    # (an int raised TypeError from tuple(); a masking federation's holders are written
    # and unused: the demo makes both protocols' federations with one call)
    if isinstance(key_holders, str | bytes) or not isinstance(key_holders, Sequence):
        raise ConfigurationError(f"key_holders must be a sequence of site ids, got "
                                 f"{key_holders!r}")
    if not set(key_holders) <= set(range(1, sites + 1)):
        raise ConfigurationError(f"--key-holders must be sites in 1..{sites}")
    # defence: federation.init-key-holders-distinct
    if len(set(key_holders)) != len(tuple(key_holders)):
        raise ConfigurationError("--key-holders names a site twice")
    # Everything is checked before the first file is written: a failed init used to leave the
    # CA's and the roster signer's private keys behind, and the re-run was refused.
    # defence: federation.init-checks-first
    # the host sites dial must be one the server certificate names (every site failed the
    # hostname check when --aggregator named a host and --host did not repeat it)
    # defence: federation.init-names-the-aggregator-host
    # (named as the flag: "[federation] aggregator must be host:port" named a file init had
    # not written yet)
    if not _port_ok(aggregator):
        raise ConfigurationError(f"--aggregator must be HOST:PORT with a port in 1-65535, got "
                                 f"{aggregator!r:.80}")
    dialled = _dial_host(aggregator)
    # (a host no certificate can name, "bad host:50051", was written to every config, and
    # every site would fail the TLS check)
    # defence: federation.init-aggregator-host-nameable
    if dialled is None and ":" in aggregator and not aggregator.startswith(("unix:", "[")):
        raise ConfigurationError(f"--aggregator {aggregator!r} names no host a certificate can "
                                 "name: give HOST:PORT with a DNS name or an IP address")
    hosts = [*hosts, *([dialled] if dialled and dialled not in (*hosts, *DEFAULT_HOSTS) else [])]
    pki.check_hosts(hosts)
    if not 1 <= len(name) <= 40 or not name.isprintable():
        raise ConfigurationError(f"--name must be 1-40 printable characters, got {name!r}")
    initial_digest = None
    if initial_model is not None:
        from secagg.model import FlatModel

        limits = overrides.get("limits", Limits())
        loaded = FlatModel.load_npz(initial_model, max_values=getattr(
            limits, "max_vector_length", Limits().max_vector_length))
        # defence: kit.initial-model-not-empty
        if loaded.size < 1:
            raise ConfigurationError(f"the model {initial_model} has no values")
        initial_digest = loaded.digest
    signer_key = Ed25519PrivateKey.generate()
    signer = RosterSigner(IdentityKey(signer_key))
    model_name = None if initial_model is None else Path("model.npz")
    config = FederationConfig(name=name, protocol=protocol, aggregator=aggregator,
                              trust_root=signer.public_key, key_holders=tuple(key_holders),
                              initial_model=model_name, initial_model_digest=initial_digest)
    if overrides:
        config = replace(config, **overrides)  # type: ignore[arg-type]
    # every model of the job has the first's names, shapes and dtypes: a party fetches none
    # larger. Left at 10^8, a site's first fetch (checked against the pinned digest only
    # once it has arrived) could be made 800 MB by a lying aggregator (README, "What a site
    # fetches"). Limits given explicitly are kept.
    # defence: kit.vector-limit-is-the-models-size
    if initial_digest is not None and "limits" not in overrides:
        config = replace(config, limits=replace(config.limits, max_vector_length=loaded.size))
    config.check()
    ca_key, ca_cert = pki.make_ca(name)
    try:
        # modes set, not left to the umask: under umask 000 the directories holding ca.key
        # and signer.key were world-writable (anyone could swap the keys or the roster);
        # the directories of private keys are made 0700 (pki.write_private). A directory
        # that exists (empty: a mount point, one the operator made) keeps its mode.
        # defence: federation.init-directory-modes
        pki.make_dirs(d / "sites", 0o755)
    except OSError as e:
        raise ConfigurationError(f"cannot make {d}: {e.strerror}") from None
    # until the last file is written: an init cut short (Ctrl-C, a full disk) is named as
    # such, and its aggregator directory, written last, does not exist: no aggregator serves
    # a roster of 2000 sites of which 408 have keys (it did, and opened round 1)
    # defence: federation.init-cut-short-not-served
    (d / INIT_INCOMPLETE).write_bytes(b"")
    pki.write_private(d / "ca" / "ca.key", SecretBytes(pki.pem_private(ca_key)))
    pki.write_public(d / "ca" / "ca.crt", pki.pem_cert(ca_cert))
    pki.write_private(d / "trust-root" / "signer.key", SecretBytes(identity_to_pem(signer_key)))

    identities = {s: Ed25519PrivateKey.generate() for s in range(1, sites + 1)}
    signed = signer.sign({s: IdentityKey(k).public_bytes for s, k in identities.items()},
                         federation=name)
    if initial_model is not None and model_name is not None:
        pki.write_public(d / model_name, Path(initial_model).read_bytes())
    pki.write_public(d / SETTINGS_SERIAL_FILE, b"1\n")
    settings_sig = _settings_sig_bytes(config, signer, 1)
    _write_public_files(d, config, signed, ca_cert, model_name, settings_sig)

    issued = []
    for s, ident in identities.items():
        site_dir = d / "sites" / f"site-{s}"
        tls_key = pki.new_key()
        issued.append(_key_fingerprint(tls_key.public_key()))
        cert = pki.issue_site_cert(ca_key, ca_cert, s, tls_key.public_key())
        pki.write_private(site_dir / "client.key", SecretBytes(pki.pem_private(tls_key)))
        pki.write_private(site_dir / "identity.key", SecretBytes(identity_to_pem(ident)))
        # defence: federation.init-pins-the-trust-root
        write_trust_pin(site_dir, IdentityKey(ident), signer.public_key)
        pki.write_public(site_dir / "client.crt", pki.pem_cert(cert))
        _write_public_files(site_dir, config, signed, ca_cert, None, settings_sig)
    pki.write_public(d / ISSUED_FILE, json.dumps(issued).encode())
    server_key, server_cert = pki.issue_server_cert(ca_key, ca_cert, hosts)
    # the aggregator's directory is made whole under another name and renamed into place
    building = d / ".aggregator.init"
    pki.write_private(building / "server.key", SecretBytes(pki.pem_private(server_key)))
    pki.write_public(building / "server.crt", pki.pem_cert(server_cert))
    _write_public_files(building, config, signed, ca_cert, model_name, settings_sig)
    building.rename(d / "aggregator")
    (d / INIT_INCOMPLETE).unlink()
    return config


INIT_INCOMPLETE = ".init-incomplete"  # in a federation directory while init writes it
DEFAULT_HOSTS = ("localhost", "127.0.0.1")  # named by every server certificate


def _check_not_shared(d: Path, *, inside: Sequence[str] = (),
                      holds: str = "the federation's config, keys and roster",
                      kind: str = "the federation directory") -> None:
    """Refuse a federation directory another user could change: one (or, with ``inside``,
    one of those entries in it) that is not its user's own or that others can write, or
    under a directory others can write without the sticky bit or another user owns (who
    could swap the whole directory). A sticky /tmp is fine: others cannot move what is
    ours there. ``holds`` and ``kind`` name what the directory holds and is, in the
    refusal."""
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    if euid is None:  # (no POSIX owners: nothing to check)
        return
    for path in (d, *(d / name for name in inside)):
        try:
            st = path.stat()  # (a symlink's own mode is always 777: its target's counts)
        except FileNotFoundError:
            continue  # (made by init, ours)
        except OSError as e:
            raise ConfigurationError(f"cannot read {path}: {e.strerror}") from None
        # (a FIFO at roster.bin, ca.crt or federation.toml hung every start when read)
        # defence: federation.entries-regular-files
        if path != d and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise ConfigurationError(f"{path} is not a regular file or a directory")
        # (root's own is fine: root can change anything anyway)
        # defence: federation.directory-owned-by-its-user
        if st.st_uid not in (euid, 0) or st.st_mode & 0o022:
            raise ConfigurationError(
                f"{path} is writable by its group or other users, or not this user's (mode "
                f"{st.st_mode & 0o777:o}, owner uid {st.st_uid}): anyone who can write there "
                f"can replace {holds}; chmod go-w it and make "
                "it yours, or name a directory only you can write")
    # every directory passed through to reach the directory and its entries, following each
    # symlink on the way (the parents of the resolved path alone let a link in a 0777
    # directory, shared/link/site-1, be repointed by anyone), and every symlink met
    traversed: set[Path] = set()
    links: set[Path] = set()
    for path in (d, *(d / name for name in inside)):
        _traverse(path, traversed, links)
    for link in sorted(links):
        # a link another user owns, in a sticky directory such as /tmp, is theirs to replace
        # defence: federation.directory-links-owned
        if link.lstat().st_uid not in (0, euid):
            raise ConfigurationError(
                f"{link}, on the way to {kind}, is a symbolic link another "
                "user owns: they can point it elsewhere; use a link of your own or the path "
                "it leads to")
    for parent in sorted(traversed):  # (where each link leads, too: _traverse)
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue  # (made by init, ours)
        sticky = st.st_mode & 0o1000
        # defence: federation.directory-ancestors-safe
        if st.st_uid not in (0, euid) or (st.st_mode & 0o022 and not sticky):
            raise ConfigurationError(
                f"{parent}, above {kind}, is writable by its group or other "
                f"users, or not this user's or root's (mode {st.st_mode & 0o7777:o}): whoever "
                f"can write it can swap {kind}; keep it under "
                "directories only you (or root) can change")


def _traverse(path: Path, dirs: set[Path], links: set[Path], depth: int = 0) -> Path:
    """Walk ``path`` as the kernel resolves it: add each directory an entry is looked up in
    to ``dirs`` and each symbolic link met to ``links``; return where it leads (stopping at
    the first part that does not exist)."""
    if depth > 40:  # (a loop of links: the stat of the path says so itself)
        return path
    current = Path(path.absolute().anchor)
    for name in path.absolute().parts[1:]:
        dirs.add(current)
        step = current / name
        try:
            is_link = step.is_symlink()
        except OSError:
            return step
        if is_link:
            links.add(step)
            target = Path(os.readlink(step))
            # defence: federation.relative-links-from-their-directory
            step = _traverse(target if target.is_absolute() else current / target, dirs,
                             links, depth + 1)
        current = step
    return current


# what sign and remove-site read and write in a federation's directory (_check_not_shared)
FEDERATION_ENTRIES = ("ca", "ca/ca.key", "ca/ca.crt", "trust-root", "trust-root/signer.key",
                      CONFIG_FILE, ROSTER_FILE, "aggregator", f"aggregator/{ROSTER_FILE}",
                      "sites")


def _port_ok(address: object) -> bool:
    """Whether ``address`` ends in ``:PORT``, the port in ASCII digits (str.isdigit took
    '٥٠٧٦١', which no socket does) and in 1-65535."""
    port = address.rpartition(":")[2] if isinstance(address, str) else ""
    # defence: federation.aggregator-port-ascii-digits, federation.aggregator-port-at-most-65535
    return port.isascii() and port.isdigit() and 1 <= int(port) <= 65535


def _dial_host(address: str) -> str | None:
    """The host of a ``host:port`` (``[v6]:port``, or a gRPC target such as
    ``dns:///host:port``, ``dns://resolver/host:port``, ``ipv4:a.b.c.d:port`` or
    ``ipv6:[v6]:port``) address, if it is a host name or address a certificate can name and
    a site can dial; else None (the config's own check then says what is wrong with it).
    A list of addresses (``ipv4:a:port,b:port``) is not taken: gRPC checks the server's
    certificate against the whole target, so no site could connect."""
    import ipaddress

    target, kind = address, None
    if address.startswith("dns://"):  # (a resolver named before the target: dns://8.8.8.8/)
        target = address[len("dns://"):].partition("/")[2]
    elif address.startswith("dns:"):
        target = address[len("dns:"):]
    elif address.startswith(("ipv4:", "ipv6:")):
        kind, target = address[:4], address[len("ipv4:"):]
    if "," in target:
        return None
    host, sep, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address needs its brackets: '::1:50051' is ambiguous
        return None
    # (a wildcard names no host a site can dial)
    # (the port's range is the config's to say)
    if not sep or not host or "*" in host or not (port.isascii() and port.isdigit()):
        return None
    if kind is not None:  # ipv4: and ipv6: take numeric addresses of their family only
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if ip.version != int(kind[3]):
            return None
    try:
        pki.check_hosts([host])
    except ConfigurationError:
        return None
    return host


def _write_public_files(d: Path, config: FederationConfig, signed: SignedRoster,
                        ca_cert: x509.Certificate, model_name: Path | None,
                        settings_sig: bytes) -> None:
    d.mkdir(parents=True, exist_ok=True)
    pki.write_public(d / "ca.crt", pki.pem_cert(ca_cert))
    pki.write_public(d / CONFIG_FILE, config.to_toml().encode())
    # defence: federation.settings-signature-written
    pki.write_public(d / SETTINGS_SIG_FILE, settings_sig)
    pki.write_public(d / ROSTER_FILE, roster_to_bytes(signed))
    if model_name is not None and not (d / model_name).exists():
        src = d.parent / model_name
        if src.exists():
            pki.write_public(d / model_name, src.read_bytes())


# ---- a site's own keys: csr / sign -----------------------------------------------------------


REQUEST_CONTEXT = b"secagg/v1 site certificate request\x00"


def _request_message(site_id: int, csr_der: bytes) -> bytes:
    """What a site's identity key signs in its request: the site id and its TLS key's CSR."""
    return REQUEST_CONTEXT + site_id.to_bytes(8, "big") + hashlib.sha256(csr_der).digest()


def make_site_request(directory: Path | str, site_id: int, *, trust_root: object,
                      identity_key: Path | str | None = None) -> Path:
    """Make a site's TLS key (and, unless ``identity_key`` names the site's existing one, its
    identity key) in ``directory`` and its request, signed with the identity key; the request
    (public only) is what goes to the operator. With ``identity_key`` it is a rotation: a new
    TLS certificate for a site already on the roster. ``trust_root``: the federation's, as its
    operator gave it out of band (hex, or 32 bytes), pinned in ``directory``
    (:func:`write_trust_pin`): the files the operator sends back are taken only if they are
    that federation's."""
    d = Path(directory)
    # defence: federation.csr-site-id-bounded (checked before a key is written)
    if isinstance(site_id, bool) or not isinstance(site_id, int) or not 1 <= site_id < 2**63:
        raise ConfigurationError(f"a site id is a positive integer below 2**63, got {site_id!r}")
    root = parse_trust_root(trust_root)
    # (the operator's directory: the site's private keys beside the CA's, and a request.json
    # the operator then signs from their own federation root)
    # defence: federation.csr-not-in-a-federation-root, federation.csr-not-beside-a-linked-ca-key
    if os.path.lexists(d / "ca" / "ca.key"):
        raise ConfigurationError(
            f"{d} is a federation's directory (the operator's): make a site's request in the "
            "site's own directory")
    private: Ed25519PrivateKey | None = None
    if identity_key is not None:
        try:
            identity = load_identity(Path(identity_key))
        except OSError as e:  # (a bare "FileNotFoundError (nope.key)" before)
            raise ConfigurationError(f"cannot read --identity {identity_key}: "
                                     f"{e.strerror or e}") from None
    else:
        # (lexists: a dangling link there made the write fail after client.key was written,
        # and every retry then failed on client.key)
        # defence: federation.csr-checks-before-writing
        if os.path.lexists(d / "identity.key"):
            raise ConfigurationError(
                f"{d / 'identity.key'} exists: to rotate a certificate, make the request in a "
                "new directory with --identity naming this key")
        private = Ed25519PrivateKey.generate()
        identity = IdentityKey(private)
    if os.path.lexists(d / "client.key"):
        raise ConfigurationError(f"{d / 'client.key'} exists: a request was made in {d} "
                                 "already; make a new one in a new directory")
    tls_key = pki.new_key()
    csr = pki.make_csr(site_id, tls_key)
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    pki.write_private(d / "client.key", SecretBytes(pki.pem_private(tls_key)))
    if private is not None:
        pki.write_private(d / "identity.key", SecretBytes(identity_to_pem(private)))
    # defence: federation.csr-pins-the-trust-root
    write_trust_pin(d, identity, root)
    request = {
        "site_id": site_id,
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "identity_public_key": identity.public_bytes.hex(),
        # proof that whoever asks for site_id's certificate holds its identity key: the
        # roster's public keys are public, and a request naming one is otherwise anyone's
        "identity_signature": identity.sign(_request_message(site_id, csr_der)).hex(),
    }
    path = d / "request.json"
    pki.write_public(path, json.dumps(request, indent=2).encode())
    return path


@dataclass(frozen=True)
class SignedRequest:
    """What one ``sign`` did, read under the federation's lock (the roster before and after
    this sign, not another one's racing it)."""

    out: Path
    site_id: int
    sites_before: tuple[int, ...]
    sites_after: tuple[int, ...]

    @property
    def added(self) -> bool:
        """The site was not on the roster before: a new seat, not a rotation."""
        return self.site_id not in self.sites_before


def sign_site_request(federation: Path | str, request_path: Path | str, out: Path | str, *,
                      add_site: bool = False) -> Path:
    """Sign a site's request; see :func:`sign_request`. Returns the output directory."""
    return sign_request(federation, request_path, out, add_site=add_site).out


def sign_request(federation: Path | str, request_path: Path | str, out: Path | str, *,
                 add_site: bool = False) -> SignedRequest:
    """Sign a site's request: its certificate, and a re-signed roster with its identity key in
    it (a new roster version and graph seed), written with the public files into ``out``.
    Every party must then receive the new roster. A request for a site the roster does not
    hold yet is refused unless ``add_site``: adding a seat is the operator's decision, made
    knowingly (one party asking for a second site id looked like a rotation)."""
    fed = Path(federation)
    # (a FIFO, or a device, given as the request: the read waited for a writer for ever)
    # defence: federation.request-regular-file
    if Path(request_path).exists() and not Path(request_path).is_file():
        raise ConfigurationError(f"cannot read the site request {request_path}: not a regular "
                                 "file (a request is the request.json `secagg federation csr` "
                                 "writes)")
    try:
        request = json.loads(Path(request_path).read_text(encoding="utf-8-sig"))  # (a BOM)
        site_id = request["site_id"]
        # defence: federation.request-site-id-integer (1.5 and true were taken as site 1)
        if isinstance(site_id, bool) or not isinstance(site_id, int):
            raise ValueError("site_id is not an integer")
        csr = x509.load_pem_x509_csr(request["csr"].encode())
        identity_public = bytes.fromhex(request["identity_public_key"])
        proof = bytes.fromhex(request.get("identity_signature", ""))
    # (a number beyond a float, or JSON nested 100,000 deep, raised out of here)
    # defence: federation.request-parse-errors-are-configuration-errors
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError,
            RecursionError) as e:
        # (the reason, not only the exception's class: "KeyError", "UnicodeDecodeError")
        if isinstance(e, OSError):
            reason = e.strerror or type(e).__name__
        elif isinstance(e, KeyError):
            reason = f"it has no {e.args[0]!r} field"
        elif isinstance(e, UnicodeDecodeError | json.JSONDecodeError):
            reason = "it is not JSON text"
        else:
            reason = f"{type(e).__name__}"
        raise ConfigurationError(f"cannot read the site request {request_path}: {reason} (a "
                                 "request is the request.json `secagg federation csr` "
                                 "writes)") from None
    if not 1 <= site_id < 2**63:
        raise ConfigurationError(f"the site request names site {site_id}: a site id is a "
                                 "positive integer below 2**63")
    # a request built from another site's public roster key got that site's certificate:
    # the identity key the request names must have signed it
    # defence: federation.request-proves-identity
    try:
        signing.verify(identity_public, proof, _request_message(
            site_id, csr.public_bytes(serialization.Encoding.DER)))
    except InvalidMessage:
        raise ConfigurationError(
            f"the request for site {site_id} is not signed by the identity key it names: only "
            "a request made with the site's identity key (secagg federation csr, with "
            "--identity to rotate) is signed") from None
    with _federation_lock(fed):
        return _sign_locked(fed, site_id, csr, identity_public, out, add_site)


ISSUED_FILE = "ca/issued.json"  # every TLS key the CA certified (SHA-256 of its SPKI)


def _key_fingerprint(public_key: Any) -> str:
    return hashlib.sha256(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _issued(fed: Path) -> list[str]:
    try:
        issued = json.loads(_read_small(fed / ISSUED_FILE, MAX_SIGNED_FILE_BYTES))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, RecursionError):
        issued = None
    if not isinstance(issued, list) or not all(isinstance(k, str) for k in issued):
        raise ConfigurationError(f"{fed / ISSUED_FILE}, the record of the keys the CA "
                                 "certified, is damaged: restore it")
    return issued


# what `sign` writes to --out: the files a site installs (install_signed_files)
SIGNED_FILES = ("client.crt", "ca.crt", ROSTER_FILE, CONFIG_FILE, SETTINGS_SIG_FILE)
MAX_SIGNED_FILE_BYTES = 64 << 20  # (a roster of 10,000 sites is ~0.5 MB)


def install_signed_files(site_dir: Path | str, signed: Path | str, *,
                         check: Callable[[SiteKit], None] | None = None,
                         key: Path | str | None = None) -> SiteKit:
    """``secagg federation install``: put the files ``sign`` wrote (``signed``, as the
    operator sent it) into a site directory, exactly those, and only if the directory then
    loads (its pin, the settings' signature, its own keys) with a roster and settings no
    older than the site has used. A parcel holding any other file is refused whole: a
    ``cp out/* site/`` took a kept CKKS round key, or a history.json, planted beside them
    (a helper's attacks). ``check``: what else the loaded directory must pass (the SDK's
    record of the roster and settings the site used). ``key``: a rotation's new TLS key
    (``csr --identity`` made it in another directory), installed with the new certificate
    into the site's own directory, whose identity key and history stay (installed into the
    rotation's directory, the site started again with no history: a helper's attack). On a
    refusal the directory is as it was (a kill part way leaves it refused at connect until
    install runs again)."""
    d = directory_path(site_dir, "site directory")
    o = directory_path(signed, "signed files' directory")
    if not o.is_dir():
        raise ConfigurationError(f"{o} is not a directory (it is the --out directory "
                                 "`federation sign` wrote)")
    names = {p.name for p in o.iterdir()}
    # defence: federation.install-takes-only-what-sign-writes
    extra = sorted(names - set(SIGNED_FILES))
    if extra:
        raise ConfigurationError(
            f"{o} holds files `federation sign` never writes ({', '.join(extra)[:200]}): "
            "someone added them; nothing was installed (install from the directory as the "
            "operator's sign wrote it)")
    missing = sorted(set(SIGNED_FILES) - names)
    if missing:
        raise ConfigurationError(f"{o} lacks {', '.join(missing)}: it is not what `federation "
                                 "sign` writes")
    for name in ("client.key", "identity.key", PIN_FILE):
        if not os.path.lexists(d / name):
            raise ConfigurationError(
                f"{d} holds no {name}: install into the site's own directory (where `federation "
                "csr` made its keys; for a rotation, that directory with --key NEW/client.key)")
    new_key: SecretBytes | None = None
    if key is not None:
        # (the key is moved: the one file it was in is this directory's own)
        if Path(key).resolve() == (d / "client.key").resolve():
            raise ConfigurationError(f"--key {key} is {d}'s own client.key: give the new key "
                                     "`csr --identity` made in another directory")
        try:
            new_key = pki.read_private_key(Path(key))
            serialization.load_pem_private_key(reveal(new_key), password=None)
        except OSError as e:
            raise ConfigurationError(f"cannot read --key {key}: {e.strerror or e}") from None
        except (ValueError, TypeError):
            raise ConfigurationError(f"--key {key} is not an unencrypted PEM private key (the "
                                     "client.key `csr --identity` made)") from None
    new: dict[str, bytes] = {}
    for name in SIGNED_FILES:
        path = o / name
        try:
            # (not through a link: a parcel is files, and a link leads elsewhere)
            if path.is_symlink():
                raise ValueError("a link")
            new[name] = _read_small(path, MAX_SIGNED_FILE_BYTES)
        except (OSError, ValueError):
            raise ConfigurationError(f"{path} is not a regular file of at most "
                                     f"{MAX_SIGNED_FILE_BYTES >> 20} MiB") from None
    old_key = pki.read_private_key(d / "client.key") if new_key is not None else None
    # (a rotation's certificate without its key was "the private key in DIR is not the key
    # of its certificate", with no word of --key)
    _check_certificate_for(new["client.crt"], new_key if new_key is not None
                           else pki.read_private_key(d / "client.key"), o, key is not None)
    old = {name: (d / name).read_bytes() for name in SIGNED_FILES if (d / name).is_file()}
    try:
        for name, data in new.items():
            pki.write_public(d / name, data)
        if new_key is not None:
            _replace_private(d / "client.key", new_key)
        kit = SiteKit.load(d)
        if check is not None:
            check(kit)
    except BaseException:
        # defence: federation.install-leaves-the-directory-as-it-was
        for name in SIGNED_FILES:  # (each replaced whole, as it was)
            with contextlib.suppress(OSError):
                if name in old:
                    pki.write_public(d / name, old[name])
                else:
                    (d / name).unlink()
        # defence: federation.install-key-put-back
        if old_key is not None:
            with contextlib.suppress(OSError):
                _replace_private(d / "client.key", old_key)
        raise
    if key is not None:  # (moved: a private key lives in one directory)
        with contextlib.suppress(OSError):
            Path(key).unlink()
    return kit


def _check_certificate_for(cert_pem: bytes, key_pem: SecretBytes, out: Path,
                           rotation: bool) -> None:
    """Refuse a parcel whose certificate is not for the TLS key being installed."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        private = serialization.load_pem_private_key(reveal(key_pem), password=None)
    except (ValueError, TypeError):
        return  # (SiteKit.load names what is wrong with either)
    same = (cert.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
            == private.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    # defence: federation.install-certificate-for-the-key
    if not same:
        raise ConfigurationError(
            f"the certificate in {out} is not for " + (
                "the --key given" if rotation else
                "this site's TLS key (for a rotation, give the new key: --key NEW/client.key)"))


def _replace_private(path: Path, data: SecretBytes) -> None:
    """Replace a private file whole (a new file, 0600, renamed over it)."""
    tmp = path.with_name(f".{path.name}.new")
    if os.path.lexists(tmp):
        tmp.unlink()
    pki.write_private(tmp, data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _federation_lock(fed: Path) -> Iterator[None]:
    """One ``sign`` at a time per federation directory: two at once both read roster
    version n and wrote two different rosters n+1 (the federation's and the aggregator's
    disagreeing)."""
    # defence: federation.sign-only-in-a-federation
    if not (fed / CONFIG_FILE).is_file() or not (fed / "ca" / "ca.key").is_file():
        raise ConfigurationError(f"{fed} is not a federation directory (no {CONFIG_FILE} or "
                                 "ca/ca.key)")
    # (and the entries sign and remove-site read and write: a 0777 ca/ let anyone swap in
    # their own CA key, and the new site got its certificate and trusted CA from them)
    # defence: federation.sign-refuses-a-shared-directory
    _check_not_shared(fed, inside=FEDERATION_ENTRIES)
    try:
        # (a link planted at the lock's name is not followed)
        # defence: federation.sign-lock-no-follow
        fd = os.open(fed / ".sign.lock",
                     os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as e:
        raise ConfigurationError(f"cannot lock {fed}: {e.strerror}") from None
    try:
        try:
            import fcntl  # (POSIX; elsewhere sign runs unlocked)
        except ImportError:
            yield
            return
        # defence: federation.sign-serialised
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(f"waiting for another `federation sign` on {fed} to finish",
                          stacklevel=1)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _sign_locked(fed: Path, site_id: int, csr: x509.CertificateSigningRequest,
                 identity_public: bytes, out: Path | str, add_site: bool) -> SignedRequest:
    config = FederationConfig.load(fed / CONFIG_FILE)
    # the roster is opened with the signer's own key, never with the trust root the
    # (editable) config names: a roster signed under a trust root of someone's making was
    # re-signed with the real one, naming their identity key for a site
    signer = _federation_signer(fed, config)
    # the site gets the settings the operator signed, never an edit of them signed unseen
    # defence: federation.sign-sends-signed-settings
    try:
        settings_sig = _verified_settings_sig(fed, config)[1]
    except ConfigurationError:
        raise ConfigurationError(
            f"the shared settings of {fed / CONFIG_FILE} are not the ones "
            f"{fed / SETTINGS_SIG_FILE} signs (changed since): sign them first (secagg "
            f"federation sign-config --dir {fed})") from None
    _sync_rosters(fed, signer)
    ca_key = pki.load_private(fed / "ca" / "ca.key")
    ca_cert = pki.load_cert(fed / "ca" / "ca.crt")
    # a request carries no date: one replayed (a site's first, or the one before its
    # rotation) certified again the key the site had given up (a helper's attack)
    issued = _issued(fed)
    fingerprint = _key_fingerprint(csr.public_key())
    # defence: federation.sign-never-certifies-a-key-twice
    if fingerprint in issued:
        raise ConfigurationError(
            f"the request's TLS key was certified before (a request sent again, or a key "
            f"used again): a new certificate for site {site_id} needs a new key (secagg "
            "federation csr)")
    cert = pki.sign_csr(ca_key, ca_cert, csr, site_id)
    roster = load_roster(fed / ROSTER_FILE, signer.public_key)
    # defence: federation.roster-key-kept
    if site_id in roster and roster[site_id] != identity_public:
        raise ConfigurationError(f"site {site_id} is already on the roster with another key")
    # defence: federation.adding-a-site-is-explicit
    if site_id not in roster and not add_site:
        raise ConfigurationError(
            f"the request adds site {site_id} to the roster (now {sorted(roster)}): confirm "
            "with that site, out of band, that it asked for this id, then sign again with "
            "--add-site (a rotation names a site already on the roster)")
    sites = dict(roster)
    sites[site_id] = identity_public
    signed = signer.sign(
        sites, federation=roster.federation, version=roster.version + 1)
    # the site's files first, the federation's roster last (each replaced whole): a failure
    # part way leaves the federation as it was, not re-signed for a site that got nothing
    o = Path(out)
    # defence: federation.sign-into-empty-directory
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise ConfigurationError(f"{o} exists and is not an empty directory: the signed "
                                 "files go into a new one")
    pki.write_public(fed / ISSUED_FILE, json.dumps([*issued, fingerprint]).encode())
    pki.write_public(o / "client.crt", pki.pem_cert(cert))
    _write_public_files(o, config, signed, ca_cert, None, settings_sig)
    for path in (fed / ROSTER_FILE, fed / "aggregator" / ROSTER_FILE):
        pki.write_public(path, roster_to_bytes(signed))  # (replaced whole)
    return SignedRequest(o, site_id, tuple(sorted(roster)), tuple(sorted(sites)))


@dataclass(frozen=True)
class RemovedSite:
    site_id: int
    sites_before: tuple[int, ...]
    sites_after: tuple[int, ...]


def remove_site(federation: Path | str, site_id: int) -> RemovedSite:
    """Re-sign the federation's roster without ``site_id`` (a new version and graph seed),
    into the federation's and the aggregator's directories: the aggregator, started with
    it, refuses the site's certificate (a site is who the roster names), and no round counts
    it. Every party must then receive the new roster. A site the federation's config names
    as a CKKS key holder is refused (name another in every config first), as is a roster
    that would fall below three sites."""
    fed = Path(federation)
    with _federation_lock(fed):
        config = FederationConfig.load(fed / CONFIG_FILE)
        signer = _federation_signer(fed, config)
        _sync_rosters(fed, signer)
        roster = load_roster(fed / ROSTER_FILE, signer.public_key)
        if site_id not in roster:
            raise ConfigurationError(f"site {site_id} is not on the roster (now "
                                     f"{sorted(roster)})")
        # defence: federation.remove-keeps-key-holders
        if config.protocol == "ckks" and site_id in config.key_holders:
            raise ConfigurationError(f"site {site_id} is a [ckks] key holder: name another in "
                                     "every party's config first")
        sites = {s: key for s, key in roster.items() if s != site_id}
        if len(sites) < 3:
            raise ConfigurationError("a roster needs at least 3 sites")
        # (a threshold of 5 left for a roster of 4, min_sites 4 for a roster of 3: every
        # site refused it at connect)
        # defence: federation.remove-site-keeps-settings-feasible
        try:
            config.check_fits_roster(sites)
        except ConfigurationError as e:
            raise ConfigurationError(
                f"without site {site_id}, the federation's settings do not fit its roster "
                f"({e}): change them first (then secagg federation sign-config)") from None
        signed = signer.sign(sites, federation=roster.federation, version=roster.version + 1)
        for path in (fed / ROSTER_FILE, fed / "aggregator" / ROSTER_FILE):
            pki.write_public(path, roster_to_bytes(signed))  # (replaced whole)
        return RemovedSite(site_id, tuple(sorted(roster)), tuple(sorted(sites)))


def _sync_rosters(fed: Path, signer: RosterSigner) -> None:
    """The aggregator's copy of the roster brought to the federation's when it is older: a
    sign or remove-site that failed between the two writes (a full disk, a kill) left them
    disagreeing, and no command brought them back in line."""
    ours, theirs = fed / ROSTER_FILE, fed / "aggregator" / ROSTER_FILE
    federation = load_roster(ours, signer.public_key)
    try:
        aggregator = load_roster(theirs, signer.public_key).version
    except ConfigurationError:
        aggregator = 0  # (missing or not the signer's: replaced by the federation's)
    # defence: federation.rosters-brought-in-line
    if aggregator < federation.version:
        pki.write_public(theirs, ours.read_bytes())
        warnings.warn(f"{theirs} was an older roster than {ours} (a sign or remove-site cut "
                      "short): brought in line", stacklevel=3)


def _federation_signer(fed: Path, config: FederationConfig) -> RosterSigner:
    """The federation's roster signer (trust-root/signer.key), if the config names its key
    as the trust root; ConfigurationError otherwise (see _sign_locked)."""
    # defence: federation.signer-key-permissions
    signer_key = serialization.load_pem_private_key(
        pki.read_private_key(fed / "trust-root" / "signer.key").reveal(), password=None)
    if not isinstance(signer_key, Ed25519PrivateKey):
        raise ConfigurationError("the trust root key is not an Ed25519 key")
    signer = RosterSigner(IdentityKey(signer_key))
    # defence: federation.sign-trusts-its-own-signer
    if config.trust_root != signer.public_key:
        raise ConfigurationError(
            f"{fed / CONFIG_FILE} names a trust root that is not this federation's signer key "
            "(trust-root/signer.key): the config was changed; restore it before signing")
    return signer
