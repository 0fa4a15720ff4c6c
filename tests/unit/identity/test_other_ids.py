"""The Other Patient IDs Sequence as a source, and the resolver never caching what it read there."""

from __future__ import annotations

from pydicom import Dataset

from relay_router.identity.model import LookupOutcome, PatientRef
from relay_router.identity.other_ids import OtherIdsSource, lookup_in_dataset, other_ids
from relay_router.identity.resolver import MemorySource, Resolver


def item(patient_id: str, issuer: str, oid: str = "") -> Dataset:
    ds = Dataset()
    ds.PatientID, ds.IssuerOfPatientID = patient_id, issuer
    if oid:
        qualifier = Dataset()
        qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = oid, "ISO"
        ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
    return ds


def dataset(patient_id: str = "B-9", issuer: str = "HOSP_B", *others: Dataset) -> Dataset:
    ds = Dataset()
    ds.PatientID, ds.IssuerOfPatientID = patient_id, issuer
    ds.OtherPatientIDsSequence = list(others)
    return ds


def test_reads_the_identifier_of_the_target_domain() -> None:
    ds = dataset("B-9", "HOSP_B", item("C-1", "HOSP_C"), item("A-1", "HOSP_A", "1.2.3"))
    result = lookup_in_dataset(ds, PatientRef("B-9", "HOSP_B"), "HOSP_A")
    assert result.outcome is LookupOutcome.MAPPED
    assert result.ref == PatientRef("A-1", "HOSP_A", "1.2.3", "ISO")


def test_only_for_the_data_sets_own_patient() -> None:
    ds = dataset("B-9", "HOSP_B", item("A-1", "HOSP_A"))
    assert lookup_in_dataset(ds, PatientRef("B-8", "HOSP_B"), "HOSP_A").outcome is LookupOutcome.UNMAPPED
    assert lookup_in_dataset(ds, PatientRef("B-9", "HOSP_X"), "HOSP_A").outcome is LookupOutcome.UNMAPPED


def test_two_identifiers_in_the_target_domain_are_not_a_mapping() -> None:
    ds = dataset("B-9", "HOSP_B", item("A-1", "HOSP_A"), item("A-2", "HOSP_A"))
    assert lookup_in_dataset(ds, PatientRef("B-9", "HOSP_B"), "HOSP_A").outcome is LookupOutcome.UNMAPPED


def test_invalid_items_are_skipped() -> None:
    ds = dataset("B-9", "HOSP_B", item("", "HOSP_A"), item("A-1\\X", "HOSP_A"), item("A-1", "HOSP_A"))
    assert other_ids(ds) == [PatientRef("A-1", "HOSP_A")]
    assert other_ids(Dataset()) == []


async def test_the_resolver_does_not_cache_answers_read_from_a_data_set() -> None:
    resolver = Resolver([MemorySource(), OtherIdsSource()])
    ref = PatientRef("B-9", "HOSP_B")
    first = await resolver.lookup(ref, "HOSP_A", dataset=dataset("B-9", "HOSP_B", item("A-1", "HOSP_A")))
    assert first.ref == PatientRef("A-1", "HOSP_A") and first.source == "other-ids"
    assert (await resolver.lookup(ref, "HOSP_A")).outcome is LookupOutcome.UNMAPPED  # a query: no data set
    second = await resolver.lookup(ref, "HOSP_A", dataset=dataset("B-9", "HOSP_B", item("A-2", "HOSP_A")))
    assert second.ref == PatientRef("A-2", "HOSP_A")  # read again, not the cached UNMAPPED nor A-1
