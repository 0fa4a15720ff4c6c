"""Merges and cross-reference changes become PS3.15 Patient Record messages; lookups stay JSON-only."""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from relay_common import dicom_audit as da

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).parents[2] / "fixtures" / "audit" / "dicom-audit-message.rng")))


def messages(record: dict[str, object]) -> list[etree._Element]:
    documents = [
        etree.fromstring(da.to_bytes(m)) for m in da.from_record({"app": "relay-router", **record}, source_id="a")
    ]
    for document in documents:
        assert SCHEMA.validate(document), SCHEMA.error_log
    return documents


def test_a_merge_is_a_patient_record_update_naming_both_records() -> None:
    (doc,) = messages(
        {"event": "identity_merge", "outcome": "success", "source": "10.0.0.5:4000", "prior_id": "OLD",
         "patient_id": "NEW", "issuer": "HOSP_A", "links_moved": 1}
    )  # fmt: skip
    event = doc.find("EventIdentification")
    assert (event.get("EventActionCode"), event.find("EventID").get("csd-code")) == ("U", "110110")
    objects = {o.get("ParticipantObjectID"): o for o in doc.findall("ParticipantObjectIdentification")}
    assert set(objects) == {"NEW^^^HOSP_A", "OLD^^^HOSP_A"}
    assert objects["OLD^^^HOSP_A"].get("ParticipantObjectDataLifeCycle") == "14"
    assert objects["NEW^^^HOSP_A"].get("ParticipantObjectDataLifeCycle") == "3"


def test_a_table_change_names_both_identifiers_and_the_user() -> None:
    (doc,) = messages(
        {"event": "pix_add", "outcome": "success", "user": "root", "patient_id": "A-1", "issuer": "HOSP_A",
         "other_id": "B-9", "other_issuer": "HOSP_B"}
    )  # fmt: skip
    ids = {o.get("ParticipantObjectID") for o in doc.findall("ParticipantObjectIdentification")}
    assert ids == {"A-1^^^HOSP_A", "B-9^^^HOSP_B"}
    assert "root" in {p.get("UserID") for p in doc.findall("ActiveParticipant")}


def test_lookups_and_failed_merges_without_ids_stay_json_only() -> None:
    assert messages({"event": "identity_lookup", "outcome": "success", "patient_id": "A-1"}) == []
    assert messages({"event": "identity_merge", "outcome": "failure", "detail": "no MRG"}) == []
