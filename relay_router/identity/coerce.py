"""Coercion of patient identifiers at a router (issue 14, item 3 and 4): pure decisions, no I/O.

Seen from one router, an identity route joins this site's domain (``local``, the
``[identity]`` section) and one partner's domain (``partner_issuer`` of the route). Three
moves, each a pure function of the identity elements of one data set (and, where a mapping
is needed, of the :class:`~relay_router.identity.model.Lookup` the resolver gave):

* :func:`coerce_request`: a C-FIND, C-MOVE or C-GET identifier leaving for the partner. Our
  Patient ID becomes the partner's. Without a mapping the query is answered "no match" here
  (or, with ``unmapped_query = "remote-ids"``, sent on as the partner's identifier).
* :func:`coerce_incoming`: a data set coming back (C-FIND response, C-STORE of a retrieval or
  a push). The partner's ID becomes ours with our issuer, the partner's original is kept in
  Other Patient IDs Sequence (0010,1002); without a mapping nothing is relabelled, and the
  partner's issuer is written where it was missing, so nobody mistakes it for one of ours.
* :func:`stamp_outgoing`: a data set leaving this site gets our issuer when it has none; a
  different issuer already there is kept and reported as a conflict, never overwritten.

The result is a :class:`Coercion`: the elements to write or delete (``edits``, applied by
:mod:`relay_router.identity.stream`, which copies every other element byte for byte) and
what happened, for the audit trail. SOP Instance UIDs are never touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from relay_router.identity.model import IdentityError, Lookup, LookupOutcome, PatientRef

__all__ = [
    "IDENTITY_TAGS",
    "Coercion",
    "Domain",
    "Outcome",
    "RouteIdentity",
    "UnmappedQuery",
    "coerce_incoming",
    "coerce_request",
    "incoming_ref",
    "request_ref",
    "stamp_outgoing",
]

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
ISSUER = 0x00100021
QUALIFIERS = 0x00100024  # Issuer of Patient ID Qualifiers Sequence
BIRTH_DATE = 0x00100030
SEX = 0x00100040
OTHER_IDS = 0x00101002  # Other Patient IDs Sequence
IDENTITY_TAGS = frozenset({PATIENT_NAME, PATIENT_ID, ISSUER, QUALIFIERS, BIRTH_DATE, SEX, OTHER_IDS})
"""The only elements coercion ever writes; every other element passes byte for byte."""

_WILDCARDS = ("*", "?", "\\")  # PS3.4 C.2.2.2.4 wildcard matching; a backslash is a value list


class UnmappedQuery(StrEnum):
    """What a query for a patient without a mapping does (``[identity] unmapped_query``)."""

    NO_MATCH = "no-match"  # answered here: no match, nothing reaches the partner
    REMOTE_IDS = "remote-ids"  # sent on as the partner's identifier; answers keep the partner's issuer


@dataclass(frozen=True)
class Domain:
    """A patient identifier domain: Issuer of Patient ID and, optionally, its universal entity ID."""

    issuer: str
    universal_id: str = ""
    universal_id_type: str = ""


@dataclass(frozen=True)
class RouteIdentity:
    """Identity settings of one route: our domain, the partner's issuer (from our config, never the bridge)."""

    local: Domain
    partner_issuer: str
    unmapped_query: UnmappedQuery = UnmappedQuery.NO_MATCH
    take_demographics: bool = False


class Outcome(StrEnum):
    """What coercion did with one data set (the audit record's ``identity_outcome``)."""

    UNCHANGED = "unchanged"  # nothing to do: no Patient ID, a wildcard, or already in the right domain
    MAPPED = "mapped"  # an identifier replaced by the other domain's
    REFUSED = "refused"  # a query answered "no match" at this router
    REMOTE_IDS = "remote_ids"  # an unmapped query sent on as the partner's identifier
    UNMAPPED = "unmapped"  # no mapping: the partner's ID and issuer kept
    UNAVAILABLE = "unavailable"  # no mapping source answered: nothing relabelled
    STAMPED = "stamped"  # our issuer added to a data set leaving this site
    CONFLICT = "conflict"  # an issuer that is neither ours nor the partner's: kept, not overwritten


@dataclass(frozen=True)
class Coercion:
    """The edits for one data set (tag -> new element, None = delete) and what they mean."""

    outcome: Outcome
    edits: Mapping[int, DataElement | None] = field(default_factory=dict)
    original: PatientRef | None = None  # the identifier the data set carried
    result: PatientRef | None = None  # the identifier it carries now (when changed)
    source: str = ""  # the mapping source that answered
    detail: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.edits)


def _text(ds: Dataset, tag: int) -> str:
    element = ds.get(tag)
    if element is None or element.value is None:
        return ""
    if isinstance(element.value, MultiValue | list):  # several values: kept as the list DICOM sends
        return "\\".join(str(v) for v in element.value).strip()
    return str(element.value).strip()


def _qualifiers(ds: Dataset) -> tuple[str, str]:
    element = ds.get(QUALIFIERS)
    if element is None or element.VR != "SQ" or not element.value:
        return "", ""
    item = element.value[0]
    return str(item.get("UniversalEntityID", "") or "").strip(), str(
        item.get("UniversalEntityIDType", "") or ""
    ).strip()


def _element(tag: int, vr: str, value: object) -> DataElement:
    return DataElement(tag, vr, value)


def _qualifiers_element(universal_id: str, universal_id_type: str) -> DataElement:
    item = Dataset()
    item.UniversalEntityID = universal_id
    item.UniversalEntityIDType = universal_id_type or "ISO"
    return _element(QUALIFIERS, "SQ", Sequence([item]))


def _invalid(patient_id: str, issuer: str, universal_id: str, universal_type: str) -> Coercion | None:
    """A Coercion refusing an identifier that is not a valid LO value (a hostile peer's), else None."""
    try:
        PatientRef(patient_id, issuer, universal_id, universal_type)
    except IdentityError as exc:
        return Coercion(Outcome.CONFLICT, detail=f"unusable identifier ({exc}): kept as it is")
    return None


def _is_pattern(patient_id: str) -> bool:
    return not patient_id or any(c in patient_id for c in _WILDCARDS)


# -- requests leaving for the partner -------------------------------------------------------------


def request_ref(identifier: Dataset, route: RouteIdentity) -> PatientRef | Coercion:
    """The identifier to look up for an outgoing query, or the final Coercion when none is needed.

    No Patient ID, an empty one or "*": nothing to map (the answers are relabelled one by one).
    Another wildcard or a list of IDs cannot be mapped: refused (or, with ``remote-ids``, sent
    as the partner's). Issuer already the partner's: the user asked in the partner's domain.
    An issuer that is neither ours nor the partner's cannot be mapped: a conflict.
    """
    patient_id = _text(identifier, PATIENT_ID)
    if patient_id in ("", "*"):
        return Coercion(Outcome.UNCHANGED, detail="no Patient ID constraint in the query")
    if _is_pattern(patient_id):  # a pattern of our IDs cannot be mapped; it could match other people there
        if route.unmapped_query is UnmappedQuery.REMOTE_IDS:
            return Coercion(Outcome.REMOTE_IDS, detail="a Patient ID pattern, sent as the partner's")
        return Coercion(Outcome.REFUSED, detail="a Patient ID pattern cannot be mapped: answered no match")
    issuer = _text(identifier, ISSUER)
    universal_id, universal_type = _qualifiers(identifier)
    if (bad := _invalid(patient_id, issuer, universal_id, universal_type)) is not None:
        return bad
    given = PatientRef(patient_id, issuer or route.local.issuer, universal_id, universal_type)
    if issuer == route.partner_issuer and issuer != route.local.issuer:
        return Coercion(Outcome.UNCHANGED, original=given, detail="the query is already in the partner's domain")
    if issuer and issuer != route.local.issuer:
        return Coercion(
            Outcome.CONFLICT,
            edits={},
            original=given,
            detail=f"Issuer of Patient ID {issuer!r} is neither ours ({route.local.issuer!r}) nor the partner's",
        )
    return PatientRef(patient_id, route.local.issuer, route.local.universal_id, route.local.universal_id_type)


def coerce_request(identifier: Dataset, route: RouteIdentity, ref: PatientRef, lookup: Lookup) -> Coercion:
    """Our Patient ID in a C-FIND/C-MOVE/C-GET identifier becomes the partner's (or the query is refused).

    The issuer keys of the query become return keys (empty): the partner's archive matches
    on its own Patient IDs, whether or not it stores its issuer.
    """
    if lookup.outcome is LookupOutcome.MAPPED and lookup.ref is not None and lookup.ref.id:
        edits: dict[int, DataElement | None] = {PATIENT_ID: _element(PATIENT_ID, "LO", lookup.ref.id)}
        if ISSUER in identifier:
            edits[ISSUER] = _element(ISSUER, "LO", "")
        if QUALIFIERS in identifier:
            edits[QUALIFIERS] = _element(QUALIFIERS, "SQ", Sequence())
        return Coercion(Outcome.MAPPED, edits, original=ref, result=lookup.ref, source=lookup.source)
    why = "no mapping source answered" if lookup.outcome is LookupOutcome.UNAVAILABLE else "no mapping"
    if route.unmapped_query is UnmappedQuery.REMOTE_IDS:
        # Sent on as the partner's ID, under the partner's issuer; answers are then relabelled only if mapped.
        edits = {ISSUER: _element(ISSUER, "LO", "")} if ISSUER in identifier else {}
        remote = PatientRef(ref.id, route.partner_issuer)
        return Coercion(Outcome.REMOTE_IDS, edits, original=ref, result=remote, source=lookup.source, detail=why)
    return Coercion(Outcome.REFUSED, original=ref, source=lookup.source, detail=f"{why}: answered no match")


# -- data coming back from the partner --------------------------------------------------------------


def incoming_ref(ds: Dataset, route: RouteIdentity) -> PatientRef | Coercion:
    """The partner's identifier to look up for a data set coming back, or the final Coercion.

    A data set without an issuer is taken as the partner's (its router adds it; ours is the
    configured partner, never what the bridge says). Our own issuer: nothing to relabel. Any
    other issuer is a conflict: kept as it is.
    """
    patient_id = _text(ds, PATIENT_ID)
    if not patient_id:
        return Coercion(Outcome.UNCHANGED, detail="no Patient ID")
    issuer = _text(ds, ISSUER)
    universal_id, universal_type = _qualifiers(ds)
    if (bad := _invalid(patient_id, issuer, universal_id, universal_type)) is not None:
        return bad
    if issuer == route.local.issuer and issuer != route.partner_issuer:
        return Coercion(Outcome.UNCHANGED, original=PatientRef(patient_id, issuer), detail="already in our domain")
    if issuer and issuer != route.partner_issuer:
        return Coercion(
            Outcome.CONFLICT,
            original=PatientRef(patient_id, issuer, universal_id, universal_type),
            detail=f"Issuer of Patient ID {issuer!r} is neither the partner's ({route.partner_issuer!r}) nor ours",
        )
    return PatientRef(patient_id, route.partner_issuer, universal_id, universal_type)


def coerce_incoming(ds: Dataset, route: RouteIdentity, ref: PatientRef, lookup: Lookup) -> Coercion:
    """Relabel a data set coming back with our identifier, or mark it clearly as the partner's."""
    if lookup.outcome is not LookupOutcome.MAPPED or lookup.ref is None or not lookup.ref.id:
        outcome = Outcome.UNAVAILABLE if lookup.outcome is LookupOutcome.UNAVAILABLE else Outcome.UNMAPPED
        edits: dict[int, DataElement | None] = {}
        if not _text(ds, ISSUER):  # never a guessed local ID; the partner's issuer says whose ID it is
            edits[ISSUER] = _element(ISSUER, "LO", route.partner_issuer)
        return Coercion(outcome, edits, original=ref, source=lookup.source, detail="kept the partner's identifier")
    local = route.local
    edits = {
        PATIENT_ID: _element(PATIENT_ID, "LO", lookup.ref.id),
        ISSUER: _element(ISSUER, "LO", local.issuer),
        QUALIFIERS: _qualifiers_element(local.universal_id, local.universal_id_type) if local.universal_id else None,
        OTHER_IDS: _element(OTHER_IDS, "SQ", _other_ids_with(ds, ref)),
    }
    if QUALIFIERS not in ds and edits[QUALIFIERS] is None:
        del edits[QUALIFIERS]
    demographics = lookup.demographics
    if route.take_demographics and demographics is not None:
        if demographics.name:
            edits[PATIENT_NAME] = _element(PATIENT_NAME, "PN", demographics.name)
        if demographics.birth_date:
            edits[BIRTH_DATE] = _element(BIRTH_DATE, "DA", demographics.birth_date)
        if demographics.sex:
            edits[SEX] = _element(SEX, "CS", demographics.sex)
    result = PatientRef(lookup.ref.id, local.issuer, local.universal_id, local.universal_id_type)
    return Coercion(Outcome.MAPPED, edits, original=ref, result=result, source=lookup.source)


def _other_ids_with(ds: Dataset, ref: PatientRef) -> Sequence:
    """Other Patient IDs Sequence with the partner's original appended (once)."""
    items: list[Dataset] = []
    existing = ds.get(OTHER_IDS)
    if existing is not None and existing.VR == "SQ" and existing.value:
        items = list(existing.value)
    for item in items:
        if str(item.get("PatientID", "")) == ref.id and str(item.get("IssuerOfPatientID", "")) == ref.issuer:
            return Sequence(items)
    item = Dataset()
    item.PatientID = ref.id
    item.IssuerOfPatientID = ref.issuer
    if ref.universal_id:
        item.IssuerOfPatientIDQualifiersSequence = _qualifiers_element(ref.universal_id, ref.universal_id_type).value
    item.TypeOfPatientID = "TEXT"
    return Sequence([*items, item])


# -- data leaving this site ---------------------------------------------------------------------------


def stamp_outgoing(ds: Dataset, route: RouteIdentity) -> Coercion:
    """A data set leaving this site carries our issuer: added when missing, a different one kept (conflict)."""
    patient_id = _text(ds, PATIENT_ID)
    if not patient_id:
        return Coercion(Outcome.UNCHANGED, detail="no Patient ID")
    issuer = _text(ds, ISSUER)
    local = route.local
    if (bad := _invalid(patient_id, issuer, "", "")) is not None:
        return bad
    if issuer == local.issuer:
        return Coercion(Outcome.UNCHANGED, original=PatientRef(patient_id, issuer))
    if issuer:
        return Coercion(
            Outcome.CONFLICT,
            original=PatientRef(patient_id, issuer),
            detail=f"leaving with Issuer of Patient ID {issuer!r}, not ours ({local.issuer!r}): kept",
        )
    edits: dict[int, DataElement | None] = {ISSUER: _element(ISSUER, "LO", local.issuer)}
    if local.universal_id and QUALIFIERS not in ds:
        edits[QUALIFIERS] = _qualifiers_element(local.universal_id, local.universal_id_type)
    stamped = PatientRef(patient_id, local.issuer, local.universal_id, local.universal_id_type)
    return Coercion(Outcome.STAMPED, edits, original=PatientRef(patient_id, ""), result=stamped)
