"""The directory's schema as numbered migrations, one SQL text per dialect (SQLite and PostgreSQL).

`schema_version` holds one row per applied step; the schema's version is the highest. A step is
applied in one transaction with its row, so a failed upgrade leaves the earlier version intact.
SQLite files made before migrations existed (the tables, no `schema_version`) are version 1:
their identity columns are added if missing (files older still) and the row is written.

Append new steps at the end of `STEPS`; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay_common.errors import RelayError

if TYPE_CHECKING:
    import psycopg


@dataclass(frozen=True)
class Step:
    version: int
    summary: str
    sqlite: str
    postgresql: str


# Step 5: what several replicas must count together. One row per failed (or running) sign-on
# attempt, per throttle key; one leased row per running association (a replica that dies leaves
# rows that expire). SQLite (one bridge) counts in memory, but gets the same tables: one schema.
_LIMITS_SQL = """
CREATE TABLE sign_on_failures (
    key TEXT NOT NULL,
    at REAL NOT NULL,
    attempt TEXT NOT NULL,
    PRIMARY KEY (attempt, key)
);
CREATE INDEX sign_on_failures_key ON sign_on_failures(key, at);
CREATE TABLE association_leases (
    association_id TEXT NOT NULL,
    router TEXT NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('out', 'in')),
    replica TEXT NOT NULL,
    lease_until REAL NOT NULL,
    PRIMARY KEY (association_id, direction)
);
CREATE INDEX association_leases_router ON association_leases(router, direction);
CREATE INDEX association_leases_replica ON association_leases(replica)
"""
# PostgreSQL only: every change that alters what routers see wakes every replica (LISTEN
# relay_directory, relay_bridge.db.notify). The payload names the router whose account changed
# (its streams are cut where they are held) or the table. `last_seen` (touched at every sign-on)
# is not a change anyone needs to hear about.
_NOTIFY_SQL = """;
CREATE FUNCTION relay_notify_router() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('relay_directory', 'router:' || COALESCE(NEW.name, OLD.name));
    RETURN NULL;
END $fn$;
CREATE TRIGGER routers_notify_change AFTER UPDATE OF enabled, sign_key, kem_key, password_hash ON routers
    FOR EACH ROW EXECUTE FUNCTION relay_notify_router();
CREATE TRIGGER routers_notify_insert_delete AFTER INSERT OR DELETE ON routers
    FOR EACH ROW EXECUTE FUNCTION relay_notify_router();
CREATE FUNCTION relay_notify_table() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('relay_directory', 'table:' || TG_TABLE_NAME);
    RETURN NULL;
END $fn$;
CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION relay_notify_table();
CREATE TRIGGER shares_notify AFTER INSERT OR UPDATE OR DELETE ON shares
    FOR EACH STATEMENT EXECUTE FUNCTION relay_notify_table()
"""

STEPS: tuple[Step, ...] = (
    Step(
        1,
        "accounts, enrollment tokens, devices and shares",
        sqlite="""
CREATE TABLE routers (
    name TEXT PRIMARY KEY,
    password_hash BLOB NOT NULL,
    salt BLOB NOT NULL,
    scrypt_n INTEGER NOT NULL, scrypt_r INTEGER NOT NULL, scrypt_p INTEGER NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    last_seen REAL,
    sign_key BLOB,
    kem_key BLOB
);
CREATE TABLE enrollment_tokens (
    router TEXT NOT NULL REFERENCES routers(name) ON DELETE CASCADE,
    token_sha256 BLOB PRIMARY KEY,
    expires REAL NOT NULL,
    used REAL
);
CREATE TABLE devices (
    router TEXT NOT NULL REFERENCES routers(name) ON DELETE CASCADE,
    ae_title TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (router, ae_title)
);
CREATE TABLE shares (
    router TEXT NOT NULL,
    ae_title TEXT NOT NULL,
    peer TEXT NOT NULL,
    PRIMARY KEY (router, ae_title, peer),
    FOREIGN KEY (router, ae_title) REFERENCES devices(router, ae_title) ON DELETE CASCADE
);
""",
        postgresql="""
CREATE TABLE routers (
    name TEXT PRIMARY KEY,
    password_hash BYTEA NOT NULL,
    salt BYTEA NOT NULL,
    scrypt_n INTEGER NOT NULL, scrypt_r INTEGER NOT NULL, scrypt_p INTEGER NOT NULL,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    created DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION,
    sign_key BYTEA,
    kem_key BYTEA
);
CREATE TABLE enrollment_tokens (
    router TEXT NOT NULL REFERENCES routers(name) ON DELETE CASCADE,
    token_sha256 BYTEA PRIMARY KEY,
    expires DOUBLE PRECISION NOT NULL,
    used DOUBLE PRECISION
);
CREATE TABLE devices (
    router TEXT NOT NULL REFERENCES routers(name) ON DELETE CASCADE,
    ae_title TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (router, ae_title)
);
CREATE TABLE shares (
    router TEXT NOT NULL,
    ae_title TEXT NOT NULL,
    peer TEXT NOT NULL,
    PRIMARY KEY (router, ae_title, peer),
    FOREIGN KEY (router, ae_title) REFERENCES devices(router, ae_title) ON DELETE CASCADE
);
""",
    ),
    Step(
        2,
        "indexes for a router's tokens and for who a device is shared with",
        # PostgreSQL does not index the referencing side of a foreign key: deleting a router scanned
        # every token. Both dialects get the same indexes so the two stay one schema.
        sqlite="""
CREATE INDEX enrollment_tokens_router ON enrollment_tokens(router);
CREATE INDEX shares_peer ON shares(peer);
""",
        postgresql="""
CREATE INDEX enrollment_tokens_router ON enrollment_tokens(router);
CREATE INDEX shares_peer ON shares(peer);
""",
    ),
    Step(
        3,
        "the service groups each site may use on each shared device (issue 18)",
        # JSON {site or "*": [service groups]} as the owner published it; '' = published none (an older router).
        sqlite="""
ALTER TABLE devices ADD COLUMN services TEXT NOT NULL DEFAULT '';
""",
        postgresql="""
ALTER TABLE devices ADD COLUMN services TEXT NOT NULL DEFAULT '';
""",
    ),
    Step(
        4,
        "bridge replicas and which replica holds each site's control stream (issue 12)",
        # Leased rows: a replica renews its own and its sites' leases; rows of a replica that died expire.
        sqlite="""
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    started REAL NOT NULL,
    lease_until REAL NOT NULL,
    draining INTEGER NOT NULL DEFAULT 0,
    sites INTEGER NOT NULL DEFAULT 0,
    associations INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE presence (
    site TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    since REAL NOT NULL,
    lease_until REAL NOT NULL
);
CREATE INDEX presence_replica ON presence(replica);
""",
        postgresql="""
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL,
    draining BOOLEAN NOT NULL DEFAULT FALSE,
    sites INTEGER NOT NULL DEFAULT 0,
    associations INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE presence (
    site TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    since DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL
);
CREATE INDEX presence_replica ON presence(replica);
""",
    ),
    # Step 4 belongs to the cluster's replicas and presence (relay_bridge.cluster); step 5 is the
    # cluster-wide limits and the change notifications (docs/high-availability.md).
    Step(
        5,
        "cluster-wide limits (sign-on failures, association leases) and directory change notifications",
        sqlite=_LIMITS_SQL,
        postgresql=_LIMITS_SQL.replace(" REAL ", " DOUBLE PRECISION ") + _NOTIFY_SQL,
    ),
)
LATEST = STEPS[-1].version
TABLES = ("routers", "enrollment_tokens", "devices", "shares")  # in foreign-key order (for db copy)
VERSION_TABLE_SQLITE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied REAL NOT NULL)"
VERSION_TABLE_POSTGRESQL = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)"
)
# pg_advisory_xact_lock key: two `db upgrade` runs (or replicas) never apply a step twice.
UPGRADE_LOCK = 0x7265_6C61_7964_62  # "relaydb"


class SchemaError(RelayError):
    """The database's schema is not one this bridge can use as it is (newer, older, or empty)."""


def too_new(found: int) -> SchemaError:
    return SchemaError(
        f"the database schema is version {found}, newer than this relay-bridge knows (version {LATEST}): "
        "run a relay-bridge at least as new as the one that upgraded it"
    )


def too_old(found: int, backend: str) -> SchemaError:
    what = "is empty (no schema)" if found == 0 else f"has schema version {found}"
    return SchemaError(
        f"the {backend} database {what}; this relay-bridge needs version {LATEST}: run `relay-bridge db upgrade`"
    )


def _split(script: str) -> list[str]:
    """The statements of a script; a `;` inside a $fn$-quoted function body does not end one."""
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending = f"{pending};{piece}" if pending else piece
        if pending.count("$fn$") % 2 == 0:
            if pending.strip():
                statements.append(pending.strip())
            pending = ""
    return statements


# -- SQLite (synchronous: it runs on the directory's own thread or in the CLI) ---------------------
def sqlite_version(db: sqlite3.Connection) -> int:
    """The schema version of an open SQLite database (0: empty; 1: made before versions existed)."""
    names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "schema_version" in names:
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)
    return 1 if "routers" in names else 0


def sqlite_upgrade(db: sqlite3.Connection) -> tuple[int, int]:
    """Apply every missing step; returns (version before, version after). Refuses a newer schema."""
    before = sqlite_version(db)
    if before > LATEST:
        raise too_new(before)
    if before == 1 and not _sqlite_has_version_table(db):
        _sqlite_adopt_legacy(db)
    for step in STEPS:
        if step.version <= sqlite_version(db):
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(VERSION_TABLE_SQLITE)
            for statement in _split(step.sqlite):
                db.execute(statement)
            db.execute("INSERT INTO schema_version(version, applied) VALUES (?, ?)", (step.version, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return before, sqlite_version(db)


def _sqlite_has_version_table(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone() is not None


def _sqlite_adopt_legacy(db: sqlite3.Connection) -> None:
    """A file from before migrations: bring it to exactly step 1 and record that."""
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(routers)")}
        for column in ("sign_key", "kem_key"):  # files made before router identities existed
            if column not in columns:
                db.execute(f"ALTER TABLE routers ADD COLUMN {column} BLOB")
        db.execute(VERSION_TABLE_SQLITE)
        db.execute("INSERT INTO schema_version(version, applied) VALUES (1, ?)", (time.time(),))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


# -- PostgreSQL (async, psycopg 3) -------------------------------------------------------------------
async def postgresql_version(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> int:
    cur = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL, to_regclass('routers') IS NOT NULL")
    row = await cur.fetchone()
    assert row is not None
    has_versions, has_routers = row
    if not has_versions:
        return 1 if has_routers else 0
    cur = await conn.execute("SELECT max(version) FROM schema_version")
    found = await cur.fetchone()
    return int(found[0] or 0) if found else 0


async def postgresql_upgrade(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> tuple[int, int]:
    """Apply every missing step in one transaction, under an advisory lock; returns (before, after)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (UPGRADE_LOCK,))
        before = await postgresql_version(conn)
        if before > LATEST:
            raise too_new(before)
        if before == 1 and not await _pg_has_version_table(conn):
            raise SchemaError("the PostgreSQL database has directory tables but no schema_version table: not ours")
        await conn.execute(VERSION_TABLE_POSTGRESQL)
        for step in STEPS:
            if step.version <= before:
                continue
            for statement in _split(step.postgresql):
                await conn.execute(statement)  # our own constant SQL
            await conn.execute(
                "INSERT INTO schema_version(version, applied) VALUES (%s, %s)", (step.version, time.time())
            )
        after = await postgresql_version(conn)
    return before, after


async def _pg_has_version_table(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> bool:
    cur = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    row = await cur.fetchone()
    return bool(row and row[0])
