"""Timeouts a user can set: a stuck peer never pins an association forever."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


@pytest.fixture
def slow_echo_scp() -> Iterator[int]:
    """A Verification SCP that takes 8 s to answer (a stuck archive)."""

    def slow(event: evt.Event) -> int:
        time.sleep(8)
        return 0

    ae = AE(ae_title="SLOW")
    ae.add_supported_context(Verification)
    server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, slow)])
    yield server.server_address[1]
    ae.shutdown()


def _network(net: LocalRelayNetwork, port: int, **dicom: object) -> int:
    net.add_site("site-b", shared=[Shared("SLOW", HOST, port, ["site-a"])])
    site_a = net.add_site("site-a", remote=[Remote("SLOW", "site-b")], **dicom)
    net.wait_connected()
    assert site_a.port
    return site_a.port


def test_artim_closes_a_silent_connection(relay_network: LocalRelayNetwork, slow_echo_scp: int) -> None:
    port = _network(relay_network, slow_echo_scp, artim_timeout_s=1.0)
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        assert sock.recv(1) == b""  # the router hung up
    assert time.monotonic() - started < 5
    assert "ARTIM" in relay_network.log("site-a")


def test_dimse_timeout_aborts_when_the_called_device_stops_answering(
    relay_network: LocalRelayNetwork, slow_echo_scp: int
) -> None:
    port = _network(relay_network, slow_echo_scp, dimse_timeout_s=2.0)
    ae = AE(ae_title="WS")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title="SLOW")
    assert assoc.is_established
    started = time.monotonic()
    assoc.send_c_echo()  # returns when the association is aborted
    wait_until(lambda: assoc.is_aborted, timeout=10, what="A-ABORT on the DIMSE timeout")
    assert time.monotonic() - started < 7.5, "aborted by the relay, not answered late by the device"
    assert "DIMSE timeout" in relay_network.log("site-a")


def test_idle_timeout_aborts_a_forgotten_association(relay_network: LocalRelayNetwork, slow_echo_scp: int) -> None:
    port = _network(relay_network, slow_echo_scp, idle_timeout_s=2.0)
    ae = AE(ae_title="WS")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title="SLOW")
    assert assoc.is_established
    wait_until(lambda: assoc.is_aborted, timeout=10, what="A-ABORT on the idle timeout")
    assert "idle timeout" in relay_network.log("site-a")
