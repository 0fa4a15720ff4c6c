"""Who is signed on: router sessions, the login throttle, and the one check of a caller's session.

Every RPC after sign-on (Associate and the four blob RPCs) identifies its
caller the same way, with `SessionRegistry.authenticate_caller`: the session
token from the call's metadata, and with mutual TLS the client certificate's
name, which must be the session's account.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field

import grpc
import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.admission import certificate_problem
from relay_bridge.config import LimitsSection

log = logging.getLogger("relay_bridge")
SESSION_METADATA = "relay-session"


@dataclass
class RouterSession:
    """A signed-on router: its control stream's outbound queue and its session token."""

    name: str
    token: str
    peer: str
    since: float = field(default_factory=time.time)
    # None is the end-of-session sentinel; the queue is bounded, the sentinel always fits (see end()).
    outbox: asyncio.Queue[pb.BridgeMessage | None] = field(default_factory=lambda: asyncio.Queue(1024))
    associations: set[str] = field(default_factory=set)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # Publication rate limit: when the last one was applied, and the latest one waiting for its turn.
    published_at: float = 0.0
    pending_publication: list[pb.SharedDevice] | None = None
    # The router can join an association at another replica with a ticket (relay_bridge.cluster.tickets).
    direct_join: bool = False

    def end(self) -> None:
        """Stop this session's control stream (idempotent)."""
        if self.ended.is_set():
            return
        self.ended.set()
        if self.outbox.full():
            self.outbox.get_nowait()  # the session is over: what it had not sent is moot
        self.outbox.put_nowait(None)

    def send(self, message: pb.BridgeMessage) -> bool:
        if self.ended.is_set():
            return False
        try:
            self.outbox.put_nowait(message)
            return True
        except asyncio.QueueFull:
            log.warning("control queue of %s is full; dropping a message", self.name)
            return False


class SessionRegistry(dict[str, RouterSession]):
    """The signed-on routers by account name (one session per account)."""

    def __init__(self, *, require_client_cert: bool = False) -> None:
        super().__init__()
        self.require_client_cert = require_client_cert
        # Sessions of routers this draining replica moved while associations of theirs still ran here
        # (relay_bridge.lifecycle): the router signed on at another replica, and this token stays valid
        # for the blob RPCs of those associations only, until the last of them ends.
        self.moved: list[RouterSession] = []

    def keep_moved(self, session: RouterSession) -> None:
        """`session`'s control stream ended by a move while it still has associations here."""
        if session.associations and session not in self.moved:
            self.moved.append(session)

    def by_token(self, token: str, *, moved_ok: bool = False) -> RouterSession | None:
        """The live session with this token (compared in constant time), or None. `moved_ok`: a moved
        session with associations still running here counts too (for their blob RPCs, never for new ones)."""
        session = next((s for s in self.values() if secrets.compare_digest(s.token, token)), None)
        if session is not None and not session.ended.is_set():
            return session
        self.moved = [s for s in self.moved if s.associations]
        if not moved_ok:
            return None
        return next((s for s in self.moved if secrets.compare_digest(s.token, token)), None)

    def certificate_problem(self, context: grpc.aio.ServicerContext, account: str | None) -> str | None:
        """With mutual TLS on: why this call's client certificate does not fit `account` (None if it does)."""
        if not self.require_client_cert:
            return None
        return certificate_problem(context.auth_context().get("x509_common_name") or [], account)

    async def authenticate_caller(
        self, context: grpc.aio.ServicerContext, association_id: str | None = None, *, moved_ok: bool = False
    ) -> RouterSession:
        """The caller's session, or abort the call: no valid session, certificate of another account, or
        (with `association_id`) an association the caller is no end of. `moved_ok`: see `by_token`."""
        token = dict(context.invocation_metadata() or ()).get(SESSION_METADATA, "")
        session = self.by_token(token, moved_ok=moved_ok)
        if session is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid session: sign on first")
            raise AssertionError("unreachable: abort raises")
        problem = self.certificate_problem(context, session.name)
        if problem:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        if association_id:
            await require_association(context, session, association_id)
        return session


async def require_association(context: grpc.aio.ServicerContext, session: RouterSession, association_id: str) -> None:
    if association_id not in session.associations:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not an association of this router")


class LoginThrottle:
    """Counts failed sign-ons per account and per source address in a sliding window.

    An attempt is counted as a failure *before* its password is hashed (`begin`),
    and forgiven only when it succeeds (`Attempt.succeeded`); and only one attempt
    per account and per source address is in flight at a time (another one
    meanwhile is refused and counted as failed). So concurrent guesses cannot all
    pass the check before any of them is recorded.
    """

    def __init__(self, limit: int, window_s: float, *, max_pending: int = 32) -> None:
        self.limit, self.window, self.max_pending = limit, window_s, max_pending
        # Only the newest `limit` failures matter (blocked: the limit-th newest is inside the window).
        self._failures: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=limit)
        )
        self._in_flight: set[str] = set()
        self._attempts = 0

    def _recent(self, key: str) -> collections.deque[float]:
        q, cutoff = self._failures[key], time.monotonic() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def blocked(self, *keys: str) -> bool:
        blocked = False
        for k in keys:
            recent = len(self._recent(k))
            if not recent:
                # Forget keys without recent failures: a stream of sign-ons from fresh addresses
                # must not grow the table.
                del self._failures[k]
            blocked = blocked or recent >= self.limit
        return blocked

    def failed(self, *keys: str) -> None:
        for k in keys:
            self._recent(k).append(time.monotonic())

    @property
    def pending(self) -> int:
        """Attempts in flight (hashing, or waiting for a hashing thread)."""
        return self._attempts

    def begin(self, *keys: str) -> Attempt | None:
        """Start an attempt, counted as failed until it succeeds; None: refuse it unhashed (too many
        recent failures, another attempt for the same account or address still running, or too many
        attempts in flight in all)."""
        if self.blocked(*keys):
            return None
        if any(k in self._in_flight for k in keys):
            self.failed(*keys)  # a concurrent guess counts as a failed one: it cannot be a legitimate retry
            return None
        if self._attempts >= self.max_pending:
            return None
        now = time.monotonic()
        for k in keys:
            self._recent(k).append(now)
        self._in_flight.update(keys)
        self._attempts += 1
        return Attempt(self, keys, now)

    def _forgive(self, keys: tuple[str, ...], stamp: float) -> None:
        for k in keys:
            q = self._failures.get(k)
            if q is not None and stamp in q:
                q.remove(stamp)

    def _end(self, keys: tuple[str, ...]) -> None:
        self._in_flight.difference_update(keys)
        self._attempts -= 1


@dataclass
class Attempt:
    """One sign-on (or enrollment) attempt in flight; use as a context manager so it always ends."""

    throttle: LoginThrottle
    keys: tuple[str, ...]
    stamp: float
    # Names this attempt's rows in the cluster-wide count (relay_bridge.db.shared_limits).
    id: str = field(default_factory=lambda: secrets.token_hex(8))

    def succeeded(self) -> None:
        self.throttle._forgive(self.keys, self.stamp)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.throttle._end(self.keys)


def throttle_keys(account: str, source: str) -> tuple[str, str]:
    """Failures count against the account and against the address they came from."""
    return f"account:{account}", f"source:{source}"


def source_address(peer: str) -> str:
    # "ipv4:127.0.0.1:5555" -> "127.0.0.1"
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)  # grpc percent-encodes IPv6 brackets
    return rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer


async def first_message(
    context: grpc.aio.ServicerContext, limits: LimitsSection, stream: str, source: str
) -> pb.RouterMessage | object:
    """The first message of an unauthenticated stream, within `first_message_timeout_s` and
    `max_first_message_bytes`; aborts the call otherwise (a stream that sends nothing must not be held)."""
    try:
        first = await asyncio.wait_for(context.read(), limits.first_message_timeout_s)
    except TimeoutError:
        log.warning("%s stream from %s sent nothing in %.0f s; closed", stream, source, limits.first_message_timeout_s)
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"no first message within {limits.first_message_timeout_s:g} s (first_message_timeout_s)",
        )
        raise AssertionError("unreachable: abort raises") from None
    size = len(first) if isinstance(first, bytes) else (0 if first is grpc.aio.EOF else first.ByteSize())
    if size > limits.max_first_message_bytes:
        log.warning("%s stream from %s: first message of %d bytes refused", stream, source, size)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the first message ({size} bytes) exceeds {limits.max_first_message_bytes} bytes"
            " (max_first_message_bytes)",
        )
    return first
