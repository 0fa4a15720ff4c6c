"""Service groups: which DICOM services a site may use on a shared device (issue 18).

A PACS administrator shares services, not SOP Class UIDs, so each group names a
fixed set of SOP classes from PS3.4. The sets come from pynetdicom's SOP class
registry (`pynetdicom.sop_class`), so that a new storage SOP class arrives with the
library rather than with a hand-copied list. Pure data and functions: the router's
config, routing and the Upper Layer filter (relay_router.ul.contexts) read them.

Groups:

- ``verification``: Verification (PS3.4 Annex A).
- ``query``: C-FIND in the patient-root, study-root and patient/study-only
  Query/Retrieve information models (PS3.4 Annex C).
- ``retrieve``: C-MOVE and C-GET of the Query/Retrieve models (PS3.4 Annex C, Z).
  A C-GET's storage sub-operations arrive on storage contexts for which the caller
  asks the SCP role (PS3.7 D.3.3.4); those are granted with ``retrieve`` (the caller
  only receives), see relay_router.ul.contexts.
- ``storage``: every storage SOP class in pynetdicom's registry, plus the retired and trial
  ones pydicom's UID dictionary still names (PS3.4 Annex B).
- ``commitment``: Storage Commitment Push Model (PS3.4 Annex J).
- ``worklist``: Modality Worklist Information Model - FIND (PS3.4 Annex K).
- ``mpps``: Modality Performed Procedure Step and its retrieve and notification
  SOP classes (PS3.4 Annex F).
- ``other``: any SOP class not in the groups above (private classes included). Off
  unless named, so that sharing a device never opens a service nobody thought of.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from pydicom.uid import UID_dictionary
from pynetdicom import sop_class as _registry

from protos.relay.v1 import relay_pb2 as pb
from relay_router.ul.associate import PresentationContext
from relay_router.ul.contexts import RoleSelection

if TYPE_CHECKING:
    from relay_router.config import SharedDevice

VERIFICATION = "verification"
QUERY = "query"
RETRIEVE = "retrieve"
STORAGE = "storage"
COMMITMENT = "commitment"
WORKLIST = "worklist"
MPPS = "mpps"
OTHER = "other"

GROUPS: tuple[str, ...] = (VERIFICATION, QUERY, RETRIEVE, STORAGE, COMMITMENT, WORKLIST, MPPS, OTHER)
"""Every service group name, in the order they are shown."""

DEFAULT_GROUPS: frozenset[str] = frozenset(GROUPS) - {OTHER}
"""What a `[[shared]]` entry grants when it says nothing: every standard service, as before issue 18."""

# The Query/Retrieve models the `query` group opens (PS3.4 C.6.1-C.6.3).
_QR_MODELS = ("PatientRoot", "StudyRoot", "PatientStudyOnly")


def _uids(table: Mapping[str, str]) -> frozenset[str]:
    return frozenset(str(uid) for uid in table.values())


def _qr(suffix: str) -> frozenset[str]:
    # _QR_CLASSES: name -> UID, e.g. "StudyRootQueryRetrieveInformationModelFind".
    return frozenset(str(uid) for name, uid in _registry._QR_CLASSES.items() if name.endswith(suffix))


def _pydicom_storage() -> frozenset[str]:
    """Storage SOP classes pydicom's UID dictionary names that pynetdicom's registry leaves out
    (retired and trial ones, e.g. Standalone Curve Storage): still storage to an administrator."""
    return frozenset(
        uid
        for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class"
        and "Storage" in name
        and not name.startswith(("Storage Commitment", "Media Storage Directory"))
    )


def _query() -> frozenset[str]:
    return frozenset(
        str(uid) for name, uid in _registry._QR_CLASSES.items() if name.endswith("Find") and name.startswith(_QR_MODELS)
    )


_MEMBERS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        VERIFICATION: _uids(_registry._VERIFICATION_CLASSES),
        QUERY: _query(),
        RETRIEVE: _qr("Move") | _qr("Get"),
        STORAGE: _uids(_registry._STORAGE_CLASSES) | _pydicom_storage(),
        COMMITMENT: _uids(_registry._STORAGE_COMMITMENT_CLASSES),
        WORKLIST: _uids(_registry._BASIC_WORKLIST_CLASSES),
        MPPS: _uids(_registry._PROCEDURE_STEP_CLASSES),
    }
)

_GROUP_OF: Mapping[str, str] = MappingProxyType({uid: group for group, uids in _MEMBERS.items() for uid in uids})


def members(group: str) -> frozenset[str]:
    """The SOP Class UIDs of a named group (``other`` has none: it is whatever is left)."""
    if group not in GROUPS:
        raise ValueError(f"{group!r} is not a service group (one of {', '.join(GROUPS)})")
    return _MEMBERS.get(group, frozenset())


def group_of(abstract_syntax: str) -> str:
    """The group an abstract syntax (SOP Class UID) belongs to; ``other`` if none."""
    return _GROUP_OF.get(abstract_syntax, OTHER)


def is_storage(abstract_syntax: str) -> bool:
    return _GROUP_OF.get(abstract_syntax) == STORAGE


def granted(abstract_syntax: str, groups: Iterable[str]) -> bool:
    """Whether a context for `abstract_syntax` may be negotiated by a site granted `groups`."""
    return group_of(abstract_syntax) in set(groups)


def check_groups(names: Iterable[str]) -> list[str]:
    """The names that are not service groups (empty when all are)."""
    return [n for n in names if n not in GROUPS]


def ordered(groups: Iterable[str]) -> tuple[str, ...]:
    """Groups in the canonical order (for display, the directory and comparisons); unknown names dropped
    (a directory's list is input from the bridge: a name we do not know grants nothing here)."""
    chosen = set(groups)
    return tuple(g for g in GROUPS if g in chosen)


@dataclass(frozen=True)
class ContextDecision:
    """Which presentation contexts of an A-ASSOCIATE-RQ a site may negotiate, and which not."""

    allowed: tuple[PresentationContext, ...]
    refused: tuple[PresentationContext, ...]
    receive_only: frozenset[int] = frozenset()
    """Allowed IDs that hold only if the acceptor confirms the requestor as SCP only (C-GET storage)."""

    @property
    def refused_ids(self) -> frozenset[int]:
        return frozenset(pc.id for pc in self.refused)

    @property
    def refused_syntaxes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(pc.abstract_syntax or "" for pc in self.refused))

    @property
    def nothing_allowed(self) -> bool:
        return not self.allowed


def decide_contexts(
    contexts: Sequence[PresentationContext], roles: Sequence[RoleSelection], groups: Iterable[str]
) -> ContextDecision:
    """Split an RQ's presentation contexts into those `groups` grant and the others.

    A storage context is also granted with ``retrieve`` when the requestor proposes only
    the SCP role for its SOP class (PS3.7 D.3.3.4): that is how a C-GET SCU receives the
    instances it retrieves, and it cannot store anything through it.
    """
    chosen = frozenset(groups)
    receive_only = {r.sop_class for r in roles if r.requestor_only_scp}
    allowed, refused, conditional = [], [], set()
    for pc in contexts:
        syntax = pc.abstract_syntax or ""
        if group_of(syntax) in chosen:
            allowed.append(pc)
        elif RETRIEVE in chosen and is_storage(syntax) and syntax in receive_only:
            allowed.append(pc)
            conditional.add(pc.id)
        else:
            refused.append(pc)
    return ContextDecision(tuple(allowed), tuple(refused), frozenset(conditional))


def service_grants(device: SharedDevice) -> list[pb.ServiceGrant]:
    """What a router publishes for one shared device: site "*" for the device's default groups
    (every site in share_with without a grant), then each `[[shared.grant]]`."""
    grants = [pb.ServiceGrant(site="*", services=ordered(device.services))]
    grants += [pb.ServiceGrant(site=g.site, services=ordered(g.services)) for g in device.grant]
    return grants
