"""Service grants at association time: decide, log and audit (issue 18).

The decision itself is pure (relay_router.services.decide_contexts); this module
applies it to one association and records it, so that the outbound path (the
caller's router, from the directory) and the inbound path (the owner's router, from
its own configuration) log and audit it the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from relay_common.audit import AuditLog
from relay_router.outcome import Outcome
from relay_router.services import ContextDecision, decide_contexts, group_of
from relay_router.tunnel import DirectoryEntry
from relay_router.ul import AssociateInfo, RejectResult, RejectSource
from relay_router.ul.contexts import role_selections

log = logging.getLogger("relay_router")

# A-ASSOCIATE-RJ when no requested context is granted: rejected-permanent, service-user, no-reason-given
# (PS3.8 Table 9-21). Not "called AE not recognised": the device exists and is shared with the caller.
REJECT_SERVICE_NOT_GRANTED = (RejectResult.PERMANENT, RejectSource.SERVICE_USER, 1)


def check_services(request_pdu: bytes, request: AssociateInfo, granted: tuple[str, ...]) -> ContextDecision:
    """Which of the RQ's presentation contexts the `granted` service groups allow."""
    return decide_contexts(request.presentation_contexts, role_selections(request_pdu), granted)


def record_decision(
    audit: AuditLog,
    outcome: Outcome,
    decision: ContextDecision,
    granted: tuple[str, ...],
    *,
    where: str,
    extra: dict[str, str],
) -> None:
    """Log and audit the contexts refused for lack of a grant (nothing when none was).

    `where` says which check refused: "caller" (our own device asked for a remote
    service the directory says we were not granted) or "owner" (a remote site asked
    for a service on our device that our configuration does not grant it)."""
    if not decision.refused:
        return
    syntaxes = decision.refused_syntaxes
    summary = ", ".join(f"{uid} ({group_of(uid)})" for uid in syntaxes)
    whole = "association rejected" if decision.nothing_allowed else f"{len(decision.allowed)} context(s) kept"
    log.warning(
        "%s -> %s: services not granted to %s (granted: %s): refused %s; %s",
        outcome.calling_ae or "?",
        outcome.called_ae or "?",
        outcome.site,
        ", ".join(granted) or "none",
        summary,
        whole,
        extra=extra,
    )
    audit.event(
        "services_refused",
        "failure",
        association=outcome.association_id,
        direction=outcome.direction,
        check=where,
        site=outcome.site,
        calling_ae=outcome.calling_ae,
        called_ae=outcome.called_ae,
        granted=list(granted),
        refused_contexts=[pc.id for pc in decision.refused],
        refused_abstract_syntaxes=list(syntaxes),
        refused_groups=sorted({group_of(uid) for uid in syntaxes}),
        association_rejected=decision.nothing_allowed,
    )


def granted_remote(directory: Iterable[DirectoryEntry], site: str, ae_title: str) -> tuple[str, ...] | None:
    """The service groups the directory says `site` granted us on `ae_title`.

    None when the directory does not say (the device is not listed, or its owner predates
    service groups): the caller's router then leaves the check to the owner's router."""
    for entry in directory:
        if entry.site == site and entry.ae_title == ae_title:
            return entry.services or None
    return None
