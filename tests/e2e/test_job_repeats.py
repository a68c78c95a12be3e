"""A site's message counted just before the aggregator could answer (it was killed, or the
connection broke) is sent again by the site, possibly after its round has ended because it was
the last message the round waited for. The same bytes are the same message: acknowledged
again, never counted twice; different bytes are refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from aggregator.job import Job, ServiceError
from aggregator.service import load_server_files
from aggregator.store import Store
from secagg import wire
from secagg.federation.kit import ROSTER_FILE, load_roster
from secagg.model import FlatModel
from secagg.v1 import service_pb2
from tests.service_kit import ckks_key_offer, make_federation


def test_a_message_whose_answer_was_lost_is_acknowledged_after_its_round_ended(
        tmp_path: Path) -> None:
    fed = make_federation(tmp_path, 4, "ckks", rounds=2)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    store = Store(str(tmp_path / "aggregator.db"))
    now = [0.0]
    model = FlatModel.load_npz(files.config.initial_model)

    def job() -> Job:
        j = Job(files.config, roster, store, model, clock=lambda: now[0])
        j.recover()
        return j

    try:
        first = job()
        info = first.round_info(0)
        assert info is not None
        holder, announcement, data = ckks_key_offer(fed, files.config, info.round_id)
        cid = hashlib.sha256(data).digest()
        store.put_chunks([(cid, data)], round_number=1, site=holder)
        offer = service_pb2.CkksKeyOffer(announcement=wire.announcement_to_proto(announcement))
        offer.public_context.CopyFrom(wire.Blob((cid,), len(data)).to_proto())
        request = service_pb2.SubmitRequest(round_id=info.round_id, ckks_key=offer)
        assert first.submit(holder, request) is False  # counted; the answer never arrives
        # the round then ends (here: no site uploads before its deadlines) and the next opens
        for _ in range(5):
            if first.current_round != 1:
                break
            now[0] += 10_000.0
            first.tick()
        assert first.current_round == 2

        again = job()  # the aggregator, restarted on the same store
        before = list(store.events(1))
        assert again.submit(holder, request) is True  # acknowledged, the site goes on
        assert list(store.events(1)) == before  # and nothing counted twice
        changed = service_pb2.SubmitRequest()
        changed.CopyFrom(request)
        changed.ckks_key.public_context.size += 1
        with pytest.raises(ServiceError):  # not the message it sent: refused
            again.submit(holder, changed)
    finally:
        store.close()
