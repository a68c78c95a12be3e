import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Small example counts: the CI machine has 2 cores and the suite must stay well under 15 min.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")


# ---- failed asserts explained briefly, on CI too -------------------------------------------
# On CI (CI or BUILD_NUMBER set) pytest explains a failed `==` in full, untruncated: for two
# tuples of ciphertexts of hundreds of KB that is a quadratic ndiff that ran for minutes, so a
# failing test looked like a hang. pytest reads the variables when it explains a failure, so
# dropping them here gives the desk's truncated explanation everywhere.
for _name in ("CI", "BUILD_NUMBER"):
    os.environ.pop(_name, None)


# ---- stores: SQLite always, PostgreSQL when a server is reachable ------------------------------
# CI (.ci/run) starts PostgreSQL and sets SECAGG_REQUIRE_POSTGRES=1: there a missing server
# fails the tests that need it instead of skipping them.


POSTGRES_ADMIN_URL = os.environ.get(
    "SECAGG_TEST_POSTGRES", "postgresql://secagg:secagg@127.0.0.1:5432/postgres")


def _postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy as sa

    from aggregator.store import normalize_url

    admin = sa.create_engine(normalize_url(POSTGRES_ADMIN_URL), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.exec_driver_sql("SELECT 1")
    except Exception as e:  # any failure to reach it is "not reachable"
        admin.dispose()
        reason = (f"PostgreSQL is not reachable at SECAGG_TEST_POSTGRES "
                  f"({type(e).__name__}); .ci/run starts it")
        if os.environ.get("SECAGG_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"secagg_test_{secrets.token_hex(6)}"
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.engine.make_url(normalize_url(POSTGRES_ADMIN_URL)).set(
            database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _postgres_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store of each kind: a SQLite file path, or a PostgreSQL database URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "aggregator.db")
    else:
        yield from _postgres_database()
