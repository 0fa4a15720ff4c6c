"""HAProxy's health checks against a real bridge: a drain is seen at once, and client certificates.

The checks are the ones docs/high-availability.md gives (tests.support.haproxy writes them):
- `GET /readyz` on the bridge's metrics port (`option httpchk`, `http-check expect status 200`):
  503 from the first moment of a drain;
- a `tcp-check` asking the gRPC health service over TLS on the router-facing port: NOT_SERVING
  from the first moment of a drain, judged the moment it arrives (not at `timeout check`).

"At once" is asserted by the reason HAProxy logs when it marks the bridge down (a 503, a content
mismatch), never a timeout, while the drain still waits for a running association: so the bridge
left rotation during its drain, not at its exit. The seconds are printed, and measured in
benchmarks.cluster (`--health http`), not asserted.

The bridge runs on SQLite here: a health check is the same for one bridge and for a replica.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay_common.files import write_private
from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.certs import issue_pair
from tests.support.haproxy import HAProxy, haproxy_binary
from tests.support.ports import free_port

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
SPARE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nspare\n"
CHECK_TIMEOUT = "timeout check 1s"  # tests.support.haproxy's: a check that waited for it would say "timeout"


def _require_haproxy() -> None:
    if haproxy_binary() is None:  # a missing part fails under CI (tests/conftest.py turns skips into failures)
        pytest.skip("HAProxy is not installed (Debian: apt-get install -y haproxy)")


def _bridge(work: Path, extra_server: str = "") -> tuple[LocalRelayNetwork, int]:
    """A network whose bridge drains for up to 30 s and serves /readyz on its own metrics port."""
    net = LocalRelayNetwork(work).start(bridge=False)
    metrics_port = free_port()
    config = net.workdir / "bridge.toml"
    text = config.read_text().replace(
        'tls_key = "server.key"\n', f'tls_key = "server.key"\ndrain_grace_s = 30\n{extra_server}'
    )
    config.write_text(text + f'\n[metrics]\nlisten = "{HOST}:{metrics_port}"\n')
    net.start_bridge()
    return net, metrics_port


def _haproxy(net: LocalRelayNetwork, name: str, spare: int | None = None, **checks: object) -> HAProxy:
    """HAProxy with one frontend to the bridge (server `bridge`; `spare`: a backup server on that port) and the
    given check settings."""
    work = net.workdir / name
    work.mkdir()
    assert net.bridge_port
    servers = [("bridge", net.bridge_port)] + ([] if spare is None else [("spare", spare)])
    return HAProxy(work, {"relay": servers}, **checks).start()  # type: ignore[arg-type]


class Spare(socketserver.ThreadingTCPServer):
    """HAProxy's backup server in the drain test: answers any HTTP check with 200 and counts the test's own
    connections (those that start with PROBE), so the test sees where HAProxy sends a new connection."""

    daemon_threads = True
    probes = 0

    def __init__(self) -> None:
        spare = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(2)
                with contextlib.suppress(OSError):
                    first = self.request.recv(1024)
                    if first.startswith(b"PROBE"):
                        spare.probes += 1
                    elif first.startswith(b"GET"):
                        self.request.sendall(SPARE_ANSWER)

        super().__init__((HOST, 0), Handler)
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _probe(balancer: HAProxy) -> None:
    """One new TCP connection through the balancer's frontend, as a router's would be."""
    with socket.create_connection((HOST, balancer.ports["relay"]), timeout=5) as conn:
        conn.sendall(b"PROBE\n")
        time.sleep(0.2)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[LocalRelayNetwork, int]]:
    _require_haproxy()
    net, metrics_port = _bridge(tmp_path / "net")
    try:
        yield net, metrics_port
    finally:
        net.stop()


def test_a_draining_bridge_fails_both_health_checks_at_once_not_at_their_timeout(
    network: tuple[LocalRelayNetwork, int], archive_factory: Callable[..., DemoArchive]
) -> None:
    net, metrics_port = network
    archive = archive_factory("ARCHIVE_B")
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    site_a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")])
    net.wait_connected()
    spare = Spare()
    http = _haproxy(net, "haproxy-http", spare.port, readiness_ports={"bridge": metrics_port, "spare": spare.port})
    grpc = _haproxy(net, "haproxy-grpc", grpc_health_ca=net.workdir / "ca.pem")
    try:
        for balancer in (http, grpc):
            assert CHECK_TIMEOUT in balancer.config()
            balancer.wait_check("bridge", "L7OK")  # the check passes while the bridge serves
        http.wait_check("spare", "L7OK")
        _probe(http)
        assert spare.probes == 0, "a new connection went to the backup while the bridge serves"
        # An association kept open through the bridge: the drain waits for it (up to drain_grace_s = 30 s).
        ae = AE(ae_title="WS_A")
        ae.add_requested_context(Verification)
        assert site_a.port
        association = ae.associate(HOST, site_a.port, ae_title="ARCHIVE_B")
        assert association.is_established
        try:
            assert association.send_c_echo().Status == 0x0000
            logged_http, logged_grpc = (b.log_path.stat().st_size for b in (http, grpc))
            assert net.bridge is not None
            sigterm = time.monotonic()
            net.bridge.send_signal(signal.SIGTERM)
            down_http = http.wait_state("bridge", up=False, after=logged_http)
            seconds_http = time.monotonic() - sigterm
            down_grpc = grpc.wait_state("bridge", up=False, after=logged_grpc)
            seconds_grpc = time.monotonic() - sigterm
            assert net.bridge.poll() is None, "the bridge exited instead of draining"  # still draining
            assert "timeout" not in down_http.lower() and "code: 503" in down_http, down_http
            assert "timeout" not in down_grpc.lower() and "did not match content" in down_grpc, down_grpc
            _probe(http)  # a new connection now: HAProxy sends it to the backup, not to the draining bridge
            assert spare.probes == 1, "the new connection did not go to the backup"
            assert net.bridge.poll() is None  # and all this while the bridge was still draining
            print(f"\nmarked down after SIGTERM: /readyz {seconds_http:.2f} s, gRPC health {seconds_grpc:.2f} s")
            assert association.send_c_echo().Status == 0x0000  # the running association is not touched
        finally:
            association.release()
        assert net.bridge.wait(30) == 0
    finally:
        http.stop()
        grpc.stop()
        spare.shutdown()
        spare.server_close()


def test_with_require_client_cert_the_grpc_check_needs_the_balancers_certificate(tmp_path: Path) -> None:
    """The gRPC check connects to the router-facing TLS port: with `require_client_cert` it must present a
    certificate of the client CA (`crt` on the server line). Without one it fails on the TLS handshake and
    HAProxy says so; the /readyz check needs no certificate at all."""
    _require_haproxy()
    net, metrics_port = _bridge(tmp_path / "net", 'require_client_cert = true\nclient_ca = "ca.pem"\n')
    work = net.workdir
    cert, key, _ = issue_pair(work / "ca.pem", work / "ca.key", common_name="haproxy-health-check", client=True)
    write_private(work / "haproxy-check.pem", (cert + key).decode())
    balancers: list[HAProxy] = []
    try:
        with_cert = _haproxy(net, "with-cert", grpc_health_ca=work / "ca.pem", check_crt=work / "haproxy-check.pem")
        balancers.append(with_cert)
        without = _haproxy(net, "without-cert", grpc_health_ca=work / "ca.pem")
        balancers.append(without)
        readyz = _haproxy(net, "readyz", readiness_ports={"bridge": metrics_port})
        balancers.append(readyz)

        down = without.wait_state("bridge", up=False)
        failed = without.stat("bridge")
        for _ in range(100):  # "* L7RSP" with no text: the next check is running; read the finished one
            if not failed["check_status"].startswith("*"):
                break
            time.sleep(0.05)
            failed = without.stat("bridge")
        # TLS 1.3: the replica checks the client certificate after HAProxy's side of the handshake is done, then
        # closes the connection. Depending on when that reaches HAProxy, it reports an empty answer to its request,
        # a reset while it reads one, or (the alert before its handshake finished) a handshake failure.
        reasons = ("TCPCHK got an empty response at step 3", 'Socket error, info: " at step 3', "SSL handshake failure")
        assert any(reason in down for reason in reasons), down
        refused = {("L7RSP", "TCPCHK got an empty response"), ("SOCKERR", "step 3"), ("L6RSP", "SSL handshake failure")}
        verdict = (failed["check_status"], failed["last_chk"])
        assert any(status == verdict[0] and text in verdict[1] for status, text in refused), (down, verdict)
        with_cert.wait_check("bridge", "L7OK")  # the same bridge, the same check, with the certificate
        readyz.wait_check("bridge", "L7OK")
        assert with_cert.stat("bridge")["status"] == "UP" and readyz.stat("bridge")["status"] == "UP"
    finally:
        for balancer in balancers:
            balancer.stop()
        net.stop()


def test_the_sample_haproxy_configuration_is_the_documented_one_and_haproxy_accepts_it() -> None:
    _require_haproxy()
    root = Path(__file__).resolve().parents[3]
    sample = (root / "deploy" / "haproxy.example.cfg").read_text()
    docs = (root / "docs" / "high-availability.md").read_text()
    body = "".join(line + "\n" for line in sample.splitlines() if not line.startswith("#"))
    assert f"```\n{body}```\n" in docs, "deploy/haproxy.example.cfg and docs/high-availability.md differ"
    binary = haproxy_binary()
    assert binary is not None
    checked = subprocess.run([binary, "-c", "-f", str(root / "deploy" / "haproxy.example.cfg")], capture_output=True)
    assert checked.returncode == 0, checked.stderr.decode()
