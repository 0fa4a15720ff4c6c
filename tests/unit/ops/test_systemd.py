"""deploy/systemd units, the service-layout configuration templates and deploy/install.sh."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from relay_common.config import load_config
from relay_common.daemon import announce_ready

REPO = Path(__file__).resolve().parents[3]
SYSTEMD = REPO / "deploy" / "systemd"
INSTALL = REPO / "deploy" / "install.sh"
BIN = Path(sys.executable).parent
STATE = "/var/lib/dicom-relay"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat, as in systemd)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values is not None, f"[{section}] {key} is missing"
    return values[-1]


@pytest.mark.parametrize("role", ["router", "bridge"])
def test_units_have_the_required_settings(role: str) -> None:
    unit = parse_unit(SYSTEMD / f"relay-{role}.service")
    service = "Service"
    required = {
        "Type": "notify",
        "User": "dicom-relay",
        "Group": "dicom-relay",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "StateDirectory": "dicom-relay",
        "ReadWritePaths": STATE,
    }
    for key, expected in required.items():
        assert one(unit, service, key) == expected, key
    assert unit[service]["ReadWritePaths"] == [STATE]  # the state directory and nothing else
    assert one(unit, service, "ExecStart") == (
        f"/opt/dicom-relay/bin/relay-{role} --config /etc/dicom-relay/{role}.toml serve"
    )
    assert one(unit, service, "ExecStartPre").endswith(f"--config /etc/dicom-relay/{role}.toml check-config")
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in one(unit, "Unit", "Wants")
    if role == "bridge":
        assert one(unit, service, "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
        assert one(unit, service, "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
        assert "EnvironmentFile" not in unit[service]
    else:
        assert one(unit, service, "CapabilityBoundingSet") == ""
        assert one(unit, service, "AmbientCapabilities") == ""
        assert one(unit, service, "EnvironmentFile") == "-/etc/dicom-relay/router.env"


def test_router_template_keeps_every_written_file_in_the_state_directory(tmp_path: Path) -> None:
    from relay_router.config import RouterConfig

    cfg = load_config(SYSTEMD / "router.toml", RouterConfig)
    assert str(cfg.router.state_dir) == STATE
    assert str(cfg.audit.file).startswith(STATE + "/")
    assert cfg.metrics.listen == "127.0.0.1:9464"
    assert cfg.logging.format == "json"
    assert cfg.bridge.password is None and cfg.bridge.password_file is None  # the env file provides it


def test_bridge_template_keeps_every_written_file_in_the_state_directory() -> None:
    from relay_bridge.config import BridgeConfig

    cfg = load_config(SYSTEMD / "bridge.toml", BridgeConfig)
    assert str(cfg.storage.database).startswith(STATE + "/")
    assert str(cfg.audit.file).startswith(STATE + "/")
    assert cfg.server.listen == "0.0.0.0:443"
    assert cfg.metrics.listen == "127.0.0.1:9465"
    from relay_router.config import RouterConfig

    assert cfg.audit.file != load_config(SYSTEMD / "router.toml", RouterConfig).audit.file  # both on one host


def test_announce_ready_reaches_systemd_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Type=notify: the daemons send READY=1 to $NOTIFY_SOCKET (path or abstract '@' name)."""
    for name in (str(tmp_path / "notify"), f"@dicom-relay-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name[1:] if name.startswith("@") else name)
            sock.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", name)
            announce_ready(None, port=1)
            assert sock.recv(100) == b"READY=1"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/install.sh into a scratch root, with this virtualenv as the prefix."""
    _require("systemd-sysusers")
    root = tmp_path_factory.mktemp("root")
    result = subprocess.run(
        ["sh", str(INSTALL), "--root", str(root), "--prefix", str(BIN.parent), "router", "bridge"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return root


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_creates_user_directories_and_files(installed: Path) -> None:
    passwd = {line.split(":")[0]: line.split(":") for line in (installed / "etc/passwd").read_text().splitlines()}
    user = passwd["dicom-relay"]
    uid, gid = int(user[2]), int(user[3])
    assert user[5] == STATE and user[6] == "/usr/sbin/nologin"
    assert uid < 1000  # a system account
    etc, state = installed / "etc/dicom-relay", installed / "var/lib/dicom-relay"
    expected = {
        etc: (0o750, 0, gid),
        state: (0o750, uid, gid),
        etc / "router.toml": (0o640, 0, gid),
        etc / "bridge.toml": (0o640, 0, gid),
        etc / "router.env": (0o600, 0, 0),
        installed / "etc/systemd/system/relay-router.service": (0o644, 0, 0),
        installed / "etc/systemd/system/relay-bridge.service": (0o644, 0, 0),
    }
    for path, (want_mode, want_uid, want_gid) in expected.items():
        assert mode(path) == want_mode, path
        if os.geteuid() == 0:  # ownership is only set when the script runs as root
            assert (path.stat().st_uid, path.stat().st_gid) == (want_uid, want_gid), path
    assert "RELAY_ROUTER_PASSWORD=" in (etc / "router.env").read_text()
    unit = parse_unit(installed / "etc/systemd/system/relay-router.service")
    assert one(unit, "Service", "ExecStart").startswith(f"{BIN}/relay-router ")


def test_installed_configuration_passes_check_config(installed: Path, tmp_path: Path) -> None:
    from relay_common.pki import make_dev_pki

    etc = installed / "etc/dicom-relay"
    pki = make_dev_pki(tmp_path, hostnames=["bridge.example.org"], ips=[])
    for name in ("ca.pem", "server.pem", "server.key"):
        shutil.copy(tmp_path / name, etc / name)
    env = {**os.environ, "RELAY_ROUTER_PASSWORD": "correct horse battery staple"}
    for role in ("router", "bridge"):
        result = subprocess.run(
            [str(BIN / f"relay-{role}"), "-c", str(etc / f"{role}.toml"), "check-config"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    assert pki.ca_cert.exists()


def test_install_again_keeps_configuration_and_tightens_secrets(installed: Path) -> None:
    etc = installed / "etc/dicom-relay"
    (etc / "router.toml").write_text((etc / "router.toml").read_text().replace("hospital-a", "st-elsewhere"))
    (etc / "router.env").chmod(0o644)
    key = etc / "server.key"
    key.write_text("secret")
    key.chmod(0o644)
    (etc / "ca.key").write_text("ca secret")
    (etc / "bridge-password").write_text("pw")
    (etc / "bridge-password").chmod(0o666)
    result = subprocess.run(
        ["sh", str(INSTALL), "--root", str(installed), "--prefix", str(BIN.parent), "router", "bridge"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert 'name = "st-elsewhere"' in (etc / "router.toml").read_text()
    assert "kept the existing" in result.stdout
    assert mode(etc / "router.env") == 0o600
    assert mode(key) == 0o640 and mode(etc / "bridge-password") == 0o640
    assert mode(etc / "ca.key") == 0o600 and "keep it off this host" in result.stdout
    users = [line for line in (installed / "etc/passwd").read_text().splitlines() if line.startswith("dicom-relay:")]
    assert len(users) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "name what to install"),
        (["webserver"], "unknown argument: webserver"),
        (["--prefix", "x", "router"], "absolute"),
    ],
)
def test_install_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(["sh", str(INSTALL), "--root", str(tmp_path), *args], capture_output=True, text=True)
    assert result.returncode == 1 and message in result.stderr


@pytest.mark.parametrize("role", ["router", "bridge"])
def test_systemd_analyze_verify(installed: Path, role: str) -> None:
    """systemd's own checker (it also checks that ExecStart exists: the installed units point at this venv)."""
    tool = _require("systemd-analyze")
    unit = installed / f"etc/systemd/system/relay-{role}.service"
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"relay-{role}.service" not in result.stderr, result.stderr  # no warning about our file either


@pytest.mark.parametrize("role", ["router", "bridge"])
def test_systemd_analyze_security_rates_the_sandbox_ok(installed: Path, role: str) -> None:
    tool = _require("systemd-analyze")
    unit = installed / f"etc/systemd/system/relay-{role}.service"
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60
    )
    if "--offline" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip("this systemd-analyze cannot rate unit files offline")
    line = next(line for line in result.stdout.splitlines() if "Overall exposure level" in line)
    score = float(line.split(":")[1].split()[0])
    assert score <= 2.0, line


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is only set when the script runs as root")
def test_install_again_gives_root_owned_state_back_to_the_service(installed: Path) -> None:
    state = installed / "var/lib/dicom-relay"
    (state / "bridge.sqlite3").write_bytes(b"")  # created by root by hand, or by an older version
    (state / "state").mkdir(exist_ok=True)
    (state / "state" / "identity.key").write_bytes(b"")
    service_uid = state.stat().st_uid
    assert service_uid != 0
    result = subprocess.run(
        ["sh", str(INSTALL), "--root", str(installed), "--prefix", str(BIN.parent), "router", "bridge"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for path in (state / "bridge.sqlite3", state / "state", state / "state" / "identity.key"):
        assert path.stat().st_uid == service_uid, path
    assert f"gave {state / 'bridge.sqlite3'} back to dicom-relay" in result.stdout
    again = subprocess.run(
        ["sh", str(INSTALL), "--root", str(installed), "--prefix", str(BIN.parent), "router", "bridge"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "back to dicom-relay" not in again.stdout  # nothing left to repair
