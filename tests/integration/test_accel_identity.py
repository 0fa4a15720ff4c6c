"""Patient identity on an accelerated route, real parts: storescu -> router A -> bridge -> router B -> Orthanc.

Hospital A (issuer HOSP-A) pushes studies to ORTHANC_B at hospital B (issuer HOSP-B) twice: over
PACS_B, an accelerated route (router A answers and spools; router B spools and delivers), and over
PACS_B_PLAIN, the transparent route with the identity filter at both routers. ORTHANC_B's `[[shared]]`
entry has `accelerate` and `patient_identity`: router B maps each accelerated instance into its
domain before its spool (relay_router.identity.instances), with the same table as the transparent
filter. What the user at B sees must not depend on the route: A-200 becomes B's B-200 (HOSP-B), A's
identifier kept in Other Patient IDs Sequence; an unmapped A-999 keeps its ID, marked HOSP-A. Pixel
Data and every other element byte-identical. One slice of each study goes through the blob store by
reference (above spill_threshold_bytes), the others inline: both paths are coerced.

Accelerated retrieval: movescu at A asks PACS_B_PLAIN (transparent, identity filter) for A-100's study
to WS_A, a DCMTK storescp at A whose `[[shared]]` entry has `accelerate` and `patient_identity`. The
archive's sub-operations (B's B-900) travel accelerated and router A maps them to A-100 before its
spool, as the transparent route maps a retrieval's C-STOREs.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.integration.test_accel_route import arrived, wait_for
from tests.support import dcmtk
from tests.support.dcmtk import StorescpProcess
from tests.support.orthanc import OrthancProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
HOST = "127.0.0.1"
ACCEL = {"bucket_bytes": 256 * 1024, "retry_max_s": 2.0, "associations": 2}
DICOM = {"spill_threshold_bytes": 20 << 10, "spill_part_bytes": 64 << 10}  # 128x128 CT slices by reference
IDENTITY_TAGS = ("PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence", "IssuerOfPatientIDQualifiersSequence")


@dataclass
class Sites:
    net: LocalRelayNetwork
    orthanc: OrthancProcess
    port_a: int
    ws: StorescpProcess
    moved: list[Path]  # B-900's study at ORTHANC_B (moved to WS_A)


@pytest.fixture(scope="module")
def sites(orthanc_module_factory: OrthancPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    require_dcmtk("storescu", "storescp", "movescu")
    work = tmp_path_factory.mktemp("accel-identity")
    orthanc = orthanc_module_factory("ORTHANC_B", always_allow=True)  # C-MOVE from MOVER_A, not a modality
    moved = write_series(
        generate_ct_series(2, rows=64, cols=64, patient_id="B-900", patient_name="SMITH^ANNE", seed=61), work / "b900"
    )
    orthanc.upload_many(moved)
    ws = StorescpProcess(work / "ws-a", "WS_A").start()
    net = LocalRelayNetwork(work / "relay").start()
    try:
        site_b = net.add_site(
            "hospital-b",
            shared=[
                Shared("ORTHANC_B", HOST, orthanc.dicom_port, ["hospital-a"], patient_issuer="HOSP-A", accelerate=True)
            ],
            remote=[Remote("WS_A", "hospital-a", accelerate=True)],  # the move destination: accelerated
            identity={"issuer": "HOSP-B", "source": [{"kind": "table"}]},
            accelerate=ACCEL,
            **DICOM,
        )
        site_a = net.add_site(
            "hospital-a",
            remote=[
                Remote("PACS_B", "hospital-b", "ORTHANC_B", accelerate=True),
                Remote("PACS_B_PLAIN", "hospital-b", "ORTHANC_B", patient_issuer="HOSP-B"),
            ],
            shared=[Shared("WS_A", HOST, ws.port, ["hospital-b"], patient_issuer="HOSP-B", accelerate=True)],
            identity={"issuer": "HOSP-A", "source": [{"kind": "table"}]},
            accelerate=ACCEL,
            **DICOM,
        )
        pix(net, "hospital-b", "add", "B-200", "A-200", "--other-issuer", "HOSP-A")
        pix(net, "hospital-a", "add", "A-100", "B-900", "--other-issuer", "HOSP-B")
        assert site_b.port
        orthanc.set_modalities({"WS_A": ("WS_A", HOST, site_b.port)})
        net.wait_connected()

        def learned() -> bool:
            status = net.status("hospital-a").get("accelerate")
            return isinstance(status, dict) and bool(status["routes"]["PACS_B"].get("capabilities_known"))

        wait_for(learned, "ORTHANC_B's capabilities learned by router A", timeout=60)  # until then: transparent

        def learned_at_b() -> bool:
            status = net.status("hospital-b").get("accelerate")
            return isinstance(status, dict) and bool(status["routes"]["WS_A"].get("capabilities_known"))

        wait_for(learned_at_b, "WS_A's capabilities learned by router B", timeout=60)
        assert site_a.port
        yield Sites(net, orthanc, site_a.port, ws, moved)
    finally:
        net.stop()
        ws.stop()


def pix(net: LocalRelayNetwork, site: str, *args: str) -> None:
    config = net.router_config_path(site)
    command = [net.python, "-m", "relay_router.cli", "--config", str(config), "pix", *args]
    done = subprocess.run(command, cwd=config.parent, env=net.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def study(directory: Path, patient_id: str, seed: int) -> list[Path]:
    """One study of a patient with no issuer (as a modality sends it): a 128x128 slice (by reference on
    the accelerated route) and two 64x64 ones (inline)."""
    uid = generate_uid()
    big = generate_ct_series(1, rows=128, cols=128, patient_id=patient_id, seed=seed, study_uid=uid)
    small = generate_ct_series(2, rows=64, cols=64, patient_id=patient_id, seed=seed + 1, study_uid=uid)
    return write_series(big, directory / "big") + write_series(small, directory / "small")


def stored(orthanc: OrthancProcess, path: Path) -> Dataset:
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    orthanc_id = orthanc.find_sop(uid)
    assert orthanc_id, f"{uid} did not arrive"
    return pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))


def identity(ds: Dataset) -> dict[str, object]:
    return {tag: ds.get(tag) for tag in IDENTITY_TAGS}


def without_identity(ds: Dataset) -> Dataset:
    copy = Dataset(ds)
    for tag in IDENTITY_TAGS:
        if tag in copy:
            del copy[tag]
    return copy


def audit_records(sites: Sites, site: str = "hospital-b") -> list[dict[str, object]]:
    path = sites.net.router_config_path(site).parent / f"audit-{site}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if '"patient_identity"' in line]


@pytest.mark.parametrize(("patient", "expected"), [("A-200", ("B-200", "HOSP-B")), ("A-999", ("A-999", "HOSP-A"))])
def test_an_accelerated_push_is_relabelled_as_on_the_transparent_route(
    sites: Sites, tmp_path: Path, patient: str, expected: tuple[str, str]
) -> None:
    seed = 40 if patient == "A-200" else 50
    accelerated, transparent = study(tmp_path / "accel", patient, seed), study(tmp_path / "plain", patient, seed + 5)
    dcmtk.storescu(HOST, sites.port_a, "PACS_B", "MODALITY_A", accelerated, timeout=120).check()
    dcmtk.storescu(HOST, sites.port_a, "PACS_B_PLAIN", "MODALITY_A", transparent, timeout=120).check()
    wait_for(arrived(sites.orthanc, accelerated), "the accelerated study at ORTHANC_B", timeout=90)
    log_a = sites.net.log("hospital-a")
    assert " parts to blob " in log_a, "no slice went through the blob store"

    reference = stored(sites.orthanc, transparent[0])
    assert (reference.PatientID, reference.IssuerOfPatientID) == expected
    for path in accelerated:
        original, got = pydicom.dcmread(path), stored(sites.orthanc, path)
        # The patient identity exactly as the transparent route's filter left it ...
        assert identity(got) == identity(reference), (identity(got), identity(reference))
        # ... and nothing else changed: every other element, Pixel Data byte for byte.
        assert without_identity(got) == without_identity(original)
    # SOP Instance UIDs kept, Pixel Data byte-identical (SHA-256 of each image at ORTHANC_B against the original).
    at_b = [sites.orthanc.instance_file(str(sites.orthanc.find_sop(uid))) for uid in fingerprints(accelerated)]
    assert fingerprints(at_b) == fingerprints(accelerated)
    if patient == "A-200":
        other = stored(sites.orthanc, accelerated[0]).OtherPatientIDsSequence[-1]
        assert (other.PatientID, other.IssuerOfPatientID) == ("A-200", "HOSP-A")

    # Router B audited each accelerated instance's coercion as the transparent filter does.
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in accelerated}
    events = {str(r["sop_instance_uid"]): r for r in audit_records(sites) if r.get("sop_instance_uid") in uids}
    assert set(events) == uids, "router B did not audit every accelerated instance"
    outcome = "mapped" if patient == "A-200" else "unmapped"
    assert {(r["flow"], r["message"], r["identity_outcome"]) for r in events.values()} == {
        ("arriving", "C-STORE-RQ", outcome)
    }


def test_accelerated_move_sub_operations_are_relabelled_into_the_requesters_domain(sites: Sites) -> None:
    """movescu at A by A's own ID: the request is mapped to B-900 on the transparent route, the archive's
    sub-operations come back accelerated and router A maps them to A-100 before its spool."""
    result = dcmtk.movescu(
        HOST, sites.port_a, "PACS_B_PLAIN", "MOVER_A", "WS_A", {"PatientID": "A-100"}, "PATIENT", "patient", timeout=120
    )
    assert result.check().completed == len(sites.moved), result
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sites.moved}

    def received() -> dict[str, Path]:
        found = {}
        for path in sites.ws.out_dir.glob("*"):
            if path.is_file():
                found[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
        return found

    wait_for(lambda: set(uids) <= set(received()), "the moved images at WS_A", timeout=90)
    at_ws = received()
    assert fingerprints([at_ws[u] for u in uids]) == fingerprints(sites.moved)  # Pixel Data byte-identical
    for uid, original_path in uids.items():
        got, original = pydicom.dcmread(at_ws[uid]), pydicom.dcmread(original_path)
        assert (got.PatientID, got.IssuerOfPatientID, str(got.PatientName)) == ("A-100", "HOSP-A", "SMITH^ANNE")
        other = got.OtherPatientIDsSequence[-1]
        assert (other.PatientID, other.IssuerOfPatientID) == ("B-900", "HOSP-B")
        assert without_identity(got) == without_identity(original)
    # Router A, not B, decided: its audit has each sub-operation's mapping (arriving, as a C-STORE).
    events = [r for r in audit_records(sites, "hospital-a") if r.get("sop_instance_uid") in uids]
    assert {(r["flow"], r["identity_outcome"], r["original_patient_id"], r["patient_id"]) for r in events} == {
        ("arriving", "mapped", "B-900", "A-100")
    }
    assert {r["sop_instance_uid"] for r in events} == set(uids)
    # ... and they came the accelerated way: router B answered the archive's C-STOREs from its spool.
    assert "accelerated association from 'ORTHANC_B' for 'WS_A' ended" in sites.net.log("hospital-b")
