"""A router that shares with "*" does not receive every site's name and key (issue 17, item 10).

Real bridge and router processes over gRPC and TLS, a pynetdicom archive. Site B shares its
archive with "*"; sites A and C exist, only A calls. B's directory carries no identities
(it calls nobody); A's key reaches B with A's association only, is trusted on first use under
B's usual rules (recorded in known_sites.json, logged), and C, which never called, stays unknown.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.test_reliability import echo, quiet_site
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


def test_a_star_sharer_learns_only_the_callers_that_call(
    tmp_path_factory: pytest.TempPathFactory, archive_factory: Callable[..., DemoArchive]
) -> None:
    archive = archive_factory("ARCHIVE_B")
    net = LocalRelayNetwork(tmp_path_factory.mktemp("star")).start()
    try:
        quiet_site(net, "site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["*"])])
        quiet_site(net, "site-a", remote=[Remote("ARCHIVE_B", "site-b")])
        quiet_site(net, "site-c", remote=[Remote("ARCHIVE_B", "site-b")])
        net.wait_connected()
        known = net.workdir / "state-site-b" / "known_sites.json"

        def known_sites() -> dict[str, str]:
            return json.loads(known.read_text()) if known.exists() else {}

        assert known_sites() == {}  # no key of any site came with B's directory
        port_a = net.sites["site-a"].port
        assert port_a
        assert wait_until(lambda: echo(port_a, "ARCHIVE_B"), timeout=20, step=0.3, what="A's C-ECHO to B")
        assert set(known_sites()) == {"site-a"}  # A's key came with its association, C's never
        assert "first contact with site site-a (calling us)" in net.log("site-b")
    finally:
        net.stop()
