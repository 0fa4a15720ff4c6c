"""A throwaway PostgreSQL cluster for the directory tests (one per test session, a fresh database per test).

Missing PostgreSQL or psycopg: skipped locally, a failure under CI=true (a skipped backend proves nothing).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresCluster, postgres_bindir


def _require_postgres() -> None:
    missing = []
    if postgres_bindir() is None:
        missing.append("PostgreSQL server (Debian: apt-get install -y postgresql)")
    missing += [m for m in ("psycopg", "psycopg_pool") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    message = f"not installed: {', '.join(missing)} (pip install -e '.[postgresql]')"
    if os.environ.get("CI"):
        pytest.fail(f"CI requires PostgreSQL for the directory tests; {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    _require_postgres()
    bindir = postgres_bindir()
    assert bindir is not None
    cluster = PostgresCluster(bindir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
