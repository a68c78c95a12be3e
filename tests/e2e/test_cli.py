from __future__ import annotations

import json
import subprocess
import sys

import pytest

from secagg.cli import main


def test_demo_runs_and_reports_a_bounded_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--sites", "6", "--params", "2000", "--dropout", "0.3"]) == 0
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


@pytest.mark.parametrize("argv", [["demo", "--sites", "0"], ["demo", "--dropout", "1.5"],
                                  ["bench", "masking", "--clients", "-3"]])
def test_bad_arguments_give_a_usage_error_not_a_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_unsafe_configuration_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "masking", "--clients", "10", "--params", "10", "--threshold", "3"]) == 2
    assert "threshold must be in" in capsys.readouterr().err
