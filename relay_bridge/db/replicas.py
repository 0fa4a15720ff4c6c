"""Replica registration and site presence: the rows, and their SQL for both dialects (migration step 4).

A replica writes one `replicas` row (its id, the internal address other replicas forward to, a
lease it renews) and one `presence` row per control stream it holds. A newer sign-on of the
same site replaces the row at once (the old holder sees at its next renewal that the site is no
longer its own and cuts its stale stream). Rows are read only while their lease runs, so the
rows of a replica that was killed expire without anyone deleting them.

The SQL is written once with `?` placeholders; PostgreSQL's driver gets them as `%s` (`pg`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Replica:
    id: str
    address: str
    started: float
    lease_until: float
    draining: bool = False
    sites: int = 0
    associations: int = 0


@dataclass(frozen=True)
class Presence:
    site: str
    replica: str
    since: float
    lease_until: float


REGISTER = (
    "INSERT INTO replicas(id, address, started, lease_until, draining, sites, associations)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(id) DO UPDATE SET address=excluded.address, started=excluded.started,"
    " lease_until=excluded.lease_until, draining=excluded.draining, sites=excluded.sites,"
    " associations=excluded.associations"
)
DELETE_REPLICA = "DELETE FROM replicas WHERE id=?"
DELETE_REPLICA_PRESENCE = "DELETE FROM presence WHERE replica=?"
# A newer sign-on wins: the row is replaced unless it already records a later one.
CLAIM = (
    "INSERT INTO presence(site, replica, since, lease_until) VALUES (?, ?, ?, ?)"
    " ON CONFLICT(site) DO UPDATE SET replica=excluded.replica, since=excluded.since,"
    " lease_until=excluded.lease_until WHERE presence.since <= excluded.since"
)
RENEW_PRESENCE = "UPDATE presence SET lease_until=? WHERE replica=? RETURNING site"
RELEASE = "DELETE FROM presence WHERE site=? AND replica=?"
LIVE_REPLICAS = (
    "SELECT id, address, started, lease_until, draining, sites, associations FROM replicas"
    " WHERE lease_until >= ? ORDER BY id"
)
# Where a site is held, counting only live rows of a live replica.
LIVE_PRESENCE = (
    "SELECT p.site, p.replica, p.since, p.lease_until FROM presence p JOIN replicas r ON r.id=p.replica"
    " WHERE p.lease_until >= ? AND r.lease_until >= ? ORDER BY p.site"
)
LOCATE = (
    "SELECT r.id, r.address FROM presence p JOIN replicas r ON r.id=p.replica"
    " WHERE p.site=? AND p.lease_until >= ? AND r.lease_until >= ?"
)
EXPIRE_PRESENCE = "DELETE FROM presence WHERE lease_until < ?"
EXPIRE_REPLICAS = "DELETE FROM replicas WHERE lease_until < ?"


def pg(sql: str) -> str:
    """The statement with psycopg's placeholders."""
    return sql.replace("?", "%s")


def replica_from_row(row: tuple[object, ...]) -> Replica:
    rid, address, started, lease_until, draining, sites, associations = row
    return Replica(
        str(rid),
        str(address),
        float(started),  # type: ignore[arg-type]
        float(lease_until),  # type: ignore[arg-type]
        bool(draining),
        int(sites),  # type: ignore[call-overload]
        int(associations),  # type: ignore[call-overload]
    )


def presence_from_row(row: tuple[object, ...]) -> Presence:
    site, replica, since, lease_until = row
    return Presence(str(site), str(replica), float(since), float(lease_until))  # type: ignore[arg-type]
