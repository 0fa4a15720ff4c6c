"""`relay-bridge admin add|list|remove`: the console's accounts, scrypt-hashed in an owner-only file."""

from __future__ import annotations

import io
import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_bridge import directory as directory_module
from relay_bridge.cli import main
from relay_bridge.console import admins as admins_module
from relay_bridge.console.admins import AdminAccounts


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    monkeypatch.setattr(admins_module, "SCRYPT_N", 2**10)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str, stdin: str = ""
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_admin_accounts_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, monkeypatch, "init", "--dir", str(tmp_path), "--listen", "127.0.0.1:0")[0] == 0
    config = str(tmp_path / "bridge.toml")
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, monkeypatch, "-c", config, "admin", "add", "alice", stdin="a long password 1\n")
    assert rc == 0 and "admin 'alice' saved" in err
    path = tmp_path / "bridge.sqlite3.admins.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "a long password 1" not in path.read_text()
    record = json.loads(path.read_text())["admins"]["alice"]
    assert set(record) == {"salt", "hash", "n", "r", "p", "created"}
    accounts = AdminAccounts(path)
    assert accounts.verify("alice", "a long password 1")
    assert not accounts.verify("alice", "a long password 2") and not accounts.verify("bob", "a long password 1")

    rc, _, err = run(capsys, monkeypatch, "-c", config, "admin", "add", "bob", stdin="short\n")
    assert rc == 1 and "the password must have 12 to 1024 characters" in err
    rc, _, err = run(capsys, monkeypatch, "-c", config, "admin", "add", "Bob Smith", stdin="a long password 1\n")
    assert rc == 1 and "admin name 'Bob Smith'" in err
    assert run(capsys, monkeypatch, "-c", config, "admin", "list")[1] == "alice\n"
    rc, _, err = run(capsys, monkeypatch, "-c", config, "admin", "remove", "bob")
    assert rc == 1 and "no admin account 'bob'" in err
    assert run(capsys, monkeypatch, "-c", config, "admin", "remove", "alice")[0] == 0
    assert run(capsys, monkeypatch, "-c", config, "admin", "list")[1] == ""
