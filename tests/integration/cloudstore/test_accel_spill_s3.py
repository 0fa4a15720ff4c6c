"""Accelerated route with the bridge's blob store on S3 (moto): the big slices bypass the bridge entirely.

storescu -> router A (accelerated route, spool) -> presigned S3 URLs -> router B -> Orthanc. The routers
reach moto directly (presigned URLs the bridge signs, checked against `[dicom] spill_endpoints`), so the
bridge neither splices nor serves the big slices' bytes; the bucket is empty once router B has them.
The file:// store, tampering and crash cases are in tests/integration/test_accel_spill.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from relay_common.audit import read_events
from relay_demo.network import LocalRelayNetwork
from tests.integration.cloudstore.conftest import S3_BUCKET, ServerProcess
from tests.integration.cloudstore.spill_support import bucket_keys, endpoint
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.integration.test_accel_route import arrived, assert_identical, wait_for
from tests.integration.test_accel_spill import by_reference, file_bytes, start_sites, store, study, transfer_count
from tests.support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_accelerated_route_spills_to_s3_and_the_bridge_carries_only_the_small_slices(
    network_factory: Callable[..., LocalRelayNetwork],
    orthanc_factory: OrthancPool,
    moto_server: ServerProcess,
    moto_env: dict[str, str],
    tmp_path: Path,
) -> None:
    require_dcmtk("storescu")
    big, small = study(tmp_path)
    files = big + small
    prefix = f"accel-{os.getpid()}-{free_port()}/"
    net = network_factory(
        {"store": f"s3://{S3_BUCKET}/{prefix}", "endpoint_url": moto_server.url, "region": "us-east-1"}, moto_env
    )
    orthanc = orthanc_factory("ORTHANC_B")
    port = start_sites(net, orthanc, **endpoint(moto_server.url))
    store(port, files)
    wait_for(arrived(orthanc, files), "the study at Orthanc", timeout=90)
    assert_identical(orthanc, files)
    wait_for(lambda: by_reference(net) >= len(big), "accel_transfer events counting the blobs", timeout=60)
    assert by_reference(net) == len(big)
    wait_for(lambda: bucket_keys(moto_server, prefix) == [], "the bucket emptied after router B took the blobs")

    net.stop_router("hospital-a")
    net.stop_router("hospital-b")
    events = [e for e in read_events(net.workdir / "audit.jsonl") if e["event"] == "association"]
    carried = sum(int(e["bytes_from_initiator"]) for e in events)
    assert events and carried < 1.2 * file_bytes(small) + 0.03 * file_bytes(big), f"the splice carried {carried}"


def test_store_down_sends_the_big_slices_inline_and_every_image_arrives(
    network_factory: Callable[..., LocalRelayNetwork],
    orthanc_factory: OrthancPool,
    moto_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """An S3 endpoint nobody listens on: presigning works, every PUT fails; router A sends the instance
    inline (and pauses spill for a minute, so the next big slices go inline without trying)."""
    require_dcmtk("storescu")
    big, small = study(tmp_path)
    files = big + small
    dead = f"http://127.0.0.1:{free_port()}"
    net = network_factory({"store": f"s3://{S3_BUCKET}/down/", "endpoint_url": dead, "region": "us-east-1"}, moto_env)
    orthanc = orthanc_factory("ORTHANC_B")
    port = start_sites(net, orthanc, **endpoint(dead))
    store(port, files)
    wait_for(arrived(orthanc, files), "the study at Orthanc, inline", timeout=90)
    assert_identical(orthanc, files)
    log_a = net.log("hospital-a")
    assert log_a.count("blob store unavailable, sending ") == 1, "one failure, then spill paused"
    wait_for(lambda: transfer_count(net, "delivered") >= len(files), "the audit counting the deliveries", timeout=60)
    assert by_reference(net) == 0
