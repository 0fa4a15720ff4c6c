"""Patient identity values: an identifier in a domain, demographics, the outcome of a lookup.

A Patient ID (0010,0020) means nothing without its domain, the Issuer of Patient ID
(0010,0021) and optionally the Universal Entity ID of the Issuer of Patient ID Qualifiers
Sequence (0010,0024). Every value is checked when it is built: a reference reaches the
audit trail, SQLite and HL7/FHIR queries, and may come from a hostile peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# PS3.3 C.24.2 (Universal Entity ID Type); "" when none is given.
UNIVERSAL_ID_TYPES = frozenset({"", "DNS", "EUI64", "ISO", "URI", "UUID", "X400", "X500"})
LO_MAX = 64  # Patient ID and Issuer of Patient ID are LO (PS3.5 6.2)


class IdentityError(ValueError):
    """A patient identifier, issuer or demographic value that is not acceptable (names the field)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _check_lo(value: str, field: str, *, required: bool) -> None:
    if not isinstance(value, str):
        raise IdentityError(field, f"must be text, not {type(value).__name__}")
    if required and not value.strip():
        raise IdentityError(field, "is empty")
    if len(value) > LO_MAX:
        raise IdentityError(field, f"is {len(value)} characters long (at most {LO_MAX})")
    if "\\" in value:
        raise IdentityError(field, "contains a backslash (a DICOM value separator)")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise IdentityError(field, "contains a control character")
    if value != value.strip(" "):
        raise IdentityError(field, "has leading or trailing spaces")


@dataclass(frozen=True)
class PatientRef:
    """An identifier in a domain."""

    id: str  # Patient ID (0010,0020)
    issuer: str  # Issuer of Patient ID (0010,0021)
    universal_id: str = ""  # Issuer of Patient ID Qualifiers Sequence > Universal Entity ID (an OID), optional
    universal_id_type: str = ""  # e.g. "ISO"

    def __post_init__(self) -> None:
        _check_lo(self.id, "patient id", required=True)
        _check_lo(self.issuer, "issuer", required=False)
        _check_lo(self.universal_id, "universal id", required=False)
        if self.universal_id_type not in UNIVERSAL_ID_TYPES:
            raise IdentityError("universal id type", f"{self.universal_id_type!r} is not one of PS3.3 C.24.2")

    def __str__(self) -> str:  # for logs and the audit trail: "12345^^^HOSP_A"
        return f"{self.id}^^^{self.issuer}"


@dataclass(frozen=True)
class Demographics:
    """What a mapping source may know of the patient in the wanted domain (taken only when configured)."""

    name: str | None = None  # Patient's Name (PN), "FAMILY^GIVEN"
    birth_date: str | None = None  # DA, YYYYMMDD
    sex: str | None = None  # M, F, O

    def __post_init__(self) -> None:
        if self.name is not None and (
            len(self.name) > 320 or "\\" in self.name or any(ord(c) < 0x20 for c in self.name)
        ):
            raise IdentityError("patient name", "too long, or contains a backslash or a control character")
        if self.birth_date is not None and not (len(self.birth_date) == 8 and self.birth_date.isdigit()):
            raise IdentityError("birth date", f"{self.birth_date!r} is not YYYYMMDD")
        if self.sex is not None and self.sex not in ("M", "F", "O"):
            raise IdentityError("sex", f"{self.sex!r} is not M, F or O")


class LookupOutcome(StrEnum):
    MAPPED = "mapped"  # a source knows the patient in the target domain
    UNMAPPED = "unmapped"  # the sources that answered do not know the patient there
    UNAVAILABLE = "unavailable"  # no source answered (down, slow, broken answer)


@dataclass(frozen=True)
class Lookup:
    outcome: LookupOutcome
    ref: PatientRef | None  # the identifier in the target domain when MAPPED, else None
    source: str  # the name of the source that answered ("" when none did)
    demographics: Demographics | None = None
