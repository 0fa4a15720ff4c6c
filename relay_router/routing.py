"""Who may call what, and where it goes: the route table and admission, as pure functions.

No asyncio, no gRPC, no sockets: `RouterService` gathers the facts (the
directory, how many associations run, whether the link is up) and carries out
the decision; everything that decides lives here and is tested on its own
(tests/unit/router/test_routing.py).

- `RouteTable`: local AE title -> `Route(site, ae_title)` at another site, from
  `[[remote]]` and, with `expose_all`, the directory; plus the reverse index
  that gives the local alias under which a calling remote device is shown to a
  local device. Built once per directory version, not once per association.
- `admit_outbound`: a local device called a title; route it or reject it with
  the A-ASSOCIATE-RJ PS3.8 prescribes.
- `admit_inbound`: the bridge announced an association for one of our shared
  devices; accept it or answer `Refused`. The bridge is not trusted to enforce
  our sharing rules or to announce each association once, so both are checked
  here again.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.config import RemoteDevice, SharedDevice
from relay_router.replay import SeenAssociations
from relay_router.ul import RejectResult, RejectSource

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Table 9-21.
REJECT_UNKNOWN_CALLED = (RejectResult.PERMANENT, RejectSource.SERVICE_USER, 7)  # called AE title not recognised
REJECT_CONGESTION = (RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 1)  # temporary congestion
REJECT_LIMIT = (RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 2)  # local limit exceeded

# What a calling router is told when our own checks refuse it: nothing about our configuration.
AUTHENTICATION_FAILED = "end-to-end authentication failed"


@dataclass(frozen=True)
class Route:
    """Where a local AE title leads: a device at another site."""

    site: str
    ae_title: str


@dataclass(frozen=True)
class DirectoryDevice:
    """The part of a directory entry routing reads (relay_router.tunnel.DirectoryEntry has it)."""

    site: str
    ae_title: str


@dataclass(frozen=True)
class RouteTable:
    """Local AE title -> remote device, and the reverse index (site, remote title) -> local title."""

    routes: Mapping[str, Route]
    aliases: Mapping[tuple[str, str], str]

    @classmethod
    def build(
        cls,
        remote: Iterable[RemoteDevice],
        shared_titles: Iterable[str],
        directory: Iterable[DirectoryDevice],
        *,
        expose_all: bool,
    ) -> RouteTable:
        """Explicit `[[remote]]` entries first; with `expose_all`, every directory title that is unique
        across sites, not taken by a `[[remote]]` entry and not one of our own shared devices."""
        table = {r.ae_title: Route(r.site, r.target) for r in remote}
        if expose_all:
            entries = list(directory)
            shared = set(shared_titles)
            counts = collections.Counter(e.ae_title for e in entries)
            for entry in entries:
                title = entry.ae_title
                if counts[title] == 1 and title not in table and title not in shared:
                    table[title] = Route(entry.site, title)
        aliases: dict[tuple[str, str], str] = {}
        for title, route in table.items():
            # Several local titles may lead to one device: the first one (explicit entries first) names it.
            aliases.setdefault((route.site, route.ae_title), title)
        return cls(table, aliases)

    def route(self, called_ae: str) -> Route | None:
        return self.routes.get(called_ae)

    def local_alias(self, site: str, ae_title: str) -> str | None:
        """The local title under which a remote device is exposed here, if any."""
        return self.aliases.get((site, ae_title))


class RouteCache:
    """The route table of the current directory, rebuilt only when the directory object changes.

    `BridgeLink` replaces its `directory` list on every Directory message and never
    changes it in place, so identity is the version. The cache keeps a reference to
    the list it was built from, so that object cannot be freed and its id reused.
    """

    def __init__(self, remote: Sequence[RemoteDevice], shared_titles: Iterable[str], *, expose_all: bool) -> None:
        self._remote = tuple(remote)
        self._shared = frozenset(shared_titles)
        self._expose_all = expose_all
        self._source: object = None
        self._table: RouteTable | None = None
        self.builds = 0  # how many times the table was built (tests, debugging)

    def table(self, directory: Sequence[DirectoryDevice]) -> RouteTable:
        if self._table is None or directory is not self._source:
            self._table = RouteTable.build(self._remote, self._shared, directory, expose_all=self._expose_all)
            self._source = directory
            self.builds += 1
        return self._table


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
    refused: int | None = None
    public_detail: str | None = None
    security: bool = False
    alert: str | None = None
    log: str | None = None
    route: Route | None = None  # outbound: the route found before the rejection, if any


Admission = Admit | Reject


def admit_outbound(
    table: RouteTable, called_ae: str, *, running: int, limit: int, link_up: bool, link_error: str | None
) -> Admission:
    """A local device asked for `called_ae`. `running` counts associations in progress, this one included."""
    route = table.route(called_ae)
    if route is None:
        return Reject(
            Reason.UNKNOWN_CALLED_AE,
            f"called AE title {called_ae!r} is not a remote device on this router",
            rj=REJECT_UNKNOWN_CALLED,
        )
    if running > limit:
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
    running: int,
    limit: int,
    our_site: str,
) -> Admission:
    """The bridge announced an association from `from_site` for `called_ae`.

    `running` counts associations in progress before this one. Checked in this
    order: our limit, the device, our sharing rules, a replayed association id.
    """
    if running >= limit:
        detail = f"site {our_site} has reached its association limit"
        return Reject(
            Reason.ROUTER_LIMIT,
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
