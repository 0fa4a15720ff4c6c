"""Operations against a live network: status commands, metrics, health check, readiness, default paths.

Everything a hospital engineer would run is run here as a subprocess: `relay-router status|devices`,
`relay-bridge status`, a Prometheus scrape over HTTP, a gRPC health check over TLS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def router_cli(net: LocalRelayNetwork, site: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = str(net.router_config_path(site))
    return run(
        [sys.executable, "-m", "relay_router.cli", "-c", config, *args, "--status-file", str(net.status_path(site))]
    )


def router_status(net: LocalRelayNetwork, site: str) -> tuple[int, dict]:
    result = router_cli(net, site, "status", "--json")
    return result.returncode, json.loads(result.stdout)


def bridge_status(net: LocalRelayNetwork) -> tuple[int, dict]:
    result = run([sys.executable, "-m", "relay_bridge.cli", "-c", str(net.workdir / "bridge.toml"), "status", "--json"])
    return result.returncode, json.loads(result.stdout)


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def device(report: dict, title: str) -> dict:
    return next(r for r in report["remote_devices"] if r["ae_title"] == title)


def router_named(report: dict, name: str) -> dict:
    return next(r for r in report["routers"] if r["name"] == name)


@pytest.fixture
def ops_net(
    tmp_path_factory: pytest.TempPathFactory, archive_factory: Callable[..., DemoArchive]
) -> Iterator[LocalRelayNetwork]:
    """A bridge and two routers, each with metrics on an ephemeral port; site-b shares ARCHIVE_B with site-a."""
    net = LocalRelayNetwork(tmp_path_factory.mktemp("ops")).start(bridge=False)
    with (net.workdir / "bridge.toml").open("a") as out:
        out.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
    net.start_bridge()
    archive = archive_factory("ARCHIVE_B")
    try:
        net.add_site(
            "site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])], metrics_listen="127.0.0.1:0"
        )
        net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], metrics_listen="127.0.0.1:0")
        net.wait_connected()
        yield net
    finally:
        net.stop()


def test_status_commands_follow_a_router_going_down_and_up(ops_net: LocalRelayNetwork) -> None:
    net = ops_net
    code, a = router_status(net, "site-a")
    assert code == 0 and a["running"] and a["connected"], a
    assert device(a, "ARCHIVE_B")["online"]
    code, bridge = bridge_status(net)
    assert code == 0 and bridge["running"]
    wait_until(lambda: bridge_status(net)[1]["signed_on"] == 2, what="both routers in the bridge status")
    links = bridge_status(net)[1]["links"]
    assert {"from": "site-a", "to": "site-b", "devices": ["ARCHIVE_B"], "up": True, "down_sites": []} in links

    # An unknown title and an offline site: both end up in `status` and in the refusal metrics.
    a_metrics = a["metrics"]["listen"]
    before = scrape(a_metrics)
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(Verification)
    assert not ae.associate(HOST, net.sites["site-a"].port, ae_title="NOPE").is_established

    net.stop_router("site-b")
    code, b = router_status(net, "site-b")
    assert code == 3 and not b["running"] and b["problem"].startswith("stopped at"), b
    text = router_cli(net, "site-b", "status")
    assert text.returncode == 3 and "relay-router site-b: NOT RUNNING: stopped at" in text.stdout
    wait_until(lambda: not device(router_status(net, "site-a")[1], "ARCHIVE_B")["online"], what="ARCHIVE_B offline")
    wait_until(lambda: not router_named(bridge_status(net)[1], "site-b")["signed_on"], what="site-b signed off")
    code, a = router_status(net, "site-a")
    assert code == 0 and device(a, "ARCHIVE_B")["in_directory"]  # known, but its site is offline
    devices = router_cli(net, "site-a", "devices")
    assert devices.returncode == 0
    assert "ARCHIVE_B         site-b               ARCHIVE_B         offline" in devices.stdout
    bridge_text = run([sys.executable, "-m", "relay_bridge.cli", "-c", str(net.workdir / "bridge.toml"), "status"])
    assert bridge_text.returncode == 0 and "○ site-b  down since" in bridge_text.stdout, bridge_text.stdout
    assert "down (site-b offline)" in bridge_text.stdout
    assert not ae.associate(HOST, net.sites["site-a"].port, ae_title="ARCHIVE_B").is_established

    def refusals_counted() -> bool:
        after = scrape(a_metrics)
        return (
            metric(after, "relay_router_refusals_total", reason="unknown_called_ae")
            == metric(before, "relay_router_refusals_total", reason="unknown_called_ae") + 1
            and metric(after, "relay_router_refusals_total", reason="site_offline")
            == metric(before, "relay_router_refusals_total", reason="site_offline") + 1
        )

    wait_until(refusals_counted, what="both refusals in the router's metrics")
    wait_until(
        lambda: (
            [r["reason"] for r in router_status(net, "site-a")[1]["recent"]["last"][-2:]]
            == ["unknown_called_ae", "site_offline"]
        ),
        what="both refusals in the router's status file",
    )
    assert router_status(net, "site-a")[1]["recent"]["total"] == 2
    wait_until(
        lambda: [r["reason"] for r in bridge_status(net)[1]["recent"]["last"]] == ["site_offline"],
        what="the refusal in the bridge's status file (the unknown title never reached the bridge)",
    )

    net.start_router("site-b")
    net.wait_connected()
    code, b = router_status(net, "site-b")
    assert code == 0 and b["running"] and b["connected"]
    wait_until(lambda: router_named(bridge_status(net)[1], "site-b")["signed_on"], what="site-b signed on again")
    wait_until(lambda: device(router_status(net, "site-a")[1], "ARCHIVE_B")["online"], what="ARCHIVE_B online")

    # A crash (no chance to mark the file stopped) is noticed from the process id at once.
    net.stop_router("site-a", kill=True)
    code, a = router_status(net, "site-a")
    assert code == 3 and "is gone" in a["problem"], a


def test_metrics_are_scraped_during_a_transfer(ops_net: LocalRelayNetwork, ct_series: list[Path]) -> None:
    net = ops_net
    a_address = router_status(net, "site-a")[1]["metrics"]["listen"]
    b_address = router_status(net, "site-b")[1]["metrics"]["listen"]
    bridge_address = bridge_status(net)[1]["metrics"]["listen"]
    assert a_address and b_address and bridge_address
    before = {
        name: scrape(address) for name, address in (("a", a_address), ("b", b_address), ("bridge", bridge_address))
    }
    datasets = [pydicom.dcmread(path) for path in ct_series]
    pixel_bytes = sum(len(ds.PixelData) for ds in datasets)

    ae = AE(ae_title="WS_A")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(HOST, net.sites["site-a"].port, ae_title="ARCHIVE_B")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
        # Still established: the counters already show what was sent.
        during = scrape(a_address)
        sent = metric(during, "relay_router_relayed_bytes_total", direction="to_remote") - metric(
            before["a"], "relay_router_relayed_bytes_total", direction="to_remote"
        )
        assert sent >= pixel_bytes, (sent, pixel_bytes)
        assert metric(during, "relay_router_active_associations") == 1
        assert metric(during, "relay_router_frames_total", direction="to_remote") > metric(
            before["a"], "relay_router_frames_total", direction="to_remote"
        )
        assert metric(during, "relay_router_association_setup_seconds_count", direction="outbound") == 1 + metric(
            before["a"], "relay_router_association_setup_seconds_count", direction="outbound"
        )
        b_during = scrape(b_address)
        received = metric(b_during, "relay_router_relayed_bytes_total", direction="to_local") - metric(
            before["b"], "relay_router_relayed_bytes_total", direction="to_local"
        )
        assert received >= pixel_bytes
        bridge_during = scrape(bridge_address)
        assert metric(bridge_during, "relay_bridge_active_associations") == 1
        assert metric(bridge_during, "relay_bridge_relayed_bytes_total", direction="from_initiator") > metric(
            before["bridge"], "relay_bridge_relayed_bytes_total", direction="from_initiator"
        )
    finally:
        assoc.release()

    def settled() -> bool:
        a, b, bridge = scrape(a_address), scrape(b_address), scrape(bridge_address)
        return (
            metric(a, "relay_router_associations_total", direction="outbound", result="released")
            == metric(before["a"], "relay_router_associations_total", direction="outbound", result="released") + 1
            and metric(b, "relay_router_associations_total", direction="inbound", result="released")
            == metric(before["b"], "relay_router_associations_total", direction="inbound", result="released") + 1
            and metric(bridge, "relay_bridge_associations_total", outcome="relayed")
            == metric(before["bridge"], "relay_bridge_associations_total", outcome="relayed") + 1
            and metric(a, "relay_router_active_associations") == 0
        )

    wait_until(settled, what="the association counted as released everywhere")
    after = scrape(a_address)
    assert metric(after, "relay_router_relayed_bytes_total", direction="to_remote") >= metric(
        during, "relay_router_relayed_bytes_total", direction="to_remote"
    )  # counters never go back
    assert metric(scrape(bridge_address), "relay_bridge_association_setup_seconds_count") >= 1
    assert metric(scrape(bridge_address), "relay_bridge_router_signed_on", site="site-a") == 1
    wait_until(lambda: router_status(net, "site-a")[1]["recent"]["last"], what="the association in the status file")
    last = router_status(net, "site-a")[1]["recent"]["last"][-1]
    assert last["result"] == "released" and last["called_ae"] == "ARCHIVE_B" and last["bytes_to_remote"] >= pixel_bytes
    # Labels carry no AE title that a device chose: the calling title WS_A appears nowhere.
    for address in (a_address, b_address, bridge_address):
        assert not any("WS_A" in v for (_, labels) in scrape(address) for _, v in labels)


def test_bridge_health_check_over_tls(ops_net: LocalRelayNetwork) -> None:
    ca = (ops_net.workdir / "ca.pem").read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"{HOST}:{ops_net.bridge_port}", credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "relay.v1.Relay"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # A client that does not trust the bridge's CA gets nowhere.
    from relay_common.pki import make_dev_pki

    other = make_dev_pki(ops_net.workdir / "other-ca", hostnames=["localhost"], ips=["127.0.0.1"])
    wrong = grpc.ssl_channel_credentials(root_certificates=other.ca_cert.read_bytes())
    with grpc.secure_channel(f"{HOST}:{ops_net.bridge_port}", wrong, options=options) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def next_readiness(sock: socket.socket) -> bytes:
    """The next datagram that is not a STATUS= or WATCHDOG= update (those follow READY=1 while serving)."""
    while True:
        message = sock.recv(256)
        if not message.startswith((b"STATUS=", b"WATCHDOG=")):
            return message


def test_readiness_reaches_systemd_after_status_and_metrics_are_up(tmp_path: Path) -> None:
    """Type=notify: READY=1 arrives once the status file exists and the metrics port answers."""
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(30)
        net = LocalRelayNetwork(tmp_path / "net", env={"NOTIFY_SOCKET": str(notify)}).start(bridge=False)
        with (net.workdir / "bridge.toml").open("a") as out:
            out.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
        try:
            net.start_bridge()
            assert next_readiness(sock) == b"READY=1"
            bridge = json.loads((net.workdir / "bridge.sqlite3.status.json").read_text())
            assert bridge["running"] and scrape(bridge["metrics"]["listen"])
            net.add_site("site-a", metrics_listen="127.0.0.1:0")
            assert next_readiness(sock) == b"READY=1"
            status = net.status("site-a")
            assert status["running"] and status["dicom_port"] == net.sites["site-a"].port
            assert scrape(status["metrics"]["listen"])
        finally:
            net.stop()


def test_router_keeps_its_status_in_state_dir_by_default(ops_net: LocalRelayNetwork) -> None:
    """Without --status-file (as under systemd), `serve` and `status` agree on STATE_DIR/status.json."""
    net = ops_net
    net.add_site("site-c", remote=[Remote("ARCHIVE_B", "site-b")], start=False, metrics_listen="")
    config = str(net.router_config_path("site-c"))
    ready = net.workdir / "site-c.ready"
    log = (net.workdir / "router-site-c.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay_router.cli", "-c", config, "serve", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        wait_until(ready.exists, what="site-c ready")
        default = net.workdir / "state-site-c" / "status.json"
        assert default.exists()
        cli = [sys.executable, "-m", "relay_router.cli", "-c", config]
        wait_until(lambda: run([*cli, "status"]).returncode == 0, what="site-c signed on")
        report = json.loads(run([*cli, "status", "--json"]).stdout)
        assert report["status_file"] == str(default) and report["metrics"] == {"listen": None, "error": None}
        # ARCHIVE_B is shared with site-a only: site-c's route is not in its directory.
        devices = json.loads(run([*cli, "devices", "--json"]).stdout)
        assert devices == [
            {
                "ae_title": "ARCHIVE_B",
                "site": "site-b",
                "remote_ae_title": "ARCHIVE_B",
                "source": "remote",
                "in_directory": False,
                "online": False,
                "description": "",
                "services": [],  # not in the directory: nothing granted is known (issue 18)
            }
        ]
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        stopped = run([*cli, "status"])
        assert stopped.returncode == 3 and "NOT RUNNING: stopped at" in stopped.stdout
        assert json.loads(default.read_text())["running"] is False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_default_metrics_port_clash_is_logged_not_fatal(ops_net: LocalRelayNetwork) -> None:
    """Two routers on one host with the default port: the second serves DICOM without metrics."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        net = ops_net
        net.add_site("site-d", metrics_listen=f"{HOST}:{port}")
        net.wait_connected()
        status = net.status("site-d")
        assert status["connected"] and status["metrics"]["listen"] is None
        assert f"cannot listen on {HOST}:{port}" in status["metrics"]["error"]
        assert "metrics disabled" in net.log("site-d")
        text = router_cli(net, "site-d", "status").stdout
        assert f"metrics: cannot listen on {HOST}:{port}" in text
    assert os.path.exists(net.status_path("site-d"))


def test_bridge_database_backup_while_running(ops_net: LocalRelayNetwork, tmp_path: Path) -> None:
    """docs/operations.md: sqlite3 .backup of the live database gives a consistent, usable copy."""
    sqlite3 = shutil.which("sqlite3")
    if sqlite3 is None:
        pytest.skip("sqlite3 is not installed (apt-get install sqlite3)")
    backup = tmp_path / "bridge-backup.sqlite3"
    result = run([sqlite3, str(ops_net.workdir / "bridge.sqlite3"), f".backup '{backup}'"])
    assert result.returncode == 0, result.stderr
    assert run([sqlite3, str(backup), "PRAGMA integrity_check"]).stdout.strip() == "ok"
    config = tmp_path / "bridge.toml"
    config.write_text(f'[server]\ninsecure = true\n[storage]\ndatabase = "{backup.name}"\n')
    bridge_cli = [sys.executable, "-m", "relay_bridge.cli", "-c", str(config)]
    routers = json.loads(run([*bridge_cli, "router", "list", "--json"]).stdout)
    assert {r["name"] for r in routers} == {"site-a", "site-b"}
    shares = json.loads(run([*bridge_cli, "share", "list", "--json"]).stdout)
    assert [(d["router"], d["ae_title"]) for d in shares] == [("site-b", "ARCHIVE_B")]
    assert router_status(ops_net, "site-a")[1]["connected"]  # the running bridge did not notice


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
def test_enroll_as_root_writes_the_keys_as_the_state_owner(ops_net: LocalRelayNetwork) -> None:
    """`sudo relay-router enroll` on an installed router: the keys must stay readable by the service user.

    The password file is root's (0600) and is read before the switch; the identity and client keys
    are then created by the owner of the state directory.
    """
    import tempfile

    token = json.loads(ops_net.bridge_admin("router", "add", "site-x", "--json", stdin=None).stdout)
    site = Path(tempfile.mkdtemp(prefix="relay-enroll-"))
    try:
        site.chmod(0o755)
        state = site / "state"
        state.mkdir(mode=0o750)
        os.chown(state, 54321, 54321)
        shutil.copy(ops_net.workdir / "ca.pem", site / "ca.pem")
        (site / "bridge-password").write_text(token["password"] + "\n")
        (site / "bridge-password").chmod(0o600)
        (site / "router.toml").write_text(
            '[router]\nname = "site-x"\nstate_dir = "state"\n'
            f'[bridge]\naddress = "{HOST}:{ops_net.bridge_port}"\nca_file = "ca.pem"\nserver_name = "localhost"\n'
            'password_file = "bridge-password"\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "RELAY_ROUTER_PASSWORD"}
        cli = [sys.executable, "-m", "relay_router.cli", "-c", str(site / "router.toml")]
        result = run([*cli, "enroll", "--token", token["enrollment_token"]], env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("enrolled site-x; identity fingerprint ")
        assert "running as uid 54321" in result.stderr
        created = {p.name: p.stat().st_uid for p in state.iterdir()}
        assert "identity.key" in created and set(created.values()) == {54321}, created
        assert (state / "identity.key").stat().st_mode & 0o777 == 0o600
        fingerprint = run([*cli, "fingerprint"], env=env)
        assert fingerprint.returncode == 0 and fingerprint.stdout.strip() in result.stdout
    finally:
        shutil.rmtree(site)


# -- progress on a terminal, clean output everywhere else ---------------------------------------

ANSI = "\x1b["


def run_in_terminal(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` with stdin, stdout and stderr on a pseudo-terminal, as at an administrator's shell."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(60), b"".join(chunks).decode(errors="replace")


def test_devices_echo_checks_each_route_through_the_relay(ops_net: LocalRelayNetwork) -> None:
    net = ops_net
    result = router_cli(net, "site-a", "devices", "--echo", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(result.stdout)  # a pipe: pure JSON, no progress anywhere
    assert ANSI not in result.stdout and ANSI not in result.stderr and "C-ECHO" not in result.stderr
    assert [(r["ae_title"], r["echo"]["ok"], r["echo"]["detail"]) for r in rows] == [("ARCHIVE_B", True, "Success")]
    text = router_cli(net, "site-a", "devices", "--echo")
    assert text.returncode == 0 and ANSI not in text.stdout + text.stderr
    assert re.search(r"ARCHIVE_B +site-b +ARCHIVE_B +online +ok, \d+ ms", text.stdout), text.stdout
    wait_until(lambda: router_status(net, "site-a")[1]["recent"]["last"], what="the C-ECHO in the status file")
    assert router_status(net, "site-a")[1]["recent"]["last"][-1]["calling_ae"] == "ECHOSCU"

    # On a terminal: a progress display on stderr, then the same table.
    config = str(net.router_config_path("site-a"))
    cli = [sys.executable, "-m", "relay_router.cli", "-c", config]
    code, screen = run_in_terminal([*cli, "devices", "--echo", "--status-file", str(net.status_path("site-a"))])
    assert code == 0 and "C-ECHO ARCHIVE_B (ARCHIVE_B at site-b)" in screen and ANSI in screen, screen
    assert re.search(r"ARCHIVE_B +site-b +ARCHIVE_B +online +ok, \d+ ms", screen)
    # --json on a terminal: nothing but the JSON document.
    code, screen = run_in_terminal(
        [*cli, "devices", "--echo", "--json", "--status-file", str(net.status_path("site-a"))]
    )
    assert code == 0 and ANSI not in screen and json.loads(screen)[0]["echo"]["ok"], screen

    net.stop_router("site-b")
    wait_until(lambda: not device(router_status(net, "site-a")[1], "ARCHIVE_B")["online"], what="ARCHIVE_B offline")
    failed = router_cli(net, "site-a", "devices", "--echo", "--json")
    assert failed.returncode == 4, failed.stdout + failed.stderr
    echo = json.loads(failed.stdout)[0]["echo"]
    assert not echo["ok"] and echo["detail"].startswith("rejected (Rejected Transient"), echo


def test_status_json_on_a_terminal_is_plain_json(ops_net: LocalRelayNetwork) -> None:
    net = ops_net
    code, screen = run_in_terminal(
        [sys.executable, "-m", "relay_bridge.cli", "-c", str(net.workdir / "bridge.toml"), "status", "--json"]
    )
    assert code == 0 and ANSI not in screen and json.loads(screen)["running"], screen
    code, screen = run_in_terminal(
        [sys.executable, "-m", "relay_bridge.cli", "-c", str(net.workdir / "bridge.toml"), "status"]
    )
    assert code == 0 and ANSI in screen and "site-a -> site-b" in screen  # the colored map, for a person
    plain = run([sys.executable, "-m", "relay_bridge.cli", "-c", str(net.workdir / "bridge.toml"), "status"])
    assert plain.returncode == 0 and ANSI not in plain.stdout and "site-a -> site-b" in plain.stdout


def test_enroll_shows_a_spinner_on_a_terminal_only(ops_net: LocalRelayNetwork, tmp_path: Path) -> None:
    net = ops_net
    accounts = {
        name: json.loads(net.bridge_admin("router", "add", name, "--json").stdout) for name in ("site-t", "site-p")
    }
    shutil.copy(net.workdir / "ca.pem", tmp_path / "ca.pem")

    def config(name: str) -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'[router]\nname = "{name}"\nstate_dir = "state-{name}"\n'
            f'[bridge]\naddress = "{HOST}:{net.bridge_port}"\nca_file = "ca.pem"\nserver_name = "localhost"\n'
            f'password = "{accounts[name]["password"]}"\n'
        )
        return str(path)

    def token(name: str) -> str:
        return str(accounts[name]["enrollment_token"])

    code, screen = run_in_terminal(
        [sys.executable, "-m", "relay_router.cli", "-c", config("site-t"), "enroll", "--token", token("site-t")]
    )
    assert code == 0 and f"enrolling site-t with the bridge at {HOST}:{net.bridge_port}" in screen, screen
    assert "enrolled site-t; identity fingerprint" in screen
    piped = run(
        [sys.executable, "-m", "relay_router.cli", "-c", config("site-p"), "enroll", "--token", token("site-p")]
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("enrolled site-p; identity fingerprint ") and piped.stderr == ""


def test_a_port_in_use_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    bridge_cli = [sys.executable, "-m", "relay_bridge.cli", "-c", str(tmp_path / "bridge.toml")]
    assert run([sys.executable, "-m", "relay_bridge.cli", "init", "--dir", str(tmp_path)]).returncode == 0
    (tmp_path / "router.toml").write_text(
        '[router]\nname = "hospital-a"\n[bridge]\naddress = "127.0.0.1:9"\ninsecure = true\npassword = "x"\n'
        '[metrics]\nlisten = ""\n'
    )
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        address = f"{HOST}:{taken.getsockname()[1]}"
        bridge = run([*bridge_cli, "serve", "--listen", address])
        router = run(
            [
                sys.executable,
                "-m",
                "relay_router.cli",
                "-c",
                str(tmp_path / "router.toml"),
                "serve",
                "--listen",
                address,
            ]
        )
    for result in (bridge, router):
        assert result.returncode == 1, result.stderr
        assert f"error: cannot listen on {address}: the address is in use" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_sign_on_failures_read_as_the_troubleshooting_guide_says(ops_net: LocalRelayNetwork, tmp_path: Path) -> None:
    """docs/operations.md, "The router does not sign on": the `last error` texts it lists are the real ones."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = guide[guide.index("### The router does not sign on") : guide.index("### The service does not start")]
    net = ops_net
    from relay_common.pki import make_dev_pki

    other = make_dev_pki(tmp_path / "other-ca", hostnames=["localhost"], ips=["127.0.0.1"])
    cases = {
        "wrong-password": (net.workdir / "ca.pem", "not-the-password", "wrong account name or password"),
        "wrong-ca": (other.ca_cert, "whatever-password", "CERTIFICATE_VERIFY_FAILED"),
    }
    for name, (ca, password, expected) in cases.items():
        assert expected in section, expected
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'[router]\nname = "site-a"\nstate_dir = "state-{name}"\n'
            f'[bridge]\naddress = "{HOST}:{net.bridge_port}"\nca_file = "{ca}"\nserver_name = "localhost"\n'
            f'password = "{password}"\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n'
            '[metrics]\nlisten = ""\n[dicom]\nlisten = "127.0.0.1:0"\n'
        )
        cli = [sys.executable, "-m", "relay_router.cli", "-c", str(config)]
        proc = subprocess.Popen([*cli, "serve"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(
                lambda cli=cli, expected=expected: (
                    expected in (json.loads(run([*cli, "status", "--json"]).stdout).get("last_error") or "")
                ),
                what=f"{expected!r} as the last error",
            )
            text = run([*cli, "status"])
            assert text.returncode == 1 and "NOT signed on to the bridge" in text.stdout
        finally:
            proc.terminate()
            proc.wait(30)
