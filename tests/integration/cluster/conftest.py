"""Fixtures for the cluster tests: a throwaway PostgreSQL, three bridge replicas, HAProxy in front.

HAProxy gets one frontend per site, each preferring a different replica, so the two routers land
on different replicas and the tests can say which (the presence table says so too). The
replicas themselves: tests.support.bridge_cluster.

Missing PostgreSQL, psycopg or HAProxy: skipped locally, a failure under CI=true.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.bridge_cluster import BridgeCluster, start_bridge_cluster
from tests.support.haproxy import haproxy_binary
from tests.support.postgres import PostgresCluster, require_postgres, running_cluster


@pytest.fixture(scope="module")
def postgres_for_cluster() -> Iterator[PostgresCluster]:
    haproxy = [] if haproxy_binary() else ["HAProxy (Debian: apt-get install -y haproxy)"]
    with running_cluster(require_postgres("the cluster test's parts", haproxy)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def bridge_cluster(
    postgres_for_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BridgeCluster]:
    """Three replicas and HAProxy with frontends "a" (prefers r1) and "b" (prefers r2), checking `GET /readyz`;
    no routers yet."""
    cluster = start_bridge_cluster(
        tmp_path_factory.mktemp("cluster"),
        postgres_for_cluster,
        {"a": ["r1", "r3", "r2"], "b": ["r2", "r3", "r1"]},
        renew_s=0.5,  # a site signed on at one replica shows online at the others sooner
        # A draining replica leaves HAProxy's rotation at once (its /readyz answers 503), so the routers it
        # moves sign on elsewhere while it still finishes what runs there, within a grace longer than that.
        health="http",
        drain_grace_s=20,
    )
    try:
        yield cluster
    finally:
        cluster.stop()
