"""A hand-driven masking round for tests: advance stage by stage, tamper in between."""

from __future__ import annotations

from typing import Any

import numpy as np

from secagg.hazmat.signing import IdentityKey
from secagg.masking import MaskingClient, MaskingServer, RoundConfig, make_roster
from secagg.masking.messages import ServerMessage, SiteMessage


class Round:
    def __init__(self, sites: int = 5, vector_length: int = 16, seed: int = 0,
                 round_id: str = "test-round", identities: dict[int, IdentityKey] | None = None,
                 **config: Any) -> None:
        if identities is None:
            self.roster, self.identities = make_roster(sites)
        else:
            self.identities = identities
            self.roster = {s: k.public_bytes for s, k in identities.items()}
        self.config = RoundConfig(round_id, self.roster, vector_length=vector_length, **config)
        rng = np.random.default_rng(seed)
        self.inputs = {s: (rng.uniform(-1, 1, vector_length), float(rng.uniform(0.1, 1)))
                       for s in self.config.sites}
        self.clients = {s: MaskingClient(self.config, s, self.identities[s], self.inputs[s])
                        for s in self.config.sites}
        self.server = MaskingServer(self.config)
        self.outgoing: dict[int, ServerMessage] = {}
        self.replies: dict[int, SiteMessage] = {}
        self.started = False

    def advance(self, skip: frozenset[int] = frozenset()) -> dict[int, ServerMessage]:
        """Deliver the pending server messages (or start), feed replies, close the stage."""
        self.replies = {}
        if not self.started:
            self.started = True
            for s, c in self.clients.items():
                if s not in skip:
                    self.replies[s] = c.start()
        else:
            for s, msg in self.outgoing.items():
                if s not in skip:
                    self.replies[s] = self.clients[s].handle(msg)
        for reply in self.replies.values():
            self.server.handle(reply)
        self.outgoing = self.server.close_stage()
        return self.outgoing
