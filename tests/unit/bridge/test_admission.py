"""relay_bridge.admission: who may open, join and publish what, decided without a server."""

from __future__ import annotations

import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import admission
from relay_bridge.admission import Limits, SignOnFailure, admit_join, admit_open, check_devices
from relay_bridge.directory import AccountProblem, Device, IdentityProblem
from relay_common.errors import Reason

PACS = Device("site-b", "PACS", "archive", ("site-a",))
LIMITS = Limits(max_associations=10, max_associations_per_router=3)


def open_from(caller: str = "site-a", **changes: object) -> pb.Refused.Reason | None:
    args: dict[str, object] = {
        "caller": caller,
        "to_site": "site-b",
        "called_ae_title": "PACS",
        "device": PACS,
        "destination_online": True,
        "active": 0,
        "caller_active": 0,
        "limits": LIMITS,
    }
    args.update(changes)
    rejection = admit_open(**args)  # type: ignore[arg-type]
    return None if rejection is None else rejection.code


def test_a_shared_device_of_an_online_site_is_admitted() -> None:
    assert open_from() is None
    assert (
        admit_open(
            caller="site-x",
            to_site="site-b",
            called_ae_title="PACS",
            device=Device("site-b", "PACS", "", ("*",)),
            destination_online=True,
            active=9,
            caller_active=2,
            limits=LIMITS,
        )
        is None
    )


def test_unknown_device() -> None:
    rejection = admit_open(
        caller="site-a", to_site="site-b", called_ae_title="NOPE", device=None, destination_online=True,
        active=0, caller_active=0, limits=LIMITS,
    )  # fmt: skip
    assert rejection is not None
    assert (rejection.code, rejection.reason) == (pb.Refused.UNKNOWN_DEVICE, Reason.UNKNOWN_DEVICE)
    assert rejection.detail == "no device 'NOPE' at site 'site-b'" and not rejection.access_refused


def test_not_shared_is_an_access_refusal() -> None:
    rejection = admit_open(
        caller="site-c", to_site="site-b", called_ae_title="PACS", device=PACS, destination_online=True,
        active=0, caller_active=0, limits=LIMITS,
    )  # fmt: skip
    assert rejection is not None and rejection.code == pb.Refused.NOT_PERMITTED and rejection.access_refused
    assert rejection.detail == "site-b/PACS is not shared with site-c"


def test_a_site_cannot_call_its_own_device_through_the_bridge() -> None:
    assert open_from("site-b", device=Device("site-b", "PACS", "", ("*",))) == pb.Refused.NOT_PERMITTED


def test_offline_site() -> None:
    assert open_from(destination_online=False) == pb.Refused.SITE_OFFLINE


@pytest.mark.parametrize(("active", "caller_active"), [(10, 0), (11, 0), (0, 3), (5, 4)])
def test_limits(active: int, caller_active: int) -> None:
    assert open_from(active=active, caller_active=caller_active) == pb.Refused.OVERLOADED


def test_associations_towards_a_router_have_their_own_cap() -> None:
    """A peer holding associations to site-b uses the inbound cap, never site-b's own outbound slots."""
    limits = Limits(max_associations=100, max_associations_per_router=3, max_inbound_per_router=5)
    assert open_from(caller_active=2, destination_inbound=4, limits=limits) is None
    # site-b towards which 5 are held (by peers) still opens its own (its initiated count is what counts)
    station = Device("site-a", "WS", "", ("site-b",))
    assert open_from("site-b", to_site="site-a", device=station, caller_active=0, limits=limits) is None
    rejection = admit_open(
        caller="site-a", to_site="site-b", called_ae_title="PACS", device=PACS, destination_online=True,
        active=5, caller_active=0, destination_inbound=5, limits=limits,
    )  # fmt: skip
    assert rejection is not None and (rejection.code, rejection.reason) == (pb.Refused.OVERLOADED, Reason.OVERLOADED)
    assert rejection.detail == (
        "site 'site-b' has reached the bridge's limit of associations towards it (max_inbound_per_router)"
    )


def test_order_of_the_checks() -> None:
    """Routers have always seen the first of: unknown, not shared, offline, overloaded."""
    assert open_from(device=None, destination_online=False, active=99) == pb.Refused.UNKNOWN_DEVICE
    assert open_from("site-c", destination_online=False, active=99) == pb.Refused.NOT_PERMITTED
    assert open_from(destination_online=False, active=99) == pb.Refused.SITE_OFFLINE


def test_timeouts_and_a_full_control_queue() -> None:
    assert admission.join_timed_out("site-b").detail == "site 'site-b' did not answer in time"
    assert admission.join_timed_out("site-b").code == pb.Refused.TIMEOUT
    assert admission.destination_overloaded("site-b").code == pb.Refused.OVERLOADED


@pytest.mark.parametrize(
    ("aid", "ok"), [("a" * 32, True), ("A" * 32, False), ("a" * 31, False), ("a" * 32 + "\n", False), ("b" * 32, False)]
)
def test_association_ids(aid: str, ok: bool) -> None:
    assert admission.valid_association_id(aid, {"b" * 32}) is ok


def test_join_only_by_the_destination_and_once() -> None:
    assert admit_join(caller="site-b", to_site="site-b", already_joined=False)
    assert not admit_join(caller="site-a", to_site="site-b", already_joined=False)
    assert not admit_join(caller="site-b", to_site="site-b", already_joined=True)
    assert not admit_join(caller="site-b", to_site=None, already_joined=False)


# -- sign-on -----------------------------------------------------------------------------------


def shared(*titles: str) -> list[pb.SharedDevice]:
    return [pb.SharedDevice(ae_title=t, share_with=["*"]) for t in titles]


def test_valid_devices_pass() -> None:
    assert check_devices(shared("PACS", "CT_1", "A" * 16, "MR 2")) is None
    assert check_devices([]) is None


@pytest.mark.parametrize("title", ["A" * 17, "PACS\\2", "", " PACS", "PACS ", "PA\nCS", "PA\x00CS", "PACS\n"])
def test_invalid_ae_title_is_named(title: str) -> None:
    assert check_devices(shared("OK", title)) == (
        f"invalid AE title {title!r} (1-16 characters, no backslash or control characters)"
    )
    refusal = admission.devices_refusal(shared("OK", title))
    assert refusal is not None and refusal.failure is SignOnFailure.INVALID_DEVICES


def test_duplicate_ae_title_is_named() -> None:
    assert check_devices(shared("PACS", "CT", "PACS")) == "AE title 'PACS' is published twice"


def test_unknown_accounts_read_as_wrong_passwords() -> None:
    for problem in (AccountProblem.UNKNOWN_ACCOUNT, AccountProblem.WRONG_PASSWORD):
        refusal = admission.account_refusal(problem)
        assert (refusal.failure, refusal.detail) == (SignOnFailure.CREDENTIALS, "wrong account name or password")
    disabled = admission.account_refusal(AccountProblem.DISABLED)
    assert (disabled.failure, disabled.detail, disabled.security) == (SignOnFailure.DISABLED, "account disabled", False)


def test_alerts() -> None:
    """Audited as alerts, as before: throttling, and a router without or with other identity keys."""
    assert {f for f in SignOnFailure if f.alert} == {
        SignOnFailure.THROTTLED, SignOnFailure.NO_IDENTITY, SignOnFailure.IDENTITY_CHANGED,
    }  # fmt: skip
    assert admission.throttled().security and admission.throttled().audit_outcome == "alert"
    changed = admission.identity_refusal("site-a", IdentityProblem.CHANGED)
    assert changed.failure is SignOnFailure.IDENTITY_CHANGED and changed.reason is Reason.NOT_PERMITTED


@pytest.mark.parametrize(
    ("names", "account", "problem"),
    [
        ([b"site-a"], "site-a", None),
        ([b"site-a"], None, None),
        ([], "site-a", "a client certificate is required: enroll this router (relay-router enroll)"),
        ([b"site-b"], "site-a", "the client certificate belongs to 'site-b', not 'site-a'"),
    ],
)
def test_certificate_problem(names: list[bytes], account: str | None, problem: str | None) -> None:
    assert admission.certificate_problem(names, account) == problem


def test_identity_keys() -> None:
    assert admission.has_identity_keys(pb.Identity(sign_key=b"s" * 32, kem_key=b"k"))
    assert not admission.has_identity_keys(pb.Identity(sign_key=b"s" * 31, kem_key=b"k"))
    assert not admission.has_identity_keys(pb.Identity(sign_key=b"s" * 32))
