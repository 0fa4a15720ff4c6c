"""[storage]: a SQLite path or a postgresql:// URL, validated with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay_bridge import config as bridge_config
from relay_bridge.db import migrations
from relay_bridge.db.backend import is_postgres_url
from relay_common.config import ConfigError

HEAD = "[server]\ninsecure = true\n[storage]\n"


def load(tmp_path: Path, storage: str) -> bridge_config.BridgeConfig:
    path = tmp_path / "bridge.toml"
    path.write_text(HEAD + storage)
    return bridge_config.load(path)


def test_sqlite_stays_the_default_next_to_the_file(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert cfg.storage.database == tmp_path / "bridge.sqlite3"
    assert not cfg.storage.postgres
    assert cfg.storage.local_path == tmp_path / "bridge.sqlite3"


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_postgresql_url_is_kept_as_written(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}://relay@db.example.org:5433/relay"
    cfg = load(tmp_path, f'database = "{url}"\npassword_file = "pw"\n')
    assert cfg.storage.database == url and cfg.storage.postgres and is_postgres_url(url)
    assert cfg.storage.password_file == tmp_path / "pw"
    assert cfg.storage.local_path == tmp_path / "bridge"  # state_dir defaults to the file's directory


@pytest.mark.parametrize(
    ("storage", "key", "problem"),
    [
        ('database = "postgresql://relay:secret@db/relay"\n', "storage.database", "must not contain a password"),
        ('database = "postgresql://relay@db:port/relay"\n', "storage.database", "the port must be a number"),
        ('database = "postgresql://relay@db/relay?sslmode=disable"\n', "storage.database", "takes no ?options"),
        ('database = "mysql://relay@db/relay"\n', "storage.database", "unknown scheme 'mysql'"),
        ('database = "b.sqlite3"\npassword_file = "pw"\n', "storage.password_file", "postgresql:// database only"),
        ("database = 3\n", "storage.database", "expected a file path"),
    ],
)
def test_invalid_storage_names_the_key(tmp_path: Path, storage: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, storage)
    assert key in str(caught.value) and problem in str(caught.value)


def test_steps_are_numbered_from_one_without_gaps() -> None:
    assert [s.version for s in migrations.STEPS] == list(range(1, len(migrations.STEPS) + 1))
    assert migrations.LATEST == migrations.STEPS[-1].version
    assert all(s.sqlite.strip() and s.postgresql.strip() for s in migrations.STEPS)


def test_the_embedded_default_does_not_import_psycopg() -> None:
    import subprocess
    import sys

    code = (
        "import sys, relay_bridge.cli, relay_bridge.server, relay_bridge.db.backend, relay_bridge.db.admin;"
        "print(sorted(m for m in sys.modules if m.startswith('psycopg')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_postgresql_without_psycopg_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from relay_bridge.db.backend import open_directory
    from relay_bridge.directory import DirectoryError

    monkeypatch.setitem(sys.modules, "psycopg", None)  # what a missing package looks like to import
    with pytest.raises(DirectoryError, match=r"pip install 'dicom-relay\[postgresql\]'"):
        await open_directory("postgresql://relay@127.0.0.1:1/relay")
