"""Big instances on accelerated routes, real parts: streamed blobs, SIGKILL mid-upload, a C-STORE aborted mid-way.

storescu (or a raw pynetdicom association) -> router A (accelerated) -> blob store / bridge -> router B ->
Orthanc. Router B is told of a blob once its first parts are stored (BLOB_OPEN / BLOB_PARTS) and fetches it
while router A still uploads; the bridge here holds every part upload after the first two until the test
lets them through, so the far router is certainly fetching a blob whose upload has not finished.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import grpc.aio
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.server import RelayServicer
from relay_demo.datasets import generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork
from relay_router.accel.transfer import STREAM_PARALLEL
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.integration.test_accel_route import arrived, assert_identical, wait_for
from tests.integration.test_accel_spill import start_sites, store, stored_blob_parts
from tests.support.inprocess_bridge import InProcessBridge
from tests.support.orthanc import OrthancProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
HOST = "127.0.0.1"
FREE_PUTS = 2  # part uploads let through before the bridge holds the rest


class HoldingPuts(RelayServicer):
    """The real bridge, but after FREE_PUTS part uploads every further one waits until `released` is set."""

    released = threading.Event()  # set by the test's thread; the bridge runs on a thread of its own
    puts = 0
    gets = 0

    async def PutBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:
        HoldingPuts.puts += 1
        if HoldingPuts.puts > FREE_PUTS:
            await asyncio.to_thread(HoldingPuts.released.wait, 120)
        return await super().PutBlobPart(request, context)

    async def GetBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPart:
        HoldingPuts.gets += 1
        return await super().GetBlobPart(request, context)


@pytest.fixture
def holding(tmp_path: Path) -> Iterator[LocalRelayNetwork]:
    HoldingPuts.released, HoldingPuts.puts, HoldingPuts.gets = threading.Event(), 0, 0
    net = LocalRelayNetwork(tmp_path / "relay").start(bridge=False)
    bridge = InProcessBridge(net, HoldingPuts)
    try:
        yield net
    finally:
        HoldingPuts.released.set()
        for name in list(net.sites):
            net.stop_router(name)
        bridge.stop()


def big_slices(tmp_path: Path, count: int) -> list[Path]:
    """CT slices of 2 MiB (1024 x 1024 x 16 bit): 16 parts of 128 KiB each, above the 256 KiB threshold."""
    series = generate_ct_series(count, rows=1024, cols=1024, seed=41, study_uid=generate_uid())
    return write_series(series, tmp_path / "big")


def test_a_big_instance_is_fetched_while_it_uploads_and_arrives_identical(
    holding: LocalRelayNetwork, orthanc_factory: OrthancPool, tmp_path: Path
) -> None:
    require_dcmtk("storescu")
    net = holding
    files = big_slices(tmp_path, 2)
    orthanc = orthanc_factory("ORTHANC_B")
    port = start_sites(net, orthanc)
    store(port, files)  # answered from router A's spool: nothing waits for the upload
    # Router B asks for a part while every upload after the second is held: it is fetching a blob whose
    # manifest cannot exist yet (the BLOB record follows the last stored part).
    wait_for(lambda: HoldingPuts.gets > 0, "router B fetching the first parts of a blob still uploading", timeout=60)
    # Each slice is 17 parts of 128 KiB: with the held ones in flight, far from all are stored.
    assert HoldingPuts.puts <= FREE_PUTS + STREAM_PARALLEL, "the upload is held: its manifest cannot have been sent"
    assert not arrived(orthanc, files)(), "nothing is delivered before the whole blob is verified"
    HoldingPuts.released.set()
    wait_for(arrived(orthanc, files), "the big slices at Orthanc", timeout=120)
    assert_identical(orthanc, files)
    wait_for(lambda: not stored_blob_parts(net), "the blobs deleted after router B took them", timeout=30)


def test_router_a_killed_in_the_middle_of_a_streamed_upload_loses_nothing(
    holding: LocalRelayNetwork, orthanc_factory: OrthancPool, tmp_path: Path
) -> None:
    """SIGKILL of router A after its C-STORE-RSPs, while router B fetches a blob router A is still uploading:
    after the restart every acknowledged image arrives bit for bit (uploaded again on a new stream)."""
    require_dcmtk("storescu")
    net = holding
    files = big_slices(tmp_path, 2)
    orthanc = orthanc_factory("ORTHANC_B")
    port = start_sites(net, orthanc)
    store(port, files)
    wait_for(lambda: HoldingPuts.gets > 0, "router B fetching a blob still uploading", timeout=60)
    net.stop_router("hospital-a", kill=True)
    HoldingPuts.released.set()
    net.start_router("hospital-a")
    net.wait_connected()
    wait_for(arrived(orthanc, files), "every acknowledged image after router A's SIGKILL", timeout=120)
    assert_identical(orthanc, files)
    wait_for(lambda: not stored_blob_parts(net), "no blob left in the store", timeout=60)


def spools_empty(net: LocalRelayNetwork) -> bool:
    """No entry in either router's spool (held in memory or on disk), as their status files count them."""
    for site in ("hospital-a", "hospital-b"):
        status = net.status(site).get("accelerate")
        if not isinstance(status, dict) or any(dict(status.get("spool_entries", {"?": 1})).values()):
            return False
    return True


def send_part_then_abort(port: int, path: Path, pdus: int) -> None:
    """A C-STORE of `path` whose first `pdus` P-DATA PDUs are sent, then the sender aborts the association."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="MODALITY_A")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, port, ae_title="PACS_B")
    assert assoc.is_established, "router A accepted the association"
    try:
        context = assoc.accepted_contexts[0]
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = ds.SOPClassUID
        request.AffectedSOPInstanceUID = ds.SOPInstanceUID
        request.Priority = 2
        request.DataSet = BytesIO(encode(ds, ds.file_meta.TransferSyntaxUID.is_implicit_VR, True))
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        for number, primitive in enumerate(
            message.encode_msg(context.context_id, assoc.acceptor.maximum_length or 16384)
        ):
            if number >= pdus:
                break
            assoc.dul.send_pdu(primitive)
        time.sleep(0.5)  # the PDUs reach router A before the abort
    finally:
        assoc.abort()


def test_a_big_c_store_aborted_mid_way_leaves_no_blob_and_nothing_delivered(
    holding: LocalRelayNetwork, orthanc_factory: OrthancPool, tmp_path: Path
) -> None:
    require_dcmtk("storescu")
    net = holding
    HoldingPuts.released.set()  # nothing held: whatever router A would upload, it could
    aborted, *rest = big_slices(tmp_path, 2)
    orthanc: OrthancProcess = orthanc_factory("ORTHANC_B")
    port = start_sites(net, orthanc)
    send_part_then_abort(port, aborted, pdus=4)  # the command and about 1 MiB of the 2 MiB data set
    store(port, rest)  # router A keeps serving
    wait_for(arrived(orthanc, rest), "the next instance at Orthanc", timeout=60)
    time.sleep(1.0)  # anything of the aborted instance would be on its way by now
    assert not arrived(orthanc, [aborted])(), "the aborted instance was never acknowledged, so never delivered"
    wait_for(lambda: spools_empty(net), "both spools empty", timeout=30)
    wait_for(lambda: not stored_blob_parts(net), "no blob left in the store", timeout=30)
    assert HoldingPuts.puts <= 17, "only the delivered instance was uploaded (17 parts)"
