"""CKKS key ceremony: who holds the secret key, what the aggregator gets, how keys travel.

- A key-holding site generates the context (:meth:`KeyHolder.generate`).
- The aggregator and non-holding sites get :meth:`KeyHolder.public_context`: parameters and the
  public key only. On the wire it is our format, not TenSEAL's (see ``PublicContext.load``):
  a preset's name and the public key's coefficients, nothing else, so a context received from
  anyone can carry neither a secret key nor Galois or relinearisation keys (a few hundred KB of
  compressed Galois keys parse into gigabytes) nor parameters of the sender's choosing.
- The secret context goes to each other key holder sealed to that holder's X25519 key
  (:meth:`KeyHolder.seal_for`): ephemeral X25519, HKDF-SHA256, AES-256-GCM with associated
  data binding key id, sender and recipient, and the sender's Ed25519 signature over it all.
  It exists in the clear only in memory; it is never written to a file.
- Every context has a ``key_id``: SHA-256 over the preset and the public key's coefficients
  (canonical: independent of SEAL's compression and of the zstd build). Uploads are bound
  to it, because TenSEAL adds ciphertexts made under different keys into garbage silently.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tenseal import sealapi

from secagg._encoding import digest, encode
from secagg.ckks import _seal
from secagg.ckks.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from secagg.errors import ConfigurationError, InvalidMessage, RefusalReason, RefusedMessage
from secagg.hazmat import aead, signing
from secagg.hazmat.key_agreement import AgreementKey, derive_pair_key, exchange


def _key_id(preset: Preset, public_key: Any, seal_context: Any) -> bytes:
    """Over the public key's raw coefficients, not SEAL's (zstd-compressed) serialisation:
    compressed bytes depend on the zstd build, the coefficients only on the key."""
    try:
        coefficients = _seal.public_key_coefficients(public_key, seal_context)
    except ValueError:  # a loaded context whose public key is not at its key level
        raise InvalidMessage("context") from None
    return digest("ckks-key-id", preset.poly_modulus_degree,
                  # defence: ckks.keys.key-id-binds-public-key
                  list(preset.coeff_mod_bit_sizes), preset.scale_bits, coefficients)


def _preset_of(context: ts.Context) -> Preset:
    try:
        parms = context.seal_context().data.key_context_data().parms()
        bits = tuple(m.bit_count() for m in parms.coeff_modulus())
        n = parms.poly_modulus_degree()
        scale = float(context.global_scale)  # TenSEAL raises "no global scale" for some
    except Exception:
        raise InvalidMessage("context") from None
    if not (math.isfinite(scale) and scale >= 2):  # NaN, infinite, negative: no CKKS scale
        raise InvalidMessage("context")
    scale_bits = round(scale).bit_length() - 1
    for preset in PRESETS.values():
        if (preset.poly_modulus_degree, preset.coeff_mod_bit_sizes, preset.scale_bits) == (
                n, bits, scale_bits):
            return preset
    try:
        return Preset("custom", n, bits, scale_bits)  # validated: an unsafe one raises
    except ConfigurationError:
        raise InvalidMessage("context") from None


# --- the public context on the wire ---------------------------------------------------------
#
#   offset 0     1 byte   CONTEXT_FORMAT_VERSION (1)
#   offset 1     1 byte   L, the length of the preset's name (1..64)
#   offset 2     L bytes  the preset's name (ASCII), one of secagg.ckks.presets.PRESETS
#   offset 2+L            the public key: 2 polynomials at the key level, NTT form, each
#                         coefficient bit-packed at its prime's width (_seal.dump_public_key)
#
# The length is exact for the preset. Everything else -- the encryption parameters, the scale,
# public-key encryption, the absence of any other key -- is rebuilt here from the named preset,
# and what TenSEAL parses is bytes we wrote, never the sender's.

CONTEXT_FORMAT_VERSION = 1
_TENSEAL_AUTO_FLAGS = 7  # TenSEAL's default (auto relinearise, rescale, mod switch)


def public_context_length(preset: Preset | str) -> int:
    """The exact byte length of a public context of ``preset`` on the wire."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    return 2 + len(p.name.encode()) + 2 * p.poly_modulus_degree * sum(p.coeff_mod_bit_sizes) // 8


# The largest public context of any preset: what anyone reads of a key holder's claim when the
# preset is not known in advance.
MAX_CONTEXT_BYTES = max(public_context_length(p) for p in PRESETS.values())


@functools.cache
def _preset_parameters(name: str) -> tuple[bytes, Any]:
    """The named preset's SEAL encryption parameters (serialised) and a SEAL context of them."""
    p = PRESETS[name]
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(p.poly_modulus_degree)
    parms.set_coeff_modulus(sealapi.CoeffModulus.Create(p.poly_modulus_degree,
                                                        list(p.coeff_mod_bit_sizes)))
    return _seal.save_bytes(parms), sealapi.SEALContext(parms, True,
                                                        sealapi.SEC_LEVEL_TYPE.TC128)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tenseal_public_context(preset: Preset, public_key_seal: bytes) -> bytes:
    """TenSEAL's serialised context (``TenSEALContextProto``) with the preset's parameters and
    scale, public-key encryption and this public key only: fields encryption_parameters (1)
    and public_context (2) = {public_key (1), auto_flags (2), scale (3)}."""
    parms, _ = _preset_parameters(preset.name)
    public = (_pb_bytes(1, public_key_seal) + _varint(2 << 3) + _varint(_TENSEAL_AUTO_FLAGS)
              + _varint(3 << 3 | 1) + struct.pack("<d", preset.scale))
    return _pb_bytes(1, parms) + _pb_bytes(2, public)


class _Context:
    """What every holder of a CKKS context knows: its preset, key id and public parts."""

    def __init__(self, context: ts.Context) -> None:
        self._context = context
        self.preset = _preset_of(context)
        try:
            public_key = context.public_key().data
        except Exception:  # TenSEAL raises bare C++ errors for a context without one
            raise InvalidMessage("context") from None
        self.key_id = _key_id(self.preset, public_key, self.seal_context)

    @property
    def seal_context(self) -> Any:
        return self._context.seal_context().data

    @property
    def public_key(self) -> Any:
        return self._context.public_key().data


class PublicContext(_Context):
    """CKKS parameters and public key: enough to encrypt (public-key mode) and to add."""

    def __init__(self, context: ts.Context) -> None:
        # defence: ckks.keys.public-context-has-no-secret
        if context.has_secret_key():
            raise RefusedMessage(RefusalReason.CONTEXT_HAS_SECRET_KEY)
        super().__init__(context)

    @classmethod
    def load(cls, data: bytes, *, preset: Preset | str | None = None) -> PublicContext:
        """Parse a public context in our wire format (see :func:`public_context_length`), of
        ``preset`` if given. Anything else -- another preset, a custom one, another length,
        a coefficient at or above its prime, TenSEAL's own format -- is
        :class:`InvalidMessage`, before anything of the size of a key is parsed."""
        try:
            if not isinstance(data, bytes) or len(data) < 2 or data[0] != CONTEXT_FORMAT_VERSION:
                raise InvalidMessage("context")
            name = data[2:2 + data[1]].decode("ascii", errors="replace")
            if name not in PRESETS:
                raise InvalidMessage("context")
            named = PRESETS[name]
            expected = (None if preset is None
                        else get_preset(preset) if isinstance(preset, str) else preset)
            # defence: ckks.keys.context-of-the-expected-preset
            if expected is not None and expected != named:
                raise InvalidMessage("context")
            if len(data) != public_context_length(named):
                raise InvalidMessage("context")
            _, seal_context = _preset_parameters(name)
            key = _seal.public_key_seal_bytes(seal_context, memoryview(data)[2 + data[1]:])
            context = ts.context_from(_tenseal_public_context(named, key))
        except InvalidMessage:
            raise
        except Exception:  # TenSEAL raises bare C++ errors; a wrong type is as opaque
            raise InvalidMessage("context") from None
        public = cls(context)
        if public.preset != named:
            raise InvalidMessage("context")
        return public

    def serialize(self) -> bytes:
        """Our wire format: the preset's name and the public key (see :meth:`load`)."""
        name = self.preset.name.encode()
        if self.preset.name not in PRESETS or PRESETS[self.preset.name] != self.preset:
            raise ConfigurationError(f"only a named preset's context can be sent, not "
                                     f"{self.preset.name!r}")
        return (bytes((CONTEXT_FORMAT_VERSION, len(name))) + name
                + _seal.dump_public_key(self.public_key, self.seal_context))

    def __repr__(self) -> str:
        return f"PublicContext(preset={self.preset.name!r}, key_id={self.key_id.hex()[:16]})"


@dataclass(frozen=True)
class KeyAnnouncement:
    """A key holder's signed statement: "this is the round's key, for this epoch".

    Without it, whoever hands a site its round configuration could name a key of its own and
    read the site's update. Sites verify it against the roster before encrypting
    (:class:`~secagg.ckks.round.CkksRoundConfig` does so on construction).

    ``epoch`` names the rounds the key may serve (by default one round: its id) and
    ``max_rounds`` how many of them a key holder releases under it (1: a fresh key per round).
    """

    key_id: bytes
    preset: str
    holder: int
    epoch: str
    max_rounds: int
    signature: bytes

    def signed_bytes(self) -> bytes:
        # defence: ckks.keys.announcement-binds-key-id, ckks.keys.announcement-binds-preset
        # defence: ckks.keys.announcement-binds-epoch
        return encode("ckks-key-announcement", self.key_id, self.preset, self.holder, self.epoch,
                      # defence: ckks.keys.announcement-binds-max-rounds
                      self.max_rounds)

    def verify(self, roster: Mapping[int, bytes]) -> None:
        """Raise :class:`InvalidMessage` unless the holder's roster key signed this."""
        if (not isinstance(self.key_id, bytes) or len(self.key_id) != 32
                or not isinstance(self.preset, str) or not isinstance(self.epoch, str)
                or not isinstance(self.holder, int) or isinstance(self.holder, bool)
                or not isinstance(self.max_rounds, int) or isinstance(self.max_rounds, bool)
                # defence: ckks.keys.announcement-budget-from-one
                or self.max_rounds < 1 or self.holder not in roster):
            raise InvalidMessage("key announcement")
        # defence: ckks.keys.announcement-signature-verified
        signing.verify(roster[self.holder], self.signature, self.signed_bytes())


@dataclass(frozen=True)
class SealedSecretContext:
    """The secret context, sealed from one key holder to another."""

    key_id: bytes
    sender: int
    recipient: int
    ephemeral_public_key: bytes
    # (sealed, but ~500 KB: the dataclass repr printed it whole into any log line)
    ciphertext: bytes = field(repr=False)
    signature: bytes

    def signed_bytes(self) -> bytes:
        return encode("sealed-secret-context", self._associated_data(), self.ephemeral_public_key,
                      digest("ct", self.ciphertext))

    def _associated_data(self) -> bytes:
        return _envelope_ad(self.key_id, self.sender, self.recipient)


def _envelope_ad(key_id: bytes, sender: int, recipient: int) -> bytes:
    return encode("secret-context", key_id, sender, recipient)


class KeyHolder(_Context):
    """A party that holds the CKKS secret key. repr redacts; pickling refuses.

    The secret leaves this object only sealed to another holder (:meth:`seal_for`) or, as
    bytes, through :meth:`export_secret_context` for handing to a worker process over a pipe.
    """

    def __init__(self, context: ts.Context, *, releases: Mapping[str, bytes] | None = None
                 ) -> None:
        if not context.has_secret_key():
            raise ValueError("a KeyHolder needs a context with a secret key")
        super().__init__(context)
        # round id -> digest of the aggregate released for it under this key (persist it
        # beside the key: a holder must never release two different aggregates of one round)
        self._releases: dict[str, bytes] = dict(releases or {})
        self._flood_key: bytes | None = None
        # called with (round id, aggregate digest) as a new release is spent, before the
        # aggregate is decrypted: a holder that keeps its key on disk records it there, under
        # a lock, refusing (by raising) what another process holding the key released
        self.release_recorder: Callable[[str, bytes], None] | None = None

    @property
    def releases(self) -> Mapping[str, bytes]:
        return dict(self._releases)

    def announce(self, *, holder: int, identity: signing.IdentityKey, epoch: str,
                 max_rounds: int = 1) -> KeyAnnouncement:
        """Sign this key's announcement with the holder's roster identity key."""
        # (the wire's field is a uint32: 2**64 raised OverflowError from the encoder)
        if (not isinstance(max_rounds, int) or isinstance(max_rounds, bool)
                or not 1 <= max_rounds < 2**32):
            raise ValueError(f"max_rounds must be an integer in [1, 2**32), got "
                             f"{max_rounds!r:.40}")
        if not isinstance(epoch, str) or not epoch:
            raise ValueError("epoch must be a non-empty string")
        # (True or "1" signed an announcement refused later as "not signed by key holder True")
        # defence: ckks.keys.announce-holder-a-site-id
        if type(holder) is not int or not 1 <= holder < 2**63:
            raise ValueError(f"holder must be a site id (an integer >= 1), got {holder!r:.40}")
        if not isinstance(identity, signing.IdentityKey):
            raise TypeError(f"identity must be the holder's IdentityKey, got "
                            f"{type(identity).__name__}")
        unsigned = KeyAnnouncement(self.key_id, self.preset.name, holder, epoch, max_rounds, b"")
        return KeyAnnouncement(self.key_id, self.preset.name, holder, epoch, max_rounds,
                               identity.sign(unsigned.signed_bytes()))

    def record_release(self, round_id: str, aggregate_digest: bytes, max_rounds: int) -> None:
        """Spend the round on this aggregate before it is decrypted; refuse a second,
        different aggregate for a round (even if the first was refused after decryption), or
        more rounds than the key may serve. The same aggregate again is allowed: its release,
        or its refusal, is identical."""
        previous = self._releases.get(round_id)
        if previous is not None:
            # defence: ckks.keys.one-aggregate-per-round
            if previous != aggregate_digest:
                raise RefusedMessage(RefusalReason.ALREADY_RELEASED,
                                     f"round {round_id!r} was already decrypted for other "
                                     "uploads")
            return
        # defence: ckks.keys.round-budget
        if len(self._releases) >= max_rounds:
            raise RefusedMessage(RefusalReason.KEY_EXHAUSTED,
                                 f"this key already served {len(self._releases)} round(s)")
        if self.release_recorder is not None:
            self.release_recorder(round_id, aggregate_digest)
        self._releases[round_id] = aggregate_digest

    def flood_key(self) -> bytes:
        """Hazardous: a PRF key derived from the secret key, for deterministic release noise
        (every holder of this key derives the same one). Never leaves the holder."""
        if self._flood_key is None:
            self._flood_key = digest("ckks-flood-key",
                                     # defence: ckks.keys.flood-key-from-the-secret
                                     _seal.canonical_members(self._context.secret_key().data))
        return self._flood_key

    @classmethod
    def generate(cls, preset: Preset | str = DEFAULT_PRESET) -> KeyHolder:
        if not isinstance(preset, Preset | str):
            raise TypeError(f"preset must be a preset name or a Preset, got "
                            f"{type(preset).__name__}")
        p = get_preset(preset) if isinstance(preset, str) else preset
        context = ts.context(ts.SCHEME_TYPE.CKKS, p.poly_modulus_degree,
                             coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes))
        context.global_scale = p.scale
        return cls(context)

    @property
    def secret_key(self) -> Any:
        return self._context.secret_key().data

    def public_context(self) -> PublicContext:
        """What the aggregator and the other sites get: parameters and public key only."""
        public = self._context.copy()
        public.make_context_public(generate_galois_keys=False, generate_relin_keys=False)
        return PublicContext(public)

    def export_secret_context(self) -> bytes:
        """The secret context as bytes. Hazardous: for in-memory hand-off to worker processes."""
        return bytes(self._context.serialize(save_public_key=True, save_secret_key=True,
                                             save_galois_keys=False, save_relin_keys=False))

    @classmethod
    def from_secret_context(cls, data: bytes, *, releases: Mapping[str, bytes] | None = None
                            ) -> KeyHolder:
        try:
            context = ts.context_from(data)
        except Exception:
            raise InvalidMessage("context") from None
        if not context.has_secret_key():
            raise InvalidMessage("context")
        return cls(context, releases=releases)

    def seal_for(self, *, sender: int, sender_identity: signing.IdentityKey, recipient: int,
                 recipient_public_key: bytes) -> SealedSecretContext:
        """Seal the secret context to ``recipient``'s X25519 public key."""
        ephemeral = X25519PrivateKey.generate()
        shared = exchange(ephemeral, recipient_public_key)
        key = derive_pair_key(shared, session_id=self.key_id, purpose="secret-context",
                              site_a=sender, site_b=recipient)
        blob = aead.seal(key, self.export_secret_context(),
                         _envelope_ad(self.key_id, sender, recipient))
        unsigned = SealedSecretContext(self.key_id, sender, recipient,
                                       ephemeral.public_key().public_bytes_raw(), blob, b"")
        return SealedSecretContext(
            self.key_id, sender, recipient, unsigned.ephemeral_public_key, blob,
            sender_identity.sign(unsigned.signed_bytes()))

    @classmethod
    def open_sealed(cls, sealed: SealedSecretContext, *, recipient: int,
                    recipient_key: AgreementKey, sender_identity_public_key: bytes,
                    expected_key_id: bytes) -> KeyHolder:
        """Open a sealed secret context. Any tampering is the opaque :class:`InvalidMessage`."""
        if sealed.recipient != recipient or sealed.key_id != expected_key_id:
            raise InvalidMessage("sealed secret context")
        # defence: ckks.keys.sealed-context-signature-verified
        signing.verify(sender_identity_public_key, sealed.signature, sealed.signed_bytes())
        shared = recipient_key.exchange(sealed.ephemeral_public_key)
        key = derive_pair_key(shared, session_id=sealed.key_id, purpose="secret-context",
                              site_a=sealed.sender, site_b=recipient)
        plain = aead.open_sealed(key, sealed.ciphertext,
                                 _envelope_ad(sealed.key_id, sealed.sender, recipient))
        holder = cls.from_secret_context(plain)
        # defence: ckks.keys.sealed-context-is-the-announced-key
        if holder.key_id != expected_key_id:
            raise InvalidMessage("sealed secret context")
        return holder

    def __repr__(self) -> str:
        return (f"KeyHolder(preset={self.preset.name!r}, key_id={self.key_id.hex()[:16]}, "
                # defence: ckks.keys.holder-repr-redacts
                "secret_key=<redacted>)")

    # defence: ckks.keys.holder-refuses-pickling
    def __reduce__(self) -> NoReturn:
        raise TypeError("KeyHolder holds a secret key and cannot be pickled")

