"""Adversary: an aggregator that hands sites different models in one round.

The attack (model inconsistency): the target site gets the real model; every other site gets
one whose updates are zero wherever the aggregator wants to read (dead ReLUs in a layer, say).
Each site masks or encrypts honestly, the round completes, and the "sum" over those
coordinates is the target's update alone. Secure aggregation by itself does not stop it: the
sum is computed correctly, over updates to different functions.

The defence: the digest of the model a round starts from is one of the round's parameters
(``RoundConfig.model_digest``, ``CkksRoundConfig.model_digest``), and every signature of the
round is over those parameters. Sites handed different models sign different parameters, so
they never accept each other's messages: under masking, a site aborts at the key directory,
before it sends its masked input; under CKKS, the key holder refuses an upload computed
against any model but its own. The SDK passes the digest of the model it trains against
(``clients.site.Round``) and the aggregator the digest of the model it published.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from secagg.ckks import CkksServer, Release
from secagg.errors import AbortReason, InvalidMessage, ProtocolAbort
from secagg.masking import MaskingClient, Stage
from secagg.masking.messages import KeyDirectory
from tests.ckks_kit import CkksRound
from tests.roundkit import Round

REAL, CRAFTED = b"\x01" * 32, b"\x02" * 32
TARGET = 1


def test_masking_sites_handed_different_models_never_send_their_inputs() -> None:
    """The aggregator collects every site's advertisement, each signed under the model that
    site was given, and hands the target a directory of them all. The target aborts
    (BAD_SIGNATURE) before it shares keys, let alone masks its input; and the sites with the
    crafted model refuse the target's advertisement too."""
    crafted = Round(sites=5, model_digest=CRAFTED)
    real = replace(crafted.config, model_digest=REAL)
    target = MaskingClient(real, TARGET, crafted.identities[TARGET], crafted.inputs[TARGET])
    adverts = {s: (target.start() if s == TARGET else c.start())
               for s, c in crafted.clients.items()}
    directory = KeyDirectory(tuple(adverts[s] for s in sorted(adverts)))
    with pytest.raises(ProtocolAbort) as caught:
        target.handle(directory)
    assert caught.value.reason is AbortReason.BAD_SIGNATURE
    assert target.stage is Stage.ABORTED
    with pytest.raises(ProtocolAbort) as caught:
        crafted.clients[2].handle(directory)
    assert caught.value.reason is AbortReason.BAD_SIGNATURE


def test_masking_sites_given_one_model_complete_the_round() -> None:
    """The same round with one model for all: it completes (the binding costs nothing)."""
    r = Round(sites=5, model_digest=REAL)
    for _ in range(5):
        r.advance()
    assert r.server.result is not None


def test_ckks_key_holder_refuses_uploads_computed_against_another_model() -> None:
    """The key holder was given the crafted model, as were all sites but the target, or the
    other way round: either way an upload signed under another model's round parameters is
    refused by the key holder (and by an honest aggregator's role)."""
    from secagg.ckks import CkksClient

    r = CkksRound(sites=4, vector_length=100, model_digest=CRAFTED)
    real = replace(r.config, model_digest=REAL)
    target = CkksClient(real, 2, r.identities[2], r.public, r.inputs[2]).start()
    release = Release(r.holder, r.config, site_id=1)
    try:
        with pytest.raises(InvalidMessage):
            release.add(target)
        release.add(r.client(3).start())  # an upload under the holder's own model verifies
    finally:
        release.close()
    with pytest.raises(InvalidMessage):
        CkksServer(r.config, r.public).handle(target)
