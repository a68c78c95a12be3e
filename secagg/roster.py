"""The federation's roster: who the sites are, their identity keys, and the SecAgg+ graph seed.

The roster is the federation's root of trust. It is signed by the roster signer (the
federation's trust root, whose Ed25519 public key every site holds) and every site checks that
signature before it uses the roster (:meth:`SignedRoster.open`).

The graph seed. SecAgg+ masks each site only with its neighbours in a sparse graph; if anyone
who may collude against a site could choose or grind that graph, they would pick one in which
the site's neighbourhood is full of colluders. So the graph's randomness is a 256-bit seed that
the roster signer draws from the operating system's CSPRNG at the moment it signs, after every
site's identity key is fixed, and that travels inside the signed roster. Neither the aggregator
(which chooses round ids and who takes part) nor colluding sites (whose keys are fixed before
the seed is drawn) can influence it, and nothing a round chooses enters the graph: one roster
has one graph. Re-signing the roster draws a new seed; each signed roster is one draw.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NoReturn

from secagg._encoding import digest, encode
from secagg.errors import ConfigurationError
from secagg.hazmat import signing

GRAPH_SEED_BYTES = 32


class Roster(Mapping[int, bytes]):
    """Site id (>= 1) -> that site's Ed25519 identity public key, plus the graph seed.

    Behaves as a read-only mapping, so it can be passed wherever a plain ``{site: key}`` is
    accepted. Immutable; equal rosters have equal :attr:`digest`.
    """

    __slots__ = ("_digest", "_sites", "federation", "graph_seed", "version")

    def __init__(self, sites: Mapping[int, bytes], graph_seed: bytes, *, federation: str = "",
                 version: int = 1) -> None:
        if not isinstance(sites, Mapping):
            raise ConfigurationError("roster sites must be a mapping of site id to key")
        for site, key in sites.items():
            # defence: roster.site-ids-in-64-bits
            if not isinstance(site, int) or isinstance(site, bool) or not 1 <= site < 2**63:
                raise ConfigurationError(
                    f"roster site ids must be integers in [1, 2**63), got {site!r}")
            if not isinstance(key, bytes) or len(key) != signing.PUBLIC_KEY_BYTES:
                raise ConfigurationError(f"roster key of site {site} must be 32 bytes")
        # defence: roster.distinct-identity-keys
        if len(set(sites.values())) != len(sites):
            raise ConfigurationError("roster lists the same identity key for two sites")
        # defence: roster.graph-seed-length
        if not isinstance(graph_seed, bytes) or len(graph_seed) != GRAPH_SEED_BYTES:
            raise ConfigurationError(f"graph_seed must be {GRAPH_SEED_BYTES} bytes")
        # defence: roster.federation-a-string
        if not isinstance(federation, str):
            raise ConfigurationError("federation must be a string")
        # defence: roster.version-from-one
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigurationError(f"roster version must be an integer >= 1, got {version!r}")
        self._sites = {s: sites[s] for s in sorted(sites)}
        self.graph_seed = graph_seed
        self.federation = federation
        self.version = version
        # defence: roster.digest-binds-each-sites-id
        listing = b"".join(s.to_bytes(8, "big") + k for s, k in self._sites.items())
        # defence: roster.digest-binds-graph-seed, roster.digest-binds-sites-and-keys
        # defence: roster.digest-binds-federation, roster.digest-binds-version
        self._digest = digest("roster", federation, version, listing, graph_seed)

    @classmethod
    def new(cls, sites: Mapping[int, bytes], *, federation: str = "", version: int = 1) -> Roster:
        """A roster with a fresh graph seed from the OS CSPRNG (what the roster signer does)."""
        # defence: roster.fresh-graph-seed
        return cls(sites, os.urandom(GRAPH_SEED_BYTES), federation=federation, version=version)

    @property
    def digest(self) -> bytes:
        """SHA-256 binding every site, key, the graph seed, the federation and the version."""
        return self._digest

    def __getitem__(self, site: int) -> bytes:
        return self._sites[site]

    def __iter__(self) -> Iterator[int]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Roster):
            return self._digest == other._digest
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._digest)

    def __repr__(self) -> str:
        return (f"Roster(federation={self.federation!r}, version={self.version}, "
                f"sites={len(self)}, digest={self._digest.hex()[:16]})")


@dataclass(frozen=True)
class SignedRoster:
    """A roster and the roster signer's Ed25519 signature over its canonical encoding."""

    roster: Roster
    signature: bytes

    @staticmethod
    def signed_bytes(roster: Roster) -> bytes:
        # defence: roster.signed-bytes-labelled
        return encode("signed-roster", roster.digest)

    def open(self, trust_root_public_key: bytes) -> Roster:
        """The roster, if the trust root signed it; else the opaque InvalidMessage."""
        # defence: roster.open-verifies-trust-root
        signing.verify(trust_root_public_key, self.signature, self.signed_bytes(self.roster))
        return self.roster


class RosterSigner:
    """The federation's trust root: signs rosters. repr redacts; pickling refuses."""

    __slots__ = ("_identity",)

    def __init__(self, identity: signing.IdentityKey) -> None:
        self._identity = identity

    @classmethod
    def generate(cls) -> RosterSigner:
        return cls(signing.IdentityKey.generate())

    @property
    def public_key(self) -> bytes:
        return self._identity.public_bytes

    def sign(self, sites: Mapping[int, bytes], *, federation: str = "",
             version: int = 1) -> SignedRoster:
        """Draw a fresh graph seed now and sign the roster that carries it."""
        roster = Roster.new(sites, federation=federation, version=version)
        return SignedRoster(roster, self._identity.sign(SignedRoster.signed_bytes(roster)))

    def sign_settings(self, settings_digest: bytes, serial: int) -> bytes:
        """Sign a federation config's shared settings (``signed_settings_message``)."""
        return self._identity.sign(signed_settings_message(settings_digest, serial))

    def __repr__(self) -> str:
        return f"RosterSigner(public={self.public_key.hex()[:16]}..., private=<redacted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("RosterSigner holds a secret and cannot be pickled")


def signed_settings_message(settings_digest: bytes, serial: int) -> bytes:
    """What the trust root signs of a config's shared settings, with their serial (each
    signing's is the federation's next: a site refuses settings older than it has used):
    labelled apart from a roster's signed bytes, so neither signature passes for the other."""
    return encode("signed-settings", settings_digest, serial)
