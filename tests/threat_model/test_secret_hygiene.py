"""Adversary: anyone reading logs, reprs, errors or pickles. Secrets must not leak there."""

from __future__ import annotations

import pickle

import pytest

from secagg.errors import ProtocolAbort
from secagg.hazmat.key_agreement import AgreementKey
from secagg.hazmat.signing import IdentityKey
from secagg.masking.messages import KeyDirectory
from tests.roundkit import Round


def test_key_objects_redact_repr_and_refuse_pickling() -> None:
    for key in (AgreementKey.generate(), IdentityKey.generate()):
        text = repr(key)
        assert "redacted" in text
        secret_hex = (key.export_private_bytes().hex() if isinstance(key, AgreementKey)
                      else key._private.private_bytes_raw().hex())
        assert secret_hex not in text
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(key)


def test_client_refuses_pickling_and_its_repr_shows_no_secret() -> None:
    r = Round()
    r.advance()
    r.advance()
    client = r.clients[1]
    with pytest.raises(TypeError):
        pickle.dumps(client)
    text = repr(client) + str(vars(client).get("stage"))
    assert client._self_mask_seed.hex() not in text
    assert client._masking_key.export_private_bytes().hex() not in text


def test_abort_messages_carry_no_key_material() -> None:
    r = Round()
    d = r.advance()[1]
    assert isinstance(d, KeyDirectory)
    with pytest.raises(ProtocolAbort) as caught:
        r.clients[1].handle(KeyDirectory(d.entries[1:]))
    text = str(caught.value)
    for entry in d.entries:
        assert entry.masking_public_key.hex()[:8] not in text
    assert r.clients[1]._self_mask_seed == b""


def test_an_aborted_site_keeps_no_shares_or_self_mask_seed() -> None:
    """A site aborts after it drew its self-mask seed and holds shares (its own, others').
    Whatever later reads the aborted object (a crash dump, a debugger, a leaked reference)
    must find nothing. Property: the shares and the seed are gone."""
    from secagg.masking.messages import ShareDelivery

    r = Round()
    r.advance()
    delivery = r.advance()[1]
    assert isinstance(delivery, ShareDelivery)
    client = r.clients[1]
    assert client._held_shares and client._self_mask_seed
    bad = {u: bytes(c[:-1]) + bytes([c[-1] ^ 1]) for u, c in delivery.encrypted_shares.items()}
    with pytest.raises(ProtocolAbort):  # no share opens: another view of the round
        client.handle(ShareDelivery(bad))
    assert client._held_shares == {}
    assert client._self_mask_seed == b""


def test_loaded_site_and_aggregator_files_show_no_private_key_in_their_repr(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``print(site.kit)`` or a debugger's view of the aggregator's files must not show the
    TLS private keys (nor the identity key, which redacts itself)."""
    from aggregator.service import load_server_files
    from secagg.federation.kit import SiteKit, init_federation

    init_federation(tmp_path / "fed", 3)
    kit = SiteKit.load(tmp_path / "fed" / "sites" / "site-1")
    files = load_server_files(tmp_path / "fed" / "aggregator" / "federation.toml")
    for obj, secret in ((kit, kit.key_pem), (files, files.server_key)):
        text = repr(obj)
        assert "PRIVATE KEY" not in text
        body = b"".join(secret.splitlines()[1:-1]).decode()
        assert body[:40] not in text
