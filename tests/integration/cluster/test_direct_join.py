"""The direct join (relay_bridge.cluster.tickets, relay_router.direct_join), with real parts.

Three replicas behind HAProxy on a throwaway PostgreSQL; the server certificate also names
r1.localhost, r2.localhost and r3.localhost, and HAProxy routes those TLS server names to that
replica (`req.ssl_sni`), except on frontend "d", which plays a balancer without SNI routing.
Site A's router sits on r1 (DCMTK storescp WS_A, the C-MOVE destination), site B's on r2 (Orthanc
ORTHANC_B), site C's on r3 with `direct_join = false` (an older router: ARCHIVE_C), site D's on r3
through frontend "d" (ARCHIVE_D). Every image is compared by SOP Instance UID and Pixel Data hash.

- A -> B: router B joins at r1 directly, r1 splices A and B itself; Orthanc B's C-MOVE
  sub-association to WS_A is opened at r2, and router A joins it at r2 directly.
- A -> C: router C does not offer the direct join: over the replica link, as before.
- A -> D: router D tries the direct join, the balancer sends it to its default replica (r3),
  which does not know the ticket: router D joins through r3, over the link, and it still works.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from relay_common import setup_timing
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.support import dcmtk
from tests.support.bridge_cluster import HOST, BridgeCluster, start_bridge_cluster
from tests.support.orthanc import OrthancProcess
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.integration
# Sites A and B spill every CT image (~0.5 MB) through the bridge's blob store: the router that joined
# directly fetches and releases them at the replica it joined, with its ticket (its own replica's
# file:// store, with its own signing key, could not serve them).
SPILL: dict[str, object] = {"spill_threshold_bytes": 128 << 10, "spill_part_bytes": 64 << 10}


@dataclass
class Sites:
    cluster: BridgeCluster
    orthanc_b: OrthancProcess
    ws_a: dcmtk.StorescpProcess
    archive_c: dcmtk.StorescpProcess
    archive_d: dcmtk.StorescpProcess
    router_a: int
    study_uid: str
    originals: dict[str, str]
    work: Path


@pytest.fixture(scope="module")
def sites(
    postgres_for_cluster: PostgresCluster,
    orthanc_module_factory: OrthancPool,
    tmp_path_factory: pytest.TempPathFactory,
    ct_series: list[Path],
) -> Iterator[Sites]:
    require_dcmtk()
    work = tmp_path_factory.mktemp("direct")
    # Every process logs its setup hops (relay_common.setup_timing): the tests see which way a setup went.
    timing = pytest.MonkeyPatch()
    timing.setenv(setup_timing.ENV, "1")
    cluster = start_bridge_cluster(
        work / "net",
        postgres_for_cluster,
        {"a": ["r1", "r3", "r2"], "b": ["r2", "r3", "r1"], "c": ["r3", "r2", "r1"], "d": ["r3", "r2", "r1"]},
        renew_s=0.5,
        sni=True,
        plain_frontends=frozenset({"d"}),
    )
    ws_a = dcmtk.StorescpProcess(work / "ws-a", "WS_A").start()
    archive_c = dcmtk.StorescpProcess(work / "archive-c", "ARCHIVE_C").start()
    archive_d = dcmtk.StorescpProcess(work / "archive-d", "ARCHIVE_D").start()
    try:
        orthanc_b = orthanc_module_factory("ORTHANC_B")
        orthanc_b.upload_many(ct_series)
        net, haproxy = cluster.net, cluster.haproxy
        assert haproxy is not None
        net.bridge_port = haproxy.ports["b"]
        site_b = net.add_site(
            "site-b",
            shared=[Shared("ORTHANC_B", HOST, orthanc_b.dicom_port, ["site-a"])],
            remote=[Remote("WS_A", "site-a")],
            **SPILL,
        )
        net.bridge_port = haproxy.ports["c"]
        # Sites C and D take no spill: the replicas here have separate file:// stores (with replicas, a shared
        # store is needed for spill over a link; docs/high-availability.md), and these go over links.
        site_c = net.add_site(
            "site-c", shared=[Shared("ARCHIVE_C", HOST, archive_c.port, ["site-a"])], start=False, spill=False
        )
        site_c.extra_bridge["direct_join"] = False  # a router that does not offer it (an older version)
        net.write_router_config(site_c)
        net.start_router("site-c")
        net.bridge_port = haproxy.ports["d"]
        net.add_site("site-d", shared=[Shared("ARCHIVE_D", HOST, archive_d.port, ["site-a"])], spill=False)
        net.bridge_port = haproxy.ports["a"]
        site_a = net.add_site(
            "site-a",
            shared=[Shared("WS_A", HOST, ws_a.port, ["site-b"])],
            remote=[
                Remote("PACS_B", "site-b", "ORTHANC_B"),
                Remote("ARCHIVE_C", "site-c"),
                Remote("ARCHIVE_D", "site-d"),
            ],
            **SPILL,
        )
        assert site_a.port and site_b.port
        orthanc_b.set_modalities({"WS_A": ("WS_A", HOST, site_b.port)})
        net.wait_connected()
        cluster.wait_presence({"site-a": "r1", "site-b": "r2", "site-c": "r3", "site-d": "r3"})
        header = pydicom.dcmread(ct_series[0], stop_before_pixels=True)
        yield Sites(
            cluster,
            orthanc_b,
            ws_a,
            archive_c,
            archive_d,
            site_a.port,
            str(header.StudyInstanceUID),
            fingerprints(ct_series),
            work,
        )
    finally:
        timing.undo()
        ws_a.stop()
        archive_c.stop()
        archive_d.stop()
        cluster.stop()


def _router_log(sites: Sites, name: str) -> str:
    return (sites.cluster.net.workdir / f"router-{name}.log").read_text(errors="replace")


def _hops(log: str) -> dict[str, list[str]]:
    """The setup hops a process logged (relay_common.setup_timing), per association id, in order."""
    hops: dict[str, list[str]] = {}
    for line in log.splitlines():
        if '"relay.setup_timing"' in line:
            entry = json.loads(line)
            hops.setdefault(entry["assoc"], []).append(entry["hop"])
    return hops


def test_store_and_move_across_replicas_are_spliced_at_one_replica(sites: Sites) -> None:
    cluster, router_a = sites.cluster, sites.router_a
    new = write_series(generate_ct_series(4, patient_id="RELAY-DIRECT-1", seed=21), sites.work / "new")
    stored = dcmtk.storescu(HOST, router_a, "PACS_B", "WS_A", new).check()
    assert stored.succeeded == 4
    assert fingerprints(new).items() <= sites.orthanc_b.fingerprints().items()  # byte-identical at B

    # Orthanc B's sub-association to WS_A is opened at r2 (router B's replica); router A joins it there.
    moved = dcmtk.movescu(HOST, router_a, "PACS_B", "WS_A", "WS_A", {"StudyInstanceUID": sites.study_uid}).check()
    assert moved.completed == len(sites.originals) and not moved.failed
    assert fingerprints(sorted(sites.ws_a.out_dir.glob("*.dcm"))) == sites.originals

    r1, r2 = cluster.log("r1"), cluster.log("r2")
    # A -> B (the C-STORE and the C-MOVE's own association): spliced at r1, B joined there.
    assert re.search(r"site-a -> site-b/ORTHANC_B spliced here by a direct join \(the site is held by replica r2\)", r1)
    # The sub-association B -> A: spliced at r2, A joined there.
    assert re.search(r"site-b -> site-a/WS_A spliced here by a direct join \(the site is held by replica r1\)", r2)
    # No frame crossed between the replicas: no association went over a link or a Forward call.
    assert "spliced through replica" not in r1 + r2, "an association crossed replicas"
    assert "joined at replica r1 directly" in r2 and "joined at replica r2 directly" in r1
    # r1 found router B's replica in its in-memory map (no query on the way), and spliced router B when its
    # ticketed call arrived: after the Open's detour through r2, r1 did nothing but answer.
    direct = [h for h in _hops(r1).values() if "ticket join accepted" in h]
    assert direct, "no direct join in r1's setup hops"
    assert any("located from the map" in h for h in direct), direct
    for hops in direct:
        assert hops.index("ticket join") < hops.index("ticket join accepted") < hops.index("accepted sent")
    # The spilled images were fetched with the ticket at the replica each router joined.
    assert "from blob" in _router_log(sites, "site-b") and "from blob" in _router_log(sites, "site-a")
    assert "blob request of router" not in r1 + r2  # no blob call was refused


def test_a_router_without_the_direct_join_goes_over_the_link(sites: Sites) -> None:
    new = write_series(generate_ct_series(3, patient_id="RELAY-DIRECT-2", seed=22), sites.work / "to-c")
    stored = dcmtk.storescu(HOST, sites.router_a, "ARCHIVE_C", "WS_A", new).check()
    assert stored.succeeded == 3
    assert fingerprints(sorted(sites.archive_c.out_dir.glob("*.dcm"))) == fingerprints(new)
    assert "site-a -> site-c/ARCHIVE_C spliced through replica r3 over a link" in sites.cluster.log("r1")
    assert "joined directly" not in _router_log(sites, "site-c")


def test_a_balancer_without_sni_routing_falls_back_to_the_link(sites: Sites) -> None:
    new = write_series(generate_ct_series(3, patient_id="RELAY-DIRECT-3", seed=23), sites.work / "to-d")
    stored = dcmtk.storescu(HOST, sites.router_a, "ARCHIVE_D", "WS_A", new).check()
    assert stored.succeeded == 3
    assert fingerprints(sorted(sites.archive_d.out_dir.glob("*.dcm"))) == fingerprints(new)
    # Router D's join at "r1.localhost" reached r3 (no SNI routing on its frontend), which refused the ticket.
    assert "direct join at replica r1 failed" in _router_log(sites, "site-d")
    assert "a join ticket from" in sites.cluster.log("r3")
    assert "site-a -> site-d/ARCHIVE_D spliced through replica r3 over a link" in sites.cluster.log("r1")
