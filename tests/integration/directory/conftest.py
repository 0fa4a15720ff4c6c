"""A throwaway PostgreSQL cluster for the directory tests (one per test session, a fresh database per test).

Missing PostgreSQL or psycopg: skipped locally, a failure under CI=true (a skipped backend proves nothing).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresCluster, require_postgres, running_cluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    with running_cluster(require_postgres("PostgreSQL for the directory tests")) as cluster:
        yield cluster
