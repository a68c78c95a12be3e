"""The install's parts (pyproject.toml): a hospital's site needs the core alone, the aggregator
its extra (`secagg[aggregator]`: store, metrics) and the demo its own (`secagg[demo]`:
torch, Opacus, ...). Here the extras' packages are made unimportable in the processes that
should not need them (a `sitecustomize` on their path), as on a machine without them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from secagg.cli import EXTRA_OF
from tests.service_kit import (
    ROOT,
    env,
    initial_model,
    make_federation,
    run_sites,
    start_aggregator,
)

AGGREGATOR_ONLY = ("sqlalchemy", "alembic", "psycopg", "prometheus_client")
DEMO_ONLY = ("torch", "opacus", "sklearn", "matplotlib", "PIL")

_BLOCKER = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = set({blocked!r})


class _NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def _without(tmp: Path, blocked: tuple[str, ...]) -> dict[str, str]:
    """An environment whose Python processes cannot import ``blocked``; checked."""
    where = tmp / "not-installed"
    where.mkdir()
    (where / "sitecustomize.py").write_text(_BLOCKER.format(blocked=sorted(blocked)))
    e = env()
    e["PYTHONPATH"] = f"{where}:{e['PYTHONPATH']}"
    for name in blocked:  # (the blocker works: else every test here passes vacuously)
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=e,
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "No module named" in probe.stderr, name
    return e


def _distributions(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_core_install_leaves_the_aggregators_and_the_demos_packages_to_extras() -> None:
    """Every install pulled torch, Opacus and scikit-learn (GBs, on the operator's machine)
    and SQLAlchemy, psycopg and Prometheus (on every hospital's)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _distributions(project["dependencies"])
    extras = {k: _distributions(v) for k, v in project["optional-dependencies"].items()}
    pip_name = {"sklearn": "scikit-learn", "PIL": "pillow", "prometheus_client":
                "prometheus-client"}
    for module, extra in EXTRA_OF.items():
        name = pip_name.get(module, module).lower()
        assert name not in core, module
        assert name in extras[extra], (module, extra)
    # the demo runs an aggregator: its extra holds the aggregator's packages too
    assert extras["aggregator"] <= extras["demo"]


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_sites_run_a_round_with_the_core_install_alone(tmp_path: Path, protocol: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A hospital's site (the SDK, a key holder's release included) imports nothing of the
    aggregator's or the demo's packages."""
    fed = make_federation(tmp_path, 3, protocol, rounds=1, key_holders=(1,))
    agg = start_aggregator(fed, tmp_path)  # (with every package)
    try:
        bare = _without(tmp_path, AGGREGATOR_ONLY + DEMO_ONLY)
        monkeypatch.setenv("PYTHONPATH", bare["PYTHONPATH"].split(":", 1)[0])
        reports = run_sites(fed, tmp_path)
    finally:
        assert agg.stop() == 0
    assert all(any("model" in x for x in rep) for rep in reports.values()), {
        s: (tmp_path / f"site-{s}.err").read_text()[-1500:] for s in reports}


def test_a_command_whose_extra_is_missing_says_which_to_install(tmp_path: Path) -> None:
    """`secagg aggregator serve` on a site's machine was a traceback ending in "No module
    named 'sqlalchemy'"; the site's own commands work there."""
    bare = _without(tmp_path, AGGREGATOR_ONLY + DEMO_ONLY)

    def secagg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "secagg", *args], env=bare, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    model = initial_model(tmp_path / "init.npz")
    made = secagg("federation", "init", "--dir", str(tmp_path / "fed"), "--sites", "3",
                  "--model", str(model))
    assert made.returncode == 0, made.stderr
    served = secagg("aggregator", "serve", "--config",
                    str(tmp_path / "fed" / "aggregator" / "federation.toml"))
    assert served.returncode == 2, served.stderr
    assert served.stderr.splitlines() == [
        "secagg: error: this command needs the package sqlalchemy, which this install lacks: "
        "pip install 'secagg[aggregator]'"], served.stderr
    demo = secagg("demo", "--rounds", "1", "--out", str(tmp_path / "demo"))
    assert demo.returncode == 2, demo.stderr
    assert "pip install 'secagg[" in demo.stderr and "Traceback" not in demo.stderr, \
        demo.stderr
