"""SIGTERM: stop accepting, let running associations finish within the grace period, abort the rest."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


def _network(net: LocalRelayNetwork, archive: DemoArchive) -> int:
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    site_a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], shutdown_grace_s=4.0)
    net.wait_connected()
    assert site_a.port
    return site_a.port


def _associate(port: int):
    ae = AE(ae_title="WS")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE_B")
    assert assoc.is_established
    return assoc


def test_running_association_finishes_within_the_grace_period(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive]
) -> None:
    port = _network(relay_network, archive_factory("ARCHIVE_B"))
    assoc = _associate(port)
    process = relay_network.sites["site-a"].process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert assoc.send_c_echo().Status == 0, "a running association keeps working during the grace period"
    assoc.release()
    assert process.wait(10) == 0
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        import socket

        socket.create_connection((HOST, port), timeout=2)


def test_association_still_open_after_the_grace_period_is_aborted(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive]
) -> None:
    port = _network(relay_network, archive_factory("ARCHIVE_B"))
    assoc = _associate(port)
    process = relay_network.sites["site-a"].process
    assert process is not None
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    wait_until(lambda: assoc.is_aborted, timeout=15, what="A-ABORT when the grace period ends")
    assert 3.5 < time.monotonic() - started < 12
    assert process.wait(10) == 0
    assert "the router is shutting down" in relay_network.log("site-a")
