"""A CKKS key holder whose training script restarted after announcing its round's key."""

from __future__ import annotations

import logging

import pytest

from clients.errors import AggregatorRefused
from clients.site import Round
from secagg.v1 import service_pb2
from tests.threat_model.test_site_sdk_lying_aggregator import HOLDER, _model_info, _site


@pytest.mark.parametrize("code", ["FAILED_PRECONDITION", "INVALID_ARGUMENT"])
def test_a_key_holder_whose_key_is_refused_as_already_announced_skips_the_round(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: str) -> None:
    """The key holder announced round 1's key, and its script restarted before it spent the
    round: the secret key went with the old process, and the aggregator refuses a second
    announcement (FAILED_PRECONDITION). The AggregatorRefused escaped rounds(), so the
    script died at every restart until the round's deadline; now the round is skipped with
    a warning and the site waits for the next. Any other refusal is still raised."""
    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, conn = _site("ckks", info, payloads)
    site.site_id = HOLDER
    conn.then_done = True  # type: ignore[attr-defined]

    def refused(self: Round) -> None:
        raise AggregatorRefused(code, "this site already answered this stage")

    monkeypatch.setattr(Round, "_announce_key", refused)
    if code != "FAILED_PRECONDITION":
        with pytest.raises(AggregatorRefused):
            next(site.rounds())
        return
    with caplog.at_level(logging.WARNING, logger="clients"):
        assert list(site.rounds()) == []
    assert "cannot be released" in caplog.text


def test_a_kept_round_key_is_private_durable_and_the_announced_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The key holder keeps its round's key beside its history (0600) with the aggregates it
    released under it; a restarted script takes it up only for that round and only if it is
    the key the round announces; a file whose key is not the one it names is not used."""
    import json
    import os

    from clients.history import KEY_FILE, History
    from secagg import wire
    from secagg.ckks import KeyHolder

    history = History(tmp_path)
    key = KeyHolder.generate()
    key.record_release("hospitals/job-1/round-1", b"\x07" * 32, 1)
    history.save_key("hospitals/job-1/round-1", key)
    path = tmp_path / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    back = history.load_key("hospitals/job-1/round-1")
    assert back is not None and back.key_id == key.key_id
    assert back.releases == {"hospitals/job-1/round-1": b"\x07" * 32}
    assert history.load_key("hospitals/job-1/round-2") is None

    info, payloads = _model_info(1, "hospitals/job-1/round-1", service_pb2.PROTOCOL_CKKS)
    site, _ = _site("ckks", info, payloads, directory=tmp_path)
    other = KeyHolder.generate()
    for announced, expected in ((other, None), (key, key.key_id)):
        info.ckks_key.CopyFrom(service_pb2.CkksKeyOffer(
            announcement=wire.announcement_to_proto(announced.announce(
                holder=HOLDER, identity=site.kit.identity, epoch=info.round_id))))
        found = site._kept_key(info)
        assert (found.key_id if found is not None else None) == expected

    kept = json.loads(path.read_text())
    kept["key_id"] = other.key_id.hex()  # names another key than the one it holds
    path.write_text(json.dumps(kept))
    os.chmod(path, 0o600)
    assert history.load_key("hospitals/job-1/round-1") is None
    history.drop_key()
    assert not path.exists()
