"""A store URL that holds a password, given on the command line, is warned about: every local
user reads a process's command line (ps, /proc). It is taken, as before (refusing would stop a
running deployment at its next restart); the warning names the remedy, never the password."""

from __future__ import annotations

import contextlib
import json
import secrets

import pytest

from aggregator.store import holds_secret, warn_secret_on_command_line
from secagg.cli import main

PASSWORD = secrets.token_hex(12)  # made at test time, as every test secret is


@pytest.mark.parametrize(("url", "secret"), [
    (f"postgresql://secagg:{PASSWORD}@127.0.0.1:1/db", True),
    (f"postgresql://secagg@127.0.0.1:1/db?password={PASSWORD}", True),
    (f"postgresql+psycopg://secagg@127.0.0.1:1/db?sslpassword={PASSWORD}", True),
    ("postgresql://secagg@127.0.0.1:1/db?sslkey=/etc/key.pem", False),
    # a raw '@' in the password: SQLAlchemy split at the first, and showed the rest as host
    (f"postgresql://secagg:{PASSWORD[:8]}@{PASSWORD[8:]}@127.0.0.1:1/db", True),
    (f"postgresql://secagg:{PASSWORD[:8]}@/{PASSWORD[8:]}@127.0.0.1:1/db", True),
    (f"postgresql://secagg:{PASSWORD[:8]}@?{PASSWORD[8:]}@127.0.0.1:1/db", True),
    (f"postgresql://secagg:{PASSWORD}@127.0.0.1:notaport/db", True),
    ("postgresql://secagg@127.0.0.1:notaport/db", False),
    ("postgresql://secagg@127.0.0.1:1/db", False),
    ("/var/lib/secagg/store.db", False),
    ("sqlite:///store.db", False),
])
def test_a_password_in_the_store_url_is_found(url: str, secret: bool) -> None:
    assert holds_secret(url) is secret
    said: list[str] = []
    warn_secret_on_command_line(url, said.append)
    assert len(said) == secret
    assert not any(part in text for text in said for part in (PASSWORD[:8], PASSWORD[8:]))
    assert all("PGPASSWORD" in text for text in said)


@pytest.mark.parametrize("command", [["migrate"], ["backup", "--out", "{tmp}/b.dump"],
                                     ["restore", "--backup", "{tmp}/b.dump"]])
def test_the_store_commands_warn_of_a_password_on_their_command_line(
        command: list[str], tmp_path: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://secagg:{PASSWORD}@127.0.0.1:1/db?connect_timeout=1"
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main(["aggregator", *args[:1], "--store", url, *args[1:]]) != 0  # nothing there
    err = capsys.readouterr().err
    assert "warning: the store URL" in err and "PGPASSWORD" in err and PASSWORD not in err


def test_serve_logs_a_password_on_its_command_line_as_an_event(
        tmp_path: pytest.TempPathFactory, capfd: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://secagg:{PASSWORD}@127.0.0.1:1/db"
    # (no such config: serve stops there, after the warning)
    assert main(["aggregator", "serve", "--config", f"{tmp_path}/none.toml", "--store",
                 url]) != 0
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()
             if line.startswith("{")]
    events = [e for e in lines if e.get("event") == "store_password_on_command_line"]
    assert len(events) == 1 and events[0]["level"] == "warning"
    assert PASSWORD not in json.dumps(lines)


@pytest.mark.parametrize("command", ["migrate", "migrate-again", "backup", "restore"])
def test_what_a_store_command_prints_names_the_store_without_its_password(
        command: str, tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Their output goes to cron mail and CI logs: each names the store as redacted."""
    from aggregator import store

    url = f"postgresql://secagg:{PASSWORD}@127.0.0.1:1/db"
    revisions = ("0002", "0002") if command == "migrate-again" else (None, "0002")
    monkeypatch.setattr(store, "migrate", lambda _url: revisions)
    # (migrate holds the store's serving lease for its run: none to take here)
    monkeypatch.setattr(store, "not_served", lambda _url: contextlib.nullcontext())
    monkeypatch.setattr(store, "backup", lambda _url, _out: 1234)
    monkeypatch.setattr(store, "restore", lambda _backup, _url: None)
    args = {"migrate": ["migrate"], "migrate-again": ["migrate"],
            "backup": ["backup", "--out", f"{tmp_path}/b.dump"],
            "restore": ["restore", "--backup", f"{tmp_path}/b.dump"]}[command]
    assert main(["aggregator", *args, "--store", url]) == 0
    out, err = capsys.readouterr()
    assert "127.0.0.1" in out and PASSWORD not in out + err


def test_serve_publishes_metrics_on_loopback_unless_told_otherwise() -> None:
    """/metrics is plain HTTP with no client certificate: the command's default is the local
    host, never every interface."""
    import ipaddress

    from secagg.cli import build_parser

    args = build_parser().parse_args(["aggregator", "serve", "--config", "x.toml"])
    host = args.metrics.rpartition(":")[0].strip("[]")
    assert ipaddress.ip_address(host).is_loopback


@pytest.mark.parametrize("url", [f"postgresql://secagg:{PASSWORD}",
                                 f"postgresql://secagg:{PASSWORD}@127.0.0.1:{PASSWORD}/db",
                                 "postgresql://secagg@127.0.0.1:99999/db"])
@pytest.mark.parametrize("command", [["migrate"], ["backup", "--out", "{tmp}/b.dump"]])
def test_a_store_url_with_a_bad_port_is_named_never_its_password(
        url: str, command: list[str], tmp_path: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    # ("postgresql://user:password", no host: the password was read as the port, and
    # SQLAlchemy's ValueError quoted it: "invalid literal for int() with base 10: '...'")
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main(["aggregator", *args[:1], "--store", url, *args[1:]]) == 2
    err = capsys.readouterr().err
    assert PASSWORD not in err and "ValueError" not in err
    assert err.splitlines()[-1].startswith("secagg: error: the store URL cannot be parsed: "
                                           "its port")
