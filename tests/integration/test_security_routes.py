"""expose_all and a malicious bridge: a title never moves to a site the router has not pinned (issue 17 item 2).

The attack as reported: with `expose_all`, the site an AE title leads to comes from the directory
the bridge writes. The bridge operator ran a router of its own that published the same title and
removed the real site's entry; the workstation's C-STORE was accepted and decrypted at the
operator's site. Here the bridge is the real bridge code with an overriding subclass (as in
test_security.py), the routers and both archives are real, and the C-STORE must be refused and
never reach the impostor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.control import ControlService
from relay_bridge.server import RelayServicer
from relay_demo.archive import DemoArchive
from relay_demo.datasets import generate_ct_series, write_series
from relay_demo.network import Shared
from tests.support.admission import AdmissionNetwork
from tests.support.inprocess_bridge import InProcessBridge
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


class HidingControl(ControlService):
    """The control service of a bridge that hides chosen directory entries from every router."""

    async def directory_for(self, site: str) -> pb.Directory:
        directory = await super().directory_for(site)
        kept = [d for d in directory.devices if (d.site, d.ae_title) not in RouteThief.hidden]
        del directory.devices[:]
        directory.devices.extend(kept)
        return directory


class RouteThief(RelayServicer):
    """A bridge that hides chosen directory entries from every router (the real site's, in the attack)."""

    hidden: set[tuple[str, str]] = set()
    control_class = HidingControl


@pytest.fixture
def routes_attack(
    tmp_path_factory: pytest.TempPathFactory, archive_factory: Callable[..., DemoArchive]
) -> Iterator[tuple[AdmissionNetwork, InProcessBridge, DemoArchive, DemoArchive]]:
    """site-a exposes the directory (expose_all) and pins site-b, whose ARCHIVE_B it uses; the bridge has its own
    router, site-evil, with an archive of its own ready to publish as ARCHIVE_B."""
    RouteThief.hidden = set()
    net = AdmissionNetwork(tmp_path_factory.mktemp("routes-attack")).start(bridge=False)
    bridge = InProcessBridge(net, RouteThief)
    real, impostor = archive_factory("ARCHIVE_B"), archive_factory("ARCHIVE_B")
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, real.port, ["site-a"])])
    net.extra_toml["site-a"] = f'[[pin]]\nsite = "site-b"\nfingerprint = "{net.fingerprint("site-b")}"\n'
    net.add_site("site-a", expose_all=True)
    net.wait_connected()
    wait_until(lambda: routes_of(net).get("ARCHIVE_B") == "site-b", what="ARCHIVE_B exposed at site-a")
    yield net, bridge, real, impostor
    for name in net.sites:
        net.stop_router(name)
    bridge.stop()


def routes_of(net: AdmissionNetwork) -> dict[str, str]:
    routes = net.status("site-a").get("routes") or {}
    return {title: route["site"] for title, route in routes.items()}  # type: ignore[union-attr, index]


def store(net: AdmissionNetwork, path: Path) -> int | None:
    """C-STORE from the workstation through site-a: the status, or None if the association was not accepted."""
    port = net.sites["site-a"].port
    assert port
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE_B")
    if not assoc.is_established:
        return None
    status = assoc.send_c_store(pydicom.dcmread(path))
    assoc.release()
    return int(status.Status) if status else None


@pytest.fixture
def image(tmp_path: Path) -> Path:
    (path,) = write_series(generate_ct_series(1, rows=64, cols=64), tmp_path)
    return path


def test_a_title_taken_over_by_the_bridges_own_site_is_refused(routes_attack, image: Path) -> None:
    net, bridge, real, impostor = routes_attack
    assert store(net, image) == 0  # positive control: the pinned partner receives it
    assert len(real.instances) == 1
    # The attack: the bridge removes site-b's entry and its own router publishes the same title.
    RouteThief.hidden = {("site-b", "ARCHIVE_B")}
    net.add_site("site-evil", shared=[Shared("ARCHIVE_B", HOST, impostor.port, ["*"])])
    wait_until(lambda: "ARCHIVE_B" not in routes_of(net), what="site-a to stop routing ARCHIVE_B")
    assert store(net, image) is None  # A-ASSOCIATE-RJ: not routed
    assert impostor.instances == {} and len(real.instances) == 1
    log = net.log("site-a")
    assert (
        "expose_all: AE title 'ARCHIVE_B' now leads to site site-evil instead of pinned site site-b; "
        "that site has no [[pin]], so the title is not routed" in log
    ), log[-3000:]
    assert "called AE title 'ARCHIVE_B' is at site site-evil, which has no [[pin]]" in log
    (event,) = [e for e in net.audit_events("site-a") if e["event"] == "route_changed"]
    assert (event["outcome"], event["site"], event["previous_site"], event["routed"]) == (
        "alert",
        "site-evil",
        "site-b",
        False,
    )


def test_a_title_two_sites_publish_is_refused_loudly(routes_attack, image: Path) -> None:
    net, _, real, impostor = routes_attack
    net.add_site("site-evil", shared=[Shared("ARCHIVE_B", HOST, impostor.port, ["*"])])
    wait_until(lambda: "ARCHIVE_B" not in routes_of(net), what="site-a to stop routing ARCHIVE_B")
    assert store(net, image) is None
    assert impostor.instances == {} and real.instances == {}
    log = net.log("site-a")
    assert (
        "expose_all: AE title 'ARCHIVE_B' is published by several sites (site-b and site-evil); "
        "it is not routed (it led to site-b)" in log
    ), log[-3000:]
    (event,) = [e for e in net.audit_events("site-a") if e["event"] == "route_conflict"]
    assert event["outcome"] == "alert" and event["sites"] == ["site-b", "site-evil"]
