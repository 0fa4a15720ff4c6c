"""Cloud spill end to end with a real Orthanc as the archive at both sites, S3 (moto) as the store.

Hospital A: DCMTK storescu/movescu (WS_A) and ORTHANC_A. Hospital B: ORTHANC_B.
1. storescu at A stores a study into ORTHANC_B through the relay: the big slices spill A -> B.
2. movescu at A asks ORTHANC_B to C-MOVE the study to ORTHANC_A: Orthanc's own C-STORE
   sub-association goes B -> A, and its big slices spill B -> A.
Every image is compared with the original (SOP Instance UID + SHA-256 of Pixel Data); the
bridge's audit byte counts show the spilled bytes bypassed it; the bucket is empty afterwards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from relay_common.audit import read_events
from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.cloudstore.conftest import S3_BUCKET, ServerProcess
from tests.integration.cloudstore.spill_support import HOST, ROUTER, bucket_keys, endpoint
from tests.integration.conftest import OrthancPool
from tests.support import dcmtk
from tests.support.orthanc import orthanc_binary
from tests.support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def require_peers() -> None:
    """Orthanc and DCMTK are part of what this test proves: missing, it fails (never skips)."""
    missing = [] if orthanc_binary() else ["Orthanc"]
    missing += dcmtk.missing_tools(("storescu", "movescu"))
    if missing:
        pytest.fail(f"the spill-with-Orthanc test needs {', '.join(missing)}", pytrace=False)


def test_study_above_and_below_the_threshold_moves_between_orthancs_by_reference(
    network_factory: Callable[..., LocalRelayNetwork],
    orthanc_factory: OrthancPool,
    moto_server: ServerProcess,
    moto_env: dict[str, str],
    tmp_path: Path,
) -> None:
    require_peers()
    study_uid = generate_uid()
    # One study, two series: 8 MiB slices (spilled) and 128 KiB slices (inline).
    big = write_series(generate_ct_series(2, rows=2048, cols=2048, seed=21, study_uid=study_uid), tmp_path / "big")
    small = write_series(generate_ct_series(3, rows=256, cols=256, seed=22, study_uid=study_uid), tmp_path / "small")
    study = small[:1] + big + small[1:]
    originals = fingerprints(study)
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in study} == {study_uid}
    prefix = f"orthanc-{os.getpid()}-{free_port()}/"
    net = network_factory(
        {"store": f"s3://{S3_BUCKET}/{prefix}", "endpoint_url": moto_server.url, "region": "us-east-1"}, moto_env
    )
    orthanc_a = orthanc_factory("ORTHANC_A")
    orthanc_b = orthanc_factory("ORTHANC_B", always_allow=True)
    site_b = net.add_site(
        "site-b",
        shared=[Shared("ORTHANC_B", HOST, orthanc_b.dicom_port, ["site-a"])],
        remote=[Remote("ORTHANC_A", "site-a")],
        **ROUTER,
        **endpoint(moto_server.url),
    )
    site_a = net.add_site(
        "site-a",
        shared=[Shared("ORTHANC_A", HOST, orthanc_a.dicom_port, ["site-b"])],
        remote=[Remote("ORTHANC_B", "site-b")],
        **ROUTER,
        **endpoint(moto_server.url),
    )
    assert site_a.port and site_b.port
    orthanc_b.set_modalities({"ORTHANC_A": ("ORTHANC_A", HOST, site_b.port)})
    net.wait_connected()

    # 1. C-STORE into ORTHANC_B across the relay.
    stored = dcmtk.storescu(HOST, site_a.port, "ORTHANC_B", "WS_A", study).check()
    assert stored.succeeded == len(study)
    assert orthanc_b.fingerprints() == originals
    for path in study:
        uid, digest = fingerprint(path)
        orthanc_id = orthanc_b.find_sop(uid)
        assert orthanc_id is not None and fingerprint(orthanc_b.instance_file(orthanc_id)) == (uid, digest)

    # 2. C-MOVE from ORTHANC_B to ORTHANC_A: Orthanc's sub-association is relayed (and spills) B -> A.
    moved = dcmtk.movescu(HOST, site_a.port, "ORTHANC_B", "WS_A", "ORTHANC_A", {"StudyInstanceUID": study_uid})
    moved.check()
    assert moved.completed == len(study) and not moved.failed
    deadline = time.monotonic() + 30
    while len(orthanc_a.instances()) < len(study):
        assert time.monotonic() < deadline, "ORTHANC_A did not receive the study"
        time.sleep(0.2)
    assert orthanc_a.fingerprints() == originals

    log_a, log_b = net.log("site-a"), net.log("site-b")
    assert log_a.count("spilled ") == len(big), "site-a must spill each big slice once (the C-STORE)"
    assert log_b.count("spilled ") == len(big), "site-b must spill each big slice once (the C-MOVE's C-STORE)"

    net.stop_router("site-a")
    net.stop_router("site-b")
    events = [e for e in read_events(net.workdir / "audit.jsonl") if e["event"] == "association"]
    carried = sum(int(e["bytes_from_initiator"]) + int(e["bytes_from_destination"]) for e in events)
    spilled = 2 * sum(len(pydicom.dcmread(p).PixelData) for p in big)  # each big slice crossed twice
    inline = 2 * sum(len(pydicom.dcmread(p).PixelData) for p in small)
    assert len(events) >= 2, events
    assert carried < 1.2 * inline + 0.02 * spilled, f"the bridge carried {carried} bytes; {spilled} were to spill"
    assert bucket_keys(moto_server, prefix) == [], "blobs remain in the bucket after delivery"
