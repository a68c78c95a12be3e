"""Adversary: whoever reads the aggregator's logs, its metrics, its store, or what it sends to
the other sites. Canaries (each site's update, its keys, the seeds and shares it makes, a CKKS
secret key, the payloads it uploads) are planted or recorded as the sites make them, a full
round of each protocol runs through the real service, and every one of those places is
searched for them, raw and in the encodings a log line would use (hex, base64, decimal)."""

from __future__ import annotations

import base64
import json
import sqlite3
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from secagg.model import FlatModel
from tests.service_kit import make_federation, run_sites, site_delta, start_aggregator

SITES = 3


def _encodings(needle: bytes) -> list[bytes]:
    """The needle's first 16 bytes raw, as hex (either case) and as base64 at each of the
    three alignments it can take inside a longer encoded string."""
    head = needle[:16]
    out = [head, head.hex().encode(), head.hex().upper().encode()]
    for shift in range(3):
        encoded = base64.b64encode(bytes(shift) + needle[:24])
        skip = (shift * 4 + 2) // 3 + 1  # characters that depend on the padding bytes
        out.append(encoded[skip:skip + 16])
    return out


def _needles(fed_dir: Path, work: Path, round_number: int, model: FlatModel
             ) -> dict[str, list[tuple[str, bytes]]]:
    """For each site: (what, bytes) of everything that must stay at the site."""
    out: dict[str, list[tuple[str, bytes]]] = {}
    for s in range(1, SITES + 1):
        d = fed_dir / "sites" / f"site-{s}"
        identity = serialization.load_pem_private_key((d / "identity.key").read_bytes(), None)
        items = [
            ("identity key", identity.private_bytes(  # type: ignore[union-attr]
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption())),
            ("TLS key", (d / "client.key").read_bytes()[40:100]),
        ]
        delta = site_delta(s, round_number, model.size)
        items.append(("update (float64)", delta[:4].astype("<f8").tobytes()))
        items.append(("update (decimal)", repr(float(delta[0]))[:12].encode()))
        trained = model.with_values(model.values + delta).to_arrays()
        items.append(("trained model (float32)",
                      trained["w"].ravel()[:4].astype("<f4").tobytes()))
        for line in (work / f"secrets-{s}.jsonl").read_text().splitlines():
            record = json.loads(line)
            items.append((record["kind"], base64.b64decode(record["b64"])))
        out[f"site {s}"] = items
    return out


def _store_bytes(db: Path) -> bytes:
    raw = db.read_bytes()
    wal = db.with_name(db.name + "-wal")
    if wal.exists():
        raw += wal.read_bytes()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:  # and every row, decoded
        for table in ("chunks", "events", "rounds", "models", "releases"):
            for row in conn.execute(f"SELECT * FROM {table}"):  # noqa: S608 (our table names)
                raw += b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
    return raw


# kinds the store and other sites legitimately hold (uploads are masked or encrypted; shares
# are revealed to the aggregator in UNMASK, by design): searched for in logs and metrics only
_PROTOCOL_DATA = {"uploaded payload", "share", "seed"}


def _postgres_store_bytes(url: str) -> bytes:
    """Every row of every table of the PostgreSQL database (reflected, so a table added later
    is searched too), each value as stored: bytea raw, anything else as text."""
    import sqlalchemy as sa

    from aggregator.store import normalize_url

    engine = sa.create_engine(normalize_url(url))
    raw = b""
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        assert {"chunks", "events", "rounds", "models", "releases", "job"} <= set(meta.tables)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(sa.select(table)):
                    raw += b"".join(bytes(v) if isinstance(v, bytes | memoryview)
                                    else str(v).encode() for v in row)
    finally:
        engine.dispose()
    return raw


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_no_canary_reaches_logs_metrics_store_or_other_sites(tmp_path: Path,
                                                            protocol: str) -> None:
    _canary_round(tmp_path, protocol, None)


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_no_canary_reaches_a_postgresql_store(tmp_path: Path, protocol: str,
                                              postgres_url: str) -> None:
    """The same round and search with the aggregator on PostgreSQL (skipped, or failed under
    SECAGG_REQUIRE_POSTGRES, when no server is reachable): every row of every table of its
    database is searched, so what the service writes through the PostgreSQL dialect (bytea,
    text) is held to the same promise as the SQLite file."""
    _canary_round(tmp_path, protocol, postgres_url)


def _canary_round(tmp_path: Path, protocol: str, store_url: str | None) -> None:
    """One round of ``protocol`` through the real service on ``store_url`` (None: a SQLite
    file), then the search."""
    fed = make_federation(tmp_path, SITES, protocol, rounds=1, key_holders=(1,))
    agg = start_aggregator(fed, tmp_path, store_url)
    agg.wait_for(lambda e: e.get("event") == "metrics_listening")
    port = int(next(e for e in agg.lines if e.get("event") == "metrics_listening")["peer"]
               .rsplit(" -> ", 1)[1])
    try:
        reports = run_sites(fed, tmp_path, extra={
            s: ("--record", f"{tmp_path / f'secrets-{s}.jsonl'}:0") for s in range(1, SITES + 1)})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read()
    finally:
        agg.stop()
    assert all(any("model" in x for x in rep) for rep in reports.values())  # the round ran
    with np.load(fed.directory / "model.npz") as z:
        model = FlatModel.from_arrays({k: z[k] for k in z.files})
    needles = _needles(fed.directory, tmp_path, 1, model)
    kinds = {what for items in needles.values() for what, _ in items}
    expected = {"agreement private key", "share", "uploaded payload"} if protocol == "masking" \
        else {"ckks secret key", "ckks flood key", "uploaded payload"}
    assert expected <= kinds, kinds  # the recording hooks really ran
    logs = (tmp_path / "aggregator.log").read_bytes()
    store = (_store_bytes(tmp_path / "aggregator.db") if store_url is None
             else _postgres_store_bytes(store_url))
    received = {s: (tmp_path / f"secrets-{s}.jsonl.received").read_bytes()
                for s in range(1, SITES + 1)}
    found = []
    for owner, items in needles.items():
        others = b"".join(v for s, v in received.items() if f"site {s}" != owner)
        for what, needle in items:
            places = {"the aggregator's log": logs, "the metrics": metrics}
            if what not in _PROTOCOL_DATA:
                places |= {"the store": store, "what other sites received": others}
            for place, haystack in places.items():
                if any(e in haystack for e in _encodings(needle)):
                    found.append(f"{owner}'s {what} in {place}")
    assert found == []
    # the search is real: what may be there is found there (the round's starting model is
    # in the store and every site received it; the round id is in the log)
    initial = model.to_bytes()[64:96]  # as it travels and is stored
    assert any(e in store for e in _encodings(initial))
    assert any(e in received[2] for e in _encodings(initial))
    assert b"round-1" in logs and b"secagg_rounds_completed_total" in metrics
