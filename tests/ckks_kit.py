"""Helpers for CKKS tests: a round with fresh keys and identities."""

from __future__ import annotations

from typing import Any

import numpy as np

from secagg.ckks import (
    CkksClient,
    CkksRoundConfig,
    CkksServer,
    EncryptedAggregate,
    EncryptedUpdate,
    KeyAnnouncement,
    KeyHolder,
)
from secagg.masking import make_roster


class CkksRound:
    def __init__(self, sites: int = 4, vector_length: int = 3000, seed: int = 0,
                 round_id: str = "ckks-round", holder: KeyHolder | None = None,
                 **config: Any) -> None:
        self.roster, self.identities = make_roster(sites)
        self.holder = holder or KeyHolder.generate(config.get("preset", "add-only-4096"))
        self.public = self.holder.public_context()
        epoch = config.pop("epoch", round_id)
        max_rounds = config.pop("max_rounds", 1)
        self.announcement = self.holder.announce(holder=1, identity=self.identities[1],
                                                  epoch=epoch, max_rounds=max_rounds)
        self.config = CkksRoundConfig(round_id, self.roster, self.announcement, (1,),
                                      vector_length=vector_length, epoch=epoch, **config)
        rng = np.random.default_rng(seed)
        self.inputs = {s: (rng.uniform(-1, 1, vector_length), float(rng.uniform(0.5, 1.0)))
                       for s in self.roster}
        self.server = CkksServer(self.config, self.public)

    def client(self, site: int, **kwargs: Any) -> CkksClient:
        context = self.holder if site in self.config.key_holders else self.public
        return CkksClient(self.config, site, self.identities[site], context, self.inputs[site],
                          **kwargs)

    def run(self, sites: list[int] | None = None) -> tuple[list[EncryptedUpdate],
                                                             EncryptedAggregate]:
        """Every (or the given) site uploads; the server sums. (uploads, aggregate)."""
        uploads = []
        for s in sites or sorted(self.roster):
            upload = self.client(s).start()
            self.server.handle(upload)
            uploads.append(upload)
        return uploads, self.server.close_stage()[1]

    def expected(self) -> tuple[np.ndarray, float]:
        ws = sum(np.clip(u, -self.config.clip, self.config.clip) * w
                 for u, w in self.inputs.values())
        return ws, sum(w for _, w in self.inputs.values())


def announcement_for(roster_size: int = 5, preset: str = "add-only-4096",
                     epoch: str = "r") -> tuple[dict[int, bytes], KeyAnnouncement]:
    """A roster and a key announced by its site 1, for configuration tests."""
    roster, identities = make_roster(roster_size)
    holder = KeyHolder.generate(preset)
    return dict(roster), holder.announce(holder=1, identity=identities[1], epoch=epoch)
