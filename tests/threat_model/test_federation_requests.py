"""Adversary: whoever hands the operator a file to process (a certificate request, a site
directory, a certificate from the operator's own CA) or runs the federation commands in the
wrong place. Each is refused with a clear error and nothing is issued, overwritten or
re-signed: no certificate for a request that does not prove its keys, no site's identity
handed to a new key, no certificate naming a site ambiguously, no key file overwritten."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from secagg.errors import ConfigurationError, InvalidMessage
from secagg.federation import pki
from secagg.federation.config import FederationConfig
from secagg.federation.kit import (
    SiteKit,
    init_federation,
    load_roster,
    make_site_request,
    sign_site_request,
)

# a federation's trust root, for a request whose site directory is never loaded here
ANY_ROOT = bytes(range(32))


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    d = tmp_path / "fed"
    init_federation(d, 4)
    return d


def _roster_version(fed: Path) -> int:
    config = FederationConfig.load(fed / "federation.toml")
    return load_roster(fed / "roster.bin", config.trust_root).version


def test_a_request_for_a_site_on_the_roster_with_a_new_identity_key_is_refused(
        fed: Path, tmp_path: Path) -> None:
    """A request for site 1's id made with fresh keys (properly signed by its own new
    identity key): issuing it would put the requester's key on the roster as site 1 and give
    it site 1's certificate. Refused; the roster stays as it was."""
    request = make_site_request(tmp_path / "not-site-1", 1, trust_root=ANY_ROOT)
    with pytest.raises(ConfigurationError, match="already on the roster with another key"):
        sign_site_request(fed, request, tmp_path / "out")
    assert not (tmp_path / "out" / "client.crt").exists()
    assert _roster_version(fed) == 1


def test_signed_files_never_go_into_a_directory_that_holds_files(
        fed: Path, tmp_path: Path) -> None:
    """`federation sign --out` pointed at a live site's directory would replace its
    certificate, config and roster: refused, the directory untouched."""
    request = make_site_request(tmp_path / "site-5", 5, trust_root=ANY_ROOT)
    live = tmp_path / "live"
    shutil.copytree(fed / "sites" / "site-2", live)
    before = {p.name: p.read_bytes() for p in live.iterdir()}
    with pytest.raises(ConfigurationError, match="not an empty directory"):
        sign_site_request(fed, request, live, add_site=True)
    assert {p.name: p.read_bytes() for p in live.iterdir()} == before
    assert _roster_version(fed) == 1


def test_a_site_directory_whose_identity_key_is_not_the_rosters_is_refused_at_load(
        fed: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-1"
    shutil.copytree(fed / "sites" / "site-1", site)
    (site / "identity.key").unlink()
    shutil.copy(fed / "sites" / "site-2" / "identity.key", site / "identity.key")
    with pytest.raises(ConfigurationError, match="identity key is not the roster's"):
        SiteKit.load(site)


def _csr(site_uri: str, key: object) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site")])).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(site_uri)]), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def test_the_ca_signs_only_a_request_that_proves_an_ec_key() -> None:
    """A request whose signature does not verify (no proof the requester holds the TLS key),
    or for a key that is not EC: the CA signs neither."""
    ca_key, ca_cert = pki.make_ca("t")
    good = _csr(f"{pki.SITE_URI_PREFIX}3", pki.new_key())
    assert pki.site_id_from_pem(pki.pem_cert(pki.sign_csr(ca_key, ca_cert, good, 3))) == 3
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the signature's last byte
    forged = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(ConfigurationError, match="signature is invalid"):
        pki.sign_csr(ca_key, ca_cert, forged, 3)
    edwards = _csr(f"{pki.SITE_URI_PREFIX}3", ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(ConfigurationError, match="must be an EC key"):
        pki.sign_csr(ca_key, ca_cert, edwards, 3)


@pytest.mark.parametrize(("uris", "site"), [
    (["urn:secagg:site:3"], 3),
    (["urn:secagg:site:3", "urn:secagg:site:4"], None),  # two sites
    (["urn:secagg:site:03"], None),  # a second spelling of site 3
    (["urn:secagg:site:3", "urn:secagg:site:3x"], None),  # a malformed extra one
    (["urn:secagg:site:x"], None),
    (["urn:secagg:site:0"], None),
    ([f"urn:secagg:site:{2**63 - 1}"], 2**63 - 1),
    ([f"urn:secagg:site:{2**63}"], None),  # beyond a site id
    (["urn:secagg:site:" + "9" * 5000], None),  # beyond int()'s digits: raised before
])
def test_a_certificate_names_a_site_only_unambiguously(uris: list[str], site: int | None) -> None:
    """Certificates from an operator's own CA are accepted: one that names two sites, a site
    in another spelling, or a malformed site URI beside a good one names no site."""
    ca_key, ca_cert = pki.make_ca("own")
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site")]))
            .issuer_name(ca_cert.subject).public_key(pki.new_key().public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    assert pki.site_id_from_pem(pki.pem_cert(cert)) == site


def test_a_private_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    pki.write_private(path, b"the live key")
    with pytest.raises(FileExistsError):
        pki.write_private(path, b"another key")
    assert path.read_bytes() == b"the live key"


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_a_site_with_an_expired_or_future_certificate_is_refused_at_load(
        fed: Path, tmp_path: Path, when: str) -> None:
    """Said at load, naming the date, not as minutes of TLS handshake failures later."""
    site = tmp_path / "site-2"
    shutil.copytree(fed / "sites" / "site-2", site)
    ca_key = pki.load_private(fed / "ca" / "ca.key")
    ca_cert = pki.load_cert(fed / "ca" / "ca.crt")
    key = serialization.load_pem_private_key((site / "client.key").read_bytes(), None)
    start = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3) if when == "expired"
             else dt.datetime.now(dt.UTC) + dt.timedelta(days=3))
    cert = pki.issue_site_cert(ca_key, ca_cert, 2, key.public_key(),  # type: ignore[arg-type]
                               days=1, not_before=start)
    (site / "client.crt").write_bytes(pki.pem_cert(cert))
    with pytest.raises(ConfigurationError, match="expired" if when == "expired"
                       else "not valid before"):
        SiteKit.load(site)


def test_a_model_file_that_carries_a_pickle_is_refused_without_running_it(
        tmp_path: Path) -> None:
    """An .npz whose array is a pickled object (what np.load would unpickle, running the
    object's reduce): refused as a model file, and the payload never runs."""
    from secagg.model import FlatModel

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))  # unpickling it creates the file

    crafted = tmp_path / "model.npz"
    np.savez(crafted, w=np.array([Payload()], dtype=object))
    with pytest.raises(ConfigurationError):
        FlatModel.load_npz(crafted)
    assert not marker.exists()


def _intermediate(ca_key: Any, ca_cert: x509.Certificate) -> tuple[Any, x509.Certificate]:
    """A CA certificate signed by ``ca_key`` (what the federation's CA never issues)."""
    key = pki.new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def test_a_site_certificate_from_an_intermediate_under_the_federations_ca_names_no_site(
        fed: Path, tmp_path: Path) -> None:
    """The federation's CA has path length 0: it issues site certificates itself. gRPC's TLS
    does not enforce a trust anchor's path length, and took a site-1 certificate issued by an
    intermediate CA under it (were the CA key ever used to sign a CA). The aggregator's
    identity check (site_id_from_pem with the bundle's direct issuers) and a site's load
    check (check_tls_files) both refuse it; the CA's own site certificates pass."""
    ca_pem = (fed / "ca" / "ca.crt").read_bytes()
    ca_key = pki.load_private(fed / "ca" / "ca.key")
    ca_cert = pki.load_cert(fed / "ca" / "ca.crt")
    inter_key, inter = _intermediate(ca_key, ca_cert)
    leaf_key = pki.new_key()
    leaf = pki.issue_site_cert(inter_key, inter, 1, leaf_key.public_key())
    # the aggregator's check, with the bundle alone and with another CA beside it that
    # allows intermediates (an operator's own PKI, mid-rotation), and a non-CA certificate
    _, other = _intermediate(*pki.make_ca("operator"))
    for bundle in (ca_pem, ca_pem + pki.pem_cert(other),
                   ca_pem + (fed / "sites" / "site-2" / "client.crt").read_bytes()):
        anchors = pki.trust_anchors(bundle)
        for presented in (pki.pem_cert(inter), b""):
            assert pki.site_id_from_pem(pki.pem_cert(leaf), anchors, presented) is None
        own = (fed / "sites" / "site-1" / "client.crt").read_bytes()
        assert pki.site_id_from_pem(own, anchors) == 1
    with pytest.raises(ConfigurationError, match="not issued by"):
        pki.check_tls_files(pki.pem_private(leaf_key), pki.pem_cert(leaf) + pki.pem_cert(inter),
                            ca_pem, tmp_path, chain_to_ca=True)


def _request_with_csr(tmp_path: Path, site_id: int, csr_der: bytes) -> Path:
    """A site request around ``csr_der``, properly signed by a fresh identity key."""
    import json

    from secagg.federation.kit import _request_message

    identity = ed25519.Ed25519PrivateKey.generate()
    pem = x509.load_der_x509_csr(csr_der).public_bytes(serialization.Encoding.PEM).decode()
    path = tmp_path / f"request-{site_id}.json"
    path.write_text(json.dumps({
        "site_id": site_id, "csr": pem,
        "identity_public_key": identity.public_key().public_bytes_raw().hex(),
        "identity_signature": identity.sign(_request_message(site_id, csr_der)).hex()}))
    return path


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    size = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + size + body


def test_a_request_carrying_its_site_name_twice_is_a_clear_refusal(
        fed: Path, tmp_path: Path) -> None:
    """A CSR with the SAN extension twice (re-signed, so it verifies): cryptography raises
    DuplicateExtension, which is no ValueError, and `federation sign` ended in a traceback
    (so did a client certificate like it at the aggregator: UNKNOWN). It names no site."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ObjectIdentifier

    key = pki.new_key()
    tbs = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .add_extension(x509.SubjectAlternativeName(
               [x509.UniformResourceIdentifier(f"{pki.SITE_URI_PREFIX}5")]), critical=False)
           .add_extension(x509.UnrecognizedExtension(ObjectIdentifier("2.5.29.99"), b"\x30\x00"),
                          critical=False)
           .sign(key, hashes.SHA256()).tbs_certrequest_bytes)
    tbs = tbs.replace(bytes.fromhex("0603551d63"), bytes.fromhex("0603551d11"))  # 2nd SAN
    algorithm = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))  # ecdsa-with-SHA256
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    csr_der = _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))
    csr = x509.load_der_x509_csr(csr_der)
    assert csr.is_signature_valid
    assert pki.site_ids_of(csr) == [-1]
    with pytest.raises(ConfigurationError, match="does not name site 5 alone"):
        sign_site_request(fed, _request_with_csr(tmp_path, 5, csr_der), tmp_path / "out",
                          add_site=True)
    assert not (tmp_path / "out").exists() and _roster_version(fed) == 1


@pytest.mark.parametrize(("curve", "signed"), [
    ("SECP192R1", False), ("SECP256K1", False), ("BrainpoolP256R1", False),
    ("SECP521R1", False), ("SECP384R1", True), ("SECP256R1", True)])
def test_the_ca_signs_only_keys_on_curves_tls_takes(curve: str, signed: bool) -> None:
    """P-192 (96-bit security), secp256k1, brainpool and P-521 keys were signed, and every
    handshake with them then failed at the aggregator ("unavailable"): refused, naming the
    curves taken."""
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, ca_cert = pki.make_ca("t")
    key = ec.generate_private_key(getattr(ec, curve)())
    csr = _csr(f"{pki.SITE_URI_PREFIX}3", key)
    if signed:
        assert pki.site_id_from_pem(pki.pem_cert(pki.sign_csr(ca_key, ca_cert, csr, 3))) == 3
        return
    with pytest.raises(ConfigurationError, match="secp256r1, secp384r1"):
        pki.sign_csr(ca_key, ca_cert, csr, 3)


def test_an_expired_ca_is_said_at_load_and_signs_nothing(fed: Path, tmp_path: Path) -> None:
    """The CA expired (its site certificates still in date): sites got only "unavailable"
    (the TLS handshake's "certificate has expired" in gRPC's own log), and `sign` issued a
    year-long certificate under it. SiteKit.load says it, naming the date; `sign` refuses;
    a certificate is never issued past its CA's end."""
    from cryptography.hazmat.primitives.asymmetric import ec

    now = dt.datetime.now(dt.UTC)
    ca_key = pki.load_private(fed / "ca" / "ca.key")
    ca_cert = pki.load_cert(fed / "ca" / "ca.crt")

    def ca_ending(end: dt.datetime) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(ca_cert.subject)
                .issuer_name(ca_cert.subject).public_key(ca_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(ca_key, hashes.SHA256()))

    expired = ca_ending(now - dt.timedelta(days=1))
    site = tmp_path / "site-2"
    shutil.copytree(fed / "sites" / "site-2", site)
    (site / "ca.crt").write_bytes(pki.pem_cert(expired))
    with pytest.raises(ConfigurationError, match=r"CA certificate .* expired on"):
        SiteKit.load(site)
    csr = _csr(f"{pki.SITE_URI_PREFIX}3", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigurationError, match="CA expired"):
        pki.sign_csr(ca_key, expired, csr, 3)
    ending = ca_ending(now + dt.timedelta(days=10))
    cert = pki.sign_csr(ca_key, ending, csr, 3)
    assert cert.not_valid_after_utc <= ending.not_valid_after_utc


@pytest.mark.parametrize("site_id", ["Infinity", "1e400", "1.5", "true", "deep"])
def test_a_request_file_that_is_no_request_is_a_clear_error(
        fed: Path, tmp_path: Path, site_id: str) -> None:
    """A site id beyond any float, a fraction, a boolean, or JSON nested 100,000 deep:
    OverflowError and RecursionError came out of `federation sign` as tracebacks, and 1.5
    was taken as site 1."""
    import json

    good = make_site_request(tmp_path / "s", 5, trust_root=ANY_ROOT).read_text()
    path = tmp_path / "odd.json"
    if site_id == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        path.write_text(good.replace('"site_id": 5', f'"site_id": {site_id}'))
        assert json.loads(good)["site_id"] == 5
    with pytest.raises(ConfigurationError, match=r"cannot read the site request|site id"):
        sign_site_request(fed, path, tmp_path / "out", add_site=True)
    assert _roster_version(fed) == 1


def test_csr_refuses_an_impossible_site_id_before_writing_a_key(tmp_path: Path) -> None:
    """2**64 raised OverflowError after client.key and identity.key were written (and the
    retry was then refused: "identity.key exists"); 2**63 was made, only for `sign` to
    refuse it."""
    for site_id in (2**64, 2**63, 0):
        with pytest.raises(ConfigurationError, match="below 2\\*\\*63"):
            make_site_request(tmp_path / "big", site_id, trust_root=ANY_ROOT)
        assert not (tmp_path / "big").exists()


def test_csr_writes_no_key_when_one_of_its_keys_is_already_there(tmp_path: Path) -> None:
    """A dangling link at identity.key passed the exists() check: client.key was written,
    then identity.key failed, and every retry failed on client.key. Both names are checked
    (links too) before any key is written."""
    d = tmp_path / "site"
    d.mkdir()
    (d / "identity.key").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigurationError, match=r"identity\.key exists"):
        make_site_request(d, 5, trust_root=ANY_ROOT)
    assert not (d / "client.key").exists()
    e = tmp_path / "site-b"
    e.mkdir()
    (e / "client.key").write_text("an earlier request's")
    with pytest.raises(ConfigurationError, match=r"client\.key exists"):
        make_site_request(e, 5, trust_root=ANY_ROOT)
    assert not (e / "identity.key").exists()


def test_csr_replaces_a_link_planted_at_its_request_instead_of_writing_through_it(
        tmp_path: Path) -> None:
    """request.json was written through a symlink planted in the site's directory,
    overwriting the link's target. The link is replaced; the target is untouched; the
    request is a 0644 file."""
    d = tmp_path / "site"
    d.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (d / "request.json").symlink_to(victim)
    path = make_site_request(d, 5, trust_root=ANY_ROOT)
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and "csr" in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o644


def test_two_signs_at_once_leave_one_consistent_roster(
        fed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two operators (or scripts) sign at once: both read roster version 1 and wrote two
    different version-2 rosters, the federation's and the aggregator's disagreeing (one run
    also died on the other's temporary file). Signs are serialised: both sites end up on
    one roster, version 3, the same in both places. (Signing the roster is slowed, so the
    two overlap whenever nothing serialises them.)"""
    import threading
    import time

    from secagg.roster import RosterSigner

    real = RosterSigner.sign

    def slow(self: RosterSigner, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RosterSigner, "sign", slow)

    requests = {s: make_site_request(tmp_path / f"site-{s}", s, trust_root=ANY_ROOT)
                for s in (40, 41)}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def sign(s: int) -> None:
        start.wait()
        try:
            sign_site_request(fed, requests[s], tmp_path / f"out-{s}", add_site=True)
        except BaseException as e:  # (reported below)
            errors.append(e)

    threads = [threading.Thread(target=sign, args=(s,)) for s in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    config = FederationConfig.load(fed / "federation.toml")
    ours = load_roster(fed / "roster.bin", config.trust_root)
    theirs = load_roster(fed / "aggregator" / "roster.bin", config.trust_root)
    assert sorted(ours) == [1, 2, 3, 4, 40, 41] and ours.version == 3
    assert (fed / "roster.bin").read_bytes() == (fed / "aggregator" / "roster.bin").read_bytes()
    assert theirs.version == 3


def test_the_sdk_and_csr_work_without_posix_only_modules(tmp_path: Path) -> None:
    """The SDK is meant for Windows too: `import fcntl` at the top of the federation kit
    broke `import clients` there, and os.fchmod (POSIX-only before Python 3.13) broke `csr`
    after it had written the keys."""
    import subprocess
    import sys

    code = ("import os, sys; sys.modules['fcntl'] = None; del os.fchmod; import clients.site; "
            "from secagg.federation.kit import make_site_request; "
            f"make_site_request({str(tmp_path / 'site')!r}, 5, trust_root='ab' * 32)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "site" / "request.json").is_file()


def test_ca_validity_windows_and_the_sign_lock(fed: Path, tmp_path: Path) -> None:
    """A CA not valid yet signs nothing; in a rotation bundle an expired CA anchors
    nothing (a certificate made under it by other tooling passed the load check); a link
    planted at the sign lock's name is not followed; and `sign` on a directory that is no
    federation leaves no lock file there."""
    from cryptography.hazmat.primitives.asymmetric import ec

    now = dt.datetime.now(dt.UTC)
    ca_key = pki.load_private(fed / "ca" / "ca.key")
    ca_cert = pki.load_cert(fed / "ca" / "ca.crt")

    def ca(begin: dt.datetime, end: dt.datetime) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(ca_cert.subject)
                .issuer_name(ca_cert.subject).public_key(ca_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(begin).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(ca_key, hashes.SHA256()))

    csr = _csr(f"{pki.SITE_URI_PREFIX}3", ec.generate_private_key(ec.SECP256R1()))
    later = ca(now + dt.timedelta(days=7), now + dt.timedelta(days=70))
    with pytest.raises(ConfigurationError, match="not valid before"):
        pki.sign_csr(ca_key, later, csr, 3)
    old_key, old = pki.make_ca("old")
    old = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.subject)
           .public_key(old_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(days=60))
           .not_valid_after(now - dt.timedelta(days=1))
           .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
           .sign(old_key, hashes.SHA256()))
    leaf_key = pki.new_key()
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site 2")]))
            .issuer_name(old.subject)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=2))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(pki.site_uri(2))]), critical=False)
            .sign(old_key, hashes.SHA256()))
    with pytest.raises(ConfigurationError, match="not issued by"):
        pki.check_tls_files(pki.pem_private(leaf_key), pki.pem_cert(leaf),
                            pki.pem_cert(old) + pki.pem_cert(ca_cert), tmp_path,
                            chain_to_ca=True)

    target = tmp_path / "created-by-sign"
    (fed / ".sign.lock").unlink(missing_ok=True)
    (fed / ".sign.lock").symlink_to(target)
    request = make_site_request(tmp_path / "site-5", 5, trust_root=ANY_ROOT)
    with pytest.raises(ConfigurationError, match="cannot lock"):
        sign_site_request(fed, request, tmp_path / "out", add_site=True)
    assert not target.exists()
    site_dir = fed / "sites" / "site-1"
    with pytest.raises(ConfigurationError, match="not a federation directory"):
        sign_site_request(site_dir, request, tmp_path / "out", add_site=True)
    assert not (site_dir / ".sign.lock").exists()


def test_init_sets_its_modes_whatever_the_umask_and_names_the_dialled_host(
        tmp_path: Path) -> None:
    """Under umask 000 the directories holding ca.key and signer.key were world-writable,
    and the public files 0666. And `--aggregator agg.example.org:50051` alone made a server
    certificate naming only localhost, which every site's hostname check then refused."""
    import os
    import stat

    old = os.umask(0)
    try:
        init_federation(tmp_path / "new" / "parent" / "f", 3,
                        aggregator="agg.example.org:50051")
        kept = tmp_path / "kept"
        kept.mkdir(mode=0o700)  # an empty directory the operator made: its mode is kept
        init_federation(kept, 3, aggregator="dns:///grpc.example.org:443")
    finally:
        os.umask(old)
    d = tmp_path / "new" / "parent" / "f"

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    for private in ("ca", "trust-root", "aggregator", "sites/site-1"):
        assert mode(d / private) == 0o700, private
    for public in (".", "sites", "..", "../.."):
        assert mode(d / public) == 0o755, public
    assert mode(kept) == 0o700
    for public in ("ca/ca.crt", "federation.toml", "roster.bin", "sites/site-1/client.crt"):
        assert mode(d / public) == 0o644, public
    server = pki.load_cert(d / "aggregator" / "server.crt")
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "agg.example.org" in names.get_values_for_type(x509.DNSName)
    server = pki.load_cert(kept / "aggregator" / "server.crt")
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "grpc.example.org" in names.get_values_for_type(x509.DNSName)
    with pytest.raises(ConfigurationError, match="--aggregator must be HOST:PORT"):
        init_federation(tmp_path / "noport", 3, aggregator="[::1]")


def test_sign_opens_the_roster_with_its_own_signer_key_not_the_configs_trust_root(
        fed: Path, tmp_path: Path) -> None:
    """Someone who can write the federation's config and roster (a directory left writable)
    names their own trust root in federation.toml and a roster signed with it that puts
    their identity key at site 2. The operator's next routine `sign --add-site` re-signed
    that roster with the real signer key: site 2 was theirs under the real trust root.
    `sign` now trusts only its own signer key: refused, nothing re-signed."""
    from secagg.federation.kit import roster_from_bytes, roster_to_bytes
    from secagg.hazmat.signing import IdentityKey
    from secagg.roster import RosterSigner

    config_text = (fed / "federation.toml").read_text()
    real = FederationConfig.load(fed / "federation.toml")
    sites = dict(load_roster(fed / "roster.bin", real.trust_root))
    theirs = RosterSigner(IdentityKey(ed25519.Ed25519PrivateKey.generate()))
    sites[2] = IdentityKey(ed25519.Ed25519PrivateKey.generate()).public_bytes
    (fed / "roster.bin").write_bytes(roster_to_bytes(theirs.sign(sites, federation=real.name)))
    (fed / "federation.toml").write_text(
        config_text.replace(real.trust_root.hex(), theirs.public_key.hex()))
    request = make_site_request(tmp_path / "site-5", 5, trust_root=ANY_ROOT)
    with pytest.raises(ConfigurationError, match="not this federation's signer key"):
        sign_site_request(fed, request, tmp_path / "out", add_site=True)
    assert not (tmp_path / "out").exists()
    signed = roster_from_bytes((fed / "roster.bin").read_bytes())
    with pytest.raises(InvalidMessage):  # (still theirs: never signed with the real key)
        signed.open(real.trust_root)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_init_and_sign_refuse_a_directory_others_can_write(tmp_path: Path, mode: int) -> None:
    """`init` into an existing directory kept its mode: a world-writable one let any local
    user replace the config and the roster. Refused, nothing written; and `sign` refuses a
    federation directory that has become writable by others."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ConfigurationError, match="writable by its group or other users"):
        init_federation(shared, 3)
    assert list(shared.iterdir()) == []
    fed = tmp_path / "fed"
    init_federation(fed, 3)
    fed.chmod(mode)
    request = make_site_request(tmp_path / "site-4", 4, trust_root=ANY_ROOT)
    with pytest.raises(ConfigurationError, match="writable by its group or other users"):
        sign_site_request(fed, request, tmp_path / "out", add_site=True)
    fed.chmod(0o755)
    sign_site_request(fed, request, tmp_path / "out", add_site=True)


def test_remove_site_re_signs_the_roster_without_it(tmp_path: Path) -> None:
    """A site that ended a job (its shares did not reconstruct: the aggregator's log names
    it) is taken off the roster: a new version signed by the trust root, without it, in the
    federation's and the aggregator's directories; the aggregator started with it refuses
    the site (it is who the roster names). A CKKS key holder, an unknown site, or a roster
    that would fall below three sites are refused, and nothing is re-signed."""
    from secagg.cli import main
    from secagg.federation.kit import remove_site

    fed = tmp_path / "fed"
    init_federation(fed, 4, protocol="ckks", key_holders=(1,))
    with pytest.raises(ConfigurationError, match="key holder"):
        remove_site(fed, 1)
    with pytest.raises(ConfigurationError, match="not on the roster"):
        remove_site(fed, 9)
    assert _roster_version(fed) == 1
    assert main(["federation", "remove-site", "--dir", str(fed), "--site", "3"]) == 0
    config = FederationConfig.load(fed / "federation.toml")
    for where in (fed, fed / "aggregator"):
        roster = load_roster(where / "roster.bin", config.trust_root)
        assert sorted(roster) == [1, 2, 4] and roster.version == 2
    with pytest.raises(ConfigurationError, match="at least 3 sites"):
        remove_site(fed, 2)
    assert _roster_version(fed) == 2


@pytest.mark.parametrize("where", ["ca", "trust-root", "aggregator", "ca/ca.key",
                                   "federation.toml"])
def test_sign_refuses_a_federation_whose_keys_or_config_others_can_write(
        tmp_path: Path, where: str) -> None:
    """A 0777 ca/ let anyone swap in their own CA key and certificate: the next site got its
    certificate, and the CA it trusts for the aggregator, from them. Every entry sign and
    remove-site read or write is checked, not only the directory."""
    import os

    from secagg.federation.kit import remove_site

    fed = tmp_path / "fed"
    init_federation(fed, 4)
    path = fed / where
    path.chmod(path.stat().st_mode | 0o022)
    request = make_site_request(tmp_path / "site-5", 5, trust_root=ANY_ROOT)
    with pytest.raises(ConfigurationError, match="writable by its group or other users"):
        sign_site_request(fed, request, tmp_path / "out", add_site=True)
    with pytest.raises(ConfigurationError, match="writable by its group or other users"):
        remove_site(fed, 4)
    assert _roster_version(fed) == 1
    os.chmod(path, path.stat().st_mode & ~0o022)
    sign_site_request(fed, request, tmp_path / "out", add_site=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a directory to another user needs root")
def test_init_and_sign_refuse_a_directory_another_user_owns(tmp_path: Path) -> None:
    """A directory another user made (mode 0755: not writable by others by its mode) is
    still theirs to change: they rewrote federation.toml, and the operator's next sign
    handed a new site a config of their writing. Refused, as is a federation under a
    directory others can write without the sticky bit (they could swap it whole)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ConfigurationError, match="not this user's"):
        init_federation(theirs, 3)
    fed = tmp_path / "fed"
    init_federation(fed, 3)
    os.chown(fed, 65534, 65534)
    request = make_site_request(tmp_path / "site-4", 4, trust_root=ANY_ROOT)
    with pytest.raises(ConfigurationError, match="not this user's"):
        sign_site_request(fed, request, tmp_path / "out", add_site=True)
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    with pytest.raises(ConfigurationError, match="above the federation directory"):
        init_federation(open_parent / "fed", 3)


def test_rosters_left_apart_by_a_cut_short_sign_are_brought_in_line(tmp_path: Path) -> None:
    """remove-site (or sign) writes the federation's roster, then the aggregator's: cut
    short between the two (a full disk, a kill), they disagreed, and a re-run only said the
    site was gone. The next sign or remove-site brings the aggregator's copy in line."""
    from secagg.federation.kit import remove_site

    fed = tmp_path / "fed"
    init_federation(fed, 5)
    old = (fed / "aggregator" / "roster.bin").read_bytes()
    remove_site(fed, 5)
    (fed / "aggregator" / "roster.bin").write_bytes(old)  # the second write never happened
    with pytest.warns(UserWarning, match="brought in line"), \
            pytest.raises(ConfigurationError, match="not on the roster"):
        remove_site(fed, 5)
    assert (fed / "aggregator" / "roster.bin").read_bytes() == (fed / "roster.bin").read_bytes()


def test_a_ca_kept_offline_through_a_symlink_is_taken_and_its_target_checked(
        tmp_path: Path) -> None:
    """init's own advice is to keep ca/ offline: moved away and linked back, it was refused
    (a symlink's own mode is always 777, and chmod cannot change it). The link's target and
    the directories above it are checked instead: taken when they are the operator's own,
    refused when the target is writable by others."""
    from secagg.federation.kit import remove_site

    fed = tmp_path / "fed"
    init_federation(fed, 5)
    offline = tmp_path / "offline"
    offline.mkdir(mode=0o700)
    (fed / "ca").rename(offline / "ca")
    (fed / "ca").symlink_to(offline / "ca")
    remove_site(fed, 5)
    (offline / "ca").chmod(0o777)
    with pytest.raises(ConfigurationError, match="writable by its group or other users"):
        remove_site(fed, 4)


def test_a_site_directory_reached_through_links_others_can_change_is_refused(
        tmp_path: Path) -> None:
    """Only the parents of the resolved path were checked: a site directory reached as
    shared/link/site-1, the link in a 0777 directory anyone could repoint, was taken, and so
    was a roster reached through a link another user owns. Every directory passed through
    and every link met on the way is checked now; links of one's own are taken."""
    import os
    import shutil

    from secagg.federation.kit import SiteKit

    fed = tmp_path / "fed"
    init_federation(fed, 3)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    shutil.copytree(fed / "sites" / "site-1", real / "site-1")
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    (own / "link").symlink_to(real)
    SiteKit.load(own / "link" / "site-1")  # links of one's own, in one's own directories
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "link").symlink_to(real)
    with pytest.raises(ConfigurationError, match=r"shared.*writable by its group or other"):
        SiteKit.load(shared / "link" / "site-1")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    (real / "site-1" / "roster.bin").rename(real / "roster.bin")
    (theirs / "roster.bin").symlink_to(real / "roster.bin")
    os.chown(theirs / "roster.bin", 65534, 65534, follow_symlinks=False)
    (real / "site-1" / "roster.bin").symlink_to(theirs / "roster.bin")
    with pytest.raises(ConfigurationError, match="symbolic link another user owns"):
        SiteKit.load(real / "site-1")


def test_a_relative_link_is_followed_from_its_own_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link's relative target is looked up from the link's directory, as the kernel does:
    followed from the working directory instead, the check walked other directories, and a
    site directory reached through own/link -> ../shared/real, with shared/ writable by
    anyone, was taken."""
    import shutil

    from secagg.federation.kit import SiteKit

    fed = tmp_path / "fed"
    init_federation(fed, 3)
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copytree(fed / "sites" / "site-1", shared / "real" / "site-1")
    (shared / "real").chmod(0o700)
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    (own / "link").symlink_to(Path("..") / "shared" / "real")
    monkeypatch.chdir("/")
    SiteKit.load(own / "link" / "site-1")  # shared/ still the operator's own, 0755
    shared.chmod(0o777)
    with pytest.raises(ConfigurationError, match=r"shared.*writable by its group or other"):
        SiteKit.load(own / "link" / "site-1")


@pytest.mark.parametrize(("content", "reason"), [
    (b"\x93NUMPY\x01\x00binary", "it is not JSON text"),
    (b'{"site": "x"}', "it has no 'site_id' field"),
    (b"[]", "TypeError"),
    (None, "No such file or directory"),
])
def test_a_request_that_is_not_one_says_why(tmp_path: Path, content: bytes | None,
                                            reason: str) -> None:
    """`federation sign --request init.npz` said "cannot read the site request init.npz:
    UnicodeDecodeError"; a missing field, "KeyError"."""
    from secagg.federation.kit import sign_request

    fed = tmp_path / "fed"
    init_federation(fed, 3)
    request = tmp_path / "request.json"
    if content is not None:
        request.write_bytes(content)
    with pytest.raises(ConfigurationError, match=re.escape(f"{request}: {reason}")) as e:
        sign_request(fed, request, tmp_path / "out")
    assert "secagg federation csr" in str(e.value)


def test_a_request_that_is_a_fifo_is_refused_not_waited_for(tmp_path: Path) -> None:
    """`federation sign --request FIFO` waited for a writer for ever."""
    import threading

    from secagg.federation.kit import sign_request

    fed = tmp_path / "fed"
    init_federation(fed, 3)
    request = tmp_path / "request.json"
    os.mkfifo(request)
    raised: list[BaseException] = []

    def sign() -> None:
        try:
            sign_request(fed, request, tmp_path / "out")
        except BaseException as e:  # (asserted below)
            raised.append(e)

    thread = threading.Thread(target=sign, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        with open(request, "wb"):  # (release the waiting read)
            pass
        thread.join(timeout=20)
        pytest.fail("sign_request waited on a FIFO for a writer")
    assert len(raised) == 1 and isinstance(raised[0], ConfigurationError)
    assert f"{request}: not a regular file" in str(raised[0])


def test_the_ca_refuses_a_request_naming_another_site_beside_its_own() -> None:
    """A request naming sites 3 and 4 is not a request for site 3: the CA signs a request
    that names the site it is signed for, and nothing else."""
    key = pki.new_key()
    ca_key, ca_cert = pki.make_ca("t")
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site")]))
           .add_extension(x509.SubjectAlternativeName(
               [x509.UniformResourceIdentifier(f"{pki.SITE_URI_PREFIX}3"),
                x509.UniformResourceIdentifier(f"{pki.SITE_URI_PREFIX}4")]), critical=False)
           .sign(key, hashes.SHA256()))
    for site_id in (3, 4):
        with pytest.raises(ConfigurationError, match=f"does not name site {site_id} alone"):
            pki.sign_csr(ca_key, ca_cert, csr, site_id)


def test_a_trust_root_key_that_is_no_ed25519_key_is_refused(fed: Path) -> None:
    """trust-root/signer.key replaced by another kind of key (a TLS key copied over it):
    refused by name, not a traceback from deep in the signer."""
    from secagg.federation.kit import remove_site

    (fed / "trust-root" / "signer.key").unlink()
    pki.write_private(fed / "trust-root" / "signer.key", pki.pem_private(pki.new_key()))
    with pytest.raises(ConfigurationError, match="trust root key is not an Ed25519 key"):
        remove_site(fed, 4)
    assert _roster_version(fed) == 1


def test_a_request_proof_made_for_another_site_id_is_refused(fed: Path, tmp_path: Path) -> None:
    """The identity key's proof binds the site id: one made for site 6 over the same CSR
    does not vouch for a request for site 5."""
    import json

    from secagg.federation.kit import _request_message

    identity = ed25519.Ed25519PrivateKey.generate()
    csr = _csr(f"{pki.SITE_URI_PREFIX}5", pki.new_key())
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    path = tmp_path / "request.json"
    path.write_text(json.dumps({
        "site_id": 5, "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "identity_public_key": identity.public_key().public_bytes_raw().hex(),
        "identity_signature": identity.sign(_request_message(6, csr_der)).hex()}))
    with pytest.raises(ConfigurationError, match="is not signed by the identity key it names"):
        sign_site_request(fed, path, tmp_path / "out", add_site=True)
    assert not (tmp_path / "out").exists() and _roster_version(fed) == 1


def test_a_request_proof_without_its_label_is_refused(fed: Path, tmp_path: Path) -> None:
    """The proof is over the request's labelled message: the identity key's signature over
    the same site id and CSR digest without the label (made for some other purpose) is no
    proof."""
    import hashlib
    import json

    identity = ed25519.Ed25519PrivateKey.generate()
    csr = _csr(f"{pki.SITE_URI_PREFIX}5", pki.new_key())
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    bare = (5).to_bytes(8, "big") + hashlib.sha256(csr_der).digest()
    path = tmp_path / "request.json"
    path.write_text(json.dumps({
        "site_id": 5, "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "identity_public_key": identity.public_key().public_bytes_raw().hex(),
        "identity_signature": identity.sign(bare).hex()}))
    with pytest.raises(ConfigurationError, match="is not signed by the identity key it names"):
        sign_site_request(fed, path, tmp_path / "out", add_site=True)
    assert not (tmp_path / "out").exists() and _roster_version(fed) == 1
