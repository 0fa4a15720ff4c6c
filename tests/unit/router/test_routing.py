"""relay_router.routing: the route table and admission, without a RouterService, sockets or a chdir."""

from __future__ import annotations

import collections
import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.config import LocalDevice, RemoteDevice, SharedDevice
from relay_router.routing import (
    AUTHENTICATION_FAILED,
    REJECT_CONGESTION,
    REJECT_LIMIT,
    REJECT_UNKNOWN_CALLED,
    REJECT_UNKNOWN_CALLING,
    Admit,
    Callers,
    DirectoryDevice,
    Limits,
    PendingRequests,
    Reject,
    Route,
    RouteCache,
    RouteEvent,
    RouteTable,
    Running,
    SeenAssociations,
    admit_inbound,
    admit_outbound,
    route_events,
)
from relay_router.tunnel import DirectoryEntry


def remote(title: str, site: str, target: str | None = None) -> RemoteDevice:
    return RemoteDevice(title, site, target)


def entries(*pairs: tuple[str, str]) -> list[DirectoryEntry]:
    return [DirectoryEntry(site, title, "", True) for site, title in pairs]


PINNED = ("hospital-b", "hospital-c", "hospital-d")


def table(
    *directory: tuple[str, str],
    remotes: tuple[RemoteDevice, ...] = (),
    shared: tuple[str, ...] = (),
    pinned: tuple[str, ...] = PINNED,
) -> RouteTable:
    return RouteTable.build(remotes, shared, entries(*directory), expose_all=True, pinned=pinned)


# -- the route table -----------------------------------------------------------------


def test_remote_entries_alone_without_expose_all() -> None:
    t = RouteTable.build(
        [remote("B_PACS", "hospital-b", "PACS"), remote("CT1", "hospital-c")],
        [],
        entries(("hospital-b", "PACS"), ("hospital-c", "MR")),
        expose_all=False,
    )
    assert t.routes == {"B_PACS": Route("hospital-b", "PACS"), "CT1": Route("hospital-c", "CT1")}
    assert t.route("MR") is None
    assert t.local_alias("hospital-b", "PACS") == "B_PACS"
    assert t.local_alias("hospital-c", "MR") is None


def test_expose_all_hides_a_title_published_by_two_sites() -> None:
    t = table(("hospital-b", "PACS"), ("hospital-c", "PACS"), ("hospital-c", "MR"))
    assert t.routes == {"MR": Route("hospital-c", "MR")}
    assert t.route("PACS") is None
    assert t.local_alias("hospital-b", "PACS") is None and t.local_alias("hospital-c", "PACS") is None
    assert t.conflicts == {"PACS": ("hospital-b", "hospital-c")}
    assert t.why_not_routed("PACS") == (
        "called AE title 'PACS' is published by several sites (hospital-b and hospital-c); not routed"
    )


def test_expose_all_routes_only_to_pinned_sites() -> None:
    """The bridge introduces a site and its key in one message: trust on first use would route to an impostor."""
    t = table(("hospital-b", "PACS"), ("evil", "MR"), pinned=("hospital-b",))
    assert t.routes == {"PACS": Route("hospital-b", "PACS")}
    assert t.unpinned == {("evil", "MR")}
    assert "site evil, which has no [[pin]]" in t.why_not_routed("MR")
    # An explicit [[remote]] entry is the operator's own choice: routed whatever the pins.
    explicit = table(("evil", "MR"), remotes=(remote("MR", "evil"),), pinned=())
    assert explicit.routes == {"MR": Route("evil", "MR")}


def test_an_unpinned_site_publishing_a_pinned_title_blocks_it_loudly_and_never_takes_it() -> None:
    """The attack of issue 17 item 2: a second site publishes the title and the real entry disappears."""
    before = table(("hospital-b", "PACS"), pinned=("hospital-b",))
    both = table(("hospital-b", "PACS"), ("evil", "PACS"), pinned=("hospital-b",))
    assert both.route("PACS") is None
    assert route_events(before, both) == [RouteEvent("route_conflict", "PACS", ("evil", "hospital-b"), "hospital-b")]
    moved = table(("evil", "PACS"), pinned=("hospital-b",))
    assert moved.route("PACS") is None
    assert route_events(before, moved) == [RouteEvent("route_unpinned", "PACS", ("evil",), "hospital-b")]
    assert route_events(None, moved) == [RouteEvent("route_unpinned", "PACS", ("evil",))]  # never routed: no move


def test_a_pinned_destination_moving_is_reported() -> None:
    before = table(("hospital-b", "PACS"))
    after = table(("hospital-c", "PACS"))
    assert after.route("PACS") == Route("hospital-c", "PACS")
    assert route_events(before, after) == [RouteEvent("route_changed", "PACS", ("hospital-c",), "hospital-b")]
    assert route_events(after, after) == []  # reported once


def test_the_cache_keeps_route_events_until_taken() -> None:
    cache = RouteCache([], [], expose_all=True, pinned=("hospital-b",))
    cache.table(entries(("hospital-b", "PACS")))
    cache.table(entries(("hospital-b", "PACS"), ("hospital-c", "PACS")))
    assert [e.kind for e in cache.take_events()] == ["route_conflict"]
    assert cache.take_events() == []


def test_an_explicit_remote_wins_and_names_the_device() -> None:
    t = table(("hospital-b", "PACS"), ("hospital-c", "ARCHIVE"), remotes=(remote("PACS", "hospital-c", "ARCHIVE"),))
    assert t.routes == {"PACS": Route("hospital-c", "ARCHIVE"), "ARCHIVE": Route("hospital-c", "ARCHIVE")}
    # Two local titles lead to hospital-c's ARCHIVE: the explicit one is what a called device sees.
    assert t.local_alias("hospital-c", "ARCHIVE") == "PACS"
    assert t.local_alias("hospital-b", "PACS") is None  # hidden by the explicit entry


def test_two_explicit_titles_for_one_device_alias_to_the_first() -> None:
    t = table(remotes=(remote("FIRST", "hospital-b", "PACS"), remote("SECOND", "hospital-b", "PACS")))
    assert t.route("FIRST") == t.route("SECOND") == Route("hospital-b", "PACS")
    assert t.local_alias("hospital-b", "PACS") == "FIRST"


def test_our_shared_titles_are_never_routed_away() -> None:
    t = table(("hospital-b", "CT"), ("hospital-b", "MR"), ("hospital-c", "A_PACS"), shared=("CT", "A_PACS"))
    assert t.routes == {"MR": Route("hospital-b", "MR")}
    assert t.local_alias("hospital-b", "CT") is None


def test_local_alias_needs_site_and_title() -> None:
    t = table(("hospital-b", "PACS"), ("hospital-c", "MR"), remotes=(remote("B_PACS", "hospital-b", "PACS"),))
    assert t.local_alias("hospital-b", "PACS") == "B_PACS"
    assert t.local_alias("hospital-c", "MR") == "MR"
    assert t.local_alias("hospital-c", "PACS") is None
    assert t.local_alias("hospital-z", "MR") is None


SITES = st.sampled_from(["hospital-b", "hospital-c", "hospital-d"])
TITLES = st.sampled_from(["PACS", "CT", "MR", "US", "A_PACS", "B_PACS"])


@settings(max_examples=150, deadline=None)
@given(directory=st.lists(st.tuples(SITES, TITLES), max_size=10, unique=True))
def test_table_invariants(directory: list[tuple[str, str]]) -> None:
    explicit = {"B_PACS": Route("hospital-b", "PACS")}
    t = table(*directory, remotes=(remote("B_PACS", "hospital-b", "PACS"),), shared=("A_PACS",))
    counts = collections.Counter(title for _, title in directory)
    for title, route in explicit.items():
        assert t.routes[title] == route
    for title, route in t.routes.items():
        assert title != "A_PACS"
        if title not in explicit:
            assert counts[title] == 1 and (route.site, title) in directory
        # The reverse index agrees with the table: the alias of a route's device leads to that device.
        alias = t.local_alias(route.site, route.ae_title)
        assert alias is not None and t.routes[alias] == route
    for site, title in directory:
        if counts[title] == 1 and title not in ("A_PACS", *explicit):
            assert t.routes[title] == Route(site, title)
            assert t.local_alias(site, title) == title or (site, title) == ("hospital-b", "PACS")


def test_the_cache_rebuilds_only_when_the_directory_changes() -> None:
    cache = RouteCache([remote("CT1", "hospital-c")], ["A_PACS"], expose_all=True, pinned=PINNED)
    first = entries(("hospital-b", "PACS"))
    assert cache.table(first).routes == {"CT1": Route("hospital-c", "CT1"), "PACS": Route("hospital-b", "PACS")}
    for _ in range(5):  # one per association: the same directory object, the same table
        cache.table(first)
    assert cache.builds == 1
    second = entries(("hospital-b", "PACS"), ("hospital-c", "PACS"))  # the link replaces its list on a change
    assert cache.table(second).routes == {"CT1": Route("hospital-c", "CT1")}
    assert cache.builds == 2
    assert cache.table([]).routes == {"CT1": Route("hospital-c", "CT1")}
    assert cache.builds == 3


@dataclasses.dataclass(frozen=True)
class SiteAndTitle:
    """Only what a DirectoryDevice must have (tunnel.DirectoryEntry carries more)."""

    site: str
    ae_title: str


def test_the_table_reads_only_site_and_title() -> None:
    only: DirectoryDevice = SiteAndTitle("hospital-b", "PACS")
    t = RouteTable.build([], [], [only], expose_all=True, pinned=["hospital-b"])
    assert t.route("PACS") == Route("hospital-b", "PACS")


# -- outbound admission ---------------------------------------------------------------

ROUTES = table(("hospital-b", "PACS"))


LIMITS = Limits(total=10, outbound=10, inbound=5, inbound_per_site=2)


def outbound(
    called: str = "PACS",
    *,
    running: int = 1,
    limit: int = 10,
    up: bool = True,
    error: str | None = None,
    calling: str = "WS",
    address: str = "10.1.0.31",
    callers: Callers | None = None,
    inbound_running: int = 0,
):
    limits = Limits(total=limit, outbound=limit, inbound=limit // 2 or 1, inbound_per_site=1)
    kwargs = {"callers": callers} if callers is not None else {}
    return admit_outbound(
        ROUTES,
        called,
        calling_ae=calling,
        address=address,
        running=Running(outbound=running, inbound=inbound_running),
        limits=limits,
        link_up=up,
        link_error=error,
        **kwargs,
    )


def test_a_known_title_is_admitted_with_its_route() -> None:
    assert outbound() == Admit(Route("hospital-b", "PACS"))


def test_an_unknown_title_is_rejected_permanently() -> None:
    decision = outbound("NOPE")
    assert isinstance(decision, Reject)
    assert decision.reason is Reason.UNKNOWN_CALLED_AE and not decision.security
    assert decision.rj == REJECT_UNKNOWN_CALLED == (1, 1, 7)
    assert decision.detail == "called AE title 'NOPE' is not a remote device on this router"
    assert decision.route is None


def test_the_router_limit_counts_this_association() -> None:
    assert isinstance(outbound(running=10, limit=10), Admit)  # this one is the tenth
    decision = outbound(running=11, limit=10)
    assert isinstance(decision, Reject)
    assert (decision.reason, decision.rj, decision.detail) == (
        Reason.ROUTER_LIMIT,
        REJECT_LIMIT,
        "too many associations on this router",
    )
    assert decision.rj == (2, 3, 2)  # transient, service provider (presentation), local limit exceeded
    assert decision.route == Route("hospital-b", "PACS")  # the status shows where it was going


def test_a_down_link_is_a_transient_rejection_that_says_why() -> None:
    decision = outbound(up=False, error="certificate verify failed")
    assert isinstance(decision, Reject)
    assert decision.reason is Reason.BRIDGE_UNREACHABLE and decision.rj == REJECT_CONGESTION == (2, 3, 1)
    assert decision.detail == "the bridge is not reachable (certificate verify failed)"
    assert outbound(up=False).detail == "the bridge is not reachable (connecting)"  # type: ignore[union-attr]


def test_outbound_checks_come_in_order() -> None:
    # An unknown title is permanent even while the link is down or the router full.
    assert outbound("NOPE", running=99, up=False).reason is Reason.UNKNOWN_CALLED_AE  # type: ignore[union-attr]
    assert outbound(running=99, up=False).reason is Reason.ROUTER_LIMIT  # type: ignore[union-attr]


def test_the_outbound_limit_and_the_total_both_hold() -> None:
    limits = Limits(total=10, outbound=4, inbound=5, inbound_per_site=2)

    def decide(out: int, inbound: int):
        running = Running(outbound=out, inbound=inbound)
        return admit_outbound(ROUTES, "PACS", running=running, limits=limits, link_up=True, link_error=None)

    assert isinstance(decide(4, 5), Admit)
    assert decide(5, 0).reason is Reason.ROUTER_LIMIT  # type: ignore[union-attr]
    assert decide(4, 7).reason is Reason.ROUTER_LIMIT  # type: ignore[union-attr]


# -- who may call through the router ----------------------------------------------------------

CALLERS = Callers.build(
    [
        LocalDevice("WS", ["10.1.0.31", "10.1.2.0/24"]),
        LocalDevice("ANYWHERE"),
        LocalDevice("V6", ["fd00::/64"]),
    ],
    {"STORE_SCP": ["10.1.0.40"], "WS": ["10.1.0.99"]},
)


def test_without_local_entries_anyone_may_call() -> None:
    open_door = Callers.build([], {"STORE_SCP": ["10.1.0.40"]})
    assert not open_door.enforced and open_door.allows("WHOEVER", "192.0.2.1")
    assert isinstance(outbound(calling="WHOEVER"), Admit)


def test_the_allow_list_checks_title_and_address() -> None:
    allows = CALLERS.allows
    assert allows("WS", "10.1.0.31") and allows("WS", "10.1.2.200") and allows("WS", "10.1.0.99")  # shared host
    assert not allows("WS", "10.1.0.32") and not allows("WS", "10.1.3.1")
    assert allows("ANYWHERE", "192.0.2.7") and allows("ANYWHERE", "fd00::1")
    assert allows("STORE_SCP", "10.1.0.40") and not allows("STORE_SCP", "10.1.0.41")  # [[shared]], its own host
    assert allows("V6", "fd00::5") and not allows("V6", "fd01::5") and not allows("V6", "10.1.0.31")
    assert allows("WS", "::ffff:10.1.0.31")  # a dual-stack listener reports IPv4 callers this way
    assert allows("V6", "fd00::5%eth0")
    assert not allows("NOBODY", "10.1.0.31") and not allows("WS", "not an address") and not allows("WS", "")
    assert not allows("ws", "10.1.0.31")  # AE titles are case-sensitive (PS3.5 AE value representation)


def test_an_unknown_caller_is_rejected_1_1_3_before_anything_about_routes() -> None:
    decision = outbound("NOPE", calling="INTRUDER", address="10.1.0.66", callers=CALLERS, up=False)
    assert isinstance(decision, Reject)
    assert decision.reason is Reason.UNKNOWN_CALLING_AE and decision.route is None and not decision.security
    assert decision.rj == REJECT_UNKNOWN_CALLING == (1, 1, 3)
    assert decision.detail == "calling AE title 'INTRUDER' from '10.1.0.66' is not a [[local]] device of this router"
    wrong_place = outbound(calling="WS", address="10.9.9.9", callers=CALLERS)
    assert wrong_place.detail == "calling AE title 'WS' from '10.9.9.9' is not allowed from this address"  # type: ignore[union-attr]
    escaped = outbound(calling="A\x1b[2J", address="10.1.0.66", callers=CALLERS)
    assert "\x1b" not in escaped.detail and "\\x1b" in escaped.detail  # type: ignore[union-attr]
    assert isinstance(outbound(calling="WS", address="10.1.0.31", callers=CALLERS), Admit)


# -- unfinished requests -----------------------------------------------------------------------


def test_pending_requests_are_capped_in_total_and_per_address() -> None:
    pending = PendingRequests(total=3, per_address=2)
    assert pending.admit("10.0.0.1") is None and pending.admit("10.0.0.1") is None
    assert "max_pending_per_address" in (pending.admit("10.0.0.1") or "")
    assert pending.admit("10.0.0.2") is None
    assert "max_pending_requests" in (pending.admit("10.0.0.3") or "")
    pending.done("10.0.0.1")
    assert pending.admit("10.0.0.3") is None
    assert pending.refused == 2 and pending.total == 3
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        pending.done(address)
    assert pending.total == 0 and not pending.by_address  # nothing kept for addresses gone


# -- inbound admission ---------------------------------------------------------------

SHARED = {
    "PACS": SharedDevice("PACS", "127.0.0.1", 4242, ["hospital-b"]),
    "OPEN": SharedDevice("OPEN", "127.0.0.1", 4243, ["*"]),
    "PRIVATE": SharedDevice("PRIVATE", "127.0.0.1", 4244, []),
}


def inbound(
    called: str = "PACS",
    from_site: str = "hospital-b",
    aid: str = "a" * 32,
    *,
    seen: SeenAssociations | None = None,
    running: int = 0,
    limit: int = 10,
    inbound_running: int = 0,
    by_site: dict[str, int] | None = None,
    limits: Limits | None = None,
):
    return admit_inbound(
        SHARED,
        from_site=from_site,
        called_ae=called,
        association_id=aid,
        seen=seen if seen is not None else SeenAssociations(),
        running=Running(outbound=running, inbound=inbound_running, inbound_by_site=by_site or {}),
        limits=limits or Limits(total=limit, outbound=limit, inbound=limit, inbound_per_site=limit),
        our_site="hospital-a",
    )


def test_a_device_shared_with_the_caller_is_admitted() -> None:
    assert inbound() == Admit()
    assert inbound("OPEN", "hospital-z") == Admit()  # share_with "*"


def test_an_unknown_device_is_refused_without_a_security_alert() -> None:
    decision = inbound("GHOST")
    assert isinstance(decision, Reject)
    assert (decision.reason, decision.refused, decision.security) == (
        Reason.UNKNOWN_DEVICE,
        pb.Refused.UNKNOWN_DEVICE,
        False,
    )
    assert decision.detail == "no shared device 'GHOST'"
    assert decision.public_detail is None  # the calling router is told the same


def test_a_device_not_shared_with_the_caller_is_a_security_refusal() -> None:
    for called in ("PACS", "PRIVATE"):
        decision = inbound(called, "hospital-c")
        assert isinstance(decision, Reject)
        assert decision.reason is Reason.NOT_PERMITTED and decision.security and decision.alert == "access"
        assert decision.refused == pb.Refused.NOT_PERMITTED
        assert decision.detail == f"SECURITY: {called} is not shared with 'hospital-c'"
        # The caller learns nothing about our configuration.
        assert decision.public_detail == AUTHENTICATION_FAILED == "end-to-end authentication failed"
        assert (
            decision.log
            == f"SECURITY: {called} is not shared with 'hospital-c'; refused (the bridge should have refused it)"
        )


def test_a_replayed_association_id_is_refused() -> None:
    seen = SeenAssociations()
    assert inbound(seen=seen) == Admit()
    seen.add("a" * 32)
    decision = inbound(seen=seen)
    assert isinstance(decision, Reject)
    assert decision.reason is Reason.SECURITY and decision.security and decision.alert == "replay"
    assert decision.refused == pb.Refused.NOT_PERMITTED and decision.public_detail == AUTHENTICATION_FAILED
    assert decision.detail == f"SECURITY: association {'a' * 32} was already seen (replayed by the bridge?)"
    assert inbound(seen=seen, aid="b" * 32) == Admit()


def test_overload_is_refused_first_and_counts_only_the_others() -> None:
    assert inbound(running=9, limit=10) == Admit()
    decision = inbound("GHOST", running=10, limit=10)  # checked before the device
    assert isinstance(decision, Reject)
    assert (decision.reason, decision.refused, decision.security) == (Reason.ROUTER_LIMIT, pb.Refused.OVERLOADED, False)
    assert decision.detail == "site hospital-a has reached its association limit"
    assert decision.log == "refusing an association from hospital-b: site hospital-a has reached its association limit"


def test_inbound_associations_have_their_own_cap_and_one_per_site() -> None:
    """Peers never take the slots our own devices need, and one peer never takes all inbound slots."""
    limits = Limits(total=10, outbound=10, inbound=4, inbound_per_site=2)
    assert inbound(inbound_running=3, by_site={"hospital-c": 3}, limits=limits) == Admit()
    full = inbound(inbound_running=4, by_site={"hospital-c": 4}, limits=limits)
    assert isinstance(full, Reject)
    assert (full.reason, full.refused) == (Reason.INBOUND_LIMIT, pb.Refused.OVERLOADED)
    assert full.detail == "site hospital-a has reached its limit of associations from other sites (4)"
    one_site = inbound(inbound_running=2, by_site={"hospital-b": 2}, limits=limits)
    assert isinstance(one_site, Reject) and one_site.reason is Reason.INBOUND_LIMIT
    assert one_site.detail == "site hospital-b has reached its limit of associations to hospital-a (2)"
    assert inbound("OPEN", "hospital-c", inbound_running=2, by_site={"hospital-b": 2}, limits=limits) == Admit()
    # Our own outbound associations count against the total only.
    assert inbound(running=9, limits=limits) == Admit()
    assert inbound(running=10, limits=limits).reason is Reason.ROUTER_LIMIT  # type: ignore[union-attr]


def test_running_counts_directions_and_sites() -> None:
    from relay_router.outcome import Outcome

    active = [Outcome("1", "outbound", "hospital-b"), Outcome("2", "inbound", "hospital-b")]
    active += [Outcome("3", "inbound", "hospital-c"), Outcome("4", "inbound", "hospital-b")]
    assert Running.count(active) == Running(outbound=1, inbound=3, inbound_by_site={"hospital-b": 2, "hospital-c": 1})
    assert Running.count(active).total == 4


def test_routing_is_pure_code() -> None:
    """No asyncio, gRPC or router service behind the decisions (a fresh interpreter imports only the module)."""
    import subprocess
    import sys

    probe = (
        "import sys, relay_router.routing; "
        "banned = ('asyncio', 'grpc', 'relay_router.service', 'relay_router.tunnel'); "
        "print(sorted(m for m in banned if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
