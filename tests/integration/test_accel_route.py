"""Accelerated storage routes with real parts: DCMTK storescu -> router A -> bridge -> router B -> Orthanc.

Router A accepts the association itself for PACS_B (`accelerate = true`), spools each image (fsync)
before answering, and ships its spool to router B in batches; router B spools them again and stores
them into Orthanc over parallel associations. Every image must arrive bit for bit (SOP Instance UID,
Pixel Data hash, every data element), also when either router is SIGKILLed after the sender got its
responses. PACS_B_PLAIN, the transparent route to the same Orthanc beside it, behaves as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from relay_common.audit import read_events
from relay_demo.datasets import fingerprints, generate_ct_series, generate_mr_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.support import dcmtk
from tests.support.orthanc import OrthancProcess

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
ACCEL = {"bucket_bytes": 256 * 1024, "retry_max_s": 2.0, "associations": 2}


@dataclass
class CtOnlyScp:
    """A pynetdicom SCP that accepts CT Image Storage in Explicit VR Little Endian and nothing else."""

    received: dict[str, pydicom.Dataset]
    port: int
    server: Any


def start_ct_only_scp() -> CtOnlyScp:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    received: dict[str, pydicom.Dataset] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        received[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    ae = AE(ae_title="CT_ONLY")
    ae.add_supported_context(CTImageStorage, "1.2.840.10008.1.2.1")
    server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return CtOnlyScp(received, server.server_address[1], server)


@dataclass
class Sites:
    net: LocalRelayNetwork
    orthanc: OrthancProcess
    work: Path
    ct_only: CtOnlyScp

    @property
    def port_a(self) -> int:
        port = self.net.sites["hospital-a"].port
        assert port
        return port

    def accel_status(self, site: str) -> dict[str, object]:
        status = self.net.status(site).get("accelerate")
        assert isinstance(status, dict), f"{site} shows no accelerate status: {self.net.status(site)}"
        return status

    def route(self, title: str = "PACS_B") -> dict[str, object]:
        routes = self.accel_status("hospital-a")["routes"]
        assert isinstance(routes, dict)
        return dict(routes[title])

    def series(self, name: str, make: Callable[[], list[pydicom.Dataset]]) -> list[Path]:
        return write_series(make(), self.work / name)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def sites(orthanc_module_factory: OrthancPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    require_dcmtk("storescu", "echoscu")
    work = tmp_path_factory.mktemp("accel")
    orthanc = orthanc_module_factory("ORTHANC_B")
    ct_only = start_ct_only_scp()
    net = LocalRelayNetwork(work / "relay").start()
    try:
        net.add_site(
            "hospital-b",
            shared=[
                Shared("ORTHANC_B", HOST, orthanc.dicom_port, ["hospital-a"], accelerate=True),
                Shared("CT_ONLY", HOST, ct_only.port, ["hospital-a"], accelerate=True),
            ],
            accelerate=ACCEL,
        )
        net.add_site(
            "hospital-a",
            remote=[
                Remote("PACS_B", "hospital-b", "ORTHANC_B", accelerate=True),
                Remote("PACS_B_PLAIN", "hospital-b", "ORTHANC_B"),
                Remote("CT_ONLY", "hospital-b", accelerate=True),
            ],
            accelerate=ACCEL,
        )
        net.wait_connected()
        sites = Sites(net, orthanc, work, ct_only)
        # Router A learns what each device accepts from router B (which negotiates with it) as soon as it is up.
        for title in ("PACS_B", "CT_ONLY"):
            wait_for(lambda t=title: bool(sites.route(t).get("capabilities_known")), f"{title}'s capabilities learned")
        yield sites
    finally:
        net.stop()
        ct_only.server.shutdown()


def arrived(orthanc: OrthancProcess, files: list[Path]) -> Callable[[], bool]:
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    return lambda: all(orthanc.find_sop(uid) for uid in uids)


def assert_identical(orthanc: OrthancProcess, files: list[Path]) -> None:
    """Every image at Orthanc bit for bit: the pixel fingerprint and every data element."""
    stored = {}
    for path in files:
        original = pydicom.dcmread(path)
        orthanc_id = orthanc.find_sop(str(original.SOPInstanceUID))
        assert orthanc_id, f"{original.SOPInstanceUID} did not arrive"
        stored[str(original.SOPInstanceUID)] = orthanc.instance_file(orthanc_id)
        from io import BytesIO

        assert pydicom.dcmread(BytesIO(stored[str(original.SOPInstanceUID)])) == original
    assert fingerprints(stored.values()) == fingerprints(files)


def spool_drained(sites: Sites) -> Callable[[], bool]:
    def check() -> bool:
        for site in ("hospital-a", "hospital-b"):
            status = sites.net.status(site).get("accelerate")
            if not isinstance(status, dict) or any(status["spool_entries"].values()):  # type: ignore[union-attr]
                return False
        return True

    return check


def store(sites: Sites, called: str, files: list[Path]) -> dcmtk.StoreResult:
    result = dcmtk.storescu(HOST, sites.port_a, called, "MODALITY_A", files, timeout=60)
    assert result.succeeded == len(files), result.log
    return result


def test_echo_and_store_are_answered_by_router_a_and_arrive_identical(sites: Sites) -> None:
    dcmtk.echoscu(HOST, sites.port_a, "PACS_B", "MODALITY_A").check()
    files = sites.series("ct", lambda: generate_ct_series(4, rows=256, cols=256, seed=13))
    files += sites.series("samples", lambda: generate_mr_series(6, rows=64, cols=64, seed=13))
    store(sites, "PACS_B", files)
    wait_for(arrived(sites.orthanc, files), "the images at Orthanc")
    assert_identical(sites.orthanc, files)
    wait_for(spool_drained(sites), "both spools empty (outcomes reported back)")
    # The audit trail at A: the association (with the studies the device sent), then what left for site B.
    audit = sites.net.workdir / "audit-hospital-a.jsonl"
    accepted = [e for e in read_events(audit) if e["event"] == "association" and e.get("called_ae") == "PACS_B"]
    assert sum(s["instances"] for e in accepted for s in e.get("studies", [])) >= len(files)
    wait_for(
        lambda: sum(e.get("delivered", 0) for e in read_events(audit) if e["event"] == "accel_transfer") >= len(files),
        "accel_transfer audit events counting the delivered images",
        timeout=45,
    )


def test_the_sender_finishes_while_router_b_is_down_and_router_a_survives_sigkill(sites: Sites) -> None:
    """Responses come from router A's spool: the sender finishes although router B is stopped, so before
    any image can arrive; then router A is SIGKILLed and restarted, and every acknowledged image arrives."""
    files = sites.series("mr-a-killed", lambda: generate_mr_series(12, rows=64, cols=64, seed=21))
    sites.net.stop_router("hospital-b")
    try:
        store(sites, "PACS_B", files)
        assert not any(arrived(sites.orthanc, files[:1])() for _ in range(1))
        sites.net.stop_router("hospital-a", kill=True)
        sites.net.start_router("hospital-a")
    finally:
        sites.net.start_router("hospital-b")
    sites.net.wait_connected()
    wait_for(arrived(sites.orthanc, files), "the acknowledged images after router A's SIGKILL", timeout=45)
    assert_identical(sites.orthanc, files)
    wait_for(spool_drained(sites), "both spools empty")


def test_router_b_killed_mid_transfer_loses_nothing(sites: Sites) -> None:
    files = sites.series("mr-b-killed", lambda: generate_mr_series(40, rows=128, cols=128, seed=34))
    before = len(sites.orthanc.instances())
    store(sites, "PACS_B", files)
    # SIGKILL as soon as the first image of this series reached Orthanc: router B is then mid-way.
    wait_for(lambda: len(sites.orthanc.instances()) > before, "the first image at Orthanc", timeout=20)
    sites.net.stop_router("hospital-b", kill=True)
    at_kill = len(sites.orthanc.instances()) - before
    sites.net.start_router("hospital-b")
    wait_for(arrived(sites.orthanc, files), f"every image after router B's SIGKILL ({at_kill} there)", timeout=45)
    assert_identical(sites.orthanc, files)
    wait_for(spool_drained(sites), "both spools empty")


def test_the_transparent_route_beside_it_is_unchanged(sites: Sites) -> None:
    files = sites.series("plain", lambda: generate_ct_series(2, rows=128, cols=128, seed=55))
    before = sites.accel_status("hospital-a")["spool_entries"]
    store(sites, "PACS_B_PLAIN", files)
    # Transparent: Orthanc answered each C-STORE itself, so the images are there when storescu returns.
    assert arrived(sites.orthanc, files)()
    assert_identical(sites.orthanc, files)
    assert sites.accel_status("hospital-a")["spool_entries"] == before


# -- the acceptor alone: a full spool ------------------------------------------------------------


async def test_a_full_spool_answers_a700_and_keeps_what_it_acknowledged(tmp_path: Path) -> None:
    """pynetdicom stores three 0.39 MB images into the acceptor with a 1 MiB spool: two are acknowledged
    and on disk, the third gets 0xA700 (out of resources) and leaves nothing behind; C-ECHO is answered."""
    import asyncio

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    from relay_router.accel.acceptor import MAX_PDU, StorageAcceptor
    from relay_router.accel.capabilities import DeviceCapabilities
    from relay_router.accel.negotiation import answer
    from relay_router.accel.spool import Spool
    from relay_router.outcome import Outcome
    from relay_router.ul import ControlPdu, PduFramer, parse_associate

    spool = Spool(tmp_path / "spool", max_bytes=1024 * 1024, fsync=False)
    images = generate_ct_series(3, rows=440, cols=440, seed=77)
    capabilities = DeviceCapabilities({CTImageStorage: ("1.2.840.10008.1.2.1",)}, time.time())
    commits: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = PduFramer()
        events: list[object] = []
        while not events:
            events = list(framer.feed(await reader.read(65536)))
        (request,) = events
        assert isinstance(request, ControlPdu)
        info = parse_associate(request.data)
        negotiated = answer(request.data, info, capabilities, granted=None, max_pdu_length=MAX_PDU)
        outcome = Outcome("0" * 32, "outbound", "hospital-b", calling_ae=info.calling_ae, called_ae=info.called_ae)
        acceptor = StorageAcceptor(
            reader,
            writer,
            outcome,
            info,
            negotiated,
            spool=spool,
            route="PACS_B",
            on_commit=lambda: commits.append(1),
            idle_timeout_s=30,
        )
        await acceptor.run()

    def scu(port: int) -> list[int]:
        ae = AE(ae_title="MODALITY_A")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate(HOST, port, ae_title="PACS_B")
        assert assoc.is_established
        statuses = [int(assoc.send_c_echo().Status)]
        statuses += [int(assoc.send_c_store(ds).Status) for ds in images]
        assoc.release()
        return statuses

    server = await asyncio.start_server(handle, HOST, 0)
    try:
        statuses = await asyncio.to_thread(scu, server.sockets[0].getsockname()[1])
    finally:
        server.close()
    assert statuses == [0x0000, 0x0000, 0x0000, 0xA700]  # echo, two stored, the third out of resources
    kept = spool.entries()
    assert len(kept) == 2 == len(commits)
    acknowledged = {str(ds.SOPInstanceUID): ds for ds, s in zip(images, statuses[1:], strict=True) if s == 0}
    assert {e.sop_instance_uid for e in kept} == set(acknowledged)
    for entry in kept:  # what was acknowledged is on disk, every element as sent
        assert pydicom.dcmread(spool.path(entry.id)) == acknowledged[entry.sop_instance_uid]
    assert not list((tmp_path / "spool" / "tmp").iterdir())  # the refused one left nothing behind
    spool.close()


def test_only_what_the_destination_accepts_is_offered(sites: Sites) -> None:
    """CT_ONLY takes CT in Explicit VR LE only: router A (which learned it from router B) accepts CT for it and
    rejects MR in its A-ASSOCIATE-AC, so nothing that could never be delivered is acknowledged."""
    ct = sites.series("ct-only", lambda: generate_ct_series(2, rows=64, cols=64, seed=91))
    mr = sites.series("mr-refused", lambda: generate_mr_series(1, rows=64, cols=64, seed=91))
    refused = dcmtk.storescu(HOST, sites.port_a, "CT_ONLY", "MODALITY_A", mr, timeout=30)
    assert refused.succeeded == 0 and not refused.ok, refused.log
    time.sleep(0.5)  # the status file is rewritten every 0.2 s: an MR spooled by mistake would show by now
    assert not any(sites.accel_status("hospital-a")["spool_entries"].values())  # type: ignore[union-attr]
    store(sites, "CT_ONLY", ct)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct}
    wait_for(lambda: uids <= set(sites.ct_only.received), "the CT images at CT_ONLY")
    for path in ct:
        original = pydicom.dcmread(path)
        assert sites.ct_only.received[str(original.SOPInstanceUID)] == original
    mr_uid = str(pydicom.dcmread(mr[0], stop_before_pixels=True).SOPInstanceUID)
    assert mr_uid not in sites.ct_only.received
