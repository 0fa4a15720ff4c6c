"""The directory contract on PostgreSQL (a throwaway cluster), its migrations, `db copy` and the CLI on it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from relay_bridge import cli
from relay_bridge import directory as directory_module
from relay_bridge.db import admin, migrations
from relay_bridge.db.backend import DirectoryBackend, open_directory
from relay_bridge.db.postgres import DatabaseUnavailable, PostgresDirectory
from relay_bridge.directory import Device, Directory, DirectoryError, TokenProblem
from tests.integration.directory.contract import DirectoryContract, Harness, dev, normalised
from tests.support.ports import free_port
from tests.support.postgres import PostgresCluster

CHEAP_N = 2**10


class PostgresHarness(Harness):
    integrity_error = psycopg.IntegrityError

    def __init__(self, url: str, password_file: Path, db: PostgresDirectory) -> None:
        self.url, self.password_file = url, password_file
        self.db = db
        self.pg = db

    async def add_router(self, name: str, password: str | None = None) -> str:
        return await self.pg.add_router(name, password)

    async def set_password(self, name: str, password: str) -> None:
        await self.pg.set_password(name, password)

    async def set_enabled(self, name: str, enabled: bool) -> None:
        await self.pg.set_enabled(name, enabled)

    async def remove_router(self, name: str) -> None:
        await self.pg.remove_router(name)

    async def issue_enrollment_token(self, name: str, ttl_s: float) -> str:
        return await self.pg.issue_enrollment_token(name, ttl_s)

    async def reset_identity(self, name: str) -> None:
        await self.pg.reset_identity(name)

    async def reopen(self) -> DirectoryBackend:
        await self.db.aclose()
        self.db = self.pg = await PostgresDirectory.open(self.url, password_file=self.password_file)
        return self.db

    async def schema_version(self) -> int:
        return await self.pg.schema_version()


@pytest.fixture
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_module, "SCRYPT_N", CHEAP_N)


@pytest.fixture
def database(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return postgres_cluster.create_database()


@pytest.fixture
async def harness(
    postgres_cluster: PostgresCluster, database: str, cheap_scrypt: None
) -> AsyncIterator[PostgresHarness]:
    assert await admin.upgrade_postgresql(database, postgres_cluster.password_file) == (0, migrations.LATEST)
    db = await open_directory(database, password_file=postgres_cluster.password_file)
    assert isinstance(db, PostgresDirectory)
    h = PostgresHarness(database, postgres_cluster.password_file, db)
    yield h
    await h.db.aclose()


class TestPostgresDirectory(DirectoryContract):
    pass


# -- migrations and the serve-time policy -------------------------------------------------------------
def _apply_step_1(url: str, cluster: PostgresCluster) -> None:
    with psycopg.connect(url, password=cluster.password) as conn:
        conn.execute(migrations.VERSION_TABLE_POSTGRESQL)
        for statement in migrations.STEPS[0].postgresql.split(";"):
            if statement.strip():
                conn.execute(statement)  # type: ignore[call-overload]
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")


async def test_serve_refuses_an_empty_database_and_names_the_command(
    postgres_cluster: PostgresCluster, database: str
) -> None:
    with pytest.raises(migrations.SchemaError, match=r"is empty .*run `relay-bridge db upgrade`"):
        await open_directory(database, password_file=postgres_cluster.password_file)


async def test_an_older_schema_needs_db_upgrade_then_serves(postgres_cluster: PostgresCluster, database: str) -> None:
    _apply_step_1(database, postgres_cluster)
    assert (await admin.status_postgresql(database, postgres_cluster.password_file)).version == 1
    with pytest.raises(migrations.SchemaError, match=f"schema version 1; .*needs version {migrations.LATEST}"):
        await open_directory(database, password_file=postgres_cluster.password_file)
    assert await admin.upgrade_postgresql(database, postgres_cluster.password_file) == (1, migrations.LATEST)
    latest = (migrations.LATEST, migrations.LATEST)
    assert await admin.upgrade_postgresql(database, postgres_cluster.password_file) == latest
    directory = await open_directory(database, password_file=postgres_cluster.password_file)
    await directory.aclose()
    with psycopg.connect(database, password=postgres_cluster.password) as conn:
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname='public'")}
    assert {"enrollment_tokens_router", "shares_peer"} <= indexes


async def test_a_newer_schema_is_refused_naming_both_versions(postgres_cluster: PostgresCluster, database: str) -> None:
    await admin.upgrade_postgresql(database, postgres_cluster.password_file)
    with psycopg.connect(database, password=postgres_cluster.password) as conn:
        conn.execute("INSERT INTO schema_version VALUES (%s, 0)", (migrations.LATEST + 1,))
    for attempt in (
        open_directory(database, password_file=postgres_cluster.password_file),
        admin.upgrade_postgresql(database, postgres_cluster.password_file),
    ):
        with pytest.raises(migrations.SchemaError) as caught:
            await attempt
        assert f"version {migrations.LATEST + 1}, newer than this relay-bridge knows (version {migrations.LATEST})" in (
            str(caught.value)
        )


async def test_concurrent_upgrades_apply_each_step_once(postgres_cluster: PostgresCluster, database: str) -> None:
    results = await asyncio.gather(
        *(admin.upgrade_postgresql(database, postgres_cluster.password_file) for _ in range(3))
    )
    assert sorted(results) == sorted([(0, migrations.LATEST)] + [(migrations.LATEST, migrations.LATEST)] * 2)
    with psycopg.connect(database, password=postgres_cluster.password) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")] == [
            s.version for s in migrations.STEPS
        ]


async def test_unreachable_and_wrong_password_are_said_clearly(
    postgres_cluster: PostgresCluster, database: str, tmp_path: Path
) -> None:
    closed = f"postgresql://relay@127.0.0.1:{free_port()}/x"
    with pytest.raises(DatabaseUnavailable, match="cannot connect to the PostgreSQL database: .*127.0.0.1"):
        await PostgresDirectory.open(closed)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the password\n")
    with pytest.raises(DatabaseUnavailable, match="password authentication failed"):
        await PostgresDirectory.open(database, password_file=wrong)


# -- db copy -------------------------------------------------------------------------------------------
def _populated_sqlite(path: Path) -> tuple[Directory, dict[str, str]]:
    sqlite = Directory(path)
    passwords = {name: sqlite.add_router(name) for name in ("hospital-a", "hospital-b", "clinic-c")}
    sqlite.set_enabled("clinic-c", False)
    sqlite.check_identity("hospital-a", b"\x01" * 32, b"\x02" * 1216)
    sqlite.touch("hospital-b")
    sqlite.publish("hospital-a", [dev("hospital-a", "PACS", "hospital-b", description="main"), dev("hospital-a", "CT")])
    sqlite.publish("hospital-b", [dev("hospital-b", "RIS", "*")])
    return sqlite, passwords


def test_db_copy_round_trip(
    postgres_cluster: PostgresCluster, database: str, tmp_path: Path, cheap_scrypt: None
) -> None:
    source = tmp_path / "bridge.sqlite3"
    sqlite, passwords = _populated_sqlite(source)
    token = sqlite.issue_enrollment_token("hospital-b", 600)
    used = sqlite.issue_enrollment_token("hospital-a", 600)
    assert sqlite.redeem_enrollment_token("hospital-a", used) is None
    expected_routers, expected_devices, expected_ids = sqlite.routers(), sqlite.devices(), sqlite.identities()
    sqlite.close()

    copied = admin.copy(source, database, postgres_cluster.password_file)
    assert copied == {"routers": 3, "enrollment_tokens": 2, "devices": 3, "shares": 2}

    async def check_copy() -> None:
        pg = await open_directory(database, password_file=postgres_cluster.password_file)
        try:
            assert await pg.routers() == expected_routers  # names, enabled flags, created and last_seen
            assert normalised(await pg.devices()) == normalised(expected_devices)
            assert await pg.identities() == expected_ids
            assert await pg.verify_password("hospital-a", passwords["hospital-a"]) is None
            assert await pg.verify_password("clinic-c", passwords["clinic-c"]) == "account disabled"
            assert await pg.redeem_enrollment_token("hospital-a", used) is TokenProblem.USED
            assert await pg.redeem_enrollment_token("hospital-b", token) is None
        finally:
            await pg.aclose()

    asyncio.run(check_copy())

    with pytest.raises(DirectoryError, match="already holds 10 directory rows; use --force"):
        admin.copy(source, database, postgres_cluster.password_file)
    fresh = tmp_path / "other.sqlite3"
    other = Directory(fresh)
    other.add_router("only-one")
    other.close()
    assert admin.copy(fresh, database, postgres_cluster.password_file, force=True)["routers"] == 1

    async def check_forced() -> None:
        pg = await open_directory(database, password_file=postgres_cluster.password_file)
        try:
            assert [r.name for r in await pg.routers()] == ["only-one"]
            assert await pg.devices() == []
        finally:
            await pg.aclose()

    asyncio.run(check_forced())


def test_db_copy_of_a_file_from_before_migrations(
    postgres_cluster: PostgresCluster, database: str, tmp_path: Path
) -> None:
    from tests.integration.directory.test_sqlite_directory import _legacy_file

    source = tmp_path / "old.sqlite3"
    _legacy_file(source)  # no schema_version table, no identity columns
    assert admin.copy(source, database, postgres_cluster.password_file) == {
        "routers": 1,
        "enrollment_tokens": 0,
        "devices": 1,
        "shares": 1,
    }
    assert not (tmp_path / "old.sqlite3-wal").exists()  # the source was only read

    async def check() -> None:
        pg = await open_directory(database, password_file=postgres_cluster.password_file)
        try:
            assert [(r.name, r.enabled) for r in await pg.routers()] == [("old-site", False)]
            assert await pg.devices() == []  # a disabled account's devices are hidden ...
            await pg.set_enabled("old-site", True)
            assert await pg.devices() == [Device("old-site", "PACS", "kept", ("*",))]  # ... but were copied
            assert await pg.identities() == {}
        finally:
            await pg.aclose()

    asyncio.run(check())


def test_db_copy_refuses_a_missing_source_and_a_sqlite_target(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    with pytest.raises(DirectoryError, match="no SQLite database at"):
        admin.copy(tmp_path / "missing.sqlite3", postgres_cluster.url(), postgres_cluster.password_file)
    with pytest.raises(DirectoryError, match="--to must be a postgresql:// URL"):
        admin.copy(tmp_path / "a.sqlite3", str(tmp_path / "b.sqlite3"), None)


# -- the CLI on PostgreSQL -----------------------------------------------------------------------------
def _config(tmp_path: Path, database: str, password_file: Path) -> Path:
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[server]\ninsecure = true\n[storage]\ndatabase = "{database}"\npassword_file = "{password_file}"\n'
        f'state_dir = "{tmp_path}"\n[audit]\nfile = "{tmp_path / "audit.jsonl"}"\n'
    )
    return config


def test_cli_db_and_admin_commands_on_postgresql(
    postgres_cluster: PostgresCluster,
    database: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cheap_scrypt: None,
) -> None:
    config = str(_config(tmp_path, database, postgres_cluster.password_file))
    assert cli.main(["-c", config, "db", "status", "--json"]) == 1  # empty: needs an upgrade
    assert json.loads(capsys.readouterr().out) == {"backend": "postgresql", "version": 0, "latest": migrations.LATEST}
    assert cli.main(["-c", config, "router", "list"]) == 1
    assert "run `relay-bridge db upgrade`" in capsys.readouterr().err
    assert cli.main(["-c", config, "db", "upgrade"]) == 0
    assert f"schema version 0 -> {migrations.LATEST}" in capsys.readouterr().out
    assert cli.main(["-c", config, "check-config"]) == 0
    capsys.readouterr()

    assert cli.main(["-c", config, "router", "add", "hospital-a", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert cli.main(["-c", config, "router", "disable", "hospital-a"]) == 0
    assert cli.main(["-c", config, "router", "add", "hospital-a"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["-c", config, "router", "list", "--json"]) == 0
    assert [(r["name"], r["enabled"]) for r in json.loads(capsys.readouterr().out)] == [("hospital-a", False)]

    async def check() -> None:
        pg = await open_directory(database, password_file=postgres_cluster.password_file)
        try:
            assert await pg.verify_password("hospital-a", added["password"]) == "account disabled"
            assert await pg.redeem_enrollment_token("hospital-a", added["enrollment_token"]) is None
            await pg.publish("hospital-a", [Device("hospital-a", "PACS", "", ("*",))])
        finally:
            await pg.aclose()

    asyncio.run(check())
    assert cli.main(["-c", config, "share", "list", "--json"]) == 0
    assert "PACS" not in capsys.readouterr().out  # a disabled router's devices are hidden
    assert cli.main(["-c", config, "router", "enable", "hospital-a"]) == 0
    capsys.readouterr()
    assert cli.main(["-c", config, "share", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"router": "hospital-a", "ae_title": "PACS", "description": "", "share_with": ["*"]}
    ]
    assert cli.main(["-c", config, "db", "status"]) == 0
    assert f"schema version: {migrations.LATEST}" in capsys.readouterr().out


def test_check_config_reports_an_unreachable_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_cluster: PostgresCluster
) -> None:
    config = _config(tmp_path, f"postgresql://relay@127.0.0.1:{free_port()}/relay", postgres_cluster.password_file)
    assert cli.main(["-c", str(config), "check-config"]) == 2
    err = capsys.readouterr().err
    assert "storage.database: cannot connect to the PostgreSQL database" in err
    assert "Traceback" not in err


async def test_a_lost_connection_is_replaced_when_checked_out(
    postgres_cluster: PostgresCluster, harness: PostgresHarness
) -> None:
    await harness.add_router("a")
    database = harness.url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_cluster.url(), password=postgres_cluster.password, autocommit=True) as admin_conn:
        killed = admin_conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    # The pool checks a connection when it hands it out (a server restart must not fail the first calls).
    assert [r.name for r in await harness.db.routers()] == ["a"]
