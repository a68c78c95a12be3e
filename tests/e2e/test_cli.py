from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from secagg.cli import main

PIN = ["--trust-root", "ab" * 32]  # what csr pins (a federation's trust root)


def test_demo_runs_and_reports_a_bounded_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--sites", "6", "--params", "2000", "--dropout", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "survivors:" in out and "will drop out" in out
    err = float(out.split("plaintext average| = ")[1].split()[0])
    bound = float(out.split("quantisation bound ")[1].rstrip(")\n"))
    assert err <= bound


def test_bench_masking_prints_the_promised_fields() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "secagg.cli", "bench", "masking", "--clients", "6", "--params",
         "5000", "--dropout", "0.2", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    out = json.loads(proc.stdout)
    for key in ("clients", "params", "dropout", "round_s", "client_mask_s", "server_s",
                "aes_keystream_s", "plain_sum_s", "limit_ratio"):
        assert key in out
    assert out["clients"] == 6 and out["survivors"] == 5
    assert out["limit_ratio"] == pytest.approx(
        out["round_s"] / (out["aes_keystream_s"] + out["plain_sum_s"]))
    assert out["max_abs_error"] <= out["error_bound"]


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_bench_service_prints_the_promised_fields(protocol: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "secagg.cli", "bench", "service", "--protocol", protocol,
         "--clients", "3", "--params", "2000", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    out = json.loads(proc.stdout)
    assert out["protocol"] == protocol and out["clients"] == 3
    assert out["overhead_ratio"] == pytest.approx(out["round_s"] / out["inproc_round_s"])
    assert out["ingest_ratio"] == pytest.approx(out["ingest_mbps"] / out["grpc_sink_mbps"])
    assert out["transport_floor_ratio"] == pytest.approx(
        out["transport_floor_s"] / out["inproc_round_s"])
    # every site sent its update and received at least the model it started from
    assert out["bytes_per_site"] > 2000 and out["transport_floor_s"] > 0
    assert out["sites_cpu_s"] > 0 and out["aggregator_cpu_s"] >= 0
    assert out["aggregator_peak_rss_mb"] > 10


@pytest.mark.parametrize("argv", [["simulate", "--sites", "0"], ["simulate", "--dropout", "1.5"],
                                  ["bench", "masking", "--clients", "-3"],
                                  # (numpy's "expected non-negative integer", from inside)
                                  ["simulate", "--seed", "-5"],
                                  ["bench", "masking", "--seed", "-1"]])
def test_bad_arguments_give_a_usage_error_not_a_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("bench", ["masking", "ckks", "service"])
def test_a_benchmark_of_more_sites_than_a_federation_has_is_a_usage_error(
        bench: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench masking --clients 99999999999` ran silently, its memory growing until the
    machine ran out. (Parsed only: nothing runs, with or without the bound.)"""
    from secagg.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench", bench, "--clients", "10000"]).clients == 10_000
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["bench", bench, "--clients", "99999999999"])
    assert caught.value.code == 2
    assert "at most 10000" in capsys.readouterr().err
    for few in ("1", "2"):  # (refused from inside, naming --sites or the roster)
        with pytest.raises(SystemExit) as caught:
            parser.parse_args(["bench", bench, "--clients", few])
        assert caught.value.code == 2
        assert "--clients: must be at least 3" in capsys.readouterr().err
    assert parser.parse_args(["bench", bench, "--clients", "3"]).clients == 3


def test_version_is_the_packages(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"secagg {version('secagg')}"


def test_python_dash_m_secagg_is_the_command() -> None:
    """`python -m secagg` ran nothing ("No module named secagg.__main__"): the way to run a
    package's command where its scripts directory is not on PATH."""
    import sys

    from secagg import __version__

    proc = subprocess.run([sys.executable, "-m", "secagg", "--version"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and __version__ in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "secagg", "nonsense"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2 and proc.stderr.startswith("usage: secagg")


def test_log_levels_are_taken_in_either_case() -> None:
    """`--log-level INFO`, as operators copy level names, was "invalid choice"."""
    from secagg.cli import build_parser

    for given in ("INFO", "Warning", "debug"):
        args = build_parser().parse_args(["aggregator", "serve", "--config", "f.toml",
                                          "--log-level", given])
        assert args.log_level == given.lower()


def test_unsafe_configuration_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "masking", "--clients", "10", "--params", "10", "--threshold", "3"]) == 2
    assert "threshold must be in" in capsys.readouterr().err


def test_ckks_demo_releases_an_average_close_to_plaintext(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["simulate", "--protocol", "ckks", "--sites", "4", "--params", "3000"]) == 0
    out = capsys.readouterr().out
    assert "no secret key" in out and "sealed to it" in out
    err = float(out.split("plaintext average| = ")[1].split(";")[0])
    assert err < 2e-4  # flooding noise of the release (secagg/ckks/release.py)


def test_bench_ckks_prints_ours_and_nvflare_figures_as_clean_json() -> None:
    proc = subprocess.run(
        # 6143 values + the weight fill exactly 3 chunks of 2048 slots: no padding in the figure
        [sys.executable, "-m", "secagg.cli", "bench", "ckks", "--clients", "3", "--params",
         "6143", "--seeded", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    out = json.loads(proc.stdout)  # TenSEAL's warnings must not reach stdout
    flare = out["nvflare_as_provisioned"]
    for key in ("bytes_per_value", "encrypt_s", "aggregate_s", "decrypt_s", "max_abs_error"):
        assert key in out and key in flare
    for key in ("bytes_per_value", "encrypt_s", "aggregate_s"):
        assert out[f"{key}_ratio_vs_nvflare"] == pytest.approx(out[key] / flare[key])
    # ours is measured through the release (not a bare decrypt), against FLARE's decrypt
    assert out["release_ratio_vs_nvflare_decrypt"] == pytest.approx(
        out["release_s"] / flare["decrypt_s"])
    assert flare["max_abs_error"] < 1e-3  # FLARE's pipeline really ran (average x weight)
    assert out["bytes_per_value"] <= 15 and out["max_abs_error"] < 1e-6


def test_bench_ckks_unknown_preset_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ckks", "--clients", "3", "--params", "10", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_an_os_error_is_one_line_not_a_traceback(tmp_path, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
                                                 ) -> None:
    """What a command does not turn into a clear error itself (here: a site's --dir under
    a file, a backup that is a directory) is one line naming the cause, never a traceback
    from deep inside."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for argv in (["federation", "csr", "--dir", str(not_a_dir / "site"), "--site", "1", *PIN],
                 ["aggregator", "restore", "--backup", str(tmp_path), "--store",
                  str(tmp_path / "r.db")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("secagg: error: ") and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_out_of_memory_is_one_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --params 100000000000` asked numpy for 800 GB: a traceback, exit 1."""
    import argparse

    from secagg import cli

    def huge(_: argparse.Namespace) -> int:
        raise MemoryError

    class Parser:
        def parse_args(self, argv: object) -> argparse.Namespace:
            return argparse.Namespace(func=huge)

    monkeypatch.setattr(cli, "build_parser", Parser)
    monkeypatch.delenv("SECAGG_DEBUG", raising=False)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secagg: error: out of memory") and "Traceback" not in err


def test_too_few_sites_for_a_sparse_graph_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """5 sites with --neighbors 3 said "neighbors must be in [4, 3]", an empty range."""
    assert main(["bench", "masking", "--clients", "5", "--params", "10", "--neighbors", "4"]) == 2
    assert "too few for a sparse graph" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--listen", "127.0.0.1:99999"],
                                   ["--metrics", "127.0.0.1:70000"],
                                   ["--listen", "no-port"]])
def test_an_address_out_of_range_is_one_line_before_anything_binds(
        flags: list[str], capfd: pytest.CaptureFixture[str]) -> None:
    """--metrics HOST:70000 was a traceback (OverflowError from bind), and --listen
    HOST:99999 bound another port silently (gRPC took 99999 - 65536)."""
    assert main(["aggregator", "serve", "--config", "/nonexistent.toml", *flags]) == 2
    err = capfd.readouterr().err
    assert f"{flags[0]} must be HOST:PORT" in err and "Traceback" not in err


def test_a_missing_identity_key_for_csr_is_named_as_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["federation", "csr", "--dir", str(tmp_path / "new"), "--site", "3",
                 *PIN,
                 "--identity", str(tmp_path / "nope.key")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secagg: error: cannot read --identity ") and "No such file" in err
    assert err.count("\n") == 1


def test_an_empty_store_for_serve_is_refused_before_anything_binds(tmp_path: Path) -> None:
    """`--store "$DB_URL"` with the variable unset served on the default aggregator.db beside
    the config, silently (a PostgreSQL deployment would start a fresh SQLite job)."""
    from tests.service_kit import make_federation

    fed = make_federation(tmp_path, sites=3)
    try:  # (a serve that took the default would serve on: killed at the timeout)
        proc = subprocess.run(
            [sys.executable, "-m", "secagg.cli", "aggregator", "serve", "--config",
             str(fed.aggregator_config), "--store", "", "--metrics", "off"],
            capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("serve ran with an empty --store")
    assert proc.returncode == 2 and "the store is empty" in proc.stderr
    assert not (fed.aggregator_config.parent / "aggregator.db").exists()


def test_migrate_says_when_it_made_a_new_store(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --store path was made into a new store, and migrate said only
    "(empty) -> 0002", as if it had upgraded the operator's store."""
    assert main(["aggregator", "migrate", "--store", str(tmp_path / "typo.db")]) == 0
    assert f"created a new store {tmp_path / 'typo.db'} (there was none)" in capsys.readouterr().out
    assert main(["aggregator", "migrate", "--store", str(tmp_path / "typo.db")]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_key_holders_for_a_masking_federation_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Taken with --protocol masking, and written to the config as if it meant something."""
    import numpy as np

    np.savez(tmp_path / "init.npz", w=np.zeros(4, np.float32))
    assert main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                 "--model", str(tmp_path / "init.npz"), "--key-holders", "2"]) == 2
    assert "--key-holders applies only to --protocol ckks" in capsys.readouterr().err
    assert not (tmp_path / "fed").exists()
    assert main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                 "--model", str(tmp_path / "init.npz"), "--protocol", "ckks",
                 "--key-holders", "2"]) == 0
    assert "key_holders = [\n    2,\n]" in (tmp_path / "fed" / "federation.toml").read_text() \
        or "key_holders = [2]" in (tmp_path / "fed" / "federation.toml").read_text()


def test_init_sets_max_samples_and_refuses_one_that_is_not_a_positive_number(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With weight=1 at every site (the README's advice for a sensitive sample count), the
    default max_samples of 10,000 made weights of 1e-4, too small for a CKKS release: an
    operator had to edit and re-sign every party's config. `init --max-samples` sets it."""
    import numpy as np

    from secagg.federation.kit import SiteKit

    np.savez(tmp_path / "init.npz", w=np.zeros(4, np.float32))
    for bad in ("0", "-1", "nan", "inf", "many"):
        with pytest.raises(SystemExit):
            main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                  "--model", str(tmp_path / "init.npz"), "--max-samples", bad])
        assert "--max-samples" in capsys.readouterr().err
        assert not (tmp_path / "fed").exists()
    assert main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                 "--model", str(tmp_path / "init.npz"), "--protocol", "ckks",
                 "--max-samples", "1"]) == 0
    assert SiteKit.load(tmp_path / "fed" / "sites" / "site-2").config.max_samples == 1.0


def test_init_sets_the_clip_and_the_rounds(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The clip (1.0 by default, far below ordinary updates) and the job's rounds could be
    set only by editing every party's config and re-signing it: `init --clip-norm` and
    `--rounds` set them, and refuse values that are not numbers of their kind."""
    import numpy as np

    from secagg.federation.kit import SiteKit

    np.savez(tmp_path / "init.npz", w=np.zeros(4, np.float32))
    for flag, bad in (("--clip-norm", "0"), ("--clip-norm", "nan"), ("--rounds", "0"),
                      ("--rounds", "2.5")):
        with pytest.raises(SystemExit):
            main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                  "--model", str(tmp_path / "init.npz"), flag, bad])
        assert flag in capsys.readouterr().err
        assert not (tmp_path / "fed").exists()
    assert main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                 "--model", str(tmp_path / "init.npz"), "--clip-norm", "5",
                 "--rounds", "7"]) == 0
    for party in ("sites/site-2",):
        config = SiteKit.load(tmp_path / "fed" / party).config
        assert (config.clip_norm, config.rounds) == (5.0, 7)
    assert "clip_norm = 5.0" in (tmp_path / "fed" / "aggregator" / "federation.toml").read_text()


@pytest.mark.parametrize("address", ["no-port", "host:99999", "host:", "host:5x", "host:65536",
                                     "host:\u0665\u0660\u0667\u0666\u0661"])
def test_a_bad_aggregator_address_is_named_as_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str) -> None:
    """It was "[federation] aggregator must be host:port": a key of a file not yet written."""
    import numpy as np

    np.savez(tmp_path / "init.npz", w=np.zeros(4, np.float32))
    assert main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                 "--model", str(tmp_path / "init.npz"), "--aggregator", address]) == 2
    assert capsys.readouterr().err == (f"secagg: error: --aggregator must be HOST:PORT with a "
                                       f"port in 1-65535, got {address!r}\n")
    assert not (tmp_path / "fed").exists()


def test_a_dropout_for_a_ckks_simulation_is_refused_not_ignored(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --protocol ckks --dropout 0.5` ran with every site taking part."""
    assert main(["simulate", "--protocol", "ckks", "--dropout", "0.5"]) == 2
    assert "--dropout applies only to --protocol masking" in capsys.readouterr().err


def test_output_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """`secagg threat-model controls --list | head -1` ended in "secagg: error:
    BrokenPipeError" and Python's own complaint as it flushed stdout."""
    controls = Path(__file__).resolve().parents[1] / "threat_model" / "controls.toml"
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=60)
    proc = subprocess.Popen([sys.executable, "-m", "secagg.cli", "threat-model", "controls",
                             "--list", "--repo", str(tmp_path), "--controls", str(controls)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # the listing is larger than the pipe's buffer
    proc.stdout.close()
    try:
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, err
    finally:
        proc.kill()
    assert err == ""


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_short_output_or_an_error_into_a_closed_pipe_stops_quietly(
        closed: str, tmp_path: Path) -> None:
    """Output small enough to sit in stdout's buffer met the closed pipe only as Python
    flushed it on the way out (its complaint, status 120); with stderr closed, the error
    message itself broke (status 120)."""
    import os

    read, write = os.pipe()
    os.close(read)  # closed before the command writes a byte
    log = tmp_path / "other.txt"
    argv = ([sys.executable, "-m", "secagg.cli", "simulate", "--sites", "3", "--params", "10"]
            if closed == "stdout" else
            [sys.executable, "-m", "secagg.cli", "simulate", "--protocol", "ckks",
             "--dropout", "0.1"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        with log.open("w") as other:
            streams = ({"stdout": write, "stderr": other} if closed == "stdout"
                       else {"stdout": other, "stderr": write})
            proc = subprocess.run(argv, timeout=120, env=env, **streams)  # type: ignore[call-overload]
    finally:
        os.close(write)
    assert proc.returncode == 141, log.read_text()
    assert log.read_text() == ""


@pytest.mark.parametrize("argv", [["simulate"], ["bench", "masking"], ["bench", "ckks"],
                                  ["bench", "service"]])
def test_more_params_than_a_round_holds_is_a_usage_error_naming_params(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --params 99999999999` said "vector_length must be in [1, 2**31 - 1]", naming
    no flag. (Parsed only: nothing runs, with or without the bound.)"""
    from secagg.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([*argv, "--params", str(2**31 - 1)]).params == 2**31 - 1
    with pytest.raises(SystemExit) as caught:
        parser.parse_args([*argv, "--params", str(2**31)])
    assert caught.value.code == 2
    assert "--params: must be at most 2**31 - 1" in capsys.readouterr().err


def test_an_os_error_names_the_file_not_a_python_class(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`federation csr --dir FILE` said "NotADirectoryError (FILE/client.key): Not a
    directory"."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert main(["federation", "csr", "--dir", str(not_a_dir), "--site", "1", *PIN]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"secagg: error: cannot use {not_a_dir}/client.key: Not a directory")
    assert "NotADirectoryError" not in err


def test_a_model_that_is_a_fifo_is_said_to_be_one_not_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`federation init --model FIFO` said "cannot read model FIFO: no such file"."""
    import os

    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)
    assert main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                 "--model", str(fifo)]) == 2
    assert capsys.readouterr().err.strip() == (f"secagg: error: cannot read model {fifo}: "
                                               "not a regular file")


def test_a_model_that_is_a_dangling_link_is_said_to_be_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A symbolic link to a removed model said "no such file" while `ls` shows the name."""
    link = tmp_path / "model.npz"
    link.symlink_to(tmp_path / "gone.npz")
    assert main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                 "--model", str(link)]) == 2
    assert capsys.readouterr().err.strip() == (f"secagg: error: cannot read model {link}: "
                                               "a symbolic link that leads nowhere")


def test_a_masking_benchmark_uses_no_more_workers_than_params(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`bench masking --params 1 --workers 200` raised "length must be >= processes" from
    inside the keystream split: the workers are clamped to the values."""
    assert main(["bench", "masking", "--clients", "3", "--params", "1", "--workers", "200",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workers"] == 1


def test_a_bad_value_in_a_config_file_names_the_file(tmp_path: Path) -> None:
    """An operator holds several configs: "[federation] protocol is missing" did not say
    which file lacked it."""
    from secagg.errors import ConfigurationError
    from secagg.federation.config import FederationConfig

    empty = tmp_path / "federation.toml"
    empty.write_text("")
    with pytest.raises(ConfigurationError) as caught:
        FederationConfig.load(empty)
    assert str(caught.value).startswith(f"{empty}: ") and "protocol" in str(caught.value)


@pytest.mark.parametrize(("argv", "says"), [
    (["simulate", "--sites", "100000"], "--sites: must be at most 10000"),
    (["bench", "masking", "--workers", "99999"], "--workers: must be at most 256"),
    (["bench", "ckks", "--workers", "257"], "--workers: must be at most 256"),
])
def test_counts_past_what_a_run_can_use_are_usage_errors(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --sites 100000` ran on and on; `bench masking --workers 99999` raised
    "length must be >= processes" from inside, and CKKS's said it used them."""
    from secagg.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("command", [["federation", "init", "--sites", "3", "--model", "m.npz"],
                                     ["federation", "csr", "--site", "4", *PIN],
                                     ["federation", "remove-site", "--site", "2"]])
@pytest.mark.parametrize("empty", ["", " "])
def test_an_empty_directory_argument_is_a_usage_error(
        command: list[str], empty: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An unset "$FED_DIR" made `--dir ""`, which was the working directory: `csr` wrote a
    site's private keys into wherever the operator stood."""
    from secagg.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([*command, "--dir", empty])
    assert caught.value.code == 2
    assert "--dir: must name a directory" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["/nope\nsecagg: federation written", "/nope\x1b[2K\rok"])
def test_an_error_naming_a_path_with_a_line_break_stays_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str) -> None:
    """A path holding a line break (or a terminal escape) printed a second line, or rewrote
    the first, that the operator read as the tool's own."""
    assert main(["federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                 "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("secagg: error: ")
    assert all(c.isprintable() for c in err[:-1])
    assert repr(model)[1:-1] in err


def test_an_os_error_naming_a_path_with_a_line_break_stays_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The file an OSError names (here a site's --dir under a file) is printed as it is
    spelled: its line break printed a second line the operator read as the tool's own."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    site = str(not_a_dir / "site\nsecagg: request written\x1b[2K")
    assert main(["federation", "csr", "--dir", site, "--site", "1", *PIN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secagg: error: cannot use ") and err.count("\n") == 1
    assert all(c.isprintable() for c in err[:-1])
    assert "site\\nsecagg: request written\\x1b[2K" in err


@pytest.mark.parametrize("error", [ValueError("bad value\nsecagg: federation written"),
                                   OSError(5, None, "/x\nsecagg: federation written")])
def test_an_unexpected_error_holding_a_line_break_stays_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        error: Exception) -> None:
    """The last resort's message (an error no command turned into its own) and the file it
    names are one printable line too."""
    import argparse

    from secagg import cli

    def fails(_: argparse.Namespace) -> int:
        raise error

    class Parser:
        def parse_args(self, argv: object) -> argparse.Namespace:
            return argparse.Namespace(func=fails)

    monkeypatch.setattr(cli, "build_parser", Parser)
    monkeypatch.delenv("SECAGG_DEBUG", raising=False)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secagg: error: ") and err.count("\n") == 1
    assert all(c.isprintable() for c in err[:-1])
    assert "\\nsecagg: federation written" in err


@pytest.mark.parametrize("off", ["OFF", " Off "])
def test_metrics_off_in_any_case_serves_no_metrics(tmp_path: Path, off: str) -> None:
    """`--metrics OFF` was taken as an address (a host named "OFF") and refused: "off" is the
    operator's word, whatever its case or spaces. (Serve stops at the empty store, before
    anything binds: --metrics was not refused first.)"""
    from tests.service_kit import make_federation

    fed = make_federation(tmp_path, sites=3)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "secagg.cli", "aggregator", "serve", "--config",
             str(fed.aggregator_config), "--store", "", "--metrics", off],
            capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("serve ran with an empty --store")
    assert proc.returncode == 2 and "the store is empty" in proc.stderr
    assert "--metrics" not in proc.stderr


def test_a_failed_rename_names_the_file_not_its_temporary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory where a site's settings.sig goes: the error named the temporary file the
    write renames (".settings.sig.5pc_c5ei"), not settings.sig."""
    import shutil

    import numpy as np

    from secagg.federation.kit import init_federation, make_site_request

    model = tmp_path / "m.npz"
    np.savez(model, w=np.zeros(3, np.float32))  # type: ignore[arg-type]
    init_federation(tmp_path / "fed", 3, initial_model=model)
    root = (tmp_path / "fed" / "federation.toml").read_text().split('trust_root = "')[1][:64]
    site = tmp_path / "site-4"
    request = make_site_request(site, 4, trust_root=root)
    assert main(["federation", "sign", "--dir", str(tmp_path / "fed"), "--request",
                 str(request), "--out", str(tmp_path / "out"), "--add-site"]) == 0
    (site / "settings.sig").mkdir()
    capsys.readouterr()
    assert main(["federation", "install", "--dir", str(site), "--from",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{site / 'settings.sig'}:" in err and ".settings.sig." not in err, err
    shutil.rmtree(site / "settings.sig")
