"""Adversary: whoever reads the aggregator's store (a stolen disk, a backup, a curious
operator). It must never hold a secret key or one site's plaintext update: the test runs a
round of each protocol through the real service, stops it mid-round (uploads in the store)
and at the end, and searches every byte of the store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from cryptography.hazmat.primitives import serialization

from secagg.model import FlatModel
from tests.service_kit import (
    make_federation,
    read_reports,
    site_delta,
    site_weight,
    start_aggregator,
    start_site,
)


def _secrets_and_plaintexts(fed_dir: Path, sites: int, model: FlatModel) -> dict[str, bytes]:
    needles: dict[str, bytes] = {}
    for s in range(1, sites + 1):
        d = fed_dir / "sites" / f"site-{s}"
        identity = serialization.load_pem_private_key((d / "identity.key").read_bytes(), None)
        needles[f"identity key of site {s}"] = identity.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        tls = (d / "client.key").read_bytes()
        needles[f"TLS key of site {s}"] = tls[40:100]
        delta = site_delta(s, 1, model.size)
        w = site_weight(s) / site_weight(sites)
        needles[f"update of site {s}"] = delta[:8].astype("<f8").tobytes()
        needles[f"weighted update of site {s}"] = (w * delta[:8]).astype("<f8").tobytes()
        trained = model.with_values(model.values + delta).to_arrays()
        needles[f"trained model of site {s}"] = trained["w"].ravel()[:8].astype(
            "<f4").tobytes()
    signer = (fed_dir / "trust-root" / "signer.key").read_bytes()
    needles["roster signer key"] = signer[40:90]
    return needles


def _scan(db: Path, needles: dict[str, bytes]) -> list[str]:
    raw = db.read_bytes() + (db.with_suffix(".db-wal").read_bytes()
                             if db.with_suffix(".db-wal").exists() else b"")
    found = [name for name, needle in needles.items() if needle in raw]
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        for (data,) in conn.execute("SELECT data FROM chunks"):
            try:
                context = ts.context_from(bytes(data))
            except Exception:  # noqa: S112 (not a context: TenSEAL raises bare C++ errors)
                continue
            if context.has_secret_key():
                found.append("a CKKS secret context")
    return found


@pytest.mark.parametrize(("protocol", "slow"), [("masking", "1:UNMASK"),
                                                ("ckks", "1:RELEASE")])
def test_store_never_holds_a_secret_key_or_a_sites_plaintext(tmp_path: Path, protocol: str,
                                                             slow: str) -> None:
    fed = make_federation(tmp_path, 3, protocol, rounds=1, stage_s=20.0)
    agg = start_aggregator(fed, tmp_path)
    with np.load(fed.directory / "model.npz") as z:
        model = FlatModel.from_arrays({k: z[k] for k in z.files})
    needles = _secrets_and_plaintexts(fed.directory, 3, model)
    procs = {s: start_site(fed, s, tmp_path / f"site-{s}.jsonl",
                           *(("--slow", slow) if s == 1 else ())) for s in (1, 2, 3)}
    try:
        stage = 5 if protocol == "masking" else 1
        agg.wait_for(lambda e: e.get("event") == "message_counted" and e.get("stage") == stage,
                     count=2 if protocol == "masking" else 3)
        assert _scan(tmp_path / "aggregator.db", needles) == []  # mid-round: uploads held
        for p in procs.values():
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs.values():
            p.kill()
        agg.stop()
    assert all(read_reports(tmp_path / f"site-{s}.jsonl") for s in procs)
    assert _scan(tmp_path / "aggregator.db", needles) == []
    # the canaries are real: the same search finds them where they are
    kit = fed.directory / "sites" / "site-1" / "identity.key"
    assert needles["TLS key of site 1"] in (kit.parent / "client.key").read_bytes()
