"""The Other Patient IDs Sequence (0010,1002) of a data set as a mapping source (kind = "other-ids").

A data set may already say who its patient is in other domains: each item of the sequence
holds a Patient ID, its Issuer of Patient ID and optionally the Issuer of Patient ID
Qualifiers Sequence. This source reads it; it answers only for the data set at hand (the
resolver never caches it) and only when the data set's own Patient ID is the one asked about.
It believes what the sender wrote, so configure it after the hospital's own sources, and only
for partners whose data sets you trust to carry your identifiers (docs/patient-identity.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relay_router.identity.model import IdentityError, Lookup, LookupOutcome, PatientRef

if TYPE_CHECKING:
    from pydicom import Dataset

MAX_ITEMS = 64  # items read from one sequence


def _text(item: Any, keyword: str) -> str:
    value = item.get(keyword, "") if hasattr(item, "get") else ""
    if not isinstance(value, str):  # absent, undecoded bytes, or multi-valued (a MultiValue): unusable
        return ""
    return value.strip(" ")


def _ref_of(item: Any) -> PatientRef | None:
    """The identifier an item (or a data set) carries, None when it has none or an invalid one."""
    universal_id = universal_id_type = ""
    qualifiers = item.get("IssuerOfPatientIDQualifiersSequence", None) if hasattr(item, "get") else None
    if qualifiers:
        universal_id = _text(qualifiers[0], "UniversalEntityID")
        universal_id_type = _text(qualifiers[0], "UniversalEntityIDType")
    try:
        return PatientRef(_text(item, "PatientID"), _text(item, "IssuerOfPatientID"), universal_id, universal_id_type)
    except IdentityError:
        return None


def other_ids(dataset: Dataset) -> list[PatientRef]:
    """The valid identifiers of the data set's Other Patient IDs Sequence (at most MAX_ITEMS items read)."""
    try:
        items = dataset.get("OtherPatientIDsSequence", None) or []
        found = []
        for item in list(items)[:MAX_ITEMS]:
            ref = _ref_of(item)
            if ref is not None:
                found.append(ref)
        return found
    except (TypeError, ValueError, AttributeError, KeyError):  # a malformed sequence: as if absent
        return []


def lookup_in_dataset(dataset: Dataset, ref: PatientRef, target: str, *, source_name: str = "other-ids") -> Lookup:
    """`ref`'s identifier in domain `target` according to the data set's Other Patient IDs Sequence."""
    own_id = _text(dataset, "PatientID")
    own_issuer = _text(dataset, "IssuerOfPatientID")
    if own_id != ref.id or (own_issuer and own_issuer != ref.issuer):  # the sequence describes another patient
        return Lookup(LookupOutcome.UNMAPPED, None, source_name)
    found = {PatientRef(r.id, r.issuer, r.universal_id, r.universal_id_type) for r in other_ids(dataset)}
    in_target = {r for r in found if r.issuer == target}
    if len(in_target) == 1:
        return Lookup(LookupOutcome.MAPPED, in_target.pop(), source_name)
    return Lookup(LookupOutcome.UNMAPPED, None, source_name)  # none, or several: never a guess


class OtherIdsSource:
    per_dataset = True  # the resolver does not cache what it reads

    def __init__(self, *, name: str = "other-ids", timeout_s: float = 1.0) -> None:
        self.name = name
        self.timeout_s = timeout_s

    async def lookup(self, ref: PatientRef, target: str, *, dataset: Dataset | None = None) -> Lookup:
        if dataset is None:  # a query: no data set to read
            return Lookup(LookupOutcome.UNMAPPED, None, self.name)
        return lookup_in_dataset(dataset, ref, target, source_name=self.name)
