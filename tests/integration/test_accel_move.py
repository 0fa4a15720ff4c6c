"""Accelerated retrieval with real parts: DCMTK movescu at site A, Orthanc as the archive at site B.

movescu (calling MOVER_A) asks router A for PACS_B (a transparent route to Orthanc B) to move a study
to WS_A, a DCMTK storescp at site A whose `[[shared]]` entry has `accelerate = true`. Orthanc B sends
the sub-operations to router B, which answers them from its spool (router B's `[[remote]] WS_A` is
accelerated) and ships them to router A; router A stores them into storescp over its delivery pool
and holds the final C-MOVE-RSP until every image of the move has its outcome there. storescp sleeps
a second after each image (`--sleep-after`), so without the hold movescu would finish long before the
images arrive: the assertion "every image is in storescp's directory when movescu exits" fails.

Router B exposes MOVER_A under another title (A_MOVER): Orthanc names A_MOVER as the Move Originator,
router B translates it back, and router A matches the sub-operations by (MOVER_A, Message ID).

PICKY_A, a pynetdicom SCP at site A that router B exposes as PICKY_X (the archive's Move Destination),
accepts every storage SOP class in negotiation but answers MR Image Storage with 0x0122 (SOP class not
supported): the final response counts those failed, names them in the Failed SOP Instance UID List,
and says B000 (some failed) or A702 (all failed). It holds the C-STOREs of patient SLOW-1 until the test
releases them: a hold that ends at `move_hold_max_s` with its sub-operations unconfirmed.

Router A's /metrics count the holds by how they ended (relay_router_accel_move_holds_total) and the
sub-operations reported failed because unconfirmed (relay_router_accel_move_subops_unconfirmed_total).
"""

from __future__ import annotations

import re
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay_common.audit import read_events
from relay_demo.datasets import fingerprints, generate_ct_series, generate_mr_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.integration.test_accel_route import wait_for
from tests.support import dcmtk
from tests.support.dcmtk import StorescpProcess
from tests.support.orthanc import OrthancProcess

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
ACCEL = {"bucket_bytes": 256 * 1024, "retry_max_s": 2.0, "associations": 2}
# The 128x128 CT images (~33 KB) of the first move go through the blob store by reference (BLOB
# records), the 64x64 ones of the other moves inline: a held move counts both kinds.
DICOM = {"spill_threshold_bytes": 20 << 10, "spill_part_bytes": 64 << 10}
CT_STUDY = "1.2.826.0.1.3680043.8.498.71001"
MIXED_STUDY = "1.2.826.0.1.3680043.8.498.71002"
MR_STUDY = "1.2.826.0.1.3680043.8.498.71003"
PLAIN_STUDY = "1.2.826.0.1.3680043.8.498.71004"
SLOW_STUDY = "1.2.826.0.1.3680043.8.498.71005"
HOLD_MAX_S = 25  # router A's move_hold_max_s: the stalled move's final response comes after this
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass
class PickyScp:
    """A pynetdicom SCP that accepts every storage SOP class but refuses MR images with 0x0122."""

    received: dict[str, bytes]
    port: int
    server: Any
    release: threading.Event  # patient SLOW-1's C-STOREs wait for it (at most two minutes)


def start_picky_scp() -> PickyScp:
    from pynetdicom import AE, StoragePresentationContexts, evt

    received: dict[str, bytes] = {}
    release = threading.Event()

    def on_store(event: Any) -> int:
        if str(event.request.AffectedSOPClassUID) == MR_STORAGE:
            return 0x0122  # PS3.4 B.2.3: Refused, SOP Class not supported
        ds = event.dataset
        if ds.get("PatientID") == "SLOW-1":
            release.wait(120)
        ds.file_meta = event.file_meta
        from io import BytesIO

        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        received[str(ds.SOPInstanceUID)] = buffer.getvalue()
        return 0x0000

    ae = AE(ae_title="PICKY_A")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return PickyScp(received, server.server_address[1], server, release)


@dataclass
class Sites:
    net: LocalRelayNetwork
    orthanc: OrthancProcess
    ws: StorescpProcess
    plain: StorescpProcess
    picky: PickyScp
    work: Path
    series: dict[str, list[Path]]

    @property
    def port_a(self) -> int:
        port = self.net.sites["hospital-a"].port
        assert port
        return port


def near_route(sites_net: LocalRelayNetwork, title: str) -> dict[str, Any]:
    status = sites_net.status("hospital-b").get("accelerate")
    routes = status.get("routes", {}) if isinstance(status, dict) else {}
    return dict(routes.get(title, {}))


@pytest.fixture(scope="module")
def sites(orthanc_module_factory: OrthancPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    require_dcmtk("movescu", "storescp")
    work = tmp_path_factory.mktemp("accel-move")
    series = {
        "ct": write_series(generate_ct_series(5, rows=128, cols=128, seed=71, study_uid=CT_STUDY), work / "ct"),
        "mixed_ct": write_series(
            generate_ct_series(3, rows=64, cols=64, seed=72, patient_id="MIX-1", study_uid=MIXED_STUDY),
            work / "mixed-ct",
        ),
        "mixed_mr": write_series(
            generate_mr_series(2, rows=64, cols=64, seed=72, patient_id="MIX-1", study_uid=MIXED_STUDY),
            work / "mixed-mr",
        ),
        "mr": write_series(generate_mr_series(2, rows=64, cols=64, seed=73, study_uid=MR_STUDY), work / "mr"),
        "plain": write_series(
            generate_ct_series(2, rows=64, cols=64, seed=74, patient_id="PLAIN-1", study_uid=PLAIN_STUDY),
            work / "plain",
        ),
        "slow": write_series(
            generate_ct_series(2, rows=64, cols=64, seed=75, patient_id="SLOW-1", study_uid=SLOW_STUDY), work / "slow"
        ),
    }
    orthanc = orthanc_module_factory("ORTHANC_B", always_allow=True)
    orthanc.upload_many([p for paths in series.values() for p in paths])
    # Each image answered a second late: delivery takes seconds, the archive's final response does not.
    ws = StorescpProcess(work / "ws-a", "WS_A", extra_args=["--sleep-after", "1"]).start()
    plain = StorescpProcess(work / "plain-a", "PLAIN_A").start()
    picky = start_picky_scp()
    net = LocalRelayNetwork(work / "relay").start()
    try:
        site_b = net.add_site(
            "hospital-b",
            shared=[Shared("ORTHANC_B", HOST, orthanc.dicom_port, ["hospital-a"])],
            remote=[
                Remote("WS_A", "hospital-a", accelerate=True),
                Remote("PICKY_X", "hospital-a", "PICKY_A", accelerate=True),  # under another title at site B
                Remote("PLAIN_A", "hospital-a"),
                Remote("A_MOVER", "hospital-a", "MOVER_A"),  # the requester, under another title at site B
            ],
            accelerate=ACCEL,
            **DICOM,
        )
        net.add_site(
            "hospital-a",
            shared=[
                Shared("WS_A", HOST, ws.port, ["hospital-b"], accelerate=True),
                Shared("PICKY_A", HOST, picky.port, ["hospital-b"], accelerate=True),
                Shared("PLAIN_A", HOST, plain.port, ["hospital-b"]),
                Shared("MOVER_A", HOST, plain.port, ["hospital-b"]),
            ],
            remote=[Remote("PACS_B", "hospital-b", "ORTHANC_B")],
            accelerate={**ACCEL, "move_hold_max_s": HOLD_MAX_S},
            metrics_listen="127.0.0.1:0",
            **DICOM,
        )
        assert site_b.port
        orthanc.set_modalities({title: (title, HOST, site_b.port) for title in ("WS_A", "PICKY_X", "PLAIN_A")})
        net.wait_connected()
        # Router B answers the archive's sub-operations itself once it knows what each device accepts.
        for title in ("WS_A", "PICKY_X"):
            known = f"{title}'s capabilities at B"
            wait_for(lambda t=title: near_route(net, t).get("capabilities_known"), known, timeout=60)
        yield Sites(net, orthanc, ws, plain, picky, work, series)
    finally:
        picky.release.set()
        net.stop()
        ws.stop()
        plain.stop()
        picky.server.shutdown()


def move(sites: Sites, destination: str, study_uid: str) -> dcmtk.MoveResult:
    return dcmtk.movescu(
        HOST, sites.port_a, "PACS_B", "MOVER_A", destination, {"StudyInstanceUID": study_uid}, timeout=120
    )


def files_in(directory: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in directory.glob("*.dcm")}


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def move_metrics(sites: Sites) -> dict[str, float]:
    """Router A's held-move families: {"held": .., "confirmed": .., "timed_out": .., "unconfirmed": ..}."""
    address = sites.net.status("hospital-a")["metrics"]["listen"]  # type: ignore[index]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    got: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "relay_router_accel_moves_held":
                got["held"] = sample.value
            elif sample.name == "relay_router_accel_move_holds_total":
                got[sample.labels["end"]] = sample.value
            elif sample.name == "relay_router_accel_move_subops_unconfirmed_total":
                got["unconfirmed"] = sample.value
    assert {"held", "confirmed", "timed_out", "transparent", "unconfirmed"} <= set(got), got
    return got


def test_the_final_response_comes_once_every_image_is_at_the_destination(sites: Sites) -> None:
    originals = sites.series["ct"]
    before = move_metrics(sites)
    result = move(sites, "WS_A", CT_STUDY)
    present = files_in(sites.ws.out_dir)  # read the moment movescu exits, before anything else
    assert result.returncode == 0 and not result.errors, result
    assert result.final_status == "Success", result
    assert (result.completed, result.failed, result.warning) == (5, 0, 0), result
    missing = uids(originals) - set(present)
    assert not missing, f"movescu got its final response while {len(missing)} images were not delivered: {result}"
    # The destination got them bit for bit: SOP Instance UIDs and Pixel Data hashes, every data element.
    assert fingerprints([present[u] for u in uids(originals)]) == fingerprints(originals)
    for path in originals:
        original = pydicom.dcmread(path)
        assert pydicom.dcmread(present[str(original.SOPInstanceUID)]) == original
    # Router A held that response: it says so, with the requester's own title (translated by router B).
    log_a = sites.net.log("hospital-a")
    assert "C-MOVE from 'MOVER_A' (Message ID 1) to WS_A at hospital-b: its final response waits" in log_a, log_a[
        -3000:
    ]
    assert "final response 0x0000 -> 0x0000; completed 5, warning 0, failed 0" in log_a, log_a[-3000:]
    # ... and counted it: one hold ended with every sub-operation confirmed, none held now.
    after = move_metrics(sites)
    assert after["confirmed"] == before["confirmed"] + 1, (before, after)
    assert (after["timed_out"], after["unconfirmed"], after["held"]) == (before["timed_out"], before["unconfirmed"], 0)
    # The images went the accelerated way: router B answered the archive's sub-operations from its spool.
    log_b = sites.net.log("hospital-b")
    stored = re.findall(r"accelerated association from 'ORTHANC_B' for 'WS_A' ended: (\d+) stored in the spool", log_b)
    assert sum(map(int, stored)) >= 5, log_b[-3000:]
    # ... and shipped them through the blob store: the held response counted images that came by reference.
    audit_b = sites.net.workdir / "audit-hospital-b.jsonl"

    def by_reference() -> int:  # router B's accel_transfer audit events, written once their outcomes are in
        return sum(int(e.get("by_reference", 0)) for e in read_events(audit_b) if e["event"] == "accel_transfer")

    wait_for(lambda: by_reference() >= 5, "router B's audit counting the CT images sent by reference", timeout=30)


def test_a_destination_refusing_one_sop_class_turns_into_failed_sub_operations(sites: Sites) -> None:
    ct, mr = sites.series["mixed_ct"], sites.series["mixed_mr"]
    result = move(sites, "PICKY_X", MIXED_STUDY)
    assert not result.timed_out and not result.aborted and not result.errors, result
    # Sub-operations complete, one or more failures (PS3.4 C.4.2.3.1): the CT images stored, the MR refused.
    assert "0xb000" in result.log.lower(), result
    assert (result.completed, result.failed, result.warning) == (3, 2, 0), result
    for uid in uids(mr):
        assert uid in result.log, f"the Failed SOP Instance UID List does not name {uid}: {result}"
    assert uids(ct) <= set(sites.picky.received), "the CT images of the move were held up by the refused MR ones"
    assert fingerprints(sites.picky.received[u] for u in uids(ct)) == fingerprints(ct)
    assert not uids(mr) & set(sites.picky.received)


def test_all_sub_operations_refused_is_a702(sites: Sites) -> None:
    result = move(sites, "PICKY_X", MR_STUDY)
    assert "0xa702" in result.log.lower(), result  # Refused: Out of Resources, unable to perform sub-operations
    assert (result.completed, result.failed) == (0, 2), result


def test_a_move_to_a_transparent_destination_is_not_held(sites: Sites) -> None:
    """PLAIN_A is not accelerated: the sub-operations are relayed, and the final response passes as it came."""
    result = move(sites, "PLAIN_A", PLAIN_STUDY)
    assert result.check().completed == 2, result
    assert uids(sites.series["plain"]) <= set(files_in(sites.plain.out_dir))
    assert "to PLAIN_A at hospital-b: its final response waits" not in sites.net.log("hospital-a")


def test_a_hold_ended_by_the_ceiling_reports_the_unconfirmed_failed_and_counts_them(sites: Sites) -> None:
    """PICKY_A stalls patient SLOW-1's C-STOREs past move_hold_max_s: the final response says A702 with
    both sub-operations failed (unconfirmed), router A's metrics count the timed-out hold and the two
    sub-operations, and the images are still delivered, byte-identical, once the destination answers."""
    slow = sites.series["slow"]
    before = move_metrics(sites)
    try:
        result = move(sites, "PICKY_X", SLOW_STUDY)
        assert not result.timed_out and not result.aborted, result
        assert "0xa702" in result.log.lower(), result
        assert (result.completed, result.failed) == (0, 2), result
        for uid in uids(slow):
            assert uid in result.log, f"the Failed SOP Instance UID List does not name {uid}: {result}"
        log_a = sites.net.log("hospital-a")
        assert "2 of 2 sub-operations not confirmed by PICKY_A within move_hold_max_s" in log_a, log_a[-3000:]
        after = move_metrics(sites)
        assert after["timed_out"] == before["timed_out"] + 1, (before, after)
        assert after["unconfirmed"] == before["unconfirmed"] + 2, (before, after)
        assert (after["confirmed"], after["held"]) == (before["confirmed"], 0), (before, after)
    finally:
        sites.picky.release.set()
    wait_for(lambda: uids(slow) <= set(sites.picky.received), "the stalled images delivered after all", timeout=90)
    assert fingerprints(sites.picky.received[u] for u in uids(slow)) == fingerprints(slow)
