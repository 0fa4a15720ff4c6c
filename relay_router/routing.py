"""Who may call what, and where it goes: the route table and admission, as pure functions.

No asyncio, no gRPC, no sockets: `RouterService` gathers the facts (the
directory, how many associations run, whether the link is up) and carries out
the decision; everything that decides lives here and is tested on its own
(tests/unit/router/test_routing.py).

- `RouteTable`: local AE title -> `Route(site, ae_title)` at another site, from
  `[[remote]]` and, with `expose_all`, the directory (only towards sites pinned
  with `[[pin]]`, never a title two sites publish); plus the reverse index
  that gives the local alias under which a calling remote device is shown to a
  local device. Built once per directory version, not once per association;
  `RouteCache` reports what changed between versions (conflicts, moves).
- `Callers`: which local devices may call through the router (`[[local]]`,
  `[[shared]]` from their own host).
- `admit_outbound`: a local device called a title; route it or reject it with
  the A-ASSOCIATE-RJ PS3.8 prescribes.
- `admit_inbound`: the bridge announced an association for one of our shared
  devices; accept it or answer `Refused`. The bridge is not trusted to enforce
  our sharing rules or to announce each association once, so both are checked
  here again.
- `Running`, `Limits`: associations in progress by direction and peer site, and
  the caps they are held to (inbound ones never take our outbound slots).
- `PendingRequests`: connections whose A-ASSOCIATE-RQ is not complete yet,
  capped in total and per source address.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.config import LocalDevice, Network, RemoteDevice, SharedDevice
from relay_router.replay import SeenAssociations
from relay_router.ul import RejectResult, RejectSource

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Table 9-21.
REJECT_UNKNOWN_CALLED = (RejectResult.PERMANENT, RejectSource.SERVICE_USER, 7)  # called AE title not recognised
REJECT_CONGESTION = (RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 1)  # temporary congestion
REJECT_LIMIT = (RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 2)  # local limit exceeded
REJECT_UNKNOWN_CALLING = (RejectResult.PERMANENT, RejectSource.SERVICE_USER, 3)  # calling AE title not recognised
# A request above max_request_bytes: sending it again will not help, so permanent; local limit exceeded.
REJECT_TOO_LARGE = (RejectResult.PERMANENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 2)

# What a calling router is told when our own checks refuse it: nothing about our configuration.
AUTHENTICATION_FAILED = "end-to-end authentication failed"


@dataclass(frozen=True)
class Route:
    """Where a local AE title leads: a device at another site."""

    site: str
    ae_title: str


class DirectoryDevice(Protocol):
    """The part of a directory entry routing reads (relay_router.tunnel.DirectoryEntry has it)."""

    @property
    def site(self) -> str: ...
    @property
    def ae_title(self) -> str: ...


@dataclass(frozen=True)
class RouteTable:
    """Local AE title -> remote device, and the reverse index (site, remote title) -> local title.

    `conflicts`: titles `expose_all` would expose but that several sites publish (title -> sites);
    `unpinned`: (site, title) pairs not exposed because the site has no `[[pin]]`.
    """

    routes: Mapping[str, Route]
    aliases: Mapping[tuple[str, str], str]
    conflicts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unpinned: frozenset[tuple[str, str]] = frozenset()
    exposed: frozenset[str] = frozenset()  # the titles that came from the directory (expose_all)

    @classmethod
    def build(
        cls,
        remote: Iterable[RemoteDevice],
        shared_titles: Iterable[str],
        directory: Iterable[DirectoryDevice],
        *,
        expose_all: bool,
        pinned: Iterable[str] = (),
    ) -> RouteTable:
        """Explicit `[[remote]]` entries first; with `expose_all`, every directory title that is neither
        taken by a `[[remote]]` entry nor one of our own shared devices, published by exactly one site,
        and that site pinned with `[[pin]]`.

        Why pinned only: the directory comes from the bridge, and a bridge that introduces a site
        introduces its key in the same message, so trust on first use would pin an impostor at once
        and move the title to it. A title two sites publish is never exposed (whichever way the
        bridge lists them), so a title cannot move silently by a second site appearing.
        """
        table = {r.ae_title: Route(r.site, r.target) for r in remote}
        conflicts: dict[str, tuple[str, ...]] = {}
        unpinned: set[tuple[str, str]] = set()
        exposed: set[str] = set()
        if expose_all:
            shared = set(shared_titles)
            trusted = set(pinned)
            sites_of: dict[str, set[str]] = collections.defaultdict(set)
            for entry in directory:
                if entry.ae_title not in table and entry.ae_title not in shared:
                    sites_of[entry.ae_title].add(entry.site)
            for title, sites in sites_of.items():
                if len(sites) > 1:
                    conflicts[title] = tuple(sorted(sites))
                    continue
                (site,) = sites
                if site not in trusted:
                    unpinned.add((site, title))
                    continue
                table[title] = Route(site, title)
                exposed.add(title)
        aliases: dict[tuple[str, str], str] = {}
        for title, route in table.items():
            # Several local titles may lead to one device: the first one (explicit entries first) names it.
            aliases.setdefault((route.site, route.ae_title), title)
        return cls(table, aliases, conflicts, frozenset(unpinned), frozenset(exposed))

    def route(self, called_ae: str) -> Route | None:
        return self.routes.get(called_ae)

    def local_alias(self, site: str, ae_title: str) -> str | None:
        """The local title under which a remote device is exposed here, if any."""
        return self.aliases.get((site, ae_title))

    def why_not_routed(self, called_ae: str) -> str:
        """The local detail of an unknown called title (a conflict or a missing pin says so)."""
        if called_ae in self.conflicts:
            sites = " and ".join(self.conflicts[called_ae])
            return f"called AE title {called_ae!r} is published by several sites ({sites}); not routed"
        site = next((s for s, t in self.unpinned if t == called_ae), None)
        if site is not None:
            return (
                f"called AE title {called_ae!r} is at site {site}, which has no [[pin]] (expose_all does not route it)"
            )
        return f"called AE title {called_ae!r} is not a remote device on this router"


@dataclass(frozen=True)
class RouteEvent:
    """Something about the routes an operator must see: logged and audited by the service.

    kind: "route_conflict" (a title several sites publish, not routed), "route_changed" (an
    exposed title now leads to another pinned site), "route_unpinned" (a title at a site with no
    `[[pin]]`, not routed; with `previous`, it led to that pinned site before). `previous`: the
    site the title led to before, if any.
    """

    kind: str
    title: str
    sites: tuple[str, ...]
    previous: str | None = None


def route_events(before: RouteTable | None, after: RouteTable) -> list[RouteEvent]:
    """What is new in `after` compared with `before`: each conflict, move or unpinned title once."""
    events: list[RouteEvent] = []
    old_conflicts = before.conflicts if before is not None else {}
    for title, sites in sorted(after.conflicts.items()):
        if old_conflicts.get(title) != sites:
            previous = before.routes[title].site if before is not None and title in before.routes else None
            events.append(RouteEvent("route_conflict", title, sites, previous))
    if before is not None:
        for title in sorted(after.exposed):
            old = before.routes.get(title)
            new = after.routes[title]
            if old is not None and old.site != new.site:
                events.append(RouteEvent("route_changed", title, (new.site,), old.site))
    old_unpinned = before.unpinned if before is not None else frozenset()
    for site, title in sorted(after.unpinned - old_unpinned):
        # A title that led to a pinned site and is now published only by an unpinned one: the attack of
        # a bridge that removes the real entry and publishes its own. Not routed, and reported as a move.
        old = before.routes.get(title) if before is not None and title in before.exposed else None
        events.append(RouteEvent("route_unpinned", title, (site,), old.site if old is not None else None))
    return events


class RouteCache:
    """The route table of the current directory, rebuilt only when the directory object changes.

    `BridgeLink` replaces its `directory` list on every Directory message and never
    changes it in place, so identity is the version. The cache keeps a reference to
    the list it was built from, so that object cannot be freed and its id reused.
    Each rebuild's `route_events` wait in `events` until the service takes them.
    """

    def __init__(
        self,
        remote: Sequence[RemoteDevice],
        shared_titles: Iterable[str],
        *,
        expose_all: bool,
        pinned: Iterable[str] = (),
    ) -> None:
        self._remote = tuple(remote)
        self._shared = frozenset(shared_titles)
        self._expose_all = expose_all
        self._pinned = frozenset(pinned)
        self._source: object = None
        self._table: RouteTable | None = None
        self.builds = 0  # how many times the table was built (tests, debugging)
        self.events: list[RouteEvent] = []

    def table(self, directory: Sequence[DirectoryDevice]) -> RouteTable:
        if self._table is None or directory is not self._source:
            table = RouteTable.build(
                self._remote, self._shared, directory, expose_all=self._expose_all, pinned=self._pinned
            )
            if self._expose_all:
                self.events += route_events(self._table, table)
            self._table = table
            self._source = directory
            self.builds += 1
        return self._table

    def reconfigure(
        self, remote: Sequence[RemoteDevice], shared_titles: Iterable[str], *, pinned: Iterable[str] = ()
    ) -> None:
        """A reloaded configuration: the next `table()` is rebuilt from it. The previous table stays the
        reference for route events, so a reload reports moves the same way a directory change does."""
        self._remote = tuple(remote)
        self._shared = frozenset(shared_titles)
        self._pinned = frozenset(pinned)
        self._source = None

    def take_events(self) -> list[RouteEvent]:
        events, self.events = self.events, []
        return events


# -- who may call through the router --------------------------------------------------


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as the socket gives it; IPv4-mapped IPv6 as IPv4; None if unparsable."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Callers:
    """The LAN allow-list: calling AE title -> networks it may call from (empty tuple: anywhere).

    `enforced` is false when no `[[local]]` entry exists: then anyone may call (the
    behaviour before allow-lists existed). `[[shared]]` devices are allowed from
    the addresses their `host` resolved to at start.
    """

    allowed: Mapping[str, tuple[Network, ...] | None]
    enforced: bool

    @classmethod
    def build(cls, local: Iterable[LocalDevice], shared_hosts: Mapping[str, Iterable[str]]) -> Callers:
        """`shared_hosts`: a shared device's title -> the addresses its host resolved to."""
        allowed: dict[str, tuple[Network, ...] | None] = {}
        entries = list(local)
        for device in entries:
            networks = device.networks
            # No addresses: any address (None); else the union with what other entries allow.
            if not networks or allowed.get(device.ae_title, ()) is None:
                allowed[device.ae_title] = None
            else:
                allowed[device.ae_title] = (*(allowed.get(device.ae_title) or ()), *networks)
        for title, addresses in shared_hosts.items():
            if allowed.get(title, ()) is None:
                continue
            hosts = tuple(ipaddress.ip_network(a) for a in addresses if parse_address(a) is not None)
            allowed[title] = (*(allowed.get(title) or ()), *hosts)
        return cls(allowed, enforced=bool(entries))

    def allows(self, calling_ae: str, address: str) -> bool:
        if not self.enforced:
            return True
        if calling_ae not in self.allowed:
            return False
        networks = self.allowed[calling_ae]
        if networks is None:
            return True
        peer = parse_address(address)
        return peer is not None and any(peer.version == n.version and peer in n for n in networks)


OPEN_DOOR = Callers({}, enforced=False)


# -- how many associations run, and the caps --------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The association caps ([dicom]): total, outbound, inbound, inbound per calling site."""

    total: int
    outbound: int
    inbound: int
    inbound_per_site: int


@dataclass(frozen=True)
class Running:
    """Associations in progress: by direction, and inbound ones by calling site."""

    outbound: int = 0
    inbound: int = 0
    inbound_by_site: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.outbound + self.inbound

    @classmethod
    def count(cls, associations: Iterable[object]) -> Running:
        """From outcomes with `direction` ("outbound"/"inbound") and `site` (relay_router.outcome.Outcome)."""
        outbound = inbound = 0
        by_site: collections.Counter[str] = collections.Counter()
        for association in associations:
            if getattr(association, "direction", "") == "inbound":
                inbound += 1
                by_site[getattr(association, "site", "")] += 1
            else:
                outbound += 1
        return cls(outbound, inbound, dict(by_site))


@dataclass(frozen=True)
class Admit:
    """Go ahead; for an outbound association, to `route`."""

    route: Route | None = None


@dataclass(frozen=True)
class Reject:
    """Refuse, for `reason`; `detail` is for the local log and audit only.

    Outbound rejections carry the A-ASSOCIATE-RJ triple `rj`; inbound ones the
    `Refused` reason for the calling router (`refused`) and the text it may see
    (`public_detail`, default `detail`). `alert` is the log's `security_alert`
    field for security events; `log` the line to log (None: the caller's usual).
    """

    reason: Reason
    detail: str
    rj: tuple[int, int, int] | None = None
    refused: pb.Refused.Reason | None = None
    public_detail: str | None = None
    security: bool = False
    alert: str | None = None
    log: str | None = None
    route: Route | None = None  # outbound: the route found before the rejection, if any


Admission = Admit | Reject


def admit_outbound(
    table: RouteTable,
    called_ae: str,
    *,
    calling_ae: str = "",
    address: str = "",
    callers: Callers = OPEN_DOOR,
    running: Running,
    limits: Limits,
    link_up: bool,
    link_error: str | None,
) -> Admission:
    """A local device at `address` calling as `calling_ae` asked for `called_ae`.

    `running` counts associations in progress, this one included. Checked in this order: the
    caller (before anything about our routes is revealed), the called title, the outbound and
    total limits, the bridge link.
    """
    if not callers.allows(calling_ae, address):
        known = calling_ae in callers.allowed
        why = "is not allowed from this address" if known else "is not a [[local]] device of this router"
        return Reject(
            Reason.UNKNOWN_CALLING_AE,
            f"calling AE title {calling_ae!r} from {address!r} {why}",
            rj=REJECT_UNKNOWN_CALLING,
        )
    route = table.route(called_ae)
    if route is None:
        return Reject(Reason.UNKNOWN_CALLED_AE, table.why_not_routed(called_ae), rj=REJECT_UNKNOWN_CALLED)
    if running.outbound > limits.outbound or running.total > limits.total:
        return Reject(Reason.ROUTER_LIMIT, "too many associations on this router", rj=REJECT_LIMIT, route=route)
    if not link_up:
        return Reject(
            Reason.BRIDGE_UNREACHABLE,
            f"the bridge is not reachable ({link_error or 'connecting'})",
            rj=REJECT_CONGESTION,
            route=route,
        )
    return Admit(route)


def shared_with(device: SharedDevice, site: str) -> bool:
    return site in device.share_with or "*" in device.share_with


def admit_inbound(
    shared: Mapping[str, SharedDevice],
    *,
    from_site: str,
    called_ae: str,
    association_id: str,
    seen: SeenAssociations,
    running: Running,
    limits: Limits,
    our_site: str,
) -> Admission:
    """The bridge announced an association from `from_site` for `called_ae`.

    `running` counts associations in progress before this one. Checked in this
    order: our limits (total, inbound, this calling site's), the device, our
    sharing rules, a replayed association id. Inbound associations have their own
    cap below the total, so peers can never take every slot our own devices need.
    """
    if running.total >= limits.total:
        detail = f"site {our_site} has reached its association limit"
        return Reject(
            Reason.ROUTER_LIMIT,
            detail,
            refused=pb.Refused.OVERLOADED,
            log=f"refusing an association from {from_site}: {detail}",
        )
    if running.inbound >= limits.inbound:
        detail = f"site {our_site} has reached its limit of associations from other sites ({limits.inbound})"
        return Reject(
            Reason.INBOUND_LIMIT,
            detail,
            refused=pb.Refused.OVERLOADED,
            log=f"refusing an association from {from_site}: {detail}",
        )
    if running.inbound_by_site.get(from_site, 0) >= limits.inbound_per_site:
        detail = f"site {from_site} has reached its limit of associations to {our_site} ({limits.inbound_per_site})"
        return Reject(
            Reason.INBOUND_LIMIT,
            detail,
            refused=pb.Refused.OVERLOADED,
            log=f"refusing an association from {from_site}: {detail}",
        )
    device = shared.get(called_ae)
    if device is None:
        return Reject(Reason.UNKNOWN_DEVICE, f"no shared device {called_ae!r}", refused=pb.Refused.UNKNOWN_DEVICE)
    if not shared_with(device, from_site):
        detail = f"SECURITY: {device.ae_title} is not shared with {from_site!r}"
        return Reject(
            Reason.NOT_PERMITTED,
            detail,
            refused=pb.Refused.NOT_PERMITTED,
            public_detail=AUTHENTICATION_FAILED,
            security=True,
            alert="access",
            log=f"{detail}; refused (the bridge should have refused it)",
        )
    if association_id in seen:  # only verified ids are in it (relay_router.replay); checked again after verifying
        detail = f"SECURITY: association {association_id} was already seen (replayed by the bridge?)"
        return Reject(
            Reason.SECURITY,
            detail,
            refused=pb.Refused.NOT_PERMITTED,
            public_detail=AUTHENTICATION_FAILED,
            security=True,
            alert="replay",
            log=f"{detail}; refused",
        )
    return Admit()


class PendingRequests:
    """Connections whose A-ASSOCIATE-RQ is not complete yet: capped in total and per source address.

    Each holds at most `max_request_bytes` until ARTIM; the caps bound what slow or
    silent LAN clients can make the router hold. `admit` says whether a new
    connection may wait for its request (and counts it); `done` forgets it.
    """

    def __init__(self, total: int, per_address: int) -> None:
        self.total_cap, self.per_address_cap = total, per_address
        self.by_address: collections.Counter[str] = collections.Counter()
        self.total = 0
        self.refused = 0  # connections closed because a cap was reached (status, tests)

    def admit(self, address: str) -> str | None:
        """None (admitted), or why not."""
        if self.total >= self.total_cap:
            self.refused += 1
            return f"{self.total} A-ASSOCIATE-RQs are unfinished (max_pending_requests)"
        if self.by_address[address] >= self.per_address_cap:
            self.refused += 1
            return f"{self.by_address[address]} A-ASSOCIATE-RQs from {address} are unfinished (max_pending_per_address)"
        self.total += 1
        self.by_address[address] += 1
        return None

    def done(self, address: str) -> None:
        self.total -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]
