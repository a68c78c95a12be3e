"""Adversary: whoever carries a federation's files to a site (the aggregator's operator, a mail
server, a shared drive), without the federation's CA or roster signer key.

A site that makes its own keys (``federation csr``) receives its certificate, the CA, the
roster and the config back from the operator. Carried by an attacker, they can be a whole
federation of the attacker's making: its CA, its roster signer, a roster of its own sites
beside this one. The site then sent its update into a "sum" of its own update and the
attacker's zeros, and the weights (revealed) gave the update back exactly (a helper's attack).
The site trusts only the trust root it pinned, signed with its own identity key, from the
operator out of band: at ``csr``, at ``init``, or with ``federation pin``.

Every roster a signer ever signed stays validly signed: an old one, from before a site was
removed, put back in a site's directory, brought the removed site back into the sums. A site
refuses a roster older than one it has used (``clients.history``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clients import Site
from secagg.cli import main
from secagg.errors import ConfigurationError
from secagg.federation.config import FederationConfig
from secagg.federation.kit import (
    PIN_CONTEXT,
    PIN_FILE,
    SiteKit,
    init_federation,
    install_signed_files,
    load_roster,
    make_site_request,
    remove_site,
    sign_settings,
    sign_site_request,
)
from secagg.hazmat.signing import IdentityKey

RETURNED = ("client.crt", "ca.crt", "roster.bin", "federation.toml", "settings.sig")  # `sign`'s


def _federation(d: Path, sites: int) -> Path:
    model = d.parent / f"{d.name}.npz"
    np.savez(model, w=np.zeros(4, np.float32))  # type: ignore[arg-type]
    init_federation(d, sites, initial_model=model)
    return d


def _root(fed: Path) -> bytes:
    return FederationConfig.load(fed / "federation.toml").trust_root


def _install(out: Path, site: Path, names: tuple[str, ...] = RETURNED) -> None:
    for name in names:
        shutil.copy(out / name, site / name)


@pytest.fixture
def real(tmp_path: Path) -> Path:
    return _federation(tmp_path / "real", 4)


@pytest.fixture
def forged(tmp_path: Path) -> Path:
    """The attacker's own federation: its CA and signer, three sites of its own."""
    return _federation(tmp_path / "forged", 3)


def test_a_federation_of_the_carriers_making_is_refused(real: Path, forged: Path,
                                                        tmp_path: Path) -> None:
    site = tmp_path / "site-5"
    request = make_site_request(site, 5, trust_root=_root(real).hex())
    # the attacker signs the site's (public) request with its own federation
    _install(sign_site_request(forged, request, tmp_path / "forged-out", add_site=True), site)
    with pytest.raises(ConfigurationError, match="another federation's") as caught:
        SiteKit.load(site)
    assert "out of band" in str(caught.value)
    with pytest.raises(ConfigurationError, match="another federation's"):
        Site.connect(site)  # nothing is dialled
    # the operator's own answer to the same request is taken
    _install(sign_site_request(real, request, tmp_path / "real-out", add_site=True), site)
    kit = SiteKit.load(site)
    assert kit.site_id == 5 and kit.config.trust_root == _root(real)


def test_a_pin_the_carrier_writes_is_refused(real: Path, forged: Path, tmp_path: Path) -> None:
    """The carrier sends a pin along with its federation: its own site's (signed with that
    site's identity key), or one it signed with a key of its own. Neither is this site's."""
    site = tmp_path / "site-5"
    request = make_site_request(site, 5, trust_root=_root(real))
    out = sign_site_request(forged, request, tmp_path / "forged-out", add_site=True)
    _install(out, site)
    shutil.copy(forged / "sites" / "site-1" / PIN_FILE, site / PIN_FILE)
    with pytest.raises(ConfigurationError, match="not a trust root pinned by this site's "
                                                 "identity key"):
        SiteKit.load(site)
    key = IdentityKey.generate()
    root = _root(forged)
    (site / PIN_FILE).write_text(json.dumps(
        {"trust_root": root.hex(), "signature": key.sign(PIN_CONTEXT + root).hex()}))
    with pytest.raises(ConfigurationError, match="not a trust root pinned"):
        SiteKit.load(site)
    # nor is a signature this site's key made for something else: its request's (public)
    signature = json.loads(request.read_text())["identity_signature"]
    (site / PIN_FILE).write_text(json.dumps({"trust_root": root.hex(), "signature": signature}))
    with pytest.raises(ConfigurationError, match="not a trust root pinned"):
        SiteKit.load(site)


@pytest.mark.parametrize("damage", ["", "{", '{"trust_root": "00"}', "[]",
                                    '{"trust_root": 5, "signature": "00"}'])
def test_a_damaged_pin_is_refused_clearly(real: Path, damage: str) -> None:
    site = real / "sites" / "site-2"
    (site / PIN_FILE).write_text(damage)
    with pytest.raises(ConfigurationError, match="not a trust root pinned"):
        SiteKit.load(site)


def test_a_site_without_a_pin_is_told_how_to_make_one(real: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    site = real / "sites" / "site-2"
    (site / PIN_FILE).unlink()
    with pytest.raises(ConfigurationError, match=f"lacks {PIN_FILE}") as caught:
        SiteKit.load(site)
    assert "secagg federation pin" in str(caught.value) and "out of band" in str(caught.value)
    # pinned with another root: the site's files are refused as another federation's
    assert main(["federation", "pin", "--dir", str(site), "--trust-root", "ab" * 32]) == 0
    with pytest.raises(ConfigurationError, match="another federation's"):
        SiteKit.load(site)
    # with its own (read out in groups, as on a phone call); a pin of another root is
    # replaced only when the site says so (a parcel's note "run pin ..." replaced it)
    spaced = " ".join(_root(real).hex()[i:i + 8] for i in range(0, 64, 8))
    assert main(["federation", "pin", "--dir", str(site), "--trust-root", spaced]) == 2
    assert "--replace" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="another federation's"):
        SiteKit.load(site)
    assert main(["federation", "pin", "--dir", str(site), "--trust-root", spaced,
                 "--replace"]) == 0
    assert SiteKit.load(site).site_id == 2
    assert _root(real).hex() in capsys.readouterr().out
    assert main(["federation", "pin", "--dir", str(site), "--trust-root", spaced]) == 0


@pytest.mark.parametrize("argv", [[], ["--trust-root", "ab" * 31], ["--trust-root", "zz" * 32]])
def test_csr_needs_the_trust_root_before_it_writes_a_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    site = tmp_path / "site-5"
    with pytest.raises(SystemExit) as caught:
        main(["federation", "csr", "--dir", str(site), "--site", "5", *argv])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--trust-root" in err and "Traceback" not in err
    assert not site.exists()
    with pytest.raises(ConfigurationError, match="64 hex digits"):
        make_site_request(site, 5, trust_root="ab")
    assert not site.exists()


def test_init_prints_the_trust_root_sites_pin(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.npz"
    np.savez(model, w=np.zeros(3, np.float32))  # type: ignore[arg-type]
    assert main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                 "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert f"trust root:  {_root(tmp_path / 'fed').hex()}" in out
    for s in (1, 2, 3):  # and every site init made has it pinned
        assert SiteKit.load(tmp_path / "fed" / "sites" / f"site-{s}").site_id == s


def test_an_older_roster_than_one_used_is_refused(real: Path, tmp_path: Path) -> None:
    site = real / "sites" / "site-1"
    old = (site / "roster.bin").read_bytes()
    Site.connect(site).close()  # version 1, recorded
    remove_site(real, 4)  # site 4 removed: version 2
    shutil.copy(real / "roster.bin", site / "roster.bin")
    Site.connect(site).close()
    assert load_roster(site / "roster.bin", _root(real)).version == 2
    (site / "roster.bin").write_bytes(old)  # the carrier puts version 1 back
    with pytest.raises(ConfigurationError, match="older than version 2"):
        Site.connect(site)
    # a history kept elsewhere keeps it too; a new one has seen nothing
    elsewhere = tmp_path / "history"
    elsewhere.mkdir(mode=0o700)
    shutil.copy(real / "roster.bin", site / "roster.bin")
    Site.connect(site, history_dir=elsewhere).close()
    (site / "roster.bin").write_bytes(old)
    with pytest.raises(ConfigurationError, match="older than version 2"):
        Site.connect(site, history_dir=elsewhere)


def test_rosters_of_two_federations_are_kept_apart(real: Path, forged: Path,
                                                   tmp_path: Path) -> None:
    """A version is compared only with versions under the same trust root: a second
    federation's roster version 1 is not an older roster of the first's."""
    history = tmp_path / "history"
    history.mkdir(mode=0o700)
    remove_site(real, 4)
    site = real / "sites" / "site-1"
    shutil.copy(real / "roster.bin", site / "roster.bin")
    Site.connect(site, history_dir=history).close()  # version 2 under the real root
    Site.connect(forged / "sites" / "site-1", history_dir=history).close()  # 1, another root


@pytest.mark.parametrize("kind", ["fifo", "huge", "directory", "zeros"])
def test_a_pin_that_is_no_small_file_is_refused_not_waited_on(real: Path, kind: str) -> None:
    import os

    site = real / "sites" / "site-3"
    (site / PIN_FILE).unlink()
    if kind == "fifo":
        os.mkfifo(site / PIN_FILE, 0o644)
    elif kind == "huge":
        (site / PIN_FILE).write_bytes(b" " * 100_000)
    elif kind == "directory":
        (site / PIN_FILE).mkdir()
    else:  # (read whole, it filled the memory)
        (site / PIN_FILE).symlink_to("/dev/zero")
    with pytest.raises(ConfigurationError, match=f"{PIN_FILE}" + (
            " is not a regular file of at most 4096 bytes" if kind == "huge" else "")):
        SiteKit.load(site)


def _edit(config: Path, key: str, value: str) -> None:
    import re

    pattern = rf"(?ms)^{key} = \[.*?\]" if value.startswith("[") else rf"(?m)^{key} = .*$"
    text, n = re.subn(pattern, f"{key} = {value}", config.read_text())
    if n == 0:  # (a key init leaves out: added to its table)
        table = {"min_sites": "[ckks]", "initial_model_digest": "[job]"}[key]
        text = text.replace(f"{table}\n", f"{table}\n{key} = {value}\n")
    config.write_text(text)


@pytest.mark.parametrize(("key", "value"), [
    ("key_holders", "[3]"),  # the site would encrypt to site 3's key (a colluder's)
    ("min_sites", "3"),
    ("preset", '"add-only-8192"'),
    ("id", '"job-2"'),
    ("rounds", "50"),
    ("clip_norm", "100.0"),
    ("max_samples", "10.0"),
    ("server_learning_rate", "2.0"),
    ("initial_model_digest", '"' + "ab" * 32 + '"'),  # a model of the carrier's choosing
    ("protocol", '"masking"')])
def test_a_shared_setting_changed_in_transit_is_refused(tmp_path: Path, key: str,
                                                        value: str) -> None:
    """The config's shared settings are signed by the trust root (settings.sig): whoever
    carries a site's files cannot change which site holds the CKKS key, the thresholds, the
    job or the model it starts from."""
    model = tmp_path / "m.npz"
    np.savez(model, w=np.zeros(4, np.float32))  # type: ignore[arg-type]
    init_federation(tmp_path / "fed", 5, protocol="ckks", key_holders=(1,),
                    initial_model=model)
    site = tmp_path / "fed" / "sites" / "site-2"
    SiteKit.load(site)
    _edit(site / "federation.toml", key, value)
    with pytest.raises(ConfigurationError, match="not the ones the federation's trust root "
                                                 "signed") as caught:
        SiteKit.load(site)
    assert "sign-config" in str(caught.value)


@pytest.mark.parametrize(("key", "value"), [
    ("threshold", "5"), ("corrupt_fraction", "0.0"), ("neighbors", '"auto"'),
    ("dropout_rate", "0.3"), ("word_bits", "64")])
def test_a_masking_setting_changed_in_transit_is_refused(real: Path, key: str,
                                                         value: str) -> None:
    site = real / "sites" / "site-3"
    _edit(site / "federation.toml", key, value)
    with pytest.raises(ConfigurationError, match="not the ones the federation's trust root"):
        SiteKit.load(site)


@pytest.mark.parametrize(("key", "value"), [
    ("aggregator", '"agg.internal:443"'), ("stage", "120.0"), ("upload_slots", "2"),
    ("stream_idle_seconds", "30.0")])
def test_a_sites_own_settings_stay_its_own(real: Path, key: str, value: str) -> None:
    """Addresses, deadlines and limits are each party's own: a site behind a proxy points its
    config elsewhere without the federation's signer."""
    site = real / "sites" / "site-3"
    _edit(site / "federation.toml", key, value)
    assert SiteKit.load(site).site_id == 3


def test_a_settings_signature_is_the_trust_roots_over_these_settings(real: Path) -> None:
    site = real / "sites" / "site-1"
    (site / "settings.sig").unlink()
    with pytest.raises(ConfigurationError, match=r"lacks settings\.sig") as caught:
        SiteKit.load(site)
    assert "sign-config" in str(caught.value)
    # the roster's signature (the same key's, over its own labelled bytes) is no settings one
    from secagg.federation.kit import roster_from_bytes

    signed = roster_from_bytes((site / "roster.bin").read_bytes())
    (site / "settings.sig").write_text(json.dumps({"signature": signed.signature.hex()}))
    with pytest.raises(ConfigurationError, match="not the ones the federation's trust root"):
        SiteKit.load(site)
    # another site's settings.sig of the federation is the same: it signs settings, no site
    shutil.copy(real / "sites" / "site-2" / "settings.sig", site / "settings.sig")
    assert SiteKit.load(site).site_id == 1
    for damage in ("", "{}", '{"signature": "zz"}', "[1]"):
        (site / "settings.sig").write_text(damage)
        with pytest.raises(ConfigurationError, match="not the ones the federation's trust"):
            SiteKit.load(site)


def test_the_operator_signs_a_changed_setting_with_sign_config(
        real: Path, forged: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A new job: the operator changes [job] id in the federation's config and signs it; a
    site given the new config and settings.sig loads it, and one given the new config alone
    is refused."""
    _edit(real / "federation.toml", "id", '"job-2"')
    site = real / "sites" / "site-2"
    shutil.copy(real / "federation.toml", site / "federation.toml")
    with pytest.raises(ConfigurationError, match="not the ones"):
        SiteKit.load(site)
    assert main(["federation", "sign-config", "--dir", str(real)]) == 0
    assert "settings.sig" in capsys.readouterr().out
    shutil.copy(real / "settings.sig", site / "settings.sig")
    assert SiteKit.load(site).config.job_id == "job-2"
    # a config naming another federation's trust root is not signed with this one's key
    with pytest.raises(ConfigurationError, match="another trust root"):
        sign_settings(real, forged / "federation.toml")


def _state(site: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in site.iterdir() if p.is_file()}


def test_install_takes_exactly_what_sign_wrote(real: Path, forged: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`federation install` puts the five files `sign` writes into the site directory, and
    nothing else: a parcel with a file added (a kept CKKS round key of the carrier's making,
    which the key holder then announced as its own; a history.json that forgot the newest
    roster and every model sent against) is refused whole, as is a federation of the
    carrier's making; each time the directory is left as it was."""
    site = tmp_path / "site-5"
    request = make_site_request(site, 5, trust_root=_root(real))
    out = sign_site_request(real, request, tmp_path / "out", add_site=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(RETURNED)
    for planted in ("ckks-round-key-0123456789abcdef.json", "history.json"):
        parcel = tmp_path / f"parcel-{planted}"
        shutil.copytree(out, parcel)
        (parcel / planted).write_text("{}")
        before = _state(site)
        assert main(["federation", "install", "--dir", str(site), "--from", str(parcel)]) == 2
        err = capsys.readouterr().err
        assert planted in err and "never writes" in err
        assert _state(site) == before
    forged_out = sign_site_request(forged, request, tmp_path / "forged-out", add_site=True)
    before = _state(site)
    assert main(["federation", "install", "--dir", str(site), "--from", str(forged_out)]) == 2
    assert "another federation's" in capsys.readouterr().err
    assert _state(site) == before  # (the files it wrote first taken back)
    assert main(["federation", "install", "--dir", str(site), "--from", str(out)]) == 0
    assert "site 5" in capsys.readouterr().out
    assert SiteKit.load(site).roster.version == 2
    Site.connect(site).close()


def test_install_refuses_a_roster_or_settings_older_than_used(real: Path,
                                                              tmp_path: Path) -> None:
    site = tmp_path / "site-5"
    request = make_site_request(site, 5, trust_root=_root(real))
    first = sign_site_request(real, request, tmp_path / "first", add_site=True)
    install_signed_files(site, first, check=_used_before)  # roster version 2
    remove_site(real, 4)  # version 3, which the operator sends every site
    shutil.copy(real / "roster.bin", site / "roster.bin")
    Site.connect(site).close()  # version 3 recorded
    # the carrier sends the first parcel again (its roster still names site 4)
    with pytest.raises(ConfigurationError, match="version 2, older than version 3"):
        install_signed_files(site, first, check=_used_before)
    assert SiteKit.load(site).roster.version == 3


def _used_before(kit: SiteKit) -> None:
    from clients.site import check_used_before

    check_used_before(kit)


def test_older_signed_settings_than_used_are_refused(real: Path) -> None:
    """The operator hardened the settings (a higher threshold) and signed them; the site
    used them. The carrier puts back the earlier config with its (valid) settings.sig: the
    signed serial is older than the site used, and refused."""
    site = real / "sites" / "site-1"
    old_config, old_sig = (site / "federation.toml").read_bytes(), (site / "settings.sig"
                                                                    ).read_bytes()
    Site.connect(site).close()  # serial 1
    _edit(real / "federation.toml", "threshold", "4")
    assert main(["federation", "sign-config", "--dir", str(real)]) == 0
    for name in ("federation.toml", "settings.sig"):
        shutil.copy(real / name, site / name)
    with Site.connect(site) as connected:  # serial 2, recorded
        assert connected.kit.settings_serial == 2
    (site / "federation.toml").write_bytes(old_config)
    (site / "settings.sig").write_bytes(old_sig)
    assert SiteKit.load(site).settings_serial == 1  # validly signed, but
    with pytest.raises(ConfigurationError, match="serial 1, older than serial 2"):
        Site.connect(site)


def test_a_settings_serial_raised_in_transit_is_refused(real: Path) -> None:
    """The carrier keeps the settings and their (valid) signature but raises the serial in
    settings.sig, so that settings the operator has since replaced would pass a site's
    "not older than used" check: the signature binds the serial, and the file is refused."""
    site = real / "sites" / "site-1"
    assert SiteKit.load(site).settings_serial == 1
    record = json.loads((site / "settings.sig").read_text())
    record["serial"] = 99
    (site / "settings.sig").write_text(json.dumps(record))
    with pytest.raises(ConfigurationError, match="trust root signed"):
        SiteKit.load(site)


def test_sign_sends_only_settings_the_operator_signed(real: Path, tmp_path: Path) -> None:
    """An edit of the federation's config not yet signed is not signed unseen by the next
    `sign` (it signed whatever the config said)."""
    _edit(real / "federation.toml", "threshold", "4")
    request = make_site_request(tmp_path / "site-5", 5, trust_root=_root(real))
    with pytest.raises(ConfigurationError, match="sign-config"):
        sign_site_request(real, request, tmp_path / "out", add_site=True)
    assert not (tmp_path / "out").exists()
    assert main(["federation", "sign-config", "--dir", str(real)]) == 0
    out = sign_site_request(real, request, tmp_path / "out", add_site=True)
    assert json.loads((out / "settings.sig").read_text())["serial"] == 2


def test_sign_sends_the_settings_sig_it_verified_not_a_second_read(
        real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """settings.sig changes on disk just after `sign` verified it (another operator's
    sign-config, or a carrier's edit): the parcel holds the bytes sign verified, not a second
    read of the file (which sent a site settings.sig bytes nobody checked)."""
    import secagg.federation.kit as kit

    verified = kit._verified_settings_sig
    signed = (real / "settings.sig").read_bytes()

    def then_changed(d: Path, config: FederationConfig) -> tuple[int, bytes]:
        answer = verified(d, config)
        (d / "settings.sig").write_bytes(b'{"serial": 99, "changed": "after the check"}')
        return answer

    monkeypatch.setattr(kit, "_verified_settings_sig", then_changed)
    request = make_site_request(tmp_path / "site-5", 5, trust_root=_root(real))
    out = sign_site_request(real, request, tmp_path / "out", add_site=True)
    assert (out / "settings.sig").read_bytes() == signed


def test_a_rotation_is_installed_into_the_sites_own_directory_and_keeps_its_history(
        real: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Installed into the rotation's new directory, the site started again with no history
    (no record of the roster it used, of the rounds it sent to, of the models it sent
    against), and the carrier's old roster was taken (a helper's attack). `install --key`
    takes the new TLS key into the site's own directory beside its identity key and
    history; a refusal leaves its old key."""
    site = real / "sites" / "site-2"
    old_key = (site / "client.key").read_bytes()
    Site.connect(site).close()  # history: roster 1
    old_roster = (site / "roster.bin").read_bytes()
    remove_site(real, 4)
    shutil.copy(real / "roster.bin", site / "roster.bin")
    Site.connect(site).close()  # history: roster 2
    new = tmp_path / "rotation"
    request = make_site_request(new, 2, trust_root=_root(real),
                                identity_key=site / "identity.key")
    out = sign_site_request(real, request, tmp_path / "out")
    assert main(["federation", "install", "--dir", str(new), "--from", str(out)]) == 2
    assert "--key" in capsys.readouterr().err  # (the rotation's directory holds no identity)
    stale = tmp_path / "stale"  # the parcel with the carrier's old roster
    shutil.copytree(out, stale)
    (stale / "roster.bin").write_bytes(old_roster)
    assert main(["federation", "install", "--dir", str(site), "--from", str(stale), "--key",
                 str(new / "client.key")]) == 2
    assert "older than version" in capsys.readouterr().err
    assert (site / "client.key").read_bytes() == old_key
    # without --key, the parcel's certificate is not for the site's key, and it says so
    assert main(["federation", "install", "--dir", str(site), "--from", str(out)]) == 2
    assert "for a rotation, give the new key: --key" in capsys.readouterr().err
    # a --key that is no key, or the directory's own key, is named as such
    (tmp_path / "not-a-key").write_text("hello")
    (tmp_path / "not-a-key").chmod(0o600)
    assert main(["federation", "install", "--dir", str(site), "--from", str(out), "--key",
                 str(tmp_path / "not-a-key")]) == 2
    assert "is not an unencrypted PEM private key" in capsys.readouterr().err
    assert main(["federation", "install", "--dir", str(site), "--from", str(out), "--key",
                 str(site / "client.key")]) == 2
    assert "own client.key" in capsys.readouterr().err
    assert (site / "client.key").read_bytes() == old_key
    rotated = (new / "client.key").read_bytes()
    assert main(["federation", "install", "--dir", str(site), "--from", str(out), "--key",
                 str(new / "client.key")]) == 0
    assert (site / "client.key").read_bytes() == rotated
    assert (site / "client.key").stat().st_mode & 0o077 == 0
    assert not (new / "client.key").exists()  # (moved: a private key lives in one place)
    Site.connect(site).close()


def test_a_second_roster_of_one_version_is_refused(real: Path, tmp_path: Path) -> None:
    """A sign cut short after writing its parcel left a roster of version n+1 (naming a new
    site); the operator's next remove-site made another version n+1. A site that used the
    latter took the former, with the removed site back in it."""
    import secagg.federation.kit as kit_module

    site = real / "sites" / "site-1"
    request = make_site_request(tmp_path / "site-9", 9, trust_root=_root(real))
    real_write = kit_module.pki.write_public

    def full_disk(path: Path, data: bytes) -> None:
        if path == real / "roster.bin":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    kit_module.pki.write_public = full_disk  # type: ignore[assignment]
    try:
        with pytest.raises(OSError):
            sign_site_request(real, request, tmp_path / "cut-short", add_site=True)
    finally:
        kit_module.pki.write_public = real_write  # type: ignore[assignment]
    remove_site(real, 4)  # version 2 too
    shutil.copy(real / "roster.bin", site / "roster.bin")
    Site.connect(site).close()
    shutil.copy(tmp_path / "cut-short" / "roster.bin", site / "roster.bin")
    assert load_roster(site / "roster.bin", _root(real)).version == 2
    with pytest.raises(ConfigurationError, match="not the version-2 roster"):
        Site.connect(site)


def test_the_settings_serial_survives_a_lost_counter_and_a_bad_one_is_refused(
        real: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The counter lost (a directory rebuilt from the offline keys) restarted at 1: a second
    settings of serial 2 passed a site that had used the first."""
    _edit(real / "federation.toml", "threshold", "4")
    assert main(["federation", "sign-config", "--dir", str(real)]) == 0
    out = capsys.readouterr().out
    assert "as serial 2" in out and "threshold 4" in out and "corrupt_fraction 0.2" in out
    (real / "trust-root" / "settings.serial").unlink()
    _edit(real / "federation.toml", "corrupt_fraction", "0.1")
    assert main(["federation", "sign-config", "--dir", str(real)]) == 0
    assert "as serial 3" in capsys.readouterr().out  # (from the federation's settings.sig)
    for bad in ("-7", "x", ""):
        (real / "trust-root" / "settings.serial").write_text(bad)
        assert main(["federation", "sign-config", "--dir", str(real)]) == 2
        assert "not a positive integer" in capsys.readouterr().err


def test_remove_site_refuses_to_leave_settings_the_roster_cannot_take(real: Path) -> None:
    """threshold = 4 of 4 sites; removing one left a threshold no site could take, and every
    site refused it at connect."""
    _edit(real / "federation.toml", "threshold", "4")
    sign_settings(real)
    with pytest.raises(ConfigurationError, match="without site 4, the federation's "
                                                 "settings do not fit"):
        remove_site(real, 4)
    assert load_roster(real / "roster.bin", _root(real)).version == 1


def test_a_request_sent_again_is_not_signed_again(real: Path, tmp_path: Path) -> None:
    """A request carries no date: sent again after the site rotated (its first, or the one
    before the rotation), it certified again the key the site had given up, which rotation
    is the remedy for (a helper's attack)."""
    site = tmp_path / "site-5"
    request = make_site_request(site, 5, trust_root=_root(real))
    sign_site_request(real, request, tmp_path / "first", add_site=True)
    with pytest.raises(ConfigurationError, match="certified before"):
        sign_site_request(real, request, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    rotation = make_site_request(tmp_path / "rotation", 5, trust_root=_root(real),
                                 identity_key=site / "identity.key")
    sign_site_request(real, rotation, tmp_path / "rotated")
    with pytest.raises(ConfigurationError, match="certified before"):
        sign_site_request(real, request, tmp_path / "old-one")
    # and a key init certified is not certified again either
    with pytest.raises(ConfigurationError, match="certified before"):
        sign_site_request(real, _request_for_key(real, 1, tmp_path), tmp_path / "init-key")


def _request_for_key(fed: Path, site_id: int, tmp_path: Path) -> Path:
    """A request of site ``site_id`` (its identity key) for the TLS key init gave it."""
    from cryptography.hazmat.primitives import serialization

    from secagg.federation import pki
    from secagg.federation.kit import _request_message, load_identity

    d = fed / "sites" / f"site-{site_id}"
    tls = serialization.load_pem_private_key((d / "client.key").read_bytes(), None)
    csr = pki.make_csr(site_id, tls)  # type: ignore[arg-type]
    identity = load_identity(d / "identity.key")
    der = csr.public_bytes(serialization.Encoding.DER)
    path = tmp_path / f"request-{site_id}.json"
    path.write_text(json.dumps({
        "site_id": site_id, "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "identity_public_key": identity.public_bytes.hex(),
        "identity_signature": identity.sign(_request_message(site_id, der)).hex()}))
    return path


def test_ckks_settings_are_checked_against_the_roster_where_they_are_signed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sign-config and remove-site checked masking settings only: min_sites 4 was left for
    a roster of 3, and key_holders = [9] signed with no site 9."""
    model = tmp_path / "m.npz"
    np.savez(model, w=np.zeros(4, np.float32))  # type: ignore[arg-type]
    fed = tmp_path / "fed"
    init_federation(fed, 4, protocol="ckks", key_holders=(1,), initial_model=model)
    _edit(fed / "federation.toml", "key_holders", "[9]")
    with pytest.raises(ConfigurationError, match="key_holders names site 9"):
        sign_settings(fed)
    _edit(fed / "federation.toml", "key_holders", "[1]")
    _edit(fed / "federation.toml", "min_sites", "4")
    assert main(["federation", "sign-config", "--dir", str(fed)]) == 0
    out = capsys.readouterr().out
    assert "serial 2:" in out and "min_sites 4" in out and "key holders [1]" in out
    with pytest.raises(ConfigurationError, match="without site 4, the federation's settings "
                                                 "do not fit"):
        remove_site(fed, 4)
    site = fed / "sites" / "site-2"
    for name in ("federation.toml", "settings.sig"):
        shutil.copy(fed / name, site / name)
    assert SiteKit.load(site).settings_serial == 2


@pytest.mark.parametrize("root", [bytes(31), bytes(33), b""])
def test_a_trust_root_given_as_bytes_of_another_length_is_refused_before_a_key_is_written(
        tmp_path: Path, root: bytes) -> None:
    site = tmp_path / "site-5"
    with pytest.raises(ConfigurationError, match="a trust root is 64 hex digits"):
        make_site_request(site, 5, trust_root=root)
    assert not site.exists() or not any(site.iterdir())


@pytest.mark.parametrize("serial", [0, -1, 2**63])
def test_a_settings_serial_out_of_range_is_refused(real: Path, serial: int) -> None:
    """A serial is in [1, 2**63): 0 (or below) signed by the trust root is no serial a site
    records, and one of 2**63, which no signature can cover, raised OverflowError out of
    SiteKit.load (the carrier writes settings.sig)."""
    from secagg.federation.kit import _federation_signer, _settings_sig_bytes

    site = real / "sites" / "site-1"
    config = FederationConfig.load(site / "federation.toml")
    if serial < 2**63:  # signed by the federation's own signer
        data = _settings_sig_bytes(
            config, _federation_signer(real, FederationConfig.load(real / "federation.toml")),
            serial)
    else:
        data = json.dumps({"serial": serial, "signature": "00" * 64}).encode()
    (site / "settings.sig").write_bytes(data)
    with pytest.raises(ConfigurationError, match="not the ones the federation's trust root"):
        SiteKit.load(site)


def test_install_refuses_a_parcel_holding_a_link(real: Path, tmp_path: Path) -> None:
    """A parcel's file that is a symbolic link (to the genuine file, or anywhere) is refused:
    a parcel is files, and a link leads wherever its maker chose."""
    site = tmp_path / "site-5"
    request = make_site_request(site, 5, trust_root=_root(real))
    out = sign_site_request(real, request, tmp_path / "out", add_site=True)
    parcel = tmp_path / "parcel"
    parcel.mkdir()
    for name in RETURNED:
        if name == "ca.crt":
            (parcel / name).symlink_to(out / name)
        else:
            shutil.copy(out / name, parcel / name)
    before = _state(site)
    with pytest.raises(ConfigurationError, match=r"ca\.crt is not a regular file"):
        install_signed_files(site, parcel)
    assert _state(site) == before
    assert install_signed_files(site, out).site_id == 5


def test_a_pin_signature_over_the_bare_trust_root_is_refused(real: Path) -> None:
    """A pin's signature is over its labelled message (PIN_CONTEXT + the root): the site's
    identity key's signature over the 32 bytes alone, made for anything else, is no pin."""
    from secagg.federation.kit import load_identity

    site = real / "sites" / "site-1"
    identity = load_identity(site / "identity.key")
    root = _root(real)
    (site / PIN_FILE).write_text(json.dumps(
        {"trust_root": root.hex(), "signature": identity.sign(root).hex()}))
    with pytest.raises(ConfigurationError, match="not a trust root pinned"):
        SiteKit.load(site)


def test_the_federation_name_changed_in_transit_is_refused(real: Path) -> None:
    """The name starts every round id ("name/job/round-n"): renamed by the carrier, a site
    would take rounds under ids it never used (a rerun of a round it took part in, under a
    new name). It is one of the settings the trust root signs."""
    site = real / "sites" / "site-3"
    _edit(site / "federation.toml", "name", '"other"')
    with pytest.raises(ConfigurationError, match="not the ones the federation's trust root"):
        SiteKit.load(site)
