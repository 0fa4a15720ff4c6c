"""Rolling restart of the three bridge replicas under continuous traffic: zero failed associations.

Two hospitals whose routers sit on different replicas (site A on r1, site B on r2, through
HAProxy frontends that prefer them). Six DCMTK loops run the whole time: C-ECHO and C-STORE
from A to B's archive (a pynetdicom storage SCP, PACS_B), the same from B to A's workstation
(WS_A), and C-FIND and C-MOVE from A to B's Orthanc (ORTHANC_B), whose C-MOVE sends the study to
WS_A over its own sub-association (router B -> bridge -> router A). Meanwhile each replica in
turn gets SIGTERM (it drains: /readyz 503 and NOT_SERVING, Move to its routers, running
associations finish), exits 0, is started again and taken back by HAProxy, whose HTTP check of
`GET /readyz` marks it down at the first check after the SIGTERM (a 503, not a timeout). Every
association of every loop must succeed, every C-FIND must find the study, every C-MOVE must
complete every sub-operation, and every image must arrive byte-identical (SOP Instance UID and
Pixel Data hash) at the other site.

What makes that hold (docs/high-availability.md, "Rolling upgrade"): the drain lets running
associations finish and moves idle routers; an Open refused for a moment while a router is between
replicas (Refused DRAINING, SITE_OFFLINE for a site listed online a moment ago, or this router's
own link signing on again) is retried by the calling router within `[bridge] open_retry_s`
(relay_router.open_retry) instead of being refused to its device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, write_series
from relay_demo.network import Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.support import dcmtk
from tests.support.bridge_cluster import HOST, REPLICAS, BridgeCluster, start_bridge_cluster
from tests.support.orthanc import OrthancProcess
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)
IMAGES_PER_STORE = 2
STORES_PREPARED = 60  # per direction: more than the loops can send during the restarts
SETTLE_S = 1.0  # traffic between two restarts (each replica carries some before the next goes)


@dataclass
class StoreSCP:
    """A pynetdicom storage (and verification) SCP that keeps the fingerprint of what it received."""

    ae_title: str
    received: dict[str, str] = field(default_factory=dict)
    every: list[tuple[str, str]] = field(default_factory=list)  # each image received, also the same one again
    server: ThreadedAssociationServer | None = None

    def start(self) -> int:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self.server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        ds: Dataset = event.dataset
        ds.file_meta = event.file_meta
        uid, digest = fingerprint(ds)
        self.received[uid] = digest
        self.every.append((uid, digest))
        return 0x0000

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


class Outcome(Protocol):
    """A DCMTK run's result (ToolResult, or FindResult which delegates to its run)."""

    @property
    def ok(self) -> bool: ...


@dataclass
class Loop:
    """One client running associations back to back until stopped; every result is kept."""

    name: str
    run_one: Callable[[int], Outcome]
    results: list[tuple[float, Outcome]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        def body() -> None:
            i = 0
            while not self.stop.is_set():
                started = time.monotonic()
                self.results.append((started, self.run_one(i)))
                i += 1

        self.thread = threading.Thread(target=body, name=self.name, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(90)

    @property
    def failures(self) -> list[Outcome]:
        return [r for _, r in self.results if not r.ok]


@dataclass
class Sites:
    cluster: BridgeCluster
    ws_a: StoreSCP
    pacs_b: StoreSCP
    orthanc_b: OrthancProcess  # C-FIND and C-MOVE (to WS_A) from site A
    router_a: int
    router_b: int
    to_b: list[list[Path]]  # batches stored from A to PACS_B, one per association
    to_a: list[list[Path]]
    study_uid: str  # of ct_series, which ORTHANC_B holds
    study: dict[str, str]  # ct_series' fingerprints: what each C-MOVE must deliver to WS_A


@pytest.fixture(scope="module")
def bridge_cluster(
    postgres_for_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BridgeCluster]:
    """As the package's fixture, but HAProxy checks the replicas' gRPC health service (NOT_SERVING while
    draining), as docs/high-availability.md recommends for rolling upgrades."""
    cluster = start_bridge_cluster(
        tmp_path_factory.mktemp("cluster"),
        postgres_for_cluster,
        {"a": ["r1", "r3", "r2"], "b": ["r2", "r3", "r1"]},
        renew_s=0.5,
        health="http",
        # Above the longest association (a C-MOVE of the study takes seconds on a loaded machine): a drain
        # cuts what still runs when its grace ends, and that is not what an upgrade should do.
        drain_grace_s=20,
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def sites(
    bridge_cluster: BridgeCluster,
    orthanc_module_factory: OrthancPool,
    tmp_path_factory: pytest.TempPathFactory,
    ct_series: list[Path],
) -> Iterator[Sites]:
    require_dcmtk()
    work = tmp_path_factory.mktemp("rolling")
    ws_a, pacs_b = StoreSCP("WS_A"), StoreSCP("PACS_B")
    orthanc_b = orthanc_module_factory("ORTHANC_B")
    orthanc_b.upload_many(ct_series)
    net, haproxy = bridge_cluster.net, bridge_cluster.haproxy
    assert haproxy is not None
    try:
        ws_a_port, pacs_b_port = ws_a.start(), pacs_b.start()
        net.bridge_port = haproxy.ports["b"]  # site B's router through frontend b (r2 first)
        site_b = net.add_site(
            "site-b",
            shared=[
                Shared("PACS_B", HOST, pacs_b_port, ["site-a"]),
                Shared("ORTHANC_B", HOST, orthanc_b.dicom_port, ["site-a"]),
            ],
            remote=[Remote("WS_A", "site-a")],
        )
        net.bridge_port = haproxy.ports["a"]  # site A's through frontend a (r1 first)
        site_a = net.add_site(
            "site-a",
            shared=[Shared("WS_A", HOST, ws_a_port, ["site-b"])],
            remote=[Remote("PACS_B", "site-b"), Remote("ORTHANC_B", "site-b")],
        )
        assert site_a.port and site_b.port
        orthanc_b.set_modalities({"WS_A": ("WS_A", HOST, site_b.port)})  # C-MOVE's destination, via router B
        net.wait_connected()

        def batches(direction: str, seed: int) -> list[list[Path]]:
            images = generate_ct_series(
                STORES_PREPARED * IMAGES_PER_STORE, rows=64, cols=64, patient_id=f"ROLL-{direction}", seed=seed
            )
            paths = write_series(images, work / direction)
            return [paths[i : i + IMAGES_PER_STORE] for i in range(0, len(paths), IMAGES_PER_STORE)]

        study_uid = str(pydicom.dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID)
        yield Sites(
            bridge_cluster,
            ws_a,
            pacs_b,
            orthanc_b,
            site_a.port,
            site_b.port,
            batches("to-b", 11),
            batches("to-a", 12),
            study_uid,
            fingerprints(ct_series),
        )
    finally:
        ws_a.stop()
        pacs_b.stop()


def restart(cluster: BridgeCluster, rid: str) -> tuple[float, float]:
    """SIGTERM, wait for a clean exit, start again, wait until HAProxy has it up again; the seconds from the
    SIGTERM to HAProxy marking it down, and to its exit."""
    process, haproxy = cluster.replicas[rid].process, cluster.haproxy
    assert process is not None and process.poll() is None and haproxy is not None
    logged = haproxy.log_path.stat().st_size
    started = time.monotonic()
    process.terminate()
    # /readyz answers 503 from the start of the drain: out of rotation at the next check, not at a timeout.
    down = haproxy.wait_state(rid, up=False, after=logged)
    marked_down = time.monotonic() - started
    assert "code: 503" in down and "timeout" not in down.lower(), down
    assert process.wait(30) == 0, f"{rid} did not exit cleanly:\n{cluster.log(rid)[-3000:]}"
    drained = time.monotonic() - started
    cluster.start_replica(rid)  # returns once it listens and has registered (its ready file)
    haproxy.wait_state(rid, up=True, after=logged)
    return marked_down, drained


def test_rolling_restart_under_echo_store_find_and_move_traffic_fails_no_association(sites: Sites) -> None:
    cluster = sites.cluster
    cluster.wait_presence({"site-a": "r1", "site-b": "r2"})

    study: dict[str, str | None] = {"StudyInstanceUID": sites.study_uid}

    def store(port: int, called: str, calling: str, batches: list[list[Path]]) -> Callable[[int], Outcome]:
        return lambda i: dcmtk.storescu(HOST, port, called, calling, batches[i % len(batches)], timeout=30)

    loops = [
        Loop("echo A->B", lambda i: dcmtk.echoscu(HOST, sites.router_a, "PACS_B", "WS_A", timeout=30)),
        Loop("store A->B", store(sites.router_a, "PACS_B", "WS_A", sites.to_b)),
        Loop("echo B->A", lambda i: dcmtk.echoscu(HOST, sites.router_b, "WS_A", "PACS_B", timeout=30)),
        Loop("store B->A", store(sites.router_b, "WS_A", "PACS_B", sites.to_a)),
        Loop("find A->B", lambda i: dcmtk.findscu(HOST, sites.router_a, "ORTHANC_B", "WS_A", keys=study, timeout=30)),
        Loop(
            "move B->A",  # C-MOVE asked by A; the images travel from Orthanc B to WS_A on a sub-association
            lambda i: dcmtk.movescu(HOST, sites.router_a, "ORTHANC_B", "WS_A", "WS_A", study, timeout=60),
        ),
    ]
    for loop in loops:
        loop.start()
    timings: dict[str, tuple[float, float]] = {}
    try:
        time.sleep(SETTLE_S)
        for rid in REPLICAS:
            timings[rid] = restart(cluster, rid)
            time.sleep(SETTLE_S)
    finally:
        for loop in loops:
            loop.finish()

    counts = {loop.name: len(loop.results) for loop in loops}
    marked = {rid: f"down after {d:.2f} s, exit after {e:.2f} s" for rid, (d, e) in timings.items()}
    print(f"\nrolling restart: {marked}; associations per loop {counts}")
    for loop in loops:
        assert len(loop.results) >= 2, f"{loop.name} hardly ran: {counts}"
        assert not loop.failures, f"{loop.name}: {len(loop.failures)} failed association(s); first:\n{loop.failures[0]}"
    finds, moves = loops[4].results, loops[5].results
    assert all(sites.study_uid in {m.get("StudyInstanceUID") for m in r} for _, r in finds)  # type: ignore[attr-defined]
    for _, moved in moves:
        assert isinstance(moved, dcmtk.RetrieveResult)
        assert moved.completed == len(sites.study) and not moved.failed, moved
    # Every replica really carried the sites at some point: the restarts moved the routers around.
    for rid in REPLICAS:
        assert "signed on" in cluster.log(rid), f"no router ever signed on at {rid}"

    def sent(loop: Loop, batches: list[list[Path]]) -> dict[str, str]:
        return fingerprints(p for i in range(len(loop.results)) for p in batches[i % len(batches)])

    assert sites.pacs_b.received.items() >= sent(loops[1], sites.to_b).items()  # byte-identical at B
    assert sites.ws_a.received.items() >= sent(loops[3], sites.to_a).items()  # and at A
    moved_images = [(uid, digest) for uid, digest in sites.ws_a.every if uid in sites.study]
    assert len(moved_images) >= len(moves) * len(sites.study)  # every C-MOVE delivered the study,
    assert all(sites.study[uid] == digest for uid, digest in moved_images)  # byte-identical each time
