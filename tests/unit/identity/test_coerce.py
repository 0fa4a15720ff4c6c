"""Coercion decisions (relay_router.identity.coerce): each unmapped and conflicting case of issue 14 item 4."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from relay_router.identity.coerce import (
    ISSUER,
    PATIENT_ID,
    Domain,
    Outcome,
    RouteIdentity,
    UnmappedQuery,
    coerce_incoming,
    coerce_request,
    incoming_ref,
    request_ref,
    stamp_outgoing,
)
from relay_router.identity.model import Demographics, Lookup, LookupOutcome, PatientRef

ROUTE = RouteIdentity(Domain("HOSP-A"), "HOSP-B")
MAPPED_TO_B = Lookup(LookupOutcome.MAPPED, PatientRef("B-777", "HOSP-B"), "table")
UNMAPPED = Lookup(LookupOutcome.UNMAPPED, None, "table")
DOWN = Lookup(LookupOutcome.UNAVAILABLE, None, "")


def query(patient_id: str, issuer: str | None = None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    return ds


def test_a_query_by_our_id_goes_out_with_the_partners_id() -> None:
    ds = query("A-123", "")
    ref = request_ref(ds, ROUTE)
    assert ref == PatientRef("A-123", "HOSP-A")
    assert isinstance(ref, PatientRef)
    coercion = coerce_request(ds, ROUTE, ref, MAPPED_TO_B)
    assert coercion.outcome is Outcome.MAPPED
    assert coercion.edits[PATIENT_ID].value == "B-777"
    assert coercion.edits[ISSUER].value == ""  # a return key: the partner's archive matches on its own IDs
    assert coercion.original == ref and coercion.result == MAPPED_TO_B.ref


def test_an_unmapped_query_is_answered_no_match_whether_unmapped_or_sources_down() -> None:
    ds = query("A-404")
    ref = request_ref(ds, ROUTE)
    assert isinstance(ref, PatientRef)
    for lookup in (UNMAPPED, DOWN):
        coercion = coerce_request(ds, ROUTE, ref, lookup)
        assert coercion.outcome is Outcome.REFUSED and not coercion.edits


def test_remote_ids_sends_an_unmapped_query_on_under_the_partners_issuer() -> None:
    route = RouteIdentity(Domain("HOSP-A"), "HOSP-B", unmapped_query=UnmappedQuery.REMOTE_IDS)
    ds = query("B-1", "")
    ref = request_ref(ds, route)
    assert isinstance(ref, PatientRef)
    coercion = coerce_request(ds, route, ref, UNMAPPED)
    assert coercion.outcome is Outcome.REMOTE_IDS
    assert coercion.result == PatientRef("B-1", "HOSP-B")
    assert PATIENT_ID not in coercion.edits


def test_queries_that_need_no_mapping_or_cannot_have_one() -> None:
    for patient_id in ("", "*"):
        outcome = request_ref(query(patient_id), ROUTE)
        assert not isinstance(outcome, PatientRef) and outcome.outcome is Outcome.UNCHANGED
    remote_ids = RouteIdentity(Domain("HOSP-A"), "HOSP-B", unmapped_query=UnmappedQuery.REMOTE_IDS)
    for pattern in ("A*", "A?1", "A-1\\A-2"):
        refused = request_ref(query(pattern), ROUTE)  # a pattern of our IDs could match other people there
        assert not isinstance(refused, PatientRef) and refused.outcome is Outcome.REFUSED
        sent = request_ref(query(pattern), remote_ids)
        assert not isinstance(sent, PatientRef) and sent.outcome is Outcome.REMOTE_IDS and not sent.edits
    bad = request_ref(query("A-\x01"), ROUTE)  # a control character: not an LO value
    assert not isinstance(bad, PatientRef) and bad.outcome is Outcome.CONFLICT
    partners = request_ref(query("B-1", "HOSP-B"), ROUTE)
    assert not isinstance(partners, PatientRef) and partners.outcome is Outcome.UNCHANGED
    foreign = request_ref(query("X-1", "HOSP-C"), ROUTE)
    assert not isinstance(foreign, PatientRef) and foreign.outcome is Outcome.CONFLICT


def instance(patient_id: str, issuer: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "PARTNER^NAME"
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    return ds


def test_data_coming_back_is_relabelled_and_keeps_the_original() -> None:
    route = RouteIdentity(Domain("HOSP-A", "1.2.3", "ISO"), "HOSP-B", take_demographics=True)
    ds = instance("B-777")
    ref = incoming_ref(ds, route)
    assert ref == PatientRef("B-777", "HOSP-B")
    assert isinstance(ref, PatientRef)
    lookup = Lookup(LookupOutcome.MAPPED, PatientRef("A-123", "HOSP-A"), "table", Demographics("OUR^NAME", "19700101"))
    coercion = coerce_incoming(ds, route, ref, lookup)
    assert coercion.outcome is Outcome.MAPPED
    edits = {tag: element.value for tag, element in coercion.edits.items() if element is not None}
    assert edits[PATIENT_ID] == "A-123" and edits[ISSUER] == "HOSP-A"
    assert edits[0x00100010] == "OUR^NAME" and edits[0x00100030] == "19700101"
    assert edits[0x00100024][0].UniversalEntityID == "1.2.3"
    other = edits[0x00101002][0]
    assert (other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID) == ("B-777", "HOSP-B", "TEXT")


def test_demographics_are_taken_only_when_configured() -> None:
    ds = instance("B-777")
    ref = incoming_ref(ds, ROUTE)
    assert isinstance(ref, PatientRef)
    lookup = Lookup(LookupOutcome.MAPPED, PatientRef("A-123", "HOSP-A"), "table", Demographics("OUR^NAME"))
    assert 0x00100010 not in coerce_incoming(ds, ROUTE, ref, lookup).edits


def test_unmapped_data_keeps_the_partners_id_under_the_partners_issuer() -> None:
    for lookup, outcome in ((UNMAPPED, Outcome.UNMAPPED), (DOWN, Outcome.UNAVAILABLE)):
        ds = instance("B-9")
        ref = incoming_ref(ds, ROUTE)
        assert isinstance(ref, PatientRef)
        coercion = coerce_incoming(ds, ROUTE, ref, lookup)
        assert coercion.outcome is outcome
        assert set(coercion.edits) == {ISSUER} and coercion.edits[ISSUER].value == "HOSP-B"  # never a guessed ID


def test_data_with_a_foreign_or_our_own_issuer_is_not_relabelled() -> None:
    foreign = incoming_ref(instance("X-1", "HOSP-C"), ROUTE)
    assert not isinstance(foreign, PatientRef) and foreign.outcome is Outcome.CONFLICT and not foreign.edits
    ours = incoming_ref(instance("A-1", "HOSP-A"), ROUTE)
    assert not isinstance(ours, PatientRef) and ours.outcome is Outcome.UNCHANGED


def test_data_leaving_gets_our_issuer_but_a_different_one_is_kept() -> None:
    stamped = stamp_outgoing(instance("A-1"), ROUTE)
    assert stamped.outcome is Outcome.STAMPED and stamped.edits[ISSUER].value == "HOSP-A"
    conflict = stamp_outgoing(instance("A-1", "HOSP-Z"), ROUTE)
    assert conflict.outcome is Outcome.CONFLICT and not conflict.edits
    assert stamp_outgoing(instance("A-1", "HOSP-A"), ROUTE).outcome is Outcome.UNCHANGED


HOSTILE_TEXT = st.text(max_size=80)  # control characters, backslashes, anything a peer may send


@given(patient_id=HOSTILE_TEXT, issuer=st.one_of(st.none(), HOSTILE_TEXT), mapped=st.booleans())
@settings(max_examples=300, deadline=None)
def test_hostile_identifiers_never_raise_and_are_never_guessed(
    patient_id: str, issuer: str | None, mapped: bool
) -> None:
    """Whatever a peer puts in Patient ID and Issuer: no exception, and the ID is the original or the mapped one."""
    ds = Dataset()
    ds.add_new(0x00100020, "LO", patient_id)
    if issuer is not None:
        ds.add_new(0x00100021, "LO", issuer)
    lookup = Lookup(LookupOutcome.MAPPED, PatientRef("A-123", "HOSP-A"), "t") if mapped else UNMAPPED
    for coercion in (
        stamp_outgoing(ds, ROUTE),
        *(
            [coerce_incoming(ds, ROUTE, ref, lookup)]
            if isinstance(ref := incoming_ref(ds, ROUTE), PatientRef)
            else [ref]
        ),
    ):
        new_id = coercion.edits.get(PATIENT_ID)
        assert new_id is None or new_id.value == "A-123"
        if new_id is not None:
            assert coercion.outcome is Outcome.MAPPED
        issuer_edit = coercion.edits.get(ISSUER)
        if issuer_edit is not None and issuer and issuer.strip():  # spaces alone are an empty LO value
            assert issuer_edit.value == "HOSP-A" and coercion.outcome is Outcome.MAPPED  # never overwritten else
