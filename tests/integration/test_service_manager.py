"""Service-manager integration with real processes: sd_notify over a real AF_UNIX datagram socket
(READY=1, WATCHDOG=1 repeatedly, STATUS= lines as they change), and the monitoring plugins
`relay-router check` / `relay-bridge check` (Nagios exit codes) as a bridge and routers go down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


class NotifySocket:
    """What systemd listens on for Type=notify services: a datagram socket named by NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[str]:
        """Everything received in the next `seconds` (one entry per datagram)."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append((time.monotonic(), message))
            got.append(message)
        return got

    def wait_for(self, predicate, seconds: float = 30.0) -> str:
        """The first datagram received so far, or within `seconds`, that matches."""
        deadline = time.monotonic() + seconds
        while True:
            for _, message in self.messages:
                if predicate(message):
                    return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching datagram; received {[m for _, m in self.messages][-20:]}")
            self.collect(0.2)

    def close(self) -> None:
        self.sock.close()


def test_bridge_and_router_notify_ready_watchdog_and_status(tmp_path: Path) -> None:
    bridge_sock = NotifySocket(tmp_path / "bridge.notify")
    router_sock = NotifySocket(tmp_path / "router.notify")
    # WatchdogSec=1s as systemd would pass it (WATCHDOG_PID unset: meant for whoever reads it).
    net = LocalRelayNetwork(
        tmp_path / "net", env={"NOTIFY_SOCKET": str(bridge_sock.path), "WATCHDOG_USEC": "1000000"}
    ).start()
    try:
        first = bridge_sock.collect(0.5)
        assert first[0] == "READY=1", first
        bridge_sock.wait_for(lambda m: m == "STATUS=serving, 0 routers connected, 0 associations")
        net.env["NOTIFY_SOCKET"] = str(router_sock.path)
        net.add_site("site-a")
        net.wait_connected()
        assert router_sock.wait_for(lambda m: m == "READY=1")
        router_sock.wait_for(lambda m: m == "STATUS=signed on as site-a, 0 associations")
        bridge_sock.wait_for(lambda m: m == "STATUS=serving, 1 router connected, 0 associations")
        # Watchdog pings keep coming, about every half second (WatchdogSec=1s), from both.
        bridge_sock.collect(0.05)  # what queued up while we waited for the router
        window = bridge_sock.collect(2.1)
        assert 3 <= window.count("WATCHDOG=1") <= 6, window
        router_sock.collect(0.05)
        assert 3 <= router_sock.collect(2.1).count("WATCHDOG=1") <= 6
        # The bridge goes away: the router says so in its status line.
        net.stop_bridge()
        assert bridge_sock.wait_for(lambda m: m.startswith("STOPPING=1"))
        line = router_sock.wait_for(lambda m: m.startswith("STATUS=not signed on"))
        assert f"the bridge at 127.0.0.1:{net.bridge_port}" in line, line
    finally:
        net.stop()
        bridge_sock.close()
        router_sock.close()


# -- monitoring plugins ------------------------------------------------------------------


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def router_check(net: LocalRelayNetwork, site: str) -> tuple[int, str]:
    config = str(net.router_config_path(site))
    result = run(
        [sys.executable, "-m", "relay_router.cli", "-c", config, "check", "--status-file", str(net.status_path(site))]
    )
    assert result.stdout.count("\n") == 1, result.stdout  # exactly one line, as plugins must
    return result.returncode, result.stdout.strip()


def bridge_check(net: LocalRelayNetwork) -> tuple[int, str]:
    result = run([sys.executable, "-m", "relay_bridge.cli", "-c", str(net.workdir / "bridge.toml"), "check"])
    assert result.stdout.count("\n") == 1, result.stdout
    return result.returncode, result.stdout.strip()


@pytest.fixture
def check_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRelayNetwork]:
    net = LocalRelayNetwork(tmp_path_factory.mktemp("check")).start()
    try:
        net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, 11112, ["site-a"])])
        net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")])
        net.wait_connected()
        yield net
    finally:
        net.stop()


def test_check_plugins_follow_the_network_going_down(check_net: LocalRelayNetwork) -> None:
    net = check_net
    code, line = router_check(net, "site-a")
    assert code == OK, line
    assert line.startswith(
        f"DICOM-RELAY OK - site-a signed on to bridge 127.0.0.1:{net.bridge_port}, 1 of 1 remote devices online"
    ), line
    assert "certificates valid for" in line and "| active_associations=0;;;0 remote_devices_online=1;;;0;1" in line
    code, line = wait_until(lambda: (r := bridge_check(net))[0] == OK and r, what="bridge check OK")
    assert "2 of 2 routers signed on" in line and "routers_signed_on=2;;;0;2" in line, line

    # A site goes down: its peer and the bridge warn, naming what is missing; the site itself is CRITICAL.
    net.stop_router("site-b")
    code, line = wait_until(lambda: (r := router_check(net, "site-a"))[0] == WARNING and r, what="site-a WARNING")
    assert "0 of 1 remote devices online (offline: ARCHIVE_B)" in line, line
    code, line = wait_until(lambda: (r := bridge_check(net))[0] == WARNING and r, what="bridge WARNING")
    assert "1 of 2 routers signed on" in line and "(down: site-b)" in line, line
    code, line = router_check(net, "site-b")
    assert code == CRITICAL and line.startswith("DICOM-RELAY CRITICAL - router site-b is not running: stopped at"), line

    # The bridge goes down: the router that is still running cannot sign on: CRITICAL.
    net.stop_bridge()
    code, line = wait_until(lambda: (r := router_check(net, "site-a"))[0] == CRITICAL and r, what="site-a CRITICAL")
    assert f"site-a is NOT signed on to bridge 127.0.0.1:{net.bridge_port}" in line, line
    code, line = bridge_check(net)
    assert code == CRITICAL and line.startswith("DICOM-RELAY CRITICAL - bridge is not running: stopped at"), line


def test_check_plugins_unknown_and_never_started(tmp_path: Path) -> None:
    net = LocalRelayNetwork(tmp_path / "net").start(bridge=False)
    code, line = bridge_check(net)
    assert code == CRITICAL and "bridge is not running: no status file" in line, line
    # A status file that cannot be parsed: the plugin cannot tell, so UNKNOWN.
    Path(f"{net.workdir / 'bridge.sqlite3'}.status.json").write_text("{not json")
    code, line = bridge_check(net)
    assert code == UNKNOWN and line.startswith("DICOM-RELAY UNKNOWN - cannot read"), line
    # A configuration error is UNKNOWN too (not exit 2, which would read as CRITICAL).
    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nlisten = 5\n")
    result = run([sys.executable, "-m", "relay_bridge.cli", "-c", str(broken), "check"])
    assert result.returncode == UNKNOWN and result.stdout.startswith("DICOM-RELAY UNKNOWN - configuration error:")
    assert "server.listen" in result.stdout, result.stdout
    status = tmp_path / "router-status.json"
    config = tmp_path / "router.toml"
    config.write_text(
        json.dumps({}).replace("{}", "")
        + '[router]\nname = "site-z"\nstate_dir = "state"\n[bridge]\naddress = "127.0.0.1:1"\ninsecure = true\n'
        + 'password = "x"\n'
    )
    result = run([sys.executable, "-m", "relay_router.cli", "-c", str(config), "check", "--status-file", str(status)])
    assert result.returncode == CRITICAL, result
    assert result.stdout.startswith("DICOM-RELAY CRITICAL - router site-z is not running: no status file"), (
        result.stdout
    )
