"""Services, not just devices (issue 18): which DICOM services each site may use on a shared device.

Hospital B shares Orthanc (ORTHANC_B) with three sites:
- hospital-a: verification, query, retrieve (the [[shared]] entry's `services`);
- hospital-c: storage only (a [[shared.grant]]);
- hospital-d: nothing (a grant with no services).
Hospital A shares two destinations with B for C-MOVE: WS_A (storage, the default) and
VIEW_A (verification only). The bridge runs in this process so that the test can count the
Opens it sees and, playing a hostile bridge, forge the services in A's directory.

Real parts throughout: Orthanc, DCMTK's echoscu/findscu/movescu/getscu/storescu, pynetdicom,
and the routers as processes over gRPC + TLS.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.control import ControlService
from relay_bridge.server import RelayServicer
from relay_bridge.splice import AssociationService
from relay_demo.datasets import fingerprints
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.ul import parse_reject
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.support import dcmtk
from tests.support.dcmtk import StorescpProcess
from tests.support.inprocess_bridge import InProcessBridge
from tests.support.orthanc import OrthancProcess
from tests.support.wire import exchange, wait_until
from tests.unit.ul.builders import associate_rq

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
QR = ["verification", "query", "retrieve"]
RJ_NOT_GRANTED = (1, 1, 1)  # rejected-permanent, service-user, no-reason-given (PS3.8 Table 9-21)
STUDY_FIND = str(StudyRootQueryRetrieveInformationModelFind)
CT = str(CTImageStorage)


class Watch:
    """What the test's bridge saw and what it forges."""

    opens: list[pb.Open] = []
    forge_services: dict[str, list[str]] = {}  # site -> services it is told it was granted


class CountingAssociations(AssociationService):
    async def initiate(self, session, op: pb.Open, context) -> None:
        Watch.opens.append(pb.Open.FromString(op.SerializeToString()))
        await super().initiate(session, op, context)


class ForgingControl(ControlService):
    async def directory_for(self, site: str) -> pb.Directory:
        directory = await super().directory_for(site)
        if site in Watch.forge_services:
            for entry in directory.devices:
                del entry.services[:]
                entry.services.extend(Watch.forge_services[site])
        return directory


class WatchedServicer(RelayServicer):
    association_class = CountingAssociations
    control_class = ForgingControl


@dataclass
class Sites:
    net: LocalRelayNetwork
    bridge: InProcessBridge
    orthanc: OrthancProcess
    workstation: StorescpProcess
    viewer: StorescpProcess
    study_uid: str
    originals: dict[str, str]

    def port(self, site: str) -> int:
        port = self.net.sites[site].port
        assert port
        return port

    def audit(self, site: str) -> list[dict[str, object]]:
        path = self.net.workdir / f"audit-{site}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def sites(
    orthanc_module_factory: OrthancPool, tmp_path_factory: pytest.TempPathFactory, ct_series: list[Path]
) -> Iterator[Sites]:
    require_dcmtk("echoscu", "findscu", "movescu", "getscu", "storescu", "storescp")
    work = tmp_path_factory.mktemp("services")
    workstation = StorescpProcess(work / "ws-a", "WS_A").start()
    viewer = StorescpProcess(work / "view-a", "VIEW_A").start()
    orthanc = orthanc_module_factory("ORTHANC_B")
    orthanc.upload_many(ct_series)
    net = LocalRelayNetwork(work / "relay").start(bridge=False)
    bridge = InProcessBridge(net, WatchedServicer)
    try:
        pacs = Shared(
            "ORTHANC_B",
            HOST,
            orthanc.dicom_port,
            ["hospital-a", "hospital-c", "hospital-d"],
            services=QR,
            grants={"hospital-c": ["storage"], "hospital-d": []},
        )
        site_b = net.add_site(
            "hospital-b", shared=[pacs], remote=[Remote("WS_A", "hospital-a"), Remote("VIEW_A", "hospital-a")]
        )
        net.add_site(
            "hospital-a",
            shared=[
                Shared("WS_A", HOST, workstation.port, ["hospital-b"]),
                Shared("VIEW_A", HOST, viewer.port, ["hospital-b"], services=["verification"]),
            ],
            remote=[Remote("PACS_B", "hospital-b", "ORTHANC_B")],
        )
        for name in ("hospital-c", "hospital-d"):
            net.add_site(name, remote=[Remote("PACS_B", "hospital-b", "ORTHANC_B")])
        assert site_b.port
        orthanc.set_modalities({"WS_A": ("WS_A", HOST, site_b.port), "VIEW_A": ("VIEW_A", HOST, site_b.port)})
        net.wait_connected()
        header = pydicom.dcmread(ct_series[0], stop_before_pixels=True)
        yield Sites(net, bridge, orthanc, workstation, viewer, str(header.StudyInstanceUID), fingerprints(ct_series))
    finally:
        for name in net.sites:
            net.stop_router(name)
        bridge.stop()
        workstation.stop()
        viewer.stop()


def directory_services(sites: Sites, site: str) -> dict[str, list[str]]:
    status = sites.net.status(site)
    return {d["ae_title"]: d["services"] for d in status.get("directory", [])}  # type: ignore[union-attr, index]


# -- hospital-a: verification, query, retrieve ----------------------------------------------------


def test_each_router_is_told_only_what_it_was_granted(sites: Sites) -> None:
    assert directory_services(sites, "hospital-a") == {"ORTHANC_B": QR}
    assert directory_services(sites, "hospital-c") == {"ORTHANC_B": ["storage"]}
    assert directory_services(sites, "hospital-d") == {}  # granted nothing: not listed
    assert directory_services(sites, "hospital-b") == {"WS_A": default_groups(), "VIEW_A": ["verification"]}


def default_groups() -> list[str]:
    from relay_router.services import DEFAULT_GROUPS, ordered

    return list(ordered(DEFAULT_GROUPS))


def test_query_retrieve_partner_can_echo_find_move_and_get(sites: Sites, tmp_path: Path) -> None:
    port = sites.port("hospital-a")
    dcmtk.echoscu(HOST, port, "PACS_B", "WS_A").check()
    matches = dcmtk.findscu(HOST, port, "PACS_B", "WS_A", "STUDY", {"StudyInstanceUID": None}, "study").check()
    assert sites.study_uid in {m["StudyInstanceUID"] for m in matches}
    sites.workstation.clear()
    moved = dcmtk.movescu(HOST, port, "PACS_B", "WS_A", "WS_A", {"StudyInstanceUID": sites.study_uid}).check()
    assert moved.completed == len(sites.originals) and not moved.failed
    sites.workstation.wait_for_files(len(sites.originals))
    assert sites.workstation.fingerprints() == sites.originals
    got = dcmtk.getscu(HOST, port, "PACS_B", "WS_A", tmp_path, {"StudyInstanceUID": sites.study_uid}).check()
    assert fingerprints(got.received) == sites.originals  # C-GET's storage sub-operations come with retrieve


def test_storage_is_refused_at_the_callers_router_without_a_wan_round_trip(
    sites: Sites, sample_dicom_files: list[Path]
) -> None:
    opens, instances = len(Watch.opens), len(sites.orthanc.instances())
    result = dcmtk.storescu(HOST, sites.port("hospital-a"), "PACS_B", "WS_A", sample_dicom_files[:1])
    assert result.rejected, result
    assert len(Watch.opens) == opens  # the bridge saw no Open
    assert len(sites.orthanc.instances()) == instances
    (event,) = [e for e in sites.audit("hospital-a") if e["event"] == "services_refused"][-1:]
    assert event["check"] == "caller" and event["association_rejected"] is True
    assert event["refused_groups"] == ["storage"]


def test_a_mixed_request_gets_query_accepted_and_storage_rejected_under_its_own_ids(sites: Sites) -> None:
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(CTImageStorage)  # context 1
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)  # context 3
    assoc = ae.associate(HOST, sites.port("hospital-a"), ae_title="PACS_B")
    assert assoc.is_established
    try:
        results = {cx.context_id: (cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts}
        assert results == {1: (CT, 1)}  # user-rejection, the caller's ID
        assert [(cx.context_id, cx.abstract_syntax) for cx in assoc.accepted_contexts] == [(3, STUDY_FIND)]
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        found = [ds.StudyInstanceUID for status, ds in assoc.send_c_find(query, STUDY_FIND) if ds is not None]
        assert sites.study_uid in found
    finally:
        assoc.release()


def test_a_move_destination_b_may_not_store_into_fails_with_the_archives_own_status(sites: Sites) -> None:
    """Orthanc's sub-association to VIEW_A (verification only for B) is refused; movescu sees Orthanc's failure."""
    sites.viewer.clear()
    moved = dcmtk.movescu(
        HOST, sites.port("hospital-a"), "PACS_B", "WS_A", "VIEW_A", {"StudyInstanceUID": sites.study_uid}
    )
    assert moved.accepted and not moved.ok, moved
    assert moved.final_status and not moved.final_status.startswith("Success"), moved
    assert not sites.viewer.files(), "VIEW_A must not receive anything"
    refused = [e for e in sites.audit("hospital-b") if e["event"] == "services_refused" and e["called_ae"] == "VIEW_A"]
    assert refused and refused[-1]["check"] == "caller" and refused[-1]["refused_groups"] == ["storage"]


# -- hospital-c: storage only; hospital-d: nothing -----------------------------------------------


def test_push_only_partner_may_store_but_not_query(sites: Sites, sample_dicom_files: list[Path]) -> None:
    port = sites.port("hospital-c")
    stored = dcmtk.storescu(HOST, port, "PACS_B", "CT_C", sample_dicom_files[:1]).check()
    assert stored.succeeded == 1
    found = dcmtk.findscu(HOST, port, "PACS_B", "CT_C", "STUDY", {"StudyInstanceUID": None}, "study")
    assert found.run.rejected and not found, found.run  # A-ASSOCIATE-RJ from C's own router: query not granted


def test_a_site_granted_nothing_is_rejected_by_the_owner(sites: Sites) -> None:
    """hospital-d's directory does not list ORTHANC_B, so its own router cannot check: B's router does."""
    answer = exchange(sites.port("hospital-d"), associate_rq(called="PACS_B", calling="WS_D"))
    assert parse_reject(answer) == RJ_NOT_GRANTED
    refused = [e for e in sites.audit("hospital-b") if e["event"] == "services_refused" and e["site"] == "hospital-d"]
    assert refused and refused[-1]["check"] == "owner" and refused[-1]["association_rejected"] is True


# -- a hostile bridge: A's directory says storage; B's router still refuses it ---------------------


@pytest.fixture
def forged(sites: Sites) -> Iterator[Sites]:
    Watch.forge_services["hospital-a"] = ["verification", "query", "retrieve", "storage"]
    sites.bridge.run(sites.bridge.servicer.control.broadcast_directory())
    wait_until(lambda: "storage" in directory_services(sites, "hospital-a").get("ORTHANC_B", []), 10)
    yield sites
    Watch.forge_services.clear()
    sites.bridge.run(sites.bridge.servicer.control.broadcast_directory())
    wait_until(lambda: directory_services(sites, "hospital-a").get("ORTHANC_B") == QR, 10)


def test_forged_directory_storage_is_refused_at_the_owners_router(
    forged: Sites, sample_dicom_files: list[Path]
) -> None:
    sites = forged
    opens, instances = len(Watch.opens), len(sites.orthanc.instances())
    result = dcmtk.storescu(HOST, sites.port("hospital-a"), "PACS_B", "WS_A", sample_dicom_files[:1])
    assert result.rejected, result
    assert len(Watch.opens) == opens + 1  # this time it crossed the bridge
    assert len(sites.orthanc.instances()) == instances
    refused = [e for e in sites.audit("hospital-b") if e["event"] == "services_refused" and e["site"] == "hospital-a"]
    assert refused[-1]["check"] == "owner" and refused[-1]["association_rejected"] is True


def test_forged_directory_mixed_request_never_shows_orthanc_the_storage_context(forged: Sites) -> None:
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, forged.port("hospital-a"), ae_title="PACS_B")
    assert assoc.is_established
    try:
        assert {cx.context_id: cx.result for cx in assoc.rejected_contexts} == {1: 1}
        assert [cx.context_id for cx in assoc.accepted_contexts] == [3]
    finally:
        assoc.release()
    refused = [e for e in forged.audit("hospital-b") if e["event"] == "services_refused" and e["site"] == "hospital-a"]
    assert refused[-1]["check"] == "owner" and refused[-1]["refused_contexts"] == [1]
    assert refused[-1]["refused_abstract_syntaxes"] == [CT] and refused[-1]["association_rejected"] is False


def test_dcmtk_reads_an_ac_with_contexts_rejected_by_the_grant(sites: Sites, tmp_path: Path) -> None:
    """getscu from the push-only site: its storage contexts are accepted, its C-GET context rejected."""
    result = dcmtk.getscu(
        HOST,
        sites.port("hospital-c"),
        "PACS_B",
        "CT_C",
        tmp_path,
        {"StudyInstanceUID": sites.study_uid},
        extra_args=["-d"],
    )
    assert result.accepted and not result.ok, result  # DCMTK parsed the AC the routers rebuilt
    assert "(User Rejection)" in result.log and "(Accepted)" in result.log, result
    assert "No adequate Presentation Contexts for sending C-GET" in result.log, result
    assert not result.received


def test_devices_pacs_config_and_share_list_show_the_services(sites: Sites) -> None:
    net = sites.net

    def router_cli(site: str, *args: str) -> str:
        command = [net.python, "-m", "relay_router.cli", "--config", str(net.router_config_path(site)), *args]
        done = subprocess.run(command, capture_output=True, text=True, env=net.env, timeout=60, cwd=net.workdir)
        return done.stdout

    status = ["--status-file", str(net.status_path("hospital-a"))]
    rows = json.loads(router_cli("hospital-a", "devices", *status, "--json"))
    assert [(r["ae_title"], r["services"]) for r in rows] == [("PACS_B", QR)]
    table = router_cli("hospital-a", "devices", *status)
    assert "services: verification, query, retrieve" in table
    pacs = json.loads(router_cli("hospital-a", "pacs-config", "--format", "json", *status))
    assert [(p["ae_title"], p["services"]) for p in pacs] == [("PACS_B", QR)]
    assert "ORTHANC_B at hospital-b  (verification, query, retrieve)" in router_cli(
        "hospital-a", "pacs-config", *status
    )
    listing = net.bridge_admin("share", "list")
    assert "services for *: verification, query, retrieve" in listing.stdout
    assert "services for hospital-c: storage" in listing.stdout
    assert "services for hospital-d: none" in listing.stdout
