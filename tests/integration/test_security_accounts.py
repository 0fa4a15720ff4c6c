"""Accounts, enrollment, mutual TLS and audit: each attack gets its specific, audited answer.

Real bridge and router processes over TLS; archives are pynetdicom archives.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from relay_common.audit import read_events
from relay_common.pki import make_dev_pki
from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.ports import free_port
from tests.support.wire import exchange, wait_until
from tests.unit.ul.builders import associate_rq

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


def bridge_events(net: LocalRelayNetwork, event: str) -> list[dict[str, object]]:
    return [e for e in read_events(net.workdir / "audit.jsonl") if e["event"] == event]


def router_events(net: LocalRelayNetwork, site: str, event: str) -> list[dict[str, object]]:
    return [e for e in read_events(net.workdir / f"audit-{site}.jsonl") if e["event"] == event]


def last_error(net: LocalRelayNetwork, site: str) -> str:
    return str(net.status(site).get("last_error") or "")


def start_with_password(net: LocalRelayNetwork, name: str, password: str) -> None:
    site = net.add_site(name, start=False)
    site.password = password
    net.write_router_config(site)
    net.start_router(name)


def test_wrong_password_is_refused_and_audited(relay_network: LocalRelayNetwork) -> None:
    start_with_password(relay_network, "site-a", "not-the-password-at-all")
    wait_until(
        lambda: "wrong account name or password" in last_error(relay_network, "site-a"), what="the sign-on refusal"
    )
    assert not relay_network.status("site-a")["connected"]
    failures = bridge_events(relay_network, "sign_on")
    assert failures and failures[0]["outcome"] == "failure" and failures[0]["router"] == "site-a"
    assert "wrong password" in relay_network.log("bridge")


def test_unknown_account_gets_the_same_answer(relay_network: LocalRelayNetwork) -> None:
    relay_network.add_site("ghost", start=False)
    assert relay_network.bridge_admin("router", "remove", "ghost").returncode == 0
    relay_network.start_router("ghost")
    wait_until(
        lambda: "wrong account name or password" in last_error(relay_network, "ghost"), what="the sign-on refusal"
    )
    assert "unknown account" in relay_network.log("bridge")  # the operator sees why; the caller does not


def test_brute_force_is_rate_limited(relay_network: LocalRelayNetwork) -> None:
    start_with_password(relay_network, "site-a", "guess-number-one-xyz")
    wait_until(
        lambda: "too many failed sign-on attempts" in last_error(relay_network, "site-a"),
        timeout=40,
        what="the rate limit",
    )
    relay_network.stop_router("site-a")
    site = relay_network.sites["site-a"]
    result = relay_network.bridge_admin("router", "passwd", "site-a")
    site.password = result.stdout.strip()
    relay_network.write_router_config(site)
    relay_network.start_router("site-a")  # even the right password waits out the window
    wait_until(lambda: bool(relay_network.status("site-a")), what="the router's status")
    wait_until(
        lambda: "too many failed sign-on attempts" in last_error(relay_network, "site-a"),
        what="the rate limit to hold for the right password too",
    )
    assert any(e["outcome"] == "alert" for e in bridge_events(relay_network, "sign_on"))


def test_disabled_router_is_cut_within_seconds(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive]
) -> None:
    archive = archive_factory("ARCHIVE_B")
    relay_network.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    site_a = relay_network.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")])
    relay_network.wait_connected()
    ae = AE(ae_title="WS")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, site_a.port, ae_title="ARCHIVE_B")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assert relay_network.bridge_admin("router", "disable", "site-a").returncode == 0
    wait_until(lambda: assoc.is_aborted, timeout=10, what="the live association to be cut")
    wait_until(lambda: "account disabled" in last_error(relay_network, "site-a"), what="reconnects refused")


def test_device_not_shared_is_audited_on_both_sides(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive]
) -> None:
    archive = archive_factory("PRIVATE")
    relay_network.add_site("site-b", shared=[Shared("PRIVATE", HOST, archive.port, ["site-c"])])
    site_a = relay_network.add_site("site-a", remote=[Remote("PRIVATE", "site-b")])
    relay_network.wait_connected()
    answer = exchange(site_a.port, associate_rq(called="PRIVATE", calling="WS"))
    assert answer[7:10] == bytes([1, 1, 7])
    (bridge_side,) = bridge_events(relay_network, "access_refused")
    assert (bridge_side["router"], bridge_side["called_ae"], bridge_side["outcome"]) == ("site-a", "PRIVATE", "alert")
    wait_until(lambda: bool(router_events(relay_network, "site-b", "access_refused")), what="the owner's audit event")
    (owner_side,) = router_events(relay_network, "site-b", "access_refused")
    assert (owner_side["peer_site"], owner_side["ae_title"]) == ("site-a", "PRIVATE")


def test_a_router_cannot_answer_for_another_routers_title(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], tmp_path: Path
) -> None:
    """site-a also publishes ARCHIVE_B: titles live in per-site namespaces, so site-b's device is untouched."""
    real = archive_factory("ARCHIVE_B")
    impostor = archive_factory("ARCHIVE_B")
    relay_network.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, real.port, ["*"])])
    relay_network.add_site("site-a", shared=[Shared("ARCHIVE_B", HOST, impostor.port, ["*"])])
    site_c = relay_network.add_site("site-c", remote=[Remote("B_ARCHIVE", "site-b", "ARCHIVE_B")])
    relay_network.wait_connected()
    files = write_series(generate_ct_series(2, rows=64, cols=64, patient_id="NS-1"), tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pynetdicom", "storescu", HOST, str(site_c.port), *map(str, files), "-aec", "B_ARCHIVE"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert real.fingerprints() == fingerprints(files)
    assert impostor.instances == {}


def test_tls_1_1_is_refused_and_1_3_preferred(relay_network: LocalRelayNetwork) -> None:
    def handshake(version: ssl.TLSVersion) -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(relay_network.workdir / "ca.pem")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = version if version != ssl.TLSVersion.MAXIMUM_SUPPORTED else ssl.TLSVersion.TLSv1_2
            ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client really offer the old protocol
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection((HOST, relay_network.bridge_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                return str(tls.version())

    assert handshake(ssl.TLSVersion.MAXIMUM_SUPPORTED) == "TLSv1.3"
    with pytest.raises((ssl.SSLEOFError, ssl.SSLError)) as info:
        handshake(ssl.TLSVersion.TLSv1_1)
    # The client did send a TLS 1.1 hello and the bridge ended the handshake (not a local refusal).
    assert "NO_PROTOCOLS_AVAILABLE" not in str(info.value)


@pytest.fixture
def mtls_network(tmp_path_factory: pytest.TempPathFactory) -> LocalRelayNetwork:
    net = LocalRelayNetwork(tmp_path_factory.mktemp("mtls")).start(bridge=False)
    enroll_port = free_port()
    (net.workdir / "bridge.toml").write_text(
        f'[server]\nlisten = "{HOST}:0"\ntls_cert = "server.pem"\ntls_key = "server.key"\n'
        f'require_client_cert = true\nclient_ca = "ca.pem"\nenroll_listen = "{HOST}:{enroll_port}"\n\n'
        '[storage]\ndatabase = "bridge.sqlite3"\n\n[enrollment]\nca_cert = "ca.pem"\nca_key = "ca.key"\n'
    )
    net.enroll_port = enroll_port  # type: ignore[attr-defined]
    net.start_bridge()
    yield net
    net.stop()


def _router_cli(net: LocalRelayNetwork, site: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay_router.cli", "--config", str(net.router_config_path(site)), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_mutual_tls_needs_an_enrolled_certificate(
    mtls_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], tmp_path: Path
) -> None:
    net = mtls_network
    archive = archive_factory("ARCHIVE_B")
    enroll_at = {"enroll_address": f"{HOST}:{net.enroll_port}"}  # type: ignore[attr-defined]
    site_b = net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])], start=False)
    site_a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], start=False)
    for site in (site_a, site_b):
        site.extra_bridge = enroll_at
        net.write_router_config(site)

    # Without a client certificate: no stream at all.
    net.start_router("site-a")
    wait_until(lambda: bool(last_error(net, "site-a")), what="a connection error")
    assert not net.status("site-a")["connected"]
    net.stop_router("site-a")

    # A certificate from a CA the bridge does not trust: refused as well.
    rogue = make_dev_pki(tmp_path / "rogue", hostnames=["site-a"], ips=[])
    state = net.workdir / "state-site-a"
    state.mkdir(exist_ok=True)
    (state / "client.pem").write_bytes(rogue.server_cert.read_bytes())
    (state / "client.key").write_bytes(rogue.server_key.read_bytes())
    net.start_router("site-a")
    wait_until(lambda: bool(last_error(net, "site-a")), what="a connection error")
    assert not net.status("site-a")["connected"]
    net.stop_router("site-a")

    # A used or wrong token is refused; the real one enrolls and issues a certificate.
    bad = _router_cli(net, "site-a", "enroll", "--token", "not-a-real-token")
    assert bad.returncode == 1 and "unknown enrollment token" in bad.stderr
    for site in (site_a, site_b):
        done = _router_cli(net, site.name, "enroll", "--token", site.enrollment_token)
        assert done.returncode == 0, done.stderr
        assert "client certificate written" in done.stdout
    again = _router_cli(net, "site-a", "enroll", "--token", site_a.enrollment_token)
    assert again.returncode == 1 and "already used" in again.stderr

    net.start_router("site-b")
    net.start_router("site-a")
    net.wait_connected()
    ae = AE(ae_title="WS")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, site_a.port, ae_title="ARCHIVE_B")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    enrolled = bridge_events(net, "enroll")
    assert [e["outcome"] for e in enrolled].count("success") == 2
