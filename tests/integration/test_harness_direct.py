"""The third-party harness itself, with no relay in between.

If these fail, a relay test failure means nothing: they prove that Orthanc,
DCMTK, pynetdicom and the demo archive talk to each other directly, and that
the fingerprint comparison sees images arrive byte for byte.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, generate_mr_series
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.support.dcmtk import StorescpProcess, echoscu, findscu, getscu, movescu, storescu
from tests.support.orthanc import OrthancProcess
from tests.support.ports import free_port, wait_for_port

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
STUDY_UID = str(generate_ct_series(1)[0].StudyInstanceUID)  # the ct_series fixture's study
# Callers Orthanc B must know before it answers C-FIND/C-MOVE/C-GET (port unused).
CALLERS = {name.lower(): (name, HOST, 104) for name in ("FINDSCU", "MOVESCU", "GETSCU", "PYNETDICOM")}


@pytest.fixture(scope="module")
def orthanc_b(orthanc_module_factory: OrthancPool, ct_series: list[Path]) -> OrthancProcess:
    """Orthanc B holding the CT series, stored with DCMTK storescu."""
    require_dcmtk()
    b = orthanc_module_factory("ORTHANC_B", modalities=CALLERS)
    storescu(HOST, b.dicom_port, b.aet, files=ct_series).check()
    return b


@pytest.fixture(scope="module")
def orthanc_a(orthanc_module_factory: OrthancPool) -> OrthancProcess:
    return orthanc_module_factory("ORTHANC_A")


@pytest.fixture
def scp(storescp_factory: Callable[..., StorescpProcess], orthanc_b: OrthancProcess) -> StorescpProcess:
    """A storescp declared in Orthanc B as the C-MOVE destination STORESCP."""
    receiver = storescp_factory("STORESCP")
    orthanc_b.set_modalities({"storescp": ("STORESCP", HOST, receiver.port)})
    return receiver


# -- pynetdicom as the client ------------------------------------------------------


def _client(*contexts: str) -> AE:
    ae = AE("PYNETDICOM")
    for cx in contexts:
        ae.add_requested_context(cx)
    return ae


def _statuses(responses: Iterator[tuple[Dataset, Dataset | None]]) -> list[int]:
    return [int(status.Status) for status, _ in responses if status]


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def pynetdicom_get(port: int, called: str, query: Dataset, sop_classes: list[str]) -> list[Dataset]:
    """C-GET with storage SCP role selection; returns the datasets received."""
    ae = _client(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    roles: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in sop_classes]
    assoc = ae.associate(HOST, port, ae_title=called, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        statuses = _statuses(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    return received


def pynetdicom_session(port: int, called: str, dest: str) -> tuple[list[Dataset], list[int]]:
    """Echo, study-level find, and a move of the CT study to ``dest``, over one association."""
    ae = _client(Verification, StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(HOST, port, ae_title=called)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        query = _query("STUDY", StudyInstanceUID="", PatientID="RELAY-CT*", NumberOfStudyRelatedInstances="")
        found = [
            ds
            for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status == 0xFF00
        ]
        moved = _statuses(
            assoc.send_c_move(
                _query("STUDY", StudyInstanceUID=STUDY_UID), dest, StudyRootQueryRetrieveInformationModelMove
            )
        )
    finally:
        assoc.release()
    return [ds for ds in found if ds is not None], moved


def pynetdicom_store(port: int, called: str, datasets: list[Dataset]) -> list[int]:
    ae = _client()
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


# -- datasets -------------------------------------------------------------------------


def test_generated_series_are_deterministic_and_distinct(ct_fingerprints: dict[str, str]) -> None:
    assert fingerprints(generate_ct_series(5)) == ct_fingerprints
    assert not set(fingerprints(generate_ct_series(5, seed=1))) & set(ct_fingerprints)
    assert len(set(ct_fingerprints.values())) == 5  # every slice has its own pixels
    mr = generate_mr_series(2)
    assert mr[0].Rows == 256 and mr[0].SOPClassUID == MRImageStorage


# -- Orthanc with DCMTK ---------------------------------------------------------------


def test_storescu_into_orthanc(orthanc_b: OrthancProcess, ct_fingerprints: dict[str, str]) -> None:
    assert orthanc_b.fingerprints() == ct_fingerprints
    first = next(iter(ct_fingerprints))
    orthanc_id = orthanc_b.find_sop(first)
    assert orthanc_id is not None and fingerprint(orthanc_b.instance_file(orthanc_id)) == (
        first,
        ct_fingerprints[first],
    )


def test_storescu_compressed_files(orthanc_a: OrthancProcess, sample_dicom_files: list[Path]) -> None:
    """JPEG 2000 and RLE go in one association, in their own syntaxes (storescu profile)."""
    orthanc_a.delete_all()
    result = storescu(HOST, orthanc_a.dicom_port, orthanc_a.aet, files=sample_dicom_files).check()
    assert result.succeeded == len(sample_dicom_files)
    assert orthanc_a.fingerprints() == fingerprints(sample_dicom_files)
    orthanc_a.delete_all()
    assert orthanc_a.instances() == []


def test_echoscu(orthanc_b: OrthancProcess) -> None:
    assert echoscu(HOST, orthanc_b.dicom_port, orthanc_b.aet).ok


def test_findscu(orthanc_b: OrthancProcess) -> None:
    keys = {"PatientID": "RELAY-CT*", "StudyInstanceUID": None, "NumberOfStudyRelatedInstances": None}
    studies = findscu(HOST, orthanc_b.dicom_port, orthanc_b.aet, level="STUDY", keys=keys).check()
    assert [(s["StudyInstanceUID"], s["NumberOfStudyRelatedInstances"]) for s in studies] == [(STUDY_UID, "5")]
    patients = findscu(
        HOST,
        orthanc_b.dicom_port,
        orthanc_b.aet,
        level="PATIENT",
        model="patient",
        keys={"PatientName": "demo^c*", "PatientID": None},
    ).check()
    assert [p["PatientID"] for p in patients] == ["RELAY-CT-0001"]
    # An unknown caller is accepted, then aborted on C-FIND; findscu still exits 0.
    refused = findscu(HOST, orthanc_b.dicom_port, orthanc_b.aet, calling="STRANGER", keys=keys)
    assert refused.returncode == 0 and not refused.ok and refused.run.aborted and len(refused) == 0


def test_movescu_to_storescp(orthanc_b: OrthancProcess, scp: StorescpProcess, ct_fingerprints: dict[str, str]) -> None:
    result = movescu(
        HOST, orthanc_b.dicom_port, orthanc_b.aet, dest_ae="STORESCP", keys={"StudyInstanceUID": STUDY_UID}
    ).check()
    assert (result.completed, result.failed) == (5, 0)
    assert fingerprints(scp.wait_for_files(5)) == ct_fingerprints
    unknown = movescu(
        HOST, orthanc_b.dicom_port, orthanc_b.aet, dest_ae="NOWHERE", keys={"StudyInstanceUID": STUDY_UID}
    )
    assert not unknown.ok and unknown.final_status == "Failed"


def test_getscu(orthanc_b: OrthancProcess, tmp_path: Path, ct_fingerprints: dict[str, str]) -> None:
    result = getscu(HOST, orthanc_b.dicom_port, orthanc_b.aet, out_dir=tmp_path, keys={"StudyInstanceUID": STUDY_UID})
    result.check()
    assert result.completed == 5 and fingerprints(result.received) == ct_fingerprints


# -- Orthanc with pynetdicom, and Orthanc with Orthanc ---------------------------------------


def test_pynetdicom_client(orthanc_b: OrthancProcess, scp: StorescpProcess, ct_fingerprints: dict[str, str]) -> None:
    found, moved = pynetdicom_session(orthanc_b.dicom_port, orthanc_b.aet, "STORESCP")
    assert [(ds.StudyInstanceUID, int(ds.NumberOfStudyRelatedInstances)) for ds in found] == [(STUDY_UID, 5)]
    assert moved[-1] == 0x0000
    assert fingerprints(scp.wait_for_files(5)) == ct_fingerprints
    got = pynetdicom_get(
        orthanc_b.dicom_port, orthanc_b.aet, _query("STUDY", StudyInstanceUID=STUDY_UID), [CTImageStorage]
    )
    assert fingerprints(got) == ct_fingerprints


def test_orthanc_to_orthanc(
    orthanc_a: OrthancProcess, orthanc_b: OrthancProcess, ct_fingerprints: dict[str, str]
) -> None:
    orthanc_a.delete_all()
    orthanc_a.set_modalities({"b": (orthanc_b.aet, HOST, orthanc_b.dicom_port)})
    orthanc_b.set_modalities({"a": (orthanc_a.aet, HOST, orthanc_a.dicom_port)})
    assert orthanc_a.echo("b")
    answers = orthanc_a.query("b", "study", {"PatientID": "RELAY-CT*"})
    assert [a["StudyInstanceUID"] for a in answers] == [STUDY_UID]
    orthanc_a.move_from("b", "study", [{"StudyInstanceUID": STUDY_UID}])
    assert orthanc_a.fingerprints() == ct_fingerprints
    orthanc_a.delete_all()


# -- the demo archive ---------------------------------------------------------------------------


def test_demo_archive(
    archive_factory: Callable[..., DemoArchive],
    storescp_factory: Callable[..., StorescpProcess],
    ct_series: list[Path],
    sample_dicom_files: list[Path],
    tmp_path: Path,
) -> None:
    require_dcmtk()
    scp = storescp_factory("STORESCP")
    incoming = free_port()
    archive = archive_factory("ARCHIVE", {"STORESCP": (HOST, scp.port), "MOVESCU": (HOST, incoming)})
    everything = fingerprints([*ct_series, *sample_dicom_files])
    storescu(HOST, archive.port, "ARCHIVE", files=[*ct_series, *sample_dicom_files]).check()
    assert archive.fingerprints() == everything
    assert echoscu(HOST, archive.port, "ARCHIVE").ok

    series = findscu(
        HOST,
        archive.port,
        "ARCHIVE",
        level="SERIES",
        keys={
            "StudyInstanceUID": STUDY_UID,
            "SeriesInstanceUID": None,
            "NumberOfSeriesRelatedInstances": None,
            "Modality": None,
        },
    ).check()
    assert [(s["Modality"], s["NumberOfSeriesRelatedInstances"]) for s in series] == [("CT", "5")]
    images = findscu(
        HOST,
        archive.port,
        "ARCHIVE",
        level="IMAGE",
        keys={
            "StudyInstanceUID": STUDY_UID,
            "SeriesInstanceUID": series[0]["SeriesInstanceUID"],
            "SOPInstanceUID": None,
            "InstanceNumber": None,
        },
    ).check()
    assert sorted(i["SOPInstanceUID"] for i in images) == sorted(fingerprints(ct_series))
    patients = findscu(
        HOST,
        archive.port,
        "ARCHIVE",
        level="PATIENT",
        model="patient",
        keys={"PatientName": "DEMO^CT", "PatientID": None},
    ).check()
    assert [p["PatientID"] for p in patients] == ["RELAY-CT-0001"]

    # C-MOVE of everything (compressed included) to storescp, then of the CT study to movescu itself.
    for uid in sorted(_study_uids([*ct_series, *sample_dicom_files])):
        movescu(HOST, archive.port, "ARCHIVE", dest_ae="STORESCP", keys={"StudyInstanceUID": uid}).check()
    assert fingerprints(scp.wait_for_files(len(everything))) == everything
    own = movescu(
        HOST,
        archive.port,
        "ARCHIVE",
        dest_ae="MOVESCU",
        keys={"StudyInstanceUID": STUDY_UID},
        port_for_incoming=incoming,
        out_dir=tmp_path / "moved",
    ).check()
    assert own.completed == 5 and fingerprints(own.received) == fingerprints(ct_series)
    assert not movescu(HOST, archive.port, "ARCHIVE", dest_ae="NOWHERE", keys={"StudyInstanceUID": STUDY_UID}).ok

    got = getscu(HOST, archive.port, "ARCHIVE", out_dir=tmp_path / "get", keys={"StudyInstanceUID": STUDY_UID})
    assert got.check().completed == 5 and fingerprints(got.received) == fingerprints(ct_series)

    # pynetdicom against the archive: find, move, get, store.
    mr = generate_mr_series(3)
    assert pynetdicom_store(archive.port, "ARCHIVE", mr) == [0, 0, 0]
    mr_query = _query("SERIES", StudyInstanceUID=mr[0].StudyInstanceUID, SeriesInstanceUID=mr[0].SeriesInstanceUID)
    assert fingerprints(pynetdicom_get(archive.port, "ARCHIVE", mr_query, [MRImageStorage])) == fingerprints(mr)
    found, moved = pynetdicom_session(archive.port, "ARCHIVE", "STORESCP")
    assert [(ds.StudyInstanceUID, int(ds.NumberOfStudyRelatedInstances)) for ds in found] == [(STUDY_UID, 5)]
    assert moved[-1] == 0x0000


def _study_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in paths}


def test_demo_archive_cli(tmp_path: Path, ct_series: list[Path]) -> None:
    """``python -m relay_demo.archive`` serves what it preloads, and stops on SIGTERM."""
    require_dcmtk("echoscu", "findscu")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay_demo.archive",
            "--ae-title",
            "CLIPACS",
            "--port",
            str(port),
            "--storage",
            str(tmp_path / "store"),
            "--load",
            *map(str, ct_series),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        assert wait_for_port(port)
        assert echoscu(HOST, port, "CLIPACS").ok
        images = findscu(
            HOST, port, "CLIPACS", level="IMAGE", keys={"StudyInstanceUID": STUDY_UID, "SOPInstanceUID": None}
        ).check()
        assert len(images) == 5
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
