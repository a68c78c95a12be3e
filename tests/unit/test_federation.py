"""Federation set-up: what init writes, where each private key lives, the certificates'
names, and a site that makes its own keys (csr/sign)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509

from secagg.errors import ConfigurationError, InvalidMessage
from secagg.federation import pki
from secagg.federation.config import FederationConfig
from secagg.federation.kit import (
    SiteKit,
    init_federation,
    load_roster,
    make_site_request,
    roster_from_bytes,
    roster_to_bytes,
    sign_site_request,
)

# a federation's trust root, for a request whose site directory is never loaded here
ANY_ROOT = bytes(range(32))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fed") / "trial"
    model = d.parent / "m.npz"
    np.savez(model, w=np.zeros(3))  # type: ignore[arg-type]
    init_federation(d, 4, protocol="ckks", key_holders=(1, 2), hosts=["agg.example.org",
                                                                       "10.0.0.7"],
                    initial_model=model)
    return d


def test_private_keys_are_0600_and_each_lives_in_one_directory(federation: Path) -> None:
    keys = [p for p in federation.rglob("*.key")]
    assert len(keys) == 2 + 1 + 2 * 4  # CA, signer; server; per site TLS + identity
    contents = [p.read_bytes() for p in keys]
    assert len(set(contents)) == len(contents)
    for p in keys:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for site in range(1, 5):
        names = {p.name for p in (federation / "sites" / f"site-{site}").iterdir()}
        assert names == {"client.crt", "client.key", "identity.key", "ca.crt",
                         "federation.toml", "roster.bin", "trust-root.pin", "settings.sig"}


def test_certificates_name_the_right_hosts_and_sites(federation: Path) -> None:
    server = pki.load_cert(federation / "aggregator" / "server.crt")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n.value) for n in san}
    assert {"localhost", "127.0.0.1", "agg.example.org", "10.0.0.7"} <= names
    for site in range(1, 5):
        kit = SiteKit.load(federation / "sites" / f"site-{site}")
        assert kit.site_id == site and kit.roster[site] == kit.identity.public_bytes
        assert kit.config.protocol == "ckks" and kit.config.key_holders == (1, 2)


def test_roster_is_signed_by_the_trust_root_and_tampering_is_refused(federation: Path) -> None:
    config = FederationConfig.load(federation / "federation.toml")
    roster = load_roster(federation / "roster.bin", config.trust_root)
    assert sorted(roster) == [1, 2, 3, 4]
    signed = roster_from_bytes((federation / "roster.bin").read_bytes())
    with pytest.raises(InvalidMessage):
        signed.open(bytes(32))
    from secagg.roster import Roster, SignedRoster

    swapped = SignedRoster(Roster(dict(roster), bytes(32)), signed.signature)
    tampered = federation.parent / "tampered.bin"
    tampered.write_bytes(roster_to_bytes(swapped))
    with pytest.raises(ConfigurationError, match="not signed"):
        load_roster(tampered, config.trust_root)


def test_init_refuses_a_non_empty_directory_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(ConfigurationError, match="not empty"):
        init_federation(tmp_path, 3)
    with pytest.raises(ConfigurationError, match="sites"):
        init_federation(tmp_path / "a", 2)
    with pytest.raises(ConfigurationError, match="key-holders"):
        init_federation(tmp_path / "b", 3, key_holders=(7,))


def test_a_site_makes_its_own_keys_and_only_its_request_travels(federation: Path,
                                                                tmp_path: Path) -> None:
    site_dir = tmp_path / "hospital-5"
    root = FederationConfig.load(federation / "federation.toml").trust_root
    request = make_site_request(site_dir, 5, trust_root=root.hex())  # (told out of band)
    text = request.read_text()
    assert "PRIVATE" not in text
    out = tmp_path / "signed"
    with pytest.raises(ConfigurationError, match="adds site 5 to the roster"):
        sign_site_request(federation, request, out)  # a new seat is the operator's decision
    assert not out.exists()
    sign_site_request(federation, request, out, add_site=True)
    assert {p.name for p in out.iterdir()} == {"client.crt", "ca.crt", "roster.bin",
                                               "federation.toml", "settings.sig"}
    for name in ("client.crt", "ca.crt", "roster.bin", "federation.toml", "settings.sig"):
        (site_dir / name).write_bytes((out / name).read_bytes())
    kit = SiteKit.load(site_dir)
    assert kit.site_id == 5
    config = FederationConfig.load(federation / "federation.toml")
    roster = load_roster(federation / "roster.bin", config.trust_root)
    assert roster.version == 2 and sorted(roster) == [1, 2, 3, 4, 5]
    assert load_roster(federation / "aggregator" / "roster.bin", config.trust_root) == roster


def test_the_ca_signs_only_the_site_a_request_names(tmp_path: Path) -> None:
    ca_key, ca_cert = pki.make_ca("t")
    key = pki.new_key()
    csr = pki.make_csr(3, key)
    with pytest.raises(ConfigurationError, match="site 4"):
        pki.sign_csr(ca_key, ca_cert, csr, 4)
    cert = pki.sign_csr(ca_key, ca_cert, csr, 3)
    assert pki.site_id_from_pem(pki.pem_cert(cert)) == 3


@pytest.mark.parametrize(("section", "key", "value", "match"), [
    ("federation", "protocol", "'paillier'", "protocol"),
    ("masking", "neighbors", "3.5", "neighbors"),
    ("limits", "max_message_bytes", "1000000000", "max_message_bytes"),
    ("limits", "upload_slots", "0", "upload_slots"),
    ("limits", "upload_slots", "'8'", "upload_slots"),
    ("update", "clip_norm", "-1", "clip_norm"),
    ("job", "rounds", "true", "rounds"),
    # a misspelt key would silently keep its default (clip_norm 1.0): refused, named
    ("update", "clip_nrom", "0.01", "unknown key.*clip_nrom"),
    ("limits", "stream_idle_seconds", "nan", "finite"),
    ("deadlines", "stage", "inf", "finite"),
    ("ckks", "preset", "'no-such-preset'", "preset"),
    ("ckks", "min_sites", "-5", "min_sites"),
    # finite but past any real use: a slip, named at load (not a job that never ends a
    # stage, nor every site refused at its first submit)
    ("deadlines", "stage", "1e300", r"\[deadlines\] stage must be in"),
    ("deadlines", "open", "3e6", r"\[deadlines\] open must be in"),
    ("limits", "stream_idle_seconds", "1e9", "stream_idle_seconds must be in"),
    ("update", "max_samples", "1e300", "max_samples must be in"),
    ("job", "server_learning_rate", "1e40", "server_learning_rate must be in"),
    # and below: every stage closed at once; the quantiser had no resolution left
    ("deadlines", "stage", "1e-320", r"\[deadlines\] stage must be in \[1,"),
    ("limits", "stream_idle_seconds", "0.001", "stream_idle_seconds must be in"),
    ("job", "server_learning_rate", "1e-320", "server_learning_rate must be in"),
    ("update", "clip_norm", "1e308", "clip_norm must be in"),
    ("update", "clip_norm", "1e-9", "clip_norm must be in"),
    ("job", "rounds", "10000000", "rounds must be in"),
    ("limits", "max_vector_length", "1000000000000", "max_vector_length must be in"),
    ("limits", "max_sites", "1000000000", "max_sites must be in"),
    ("limits", "max_sites", "2", "max_sites must be in"),
    # a chunk size of 0 bytes cannot cut a payload; of 1, a chunk a byte
    ("limits", "max_chunk_bytes", "0", "max_chunk_bytes must be in"),
    ("limits", "max_chunk_bytes", "1", "max_chunk_bytes must be in"),
    # below the SDK's 1 MiB chunk, every honest upload would be refused
    ("limits", "max_chunk_bytes", "1048575", "max_chunk_bytes must be in"),
    # a job id is part of every round id and the history's key: no '/', never empty
    ("job", "id", "''", "id must be 1-64"),
    ("job", "id", "'a/b'", "id must be 1-64"),
    ("job", "id", "'" + "x" * 65 + "'", "id must be 1-64"),
    # the name starts every round id: '/' read as another federation's, a line break forged
    # log lines naming a round
    ("federation", "name", "'a/../b'", "name must be up to 64"),
    ("federation", "name", "'na\u00efve'", "name must be up to 64"),
    ("federation", "name", '"x\\ny"', "name must be up to 64"),
    ("job", "initial_model", "3", "initial_model must be a path"),
    ("federation", "trust_root", "'abcd'", "trust_root must be a 32-byte"),
    ("federation", "aggregator", "'http://localhost:50761'", "aggregator must be host:port"),
    ("ckks", "key_holders", "[1, 1]", "key_holders must be a non-empty list of distinct"),
    ("federation", "aggregator", "'*.example.org:50051'", "aggregator must be host:port"),
    ("federation", "aggregator", "'::1:50051'", "aggregator must be host:port"),
    # gRPC checks the certificate against a list whole: no site could connect
    ("federation", "aggregator", "'ipv4:127.0.0.1:5,127.0.0.2:5'", "aggregator must be"),
    ("federation", "aggregator", "'ipv4:localhost:5'", "aggregator must be host:port"),
    ("federation", "aggregator", "'ipv6:127.0.0.1:5'", "aggregator must be host:port"),
    ("federation", "aggregator", "'dns:///localhost:99999'", "aggregator must be host:port"),
    ("federation", "aggregator", "'local host:50761'", "aggregator must be host:port"),
    ("federation", "aggregator", "'localhost:\u0665\u0660\u0667\u0666\u0661'",
     "aggregator must be host:port"),
    ("job", "initial_model_digest", "'abcd'", "initial_model_digest must be 64 hex"),
    ("ckks", "key_holders", "[0]", "key_holders must be a non-empty list"),
    ("ckks", "key_holders", "[true]", "key_holders must be a non-empty list"),
    ("ckks", "key_holders", "[]", "key_holders must be a non-empty list"),
    ("masking", "corrupt_fraction", "1.0", "corrupt_fraction and dropout_rate"),
    ("masking", "dropout_rate", "-0.1", "corrupt_fraction and dropout_rate"),
    # a message limit below a chunk refused every upload: a stalled job with no cause named
    ("limits", "max_message_bytes", "1000", "max_message_bytes must be in"),
    # each slot invites an upload at once (MBs each): 100000 of them, an aggregator's memory
    ("limits", "upload_slots", "1025", "upload_slots must be in"),
    ("limits", "upload_slots", "0", "upload_slots must be in"),
    ("federation", "trust_root", "'zz'", "trust_root must be hex"),
    ("job", "initial_model_digest", "'zz'", "initial_model_digest must be 64 hex"),
    ("federation", "protocol", "'paillier'", "protocol must be one of"),
    ("ckks", "key_holders", "3", "key_holders must be a non-empty list"),
    ("ckks", "key_holders", "[1.0]", "key_holders must be a non-empty list"),
    # above [limits] max_sites (10000): no roster this federation takes could release a round
    ("ckks", "min_sites", "10001", "min_sites must be a number of sites"),
])
def test_config_errors_name_the_key(federation: Path, tmp_path: Path, section: str, key: str,
                                    value: str, match: str) -> None:
    import tomllib

    import tomli_w

    data = tomllib.loads((federation / "federation.toml").read_text())
    data[section][key] = tomllib.loads(f"v = {value}")["v"]
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(data))
    with pytest.raises(ConfigurationError, match=match):
        FederationConfig.load(path)


def test_upload_slots_are_kept_in_the_config_file(federation: Path, tmp_path: Path) -> None:
    import dataclasses

    config = FederationConfig.load(federation / "federation.toml")
    assert config.limits.upload_slots == 8
    wider = dataclasses.replace(config, limits=dataclasses.replace(config.limits,
                                                                   upload_slots=32))
    path = tmp_path / "wider.toml"
    path.write_text(wider.to_toml(base=tmp_path))
    assert FederationConfig.load(path).limits.upload_slots == 32


def test_an_unknown_table_is_refused(federation: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text((federation / "federation.toml").read_text() + "\n[deadline]\nstage = 5.0\n")
    with pytest.raises(ConfigurationError, match=r"unknown table.*deadline"):
        FederationConfig.load(path)


def _site_copy(federation: Path, tmp_path: Path, site: int = 1) -> Path:
    import shutil

    d = tmp_path / f"site-{site}"
    shutil.copytree(federation / "sites" / f"site-{site}", d)
    return d


def test_a_site_directory_with_broken_tls_files_is_refused_at_load_naming_them(
        federation: Path, tmp_path: Path) -> None:
    """gRPC reports these only as failed handshakes: the SDK retried for minutes and then
    called the aggregator unavailable. Now they are refused when the directory is loaded."""
    from secagg.federation.kit import SiteKit

    d = _site_copy(federation, tmp_path)
    SiteKit.load(d)
    other = federation / "sites" / "site-2"
    (d / "client.key").write_bytes((other / "client.key").read_bytes())
    with pytest.raises(ConfigurationError, match="not the key of its certificate"):
        SiteKit.load(d)
    (d / "client.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(ConfigurationError, match="not an unencrypted PEM key"):
        SiteKit.load(d)
    d = _site_copy(federation, tmp_path / "b")
    _, ca_cert = pki.make_ca("another federation")
    (d / "ca.crt").write_bytes(pki.pem_cert(ca_cert))
    with pytest.raises(ConfigurationError, match="not issued by"):
        SiteKit.load(d)
    (d / "ca.crt").write_bytes(b"not a certificate")
    with pytest.raises(ConfigurationError, match=r"ca\.crt is not a PEM certificate"):
        SiteKit.load(d)


@pytest.mark.parametrize("key", ["client.key", "identity.key"])
def test_a_private_key_others_can_read_is_refused(federation: Path, tmp_path: Path,
                                                  key: str) -> None:
    from secagg.federation.kit import SiteKit

    d = _site_copy(federation, tmp_path)
    (d / key).chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        SiteKit.load(d)
    (d / key).chmod(0o600)
    SiteKit.load(d)


def test_a_key_root_owns_may_be_read_through_the_services_group(
        federation: Path, tmp_path: Path) -> None:
    """A root-owned TLS key at 0640 in the service's group (/etc/ssl/private and ssl-cert;
    PostgreSQL's rule) was refused, with advice the service user could not follow. Taken
    when root owns it; 0644, or another user's key, is still refused."""
    import shutil
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv, to read the key as another user")
    top = Path(tempfile.mkdtemp(prefix="secagg-group-key-"))  # (pytest's own dir is 0700)
    top.chmod(0o755)
    d = _site_copy(federation, top)
    os.chown(d, 65534, 65534)
    for entry in d.iterdir():
        os.chown(entry, 0 if entry.name == "client.key" else 65534, 65534)
    code = ("import sys; from secagg.federation.kit import SiteKit\n"
            "try:\n    SiteKit.load(sys.argv[1]); print('taken')\n"
            "except Exception as e:\n    print('refused', e)\n")

    def load_as_service(mode: int) -> str:
        (d / "client.key").chmod(mode)
        return subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-c", code, str(d)], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parents[2]).stdout

    try:
        assert load_as_service(0o640).startswith("taken")
        assert load_as_service(0o644).startswith("refused")
        os.chown(d / "client.key", 12345, 65534)
        assert load_as_service(0o640).startswith("refused")
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("where", ["directory", "config", "roster", "ca", "server key"])
def test_a_site_or_aggregator_directory_others_can_change_is_refused(
        federation: Path, tmp_path: Path, where: str) -> None:
    """The aggregator served, and a site connected, from a 0777 directory (or with a config,
    roster or CA anyone could rewrite, or a 0666 server key): refused, as sign refuses."""
    import shutil

    from aggregator.service import load_server_files
    from secagg.federation.kit import SiteKit

    site = _site_copy(federation, tmp_path)
    agg = tmp_path / "agg"
    shutil.copytree(federation / "aggregator", agg)
    entry = {"directory": ".", "config": "federation.toml", "roster": "roster.bin",
             "ca": "ca.crt", "server key": "server.key"}[where]
    for d in (site, agg):
        target = d / entry
        if where == "server key" and d is site:
            continue
        mode = target.stat().st_mode & 0o777
        target.chmod(mode | 0o022 | (0o044 if where == "server key" else 0))
        with pytest.raises(ConfigurationError, match=r"other users|others than its owner"):
            if d is site:
                SiteKit.load(d)
            else:
                load_server_files(d / "federation.toml")
        target.chmod(mode)
    SiteKit.load(site)
    load_server_files(agg / "federation.toml")


@pytest.mark.parametrize("address", ["localhost:99999", "localhost:0", "localhost:abc",
                                     ":443", "localhost"])
def test_the_aggregator_address_needs_a_real_port(address: str) -> None:
    """gRPC took port 99999 modulo 65536 and listened on 34463, on every interface."""
    with pytest.raises(ConfigurationError, match="1-65535"):
        FederationConfig.from_dict({"federation": {
            "name": "f", "protocol": "masking", "aggregator": address, "trust_root": "00" * 32}})


def test_a_model_file_that_is_not_an_npz_is_a_clear_error_that_never_suggests_unpickling(
        tmp_path: Path) -> None:
    from secagg.model import FlatModel

    text = tmp_path / "model.npz"
    text.write_text("weights: 1, 2, 3")
    for path, says in ((text, "not a .npz archive"), (tmp_path / "missing.npz", "no such file"),
                       (tmp_path, "a directory")):
        with pytest.raises(ConfigurationError, match=says) as caught:
            FlatModel.load_npz(path)
        assert "pickle" not in str(caught.value)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"hosts": ["bad host"]}, "--host"), ({"hosts": [""]}, "--host"),
    ({"hosts": ["bücher.de"]}, "--host"), ({"name": "n" * 80}, "--name"),
    ({"initial_model": "MISSING"}, "no such file"),
    ({"aggregator": "localhost:99999"}, "1-65535"),
    ({"aggregator": "bad host:50051"}, "names no host"),
    ({"key_holders": (1, 1)}, "names a site twice"),
])
def test_a_failed_init_writes_nothing_and_can_be_run_again(tmp_path: Path, kwargs: dict,  # type: ignore[type-arg]
                                                            says: str) -> None:
    """Every input is checked before the first file is written: a failed init used to leave
    the CA's and the roster signer's private keys behind, and the re-run was refused."""
    if kwargs.get("initial_model") == "MISSING":
        kwargs = {**kwargs, "initial_model": tmp_path / "missing.npz"}
    d = tmp_path / "fed"
    with pytest.raises(ConfigurationError, match=says):
        init_federation(d, 3, **kwargs)
    assert not d.exists() or not any(d.iterdir())
    init_federation(d, 3, hosts=["agg.example.org", "10.0.0.7", "xn--bcher-kva.de",
                                 "secagg_aggregator", "*.example.org", "agg.example.org."])


def test_tls_files_from_an_operators_own_pki_are_accepted(federation: Path, tmp_path: Path) -> None:
    """A leaf followed by its intermediate, with the root (one that allows intermediates)
    in a ca.crt bundle beside an old CA (a rotation): accepted. Under a root of path length
    0 (as `federation init` makes) the same chain is refused, as the aggregator refuses it
    (gRPC's TLS does not)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    root_key, root = _operator_root()
    _, old_root = pki.make_ca("old root")
    inter_key = pki.new_key()
    inter = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inter")]))
             .issuer_name(root.subject).public_key(inter_key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(root_key, hashes.SHA256()))
    leaf_key = pki.new_key()
    leaf = pki.issue_site_cert(inter_key, inter, 1, leaf_key.public_key())
    pki.check_tls_files(pki.pem_private(leaf_key), pki.pem_cert(leaf) + pki.pem_cert(inter),
                        pki.pem_cert(old_root) + pki.pem_cert(root), tmp_path, chain_to_ca=True)
    with pytest.raises(ConfigurationError, match="not issued by"):
        pki.check_tls_files(pki.pem_private(leaf_key), pki.pem_cert(leaf),
                            pki.pem_cert(root), tmp_path, chain_to_ca=True)
    # a site leaf (no CA) that signed another leaf: no chain, even under a root that allows
    # intermediates
    site_leaf = pki.issue_site_cert(root_key, root, 1, leaf_key.public_key())
    fake_key = pki.new_key()
    fake = pki.issue_site_cert(leaf_key, site_leaf, 2, fake_key.public_key())
    with pytest.raises(ConfigurationError, match="not issued by"):
        pki.check_tls_files(pki.pem_private(fake_key), pki.pem_cert(fake) + pki.pem_cert(
            site_leaf), pki.pem_cert(root), tmp_path, chain_to_ca=True)
    strict_key, strict = pki.make_ca("federation")  # path length 0
    inter = (x509.CertificateBuilder().subject_name(inter.subject).issuer_name(strict.subject)
             .public_key(inter_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(strict_key, hashes.SHA256()))
    with pytest.raises(ConfigurationError, match="not issued by"):
        pki.check_tls_files(pki.pem_private(leaf_key), pki.pem_cert(leaf) + pki.pem_cert(inter),
                            pki.pem_cert(strict), tmp_path, chain_to_ca=True)


def test_ckks_min_sites_0_means_the_default() -> None:
    """Configs written with min_sites = 0 ("the default") before stay valid."""
    config = FederationConfig.from_dict({
        "federation": {"name": "f", "protocol": "ckks", "aggregator": "a:1",
                       "trust_root": "00" * 32}, "ckks": {"min_sites": 0}})
    assert config.min_sites is None


def test_the_ranges_hold_for_a_config_made_in_code_too(federation: Path) -> None:
    import dataclasses

    from secagg.federation.config import MAX_DEADLINE_SECONDS, Deadlines

    config = FederationConfig.load(federation / "federation.toml")
    at_limit = dataclasses.replace(config, deadlines=Deadlines(stage=MAX_DEADLINE_SECONDS))
    at_limit.check()  # the bound itself is allowed
    with pytest.raises(ConfigurationError, match="stage"):
        dataclasses.replace(config, deadlines=Deadlines(stage=MAX_DEADLINE_SECONDS * 2)).check()


@pytest.fixture
def fresh_federation(tmp_path: Path) -> Path:
    d = tmp_path / "fed"
    init_federation(d, 4)
    return d


def test_a_site_rotates_its_certificate_with_a_request_its_identity_key_signs(
        fresh_federation: Path, tmp_path: Path) -> None:
    site = fresh_federation / "sites" / "site-2"
    new = tmp_path / "site-2-rotation"
    request = make_site_request(new, 2, trust_root=ANY_ROOT, identity_key=site / "identity.key")
    assert not (new / "identity.key").exists()  # the identity key stays where it was
    out = sign_site_request(fresh_federation, request, tmp_path / "signed")
    config = FederationConfig.load(fresh_federation / "federation.toml")
    roster = load_roster(fresh_federation / "roster.bin", config.trust_root)
    assert sorted(roster) == [1, 2, 3, 4] and roster.version == 2
    assert pki.site_id_from_pem((out / "client.crt").read_bytes()) == 2
    # and a request into a directory that already holds an identity key is refused, not
    # a silent new identity over the old one
    with pytest.raises(ConfigurationError, match="--identity"):
        make_site_request(site, 2, trust_root=ANY_ROOT)


def test_a_request_is_not_made_in_a_federations_own_directory(fresh_federation: Path) -> None:
    """`federation csr --dir FED` wrote a site's private keys beside the CA's key."""
    before = sorted(p.name for p in fresh_federation.iterdir())
    with pytest.raises(ConfigurationError, match="federation's directory"):
        make_site_request(fresh_federation, 9, trust_root=ANY_ROOT)
    assert sorted(p.name for p in fresh_federation.iterdir()) == before


def test_a_request_is_not_made_beside_a_ca_key_kept_offline(tmp_path: Path) -> None:
    """A federation whose ca/ca.key is a link to a key kept offline (a removable disk, not
    mounted now) is the operator's directory all the same: no site's keys are written there."""
    fed = tmp_path / "fed"
    (fed / "ca").mkdir(parents=True)
    (fed / "ca" / "ca.key").symlink_to(tmp_path / "offline" / "ca.key")
    with pytest.raises(ConfigurationError, match="federation's directory"):
        make_site_request(fed, 9, trust_root=ANY_ROOT)
    assert sorted(p.name for p in fed.iterdir()) == ["ca"]


def test_sign_says_whether_it_added_a_seat_or_rotated_a_certificate(
        fresh_federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's line reports this sign's own before/after rosters (read under its lock)."""
    from secagg.cli import main

    added = make_site_request(tmp_path / "site-9", 9, trust_root=ANY_ROOT)
    assert main(["federation", "sign", "--dir", str(fresh_federation), "--request",
                 str(added), "--out", str(tmp_path / "s9"), "--add-site"]) == 0
    assert "signed site 9: ADDED to the roster (4 -> 5 sites)" in capsys.readouterr().out
    rotated = make_site_request(tmp_path / "site-2", 2, trust_root=ANY_ROOT,
                                identity_key=fresh_federation / "sites" / "site-2" / "identity.key")
    assert main(["federation", "sign", "--dir", str(fresh_federation), "--request",
                 str(rotated), "--out", str(tmp_path / "s2"), "--add-site"]) == 0
    out = capsys.readouterr().out
    assert "signed site 2: a new TLS certificate" in out and "ADDED" not in out


def _forged_request(federation: Path, tmp_path: Path, victim: int, signer: Path | None,
                    replay_from: Path | None = None) -> Path:
    """A request for ``victim``'s certificate made of its public roster key and a TLS key the
    attacker holds, signed by ``signer`` (another identity key) or by no one, or carrying a
    signature the victim made for another request."""
    import json

    from cryptography.hazmat.primitives import serialization

    from secagg.federation import kit

    config = FederationConfig.load(federation / "federation.toml")
    roster = load_roster(federation / "roster.bin", config.trust_root)
    csr = pki.make_csr(victim, pki.new_key())
    der = csr.public_bytes(serialization.Encoding.DER)
    request = {"site_id": victim, "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
               "identity_public_key": roster[victim].hex()}
    if signer is not None:
        key = kit.load_identity(signer)
        request["identity_signature"] = key.sign(kit._request_message(victim, der)).hex()
    if replay_from is not None:
        request["identity_signature"] = json.loads(replay_from.read_text())["identity_signature"]
    path = tmp_path / f"forged-{victim}-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(request))
    return path


def test_a_certificate_for_a_site_needs_that_sites_identity_key(
        fresh_federation: Path, tmp_path: Path) -> None:
    """Site 4 asks for site 1's certificate with site 1's public key from the roster: with no
    signature, its own, or site 1's signature of another request, the operator's ordinary
    `federation sign` refuses (it issued the certificate before, and site 4 then spoke as the
    key holder)."""
    legit = make_site_request(tmp_path / "rotation", 1, trust_root=ANY_ROOT,
                              identity_key=fresh_federation / "sites" / "site-1" / "identity.key")
    attempts = [
        _forged_request(fresh_federation, tmp_path, 1, None),
        _forged_request(fresh_federation, tmp_path, 1,
                        fresh_federation / "sites" / "site-4" / "identity.key"),
        _forged_request(fresh_federation, tmp_path, 1, None, replay_from=legit),
    ]
    for n, path in enumerate(attempts):
        with pytest.raises(ConfigurationError, match="not signed by the identity key"):
            sign_site_request(fresh_federation, path, tmp_path / f"out-{n}")
        assert not (tmp_path / f"out-{n}" / "client.crt").exists()
    config = FederationConfig.load(fresh_federation / "federation.toml")
    assert load_roster(fresh_federation / "roster.bin", config.trust_root).version == 1


@pytest.mark.parametrize("site_id", [-1, 0, 2**64])
def test_a_request_naming_an_impossible_site_id_is_a_clear_error(
        fresh_federation: Path, tmp_path: Path, site_id: int) -> None:
    import json

    path = tmp_path / "odd.json"
    good = json.loads(make_site_request(tmp_path / "s", 5, trust_root=ANY_ROOT).read_text())
    path.write_text(json.dumps({**good, "site_id": site_id}))
    with pytest.raises(ConfigurationError, match="site id"):
        sign_site_request(fresh_federation, path, tmp_path / "out")


def test_a_private_key_is_never_readable_by_others_even_before_its_chmod(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is created 0600: a chmod after the write would leave a window in which
    another user (umask 022) could read the key."""
    import os

    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)  # the window, held open
    old = os.umask(0o022)
    try:
        pki.write_private(tmp_path / "keys" / "a.key", b"secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "keys" / "a.key").stat().st_mode) == 0o600


def test_a_roster_naming_a_site_twice_is_refused(federation: Path) -> None:
    """Two entries for one site id (two keys for it): the roster as signed is not the
    roster a dict of it would keep."""
    from secagg.v1 import roster_pb2

    msg = roster_pb2.SignedRoster()
    msg.ParseFromString((federation / "roster.bin").read_bytes())
    msg.roster.sites.append(msg.roster.sites[0])
    with pytest.raises(InvalidMessage, match="roster"):
        roster_from_bytes(msg.SerializeToString())


def test_an_identity_key_of_another_kind_is_a_clear_error(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from secagg.federation.kit import load_identity

    path = tmp_path / "identity.key"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match="not an Ed25519 private key"):
        load_identity(path)


def test_a_server_started_with_a_sites_certificate_is_refused(federation: Path,
                                                              tmp_path: Path) -> None:
    """A site's client certificate and key put in as server.crt and server.key: the server
    started, and every site failed its handshake, told only "unavailable". Refused, naming
    the file."""
    import shutil

    from aggregator.service import load_server_files

    agg = tmp_path / "aggregator"
    shutil.copytree(federation / "aggregator", agg)
    load_server_files(agg / "federation.toml")  # as made: taken
    shutil.copy(federation / "sites" / "site-1" / "client.crt", agg / "server.crt")
    shutil.copy(federation / "sites" / "site-1" / "client.key", agg / "server.key")
    with pytest.raises(ConfigurationError, match="not a server certificate"):
        load_server_files(agg / "federation.toml")


def test_the_idle_timeout_left_out_is_the_documented_one() -> None:
    """The loader's default was 30 s where the README, the template and the dataclass say 60."""
    config = FederationConfig.from_dict({
        "federation": {"name": "n", "protocol": "masking", "aggregator": "a:1",
                       "trust_root": "00" * 32}, "job": {"id": "j", "rounds": 1}})
    assert config.limits.stream_idle_seconds == 60.0


def test_an_init_cut_short_leaves_no_federation_an_aggregator_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during `federation init` of many sites left a roster of all of them, keys for
    some, and an aggregator directory the aggregator served (and opened round 1 with). The
    aggregator's directory is written last, whole; a rerun names the cut-short init; and the
    CLI says "interrupted" on one line with status 130, not a traceback."""
    from aggregator.service import load_server_files
    from secagg.cli import main

    model = tmp_path / "m.npz"
    np.savez(model, w=np.zeros(3))  # type: ignore[arg-type]
    real, made = pki.issue_site_cert, [0]

    def interrupted(*args: object, **kwargs: object) -> object:
        made[0] += 1
        if made[0] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pki, "issue_site_cert", interrupted)
    d = tmp_path / "fed"
    try:
        status = main(["federation", "init", "--dir", str(d), "--sites", "5",
                       "--model", str(model)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left the CLI as a KeyboardInterrupt traceback")
    assert status == 130
    err = capsys.readouterr().err
    assert err.strip() == "secagg: interrupted"
    assert (d / "sites" / "site-2" / "client.crt").exists()
    with pytest.raises(ConfigurationError):
        load_server_files(d / "aggregator" / "federation.toml")
    monkeypatch.setattr(pki, "issue_site_cert", real)
    with pytest.raises(ConfigurationError, match="cut short"):
        init_federation(d, 5, initial_model=model)
    done = tmp_path / "done"
    init_federation(done, 5, initial_model=model)
    assert sorted(p.name for p in done.iterdir() if p.name.startswith(".")) == []
    load_server_files(done / "aggregator" / "federation.toml")


@pytest.mark.parametrize("key", ["ca/ca.key", "trust-root/signer.key"])
def test_the_federations_own_keys_others_can_read_are_refused_when_signing(
        fresh_federation: Path, tmp_path: Path, key: str) -> None:
    """`federation sign` signed with a CA key (or roster signer key) at 0644, where a site's
    key at 0644 is refused: the federation's own keys are held to the same rule."""
    request = make_site_request(tmp_path / "site-9", 9, trust_root=ANY_ROOT)
    (fresh_federation / key).chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        sign_site_request(fresh_federation, request, tmp_path / "refused", add_site=True)
    (fresh_federation / key).chmod(0o600)
    sign_site_request(fresh_federation, request, tmp_path / "signed", add_site=True)


def test_a_key_file_that_is_not_a_regular_file_is_refused_not_waited_on(
        federation: Path, tmp_path: Path) -> None:
    """client.key a FIFO: every start hung in open() for ever (a link to /dev/zero read for
    ever). Refused at once, naming the file."""
    from secagg.federation.kit import SiteKit

    d = _site_copy(federation, tmp_path)
    (d / "client.key").unlink()
    os.mkfifo(d / "client.key", 0o600)
    with pytest.raises(ConfigurationError, match=r"client\.key is not a regular file"):
        SiteKit.load(d)
    # and a key named outside a kit (csr --identity), which no directory check sees first
    os.mkfifo(tmp_path / "identity.fifo", 0o600)
    with pytest.raises(ConfigurationError, match=r"identity\.fifo is not a regular file"):
        make_site_request(tmp_path / "request", 5, trust_root=ANY_ROOT,
                          identity_key=tmp_path / "identity.fifo")


@pytest.mark.parametrize("entry", ["roster.bin", "ca.crt", "federation.toml"])
def test_a_kit_entry_that_is_not_a_regular_file_is_refused_not_waited_on(
        federation: Path, tmp_path: Path, entry: str) -> None:
    """A FIFO at roster.bin, ca.crt or federation.toml hung every start when read."""
    import threading

    from secagg.federation.kit import SiteKit

    d = _site_copy(federation, tmp_path)
    (d / entry).unlink()
    os.mkfifo(d / entry, 0o644)
    raised: list[BaseException] = []

    def load() -> None:
        try:
            SiteKit.load(d)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    hung = thread.is_alive()
    if hung:  # (a writer that closes at once gives the reader end-of-file: it ends)
        for _ in range(100):
            with contextlib.suppress(OSError):
                os.close(os.open(d / entry, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(0.1)
            if not thread.is_alive():
                break
    assert not hung, f"SiteKit.load waited on the FIFO at {entry}"
    assert len(raised) == 1 and isinstance(raised[0], ConfigurationError)
    assert f"{entry} is not a regular file" in str(raised[0])


def test_a_key_file_larger_than_any_key_is_said_so(federation: Path, tmp_path: Path) -> None:
    """A key file past 1 MiB was cut short and then called "not a PEM key"."""
    from secagg.federation.kit import SiteKit

    d = _site_copy(federation, tmp_path)
    key = d / "identity.key"
    key.write_bytes(b"#" * (2 << 20) + key.read_bytes())
    with pytest.raises(ConfigurationError, match=r"identity\.key is 2,097,\d+ bytes, larger"):
        SiteKit.load(d)


@pytest.mark.parametrize("address", [
    "localhost:50051", "[::1]:50051", "dns:///agg.example.org:50051",
    "dns://8.8.8.8/agg.example.org:50051", "ipv4:10.0.0.1:50051", "ipv6:[::1]:50051"])
def test_a_grpc_target_a_site_can_dial_is_a_valid_aggregator_address(address: str) -> None:
    """gRPC's own target forms (a resolver named, a list of addresses) were refused once the
    address was checked as init checks it; they are dialable, and taken."""
    config = FederationConfig.from_dict({
        "federation": {"name": "h", "protocol": "masking", "aggregator": address,
                       "trust_root": "00" * 32},
        "job": {"id": "job-1", "rounds": 1}})
    assert config.aggregator == address


def test_a_certificate_without_basic_constraints_is_no_ca(tmp_path: Path) -> None:
    """A certificate that says nothing of being a CA (no BasicConstraints) anchors nothing
    in a ca.crt bundle and is no intermediate in a presented chain: taken for a CA with no
    path limit, any such certificate an operator's PKI issued could issue site leaves."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    root_key, root = _operator_root()
    root_name = root.subject
    plain_key = pki.new_key()
    plain_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no constraints")])

    def plain(issuer: x509.Name, key: object) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(plain_name).issuer_name(issuer)
                .public_key(plain_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=30))
                .sign(key, hashes.SHA256()))  # type: ignore[arg-type]

    self_signed = plain(plain_name, plain_key)
    assert pki.trust_anchors(pki.pem_cert(self_signed) + pki.pem_cert(root)) == (root,)
    inter = plain(root_name, root_key)
    leaf_key = pki.new_key()
    leaf = pki.issue_site_cert(plain_key, inter, 1, leaf_key.public_key())
    with pytest.raises(ConfigurationError, match="not issued by"):
        pki.check_tls_files(pki.pem_private(leaf_key), pki.pem_cert(leaf) + pki.pem_cert(inter),
                            pki.pem_cert(root), tmp_path, chain_to_ca=True)
    assert pki.site_id_from_pem(pki.pem_cert(leaf), pki.trust_anchors(pki.pem_cert(root)),
                                pki.pem_cert(inter)) is None


@pytest.mark.parametrize("threshold", [7.9, "abc", True, 7.0])
def test_a_masking_threshold_is_auto_or_an_integer(threshold: object) -> None:
    """7.9 was truncated to 7 (a lower threshold than written), "abc" a ValueError."""
    with pytest.raises(ConfigurationError, match="threshold must be"):
        FederationConfig.from_dict({
            "federation": {"name": "f", "protocol": "masking", "aggregator": "a:1",
                           "trust_root": "00" * 32}, "masking": {"threshold": threshold}})


@pytest.mark.parametrize(("tables", "message"), [
    ({"masking": {"word_bits": 48}}, "word_bits must be 32 or 64"),
    ({"masking": "x"}, r"\[masking\] must be a table"),
    ({"update": [1, 2]}, r"\[update\] must be a table"),
])
def test_config_shapes_are_refused_as_such(tables: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        FederationConfig.from_dict({
            "federation": {"name": "f", "protocol": "masking", "aggregator": "a:1",
                           "trust_root": "00" * 32}, **tables})


def test_a_federation_starts_from_no_empty_model(tmp_path: Path) -> None:
    import numpy as np

    empty = tmp_path / "empty.npz"
    np.savez(empty, w=np.zeros(0, np.float32))
    with pytest.raises(ConfigurationError, match="has no values"):
        init_federation(tmp_path / "fed", 3, initial_model=empty)


def _operator_root() -> tuple[pki.ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An operator's own root CA that allows one intermediate (path length 1)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    key = pki.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator root")])
    return key, (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - dt.timedelta(minutes=5))
                 .not_valid_after(now + dt.timedelta(days=90))
                 .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                 .sign(key, hashes.SHA256()))


@pytest.mark.parametrize("made", [{"protocol": "paillier"}, {"key_holders": ()},
                                  {"key_holders": (1, 2.0)}])
def test_init_refuses_a_protocol_or_key_holders_no_config_would_load(
        tmp_path: Path, made: dict[str, object]) -> None:
    """Only loading a config checked these: init wrote a whole federation (keys and
    certificates for every site) that every party then refused to load."""
    with pytest.raises(ConfigurationError, match=r"protocol must be one of|key_holders must"):
        init_federation(tmp_path / "fed", 3, **made)  # type: ignore[arg-type]
    assert not (tmp_path / "fed").exists() or list((tmp_path / "fed").iterdir()) == []


def test_a_config_that_cannot_be_read_is_named_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b"[federation]\nname = '\xe9'\n")
    (tmp_path / "bad.toml").write_text("[federation\n")
    (tmp_path / "deep.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    for name, reason in (("dir.toml", "cannot read config file"), ("latin1.toml", "not UTF-8"),
                         ("bad.toml", "is not valid TOML"), ("none.toml", "does not exist"),
                         ("deep.toml", "nested too deep")):
        with pytest.raises(ConfigurationError, match=reason) as e:
            FederationConfig.load(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_a_damaged_roster_is_told_from_another_federations(federation: Path,
                                                           tmp_path: Path) -> None:
    """A truncated roster.bin was "not signed by the federation's trust root", as if it were
    another federation's."""
    from secagg.federation.kit import load_roster

    config = FederationConfig.load(federation / "federation.toml")
    cut = tmp_path / "roster.bin"
    cut.write_bytes((federation / "roster.bin").read_bytes()[:50])
    with pytest.raises(ConfigurationError, match="is damaged"):
        load_roster(cut, config.trust_root)
    with pytest.raises(ConfigurationError, match="not signed by the federation's trust root"):
        load_roster(federation / "roster.bin", bytes(32))


def test_a_config_with_a_byte_order_mark_loads(federation: Path, tmp_path: Path) -> None:
    """Saved by an editor that writes a BOM, it was "Invalid statement (at line 1, column
    1)"."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + (federation / "federation.toml").read_bytes())
    import dataclasses

    loaded, plain = FederationConfig.load(path), FederationConfig.load(federation /
                                                                       "federation.toml")
    assert dataclasses.replace(loaded, initial_model=None) == dataclasses.replace(
        plain, initial_model=None)


def test_another_sites_certificate_in_a_site_directory_is_named_as_mixed_files(
        federation: Path, tmp_path: Path) -> None:
    """site-2's client.crt and client.key in site-1's directory: told as "site 2's identity
    key is not the roster's", where the identity key was right and the certificate wrong."""
    import os

    from secagg.federation.kit import SiteKit

    d = _site_copy(federation, tmp_path)
    other = federation / "sites" / "site-2"
    for name in ("client.crt", "client.key"):
        (d / name).unlink()
        (d / name).write_bytes((other / name).read_bytes())
        os.chmod(d / name, 0o600)
    with pytest.raises(ConfigurationError, match=r"is site 2's certificate, but identity\.key "
                                                 r"is site 1's") as e:
        SiteKit.load(d)
    assert "site 2's identity key is not the roster's" in str(e.value)


def test_init_refuses_key_holders_that_are_no_sequence(tmp_path: Path) -> None:
    """key_holders=2 raised TypeError from tuple()."""
    with pytest.raises(ConfigurationError, match="key_holders must be a sequence"):
        init_federation(tmp_path / "a", 3, protocol="ckks", key_holders=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["ex*ample", "f*.example.org", "*.org", "a.*.example.org",
                                  "256.1.1.1", "10.0.0.300", "*"])
def test_a_host_with_a_partial_wildcard_or_a_mistyped_address_is_refused(
        tmp_path: Path, host: str) -> None:
    """A wildcard is a whole first label over at least two more ("*.example.org"); "ex*ample"
    and "f*.example.org" (partial wildcards, matched differently by each verifier) and a
    mistyped address taken for a DNS name went into the aggregator's certificate."""
    with pytest.raises(ConfigurationError, match="is not an IP address or a DNS name"):
        init_federation(tmp_path / "fed", 3, hosts=[host])
    assert not (tmp_path / "fed").exists() or not any((tmp_path / "fed").iterdir())


def _npz_declaring(path: Path, values: int, data: bytes = b"\0" * 16) -> Path:
    """A .npz whose one array's header declares ``values`` float32 values (its data cut
    short: what a few MB of deflated zeros can claim)."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (values,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("w.npy", header.getvalue() + data)
    return path


def test_a_model_declaring_more_values_than_the_limit_is_refused_before_it_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 MB archive declaring 10^9 float32 values took 23 GB to load at init (a helper's
    finding), past [limits] max_vector_length. Its headers are read first."""
    from secagg.model import FlatModel

    bomb = _npz_declaring(tmp_path / "bomb.npz", 10**9)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("np.load read an archive declaring too many values")

    monkeypatch.setattr(np, "load", never)
    with pytest.raises(ConfigurationError, match=r"declare 1,000,000,000 values, more than "
                                                 r"\[limits\] max_vector_length"):
        init_federation(tmp_path / "fed", 3, initial_model=bomb)
    assert not (tmp_path / "fed").exists()
    with pytest.raises(ConfigurationError, match="declare 1,000,000,000"):
        FlatModel.load_npz(bomb, max_values=10**8)
    monkeypatch.undo()
    fits = tmp_path / "fits.npz"
    np.savez(fits, a=np.zeros((10, 10), np.float32), b=np.zeros(5))  # type: ignore[arg-type]
    assert FlatModel.load_npz(fits, max_values=105).size == 105
    with pytest.raises(ConfigurationError, match="declare 105 values"):
        FlatModel.load_npz(fits, max_values=104)


def test_a_model_archive_member_that_is_no_array_is_refused_not_read_whole(
        tmp_path: Path) -> None:
    """np.load returned a member without the .npy magic as its bytes, however large they
    decompressed to."""
    import zipfile

    from secagg.model import FlatModel

    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("w.npy", b"\0" * 1000)
    with pytest.raises(ConfigurationError, match="cannot read model"):
        FlatModel.load_npz(path, max_values=10**8)


@pytest.mark.parametrize(("setting", "says"), [
    ("threshold = 1", r"threshold must be in \[4, 5\]"),
    ("threshold = 999999", r"threshold must be in \[4, 5\]"),
    ("neighbors = 2", "too few for a sparse graph")])
def test_masking_settings_the_roster_cannot_take_are_refused_at_connect(
        tmp_path: Path, setting: str, says: str) -> None:
    """They were found at the first submit, after the round was spent, and told as "this
    site refused the aggregator's messages". `sign-config` refuses to sign them; signed
    another way (the signer's key used from Python), the site still refuses them."""
    import re

    from clients import Site
    from secagg.federation.kit import load_identity, sign_settings, write_settings_signature
    from secagg.roster import RosterSigner

    model = tmp_path / "m.npz"
    np.savez(model, w=np.zeros(3, np.float32))  # type: ignore[arg-type]
    init_federation(tmp_path / "fed", 5, initial_model=model)
    site = tmp_path / "fed" / "sites" / "site-1"
    Site.connect(site).close()
    key = setting.split(" =")[0]
    config = site / "federation.toml"
    config.write_text(re.sub(rf"(?m)^{key} = .*$", setting, config.read_text()))
    with pytest.raises(ConfigurationError, match=says):
        sign_settings(tmp_path / "fed", config)
    signer = RosterSigner(load_identity(tmp_path / "fed" / "trust-root" / "signer.key"))
    write_settings_signature(site, FederationConfig.load(config), signer, 5)
    with pytest.raises(ConfigurationError, match=says) as caught:
        Site.connect(site)
    assert str(config) in str(caught.value)


def test_a_private_key_that_is_a_directory_is_named_by_its_path(tmp_path: Path) -> None:
    """os.fdopen refused the directory before the regular-file check: "cannot use 3: Is a
    directory" named a file descriptor."""
    (tmp_path / "client.key").mkdir()
    with pytest.raises(ConfigurationError, match=r"client\.key is not a regular file"):
        pki.read_private_key(tmp_path / "client.key")


def test_a_missing_required_key_is_said_to_be_missing(federation: Path, tmp_path: Path) -> None:
    """Not "must be a string, got None": the file lacks the key."""
    import tomllib

    import tomli_w

    data = tomllib.loads((federation / "federation.toml").read_text())
    del data["federation"]["aggregator"]
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(data))
    with pytest.raises(ConfigurationError, match=r"\[federation\] aggregator is missing"):
        FederationConfig.load(path)


def _ten_site_roster() -> dict[int, bytes]:
    return {i: bytes([i]) * 32 for i in range(1, 11)}


def test_the_ckks_min_sites_floor_follows_the_configured_corrupt_fraction() -> None:
    """corrupt_fraction 0.2 of 10 sites is 2 colluders: a released sum needs 4 sites, or 2
    colluders and one honest site make one up (and subtract their own updates from it)."""
    base = dict(name="f", protocol="ckks", aggregator="localhost:50051", trust_root=bytes(32))
    roster = _ten_site_roster()
    FederationConfig(**base, corrupt_fraction=0.2, min_sites=4).check_fits_roster(roster)
    FederationConfig(**base, corrupt_fraction=0.0, min_sites=3).check_fits_roster(roster)
    with pytest.raises(ConfigurationError, match="colluding"):
        FederationConfig(**base, corrupt_fraction=0.2, min_sites=3).check_fits_roster(roster)


def test_the_masking_round_takes_the_configured_clip_word_and_fractions() -> None:
    """The round configuration every site quantises with is the config's: a clip of 1.0
    where [update] clip_norm is 5 clipped every update above 1 (a wrong average), a 32-bit
    ring where word_bits is 64 lost the precision the operator chose."""
    config = FederationConfig(name="f", protocol="masking", aggregator="localhost:50051",
                              trust_root=bytes(32), clip_norm=5.0, word_bits=64,
                              corrupt_fraction=0.1, dropout_rate=0.05)
    made = config.masking_round(config.round_id_for(1), _ten_site_roster(), 10,
                                model_digest=bytes(32))
    assert made.clip == 5.0 and made.word_bits == 64 and made.max_weight == 1.0
    assert made.corrupt_fraction == 0.1 and made.dropout_rate == 0.05
    assert made.round_id == "f/job/round-1" and made.vector_length == 10


def test_a_config_that_omits_corrupt_fraction_takes_the_documented_default(
        tmp_path: Path) -> None:
    """README: `corrupt_fraction` (default 0.2). A hand-written federation.toml that leaves
    [masking] out is read with 0.2 colluders a roster site, not none: a default of 0 would
    have every party agree on a quorum and threshold that tolerate no colluding site (5
    sites: 3 signatures make the survivor list, not 4), with nothing said."""
    path = tmp_path / "federation.toml"
    path.write_text('[federation]\nprotocol = "masking"\naggregator = "localhost:50051"\n'
                    f'trust_root = "{"00" * 32}"\n')
    config = FederationConfig.load(path)
    assert config.corrupt_fraction == 0.2
    roster = {i: bytes([i]) * 32 for i in range(1, 6)}
    made = config.masking_round(config.round_id_for(1), roster, 10, model_digest=bytes(32))
    assert made.corrupt_fraction == 0.2
    assert made.consistency_quorum == 4 and made.reconstruction_threshold == 4


def test_a_damaged_model_archive_is_a_clear_error(tmp_path: Path) -> None:
    """A byte of an array changed (a bad copy): zipfile's CRC check, named as a damaged
    archive, not zipfile.BadZipFile's traceback."""
    from secagg.model import FlatModel

    path = tmp_path / "model.npz"
    np.savez(path, w=np.arange(64, dtype=np.float64))  # stored, not compressed
    data = bytearray(path.read_bytes())
    at = data.index(np.float64(33.0).tobytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    for max_values in (None, 1000):
        with pytest.raises(ConfigurationError, match="damaged"):
            FlatModel.load_npz(path, max_values=max_values)


def test_a_model_archive_of_object_arrays_is_refused_without_suggesting_unpickling(
        tmp_path: Path) -> None:
    from secagg.model import FlatModel

    path = tmp_path / "model.npz"
    np.savez(path, w=np.array([{"a": 1}, None], dtype=object))  # (pickled by numpy)
    with pytest.raises(ConfigurationError, match="would need unpickling: refused") as caught:
        FlatModel.load_npz(path)
    assert "allow_pickle" not in str(caught.value)


def test_a_model_archive_with_version_2_array_headers_loads_within_the_limit(
        tmp_path: Path) -> None:
    """numpy writes a 2.0 header for arrays whose header outgrows 1.0's; the size check
    reads it as such (read as 1.0, a valid model was refused)."""
    import zipfile

    from secagg.model import FlatModel

    path = tmp_path / "model.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name, arr, version in (("a", np.arange(6, dtype=np.float32), (2, 0)),
                                   ("b", np.ones(3), (1, 0))):
            with archive.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, arr, version=version)
    model = FlatModel.load_npz(path, max_values=9)
    assert model.size == 9
    with pytest.raises(ConfigurationError, match="declare 9 values"):
        FlatModel.load_npz(path, max_values=8)


def test_a_config_names_its_initial_model_relative_to_its_own_directory(tmp_path: Path) -> None:
    """Written with a base, an initial model inside it is named relative to the file, so the
    federation's directory can be moved (an absolute path named the old place)."""
    import shutil

    d = tmp_path / "fed"
    d.mkdir()
    config = FederationConfig(name="f", protocol="masking", aggregator="localhost:50051",
                              trust_root=bytes(32), initial_model=d / "model.npz")
    (d / "federation.toml").write_text(config.to_toml(base=d))
    assert 'initial_model = "model.npz"' in (d / "federation.toml").read_text()
    moved = shutil.move(d, tmp_path / "moved")
    assert FederationConfig.load(Path(moved) / "federation.toml").initial_model == (
        tmp_path / "moved" / "model.npz")


def test_init_refuses_a_key_holder_one_past_the_last_site(tmp_path: Path) -> None:
    """A CKKS key holder beyond the roster (site 4 of 3) made a federation no round of which
    could run: every round waited a deadline for a key nobody would announce."""
    with pytest.raises(ConfigurationError, match=r"--key-holders must be sites in 1\.\.3"):
        init_federation(tmp_path / "fed", 3, protocol="ckks", key_holders=(4,))
    assert not (tmp_path / "fed").exists() or not any((tmp_path / "fed").iterdir())


def test_init_refuses_a_name_longer_than_forty_characters(tmp_path: Path) -> None:
    """The name goes into the CA's common name ("secagg CA <name>", at most 64 characters)."""
    with pytest.raises(ConfigurationError, match="--name must be 1-40 printable"):
        init_federation(tmp_path / "fed", 3, name="n" * 41)
    init_federation(tmp_path / "ok", 3, name="n" * 40)


def test_a_host_name_longer_than_dns_allows_is_refused() -> None:
    """A DNS name is at most 253 characters: a longer one is no name a site can dial."""
    pki.check_hosts([".".join(["a" * 63] * 3 + ["b" * 61])])  # 253 characters: taken
    with pytest.raises(ConfigurationError, match="is not an IP address or a DNS name"):
        pki.check_hosts([".".join(["a" * 63] * 4)])  # 255 characters


@pytest.mark.parametrize("host", ["a" * 64 + ".example.org", "-agg.example.org",
                                  "agg-.example.org", "agg.-example.org"])
def test_a_host_label_that_dns_does_not_allow_is_refused(host: str) -> None:
    """A DNS label is 1-63 characters and neither starts nor ends with a hyphen: such a name
    went into the aggregator's certificate, though no site could dial it. Refused; a label
    of 63, inner hyphens, underscores and a leading wildcard are taken."""
    with pytest.raises(ConfigurationError, match="is not an IP address or a DNS name"):
        pki.check_hosts([host])
    pki.check_hosts(["a" * 63 + ".example.org", "agg-1.example.org", "_svc.example.org",
                     "*.example.org"])


def test_a_ca_key_that_is_no_ec_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = tmp_path / "ca.key"
    pki.write_private(path, ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ConfigurationError, match="is not an EC private key"):
        pki.load_private(path)


@pytest.mark.parametrize("chain_to_ca", [True, False])
def test_tls_files_whose_only_ca_is_not_yet_valid_say_so(tmp_path: Path,
                                                          chain_to_ca: bool) -> None:
    """A ca.crt whose CA begins next week (a clock, or a CA made on a machine set ahead):
    every handshake would fail; said at load, for the aggregator's files too (which are not
    chained to ca.crt)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes

    ca_key, ca_cert = pki.make_ca("t")
    now = dt.datetime.now(dt.UTC)
    future = (x509.CertificateBuilder().subject_name(ca_cert.subject)
              .issuer_name(ca_cert.subject).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now + dt.timedelta(days=7))
              .not_valid_after(now + dt.timedelta(days=70))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .sign(ca_key, hashes.SHA256()))
    key = pki.new_key()
    cert = pki.issue_site_cert(ca_key, ca_cert, 3, key.public_key())
    with pytest.raises(ConfigurationError, match=r"no CA certificate in .*ca\.crt is valid now"):
        pki.check_tls_files(pki.pem_private(key), pki.pem_cert(cert), pki.pem_cert(future),
                            tmp_path, chain_to_ca=chain_to_ca)


def test_a_client_certificate_naming_no_site_is_said_so(fresh_federation: Path) -> None:
    """A client.crt from the federation's CA, for the site's own key, but naming no site (a
    DNS name only): "names no site", not a talk of some site None's identity key."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    site = fresh_federation / "sites" / "site-1"
    ca_key = pki.load_private(fresh_federation / "ca" / "ca.key")
    ca_cert = pki.load_cert(fresh_federation / "ca" / "ca.crt")
    tls_key = pki.load_private(site / "client.key").public_key()
    cert = pki._issue(ca_key, ca_cert, tls_key, "site", [x509.DNSName("site.example.org")],
                      ExtendedKeyUsageOID.CLIENT_AUTH)
    pki.write_public(site / "client.crt", pki.pem_cert(cert))
    with pytest.raises(ConfigurationError, match=r"client\.crt names no site"):
        SiteKit.load(site)


def test_ckks_key_holders_take_the_rounds_in_turn(federation: Path) -> None:
    """Round r's key is made and released by key_holders[(r - 1) % len]: one holder keeping
    every round's key is not the federation the operator configured."""
    import dataclasses

    config = dataclasses.replace(FederationConfig.load(federation / "federation.toml"),
                                 key_holders=(2, 1, 3))
    assert [config.key_holder_for(r) for r in range(1, 8)] == [2, 1, 3, 2, 1, 3, 2]


@pytest.mark.parametrize("value", ["false", "0.0"])
def test_a_min_sites_that_is_no_integer_is_refused_even_if_it_equals_zero(
        federation: Path, tmp_path: Path, value: str) -> None:
    """min_sites = 0 means the default; false and 0.0 are no integers (they compare equal
    to 0) and are refused like any other value of the wrong type."""
    data = (federation / "federation.toml").read_text().replace(
        "[ckks]\n", f"[ckks]\nmin_sites = {value}\n")
    path = tmp_path / "bad.toml"
    path.write_text(data)
    with pytest.raises(ConfigurationError, match=r"\[ckks\] min_sites must be an integer"):
        FederationConfig.load(path)


def test_a_federation_made_with_a_model_bounds_every_partys_vectors_by_its_size(
        federation: Path, tmp_path: Path) -> None:
    """A site's first model fetch is checked against the pinned digest only once it has
    arrived, so its size was bounded by [limits] max_vector_length alone: 10^8 values, 800
    MB a lying aggregator could make it fetch. Every model of a job has the first's spec:
    init with a model writes its size as every party's limit (limits given are kept)."""
    from secagg.federation.config import Limits

    for config in (federation / "federation.toml", federation / "aggregator" / "federation.toml",
                   *sorted((federation / "sites").glob("*/federation.toml"))):
        assert FederationConfig.load(config).limits.max_vector_length == 3, config
    model = tmp_path / "m.npz"
    np.savez(model, w=np.zeros(5))  # type: ignore[arg-type]
    init_federation(tmp_path / "given", 3, initial_model=model,
                    limits=Limits(max_vector_length=1000))
    given = FederationConfig.load(tmp_path / "given" / "sites" / "site-1" / "federation.toml")
    assert given.limits.max_vector_length == 1000
    init_federation(tmp_path / "none", 3)
    plain = FederationConfig.load(tmp_path / "none" / "sites" / "site-1" / "federation.toml")
    assert plain.limits.max_vector_length == Limits().max_vector_length


def test_sign_config_refuses_a_new_jobs_model_larger_than_the_limit(tmp_path: Path) -> None:
    """init writes its model's size as [limits] max_vector_length; a new job from a larger
    model, signed as it was, would stop the aggregator at start and make every site refuse
    the model as the aggregator's lie. `sign-config` names the limit; raised, it signs."""
    import re

    from secagg.federation.kit import sign_settings

    model = tmp_path / "m.npz"
    np.savez(model, w=np.zeros(3, np.float32))  # type: ignore[arg-type]
    init_federation(tmp_path / "fed", 3, initial_model=model)
    config = tmp_path / "fed" / "federation.toml"
    np.savez(tmp_path / "fed" / "model.npz", w=np.zeros(5, np.float32))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"holds 5 values, more than \[limits\] "
                                                 r"max_vector_length \(3\)"):
        sign_settings(tmp_path / "fed", config)
    config.write_text(re.sub(r"(?m)^max_vector_length = .*$", "max_vector_length = 5",
                             config.read_text()))
    assert sign_settings(tmp_path / "fed", config).is_file()
