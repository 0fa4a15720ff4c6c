"""Every DICOM audit message the relay builds validates against the PS3.15 A.5.1 schema."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from lxml import etree

from relay_common import dicom_audit as da

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).parents[2] / "fixtures" / "audit" / "dicom-audit-message.rng")))
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def valid(message: ET.Element) -> etree._Element:
    document = etree.fromstring(da.to_bytes(message))
    assert SCHEMA.validate(document), SCHEMA.error_log
    return document


def test_the_schema_rejects_a_message_without_participants() -> None:
    message = ET.Element("AuditMessage")
    ident = ET.SubElement(
        message, "EventIdentification", {"EventDateTime": "2026-01-01T00:00:00Z", "EventOutcomeIndicator": "0"}
    )
    ET.SubElement(ident, "EventID", {"csd-code": "110100", "codeSystemName": "DCM", "originalText": "x"})
    ET.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": "x"})
    assert not SCHEMA.validate(etree.fromstring(da.to_bytes(message)))


def test_instances_transferred_names_study_patient_and_sop_classes() -> None:
    study = da.StudyRecord("1.2.3.4", "PAT-7", "HOSP-A", {CT: 3, MR: 1})
    message = da.instances_transferred(
        source_id="hospital-a",
        source=da.Participant("STORESCU", True, ae_titles=("STORESCU",), network_access_point="127.0.0.1"),
        destination=da.Participant("PACS-B", ae_titles=("PACS-B",), network_access_point="archive.example"),
        studies=[study, da.StudyRecord("1.2.3.5", "PAT-7", "HOSP-A", {CT: 2})],
        others=[da.Participant("relay-router@hospital-a")],
        site="hospital-a",
    )
    doc = valid(message)
    assert doc.find("EventIdentification/EventID").get("csd-code") == "110104"
    studies = doc.findall("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']")
    assert [s.get("ParticipantObjectID") for s in studies] == ["1.2.3.4", "1.2.3.5"]
    counts = {c.get("UID"): c.get("NumberOfInstances") for c in studies[0].iter("SOPClass")}
    assert counts == {CT: "3", MR: "1"}
    patients = doc.findall("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert [p.get("ParticipantObjectID") for p in patients] == ["PAT-7^^^HOSP-A"]  # one patient, once
    roles = [p.find("RoleIDCode").get("csd-code") for p in doc.findall("ActiveParticipant")[:2]]
    assert roles == ["110153", "110152"]  # source, destination
    assert doc.find("ActiveParticipant").get("NetworkAccessPointTypeCode") == "2"


@pytest.mark.parametrize("begin", [True, False])
def test_begin_transferring_and_failure(begin: bool) -> None:
    doc = valid(
        da.instances_transferred(
            source_id="s",
            source=da.Participant("A"),
            destination=da.Participant("B"),
            studies=[da.StudyRecord("1.2")],
            begin=begin,
            outcome="failure",
            description="aborted: link lost",
        )
    )
    assert doc.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert doc.find("EventIdentification/EventOutcomeDescription").text == "aborted: link lost"


def test_every_other_builder_validates() -> None:
    app = da.Participant("relay-bridge@bridge")
    valid(da.application_activity(source_id="b", app=app, started=True, launcher=da.Participant("root")))
    valid(da.application_activity(source_id="b", app=app, started=False))
    valid(
        da.query(
            source_id="b",
            source=da.Participant("WS"),
            destination=da.Participant("PACS"),
            sop_class="1.2.840.10008.5.1.4.1.2.2.1",
            query_dataset=b"\x08\x00\x52\x00",
            transfer_syntax="1.2",
        )
    )
    valid(
        da.user_authentication(
            source_id="b",
            user=da.Participant("hospital-a", network_access_point="::1"),
            node=app,
            outcome="failure",
            description="wrong password",
        )
    )
    valid(da.security_alert(source_id="b", reporter=app, alert=da.ET_USE_OF_RESTRICTED_FUNCTION, subject="hospital-b"))


def test_hostile_text_stays_well_formed() -> None:
    """AE titles and details come from peers: markup is escaped, control characters replaced."""
    evil = "<x>&\x01\x1b[31m]]>"
    doc = valid(
        da.security_alert(
            source_id=evil,
            reporter=da.Participant(evil, ae_titles=(evil,)),
            alert=da.ET_NODE_AUTHENTICATION,
            subject=evil,
            description=evil,
        )
    )
    assert doc.find("AuditSourceIdentification").get("AuditSourceID") == "<x>&\ufffd\ufffd[31m]]>"


@pytest.mark.parametrize(
    "record",
    [
        {"event": "sign_on", "outcome": "success", "router": "hospital-a", "source": "127.0.0.1:5555"},
        {"event": "sign_on", "outcome": "alert", "router": "hospital-a", "detail": "too many failures"},
        {"event": "enroll", "outcome": "success", "router": "hospital-a"},
        {"event": "router_add", "outcome": "success", "router": "hospital-c", "user": "root"},
        {"event": "router_disable", "outcome": "success", "router": "hospital-c"},
        {"event": "share_list", "outcome": "success"},
        {"event": "pin", "outcome": "success", "site": "hospital-b"},
        {"event": "identity_mismatch", "outcome": "alert", "site": "hospital-b"},
        {"event": "peer_unapproved", "outcome": "alert", "site": "hospital-x", "fingerprint": "ab" * 32},
        {"event": "peer_approve", "outcome": "success", "site": "hospital-b", "user": "root"},
        {"event": "peer_reject", "outcome": "failure", "site": "hospital-b", "detail": "neither approved"},
        {"event": "access_refused", "outcome": "alert", "router": "hospital-a"},
        {"event": "start", "outcome": "success"},
        {"event": "stop", "outcome": "success"},
        {
            "event": "association",
            "outcome": "success",
            "calling_ae": "WS",
            "called_ae": "PACS",
            "site": "b",
            "studies": [{"study_uid": "1.2.3", "patient_id": "P1", "sop_classes": {CT: 2}}],
        },
    ],
)
def test_records_map_to_valid_messages(record: dict[str, object]) -> None:
    (message,) = da.from_record({"app": "relay-router", **record}, source_id="hospital-a")
    valid(message)


def test_peer_events_name_their_event_type() -> None:
    """Approving or rejecting a peer is a security configuration change; a refused unapproved key is about
    node authentication."""
    for event, code in (("peer_approve", "110129"), ("peer_unapproved", "110126")):
        (message,) = da.from_record(
            {"app": "relay-router", "event": event, "outcome": "alert", "site": "b"}, source_id="a"
        )
        assert [c.get("csd-code") for c in message.iter("EventTypeCode")] == [code]


def test_plain_association_records_stay_json_only() -> None:
    assert da.from_record({"event": "association", "outcome": "success"}, source_id="x") == []
