"""The bridge's admission decisions, as pure functions: who may sign on, open, join and publish what.

No I/O here: the callers (relay_bridge.control, relay_bridge.splice) read the
directory and the session table, pass what they found, and turn the answer into
a gRPC answer, an audit event, a metric and a log line. Every refusal is typed
(`SignOnFailure`, `Rejection`), so those four never depend on the wording of a
message; the wording itself is what routers have always been shown.
"""

from __future__ import annotations

import re
from collections.abc import Container, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.directory import AccountProblem, Device, IdentityProblem, identity_changed_detail
from relay_common.errors import Reason, RelayError
from relay_common.validate import (
    AE_TITLE_RULE,
    DESCRIPTION_RULE,
    SITE_NAME_RULE,
    is_ae_title,
    is_description,
    is_share_target,
    is_site_name,
)


def shown(value: str, limit: int = 40) -> str:
    """A router-supplied value for a message, log line or audit field: quoted with control characters
    escaped (repr), and cut to `limit` characters so a huge value cannot make a huge line."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


ASSOCIATION_ID = re.compile(r"^[0-9a-f]{32}\Z")
SIGN_KEY_BYTES = 32  # Ed25519 public key

# -- sign-on -------------------------------------------------------------------------------


class SignOnFailure(StrEnum):
    """Why a sign-on was refused; the value is the metric label (add members, never rename)."""

    CERTIFICATE = "certificate"
    THROTTLED = "throttled"
    DISABLED = "disabled"
    CREDENTIALS = "credentials"
    NO_IDENTITY = "no_identity"
    IDENTITY_CHANGED = "identity_changed"
    INVALID_DEVICES = "invalid_devices"
    OTHER = "other"

    @property
    def alert(self) -> bool:
        """Audited as a security alert: password guessing, or a router whose keys are not the recorded ones."""
        return self in (SignOnFailure.THROTTLED, SignOnFailure.NO_IDENTITY, SignOnFailure.IDENTITY_CHANGED)


class SignOnRefused(RelayError):
    """A refused sign-on (or enrollment); `detail` is exactly the text the router is sent."""

    reason = Reason.NOT_PERMITTED

    def __init__(self, failure: SignOnFailure, detail: str) -> None:
        super().__init__(detail, security=failure.alert)
        self.failure = failure

    @property
    def audit_outcome(self) -> str:
        return "alert" if self.security else "failure"


THROTTLED = "too many failed sign-on attempts; try again later"
CREDENTIALS = "wrong account name or password"
DISABLED = "account disabled"
NO_IDENTITY = "sign-on carries no identity keys (upgrade the router)"


def throttled() -> SignOnRefused:
    return SignOnRefused(SignOnFailure.THROTTLED, THROTTLED)


def account_refusal(problem: AccountProblem) -> SignOnRefused:
    """Do not tell a stranger whether the account exists: unknown accounts read as a wrong password."""
    if problem is AccountProblem.DISABLED:
        return SignOnRefused(SignOnFailure.DISABLED, DISABLED)
    return SignOnRefused(SignOnFailure.CREDENTIALS, CREDENTIALS)


def certificate_problem(common_names: Sequence[bytes], account: str | None) -> str | None:
    """With mutual TLS: the peer must present a certificate, for this account when one is named."""
    if not common_names:
        return "a client certificate is required: enroll this router (relay-router enroll)"
    if account is not None and common_names[0].decode() != account:
        return f"the client certificate belongs to {common_names[0].decode()!r}, not {account!r}"
    return None


def has_identity_keys(identity: pb.Identity) -> bool:
    return len(identity.sign_key) == SIGN_KEY_BYTES and bool(identity.kem_key)


def identity_refusal(account: str, problem: IdentityProblem) -> SignOnRefused:
    if problem is IdentityProblem.CHANGED:
        return SignOnRefused(SignOnFailure.IDENTITY_CHANGED, identity_changed_detail(account))
    return SignOnRefused(SignOnFailure.OTHER, str(problem))


class Published(Protocol):
    """A published device as the bridge checks it (a protobuf `SharedDevice` has these, read-only)."""

    @property
    def ae_title(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def share_with(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class DirectoryLimits:
    """What one router may publish: everything it publishes is stored and sent to other routers."""

    max_devices: int = 200
    max_share_with: int = 64


def check_devices(devices: Sequence[Published], limits: DirectoryLimits = DirectoryLimits()) -> str | None:
    """Why a router's published devices are refused (None if they are fine).

    Every field is checked before it is stored, logged or shown: AE titles by the
    DICOM rules, descriptions printable and bounded, `share_with` entries site
    names or "*", and the counts bounded (one router must not be able to fill
    everyone's directory).
    """
    if len(devices) > limits.max_devices:
        return (
            f"{len(devices)} devices published; the limit is {limits.max_devices} per router (max_devices_per_router)"
        )
    seen = set()
    for d in devices:
        if not is_ae_title(d.ae_title):
            return f"invalid AE title {shown(d.ae_title)} ({AE_TITLE_RULE})"
        if d.ae_title in seen:
            return f"AE title {d.ae_title!r} is published twice"
        seen.add(d.ae_title)
        if not is_description(d.description):
            return f"invalid description of {d.ae_title!r} ({DESCRIPTION_RULE})"
        if len(d.share_with) > limits.max_share_with:
            return (
                f"{d.ae_title!r} is shared with {len(d.share_with)} entries; the limit is {limits.max_share_with}"
                ' (max_share_with; use "*" for every site)'
            )
        for target in d.share_with:
            if not is_share_target(target):
                entry = shown(target, 70)
                return f'{d.ae_title!r}: invalid share_with entry {entry} (a site name: {SITE_NAME_RULE}; or "*")'
    return None


def devices_refusal(devices: Sequence[Published], limits: DirectoryLimits = DirectoryLimits()) -> SignOnRefused | None:
    problem = check_devices(devices, limits)
    return None if problem is None else SignOnRefused(SignOnFailure.INVALID_DEVICES, problem)


# -- associations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejection:
    """Refuse an Open: `code` goes to the router (relay.v1 Refused.Reason), `reason` to audit and logs."""

    code: pb.Refused.Reason
    reason: Reason
    detail: str
    # An attempt to reach a device that is not shared with the caller: audited, and its owner told.
    access_refused: bool = False


@dataclass(frozen=True)
class Limits:
    max_associations: int
    # Associations a router initiated; the ones towards it have their own cap, so peers holding
    # associations to a site can never take the slots its own devices need to call out.
    max_associations_per_router: int
    max_inbound_per_router: int = 500


def valid_association_id(association_id: str, in_use: Container[str]) -> bool:
    return bool(ASSOCIATION_ID.match(association_id)) and association_id not in in_use


def invalid_open(*, to_site: str, called_ae_title: str, calling_ae_title: str) -> Rejection | None:
    """The router-supplied fields of an Open, checked before anything is looked up, logged or audited."""
    for what, value, valid, rule in (
        ("to_site", to_site, is_site_name, SITE_NAME_RULE),
        ("called AE title", called_ae_title, is_ae_title, AE_TITLE_RULE),
        ("calling AE title", calling_ae_title, is_ae_title, AE_TITLE_RULE),
    ):
        if not valid(value):
            return Rejection(
                pb.Refused.NOT_PERMITTED,
                Reason.PROTOCOL,
                f"invalid {what} {shown(value)} ({rule})",
            )
    return None


def admit_open(
    *,
    caller: str,
    to_site: str,
    called_ae_title: str,
    device: Device | None,
    destination_online: bool,
    active: int,
    caller_active: int,
    limits: Limits,
    destination_inbound: int = 0,
) -> Rejection | None:
    """Whether `caller` may open an association to `to_site`'s device; None admits it.

    The order is the one routers have always seen: an unknown device, then one
    not shared with the caller, then an offline site, then the limits.
    `caller_active` counts the associations the caller initiated (max_associations_per_router),
    `destination_inbound` those towards the destination (max_inbound_per_router).
    """
    if device is None:
        return Rejection(
            pb.Refused.UNKNOWN_DEVICE, Reason.UNKNOWN_DEVICE, f"no device {called_ae_title!r} at site {to_site!r}"
        )
    if not device.shared_with(caller):
        return Rejection(
            pb.Refused.NOT_PERMITTED,
            Reason.NOT_PERMITTED,
            f"{to_site}/{called_ae_title} is not shared with {caller}",
            access_refused=True,
        )
    if not destination_online:
        return Rejection(pb.Refused.SITE_OFFLINE, Reason.SITE_OFFLINE, f"site {to_site!r} is offline")
    if active >= limits.max_associations or caller_active >= limits.max_associations_per_router:
        return Rejection(pb.Refused.OVERLOADED, Reason.OVERLOADED, "the bridge's association limit is reached")
    if destination_inbound >= limits.max_inbound_per_router:
        return Rejection(
            pb.Refused.OVERLOADED,
            Reason.OVERLOADED,
            f"site {to_site!r} has reached the bridge's limit of associations towards it (max_inbound_per_router)",
        )
    return None


def over_cluster_limit(router: str, direction: str) -> Rejection:
    """A router's association limit is reached counting every replica (relay_bridge.db.shared_limits)."""
    if direction == "out":
        detail = f"router {router!r} has reached its limit of associations (max_associations_per_router"
    else:
        detail = f"site {router!r} has reached the limit of associations towards it (max_inbound_per_router"
    detail += ", counted over all replicas)"
    return Rejection(pb.Refused.OVERLOADED, Reason.OVERLOADED, detail)


def destination_overloaded(to_site: str) -> Rejection:
    """The destination's control queue is full: it cannot be told about the association."""
    return Rejection(pb.Refused.OVERLOADED, Reason.OVERLOADED, f"site {to_site!r} is overloaded")


def draining() -> Rejection:
    """The bridge is stopping (SIGTERM): transient, so the caller's device gets A-ASSOCIATE-RJ transient."""
    # Its own code (not OVERLOADED): the router retries it for a moment instead of refusing its device.
    return Rejection(pb.Refused.DRAINING, Reason.SHUTDOWN, "the bridge is restarting; try again in a moment")


def join_timed_out(to_site: str) -> Rejection:
    return Rejection(pb.Refused.TIMEOUT, Reason.TIMEOUT, f"site {to_site!r} did not answer in time")


def admit_join(*, caller: str, to_site: str | None, already_joined: bool) -> bool:
    """Only the destination router may join, and only once; `to_site` None: no such association waits."""
    return to_site is not None and to_site == caller and not already_joined
