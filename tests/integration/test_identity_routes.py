"""Patient identity across two hospitals (issue 14): real Orthancs, DCMTK, routers and bridge over TLS.

Hospital A (issuer HOSP-A) asks hospital B (issuer HOSP-B) by A's own Patient IDs. B's
Orthanc holds three people:

* Smith, B-900 at B, A-100 at A (linked in A's cross-reference table);
* Jones, B-555 at B, COLL at A (linked);
* Brown, whose ID at B is COLL, the ID that means Jones at A (not linked: the collision).

ORTHANC_A holds A's own study of Smith (A-100) and of Jones (COLL). The mapping source is the
cross-reference table of pid-sources (``relay-router pix add``).
What the user at A sees: the right studies, labelled with A's ID and issuer, B's original
in Other Patient IDs Sequence, Pixel Data byte-identical, SOP Instance UIDs kept; Brown's
study never comes back for COLL; an unmapped ID answers no match; the bridge never sees an ID.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)

from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.support import dcmtk
from tests.support.orthanc import OrthancProcess

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
PEOPLE = {  # name: (ID at B, ID at A or None)
    "SMITH^ANNE": ("B-900", "A-100"),
    "JONES^BOB": ("B-555", "COLL"),
    "BROWN^CARL": ("COLL", None),
}


@dataclass
class Sites:
    net: LocalRelayNetwork
    orthanc_a: OrthancProcess
    orthanc_b: OrthancProcess
    router_a: int
    studies: dict[str, str]  # name -> StudyInstanceUID at B
    own: dict[str, str]  # name -> StudyInstanceUID of A's own study (ORTHANC_A holds it from the start)
    originals: dict[str, dict[str, str]]  # name -> {SOP Instance UID: Pixel Data SHA-256}


@pytest.fixture(scope="module")
def sites(orthanc_module_factory: OrthancPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    require_dcmtk("findscu", "movescu")
    work = tmp_path_factory.mktemp("identity")
    orthanc_b = orthanc_module_factory("ORTHANC_B")
    orthanc_a = orthanc_module_factory("ORTHANC_A")
    studies: dict[str, str] = {}
    originals: dict[str, dict[str, str]] = {}
    for seed, (name, (b_id, _)) in enumerate(PEOPLE.items(), start=1):
        files = write_series(
            generate_ct_series(2, rows=64, cols=64, patient_id=b_id, patient_name=name, seed=seed),
            work / f"b-{seed}",
        )
        orthanc_b.upload_many(files)
        studies[name] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        originals[name] = fingerprints(files)
    own: dict[str, str] = {}  # A's own study of each person A knows: name -> StudyInstanceUID at A
    for seed, (name, (_, a_id)) in enumerate(PEOPLE.items(), start=11):
        if a_id is not None:
            files = write_series(
                generate_ct_series(1, rows=32, cols=32, patient_id=a_id, patient_name=name, seed=seed),
                work / f"a-{seed}",
            )
            orthanc_a.upload_many(files)
            own[name] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    net = LocalRelayNetwork(work / "relay").start()
    try:
        site_b = net.add_site(
            "hospital-b",
            shared=[Shared("ORTHANC_B", HOST, orthanc_b.dicom_port, ["hospital-a"], patient_issuer="HOSP-A")],
            remote=[Remote("ORTHANC_A", "hospital-a", patient_issuer="HOSP-A")],
            identity={"issuer": "HOSP-B", "source": [{"kind": "table"}]},
        )
        site_a = net.add_site(
            "hospital-a",
            shared=[Shared("ORTHANC_A", HOST, orthanc_a.dicom_port, ["hospital-b"], patient_issuer="HOSP-B")],
            remote=[Remote("PACS_B", "hospital-b", "ORTHANC_B", patient_issuer="HOSP-B")],
            identity={"issuer": "HOSP-A", "source": [{"kind": "table"}]},
        )
        assert site_a.port and site_b.port
        orthanc_b.set_modalities({"ORTHANC_A": ("ORTHANC_A", HOST, site_b.port), "WS_A": ("WS_A", HOST, site_b.port)})
        for b_id, a_id in PEOPLE.values():
            if a_id is not None:
                pix(net, "hospital-a", "add", a_id, b_id, "--other-issuer", "HOSP-B")
        pix(net, "hospital-b", "add", "B-200", "A-200", "--other-issuer", "HOSP-A")  # for the push test
        net.wait_connected()
        yield Sites(net, orthanc_a, orthanc_b, site_a.port, studies, own, originals)
    finally:
        net.stop()


def pix(net: LocalRelayNetwork, site: str, *args: str) -> None:
    config = net.router_config_path(site)
    command = [net.python, "-m", "relay_router.cli", "--config", str(config), "pix", *args]
    done = subprocess.run(command, cwd=config.parent, env=net.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def find(sites: Sites, patient_id: str) -> list[pydicom.Dataset]:
    keys = {"PatientID": patient_id, "IssuerOfPatientID": None, "PatientName": None, "StudyInstanceUID": None}
    return dcmtk.findscu(HOST, sites.router_a, "PACS_B", "WS_A", "STUDY", keys, "study").check().datasets


def audit_records(sites: Sites, site: str) -> list[dict[str, object]]:
    path = sites.net.router_config_path(site).parent / f"audit-{site}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if '"patient_identity"' in line]


def test_findscu_by_our_id_finds_the_partners_study_relabelled(sites: Sites) -> None:
    (answer,) = find(sites, "A-100")
    assert answer.StudyInstanceUID == sites.studies["SMITH^ANNE"]
    assert (answer.PatientID, answer.IssuerOfPatientID) == ("A-100", "HOSP-A")
    other = answer.OtherPatientIDsSequence[-1]
    assert (other.PatientID, other.IssuerOfPatientID) == ("B-900", "HOSP-B")


def test_the_colliding_id_never_returns_the_wrong_person(sites: Sites) -> None:
    answers = find(sites, "COLL")
    assert [a.StudyInstanceUID for a in answers] == [sites.studies["JONES^BOB"]]  # Jones, not Brown
    assert answers[0].PatientID == "COLL" and answers[0].OtherPatientIDsSequence[-1].PatientID == "B-555"


def test_an_unmapped_id_answers_no_match_and_is_audited(sites: Sites) -> None:
    assert find(sites, "A-404") == []
    refused = [r for r in audit_records(sites, "hospital-a") if r.get("identity_outcome") == "refused"]
    assert refused and refused[-1]["original_patient_id"] == "A-404"


def test_unmapped_retrievals_are_answered_here_and_a_real_scu_accepts_the_answer(sites: Sites) -> None:
    """pynetdicom's C-MOVE and C-GET for an unmapped ID: a final Success with no sub-operations, from router A."""
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = "A-404"
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    roles = [build_role(CTImageStorage, scp_role=True)]
    assoc = ae.associate(HOST, sites.router_a, ae_title="PACS_B", ext_neg=roles)
    assert assoc.is_established
    try:
        moves = [
            status for status, _ in assoc.send_c_move(query, "ORTHANC_A", PatientRootQueryRetrieveInformationModelMove)
        ]
        gets = [status for status, _ in assoc.send_c_get(query, PatientRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    for statuses in (moves, gets):
        (final,) = statuses  # no pending responses: nothing was matched, nothing reached B
        assert final.Status == 0 and final.NumberOfCompletedSuboperations == 0


def test_movescu_by_our_id_brings_the_right_images_relabelled(sites: Sites) -> None:
    """ORTHANC_A holds A's own study of Smith (A-100) and of Jones (COLL); after the moves each of
    them has B's study too, under the same patient, and Brown (COLL at B) never arrives."""
    before = set(sites.orthanc_a.instances())
    for a_id, name in (("A-100", "SMITH^ANNE"), ("COLL", "JONES^BOB")):
        result = dcmtk.movescu(
            HOST, sites.router_a, "PACS_B", "WS_A", "ORTHANC_A", {"PatientID": a_id}, "PATIENT", "patient"
        ).check()
        assert result.completed == len(sites.originals[name]) and not result.failed
    expected = {**sites.originals["SMITH^ANNE"], **sites.originals["JONES^BOB"]}
    deadline = time.monotonic() + 20
    while len(set(sites.orthanc_a.instances()) - before) < len(expected):
        assert time.monotonic() < deadline, "ORTHANC_A did not receive the images"
        time.sleep(0.2)
    by_uid = {}
    for orthanc_id in set(sites.orthanc_a.instances()) - before:
        ds = pydicom.dcmread(io.BytesIO(sites.orthanc_a.instance_file(orthanc_id)))
        by_uid[str(ds.SOPInstanceUID)] = ds
    assert set(by_uid) == set(expected)  # same SOP Instance UIDs, and nothing of Brown's
    for name, b_id, a_id in (("SMITH^ANNE", "B-900", "A-100"), ("JONES^BOB", "B-555", "COLL")):
        for uid, digest in sites.originals[name].items():
            ds = by_uid[uid]
            assert hashlib.sha256(ds.PixelData).hexdigest() == digest
            assert (ds.PatientID, ds.IssuerOfPatientID, str(ds.PatientName)) == (a_id, "HOSP-A", name)
            assert (ds.OtherPatientIDsSequence[-1].PatientID, ds.OtherPatientIDsSequence[-1].IssuerOfPatientID) == (
                b_id,
                "HOSP-B",
            )
    # What the radiologist at A sees: one patient per person, with A's and B's studies together.
    patients = {p["MainDicomTags"]["PatientID"]: p for p in sites.orthanc_a.get_json("/patients?expand")}
    assert set(patients) == {"A-100", "COLL"}
    for a_id, name in (("A-100", "SMITH^ANNE"), ("COLL", "JONES^BOB")):
        studies = {
            sites.orthanc_a.get_json(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]
            for study in patients[a_id]["Studies"]
        }
        assert studies == {sites.own[name], sites.studies[name]}
    assert sites.studies["BROWN^CARL"] not in {
        s["MainDicomTags"]["StudyInstanceUID"] for s in sites.orthanc_a.get_json("/studies?expand")
    }


def test_getscu_by_our_id_gets_the_images_relabelled(sites: Sites, tmp_path: Path) -> None:
    result = dcmtk.getscu(
        HOST, sites.router_a, "PACS_B", "WS_A", tmp_path, {"PatientID": "A-100"}, "PATIENT", "patient"
    )
    result.check()
    originals = sites.originals["SMITH^ANNE"]
    assert result.completed == len(originals) and len(result.received) == len(originals)
    assert fingerprints(result.received) == originals  # same SOP Instance UIDs, same Pixel Data
    for path in result.received:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (ds.PatientID, ds.IssuerOfPatientID, ds.OtherPatientIDsSequence[-1].PatientID) == (
            "A-100",
            "HOSP-A",
            "B-900",
        )


def test_a_deflated_push_is_relabelled_at_the_receiving_site(sites: Sites, tmp_path: Path) -> None:
    """storescu at A pushes A-200 (no issuer) to B in Deflated Explicit VR LE: router A stamps HOSP-A,
    router B maps it to B's own B-200 from B's table."""
    (path,) = write_series(
        generate_ct_series(1, rows=64, cols=64, patient_id="A-200", patient_name="GREEN^DORA", seed=9), tmp_path
    )
    ((uid, digest),) = fingerprints([path]).items()
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"  # pydicom deflates it when saving
    ds.save_as(path, enforce_file_format=True)
    dcmtk.storescu(HOST, sites.router_a, "PACS_B", "WS_A", [path]).check()
    orthanc_id = sites.orthanc_b.find_sop(uid)
    assert orthanc_id is not None, "the push did not reach ORTHANC_B"
    stored = pydicom.dcmread(io.BytesIO(sites.orthanc_b.instance_file(orthanc_id)))
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"  # it crossed deflated
    assert hashlib.sha256(stored.PixelData).hexdigest() == digest
    assert (stored.PatientID, stored.IssuerOfPatientID) == ("B-200", "HOSP-B")
    other = stored.OtherPatientIDsSequence[-1]
    assert (other.PatientID, other.IssuerOfPatientID) == ("A-200", "HOSP-A")
    stamped = [r for r in audit_records(sites, "hospital-a") if r.get("identity_outcome") == "stamped"]
    assert any(r.get("sop_instance_uid") == uid for r in stamped)


def test_both_identifiers_audited_at_the_routers_and_none_at_the_bridge(sites: Sites) -> None:
    mapped = [r for r in audit_records(sites, "hospital-a") if r.get("identity_outcome") == "mapped"]
    pairs = {(r["original_patient_id"], r["patient_id"]) for r in mapped}
    assert {("A-100", "B-900"), ("B-900", "A-100"), ("B-555", "COLL")} <= pairs
    stamped = [r for r in audit_records(sites, "hospital-b") if r.get("identity_outcome") == "stamped"]
    assert stamped and all(r["issuer"] == "HOSP-B" for r in stamped)
    bridge_log = sites.net.log("bridge")
    for b_id, a_id in PEOPLE.values():
        assert b_id not in bridge_log and (a_id is None or a_id not in bridge_log)
