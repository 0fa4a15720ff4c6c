"""The cluster-wide counts on a real PostgreSQL, with two replicas' views of one database.

Each "replica" is its own `PostgresDirectory` (its own pool), as two bridge processes would have.
- Association leases: a router at its limit on one replica is refused on the other; a release,
  a dead replica's expired leases and a replica's unreleased leases all give the slots back.
- Sign-on failures: concurrent attempts on two replicas never pass more than the limit.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import psycopg
import pytest

from relay_bridge.db.postgres import PostgresDirectory
from relay_bridge.db.shared_limits import OverLimit, SharedAssociationLeases, SharedSignOnCounts
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.integration


@pytest.fixture
async def two_replicas(ha_postgres: PostgresCluster) -> AsyncIterator[tuple[PostgresDirectory, PostgresDirectory]]:
    url = ha_postgres.create_database()
    first = await PostgresDirectory.open(url, password_file=ha_postgres.password_file, check_schema=False)
    await first.upgrade()
    second = await PostgresDirectory.open(url, password_file=ha_postgres.password_file)
    try:
        yield first, second
    finally:
        await first.aclose()
        await second.aclose()


def _aid() -> str:
    return secrets.token_hex(16)


async def test_a_router_cannot_exceed_its_association_limit_by_spreading_over_replicas(
    two_replicas: tuple[PostgresDirectory, PostgresDirectory],
) -> None:
    one = SharedAssociationLeases(two_replicas[0], "replica-1", max_out=2, max_in=3)
    two = SharedAssociationLeases(two_replicas[1], "replica-2", max_out=2, max_in=3)
    first, second = _aid(), _aid()
    assert await one.acquire(first, "site-a", "site-b") is None
    assert await two.acquire(second, "site-a", "site-b") is None
    assert await two.acquire(_aid(), "site-a", "site-b") == OverLimit("site-a", "out")
    assert await one.acquire(_aid(), "site-a", "site-b") == OverLimit("site-a", "out")
    assert await one.acquire(_aid(), "site-c", "site-b") is None  # site-b's third inbound
    assert await two.acquire(_aid(), "site-d", "site-b") == OverLimit("site-b", "in")
    await one.release(first)
    assert await two.acquire(_aid(), "site-a", "site-x") is None, "a released slot is usable on any replica"


async def test_a_dead_replicas_leases_expire_and_unreleased_ones_are_dropped_at_renewal(
    two_replicas: tuple[PostgresDirectory, PostgresDirectory], ha_postgres: PostgresCluster
) -> None:
    one = SharedAssociationLeases(two_replicas[0], "replica-1", max_out=1, max_in=10)
    dead = SharedAssociationLeases(two_replicas[1], "replica-dead", max_out=1, max_in=10)
    assert await dead.acquire(_aid(), "site-a", "site-b") is None
    assert await one.acquire(_aid(), "site-a", "site-b") == OverLimit("site-a", "out")
    database = (await two_replicas[0]._fetch("SELECT current_database()"))[0][0]
    with psycopg.connect(ha_postgres.url(database), password=ha_postgres.password, autocommit=True) as conn:
        conn.execute("UPDATE association_leases SET lease_until = lease_until - 3600 WHERE replica = 'replica-dead'")
    kept = _aid()
    assert await one.acquire(kept, "site-a", "site-b") is None, "the dead replica's lease has expired"
    await one.renew([kept])
    assert await two_replicas[0]._fetch("SELECT count(*) FROM association_leases WHERE replica = 'replica-dead'") == [
        (0,)
    ]
    await one.renew([])  # the association ended but its release never reached the database
    assert await one.acquire(_aid(), "site-a", "site-b") is None


async def test_concurrent_sign_on_attempts_on_two_replicas_never_pass_the_limit(
    two_replicas: tuple[PostgresDirectory, PostgresDirectory],
) -> None:
    counts = [SharedSignOnCounts(db, limit=5, window_s=60) for db in two_replicas]
    keys = ("account:site-a", "source:192.0.2.7")
    results = await asyncio.gather(*(counts[i % 2].begin(secrets.token_hex(8), keys) for i in range(12)))
    assert sum(results) == 5, "exactly `limit` attempts are let through to the password check"
    passed = secrets.token_hex(8)
    await counts[0].succeeded(passed)  # an unknown attempt id: nothing forgiven
    assert not await counts[1].begin(passed, keys)
    assert await counts[1].expire() == 0  # all inside the window


async def test_an_enrollment_token_redeemed_at_once_on_two_replicas_works_once(
    two_replicas: tuple[PostgresDirectory, PostgresDirectory],
) -> None:
    one, two = two_replicas
    await one.add_router("site-e")
    for _ in range(5):
        token = await one.issue_enrollment_token("site-e", 3600)
        results = await asyncio.gather(
            one.redeem_enrollment_token("site-e", token), two.redeem_enrollment_token("site-e", token)
        )
        assert sorted(str(r) for r in results) == ["None", "enrollment token already used"]


async def test_the_triggers_notify_changes_routers_see_and_not_a_sign_on_touch(
    two_replicas: tuple[PostgresDirectory, PostgresDirectory], ha_postgres: PostgresCluster
) -> None:
    db = two_replicas[0]
    await db.add_router("site-n")
    database = (await db._fetch("SELECT current_database()"))[0][0]
    listener = await psycopg.AsyncConnection.connect(
        ha_postgres.url(database), password=ha_postgres.password, autocommit=True
    )
    async with listener:
        await listener.execute("LISTEN relay_directory")
        await db.touch("site-n")  # every sign-on does this: not a change
        await db.set_enabled("site-n", False)
        await db.publish("site-n", [])
        received = []
        async for notice in listener.notifies(timeout=1.0):
            received.append(notice.payload)
    assert received == ["router:site-n", "table:devices"]


async def test_status_reads_every_replica_with_its_leased_associations(
    two_replicas: tuple[PostgresDirectory, PostgresDirectory], ha_postgres: PostgresCluster
) -> None:
    from relay_bridge.cluster_status import _read, render_replicas

    one, _ = two_replicas
    url = ha_postgres.url((await one._fetch("SELECT current_database()"))[0][0])
    assert await _read(url, ha_postgres.password_file) == []  # no replica registered, no leases
    await SharedAssociationLeases(one, "r-2", max_out=5, max_in=5).acquire(_aid(), "site-a", "site-b")
    # r-1 as replica registration writes it (relay_bridge.cluster, migration step 4), holding site-a.
    await one._execute(
        "INSERT INTO replicas VALUES ('r-1', '10.0.0.1:7443', extract(epoch from now()) - 60,"
        " extract(epoch from now()) + 10, false, 1, 0)"
    )
    await one._execute(
        "INSERT INTO presence VALUES ('site-a', 'r-1', extract(epoch from now()) - 30, extract(epoch from now()) + 10)"
    )
    rows = await _read(url, ha_postgres.password_file)
    assert [(r["id"], r.get("sites"), r.get("leased_associations")) for r in rows] == [
        ("r-1", ["site-a"], None),
        ("r-2", None, 1),
    ]
    text = render_replicas(rows)
    assert "r-1  live" in text and "sites 1 (site-a)" in text and "r-2  unregistered (leases only)" in text
    await one._execute("DELETE FROM presence")
    await one._execute("DELETE FROM replicas")
