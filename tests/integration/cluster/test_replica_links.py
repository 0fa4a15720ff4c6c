"""Associations between replicas over the replica links (relay_bridge.cluster.link), with real parts.

Three replicas behind HAProxy on a throwaway PostgreSQL; r3 runs with `[cluster] links = false`
(as a replica of an older version would: no link server). Site A's router sits on r1, site B's
on r2, site C's on r3. Site B has Orthanc ORTHANC_B, site A a DCMTK storescp WS_A (the C-MOVE
destination), site C a DCMTK storescp ARCHIVE_C. Every image is compared by SOP Instance UID
and a hash of its Pixel Data.

- A -> B and B's C-MOVE sub-association back to A cross r1 <-> r2 over links;
- A -> C crosses r1 -> r3 over a Forward call: r3 has no link port, so r1 falls back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.support import dcmtk
from tests.support.bridge_cluster import HOST, BridgeCluster, start_bridge_cluster
from tests.support.orthanc import OrthancProcess
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.integration


@dataclass
class Sites:
    cluster: BridgeCluster
    orthanc_b: OrthancProcess
    ws_a: dcmtk.StorescpProcess
    archive_c: dcmtk.StorescpProcess
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
    work = tmp_path_factory.mktemp("links")
    cluster = start_bridge_cluster(
        work / "net",
        postgres_for_cluster,
        {"a": ["r1", "r3", "r2"], "b": ["r2", "r3", "r1"], "c": ["r3", "r2", "r1"]},
        renew_s=0.5,
    )
    ws_a = dcmtk.StorescpProcess(work / "ws-a", "WS_A").start()
    archive_c = dcmtk.StorescpProcess(work / "archive-c", "ARCHIVE_C").start()
    try:
        # r3 as an older replica: no link server, Forward calls only.
        LocalRelayNetwork._stop(cluster.replicas["r3"].process)
        with cluster.replicas["r3"].config.open("a") as config:
            config.write("links = false\n")
        cluster.start_replica("r3")
        orthanc_b = orthanc_module_factory("ORTHANC_B")
        orthanc_b.upload_many(ct_series)
        net, haproxy = cluster.net, cluster.haproxy
        assert haproxy is not None
        net.bridge_port = haproxy.ports["b"]
        site_b = net.add_site(
            "site-b",
            shared=[Shared("ORTHANC_B", HOST, orthanc_b.dicom_port, ["site-a"])],
            remote=[Remote("WS_A", "site-a")],
        )
        net.bridge_port = haproxy.ports["c"]
        net.add_site("site-c", shared=[Shared("ARCHIVE_C", HOST, archive_c.port, ["site-a"])])
        net.bridge_port = haproxy.ports["a"]
        site_a = net.add_site(
            "site-a",
            shared=[Shared("WS_A", HOST, ws_a.port, ["site-b"])],
            remote=[Remote("PACS_B", "site-b", "ORTHANC_B"), Remote("ARCHIVE_C", "site-c")],
        )
        assert site_a.port and site_b.port
        orthanc_b.set_modalities({"WS_A": ("WS_A", HOST, site_b.port)})
        net.wait_connected()
        cluster.wait_presence({"site-a": "r1", "site-b": "r2", "site-c": "r3"})
        header = pydicom.dcmread(ct_series[0], stop_before_pixels=True)
        yield Sites(
            cluster,
            orthanc_b,
            ws_a,
            archive_c,
            site_a.port,
            str(header.StudyInstanceUID),
            fingerprints(ct_series),
            work,
        )
    finally:
        ws_a.stop()
        archive_c.stop()
        cluster.stop()


def test_store_and_move_between_replicas_over_links_byte_identical(sites: Sites) -> None:
    cluster, router_a = sites.cluster, sites.router_a
    new = write_series(generate_ct_series(4, patient_id="RELAY-LINKS-1", seed=11), sites.work / "new")
    stored = dcmtk.storescu(HOST, router_a, "PACS_B", "WS_A", new).check()
    assert stored.succeeded == 4
    assert fingerprints(new).items() <= sites.orthanc_b.fingerprints().items()  # byte-identical at B

    # Orthanc B's sub-association to WS_A goes router B -> r2 -> link -> r1 -> router A.
    moved = dcmtk.movescu(HOST, router_a, "PACS_B", "WS_A", "WS_A", {"StudyInstanceUID": sites.study_uid}).check()
    assert moved.completed == len(sites.originals) and not moved.failed
    assert fingerprints(sorted(sites.ws_a.out_dir.glob("*.dcm"))) == sites.originals

    assert "spliced through replica r2 over a link" in cluster.log("r1")
    assert "spliced through replica r1 over a link" in cluster.log("r2")
    assert "over a Forward call" not in cluster.log("r1") + cluster.log("r2")


def test_a_replica_without_links_is_reached_over_a_forward_call(sites: Sites) -> None:
    new = write_series(generate_ct_series(3, patient_id="RELAY-LINKS-2", seed=12), sites.work / "to-c")
    stored = dcmtk.storescu(HOST, sites.router_a, "ARCHIVE_C", "WS_A", new).check()
    assert stored.succeeded == 3
    assert fingerprints(sorted(sites.archive_c.out_dir.glob("*.dcm"))) == fingerprints(new)
    assert "spliced through replica r3 over a Forward call" in sites.cluster.log("r1")
