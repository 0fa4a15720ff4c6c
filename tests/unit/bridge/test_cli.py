"""relay-bridge's CLI, run in-process: init, check-config and router accounts."""

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
from relay_bridge.directory import Device, Directory


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Cheap password hashes; and main() installs a root log handler: put the old ones back."""
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def site(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory made by `relay-bridge init`; the tests run from somewhere else."""
    target = tmp_path / "bridge"
    assert run(capsys, "init", "--dir", str(target), "--listen", "127.0.0.1:0")[0] == 0
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return target


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- init ------------------------------------------------------------------------------


def test_init_writes_pki_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "new" / "bridge"
    rc, out, _ = run(capsys, "init", "--dir", str(target))
    assert rc == 0
    assert sorted(p.name for p in target.iterdir()) == ["bridge.toml", "ca.key", "ca.pem", "server.key", "server.pem"]
    assert mode(target / "server.key") == 0o600
    assert mode(target / "ca.key") == 0o600
    assert (target / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (target / "server.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (target / "server.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    toml = (target / "bridge.toml").read_text()
    assert 'listen = "0.0.0.0:443"' in toml and 'tls_cert = "server.pem"' in toml and 'tls_key = "server.key"' in toml
    assert out.startswith(f"wrote {target / 'ca.pem'} (give this to every router)")


def test_init_does_not_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "init", "--dir", str(tmp_path))[0] == 0
    ca = (tmp_path / "ca.pem").read_bytes()
    rc, out, err = run(capsys, "init", "--dir", str(tmp_path))
    assert rc == 1 and out == ""
    assert err == f"{tmp_path / 'bridge.toml'} exists; use --force to overwrite\n"
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert run(capsys, "init", "--dir", str(tmp_path), "--force")[0] == 0
    assert (tmp_path / "ca.pem").read_bytes() != ca


# -- check-config ----------------------------------------------------------------------


def test_check_config_after_init(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = site / "bridge.toml"
    rc, out, _ = run(capsys, "--config", str(config), "check-config")
    assert (rc, out) == (0, f"{config}: OK\n")


def test_check_config_missing_tls_cert(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site / "server.pem").unlink()
    config = site / "bridge.toml"
    rc, out, err = run(capsys, "--config", str(config), "check-config")
    assert rc == 2 and out == ""
    assert err == f"configuration error: {config}: server.tls_cert: cannot read {site / 'server.pem'}\n"


def test_check_config_missing_tls_key(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site / "server.key").unlink()
    config = site / "bridge.toml"
    rc, _, err = run(capsys, "--config", str(config), "check-config")
    assert rc == 2
    assert err == f"configuration error: {config}: server.tls_key: cannot read {site / 'server.key'}\n"


def test_check_config_bad_key(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = site / "bridge.toml"
    config.write_text(config.read_text() + "\n[limits]\nframe_queue_depth = 0\n")
    rc, _, err = run(capsys, "--config", str(config), "check-config")
    assert rc == 2
    assert err == f"configuration error: {config}: limits.frame_queue_depth: must be at least 1\n"


def test_serve_insecure_needs_the_file_to_agree(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = site / "bridge.toml"
    rc, _, err = run(capsys, "--config", str(config), "serve", "--insecure")
    assert rc == 2
    assert err == f"configuration error: {config}: server.insecure: --insecure needs insecure = true in the file too\n"


# -- router accounts ---------------------------------------------------------------------


def printed(out: str, label: str) -> str:
    """The value of a `label: value` line that `router add` printed."""
    (value,) = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith(label + ":")]
    return value


def test_router_add_prints_a_password_that_signs_on(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(site / "bridge.toml")
    rc, out, err = run(capsys, "--config", config, "router", "add", "hospital-a")
    assert rc == 0
    password = printed(out, "password")
    assert len(password) >= 12 and len(printed(out, "enrollment token")) >= 40
    assert err.startswith("router 'hospital-a' added; the token is valid 168 h, once")
    # The database is next to bridge.toml (relative to it, not to the working directory).
    assert not (Path.cwd() / "bridge.sqlite3").exists()
    d = Directory(site / "bridge.sqlite3")
    try:
        assert d.verify_password("hospital-a", password) is None
    finally:
        d.close()


def test_router_add_with_password_on_stdin_prints_nothing(
    site: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("a chosen password\n"))
    rc, out, _ = run(capsys, "--config", str(site / "bridge.toml"), "router", "add", "b", "--password-stdin")
    assert rc == 0 and "password" not in out and printed(out, "enrollment token")
    d = Directory(site / "bridge.sqlite3")
    try:
        assert d.verify_password("b", "a chosen password") is None
    finally:
        d.close()


def test_router_add_errors(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(site / "bridge.toml")
    run(capsys, "--config", config, "router", "add", "a")
    rc, out, err = run(capsys, "--config", config, "router", "add", "a")
    assert (rc, out, err) == (1, "", "error: router 'a' already exists\n")
    rc, _, err = run(capsys, "--config", config, "router", "add", "Bad Name")
    assert rc == 1
    assert err == "error: router name 'Bad Name' must be 1-63 characters of a-z, 0-9, '.', '_' or '-'\n"


def test_router_list_disable_enable_remove(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(site / "bridge.toml")
    for name in ("hospital-b", "hospital-a"):
        assert run(capsys, "--config", config, "router", "add", name)[0] == 0

    def listed() -> list[list[str]]:
        rc, out, _ = run(capsys, "--config", config, "router", "list")
        assert rc == 0
        return [line.split() for line in out.splitlines()]

    assert listed() == [["hospital-a", "enabled"], ["hospital-b", "enabled"]]
    assert run(capsys, "--config", config, "router", "disable", "hospital-a")[:2] == (
        0,
        "router 'hospital-a' disabled\n",
    )
    assert listed() == [["hospital-a", "DISABLED"], ["hospital-b", "enabled"]]
    rc, out, _ = run(capsys, "--config", config, "router", "list", "--json")
    assert [(r["name"], r["enabled"], r["last_seen"]) for r in json.loads(out)] == [
        ("hospital-a", False, None),
        ("hospital-b", True, None),
    ]
    assert run(capsys, "--config", config, "router", "enable", "hospital-a")[:2] == (0, "router 'hospital-a' enabled\n")
    assert listed() == [["hospital-a", "enabled"], ["hospital-b", "enabled"]]
    assert run(capsys, "--config", config, "router", "remove", "hospital-b")[:2] == (0, "router 'hospital-b' removed\n")
    assert listed() == [["hospital-a", "enabled"]]
    assert run(capsys, "--config", config, "router", "disable", "ghost") == (1, "", "error: no router named 'ghost'\n")


def test_disabled_router_cannot_sign_on(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(site / "bridge.toml")
    password = printed(run(capsys, "--config", config, "router", "add", "a")[1], "password")
    run(capsys, "--config", config, "router", "disable", "a")
    d = Directory(site / "bridge.sqlite3")
    try:
        assert d.verify_password("a", password) == "account disabled"
    finally:
        d.close()


def test_router_passwd(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(site / "bridge.toml")
    old = printed(run(capsys, "--config", config, "router", "add", "a")[1], "password")
    rc, out, _ = run(capsys, "--config", config, "router", "passwd", "a")
    new = out.strip()
    assert rc == 0 and new and new != old
    d = Directory(site / "bridge.sqlite3")
    try:
        assert d.verify_password("a", new) is None
        assert d.verify_password("a", old) == "wrong password"
    finally:
        d.close()


def test_share_list(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(site / "bridge.toml")
    for name in ("a", "b"):
        run(capsys, "--config", config, "router", "add", name)
    d = Directory(site / "bridge.sqlite3")
    d.publish("a", [Device("a", "PACS", "archive", ("b", "c")), Device("a", "CT", "", ())])
    d.close()
    rc, out, _ = run(capsys, "--config", config, "share", "list")
    assert rc == 0
    assert [line.split(None, 2) for line in out.splitlines()] == [
        ["a", "CT", "shared with: nobody"],
        ["a", "PACS", "shared with: b, c"],
    ]
    _, out, _ = run(capsys, "--config", config, "share", "list", "--json")
    assert json.loads(out) == [
        {"router": "a", "ae_title": "CT", "description": "", "share_with": []},
        {"router": "a", "ae_title": "PACS", "description": "archive", "share_with": ["b", "c"]},
    ]
