"""`relay-bridge db ...`: schema status and upgrade, and copying a SQLite directory into PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay_bridge.db import migrations
from relay_bridge.db.backend import is_postgres_url
from relay_bridge.directory import DirectoryError


@dataclass(frozen=True)
class SchemaStatus:
    backend: str
    version: int
    latest: int = migrations.LATEST

    @property
    def state(self) -> str:
        if self.version == self.latest:
            return "up to date"
        if self.version > self.latest:
            return "NEWER than this relay-bridge"
        return "needs `relay-bridge db upgrade`"


def _sqlite_connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        if not path.exists():
            raise DirectoryError(f"no SQLite database at {path}")
        return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)
    return sqlite3.connect(str(path), isolation_level=None)


def status(database: str | os.PathLike[str], password_file: Path | None) -> SchemaStatus:
    """The schema version and backend, without changing anything."""
    if is_postgres_url(database):
        return asyncio.run(status_postgresql(os.fspath(database), password_file))
    path = Path(database)
    if not path.exists():
        return SchemaStatus("sqlite", 0)
    db = _sqlite_connect(path, read_only=True)
    try:
        return SchemaStatus("sqlite", migrations.sqlite_version(db))
    finally:
        db.close()


def upgrade(database: str | os.PathLike[str], password_file: Path | None) -> tuple[int, int]:
    """Bring the schema to the latest version; returns (before, after)."""
    if is_postgres_url(database):
        return asyncio.run(upgrade_postgresql(os.fspath(database), password_file))
    from relay_bridge.directory import Directory

    directory = Directory(Path(database))  # opening a SQLite directory upgrades it
    directory.close()
    return directory.schema_change


def copy(source: Path, target: str, password_file: Path | None, *, force: bool = False) -> dict[str, int]:
    """Copy every table of the SQLite directory `source` into the PostgreSQL database `target`.

    The target's schema is brought to the latest version first; the rows go in one transaction,
    so a failed copy leaves the target as it was. A target with rows is refused unless `force`
    (then its rows are replaced). Returns the rows copied per table.
    """
    if not is_postgres_url(target):
        raise DirectoryError(f"--to must be a postgresql:// URL, got {target!r}")
    if is_postgres_url(source):
        raise DirectoryError("--from must be a SQLite file")
    rows = _read_sqlite(source)
    return asyncio.run(_pg_copy(target, password_file, rows, force))


def _read_sqlite(path: Path) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    db = _sqlite_connect(path, read_only=True)
    try:
        found = migrations.sqlite_version(db)
        if found == 0:
            raise DirectoryError(f"{path} holds no bridge directory")
        if found > migrations.LATEST:
            raise migrations.too_new(found)
        tables: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
        db.execute("BEGIN")  # one consistent snapshot of every table
        for table in migrations.TABLES:
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
            tables[table] = (columns, db.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall())
        db.execute("COMMIT")
        return tables
    finally:
        db.close()


async def _pg_open(url: str, password_file: Path | None) -> Any:
    from relay_bridge.db.postgres import PostgresDirectory

    return await PostgresDirectory.open(url, password_file=password_file, max_size=1, check_schema=False)


async def status_postgresql(url: str, password_file: Path | None) -> SchemaStatus:
    directory = await _pg_open(url, password_file)
    try:
        return SchemaStatus("postgresql", await directory.schema_version())
    finally:
        await directory.aclose()


async def upgrade_postgresql(url: str, password_file: Path | None) -> tuple[int, int]:
    directory = await _pg_open(url, password_file)
    try:
        result: tuple[int, int] = await directory.upgrade()
        return result
    finally:
        await directory.aclose()


def _to_postgres(table: str, column: str, value: Any) -> Any:
    if table == "routers" and column == "enabled":
        return bool(value)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


async def _pg_copy(
    url: str, password_file: Path | None, tables: dict[str, tuple[list[str], list[tuple[Any, ...]]]], force: bool
) -> dict[str, int]:
    directory = await _pg_open(url, password_file)
    try:
        await directory.upgrade()

        async def work(conn: Any) -> dict[str, int]:
            present = 0
            for table in migrations.TABLES:
                cur = await conn.execute(f"SELECT count(*) FROM {table}")
                present += (await cur.fetchone())[0]
            if present and not force:
                raise DirectoryError(
                    f"the PostgreSQL database already holds {present} directory rows; "
                    "use --force to replace them with the SQLite directory's"
                )
            for table in reversed(migrations.TABLES):  # children first (foreign keys)
                await conn.execute(f"DELETE FROM {table}")
            copied: dict[str, int] = {}
            for table in migrations.TABLES:
                columns, rows = tables[table]
                if rows:
                    placeholders = ", ".join(["%s"] * len(columns))
                    async with conn.cursor() as cur:
                        await cur.executemany(
                            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})",
                            [
                                tuple(_to_postgres(table, c, v) for c, v in zip(columns, row, strict=True))
                                for row in rows
                            ],
                        )
                copied[table] = len(rows)
            return copied

        result: dict[str, int] = await directory.in_transaction(work)
        return result
    finally:
        await directory.aclose()


def database_problem(database: str | os.PathLike[str], password_file: Path | None) -> str | None:
    """For check-config: why `serve` could not use this PostgreSQL database (one line), or None.

    A SQLite file is created or upgraded by `serve` itself, so only a newer schema is a problem there.
    """
    from relay_common.errors import RelayError

    try:
        found = status(database, password_file)
    except (RelayError, sqlite3.Error, OSError) as exc:
        return str(exc)
    if found.version > found.latest:
        return str(migrations.too_new(found.version))
    if found.backend == "postgresql" and found.version < found.latest:
        return str(migrations.too_old(found.version, "PostgreSQL"))
    return None


def db_command(action: str, database: str | os.PathLike[str], password_file: Path | None, args: Any) -> int:
    """`relay-bridge db status|upgrade|copy`; errors propagate (the CLI prints them in one line)."""
    import json

    if action == "status":
        found = status(database, password_file)
        if args.json:
            print(json.dumps({"backend": found.backend, "version": found.version, "latest": found.latest}))
        else:
            print(
                f"backend: {found.backend}\n"
                f"schema version: {found.version} (this relay-bridge: {found.latest}, {found.state})"
            )
        return 0 if found.version == found.latest else 1
    if action == "upgrade":
        before, after = upgrade(database, password_file)
        print(f"schema version {before} -> {after}" if before != after else f"schema already at version {after}")
        return 0
    if action == "copy":
        target = args.to or database
        copied = copy(args.source, os.fspath(target), password_file, force=args.force)
        print("copied " + ", ".join(f"{n} {table}" for table, n in copied.items()))
        return 0
    return 2
