"""The directory contract on SQLite (the embedded default), and SQLite's own migrations."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay_bridge import directory as directory_module
from relay_bridge.db import migrations
from relay_bridge.db.backend import DirectoryBackend, open_directory
from relay_bridge.directory import AsyncDirectory, Directory
from tests.integration.directory.contract import DirectoryContract, Harness

CHEAP_N = 2**10

# The schema of the releases before migrations existed (and before router identities).
LEGACY_SCHEMA = """
CREATE TABLE routers (name TEXT PRIMARY KEY, password_hash BLOB NOT NULL, salt BLOB NOT NULL,
    scrypt_n INTEGER NOT NULL, scrypt_r INTEGER NOT NULL, scrypt_p INTEGER NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1, created REAL NOT NULL, last_seen REAL);
CREATE TABLE enrollment_tokens (router TEXT NOT NULL REFERENCES routers(name) ON DELETE CASCADE,
    token_sha256 BLOB PRIMARY KEY, expires REAL NOT NULL, used REAL);
CREATE TABLE devices (router TEXT NOT NULL REFERENCES routers(name) ON DELETE CASCADE, ae_title TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '', PRIMARY KEY (router, ae_title));
CREATE TABLE shares (router TEXT NOT NULL, ae_title TEXT NOT NULL, peer TEXT NOT NULL,
    PRIMARY KEY (router, ae_title, peer),
    FOREIGN KEY (router, ae_title) REFERENCES devices(router, ae_title) ON DELETE CASCADE);
"""


class SqliteHarness(Harness):
    integrity_error = sqlite3.IntegrityError

    def __init__(self, path: Path, db: AsyncDirectory) -> None:
        self.path = path
        self.db = db  # type: ignore[assignment]

    @property
    def _async(self) -> AsyncDirectory:
        assert isinstance(self.db, AsyncDirectory)
        return self.db

    async def add_router(self, name: str, password: str | None = None) -> str:
        return await self._async._call(self._async.sync.add_router, name, password)

    async def set_password(self, name: str, password: str) -> None:
        await self._async._call(self._async.sync.set_password, name, password)

    async def set_enabled(self, name: str, enabled: bool) -> None:
        await self._async._call(self._async.sync.set_enabled, name, enabled)

    async def remove_router(self, name: str) -> None:
        await self._async._call(self._async.sync.remove_router, name)

    async def issue_enrollment_token(self, name: str, ttl_s: float) -> str:
        return await self._async._call(self._async.sync.issue_enrollment_token, name, ttl_s)

    async def reset_identity(self, name: str) -> None:
        await self._async._call(self._async.sync.reset_identity, name)

    async def reopen(self) -> DirectoryBackend:
        await self.db.aclose()
        self.db = await open_directory(self.path)
        return self.db

    async def schema_version(self) -> int:
        db = sqlite3.connect(self.path)
        try:
            return migrations.sqlite_version(db)
        finally:
            db.close()


@pytest.fixture
async def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SqliteHarness]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", CHEAP_N)
    path = tmp_path / "bridge.sqlite3"
    db = await open_directory(path)
    assert isinstance(db, AsyncDirectory)
    h = SqliteHarness(path, db)
    yield h
    await h.db.aclose()


class TestSqliteDirectory(DirectoryContract):
    pass


def _legacy_file(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(LEGACY_SCHEMA)
    db.execute("INSERT INTO routers VALUES ('old-site', x'00', x'00', 1024, 8, 1, 0, 1.0, NULL)")
    db.execute("INSERT INTO devices VALUES ('old-site', 'PACS', 'kept')")
    db.execute("INSERT INTO shares VALUES ('old-site', 'PACS', '*')")
    db.commit()
    db.close()


async def test_a_file_from_before_migrations_is_version_1_and_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _legacy_file(path)
    with sqlite3.connect(path) as db:
        assert migrations.sqlite_version(db) == 1
    directory = await open_directory(path)
    try:
        assert directory.sync.schema_change == (1, migrations.LATEST)  # type: ignore[attr-defined]
        assert [r.name for r in await directory.routers()] == ["old-site"]
        assert await directory.devices() == []  # the old account is disabled: its devices are hidden
        directory.sync.set_enabled("old-site", True)  # type: ignore[attr-defined]
        assert [(d.ae_title, d.description, d.share_with) for d in await directory.devices()] == [
            ("PACS", "kept", ("*",))
        ]
        assert await directory.check_identity("old-site", b"s" * 32, b"k" * 32) is None  # the columns were added
    finally:
        await directory.aclose()
    with sqlite3.connect(path) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY version")]
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert versions == [step.version for step in migrations.STEPS]
    assert {"enrollment_tokens_router", "shares_peer"} <= indexes
    again = Directory(path)  # opening an up-to-date file changes nothing
    assert again.schema_change == (migrations.LATEST, migrations.LATEST)
    again.close()


async def test_a_newer_schema_is_refused_naming_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    Directory(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (migrations.LATEST + 1,))
    with pytest.raises(migrations.SchemaError) as caught:
        await open_directory(path)
    message = str(caught.value)
    assert f"version {migrations.LATEST + 1}" in message and f"(version {migrations.LATEST})" in message
    assert "newer than this relay-bridge" in message


def test_a_failed_step_leaves_the_earlier_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.sqlite3"
    _legacy_file(path)
    broken = migrations.Step(2, "broken", sqlite="CREATE INDEX x ON no_such_table(y)", postgresql="")
    monkeypatch.setattr(migrations, "STEPS", (migrations.STEPS[0], broken))
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        Directory(path)
    with sqlite3.connect(path) as db:
        assert migrations.sqlite_version(db) == 1
        assert db.execute("SELECT name FROM routers").fetchall() == [("old-site",)]


def test_cli_db_commands_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay_bridge import cli

    _legacy_file(tmp_path / "bridge.sqlite3")
    config = tmp_path / "bridge.toml"
    config.write_text(f'[server]\ninsecure = true\n[audit]\nfile = "{tmp_path / "audit.jsonl"}"\n')
    assert cli.main(["-c", str(config), "db", "status"]) == 1
    out = capsys.readouterr().out
    assert "backend: sqlite" in out and f"schema version: 1 (this relay-bridge: {migrations.LATEST}" in out
    assert cli.main(["-c", str(config), "db", "upgrade"]) == 0
    assert f"schema version 1 -> {migrations.LATEST}" in capsys.readouterr().out
    assert cli.main(["-c", str(config), "db", "status", "--json"]) == 0
    assert f'"version": {migrations.LATEST}' in capsys.readouterr().out
    with sqlite3.connect(tmp_path / "bridge.sqlite3") as db:
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (migrations.LATEST + 1,))
    assert cli.main(["-c", str(config), "router", "list"]) == 1
    assert "newer than this relay-bridge knows" in capsys.readouterr().err
    assert cli.main(["-c", str(config), "check-config"]) == 2
    err = capsys.readouterr().err
    assert "storage.database: the database schema is version" in err and "Traceback" not in err
