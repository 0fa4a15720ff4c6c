"""Accelerated routes with cloud spill, real parts: storescu -> router A -> blob store / bridge -> router B -> Orthanc.

Router A accepts the study itself (accelerated route), then ships its spool to router B: instances above
`[dicom] spill_threshold_bytes` through the bridge's blob store by reference (a BLOB record), the rest
inline in the record stream. Every image must reach Orthanc bit for bit, and the bridge's splice must
carry only the small ones. A blob altered in the store never reaches the archive: router B refuses it,
router A retries and then parks it in its dead-letter state with the reason, and `relay-router spool
retry` delivers it once the store behaves. The same with S3 (moto) is in
tests/integration/cloudstore/test_accel_spill_s3.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc.aio
import pydicom
import pytest
from pydicom.uid import generate_uid

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.server import RelayServicer
from relay_common.audit import read_events
from relay_demo.datasets import generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.accel.spool import EntryState, read_entries
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.integration.test_accel_route import arrived, assert_identical, wait_for
from tests.integration.test_security_spill_urls import ENDPOINT, LanService, SpillUrlAttack
from tests.support import dcmtk
from tests.support.inprocess_bridge import InProcessBridge
from tests.support.orthanc import OrthancProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
HOST = "127.0.0.1"
# Small numbers so a test study needs little memory and time; the defaults are 8 MiB / 4 MiB.
DICOM = {
    "spill_threshold_bytes": 256 << 10,
    "spill_part_bytes": 128 << 10,
    "frame_bytes": 64 << 10,
    "compression": False,  # so that the bridge's byte counts compare with the images' sizes directly
}
ACCEL = {"bucket_bytes": 256 << 10, "retry_max_s": 2.0, "associations": 2, "max_attempts": 2}


def study(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """(big, small): one study of 512 KiB slices (by reference) and 32 KiB slices (inline)."""
    uid = generate_uid()
    big = write_series(generate_ct_series(3, rows=512, cols=512, seed=31, study_uid=uid), tmp_path / "big")
    small = write_series(generate_ct_series(4, rows=128, cols=128, seed=32, study_uid=uid), tmp_path / "small")
    return big, small


def file_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def start_sites(net: LocalRelayNetwork, orthanc: OrthancProcess, **options: object) -> int:
    """hospital-b shares ORTHANC_B (accelerated); hospital-a reaches it as PACS_B. Router A's DICOM port."""
    net.add_site(
        "hospital-b",
        shared=[Shared("ORTHANC_B", HOST, orthanc.dicom_port, ["hospital-a"], accelerate=True)],
        accelerate=ACCEL,
        **DICOM,
        **options,
    )
    a = net.add_site(
        "hospital-a",
        remote=[Remote("PACS_B", "hospital-b", "ORTHANC_B", accelerate=True)],
        accelerate=ACCEL,
        **DICOM,
        **options,
    )
    net.wait_connected()

    def learned() -> bool:
        status = net.status("hospital-a").get("accelerate")
        return isinstance(status, dict) and bool(status["routes"]["PACS_B"].get("capabilities_known"))

    # Until router A has reached router B once, the route stays transparent: wait for the capabilities.
    wait_for(learned, "PACS_B's capabilities learned by router A")
    assert a.port
    return a.port


def store(port: int, files: list[Path]) -> None:
    result = dcmtk.storescu(HOST, port, "PACS_B", "MODALITY_A", files, timeout=120)
    assert result.succeeded == len(files), result.log


def transfer_count(net: LocalRelayNetwork, name: str) -> int:
    """A count (`sent`, `by_reference`, `delivered`...) summed over router A's `accel_transfer` audit events."""
    audit = net.workdir / "audit-hospital-a.jsonl"
    return sum(int(e.get(name, 0)) for e in read_events(audit) if e["event"] == "accel_transfer")


def by_reference(net: LocalRelayNetwork) -> int:
    """Instances router A sent through the blob store."""
    return transfer_count(net, "by_reference")


def stored_blob_parts(net: LocalRelayNetwork) -> list[Path]:
    """Blob parts left in the bridge's file:// store (the directory `blobs` next to its database)."""
    return [p for blobs in net.workdir.rglob("blobs") if blobs.is_dir() for p in blobs.rglob("*") if p.is_file()]


def test_large_instances_travel_by_reference_and_arrive_identical(orthanc_factory: OrthancPool, tmp_path: Path) -> None:
    require_dcmtk("storescu")
    big, small = study(tmp_path)
    assert all(p.stat().st_size > DICOM["spill_threshold_bytes"] for p in big)
    assert all(p.stat().st_size < DICOM["spill_threshold_bytes"] for p in small)
    files = small[:2] + big + small[2:]
    orthanc = orthanc_factory("ORTHANC_B")
    net = LocalRelayNetwork(tmp_path / "relay").start()
    try:
        port = start_sites(net, orthanc)
        store(port, files)
        wait_for(arrived(orthanc, files), "the study at Orthanc", timeout=60)
        assert_identical(orthanc, files)
        wait_for(lambda: by_reference(net) >= len(big), "accel_transfer events counting the blobs", timeout=60)
        assert by_reference(net) == len(big), "each big slice went by reference once, the small ones inline"
        assert net.log("hospital-b").count("received ") >= len(big)
        wait_for(lambda: not stored_blob_parts(net), "the blobs deleted after router B took them", timeout=30)

        net.stop_router("hospital-a")  # the bridge audits an association once it ended
        net.stop_router("hospital-b")
        events = [e for e in read_events(net.workdir / "audit.jsonl") if e["event"] == "association"]
        assert events, "the bridge audited no accelerated transfer"
        carried = sum(int(e["bytes_from_initiator"]) for e in events)
        inline, spilled = file_bytes(small), file_bytes(big)
        # The small slices cross the splice (plus records and seals); of the big ones only their references.
        assert carried < 1.2 * inline + 0.03 * spilled, f"the bridge's splice carried {carried} bytes"
    finally:
        net.stop()


class SlowStore(RelayServicer):
    """The real bridge, but its file:// store takes no blob part until `release` is set (at most 60 s): a
    slow uplink or store, as a 20 MB radiograph on a hospital's line."""

    release = threading.Event()
    held = 0

    async def PutBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:
        SlowStore.held += 1
        for _ in range(1200):
            if SlowStore.release.is_set():
                break
            await asyncio.sleep(0.05)
        return await super().PutBlobPart(request, context)


def test_small_instances_are_not_held_behind_a_slow_upload(orthanc_factory: OrthancPool, tmp_path: Path) -> None:
    """A big slice first, then small ones: while the store holds the big slice's parts, the small ones
    reach Orthanc (router A uploads beside its send loop); once the store answers, the big one follows.
    Every image byte-identical."""
    require_dcmtk("storescu")
    big, small = study(tmp_path)
    files = big[:1] + small
    SlowStore.release.clear()
    SlowStore.held = 0
    net = LocalRelayNetwork(tmp_path / "relay").start(bridge=False)
    bridge = InProcessBridge(net, SlowStore)
    try:
        orthanc = orthanc_factory("ORTHANC_B")
        port = start_sites(net, orthanc)
        store(port, files)
        wait_for(arrived(orthanc, small), "the small slices at Orthanc while the big upload is held", timeout=45)
        assert SlowStore.held, "the big slice's upload never reached the store"
        assert not arrived(orthanc, big[:1])(), "the big slice arrived although its upload was held"
        SlowStore.release.set()
        wait_for(arrived(orthanc, files), "the big slice at Orthanc once the store answers", timeout=60)
        assert_identical(orthanc, files)
        wait_for(lambda: by_reference(net) == 1, "router A's audit counting the big slice by reference", timeout=60)
    finally:
        SlowStore.release.set()
        for name in list(net.sites):
            net.stop_router(name)
        bridge.stop()


class TamperingStore(RelayServicer):
    """The real bridge, but every blob part it hands out (its file:// store's GetBlobPart) has a byte flipped
    while `tamper` is set: a hostile store or bridge operator."""

    tamper = True
    altered = 0

    async def GetBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPart:
        answer = await super().GetBlobPart(request, context)
        if TamperingStore.tamper and answer.data:
            data = bytearray(answer.data)
            data[len(data) // 2] ^= 0x01
            answer.data = bytes(data)
            TamperingStore.altered += 1
        return answer


@pytest.fixture
def tampering(tmp_path: Path) -> Iterator[LocalRelayNetwork]:
    TamperingStore.tamper, TamperingStore.altered = True, 0
    net = LocalRelayNetwork(tmp_path / "relay").start(bridge=False)
    bridge = InProcessBridge(net, TamperingStore)
    try:
        yield net
    finally:
        for name in list(net.sites):
            net.stop_router(name)
        bridge.stop()


def test_a_blob_altered_in_the_store_is_dead_lettered_with_its_reason_and_never_delivered(
    tampering: LocalRelayNetwork, orthanc_factory: OrthancPool, tmp_path: Path
) -> None:
    require_dcmtk("storescu")
    net = tampering
    big, small = study(tmp_path)
    big = big[:1]
    orthanc = orthanc_factory("ORTHANC_B")
    port = start_sites(net, orthanc)
    store(port, small + big)  # router A answered every C-STORE from its spool

    wait_for(arrived(orthanc, small), "the small (inline) slices at Orthanc", timeout=60)
    spool_a = net.state_dir("hospital-a") / "spool"

    def dead() -> list[str]:
        return [e.last_error for e in read_entries(spool_a) if e.state is EntryState.DEAD]

    wait_for(lambda: bool(dead()), "the altered blob's instance dead-lettered at router A", timeout=90)
    (reason,) = dead()
    assert "refused by hospital-b with 0x0110" in reason and "failed authentication" in reason, reason
    assert TamperingStore.altered >= ACCEL["max_attempts"], "each attempt fetched an altered part"
    big_uid = str(pydicom.dcmread(big[0], stop_before_pixels=True).SOPInstanceUID)
    assert orthanc.find_sop(big_uid) is None, "an instance whose blob failed verification reached the archive"
    assert "SECURITY: blob" in net.log("hospital-b")
    assert_identical(orthanc, small)

    # The store behaves again: the operator replays the dead letter and it arrives bit for bit.
    TamperingStore.tamper = False
    config = net.router_config_path("hospital-a")
    replay = subprocess.run(
        [sys.executable, "-m", "relay_router.cli", "--config", str(config), "spool", "retry", "--all"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 0, replay.stderr
    wait_for(arrived(orthanc, big), "the replayed instance at Orthanc", timeout=60)
    assert_identical(orthanc, small + big)


class HoldingStore(RelayServicer):
    """The real bridge, but its file:// store's GetBlobPart answers wait until `released` is set: router B is
    then certainly in the middle of fetching a blob when a router is killed."""

    released = threading.Event()  # set by the test's thread; the bridge runs on a thread of its own
    waiting = 0

    async def GetBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPart:
        HoldingStore.waiting += 1
        await asyncio.to_thread(HoldingStore.released.wait, 120)
        return await super().GetBlobPart(request, context)


@pytest.fixture
def holding(tmp_path: Path) -> Iterator[LocalRelayNetwork]:
    HoldingStore.released, HoldingStore.waiting = threading.Event(), 0
    net = LocalRelayNetwork(tmp_path / "relay").start(bridge=False)
    bridge = InProcessBridge(net, HoldingStore)
    try:
        yield net
    finally:
        HoldingStore.released.set()
        for name in list(net.sites):
            net.stop_router(name)
        bridge.stop()


@pytest.mark.parametrize("killed", ["hospital-a", "hospital-b"])
def test_a_router_killed_while_a_blob_is_being_fetched_loses_nothing(
    holding: LocalRelayNetwork, orthanc_factory: OrthancPool, tmp_path: Path, killed: str
) -> None:
    """SIGKILL of router A after it uploaded (no STORED yet), or of router B in the middle of the download:
    after the restart router A sends the instance again (a new upload: the bridge deleted the blobs of the
    broken stream) and every acknowledged image arrives bit for bit."""
    require_dcmtk("storescu")
    net = holding
    big, small = study(tmp_path)
    files = big[:2] + small[:2]
    orthanc = orthanc_factory("ORTHANC_B")
    port = start_sites(net, orthanc)
    store(port, files)
    wait_for(lambda: HoldingStore.waiting > 0, "router B fetching a blob", timeout=60)
    net.stop_router(killed, kill=True)
    HoldingStore.released.set()
    net.start_router(killed)
    net.wait_connected()
    wait_for(arrived(orthanc, files), f"every acknowledged image after {killed}'s SIGKILL", timeout=120)
    assert_identical(orthanc, files)
    log_a = net.log("hospital-a")
    assert log_a.count(" parts to blob ") >= 1, "router A sent the big slices by reference after its restart"


@pytest.mark.parametrize("downloads", [False, True], ids=["upload-url", "download-url"])
def test_a_bridge_handing_out_lan_urls_gets_no_request_and_no_image_is_lost_or_altered(
    orthanc_factory: OrthancPool, tmp_path: Path, downloads: bool
) -> None:
    """Issue 17's protection on accelerated routes: the bridge swaps the upload (router A) or download
    (router B) URL for one into the hospital's LAN. No router sends it a byte. Upload: router A sends the
    instance inline and audits an alert; download: router B refuses the instance and audits an alert, and
    router A, after its retries, dead-letters it with the reason."""
    require_dcmtk("storescu")
    lan = LanService()
    net = LocalRelayNetwork(tmp_path / "relay").start(bridge=False)
    bridge = InProcessBridge(net, SpillUrlAttack)
    bridge.servicer.target, bridge.servicer.downloads = lan.url, downloads
    try:
        big, small = study(tmp_path)
        files = big[:1] + small[:1]
        orthanc = orthanc_factory("ORTHANC_B")
        port = start_sites(net, orthanc, **ENDPOINT)
        store(port, files)
        refused = "SECURITY: refused a spill URL at http://127.0.0.1"
        if downloads:
            wait_for(arrived(orthanc, small[:1]), "the small slice at Orthanc", timeout=60)
            spool_a = net.state_dir("hospital-a") / "spool"
            wait_for(
                lambda: any(e.state is EntryState.DEAD for e in read_entries(spool_a)),
                "the instance dead-lettered at router A",
                timeout=90,
            )
            (entry,) = read_entries(spool_a)
            assert "0x0110" in entry.last_error and refused in entry.last_error, entry.last_error
            assert refused in net.log("hospital-b")
            assert orthanc.find_sop(entry.sop_instance_uid) is None
            # Router B audits the refused URL as router A does its own (one alert per attempt).
            audit_b = net.workdir / "audit-hospital-b.jsonl"
            alerts_b = [e for e in read_events(audit_b) if e["event"] == "accel_transfer" and e["outcome"] == "alert"]
            assert alerts_b, "router B wrote no audit alert for the refused download URL"
            assert all(refused in str(e["detail"]) for e in alerts_b), alerts_b
            assert {(e["site"], e["called_ae"]) for e in alerts_b} == {("hospital-a", "ORTHANC_B")}, alerts_b
        else:
            wait_for(arrived(orthanc, files), "the study at Orthanc (the big slice inline)", timeout=60)
            assert_identical(orthanc, files)
            audit = net.workdir / "audit-hospital-a.jsonl"
            alerts = [e for e in read_events(audit) if e["event"] == "accel_transfer" and e["outcome"] == "alert"]
            assert alerts and refused in str(alerts[0]["detail"]), alerts
        assert lan.requests == [], "a router sent a request into its LAN"
    finally:
        for name in list(net.sites):
            net.stop_router(name)
        bridge.stop()
        lan.shutdown()
        lan.server_close()
