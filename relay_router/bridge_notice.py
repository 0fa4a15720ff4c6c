"""Audit notices from the bridge (`AuditNotice`), checked before they reach this router's audit trail.

The bridge is not trusted: its `event` becomes the audit record's event and the
syslog message id, its other fields land in the audit file and the log. So only
events of a fixed set are recorded, and every field is validated (site names,
AE titles) or escaped and bounded (the detail); anything else is dropped with
one bounded, escaped WARNING.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from protos.relay.v1 import relay_pb2 as pb
from relay_common.validate import is_ae_title, is_site_name, printable

log = logging.getLogger(__name__)

# The events the bridge may report (relay_bridge/splice.py sends "access_refused").
KNOWN_EVENTS = frozenset({"access_refused"})
DETAIL_MAX = 256  # characters of the bridge's detail kept in the audit record
LOGGED_MAX = 64  # characters of a dropped field shown in the warning


@dataclass(frozen=True)
class CheckedNotice:
    event: str
    peer_site: str
    ae_title: str
    detail: str


def check_notice(notice: pb.AuditNotice) -> CheckedNotice | None:
    """The notice with its fields checked, or None (after a WARNING) if it must not be recorded."""
    problem = None
    if notice.event not in KNOWN_EVENTS:
        problem = f"unknown event '{printable(notice.event, LOGGED_MAX)}'"
    elif notice.peer_site and not is_site_name(notice.peer_site):
        problem = f"invalid peer site '{printable(notice.peer_site, LOGGED_MAX)}'"
    elif notice.ae_title and not is_ae_title(notice.ae_title):
        problem = f"invalid AE title '{printable(notice.ae_title, LOGGED_MAX)}'"
    if problem is not None:
        log.warning("dropped an audit notice from the bridge: %s", problem)
        return None
    return CheckedNotice(notice.event, notice.peer_site, notice.ae_title, printable(notice.detail, DETAIL_MAX))
