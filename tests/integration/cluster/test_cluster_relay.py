"""Two hospitals whose routers sit on different bridge replicas: forwarding between replicas, and failover.

Site A (router on replica r1 through HAProxy frontend "a"): DCMTK clients with calling AE WS_A,
and WS_A itself, a pynetdicom storage SCP (its per-image delay lets a test kill a replica in
the middle of a C-MOVE). Site B (router on replica r2 through frontend "b"; r3 is its backup):
Orthanc ORTHANC_B, known at site A as PACS_B. Every association between them crosses two
replicas (r1 <-> r2 over the internal Forward service); every image is compared by SOP
Instance UID and a hash of its Pixel Data.

The cluster and the sites are started once for the module; each test then starts from the same
state (the `placed` fixture): three replicas up and checked by HAProxy, site A's router on r1 and
B's on r2, WS_A fast and empty. A test may kill or stop replicas; the next one restarts them and
moves the routers back. So any test runs alone, and in any order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, write_series
from relay_demo.network import Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.support import dcmtk
from tests.support.bridge_cluster import HOST, REPLICAS, BridgeCluster
from tests.support.orthanc import OrthancProcess

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)
FRONTEND = {"site-a": "a", "site-b": "b"}  # the HAProxy frontend each router reaches the cluster through
HOME = {"site-a": "r1", "site-b": "r2"}  # the replica each frontend prefers


@dataclass
class SlowStoreSCP:
    """WS_A: a pynetdicom storage SCP that keeps what it received and can take its time per image."""

    delay: float = 0.0
    received: dict[str, str] = field(default_factory=dict)
    aborted: int = 0
    server: ThreadedAssociationServer | None = None

    def start(self) -> int:
        ae = AE(ae_title="WS_A")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            (HOST, 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_ABORTED, self._aborted)],
        )
        return int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        time.sleep(self.delay)
        ds: Dataset = event.dataset
        ds.file_meta = event.file_meta
        uid, digest = fingerprint(ds)
        self.received[uid] = digest
        return 0x0000

    def _aborted(self, event: evt.Event) -> None:
        self.aborted += 1

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@dataclass
class Hospitals:
    cluster: BridgeCluster
    orthanc_b: OrthancProcess
    scp: SlowStoreSCP
    router_a: int
    study_uid: str
    originals: dict[str, str]
    work: Path


@pytest.fixture(scope="module")
def hospitals(
    bridge_cluster: BridgeCluster,
    orthanc_module_factory: OrthancPool,
    tmp_path_factory: pytest.TempPathFactory,
    ct_series: list[Path],
) -> Iterator[Hospitals]:
    require_dcmtk()
    work = tmp_path_factory.mktemp("hospitals")
    orthanc_b = orthanc_module_factory("ORTHANC_B")
    orthanc_b.upload_many(ct_series)
    scp = SlowStoreSCP()
    scp_port = scp.start()
    net, haproxy = bridge_cluster.net, bridge_cluster.haproxy
    assert haproxy is not None
    try:
        net.bridge_port = haproxy.ports["b"]  # site B's router reaches the cluster through frontend b (r2 first)
        site_b = net.add_site(
            "site-b",
            shared=[Shared("ORTHANC_B", HOST, orthanc_b.dicom_port, ["site-a"])],
            remote=[Remote("WS_A", "site-a")],
        )
        net.bridge_port = haproxy.ports["a"]  # site A's through frontend a (r1 first)
        site_a = net.add_site(
            "site-a",
            shared=[Shared("WS_A", HOST, scp_port, ["site-b"])],
            remote=[Remote("PACS_B", "site-b", "ORTHANC_B")],
        )
        assert site_a.port and site_b.port
        orthanc_b.set_modalities({"WS_A": ("WS_A", HOST, site_b.port)})
        net.wait_connected()  # each router sees the other site online, though it is held by another replica
        header = pydicom.dcmread(ct_series[0], stop_before_pixels=True)
        yield Hospitals(
            bridge_cluster, orthanc_b, scp, site_a.port, str(header.StudyInstanceUID), fingerprints(ct_series), work
        )
    finally:
        scp.stop()


def restart_router(hospitals: Hospitals, site: str) -> None:
    """Stop `site`'s router and start it again through its own HAProxy frontend."""
    net, haproxy = hospitals.cluster.net, hospitals.cluster.haproxy
    assert haproxy is not None
    net.stop_router(site)
    net.bridge_port = haproxy.ports[FRONTEND[site]]  # start_router rewrites the config with this address
    net.start_router(site)


@pytest.fixture
def placed(hospitals: Hospitals) -> Hospitals:
    """The state every test starts from, whatever the tests before it did to the cluster."""
    cluster, haproxy = hospitals.cluster, hospitals.cluster.haproxy
    assert haproxy is not None
    for rid, replica in cluster.replicas.items():
        if replica.process is None or replica.process.poll() is not None:  # killed or stopped by a test
            cluster.start_replica(rid)
    for rid in REPLICAS:
        haproxy.wait_up(rid)  # so that a router started now gets its frontend's preferred replica
    presence = cluster.presence()
    for site, rid in HOME.items():
        if presence.get(site) != rid:
            restart_router(hospitals, site)
    cluster.wait_presence(HOME)
    cluster.net.wait_connected()
    hospitals.scp.delay, hospitals.scp.aborted = 0.0, 0
    hospitals.scp.received.clear()
    return hospitals


def test_each_router_is_held_by_the_replica_its_frontend_prefers(placed: Hospitals) -> None:
    """Site B's router, started again through frontend b, signs on at r2 (HAProxy's choice), not where A is."""
    cluster = placed.cluster
    assert cluster.live_replicas() == list(REPLICAS)
    restart_router(placed, "site-b")
    cluster.wait_presence({"site-a": "r1", "site-b": "r2"})
    cluster.net.wait_connected()  # and each router sees the other site online, though another replica holds it


def test_echo_find_store_move_and_get_cross_replicas_byte_identical(placed: Hospitals) -> None:
    hospitals = placed
    cluster, router_a = hospitals.cluster, hospitals.router_a
    dcmtk.echoscu(HOST, router_a, "PACS_B", "WS_A").check()

    matches = dcmtk.findscu(HOST, router_a, "PACS_B", "WS_A", "STUDY", {"StudyInstanceUID": None}, "study").check()
    assert hospitals.study_uid in {m["StudyInstanceUID"] for m in matches}

    new = write_series(generate_ct_series(3, patient_id="RELAY-CLUSTER-1", seed=7), hospitals.work / "new")
    stored = dcmtk.storescu(HOST, router_a, "PACS_B", "WS_A", new).check()
    assert stored.succeeded == 3
    assert fingerprints(new).items() <= hospitals.orthanc_b.fingerprints().items()  # byte-identical at B

    # C-MOVE: Orthanc B's own sub-association to WS_A goes router B -> r2 -> r1 -> router A.
    moved = dcmtk.movescu(HOST, router_a, "PACS_B", "WS_A", "WS_A", {"StudyInstanceUID": hospitals.study_uid}).check()
    assert moved.completed == len(hospitals.originals) and not moved.failed
    assert hospitals.scp.received == hospitals.originals

    # C-GET: the images come back on the requester's own association (r1 -> r2 and back).
    got = dcmtk.getscu(
        HOST, router_a, "PACS_B", "WS_A", out_dir=hospitals.work / "get", keys={"StudyInstanceUID": hospitals.study_uid}
    ).check()
    assert got.completed == len(hospitals.originals) and not got.failed
    assert fingerprints(got.received) == hospitals.originals

    # Both directions really crossed replicas (r1 forwarded A's calls to r2, r2 forwarded B's back to r1).
    assert "spliced through replica r2" in cluster.log("r1")
    assert "spliced through replica r1" in cluster.log("r2")


def test_sigkill_of_the_replica_holding_a_site_during_a_c_move(placed: Hospitals) -> None:
    """Abort on both sides, router B moves to r3 through HAProxy, the retry succeeds; failover time logged."""
    hospitals = placed
    cluster, scp, router_a = hospitals.cluster, hospitals.scp, hospitals.router_a
    scp.delay = 0.5
    results: list[dcmtk.RetrieveResult] = []
    keys = {"StudyInstanceUID": hospitals.study_uid}
    mover = threading.Thread(
        target=lambda: results.append(dcmtk.movescu(HOST, router_a, "PACS_B", "WS_A", "WS_A", keys, timeout=30))
    )
    mover.start()
    deadline = time.monotonic() + 20
    while not scp.received and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scp.received, "the C-MOVE delivered nothing before the kill"
    killed = time.monotonic()
    cluster.kill("r2")
    mover.join(40)
    scp.delay = 0.0

    (interrupted,) = results
    assert not interrupted.ok and len(scp.received) < len(hospitals.originals), interrupted
    assert interrupted.aborted, interrupted  # the requester at A was told with an A-ABORT
    deadline = time.monotonic() + 10
    while not scp.aborted and time.monotonic() < deadline:  # and so was WS_A's sub-association
        time.sleep(0.05)
    assert scp.aborted >= 1

    # The first C-ECHO that succeeds again, through r1 and r3: that is the failover time.
    attempts = 0
    while True:
        attempts += 1
        if dcmtk.echoscu(HOST, router_a, "PACS_B", "WS_A", timeout=5).ok:
            break
        assert time.monotonic() - killed < 30, "no C-ECHO succeeded within 30 s of the kill"
        time.sleep(0.1)
    failover = time.monotonic() - killed
    log.warning("FAILOVER: %.2f s from SIGKILL of r2 to the first successful C-ECHO (%d attempts)", failover, attempts)
    print(f"\nfailover time: {failover:.2f} s (SIGKILL of r2 -> first successful C-ECHO, {attempts} attempts)")
    cluster.wait_presence({"site-a": "r1", "site-b": "r3"})

    scp.received.clear()
    retried = dcmtk.movescu(HOST, router_a, "PACS_B", "WS_A", "WS_A", keys).check()
    assert retried.completed == len(hospitals.originals)
    assert scp.received == hospitals.originals


def test_a_clean_exit_removes_the_replicas_rows_and_its_routers_move(placed: Hospitals) -> None:
    """SIGTERM of r2, which holds site B: it drains, its rows go at once, router B moves to r3 (frontend b's
    next choice); then SIGTERM of r3: router B moves on to r1, and the two sites meet in a local splice there."""
    cluster = placed.cluster
    for stopped, expected in (("r2", "r3"), ("r3", "r1")):
        process = cluster.replicas[stopped].process
        assert process is not None
        process.terminate()
        assert process.wait(30) == 0, cluster.log(stopped)[-2000:]
        assert stopped not in cluster.live_replicas()  # removed at exit, not left to expire
        cluster.wait_presence({"site-a": "r1", "site-b": expected})
        deadline = time.monotonic() + 20
        while not dcmtk.echoscu(HOST, placed.router_a, "PACS_B", "WS_A", timeout=5).ok:
            assert time.monotonic() < deadline, f"no C-ECHO after router B moved to {expected}"
            time.sleep(0.2)


def test_a_router_busy_on_a_draining_replica_moves_at_once_and_its_association_finishes_there(
    placed: Hospitals,
) -> None:
    """SIGTERM of r2 while router B carries an association there (from A's workstation to ORTHANC_B).
    Router B is moved within seconds anyway, so new associations towards site B work during the drain
    (before, every Open towards B was refused DRAINING until the running association ended, and a
    calling router gives up after open_retry_s); the running association goes on through r2, stores
    byte-identical, and r2 exits 0 once it has ended."""
    cluster = placed.cluster
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    running = ae.associate(HOST, placed.router_a, ae_title="PACS_B")
    assert running.is_established
    images = generate_ct_series(4, rows=64, cols=64, patient_id="DRAIN-BUSY", seed=41)
    assert running.send_c_store(images[0]).Status == 0
    r2 = cluster.replicas["r2"].process
    assert r2 is not None
    r2.terminate()
    cluster.wait_presence({"site-a": "r1", "site-b": "r3"}, timeout=10)  # while the association still runs
    assert running.is_established
    assert dcmtk.echoscu(HOST, placed.router_a, "PACS_B", "WS_A", timeout=10).ok, "site B reachable during the drain"
    for image in images[1:]:
        assert running.send_c_store(image).Status == 0
    assert running.send_c_echo().Status == 0
    running.release()
    assert r2.wait(15) == 0, cluster.log("r2")[-2000:]
    assert "asking router site-b to reconnect; its 1 association(s) here go on" in cluster.log("r2")
    arrived = placed.orthanc_b.fingerprints()
    assert {uid: arrived.get(uid) for uid in fingerprints(images)} == fingerprints(images), "byte-identical"
