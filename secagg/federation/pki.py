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

import contextlib
import datetime as dt
import ipaddress
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secagg.errors import ConfigurationError
from secagg.hazmat.secret import SecretBytes, reveal

SITE_URI_PREFIX = "urn:secagg:site:"
AGGREGATOR_URI = "urn:secagg:aggregator"
DEFAULT_DAYS = 365
TLS_CURVES = frozenset({"secp256r1", "secp384r1"})  # what the CA signs: gRPC's TLS takes both


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
    # never past the CA's own end: a certificate outliving its CA fails every handshake
    # defence: pki.certificate-within-the-ca
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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
        labels = name.split(".")
        # (a "*" was taken in any label: "ex*ample" and "f*.example.com" went into the
        # certificate, partial wildcards that verifiers match in their own ways; a wildcard
        # is a whole first label over at least two more. An all-digit last label is no DNS
        # name but a mistyped address: 256.1.1.1 was certified as a name)
        # defence: pki.host-wildcards-whole-first-label
        wildcard = labels[0] == "*" and len(labels) >= 3
        if not (0 < len(name) <= 253 and name.isascii() and all(
                # defence: pki.host-labels-as-dns-allows
                0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
                and all(c.isalnum() or c in "-_" for c in label)
                for label in labels[1 if wildcard else 0:])
                and not labels[-1].isdigit()):
            raise ConfigurationError(f"--host {host!r} is not an IP address or a DNS name "
                                     "(ASCII letters, digits, '-', '_', '.', a leading '*.'; "
                                     "IDNA A-labels for others)")


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
    # P-256 or P-384 only: the CA signed P-192 (96-bit security) and secp256k1, brainpool
    # and P-521 keys, whose certificates gRPC's TLS then refused at every handshake
    # defence: pki.csr-curve
    if public_key.curve.name not in TLS_CURVES:
        raise ConfigurationError(f"the certificate request's key is on {public_key.curve.name}"
                                 f": use one of {', '.join(sorted(TLS_CURVES))}")
    # defence: pki.ca-in-date, pki.ca-already-valid
    if not ca_cert.not_valid_before_utc <= _now() + dt.timedelta(hours=1):
        raise ConfigurationError(f"the federation's CA is not valid before "
                                 f"{ca_cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if ca_cert.not_valid_after_utc < _now():
        raise ConfigurationError(f"the federation's CA expired on "
                                 f"{ca_cert.not_valid_after_utc:%Y-%m-%d}: make a new CA "
                                 "(a new ca.crt everywhere) before signing")
    return issue_site_cert(ca_key, ca_cert, site_id, public_key)


def site_ids_of(item: x509.Certificate | x509.CertificateSigningRequest) -> list[int]:
    """The site ids named by SAN URIs ``urn:secagg:site:<id>``."""
    try:
        san = item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        # (a certificate or request carrying the SAN extension twice, or one that does not
        # parse: it names no site, rather than raising out of the caller)
        # defence: pki.unreadable-extensions-name-no-site
        return [-1]
    out = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(SITE_URI_PREFIX):
            tail = uri[len(SITE_URI_PREFIX):]
            # ASCII digits only, at most 19 (site ids are below 2**63): a 5,000-digit id
            # made int() raise (Python's 4,300-digit limit) inside the aggregator's call
            # defence: pki.site-id-canonical, pki.site-id-malformed-counted
            if (tail.isascii() and tail.isdigit() and not tail.startswith("0")
                    and len(tail) <= 19 and int(tail) < 2**63):
                out.append(int(tail))
            else:
                out.append(-1)  # malformed: never matches a site
    return out


def trust_anchors(ca_pem: bytes) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a ``ca.crt`` bundle (anything else in it anchors nothing)."""
    return tuple(ca for ca in x509.load_pem_x509_certificates(ca_pem)
                 if _path_length(ca) != -1)


def _path_length(ca: x509.Certificate) -> int | None:
    """A CA's path length constraint (None: none; -1: not a CA)."""
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    # defence: pki.no-basic-constraints-no-ca
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return -1
    return constraints.path_length if constraints.ca else -1


def site_id_from_pem(pem: bytes, anchors: Sequence[x509.Certificate] = (),
                     chain_pem: bytes = b"") -> int | None:
    """The one site id a client certificate names, or None; with ``anchors`` (the CAs of
    ``ca.crt``: trust_anchors), None unless it chains through the intermediates the client
    presented (``chain_pem``) to one of them within that CA's path length. TLS stacks do
    not all enforce a trust anchor's path length: BoringSSL, under gRPC, took a site
    certificate from an intermediate CA that the federation's CA (path length 0) had
    signed."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        presented = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
    except ValueError:
        return None
    intermediates = [c for c in presented if c != cert]
    # defence: pki.site-certificate-issued-by-the-ca-itself
    if anchors and not _chains(cert, intermediates, anchors):
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


def write_private(path: Path, data: bytes | SecretBytes) -> None:
    """Write a secret file with mode 0600, refusing to overwrite one."""
    # defence: pki.private-directories-0700
    make_dirs(path.parent, 0o700)
    # defence: pki.private-never-overwritten, pki.private-created-0600
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, reveal(data))
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def make_dirs(d: Path, mode: int) -> None:
    """Make ``d`` and its missing parents: ``d`` with ``mode``, the parents 0755, at most
    (the umask can only take more away): under umask 000 they were made 0777, and anyone
    could swap a directory of keys for their own. Directories that exist are left as they
    are."""
    missing = []
    p = d
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for n, new in enumerate(reversed(missing)):
        last = n == len(missing) - 1
        # defence: pki.new-directories-modes-set
        with contextlib.suppress(FileExistsError):  # (made meanwhile by another process)
            new.mkdir(mode=mode if last else 0o755)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (mode 0644) whole: through a new file renamed over ``path``,
    so a reader never sees half of it and a symlink at ``path`` is replaced, not followed
    (``csr`` wrote its request through a link planted in its directory)."""
    make_dirs(path.parent, 0o755)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # (os.fchmod is POSIX-only before Python 3.13)
        # defence: pki.public-files-replace-links
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_private_key(path: Path) -> SecretBytes:
    """A private key file's bytes; refused if others than its owner may read or write it
    (as ssh refuses such a key; it was a warning, and a key at 0666 was used and served).
    Checked on the opened file before a byte is read, and held as :class:`SecretBytes`: the
    refusal's traceback showed the key in its frame's locals."""
    # (a FIFO put there hung every start at open(), a link to /dev/zero read for ever)
    # defence: federation.key-file-regular
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    st = os.fstat(fd)
    # (checked before fdopen: a directory there was "cannot use 3: Is a directory")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigurationError(f"{path} is not a regular file (a private key file is)")
    with os.fdopen(fd, "rb") as f:
        _check_key_mode(path, st)
        # (a larger one was cut short, and then "not a PEM key")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigurationError(f"{path} is {st.st_size:,} bytes, larger than any private "
                                     "key file")
        # defence: federation.key-bytes-held-secret
        return SecretBytes(f.read(MAX_KEY_FILE_BYTES))


def _check_key_mode(path: Path, st: os.stat_result) -> None:
    euid = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    # this user's key: 0600 at most; root's, read through the service's group: 0640 at most
    # (PostgreSQL's rule for its TLS key); another user's: refused (theirs to change)
    # defence: federation.key-permissions-refused
    if st.st_uid not in (euid, 0) or st.st_mode & (0o077 if st.st_uid == euid else 0o037):
        raise ConfigurationError(
            f"{path} can be read or written by others than its owner, or is another user's "
            f"(mode {st.st_mode & 0o777:o}, owner uid {st.st_uid}): chmod 600 it (a key root "
            "owns may be 0640, for the service's group)")


MAX_KEY_FILE_BYTES = 1 << 20  # (a PEM key is a few hundred bytes)


def load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    # (the CA's key: held to the rule every other key is, 0600; 0644 was used to sign)
    # defence: pki.ca-key-permissions
    key = serialization.load_pem_private_key(read_private_key(path).reveal(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{path} is not an EC private key")
    return key


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def is_server_certificate(cert_pem: bytes) -> bool:
    """Whether the first certificate of ``cert_pem`` may serve TLS: no extended key usage,
    or one that names serverAuth."""
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.SERVER_AUTH in usage


def check_tls_files(key_pem: bytes | SecretBytes, cert_pem: bytes, ca_pem: bytes, where: Path, *,
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
        key = serialization.load_pem_private_key(reveal(key_pem), password=None)
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
    # a CA past its end makes every handshake fail with nothing but "unavailable": said here
    # defence: pki.ca-bundle-in-date
    if all(ca.not_valid_after_utc < now for ca in cas):
        raise ConfigurationError(f"the CA certificate in {where / 'ca.crt'} expired on "
                                 f"{max(ca.not_valid_after_utc for ca in cas):%Y-%m-%d}: the "
                                 "federation needs a new CA")
    # (a chain counts only to a CA in date: an expired one beside its successor, during a
    # rotation, anchors nothing)
    # defence: pki.only-cas-in-date-anchor
    cas = [ca for ca in cas
           if ca.not_valid_before_utc <= now + dt.timedelta(hours=1) <= ca.not_valid_after_utc
           + dt.timedelta(hours=1)]
    if not cas:
        raise ConfigurationError(f"no CA certificate in {where / 'ca.crt'} is valid now")
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


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chains(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
            cas: Sequence[x509.Certificate]) -> bool:
    """Whether ``leaf`` chains through ``intermediates`` (each a CA) to one of ``cas`` whose
    path length allows that many intermediates below it (gRPC's TLS does not check a trust
    anchor's path length: a CA of path length 0, as `federation init` makes, was taken with
    an intermediate under it)."""
    current, depth = leaf, 0
    for _ in range(len(intermediates) + 1):
        for ca in cas:
            limit = _path_length(ca)
            # defence: pki.ca-path-length-enforced
            if _issued_by(current, ca) and (limit is None or depth <= limit):
                return True
        for parent in intermediates:
            # defence: pki.intermediates-are-cas
            if _path_length(parent) == -1 or not _issued_by(current, parent):
                continue
            current, depth = parent, depth + 1
            break
        else:
            return False
    return False
    return False
