"""Refusals, never hangs: every failure reaches the local device as a specific DICOM answer.

Each test reads the router's answer off a raw socket and checks the PS3.8
codes: A-ASSOCIATE-RJ (result, source, reason) or A-ABORT. Malformed input
from one device must not disturb associations of other devices.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.ul import PduType, parse_abort, parse_reject
from tests.support import dcmtk
from tests.support.ports import free_port
from tests.support.wire import exchange, read_pdu, wait_until
from tests.unit.ul.builders import associate_rq

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
PERMANENT_CALLED_AE_UNKNOWN = (1, 1, 7)
TRANSIENT_CONGESTION = (2, 3, 1)


def echo_ok(port: int, called: str = "ARCHIVE_B") -> bool:
    ae = AE(ae_title="OTHER_WS")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title=called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@pytest.fixture
def two_sites(relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive]) -> LocalRelayNetwork:
    """site-b shares ARCHIVE_B with site-a; site-a exposes it under the same title."""
    archive = archive_factory("ARCHIVE_B")
    relay_network.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    relay_network.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b"), Remote("GHOST", "site-b")])
    relay_network.wait_connected()
    return relay_network


def port_a(net: LocalRelayNetwork) -> int:
    port = net.sites["site-a"].port
    assert port is not None
    return port


def test_unknown_called_ae_is_rejected_permanently(two_sites: LocalRelayNetwork) -> None:
    answer = exchange(port_a(two_sites), associate_rq(called="NO_SUCH_AE", calling="WS"))
    assert answer[0] == PduType.ASSOCIATE_RJ
    assert parse_reject(answer) == PERMANENT_CALLED_AE_UNKNOWN
    assert "NO_SUCH_AE" in two_sites.log("site-a") and "not a remote device" in two_sites.log("site-a")
    assert dcmtk.echoscu(HOST, port_a(two_sites), "NO_SUCH_AE", "WS").rejected


def test_device_unknown_at_the_remote_site_is_rejected_permanently(two_sites: LocalRelayNetwork) -> None:
    """GHOST is configured at site-a but site-b shares no such device: the bridge refuses."""
    answer = exchange(port_a(two_sites), associate_rq(called="GHOST", calling="WS"))
    assert parse_reject(answer) == PERMANENT_CALLED_AE_UNKNOWN
    assert "no device 'GHOST' at site 'site-b'" in two_sites.log("bridge")


def test_device_not_shared_with_the_caller_is_rejected_permanently(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive]
) -> None:
    archive = archive_factory("PRIVATE")
    relay_network.add_site("site-b", shared=[Shared("PRIVATE", HOST, archive.port, ["site-c"])])
    site_a = relay_network.add_site("site-a", remote=[Remote("PRIVATE", "site-b")])
    relay_network.wait_connected()
    assert site_a.port
    answer = exchange(site_a.port, associate_rq(called="PRIVATE", calling="WS"))
    assert parse_reject(answer) == PERMANENT_CALLED_AE_UNKNOWN
    assert "is not shared with site-a" in relay_network.log("bridge")
    assert archive.instances == {}


def test_remote_site_offline_is_rejected_transiently(two_sites: LocalRelayNetwork) -> None:
    two_sites.stop_router("site-b")
    wait_until(
        lambda: not any(d["online"] for d in two_sites.status("site-a")["directory"]),  # type: ignore[index, union-attr]
        what="site-b to be seen offline",
    )
    started = time.monotonic()
    answer = exchange(port_a(two_sites), associate_rq(called="ARCHIVE_B", calling="WS"))
    assert parse_reject(answer) == TRANSIENT_CONGESTION
    assert time.monotonic() - started < 5, "an offline site must be refused at once"


def test_unreachable_device_is_rejected_transiently(relay_network: LocalRelayNetwork, tmp_path: object) -> None:
    dead_port = free_port()  # a port with nothing listening
    relay_network.add_site("site-b", shared=[Shared("DOWN_PACS", HOST, dead_port, ["*"])])
    site_a = relay_network.add_site("site-a", remote=[Remote("DOWN_PACS", "site-b")])
    relay_network.wait_connected()
    assert site_a.port
    answer = exchange(site_a.port, associate_rq(called="DOWN_PACS", calling="WS"))
    assert parse_reject(answer) == TRANSIENT_CONGESTION
    assert "cannot connect to 127.0.0.1:" in relay_network.log("site-b")


def test_bridge_down_is_rejected_transiently_and_recovers(two_sites: LocalRelayNetwork) -> None:
    two_sites.stop_bridge(kill=True)
    wait_until(lambda: not two_sites.status("site-a").get("connected"), what="site-a to notice the bridge is gone")
    started = time.monotonic()
    answer = exchange(port_a(two_sites), associate_rq(called="ARCHIVE_B", calling="WS"))
    assert parse_reject(answer) == TRANSIENT_CONGESTION
    assert time.monotonic() - started < 5
    two_sites.start_bridge()  # same port: routers reconnect on their own
    two_sites.wait_connected()
    assert echo_ok(port_a(two_sites))


def test_link_lost_mid_association_aborts_the_local_peer(two_sites: LocalRelayNetwork) -> None:
    ae = AE(ae_title="WS")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port_a(two_sites), ae_title="ARCHIVE_B")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    two_sites.stop_bridge(kill=True)
    wait_until(lambda: assoc.is_aborted, timeout=10, what="A-ABORT after the bridge died")


# -- malformed input from a local device ----------------------------------------

MALFORMED = {
    "undefined PDU type 0x08": bytes([0x08, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
    "HTTP request on the DICOM port": b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n",
    "A-ASSOCIATE-RQ longer than the limit": bytes([0x01, 0, 0x7F, 0xFF, 0xFF, 0xFF]) + b"\0" * 64,
    # The maximum-length sub-item (0x51) claims 64 bytes inside a user-information item that has 4.
    "sub-item length beyond its item": associate_rq(called="ARCHIVE_B", calling="WS").replace(
        b"\x51\x00\x00\x04", b"\x51\x00\x00\x40", 1
    ),
    "P-DATA before association": bytes([0x04, 0, 0, 0, 0, 12]) + bytes([0, 0, 0, 8, 1, 3]) + b"\0" * 6,
    "random bytes": os.urandom(512),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_pdu_is_aborted_and_others_keep_working(two_sites: LocalRelayNetwork, name: str) -> None:
    port = port_a(two_sites)
    ae = AE(ae_title="OTHER_WS")
    ae.add_requested_context(Verification)
    bystander = ae.associate(HOST, port, ae_title="ARCHIVE_B")  # opened before, used after
    assert bystander.is_established
    answer = exchange(port, MALFORMED[name])
    assert answer == b"" or answer[0] == PduType.ABORT, f"{name}: expected A-ABORT or close, got {answer[:16]!r}"
    if answer:
        assert parse_abort(answer)[0] == 2  # service provider
    assert bystander.send_c_echo().Status == 0
    bystander.release()
    assert echo_ok(port)
    assert "protocol error from local device 127.0.0.1" in two_sites.log("site-a")


def test_truncated_request_then_close_does_not_disturb_the_router(two_sites: LocalRelayNetwork) -> None:
    rq = associate_rq(called="ARCHIVE_B", calling="WS")
    for cut in (1, 5, 6, 40, len(rq) - 1):
        with socket.create_connection((HOST, port_a(two_sites))) as sock:
            sock.sendall(rq[:cut])
    assert echo_ok(port_a(two_sites))


def test_second_associate_request_aborts_both_ends(two_sites: LocalRelayNetwork) -> None:
    rq = associate_rq(called="ARCHIVE_B", calling="WS")
    with socket.create_connection((HOST, port_a(two_sites)), timeout=10) as sock:
        sock.sendall(rq)
        accepted = read_pdu(sock)
        assert accepted[0] == PduType.ASSOCIATE_AC, "the archive should accept through the relay"
        sock.sendall(rq)
        answer = read_pdu(sock)
    assert answer[0] == PduType.ABORT
    assert parse_abort(answer)[0] == 2
    assert echo_ok(port_a(two_sites))
