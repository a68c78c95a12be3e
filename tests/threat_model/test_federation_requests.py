"""Adversary: whoever hands the operator a file to process (a certificate request, a site
directory, a certificate from the operator's own CA) or runs the federation commands in the
wrong place. Each is refused with a clear error and nothing is issued, overwritten or
re-signed: no certificate for a request that does not prove its keys, no site's identity
handed to a new key, no certificate naming a site ambiguously, no key file overwritten."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from secagg.errors import ConfigurationError
from secagg.federation import pki
from secagg.federation.config import FederationConfig
from secagg.federation.kit import (
    SiteKit,
    init_federation,
    load_roster,
    make_site_request,
    sign_site_request,
)


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
    request = make_site_request(tmp_path / "not-site-1", 1)
    with pytest.raises(ConfigurationError, match="already on the roster with another key"):
        sign_site_request(fed, request, tmp_path / "out")
    assert not (tmp_path / "out" / "client.crt").exists()
    assert _roster_version(fed) == 1


def test_signed_files_never_go_into_a_directory_that_holds_files(
        fed: Path, tmp_path: Path) -> None:
    """`federation sign --out` pointed at a live site's directory would replace its
    certificate, config and roster: refused, the directory untouched."""
    request = make_site_request(tmp_path / "site-5", 5)
    live = tmp_path / "live"
    shutil.copytree(fed / "sites" / "site-2", live)
    before = {p.name: p.read_bytes() for p in live.iterdir()}
    with pytest.raises(ConfigurationError, match="not an empty directory"):
        sign_site_request(fed, request, live)
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
