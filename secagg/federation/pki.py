"""The federation's TLS material, made with ``cryptography``'s x509 builder.

- one CA (ECDSA P-256) signs every certificate;
- the aggregator's server certificate names ``localhost``, ``127.0.0.1`` and any given hosts;
- a site's client certificate carries its site id as the SAN URI ``urn:secagg:site:<id>``
  (the aggregator takes the id from there, never from a request field);
- a site can make its own key and a certificate signing request (:func:`make_csr`) so that its
  private key never leaves it; the CA signs the request (:func:`sign_csr`), as NVIDIA FLARE's
  ``cert request`` does.

Private keys are written with mode 0600 (:func:`write_private`), created exclusively.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secagg.errors import ConfigurationError

SITE_URI_PREFIX = "urn:secagg:site:"
AGGREGATOR_URI = "urn:secagg:aggregator"
DEFAULT_DAYS = 365


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def site_uri(site_id: int) -> str:
    return f"{SITE_URI_PREFIX}{site_id}"


def make_ca(name: str, *, days: int = DEFAULT_DAYS * 5) -> tuple[ec.EllipticCurvePrivateKey,
                                                                 x509.Certificate]:
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"secagg CA {name}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
           public_key: ec.EllipticCurvePublicKey, common_name: str,
           sans: Sequence[x509.GeneralName], usage: x509.ObjectIdentifier, *,
           days: int = DEFAULT_DAYS, not_before: dt.datetime | None = None) -> x509.Certificate:
    start = not_before or (_now() - dt.timedelta(minutes=5))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def check_hosts(hosts: Sequence[str]) -> None:
    """Host names and addresses the aggregator's certificate may name: IP addresses, or DNS
    names in ASCII (an internationalised name in its A-label form) with no spaces or control
    characters; underscores (docker-compose service names), a leading ``*.`` and a trailing
    dot are kept as they are."""
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        name = host[:-1] if host.endswith(".") else host
        if not (0 < len(name) <= 253 and name.isascii() and all(
                label and all(c.isalnum() or c in "-_*" for c in label)
                for label in name.split("."))):
            raise ConfigurationError(f"--host {host!r} is not an IP address or a DNS name "
                                     "(ASCII letters, digits, '-', '_', '.'; IDNA A-labels "
                                     "for others)")


def issue_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                      hosts: Sequence[str] = ()) -> tuple[ec.EllipticCurvePrivateKey,
                                                          x509.Certificate]:
    key = new_key()
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.UniformResourceIdentifier(AGGREGATOR_URI)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = _issue(ca_key, ca_cert, key.public_key(), "secagg aggregator", names,
                  ExtendedKeyUsageOID.SERVER_AUTH)
    return key, cert


def issue_site_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                    site_id: int, public_key: ec.EllipticCurvePublicKey, *,
                    days: int = DEFAULT_DAYS, not_before: dt.datetime | None = None
                    ) -> x509.Certificate:
    return _issue(ca_key, ca_cert, public_key, f"secagg site {site_id}",
                  [x509.UniformResourceIdentifier(site_uri(site_id))],
                  ExtendedKeyUsageOID.CLIENT_AUTH, days=days, not_before=not_before)


def make_csr(site_id: int, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """A request for a site certificate; the private key stays with the site."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    f"secagg site {site_id}")]))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(site_uri(site_id))]), critical=False)
        .sign(key, hashes.SHA256())
    )


def sign_csr(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
             csr: x509.CertificateSigningRequest, site_id: int) -> x509.Certificate:
    """Sign a site's request, after checking its signature and that it names ``site_id``
    (and nothing else): the CA never signs an identity it was not asked to vouch for."""
    # defence: pki.csr-signature-valid
    if not csr.is_signature_valid:
        raise ConfigurationError("the certificate request's signature is invalid")
    if site_ids_of(csr) != [site_id]:
        raise ConfigurationError(f"the certificate request does not name site {site_id} alone")
    public_key = csr.public_key()
    # defence: pki.csr-ec-key
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ConfigurationError("the certificate request's key must be an EC key")
    return issue_site_cert(ca_key, ca_cert, site_id, public_key)


def site_ids_of(item: x509.Certificate | x509.CertificateSigningRequest) -> list[int]:
    """The site ids named by SAN URIs ``urn:secagg:site:<id>``."""
    try:
        san = item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(SITE_URI_PREFIX):
            tail = uri[len(SITE_URI_PREFIX):]
            # defence: pki.site-id-canonical, pki.site-id-malformed-counted
            if tail.isdigit() and not tail.startswith("0"):
                out.append(int(tail))
            else:
                out.append(-1)  # malformed: never matches a site
    return out


def site_id_from_pem(pem: bytes) -> int | None:
    """The one site id a client certificate names, or None."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    ids = site_ids_of(cert)
    # defence: pki.site-id-alone
    return ids[0] if len(ids) == 1 and ids[0] > 0 else None


# ---- files ---------------------------------------------------------------------------------


def pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file with mode 0600, refusing to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # defence: pki.private-never-overwritten
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{path} is not an EC private key")
    return key


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def check_tls_files(key_pem: bytes, cert_pem: bytes, ca_pem: bytes, where: Path, *,
                    chain_to_ca: bool) -> None:
    """That a party's TLS files parse, that the key is its certificate's (the first in the
    file; intermediates may follow) and the certificate is not expired or far in the future;
    with ``chain_to_ca``, that it chains through those intermediates to a certificate in
    ``ca.crt`` (a bundle, during a CA rotation). ConfigurationError naming the file
    otherwise. (gRPC reports all of these only as a failed handshake: a site was told, after
    minutes of retries, that the aggregator was unavailable; the aggregator, that it could
    not bind.) The aggregator's own certificate is not chained to ``ca.crt``: that is the CA
    of the sites' certificates, which need not be the server certificate's."""
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise ConfigurationError(f"{where / 'ca.crt'} is not a PEM certificate") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigurationError(f"the certificate in {where} is not a PEM certificate"
                                 ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(f"the private key in {where} is not an unencrypted PEM key"
                                 ) from None
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    # defence: federation.tls-files-checked
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise ConfigurationError(f"the private key in {where} is not the key of its "
                                 "certificate")
    now = _now()
    # defence: pki.certificate-not-expired, pki.certificate-already-valid
    if leaf.not_valid_after_utc < now:
        raise ConfigurationError(f"the certificate in {where} expired on "
                                 f"{leaf.not_valid_after_utc:%Y-%m-%d}")
    if leaf.not_valid_before_utc > now + dt.timedelta(hours=1):  # (clock skew allowed)
        raise ConfigurationError(f"the certificate in {where} is not valid before "
                                 f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if chain_to_ca and not _chains(leaf, chain[1:], cas):
        raise ConfigurationError(f"the certificate in {where} was not issued by a CA in its "
                                 "ca.crt (another federation's?)")


def _chains(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
            cas: Sequence[x509.Certificate]) -> bool:
    current = leaf
    for _ in range(len(intermediates) + 1):
        for ca in cas:
            try:
                current.verify_directly_issued_by(ca)
                return True
            except (ValueError, TypeError, InvalidSignature):
                pass
        for parent in intermediates:
            try:
                current.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                continue
            current = parent
            break
        else:
            return False
    return False
