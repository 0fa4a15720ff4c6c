"""Administrative commands run as root must not leave files the service user cannot read.

On an installed system /var/lib/dicom-relay belongs to the service user `dicom-relay`. As root,
`relay-bridge init|router ...|share ...` become the owner of the state directory before they touch
it (everything they create is the service's), and `serve` refuses. The commands run as
subprocesses: switching user cannot be undone inside the test process. A uid with no passwd entry
stands in for the service user (and `nobody` for one that has an entry).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_common import daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
SERVICE_UID = 54321  # no passwd entry
NOBODY = 65534


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() installs a root log handler for check-config: put the old ones back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def site() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own tmp directories are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="relay-owner-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def state_dir(site: Path, uid: int = SERVICE_UID) -> Path:
    state = site / "state"
    state.mkdir(mode=0o750)
    os.chown(state, uid, uid)
    return state


def bridge(site: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay_bridge.cli", "-c", str(site / "bridge.toml"), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )


def write_bridge_config(site: Path) -> None:
    (site / "bridge.toml").write_text('[server]\ninsecure = true\n[storage]\ndatabase = "state/bridge.sqlite3"\n')


def owners(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_uid for p in directory.iterdir()}


def test_router_add_as_root_creates_the_database_as_the_state_owner(site: Path) -> None:
    state = state_dir(site)
    write_bridge_config(site)
    added = bridge(site, "router", "add", "hospital-a", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["name"] == "hospital-a"  # stdout stays clean JSON; the notice is on stderr
    assert f"running as uid {SERVICE_UID}" in added.stderr
    files = owners(state)
    assert "bridge.sqlite3" in files and set(files.values()) == {SERVICE_UID}, files
    assert (state / "bridge.sqlite3").stat().st_mode & 0o777 == 0o600
    # The service user (here: any process as that uid) can open and change it; so can root again.
    listed = bridge(site, "router", "list", "--json")
    assert listed.returncode == 0 and [r["name"] for r in json.loads(listed.stdout)] == ["hospital-a"]
    assert set(owners(state).values()) == {SERVICE_UID}


def test_a_user_with_a_passwd_entry_gets_its_own_groups(site: Path) -> None:
    state = state_dir(site, NOBODY)
    write_bridge_config(site)
    added = bridge(site, "router", "add", "hospital-a")
    assert added.returncode == 0, added.stderr
    assert "running as nobody (the owner of" in added.stderr
    assert set(owners(state).values()) == {NOBODY}


def test_a_root_owned_database_in_the_service_directory_is_refused_with_the_fix(site: Path) -> None:
    state = state_dir(site)
    write_bridge_config(site)
    (state / "bridge.sqlite3").write_bytes(b"")  # left by an earlier run as root
    result = bridge(site, "router", "add", "hospital-a")
    assert result.returncode == 1
    assert f"belongs to uid 0 but its state directory {state} to uid {SERVICE_UID}" in result.stderr
    assert f"chown {SERVICE_UID} {state / 'bridge.sqlite3'}" in result.stderr
    assert owners(state) == {"bridge.sqlite3": 0}  # nothing else created


def test_serve_as_root_is_refused_when_the_state_belongs_to_the_service(site: Path) -> None:
    state = state_dir(site, NOBODY)
    write_bridge_config(site)
    result = bridge(site, "serve", "--insecure", "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert "refusing to serve as root" in result.stderr and "sudo -u nobody relay-bridge" in result.stderr
    assert "systemctl start relay-bridge" in result.stderr
    assert owners(state) == {}


def test_init_in_a_directory_of_the_service_user_writes_its_files(site: Path) -> None:
    target = state_dir(site)
    result = subprocess.run(
        [sys.executable, "-m", "relay_bridge.cli", "init", "--dir", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    files = owners(target)
    assert {"ca.pem", "ca.key", "server.pem", "server.key", "bridge.toml"} <= set(files)
    assert set(files.values()) == {SERVICE_UID}


def test_root_owned_state_is_left_alone(site: Path) -> None:
    """The tutorial's layout (everything root's): no switch, no notice."""
    state = site / "state"
    state.mkdir()
    write_bridge_config(site)
    added = bridge(site, "router", "add", "hospital-a")
    assert added.returncode == 0 and "running as" not in added.stderr
    assert set(owners(state).values()) == {0}


def test_router_serve_as_root_is_refused(site: Path) -> None:
    state = state_dir(site)
    (site / "router.toml").write_text(
        '[router]\nname = "hospital-a"\nstate_dir = "state/router"\n'
        '[bridge]\naddress = "127.0.0.1:9"\ninsecure = true\npassword = "x"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "relay_router.cli", "-c", str(site / "router.toml"), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"refusing to serve as root: {state} belongs to uid {SERVICE_UID}" in result.stderr
    assert not (state / "router").exists()


def test_state_owner_is_none_unless_root(monkeypatch: pytest.MonkeyPatch, site: Path) -> None:
    state = state_dir(site)
    assert daemon.state_owner(state) == (SERVICE_UID, SERVICE_UID, f"uid {SERVICE_UID}")
    assert daemon.state_owner(state / "not" / "yet") == (SERVICE_UID, SERVICE_UID, f"uid {SERVICE_UID}")
    assert daemon.state_owner(site) is None  # root's own
    monkeypatch.setattr(daemon.os, "geteuid", lambda: 1000)
    assert daemon.state_owner(state) is None


def test_check_config_as_the_service_user_reports_an_unreadable_key(site: Path, capsys: pytest.CaptureFixture) -> None:
    """ExecStartPre runs check-config as the service user: a key left 0600 root must fail there, by name."""
    from relay_bridge.cli import main

    assert main(["init", "--dir", str(site), "--listen", "127.0.0.1:0"]) == 0
    for name in ("bridge.toml", "server.pem", "ca.pem"):
        (site / name).chmod(0o644)
    assert (site / "server.key").stat().st_mode & 0o777 == 0o600
    capsys.readouterr()
    os.seteuid(NOBODY)
    try:
        code = main(["-c", str(site / "bridge.toml"), "check-config"])
    finally:
        os.seteuid(0)
    err = capsys.readouterr().err
    assert code == 2
    assert f"server.tls_key: cannot read {site / 'server.key'}: permission denied for nobody" in err, err
    assert "owner uid 0" in err and "mode 0600" in err
    assert main(["-c", str(site / "bridge.toml"), "check-config"]) == 0  # root may read it


def test_relative_paths_from_a_directory_the_service_user_cannot_enter(site: Path) -> None:
    """`cd /root && sudo relay-bridge -c ../etc/...`: paths are made absolute before the switch."""
    state = state_dir(site)
    write_bridge_config(site)
    private = site / "private"
    private.mkdir(mode=0o700)
    added = subprocess.run(
        [sys.executable, "-m", "relay_bridge.cli", "-c", "../bridge.toml", "router", "add", "hospital-a"],
        cwd=private,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    assert set(owners(state).values()) == {SERVICE_UID} and "bridge.sqlite3" in owners(state)
