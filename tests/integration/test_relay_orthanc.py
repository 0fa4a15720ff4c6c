"""Two hospitals with real Orthanc archives, talking through real routers and a real bridge over TLS.

Hospital A: a DCMTK storescp workstation (WS_A) and Orthanc (ORTHANC_A).
Hospital B: Orthanc (ORTHANC_B), known at hospital A under the alias PACS_B.
Clients at A are DCMTK's tools and pynetdicom, all with calling AE WS_A (as a
workstation has one title); every retrieved image is compared with the
original by SOP Instance UID and a SHA-256 of its Pixel Data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.support import dcmtk
from tests.support.dcmtk import StorescpProcess
from tests.support.orthanc import OrthancProcess

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


@dataclass
class Hospitals:
    net: LocalRelayNetwork
    orthanc_a: OrthancProcess
    orthanc_b: OrthancProcess
    workstation: StorescpProcess
    router_a: int  # DICOM port of hospital A's router
    study_uid: str
    patient_id: str
    originals: dict[str, str]
    work: Path


@pytest.fixture(scope="module")
def hospitals(
    orthanc_module_factory: OrthancPool, tmp_path_factory: pytest.TempPathFactory, ct_series: list[Path]
) -> Iterator[Hospitals]:
    require_dcmtk()
    work = tmp_path_factory.mktemp("hospitals")
    workstation = StorescpProcess(work / "ws-a", "WS_A").start()
    orthanc_b = orthanc_module_factory("ORTHANC_B")
    orthanc_a = orthanc_module_factory("ORTHANC_A")
    orthanc_b.upload_many(ct_series)
    net = LocalRelayNetwork(work / "relay").start()
    try:
        site_b = net.add_site(
            "hospital-b",
            shared=[Shared("ORTHANC_B", HOST, orthanc_b.dicom_port, ["hospital-a"])],
            remote=[Remote("WS_A", "hospital-a"), Remote("ORTHANC_A", "hospital-a")],
        )
        site_a = net.add_site(
            "hospital-a",
            shared=[
                Shared("WS_A", HOST, workstation.port, ["hospital-b"]),
                Shared("ORTHANC_A", HOST, orthanc_a.dicom_port, ["hospital-b"]),
            ],
            remote=[Remote("PACS_B", "hospital-b", "ORTHANC_B")],
        )
        assert site_a.port and site_b.port
        # Each archive knows the remote devices as modalities behind its own router.
        orthanc_b.set_modalities({"WS_A": ("WS_A", HOST, site_b.port), "ORTHANC_A": ("ORTHANC_A", HOST, site_b.port)})
        orthanc_a.set_modalities({"PACS_B": ("PACS_B", HOST, site_a.port)})
        net.wait_connected()
        header = pydicom.dcmread(ct_series[0], stop_before_pixels=True)
        yield Hospitals(
            net,
            orthanc_a,
            orthanc_b,
            workstation,
            site_a.port,
            str(header.StudyInstanceUID),
            str(header.PatientID),
            fingerprints(ct_series),
            work,
        )
    finally:
        net.stop()
        workstation.stop()


# -- DCMTK clients ---------------------------------------------------------------


def test_echoscu_through_the_relay(hospitals: Hospitals) -> None:
    dcmtk.echoscu(HOST, hospitals.router_a, "PACS_B", "WS_A").check()


@pytest.mark.parametrize(
    ("level", "model", "keys", "expect"),
    [
        ("PATIENT", "patient", {"PatientID": None, "PatientName": None}, "PatientID"),
        ("STUDY", "study", {"StudyInstanceUID": None, "PatientID": None}, "StudyInstanceUID"),
        ("SERIES", "study", {"SeriesInstanceUID": None, "Modality": "CT"}, "SeriesInstanceUID"),
    ],
)
def test_findscu_levels(hospitals: Hospitals, level: str, model: str, keys: dict[str, str | None], expect: str) -> None:
    if level == "SERIES":
        keys = {**keys, "StudyInstanceUID": hospitals.study_uid}
    matches = dcmtk.findscu(HOST, hospitals.router_a, "PACS_B", "WS_A", level, keys, model).check()
    assert matches, f"no {level} matches through the relay"
    truth = {
        "PatientID": hospitals.patient_id,
        "StudyInstanceUID": hospitals.study_uid,
    }
    if expect in truth:
        assert truth[expect] in {m[expect] for m in matches}
    else:
        series = hospitals.orthanc_b.get_json("/series?expand")
        assert {m[expect] for m in matches} == {s["MainDicomTags"]["SeriesInstanceUID"] for s in series}


def test_movescu_study_back_to_the_workstation(hospitals: Hospitals) -> None:
    """ORTHANC_B's own sub-association to WS_A goes back through router B, the bridge and router A."""
    hospitals.workstation.clear()
    result = dcmtk.movescu(
        HOST, hospitals.router_a, "PACS_B", "WS_A", "WS_A", {"StudyInstanceUID": hospitals.study_uid}
    ).check()
    assert result.completed == len(hospitals.originals) and not result.failed
    hospitals.workstation.wait_for_files(len(hospitals.originals))
    assert hospitals.workstation.fingerprints() == hospitals.originals


def test_getscu_study(hospitals: Hospitals, tmp_path: Path) -> None:
    result = dcmtk.getscu(
        HOST, hospitals.router_a, "PACS_B", "WS_A", tmp_path, {"StudyInstanceUID": hospitals.study_uid}
    ).check()
    assert result.completed == len(hospitals.originals)
    assert fingerprints(result.received) == hospitals.originals


def test_storescu_mixed_transfer_syntaxes(hospitals: Hospitals, sample_dicom_files: list[Path]) -> None:
    """Uncompressed, JPEG 2000 and RLE files all arrive byte-identical (P-DATA stays opaque)."""
    result = dcmtk.storescu(HOST, hospitals.router_a, "PACS_B", "WS_A", sample_dicom_files).check()
    assert result.succeeded == len(sample_dicom_files)
    for path in sample_dicom_files:
        uid, digest = fingerprint(path)
        orthanc_id = hospitals.orthanc_b.find_sop(uid)
        assert orthanc_id is not None, f"{path.name} did not reach ORTHANC_B"
        assert fingerprint(hospitals.orthanc_b.instance_file(orthanc_id)) == (uid, digest)


def test_orthanc_pulls_from_orthanc_across_sites(hospitals: Hospitals) -> None:
    """A PACS at A retrieves a study from the PACS at B by C-MOVE: both legs of the move are relayed."""
    before = set(hospitals.orthanc_a.instances())
    hospitals.orthanc_a.move_from(
        "PACS_B", "Study", [{"StudyInstanceUID": hospitals.study_uid}], target_aet="ORTHANC_A"
    )
    deadline = time.monotonic() + 30
    while len(set(hospitals.orthanc_a.instances()) - before) < len(hospitals.originals):
        assert time.monotonic() < deadline, "ORTHANC_A did not receive the study"
        time.sleep(0.2)
    assert hospitals.orthanc_a.fingerprints() == hospitals.originals


# -- pynetdicom as the client -----------------------------------------------------


def _associate(hospitals: Hospitals, *contexts: str, **kwargs):
    ae = AE(ae_title="WS_A")
    for context in contexts:
        ae.add_requested_context(context)
    assoc = ae.associate(HOST, hospitals.router_a, ae_title="PACS_B", **kwargs)
    assert assoc.is_established, "association through the relay was not established"
    return assoc


def test_pynetdicom_echo_and_find(hospitals: Hospitals) -> None:
    assoc = _associate(
        hospitals,
        Verification,
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
    )
    try:
        assert assoc.send_c_echo().Status == 0
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = hospitals.patient_id
        query.StudyInstanceUID = ""
        answers = [
            ds
            for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status in (0xFF00, 0xFF01)
        ]
    finally:
        assoc.release()
    assert [str(ds.StudyInstanceUID) for ds in answers] == [hospitals.study_uid]


def test_pynetdicom_move_and_get(hospitals: Hospitals) -> None:
    hospitals.workstation.clear()
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = hospitals.study_uid
    assoc = _associate(hospitals, StudyRootQueryRetrieveInformationModelMove)
    try:
        statuses = [s for s, _ in assoc.send_c_move(query, "WS_A", StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    assert statuses[-1].Status == 0
    hospitals.workstation.wait_for_files(len(hospitals.originals))
    assert hospitals.workstation.fingerprints() == hospitals.originals

    got: dict[str, str] = {}

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid, digest = fingerprint(ds)
        got[uid] = digest
        return 0

    ae = AE(ae_title="WS_A")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        HOST,
        hospitals.router_a,
        ae_title="PACS_B",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        statuses = [s for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert statuses[-1].Status == 0
    assert got == hospitals.originals


def test_pynetdicom_store_new_series(hospitals: Hospitals, tmp_path: Path) -> None:
    files = write_series(generate_ct_series(3, rows=128, cols=128, patient_id="STORE-1", seed=99), tmp_path)
    assoc = _associate(hospitals, CTImageStorage)
    try:
        statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
    stored = {}
    for uid in fingerprints(files):
        orthanc_id = hospitals.orthanc_b.find_sop(uid)
        assert orthanc_id is not None
        stored.update([fingerprint(hospitals.orthanc_b.instance_file(orthanc_id))])
    assert stored == fingerprints(files)


def test_bridge_saw_only_frames(hospitals: Hospitals) -> None:
    """The bridge logged associations with byte counts, and nothing of their DICOM content."""
    bridge_log = hospitals.net.log("bridge")
    assert "association closed" in bridge_log
    assert hospitals.patient_id not in bridge_log
    assert hospitals.study_uid not in bridge_log
