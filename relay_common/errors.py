"""One root for the relay's own errors, and the fixed vocabulary of reasons.

h11 and h2 give callers one exception root and branch on types and attributes,
never on message text. So do we: a metric label, an audit outcome or a log
level comes from `Reason` and `security`, set where the decision is made. The
human-readable `detail` is for the local log only; rewording it changes nothing
else.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why the relay (not the called device) refused, rejected or aborted something.

    The values are metric labels and audit fields: add members, never rename them.
    """

    # refusals and rejections decided before the association runs
    UNKNOWN_CALLED_AE = "unknown_called_ae"  # no remote device under that title on this router
    ROUTER_LIMIT = "router_limit"  # this router's association limit
    BRIDGE_UNREACHABLE = "bridge_unreachable"  # no link to the bridge, or it closed the stream
    UNKNOWN_IDENTITY = "unknown_identity"  # no identity key known for the destination site
    UNKNOWN_DEVICE = "unknown_device"  # the destination has no such shared device
    NOT_PERMITTED = "not_permitted"  # not shared with the calling site
    SITE_OFFLINE = "site_offline"
    TIMEOUT = "timeout"
    OVERLOADED = "overloaded"  # the destination's or the bridge's limit
    DEVICE_UNREACHABLE = "device_unreachable"  # the destination router cannot connect to its device
    DEVICE_REJECTED = "device_rejected"  # the called device itself answered A-ASSOCIATE-RJ
    SERVICE_NOT_GRANTED = "service_not_granted"  # no requested service is granted to the calling site
    SECURITY = "security"  # authentication, integrity or replay failure (also sets `security`)
    UNKNOWN_CALLING_AE = "unknown_calling_ae"  # the LAN allow-list ([[local]]) does not know the caller
    INBOUND_LIMIT = "inbound_limit"  # this router's cap on associations from other sites (total or per site)
    REQUEST_TOO_LARGE = "request_too_large"  # an A-ASSOCIATE-RQ above [dicom] max_request_bytes
    PEER_UNAPPROVED = "peer_unapproved"  # the peer site's key is not approved here (relay_router.approvals)
    # failures while running
    PROTOCOL = "protocol"  # a peer broke the DICOM Upper Layer protocol
    LINK_LOST = "link_lost"  # the stream to the bridge broke
    PEER_ABORTED = "peer_aborted"  # the remote side aborted
    IDLE = "idle"  # idle timeout
    SPILL = "spill"  # a spilled data set could not be stored or fetched
    SHUTDOWN = "shutdown"
    OTHER = "other"


# The bridge's `Refused.Reason` names map onto the same vocabulary (relay.proto).
REFUSED_REASON_NAMES: dict[str, Reason] = {
    "UNKNOWN_DEVICE": Reason.UNKNOWN_DEVICE,
    "NOT_PERMITTED": Reason.NOT_PERMITTED,
    "SITE_OFFLINE": Reason.SITE_OFFLINE,
    "DEVICE_UNREACHABLE": Reason.DEVICE_UNREACHABLE,
    "TIMEOUT": Reason.TIMEOUT,
    "OVERLOADED": Reason.OVERLOADED,
    "SERVICE_NOT_GRANTED": Reason.SERVICE_NOT_GRANTED,
    "DRAINING": Reason.SHUTDOWN,
}


class RelayError(Exception):
    """An error of the router's or the bridge's own making or detection.

    `reason` is the fixed label; `security` marks an attack or a broken guarantee
    (tampering, replay, an unexpected identity), which is logged at ERROR with a
    `security_alert` field and audited as an alert.
    """

    reason: Reason = Reason.OTHER
    security: bool = False

    def __init__(
        self,
        detail: str,
        *,
        reason: Reason | None = None,
        security: bool | None = None,
        remote_detail: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        # What the other router may be told (Close.detail crosses the bridge): a fixed text when
        # `detail` may hold what a hostile bridge must not learn (an errno, a store's answer).
        self.remote_detail = remote_detail
        if reason is not None:
            self.reason = reason
        if security is not None:
            self.security = security
        if self.security and reason is None and type(self).reason is Reason.OTHER:
            self.reason = Reason.SECURITY


class SecurityError(RelayError):
    """Authentication, integrity, ordering or replay failed: the peer or the bridge may be hostile."""

    reason = Reason.SECURITY
    security = True
