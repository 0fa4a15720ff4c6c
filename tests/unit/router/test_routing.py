"""relay_router.routing: the route table and admission, without a RouterService, sockets or a chdir."""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.config import RemoteDevice, SharedDevice
from relay_router.routing import (
    AUTHENTICATION_FAILED,
    REJECT_CONGESTION,
    REJECT_LIMIT,
    REJECT_UNKNOWN_CALLED,
    Admit,
    DirectoryDevice,
    Reject,
    Route,
    RouteCache,
    RouteTable,
    SeenAssociations,
    admit_inbound,
    admit_outbound,
)
from relay_router.tunnel import DirectoryEntry


def remote(title: str, site: str, target: str | None = None) -> RemoteDevice:
    return RemoteDevice(title, site, target)


def entries(*pairs: tuple[str, str]) -> list[DirectoryEntry]:
    return [DirectoryEntry(site, title, "", True) for site, title in pairs]


def table(
    *directory: tuple[str, str], remotes: tuple[RemoteDevice, ...] = (), shared: tuple[str, ...] = ()
) -> RouteTable:
    return RouteTable.build(remotes, shared, entries(*directory), expose_all=True)


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
    cache = RouteCache([remote("CT1", "hospital-c")], ["A_PACS"], expose_all=True)
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


def test_the_table_reads_only_site_and_title() -> None:
    t = RouteTable.build([], [], [DirectoryDevice("hospital-b", "PACS")], expose_all=True)
    assert t.route("PACS") == Route("hospital-b", "PACS")


# -- outbound admission ---------------------------------------------------------------

ROUTES = table(("hospital-b", "PACS"))


def outbound(called: str = "PACS", *, running: int = 1, limit: int = 10, up: bool = True, error: str | None = None):
    return admit_outbound(ROUTES, called, running=running, limit=limit, link_up=up, link_error=error)


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
):
    return admit_inbound(
        SHARED,
        from_site=from_site,
        called_ae=called,
        association_id=aid,
        seen=seen if seen is not None else SeenAssociations(),
        running=running,
        limit=limit,
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
