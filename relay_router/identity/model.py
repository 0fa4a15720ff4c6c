"""The shared vocabulary of patient identity (issue 14): identifiers in a domain and lookup results."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Demographics", "Lookup", "LookupOutcome", "PatientRef"]


@dataclass(frozen=True)
class PatientRef:
    """An identifier in a domain."""

    id: str  # Patient ID (0010,0020)
    issuer: str  # Issuer of Patient ID (0010,0021)
    universal_id: str = ""  # Issuer of Patient ID Qualifiers Sequence > Universal Entity ID (an OID)
    universal_id_type: str = ""  # e.g. "ISO"


@dataclass(frozen=True)
class Demographics:
    name: str | None = None
    birth_date: str | None = None
    sex: str | None = None


class LookupOutcome(StrEnum):
    MAPPED = "mapped"
    UNMAPPED = "unmapped"
    UNAVAILABLE = "unavailable"  # no source answered


@dataclass(frozen=True)
class Lookup:
    outcome: LookupOutcome
    ref: PatientRef | None
    source: str
    demographics: Demographics | None = None
