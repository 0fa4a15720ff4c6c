"""A peer's associations do not use up the victim's own slots at the bridge (issue 17, item 8).

Real bridge and router processes over gRPC and TLS, pynetdicom archives. The bridge's
`max_associations_per_router` (3 here) counts only the associations a router initiated; those
towards a router have their own cap, `max_inbound_per_router` (3 here). Site A holds three
associations to site B's archive: before, they filled B's slot count at the bridge and B's own
workstation could not call out; now B still calls A, and a third site calling B is refused
by the inbound cap, with the reason in the bridge's log.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.ul import PduType
from tests.integration.test_reliability import LIMIT_EXCEEDED, quiet_site, try_associate
from tests.support.wire import read_pdu, wait_until
from tests.unit.ul.builders import associate_rq

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def test_a_peer_holding_associations_to_b_cannot_stop_b_calling_out(
    tmp_path_factory: pytest.TempPathFactory, archive_factory: Callable[..., DemoArchive]
) -> None:
    archive_a, archive_b = archive_factory("ARCHIVE_A"), archive_factory("ARCHIVE_B")
    net = LocalRelayNetwork(tmp_path_factory.mktemp("slots")).start(bridge=False)
    with (net.workdir / "bridge.toml").open("a") as toml:
        toml.write("\n[limits]\nmax_associations_per_router = 3\nmax_inbound_per_router = 3\n")
    net.start_bridge()
    held: list[socket.socket] = []
    try:
        quiet_site(
            net,
            "site-b",
            shared=[Shared("ARCHIVE_B", HOST, archive_b.port, ["site-a", "site-c"])],
            remote=[Remote("ARCHIVE_A", "site-a")],
        )
        quiet_site(
            net,
            "site-a",
            shared=[Shared("ARCHIVE_A", HOST, archive_a.port, ["site-b"])],
            remote=[Remote("ARCHIVE_B", "site-b")],
        )
        quiet_site(net, "site-c", remote=[Remote("ARCHIVE_B", "site-b")])
        net.wait_connected()
        port_a, port_b, port_c = (net.sites[s].port for s in ("site-a", "site-b", "site-c"))
        assert port_a and port_b and port_c
        for _ in range(3):  # the peer takes as many associations to B as the bridge lets one router hold
            sock = socket.create_connection((HOST, port_a), timeout=15)
            held.append(sock)
            sock.sendall(associate_rq(called="ARCHIVE_B", calling="WS_A"))
            assert read_pdu(sock, 15)[0] == PduType.ASSOCIATE_AC

        # B's own workstation still reaches its partner: the peer's associations are not B's.
        own = wait_until(
            lambda: (a := try_associate(port_b, "ARCHIVE_A", calling="WS_B", timeout=15)).kind == "AC" and a,
            timeout=20,
            step=0.3,
            what="site-b's own outbound association",
        )
        assert own.kind == "AC"
        # Another peer calling B meets the cap on associations towards B, at once.
        over = try_associate(port_c, "ARCHIVE_B", calling="WS_C", timeout=15)
        assert over.reject == LIMIT_EXCEEDED and over.seconds < 2, (over.kind, over.reject)
        wait_until(
            lambda: (
                "has reached the bridge's limit of associations towards it (max_inbound_per_router)"
                in net.log("bridge")
            ),
            what="the bridge's refusal naming the inbound cap",
        )
    finally:
        for sock in held:
            try:
                sock.sendall(ABORT)
            finally:
                sock.close()
        net.stop()
