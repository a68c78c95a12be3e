"""What a job checks as it starts, before it serves a round: a stored model that no longer
matches its digest, and a configuration the federation's roster or model cannot run under,
stop it with a clear error (sites would otherwise refuse every round, one after another)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.job import Job, ServiceError
from aggregator.service import load_server_files
from aggregator.store import Store, chunks
from secagg.errors import ConfigurationError
from secagg.federation.kit import ROSTER_FILE, load_roster
from secagg.model import FlatModel
from secagg.v1 import service_pb2
from tests.service_kit import make_federation


def _parts(tmp_path: Path, sites: int = 4) -> tuple[Any, Any, FlatModel]:
    fed = make_federation(tmp_path, sites, "masking", rounds=2)
    files = load_server_files(fed.aggregator_config)
    roster = load_roster(files.directory / ROSTER_FILE, files.config.trust_root)
    return files.config, roster, FlatModel.load_npz(files.config.initial_model)


def test_a_stored_model_that_does_not_match_its_digest_stops_the_job(tmp_path: Path) -> None:
    """The bytes of the job's stored model changed under it (a damaged disk, a hand-edited
    store): the job refuses to start on it rather than serve a model whose digest is not its
    own; the untouched store starts."""
    config, roster, model = _parts(tmp_path)
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        Job(config, roster, store, model).recover()
        Job(config, roster, store, model).recover()  # the store as it was: starts again
        found = store.load_model(model.digest)
        assert found is not None
        first = found[1].chunk_ids[0]
        data = store.get_chunk(first)
        assert data is not None
        changed = bytes([data[0] ^ 1]) + data[1:]  # one bit, same size
        with store.engine.begin() as c:
            c.execute(chunks.update().where(chunks.c.chunk_id == first).values(data=changed))
        with pytest.raises(ServiceError, match="does not match its digest"):
            Job(config, roster, store, model).recover()
    finally:
        store.close()


def test_a_roster_or_model_beyond_the_configured_limits_is_refused_at_start(
        tmp_path: Path) -> None:
    """[limits] max_sites below the roster's size (the quantiser's headroom is sized for
    max_sites: more sites could overflow the masked sum), or a model beyond [limits]
    max_vector_length (every site would refuse it): refused before anything is stored."""
    config, roster, model = _parts(tmp_path)
    store_path = tmp_path / "aggregator.db"
    few_sites = dataclasses.replace(config, limits=dataclasses.replace(
        config.limits, max_sites=len(roster) - 1))
    short = dataclasses.replace(config, limits=dataclasses.replace(
        config.limits, max_vector_length=model.size - 1))
    store = Store(str(store_path))
    try:
        with pytest.raises(ConfigurationError, match="max_sites"):
            Job(few_sites, roster, store, model)
        with pytest.raises(ConfigurationError, match="max_vector_length"):
            Job(short, roster, store, model)
        assert store.rounds() == []
    finally:
        store.close()


def test_an_aggregator_on_a_damaged_store_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    """The aggregator command on a store whose model chunk was damaged (bit rot, a torn
    restore): exit status 2 and one line naming the cause (it was a Python traceback and
    status 1)."""
    import sqlalchemy as sa

    from tests.service_kit import start_aggregator

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = start_aggregator(fed, tmp_path)
    assert agg.stop() == 0
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'aggregator.db'}")
    with engine.begin() as c:
        assert c.exec_driver_sql("UPDATE chunks SET data = zeroblob(size) WHERE site = 0"
                                 ).rowcount
    engine.dispose()
    agg.start(wait=False)
    try:
        assert agg.process is not None
        assert agg.process.wait(timeout=60) == 2
    finally:
        agg.stop()  # (one that serves on, in a weakened build, is not left running)
    log = (tmp_path / "aggregator.log").read_text()
    assert "Traceback" not in log
    assert "cannot load" in log and "does not match its digest" in log


def test_an_aggregator_on_another_jobs_store_names_both_jobs(tmp_path: Path) -> None:
    """The [job] id changed under a running job: the refusal names the job the store holds
    and says what to do (a generic "cannot load" message hid it)."""
    from secagg.federation.kit import sign_settings
    from tests.service_kit import start_aggregator

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    agg = start_aggregator(fed, tmp_path)
    assert agg.stop() == 0
    config = fed.aggregator_config
    config.write_text(config.read_text().replace('id = "job"', 'id = "job-2"', 1))
    sign_settings(fed.directory, config)  # (the operator's new job, signed)
    agg.start(wait=False)
    try:
        assert agg.process is not None
        assert agg.process.wait(timeout=60) == 2
    finally:
        agg.stop()  # (one that serves on, in a weakened build, is not left running)
    log = (tmp_path / "aggregator.log").read_text()
    assert "Traceback" not in log and "cannot load" not in log
    assert "another job" in log and "job-2" in log


def test_an_aggregator_whose_model_file_is_not_the_one_the_config_names_refuses_to_start(
        tmp_path: Path) -> None:
    """The model file changed after `federation init` (the sites' configs name the digest of
    the first model): the job would open round 1 from a model every site refuses. The
    aggregator refuses to start, in one line, naming both settings."""
    import numpy as np

    from tests.service_kit import Aggregator

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    config = load_server_files(fed.aggregator_config).config
    assert config.initial_model_digest is not None and config.initial_model is not None
    arrays = dict(np.load(config.initial_model))
    arrays = {k: v + 1 if v.dtype.kind == "f" else v for k, v in arrays.items()}
    np.savez(config.initial_model, **arrays)
    agg = Aggregator(fed, tmp_path / "aggregator.db", tmp_path / "aggregator.log")
    agg.start(wait=False)
    try:
        assert agg.process is not None
        assert agg.process.wait(timeout=60) == 2
    finally:
        agg.stop()  # (one that serves on, in a weakened build, is not left running)
    log = (tmp_path / "aggregator.log").read_text()
    assert "Traceback" not in log and "initial_model_digest" in log


def test_an_aggregator_on_another_federations_store_refuses_to_start(tmp_path: Path) -> None:
    """Two trial federations, the same default name and job id, the same first model: B's
    aggregator on A's store served A's job (its rounds, its results) to B's sites as B's.
    The store is bound to the federation that first ran on it."""
    from tests.service_kit import Aggregator, start_aggregator

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_federation(tmp_path / "a", 3, "masking", rounds=1)
    b = make_federation(tmp_path / "b", 3, "masking", rounds=1)
    store = tmp_path / "a" / "aggregator.db"
    first = start_aggregator(a, tmp_path / "a", str(store))
    first.wait_for(lambda e: e.get("event") == "round_opened")
    assert first.stop() == 0
    other = Aggregator(b, store, tmp_path / "b.log")
    other.start(wait=False)
    try:
        assert other.process is not None and other.process.wait(timeout=30) == 2
    finally:
        other.stop()
    log = (tmp_path / "b.log").read_text()
    assert "Traceback" not in log and "another federation" in log
    again = start_aggregator(a, tmp_path / "a", str(store))  # A's own still runs on it
    again.wait_for(lambda e: e.get("event") == "serving", count=2)  # (one log for both)
    assert again.stop() == 0


def test_a_refused_start_does_not_bind_a_store_of_the_first_schema(tmp_path: Path) -> None:
    """A store from before the binding (schema 0001, rounds but no `job` row): a start with
    a typo in [job] id, refused by the round-id check, bound the store to the typo, and the
    right configuration was then refused for good. Only a start that passes binds it."""
    import sqlalchemy as sa

    from aggregator.store import job

    config, roster, model = _parts(tmp_path)
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        Job(config, roster, store, model).recover()
        with store.engine.begin() as c:  # as a store migrated from 0001 holds it
            c.execute(sa.delete(job))
        typo = dataclasses.replace(config, job_id="jbo")
        with pytest.raises(ConfigurationError, match="another job"):
            Job(typo, roster, store, model).recover()
        assert store.job_binding() is None
        Job(config, roster, store, model).recover()  # the store's own job starts, and binds
        assert store.job_binding() == (config.trust_root, config.round_id_for(0).rsplit("/", 1)[0])
    finally:
        store.close()


def test_a_ckks_job_no_round_of_which_could_be_released_is_refused_at_start(
        tmp_path: Path) -> None:
    """A CKKS job whose release noise, at its model's size, is above a tenth of clip_norm
    even with every site at full weight: the L2 check would refuse every round, and only
    once the sites had trained and encrypted. Refused at start, naming clip_norm; the same
    job with a workable clip_norm starts."""
    config, roster, _ = _parts(tmp_path)
    big = FlatModel.from_arrays({"w": np.zeros(1_000_000, np.float32)})
    limits = dataclasses.replace(config.limits, max_vector_length=big.size)  # (init: the small
    ckks = dataclasses.replace(config, protocol="ckks", key_holders=(1,), limits=limits)  # one's)
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        with pytest.raises(ConfigurationError, match=r"no CKKS round of this job could be "
                                                     r"released.*clip_norm 0.01"):
            Job(dataclasses.replace(ckks, clip_norm=0.01), roster, store, big)
        assert store.rounds() == []
        Job(dataclasses.replace(ckks, clip_norm=1.0), roster, store, big)
    finally:
        store.close()


@pytest.mark.parametrize(("change", "named"), [
    ({"min_sites": 5}, r"min_sites must be in \[3, 4\], got 5"),  # beyond the 4-site roster
    ({"min_sites": 2}, r"min_sites=2 lets 1 colluding sites"),  # an aggregate of two
    ({"clip_norm": 1000.0}, r"headroom: 4 sites x clip 1000"),  # past add-only-4096's 1024
])
def test_a_ckks_job_whose_rounds_could_not_be_configured_is_refused_at_start(
        tmp_path: Path, change: dict[str, Any], named: str) -> None:
    """A CKKS configuration every round of which the key announcement would refuse (min_sites
    beyond the roster or below what keeps two honest sites in a sum, a clip_norm whose sum
    outgrows the preset): FederationConfig.check cannot see it without the roster, so the job
    refuses it as it starts, naming the setting, before anything is stored; rather than open
    round after round that waits out its open deadline and aborts."""
    config, roster, model = _parts(tmp_path)
    ckks = dataclasses.replace(config, protocol="ckks", key_holders=(1,))
    ckks.check()
    dataclasses.replace(ckks, **change).check()  # (the config alone passes)
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        with pytest.raises(ConfigurationError,
                           match=r"no CKKS round of this job could run with 4 sites: " + named):
            Job(dataclasses.replace(ckks, **change), roster, store, model)
        assert store.rounds() == []
        Job(ckks, roster, store, model)
    finally:
        store.close()


def test_a_masking_job_no_round_of_which_could_run_is_refused_before_the_port_is_bound(
        tmp_path: Path) -> None:
    """A sparse graph for a roster too small for one (a threshold or a graph out of range)
    was found only when round 1 opened, after the "listening" line, with the store already
    bound to the job. Now: status 2 and one line, before anything listens or is stored."""
    from tests.service_kit import Aggregator

    fed = make_federation(tmp_path, 3, "masking", rounds=1, neighbors=4)
    agg = Aggregator(fed, tmp_path / "aggregator.db", tmp_path / "aggregator.log")
    agg.start(wait=False)
    try:
        assert agg.process is not None
        assert agg.process.wait(timeout=60) == 2
    finally:
        agg.stop()  # (one that serves on, in a weakened build, is not left running)
    log = (tmp_path / "aggregator.log").read_text()
    assert "too few for a sparse graph" in log and "Traceback" not in log
    assert '"listening"' not in log
    assert not (tmp_path / "aggregator.db").exists()


def test_a_store_bound_to_another_job_before_its_first_round_is_refused(tmp_path: Path) -> None:
    """The store is bound to this federation's trust root but to another job's name, and
    holds no round yet (that job's aggregator stopped between binding the store and opening
    its round 1, or bound it first at the same moment): the round-id check has no round to
    compare, so the binding alone refuses this job."""
    config, roster, model = _parts(tmp_path)
    name = config.round_id_for(0).rsplit("/", 1)[0]
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        assert store.bind_job(config.trust_root, name + "-other") == (
            config.trust_root, name + "-other")
        with pytest.raises(ConfigurationError, match="another job"):
            Job(config, roster, store, model).recover()
        assert store.rounds() == []  # refused before round 1 was opened on it
    finally:
        store.close()


@pytest.mark.parametrize("message", [
    {"ckks_update": service_pb2.EncryptedUpdateRef(site_id=1)},  # another protocol's message
    {"ckks_refusal": service_pb2.CkksReleaseRefusal()},
    {},  # none at all
])
def test_a_message_of_another_protocol_is_refused_as_malformed(tmp_path: Path,
                                                               message: dict[str, Any]) -> None:
    """A site sends a masking round a CKKS message (or a request with no message): refused
    INVALID_ARGUMENT, naming the message, before the round's stages are looked at (not a
    KeyError out of the job's thread); the round runs on and nothing is recorded."""
    config, roster, model = _parts(tmp_path)
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        job = Job(config, roster, store, model)
        job.recover()
        info = job.round_info(0)
        assert info is not None
        with pytest.raises(ServiceError, match="does not belong to this round's protocol") as e:
            job.submit(1, service_pb2.SubmitRequest(round_id=info.round_id, **message))
        assert e.value.code == "INVALID_ARGUMENT"
        after = job.round_info(0)
        assert after is not None and after.status == service_pb2.ROUND_STATUS_RUNNING
    finally:
        store.close()


def test_a_job_whose_initial_model_holds_no_values_is_refused_before_it_stores_a_round(
        tmp_path: Path) -> None:
    """A model of no values (one empty tensor) could never run a round: the job refuses it
    as it is made, naming it, and the store is left without a round 1 made of it (a store
    whose round 1 holds an empty model could never run, even after the file was fixed)."""
    config, roster, _ = _parts(tmp_path)
    empty = FlatModel.from_arrays({"w": np.zeros(0, np.float32)})
    assert empty.size == 0
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        with pytest.raises(ConfigurationError, match="initial model has no values"):
            Job(config, roster, store, empty).recover()
        assert store.rounds() == []
    finally:
        store.close()


def test_an_aggregator_whose_config_names_no_initial_model_refuses_to_start(
        tmp_path: Path) -> None:
    """[job] initial_model unset: the aggregator refuses to start with a configuration error
    naming the setting (it was a TypeError from the model loader, a traceback), before it
    listens or touches a store."""
    import asyncio
    import re

    from aggregator.service import serve

    fed = make_federation(tmp_path, 3, "masking", rounds=1)
    path = fed.aggregator_config
    text = path.read_text()
    unset = re.sub(r"(?m)^initial_model\s*=.*\n", "", text)
    assert unset != text
    path.write_text(unset)
    with pytest.raises(ConfigurationError, match="initial_model is not set"):
        asyncio.run(serve(path, store=str(tmp_path / "aggregator.db")))
    assert not (tmp_path / "aggregator.db").exists()


@pytest.mark.parametrize("change", ["edited", "unsigned", "another federation's"])
def test_an_aggregator_whose_shared_settings_are_not_the_signed_ones_refuses_to_start(
        tmp_path: Path, change: str) -> None:
    """An operator edited a shared setting of the aggregator's copy (clip_norm) without
    `sign-config`, or its settings.sig is missing or another federation's: it served, every
    site refused each round as its own config's fault, and the aggregator said nothing (an
    operator's test). It now refuses to start, naming sign-config, before it listens or
    touches a store."""
    import asyncio

    from aggregator.service import serve

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    fed = make_federation(tmp_path / "a", 3, "masking", rounds=1)
    path = fed.aggregator_config
    if change == "edited":
        text = path.read_text()
        edited = re.sub(r"(?m)^clip_norm = .*$", "clip_norm = 0.01", text)
        assert edited != text
        path.write_text(edited)
    elif change == "unsigned":
        (path.parent / "settings.sig").unlink()
    else:
        other = make_federation(tmp_path / "b", 3, "masking", rounds=1)
        (path.parent / "settings.sig").write_bytes(
            (other.aggregator_config.parent / "settings.sig").read_bytes())
    with pytest.raises(ConfigurationError, match=r"every site would refuse this aggregator's "
                                                 r"settings: .*sign-config"):
        # (bounded: an aggregator that started would serve until stopped)
        asyncio.run(asyncio.wait_for(serve(path, store=str(tmp_path / "aggregator.db"),
                                           listen="127.0.0.1:0", metrics_listen=None), 20))
    assert not (tmp_path / "aggregator.db").exists()
