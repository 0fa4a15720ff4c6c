"""Limits that several replicas count together in PostgreSQL: failed sign-ons and running associations.

With one bridge (SQLite) these are counted in memory (`relay_bridge.sessions.LoginThrottle`,
the splice table). With replicas on PostgreSQL a hostile router or a password guesser could
spread over them, so the counts that matter live in two tables (migration step 5):

- `sign_on_failures`: one row per throttle key (account, source address) per attempt, written
  *before* the password is hashed and deleted when it succeeds; an attempt is refused unhashed
  when a key already has `limit` rows inside the window. Per key, an advisory lock makes the
  count and the insert one step, so replicas racing cannot all slip under the limit.
- `association_leases`: one row per running association and direction ('out' for the router
  that opened it, 'in' for its destination), with a lease the owning replica renews while the
  association runs. A replica that dies leaves rows that expire (`LEASE_S`), so its routers'
  slots come back on their own.

Time is the database's clock (`clock_timestamp()`): replicas whose clocks differ still agree.
Every failure of the server is `DatabaseUnavailable`; callers decide what that means (sign-on:
a transient refusal; an Open: admit on this replica's own counts, logged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from relay_bridge.db.postgres import DatabaseUnavailable, PostgresDirectory

log = logging.getLogger("relay_bridge")
LEASE_S = 30.0  # an association's lease; renewed every 10 s while it runs (relay_bridge.db.notify.RESYNC_S)
AWAY_S = 5.0  # after a failure, Opens skip the shared count this long (relay_bridge.splice)
NOW = "extract(epoch from clock_timestamp())"


def _lock_key(kind: str, name: str) -> str:
    return f"relay:{kind}:{name}"


async def _lock(conn: Any, names: list[str]) -> None:
    """Transaction-scoped advisory locks on `names`, taken in one sorted order by every replica (no
    deadlock between two of them), in one round trip."""
    ordered = sorted(set(names))
    columns = ", ".join("pg_advisory_xact_lock(hashtext(%s))" for _ in ordered)
    await conn.execute(f"SELECT {columns}", ordered)  # only placeholders are interpolated


class SharedSignOnCounts:
    """Failed sign-on attempts per throttle key, counted in PostgreSQL across replicas."""

    def __init__(self, db: PostgresDirectory, limit: int, window_s: float) -> None:
        self.db, self.limit, self.window_s = db, limit, window_s

    async def begin(self, attempt: str, keys: Sequence[str]) -> bool:
        """Record `attempt` as failed for each key, unless one key is at the limit; False: throttled."""

        async def work(conn: Any) -> bool:
            await _lock(conn, [_lock_key("sign_on", key) for key in keys])
            cur = await conn.execute(
                f"SELECT key, count(*) FROM sign_on_failures WHERE key = ANY(%s) AND at > {NOW} - %s GROUP BY key",
                (list(keys), self.window_s),
            )
            if any(count >= self.limit for _key, count in await cur.fetchall()):
                return False
            await conn.execute(
                f"INSERT INTO sign_on_failures(key, at, attempt) SELECT k, {NOW}, %s FROM unnest(%s::text[]) k",
                (attempt, list(keys)),
            )
            return True

        return await self.db.in_transaction(work)

    async def failed_again(self, attempt: str, keys: Sequence[str]) -> None:
        """Count one more failure for the keys (a redeemed token that was refused after the password)."""
        await self.db.in_transaction(
            lambda conn: _insert_failures(conn, f"{attempt}+", keys)  # a second row per key
        )

    async def succeeded(self, attempt: str) -> None:
        await self.db._execute("DELETE FROM sign_on_failures WHERE attempt = %s", (attempt,))

    async def expire(self) -> int:
        """Forget failures older than the window (the table stays as small as the guessing rate)."""
        return await self.db._execute(f"DELETE FROM sign_on_failures WHERE at < {NOW} - %s", (self.window_s,))


async def _insert_failures(conn: Any, attempt: str, keys: Sequence[str]) -> None:
    async with conn.cursor() as cur:
        await cur.executemany(
            f"INSERT INTO sign_on_failures(key, at, attempt) VALUES (%s, {NOW}, %s) ON CONFLICT DO NOTHING",
            [(key, attempt) for key in keys],
        )


@dataclass(frozen=True)
class OverLimit:
    """Which cluster-wide limit an Open would exceed."""

    router: str
    direction: str  # "out": the caller's max_associations_per_router; "in": the destination's max_inbound_per_router


class SharedAssociationLeases:
    """Running associations per router and direction, leased in PostgreSQL by the replica that runs them."""

    def __init__(self, db: PostgresDirectory, replica: str, *, max_out: int, max_in: int) -> None:
        self.db, self.replica, self.max_out, self.max_in = db, replica, max_out, max_in
        self._away_until = 0.0

    async def acquire(self, association_id: str, caller: str, destination: str) -> OverLimit | None:
        """Lease one 'out' slot of `caller` and one 'in' slot of `destination`, or say which limit is reached.

        After the database failed once, Opens do not wait for it again for `AWAY_S` (each would wait
        the pool's timeout): `DatabaseUnavailable` at once, and the caller counts locally meanwhile.
        """
        if time.monotonic() < self._away_until:
            raise DatabaseUnavailable("the PostgreSQL database was unavailable moments ago")
        try:
            return await self._acquire(association_id, caller, destination)
        except DatabaseUnavailable:
            self._away_until = time.monotonic() + AWAY_S
            raise

    async def _acquire(self, association_id: str, caller: str, destination: str) -> OverLimit | None:

        async def work(conn: Any) -> OverLimit | None:
            # Few round trips (each one is setup latency against a remote database): one for both locks,
            # one for both counts, one for both rows.
            await _lock(conn, [_lock_key("assoc-out", caller), _lock_key("assoc-in", destination)])
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE router = %s AND direction = 'out'),"
                " count(*) FILTER (WHERE router = %s AND direction = 'in')"
                f" FROM association_leases WHERE lease_until > {NOW}"
                " AND ((router = %s AND direction = 'out') OR (router = %s AND direction = 'in'))",
                (caller, destination, caller, destination),
            )
            row = await cur.fetchone()
            out, inbound = (row[0], row[1]) if row is not None else (0, 0)
            if out >= self.max_out:
                return OverLimit(caller, "out")
            if inbound >= self.max_in:
                return OverLimit(destination, "in")
            await conn.execute(
                "INSERT INTO association_leases(association_id, router, direction, replica, lease_until)"
                f" VALUES (%s, %s, 'out', %s, {NOW} + %s), (%s, %s, 'in', %s, {NOW} + %s)",
                (association_id, caller, self.replica, LEASE_S, association_id, destination, self.replica, LEASE_S),
            )
            return None

        return await self.db.in_transaction(work)

    async def release(self, association_id: str) -> None:
        await self.db._execute("DELETE FROM association_leases WHERE association_id = %s", (association_id,))

    async def renew(self, running: Collection[str]) -> None:
        """Extend the leases of this replica's running associations; drop its others (a release that failed
        while the database was away) and every expired row (a replica that died)."""
        ids = list(running)

        async def work(conn: Any) -> None:
            await conn.execute(
                f"UPDATE association_leases SET lease_until = {NOW} + %s"
                " WHERE replica = %s AND association_id = ANY(%s)",
                (LEASE_S, self.replica, ids),
            )
            await conn.execute(
                "DELETE FROM association_leases WHERE replica = %s AND NOT (association_id = ANY(%s))",
                (self.replica, ids),
            )
            await conn.execute(f"DELETE FROM association_leases WHERE lease_until < {NOW}")

        await self.db.in_transaction(work)
