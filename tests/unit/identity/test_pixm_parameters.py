"""PIXm (ITI-83) answers: Parameters resources read with fhir.resources."""

from __future__ import annotations

import json

import pytest

from relay_router.identity.config import DomainSection
from relay_router.identity.model import Demographics, LookupOutcome, PatientRef
from relay_router.identity.pixm import demographics_of, patient_id_of, read_parameters, system_of
from relay_router.identity.resolver import SourceUnavailable

PARTNER = DomainSection("HOSP_B", fhir_system="urn:oid:1.2.9")


def body(*identifiers: tuple[str, str]) -> bytes:
    parameter = [
        {"name": "targetIdentifier", "valueIdentifier": {"system": system, "value": value}}
        for system, value in identifiers
    ]
    parameter.append({"name": "targetId", "valueReference": {"reference": "Patient/9"}})
    return json.dumps({"resourceType": "Parameters", "parameter": parameter}).encode()


def read(raw: bytes) -> object:
    return read_parameters(raw, target=PARTNER, target_system="urn:oid:1.2.9", source_name="pixm")


def test_the_identifier_in_the_target_system_is_mapped() -> None:
    result = read(body(("urn:oid:1.2.3", "A-1"), ("urn:oid:1.2.9", "B-9")))
    assert (result.outcome, result.ref) == (LookupOutcome.MAPPED, PatientRef("B-9", "HOSP_B"))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "raw",
    [body(), body(("urn:oid:1.2.3", "A-1")), body(("urn:oid:1.2.9", "B-9"), ("urn:oid:1.2.9", "B-8"))],
    ids=["empty", "other-system", "ambiguous"],
)
def test_no_single_identifier_is_unmapped(raw: bytes) -> None:
    assert read(raw).outcome is LookupOutcome.UNMAPPED  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "raw",
    [b"<html>", b'{"resourceType": "Patient"}', body(("urn:oid:1.2.9", "B\\9"))],
    ids=["not-json", "not-parameters", "bad-identifier"],
)
def test_unusable_bodies_make_the_source_unavailable(raw: bytes) -> None:
    with pytest.raises(SourceUnavailable) as caught:
        read(raw)
    assert caught.value.reason == "invalid-answer"


def test_systems_come_from_the_oid_or_the_domain_table() -> None:
    assert system_of("HOSP_A", DomainSection("HOSP_A", universal_id="1.2.3")) == "urn:oid:1.2.3"
    assert system_of("X", DomainSection("X"), PatientRef("1", "X", "1.2.7", "ISO")) == "urn:oid:1.2.7"
    with pytest.raises(SourceUnavailable, match="fhir_system") as caught:
        system_of("HOSP_C", DomainSection("HOSP_C"))
    assert caught.value.reason == "unknown-domain"


def parameters(*references: str) -> object:
    from fhir.resources.R4B.parameters import Parameters

    parameter = [{"name": "targetId", "valueReference": {"reference": r}} for r in references]
    return Parameters.model_validate({"resourceType": "Parameters", "parameter": parameter})


def test_only_references_into_the_configured_server_are_followed() -> None:
    base = "https://mpi.local/fhir"
    assert patient_id_of(parameters("Patient/A-100"), base) == "A-100"
    assert patient_id_of(parameters("https://mpi.local/fhir/Patient/7/_history/2"), base) == "7"
    assert patient_id_of(parameters("https://elsewhere.example/fhir/Patient/7"), base) is None
    assert patient_id_of(parameters("Patient/../../admin"), base) is None
    assert patient_id_of(parameters("Patient/.."), base) is None
    assert patient_id_of(parameters("Patient/1", "Patient/2"), base) is None  # two records: none
    assert patient_id_of(parameters(), base) is None


def test_demographics_in_dicom_form() -> None:
    def patient(**fields: object) -> bytes:
        return json.dumps({"resourceType": "Patient", **fields}).encode()

    full = patient(name=[{"family": "Doe", "given": ["John", "Q", "R"]}], birthDate="1970-01-02", gender="male")
    assert demographics_of(full) == Demographics("Doe^John^Q R", "19700102", "M")
    assert demographics_of(patient(birthDate="1970", gender="unknown")) == Demographics(None, None, None)
    assert demographics_of(patient(name=[{"family": "Do^e"}])) == Demographics(None, None, None)
    assert demographics_of(b"not json") is None
