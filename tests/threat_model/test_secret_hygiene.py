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


def _frames_locals(exc: BaseException) -> list[tuple[str, str, object]]:
    """(function, name, value) of every local of every frame a traceback of ``exc`` shows,
    its causes and contexts included: what ``pytest -l`` or an error tracker that records
    locals prints or sends. (The frames of this file, which caught it, are left out.)"""
    seen: list[tuple[str, str, object]] = []
    chain: BaseException | None = exc
    while chain is not None:
        tb = chain.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_filename != __file__:
                seen.extend((frame.f_code.co_name, k, v)
                            for k, v in frame.f_locals.items())
            tb = tb.tb_next
        chain = chain.__cause__ or chain.__context__
    return seen


def _key_body(pem: bytes) -> bytes:
    return b"".join(pem.strip().splitlines()[1:-1])


def _shows(value: object, pem: bytes) -> bool:
    body = _key_body(pem)
    if isinstance(value, bytes | bytearray):
        return bytes(value) == pem or body[:24] in bytes(value)
    return body[:24].decode() in repr(value)


def test_a_key_that_fails_to_load_is_in_no_frame_of_the_traceback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A site's or the aggregator's key file that is refused (others may read it, it is not
    the certificate's key, it is not Ed25519) must not be in the refusal's traceback: the key
    file's bytes were a plain local in four frames, printed whole by ``pytest -l`` and sent by
    error trackers that record locals. Property: no local of any frame of the refusal, its
    cause or its context, holds or shows the key."""
    import os
    import shutil

    from cryptography.hazmat.primitives.asymmetric import ec

    from aggregator.service import load_server_files
    from secagg.errors import ConfigurationError
    from secagg.federation import pki
    from secagg.federation.kit import SiteKit, init_federation

    init_federation(tmp_path / "fed", 3)
    pristine = tmp_path / "fed" / "sites" / "site-1"
    other = pki.pem_private(ec.generate_private_key(ec.SECP256R1()))
    cases = []
    for name in ("client.key", "identity.key"):  # readable by others
        cases.append((name, None, 0o644))
    cases.append(("client.key", other, 0o600))  # not the certificate's key
    cases.append(("identity.key", other, 0o600))  # not an Ed25519 key
    for n, (name, content, mode) in enumerate(cases):
        site = tmp_path / f"site-{n}"
        shutil.copytree(pristine, site)
        os.chmod(site, 0o700)
        if content is not None:
            (site / name).unlink()
            pki.write_private(site / name, content)
        os.chmod(site / name, mode)
        pem = (site / name).read_bytes()
        with pytest.raises(ConfigurationError) as caught:
            SiteKit.load(site)
        shown = [(f, k) for f, k, v in _frames_locals(caught.value) if _shows(v, pem)]
        assert shown == [], (name, mode)
    server_key = tmp_path / "fed" / "aggregator" / "server.key"
    os.chmod(server_key, 0o644)
    with pytest.raises(ConfigurationError) as caught:
        load_server_files(tmp_path / "fed" / "aggregator" / "federation.toml")
    pem = server_key.read_bytes()
    assert [(f, k) for f, k, v in _frames_locals(caught.value) if _shows(v, pem)] == []


def test_secret_bytes_show_and_pickle_nothing() -> None:
    from secagg.hazmat.secret import SecretBytes, reveal

    s = SecretBytes(b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n")
    for text in (repr(s), str(s), f"{s}", f"{s!r}", repr([s]), repr({"k": s})):
        assert "PRIVATE" not in text and "MC4C" not in text and "53 bytes" in text
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(s)
    assert reveal(s) == s.reveal() == reveal(s.reveal()) and len(s) == 53
    assert s == SecretBytes(s.reveal()) and s != SecretBytes(b"other")
    assert hash(s) == hash(SecretBytes(s.reveal()))  # (a SiteKit holding one is hashable)
