"""Join tickets: how a destination router joins an association at the origin replica directly.

When router A's Open arrives at replica r1 and router B is held by r2, r1 issues a ticket for that
association and destination site and sends it, with its own name, inside the forwarded Open; r2
passes both to B with the incoming-association notice. B joins at r1 (a second connection to the
same balancer address, TLS server name `<r1>.<bridge name>`, routed on SNI) presenting the ticket
instead of a session, and r1 splices A and B locally: no frame crosses a second replica
(docs/high-availability.md, "The direct join").

A ticket is a capability, so it is as narrow as it can be:
- 256 random bits (`secrets`), kept only as its SHA-256 (the table holds no usable secret, and a
  lookup by digest leaks nothing about the ticket through timing);
- bound to one association id and one destination site (the caller's client certificate, with
  `require_client_cert`, must name that site);
- single-use: consumed by the first Join that presents it, whatever happens next (a replay is
  refused); after that it only authorizes the blob RPCs of its association, while it runs;
- short-lived: it expires after the join timeout (the time the Open waits for a Join anyway);
- at most one per association, and at most `capacity` in the table (then no ticket is issued and
  the association goes over the link, as before).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from relay_bridge.sessions import RouterSession

if TYPE_CHECKING:
    import grpc.aio

    from relay_bridge.state import BridgeState

log = logging.getLogger("relay_bridge.cluster")
TICKET_METADATA = "relay-join-ticket"  # the call metadata a ticketed Join and its blob RPCs carry
DIRECT_JOIN_PROTOCOL = "relay.v1.direct-join"  # in SignOn.protocols: the router can join directly
TICKET_BYTES = 32
TICKET_FORM = re.compile(r"[A-Za-z0-9_-]{32,64}")
# A replica name the routers can put in a TLS server name: one DNS label (RFC 1123), lowercase.
DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def replica_label(replica_id: str) -> str | None:
    """The replica id as the DNS label routers join at, or None if it cannot be one (no direct join)."""
    label = replica_id.lower()
    return label if DNS_LABEL.fullmatch(label) else None


def _digest(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode("ascii", "replace")).digest()


@dataclass
class Ticket:
    association_id: str
    site: str
    expires: float
    # After the Join: the association's only credential at this replica (blob RPCs), as a session that
    # holds just this association. None while the ticket is outstanding.
    grant: RouterSession | None = None


class JoinTickets:
    """The tickets this replica issued: outstanding ones, and redeemed ones while their association runs."""

    def __init__(self, capacity: int, lifetime_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._by_digest: dict[bytes, Ticket] = {}
        self._by_association: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def _expire(self) -> None:
        now = self._clock()
        for digest, ticket in list(self._by_digest.items()):
            if ticket.grant is None and ticket.expires <= now:
                self._drop(digest)

    def _drop(self, digest: bytes) -> None:
        ticket = self._by_digest.pop(digest, None)
        if ticket is not None and self._by_association.get(ticket.association_id) == digest:
            del self._by_association[ticket.association_id]

    def issue(self, association_id: str, site: str) -> str | None:
        """A new ticket for `site` to join `association_id` here; None when the association already has one
        or the table is full (the association then goes over the link: nothing fails)."""
        self._expire()
        if association_id in self._by_association:
            return None
        if len(self._by_digest) >= self.capacity:
            log.warning("join tickets: %d in use, none issued; over the replica link", self.capacity)
            return None
        ticket = secrets.token_urlsafe(TICKET_BYTES)
        digest = _digest(ticket)
        self._by_digest[digest] = Ticket(association_id, site, self._clock() + self.lifetime_s)
        self._by_association[association_id] = digest
        return ticket

    def redeem(self, ticket: str, peer: str) -> Ticket | None:
        """Consume an outstanding ticket (its first and only Join); None: unknown, used, revoked or expired."""
        if not TICKET_FORM.fullmatch(ticket):
            return None
        digest = _digest(ticket)
        entry = self._by_digest.get(digest)
        if entry is None or entry.grant is not None:
            return None  # never issued, revoked, or already used (a replay)
        if entry.expires <= self._clock():
            self._drop(digest)
            return None
        entry.grant = RouterSession(entry.site, "", peer, associations={entry.association_id})
        return entry

    def grant(self, ticket: str) -> RouterSession | None:
        """The credential of a redeemed ticket whose association still runs here (its blob RPCs); else None."""
        if not TICKET_FORM.fullmatch(ticket):
            return None
        entry = self._by_digest.get(_digest(ticket))
        return None if entry is None else entry.grant

    def outstanding(self, association_id: str) -> bool:
        digest = self._by_association.get(association_id)
        entry = None if digest is None else self._by_digest.get(digest)
        return entry is not None and entry.grant is None and entry.expires > self._clock()

    def revoke(self, association_id: str) -> bool:
        """The association went another way or ended: its ticket (used or not) is worth nothing from now.
        True if an unused ticket was withdrawn (no Join can use it any more)."""
        digest = self._by_association.get(association_id)
        if digest is None:
            return False
        entry = self._by_digest.get(digest)
        unused = entry is not None and entry.grant is None
        if entry is not None and entry.grant is not None:
            entry.grant.associations.discard(association_id)
        self._drop(digest)
        return unused


async def ticket_holder(state: BridgeState, context: grpc.aio.ServicerContext) -> RouterSession | None:
    """For a blob RPC: the credential of the join ticket in its metadata (a router that joined an association
    here directly), None for a call without one; a ticket that is not (or no longer) good aborts the call."""
    ticket = dict(context.invocation_metadata() or ()).get(TICKET_METADATA)
    if ticket is None:
        return None
    grant = state.cluster.tickets.grant(str(ticket)) if state.cluster is not None else None
    if grant is None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "join ticket not valid here (unused, or its association ended)"
        )
        raise AssertionError("unreachable: abort raises")
    problem = state.sessions.certificate_problem(context, grant.name)
    if problem:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
    return grant
