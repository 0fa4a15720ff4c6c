"""The bridge's lifecycle with real processes: certificate renewal without a restart, drain on SIGTERM.

Two real routers and a pynetdicom archive; the bridge is the real `relay-bridge serve` process.
- A renewed server pair (same CA) is served to new TLS connections while a storage association
  that started before it keeps running and delivers byte-identical images; a broken pair is
  refused (ERROR in the log) and the renewed one stays in use.
- SIGTERM: running associations finish, new ones get a transient A-ASSOCIATE-RJ, the gRPC health
  service says NOT_SERVING, the process exits once the last association ended (within the grace).
- Mutual TLS: a router's renewed client certificate is used for its next connection, which it
  makes only once no association is running.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.ul import parse_reject
from tests.integration.test_security_accounts import _router_cli, last_error, mtls_network  # noqa: F401
from tests.support.certs import issue_pair, replace_file, served_certificate
from tests.support.wire import exchange, wait_until
from tests.unit.ul.builders import associate_rq

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
TRANSIENT_LOCAL_LIMIT = (2, 3, 2)  # transient, service provider, local limit exceeded (PS3.8 Table 9-21)


def _network(tmp_path: Path, drain_grace_s: float) -> LocalRelayNetwork:
    net = LocalRelayNetwork(tmp_path / "net").start(bridge=False)
    toml = net.workdir / "bridge.toml"
    key_line = 'tls_key = "server.key"\n'
    toml.write_text(toml.read_text().replace(key_line, f"{key_line}drain_grace_s = {drain_grace_s}\n"))
    net.start_bridge()
    return net


@pytest.fixture
def network(tmp_path: Path) -> Iterator[LocalRelayNetwork]:
    net = _network(tmp_path, 20.0)
    yield net
    net.stop()


def _sites(net: LocalRelayNetwork, archive: DemoArchive, *, open_retry_s: float | None = None) -> int:
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    site_a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], start=False)
    if open_retry_s is not None:  # how long site-a retries an Open that the draining bridge refuses
        site_a.extra_bridge["open_retry_s"] = open_retry_s
        net.write_router_config(site_a)
    net.start_router("site-a")
    net.wait_connected()
    assert site_a.port
    return site_a.port


def _storage_association(port: int) -> Association:
    ae = AE(ae_title="WS")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE_B")
    assert assoc.is_established
    return assoc


def _store(assoc: Association, files: list[Path]) -> None:
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0


def _bridge_serial(net: LocalRelayNetwork) -> int:
    assert net.bridge_port
    return served_certificate(HOST, net.bridge_port, net.workdir / "ca.pem").serial_number


def _health(net: LocalRelayNetwork) -> int:
    credentials = grpc.ssl_channel_credentials((net.workdir / "ca.pem").read_bytes())
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"{HOST}:{net.bridge_port}", credentials, options=options) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(answer.status)


def test_a_renewed_server_certificate_is_served_without_dropping_a_running_association(
    network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], ct_series: list[Path]
) -> None:
    net = network
    archive = archive_factory("ARCHIVE_B")
    port = _sites(net, archive)
    assert net.bridge is not None
    old_serial = _bridge_serial(net)
    assoc = _storage_association(port)
    _store(assoc, ct_series[:2])

    # Renewal in place, as an ACME client does it (key and certificate renamed over the old files).
    cert_pem, key_pem, renewed = issue_pair(net.workdir / "ca.pem", net.workdir / "ca.key", common_name="localhost")
    replace_file(net.workdir / "server.key", key_pem)
    replace_file(net.workdir / "server.pem", cert_pem)
    net.bridge.send_signal(signal.SIGHUP)
    wait_until(lambda: "server certificate reloaded" in net.log("bridge"), what="the reload in the bridge log")
    assert f"serial {renewed.serial_number:x}" in net.log("bridge")
    assert _bridge_serial(net) == renewed.serial_number != old_serial, "new connections get the renewed certificate"
    _store(assoc, ct_series[2:4])  # the association made before the renewal keeps running

    # A broken pair (half-written certificate) is refused and the renewed one stays in use.
    replace_file(net.workdir / "server.pem", cert_pem[: len(cert_pem) // 2])
    net.bridge.send_signal(signal.SIGHUP)
    wait_until(lambda: "not reloaded, the previous one stays in use" in net.log("bridge"), what="the refusal")
    assert '"level": "error"' in next(line for line in net.log("bridge").splitlines() if "not reloaded" in line)
    assert _bridge_serial(net) == renewed.serial_number
    _store(assoc, ct_series[4:])
    assoc.release()
    assert archive.fingerprints() == fingerprints(ct_series), "every image byte-identical"
    assert net.bridge.poll() is None, "SIGHUP does not end the bridge"

    # A router connecting now verifies the renewed certificate against the same CA.
    replace_file(net.workdir / "server.pem", cert_pem)
    net.stop_router("site-a")
    port = net.start_router("site-a")
    net.wait_connected()
    assoc = _storage_association(port)
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_sigterm_drains_running_associations_refuses_new_ones_and_reports_not_serving(
    network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], ct_series: list[Path]
) -> None:
    net = network
    archive = archive_factory("ARCHIVE_B")
    # One bridge: the router retries the refused Open for open_retry_s (the bridge might be back by
    # then), then refuses its device; 1 s here instead of the default 10 keeps the test short.
    port = _sites(net, archive, open_retry_s=1.0)
    net.add_site("site-c")  # signed on, nothing running: told to move, then refused until the bridge is back
    net.wait_connected()
    assert net.bridge is not None
    assert _health(net) == health_pb2.HealthCheckResponse.SERVING
    assoc = _storage_association(port)
    _store(assoc, ct_series[:2])

    net.bridge.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in net.log("bridge"), what="the drain to start")
    assert _health(net) == health_pb2.HealthCheckResponse.NOT_SERVING
    started = time.monotonic()
    answer = exchange(port, associate_rq(called="ARCHIVE_B", calling="WS2"))
    assert parse_reject(answer) == TRANSIENT_LOCAL_LIMIT, "a new association gets a transient refusal"
    assert time.monotonic() - started < 5
    _store(assoc, ct_series[2:])  # the running association is not disturbed
    wait_until(lambda: "restarting (draining)" in last_error(net, "site-c"), what="the idle router to be moved")
    assert "asking router site-c to reconnect" in net.log("bridge")
    assert "asking router site-a" not in net.log("bridge"), "a router with a running association keeps its session"
    assert net.status("site-a")["connected"]
    assert assoc.send_c_echo().Status == 0
    released = time.monotonic()
    assoc.release()
    assert net.bridge.wait(10) == 0
    assert time.monotonic() - released < 5, "the bridge stops once the last association has ended"
    assert archive.fingerprints() == fingerprints(ct_series)
    assert "association refused: the bridge is restarting" in net.log("bridge")


def test_an_association_still_running_when_the_drain_grace_ends_is_aborted(
    tmp_path: Path, archive_factory: Callable[..., DemoArchive]
) -> None:
    net = _network(tmp_path, 3.0)
    try:
        port = _sites(net, archive_factory("ARCHIVE_B"))
        assert net.bridge is not None
        assoc = _storage_association(port)
        started = time.monotonic()
        net.bridge.send_signal(signal.SIGTERM)
        wait_until(lambda: assoc.is_aborted, timeout=15, what="A-ABORT when the drain grace ends")
        assert 2.5 < time.monotonic() - started < 10
        assert net.bridge.wait(10) == 0
        assert "still running after 3 s are cut" in net.log("bridge")
    finally:
        net.stop()


def test_a_router_uses_its_renewed_client_certificate_for_its_next_connection(
    mtls_network: LocalRelayNetwork,  # noqa: F811
    archive_factory: Callable[..., DemoArchive],
) -> None:
    net = mtls_network
    archive = archive_factory("ARCHIVE_B")
    enroll_at = {"enroll_address": f"{HOST}:{net.enroll_port}"}  # type: ignore[attr-defined]
    site_b = net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])], start=False)
    site_a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], start=False)
    for site in (site_a, site_b):
        site.extra_bridge = enroll_at
        net.write_router_config(site)
        done = _router_cli(net, site.name, "enroll", "--token", site.enrollment_token)
        assert done.returncode == 0, done.stderr
    net.start_router("site-b")
    port = net.start_router("site-a")
    net.wait_connected()
    router = net.sites["site-a"].process
    assert router is not None
    state = net.workdir / "state-site-a"
    ca, ca_key = net.workdir / "ca.pem", net.workdir / "ca.key"

    # A renewed certificate for the same account: the router moves to a new connection at once (idle).
    cert_pem, key_pem, renewed = issue_pair(ca, ca_key, common_name="site-a", client=True)
    replace_file(state / "client.key", key_pem)
    replace_file(state / "client.pem", cert_pem)
    router.send_signal(signal.SIGHUP)
    wait_until(lambda: f"serial {renewed.serial_number:x}" in net.log("site-a"), what="the reload")
    wait_until(lambda: net.log("site-a").count("signed on to the bridge") >= 2, what="a new sign-on")
    net.wait_connected()
    assoc = _storage_association(port)
    assert assoc.send_c_echo().Status == 0

    # With an association running, a certificate change waits: the association is never cut. The
    # certificate here names another account, so the bridge refuses the next sign-on: proof that the
    # next connection presents the new file.
    cert_pem, key_pem, _ = issue_pair(ca, ca_key, common_name="site-z", client=True)
    replace_file(state / "client.key", key_pem)
    replace_file(state / "client.pem", cert_pem)
    router.send_signal(signal.SIGHUP)
    wait_until(lambda: net.log("site-a").count("client certificate reloaded") >= 2, what="the second reload")
    time.sleep(2)
    assert net.status("site-a")["connected"], "no reconnection while an association runs"
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    wait_until(lambda: "site-z" in last_error(net, "site-a"), what="the sign-on with the new certificate")
    assert router.poll() is None
