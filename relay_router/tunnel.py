"""The router's outbound link to the bridge: one control stream, one stream per association.

`BridgeLink.run()` keeps the control stream up for the router's whole life:
sign on, publish the shared devices, follow the directory, hand incoming
association notices to the router, and reconnect with capped exponential
backoff and jitter whenever the bridge goes away. Association streams ride on
the same HTTP/2 connection (one gRPC channel), each with its own flow control.

Certificates: the channel is built from the bridge CA and the client pair from
enrollment as they were when it was made. When the files change (checked every
`TLS_CHECK_S`, at each reconnect, and at once on SIGHUP) the next channel uses
them: the router moves its control stream to a new channel as soon as no
association stream is open on the current one, and the old channel closes when
its last stream has ended. Running associations are never cut for a renewal.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from protos.relay.v1 import relay_pb2_grpc as pb_grpc
from relay_common.audit import AuditLog
from relay_common.config import parse_host_port
from relay_common.metrics import package_version
from relay_common.tlsreload import CertificateFilesError, ReloadingClientCredentials, add_reload_hook
from relay_common.validate import printable
from relay_router.association_stream import AssociationStream, ChannelCalls
from relay_router.bridge_notice import check_notice
from relay_router.config import RouterConfig
from relay_router.direct_join import (
    DIRECT_JOIN_PROTOCOL,
    TICKET_METADATA,
    JoiningStream,
    PendingJoin,
    ReplicaChannels,
    base_server_name,
    check_offer,
    send_direct_join,
)
from relay_router.egress import redact
from relay_router.peers import PeerKeys
from relay_router.seal import KEM_NAME, Identity, PublicIdentity
from relay_router.services import ordered, service_grants

log = logging.getLogger("relay_router.tunnel")
SOFTWARE_VERSION = f"dicom-relay/{package_version()}"
MAX_MESSAGE = 20 * 1024 * 1024
TLS_CHECK_S = 60.0  # how often the certificate files are checked for a renewal (SIGHUP: at once)
SIGN_ON_POLL_S = 0.05
# Blob part URLs remembered with the session they were issued under (see `CallRoute`).
MAX_ROUTED_URLS = 4096
# How long a site stays "listed online a moment ago" for the Open retry (relay_router.open_retry):
# long enough to cover a router moving between replicas, short enough that a site whose router
# stopped is refused within seconds.
ONLINE_MEMORY_S = 2.0


class LinkDown(Exception):
    """The bridge cannot be reached right now (a transient condition)."""


@dataclass(frozen=True)
class DirectoryEntry:
    site: str
    ae_title: str
    description: str
    online: bool
    services: tuple[str, ...] = ()  # service groups the owner granted us; () = not published (older owner)


@dataclass(frozen=True)
class CallRoute:
    """Where the calls about one association go: the channel it runs on and the session it was opened
    or joined with. After a `Move` the router signs on elsewhere, while its running associations stay
    on the old connection and the draining replica; their blob RPCs must follow them there, with the
    session that replica knows (relay_bridge.lifecycle)."""

    stub: pb_grpc.RelayStub
    metadata: tuple[tuple[str, str], ...]


IncomingHandler = Callable[[pb.IncomingAssociation], Coroutine[Any, Any, None]]


class BridgeLink:
    def __init__(self, config: RouterConfig, on_incoming: IncomingHandler, audit: AuditLog | None = None) -> None:
        self.config = config
        self.audit = audit or AuditLog(None, app="relay-router")
        state = config.router.state_dir
        self.identity = Identity.load_or_create(state / "identity.key")
        self.peers = PeerKeys(
            state / "known_sites.json",
            {p.site: p.fingerprint for p in config.pin},
            require_pin=config.router.require_pin,
            trust_first_use=config.router.trust_first_use,
        )
        self._on_incoming = on_incoming
        # Outbound HTTP (relay_router.egress): the proxy for this link and the spill's URLs, and which
        # spill URLs may be opened at all (BridgeBlobTransport reads both from here).
        self.proxies = config.bridge.proxy_settings()
        self.spill_policy = config.dicom.spill_policy()
        self.spill_enabled = config.dicom.spill
        host, port = parse_host_port(config.bridge.address, default_host="")
        self.proxy = self.proxies.for_target("https", host, port)  # "" for a direct connection
        # The direct join (relay_router.direct_join): the name replica labels go under (None: we do not
        # offer it: switched off, no TLS, or a bridge known by IP address only), and the replica channels.
        bridge = config.bridge
        self._direct_base = (
            base_server_name(host, bridge.server_name) if bridge.direct_join and not bridge.insecure else None
        )
        self._replicas = ReplicaChannels(lambda server_name: self._make_channel(server_name))
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.RelayStub | None = None
        self._session: str | None = None
        self.site = config.router.name
        self.directory: list[DirectoryEntry] = []
        self.connected_since: float | None = None
        # When the bridge last told this router to move, and when each site was last listed online
        # (monotonic): an Open made just after is retried for a moment (relay_router.open_retry).
        self.moved_at: float | None = None
        self._online_at: dict[str, float] = {}
        self._listed_online: set[str] = set()
        self.last_error: str | None = None
        self.reconnects = 0
        self.directory_changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Certificate reload: the files' state the channel was built from, the Associate calls on it, the
        # control call (ended on purpose to move to a new channel), channels closing once unused.
        self._tls: ReloadingClientCredentials | None = None
        self._channel_tls: tuple[int, int] | None = None
        self._calls = ChannelCalls()
        # Each running association's route, and the blob part URLs issued for them (bounded, oldest out).
        self._routes: dict[str, CallRoute] = {}
        self._url_routes: collections.OrderedDict[str, CallRoute] = collections.OrderedDict()
        self._control_call: grpc.aio.StreamStreamCall | None = None
        self._moving = False
        self._new_connection = False  # the next sign-on opens a new connection (Move, or a refusal)
        self._retired: set[grpc.aio.Channel] = set()
        self._tls_check = asyncio.Event()
        self._remove_reload_hook: Callable[[], None] | None = None
        # One write at a time on the control stream: heartbeats and publications (configuration reload).
        self._control_writes = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._session is not None

    def _make_channel(self, replica_server_name: str | None = None) -> grpc.aio.Channel:
        """A channel to the configured bridge address; `replica_server_name`: with that TLS server name (SNI, and
        the name the certificate must cover) instead of the configured one, for a direct join."""
        bridge = self.config.bridge
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", int(bridge.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            # grpcio times keepalive pings out after this (default 60 s), not after keepalive_timeout_ms.
            ("grpc.http2.ping_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Start every stream with a large flow-control window; BDP probing still tunes it.
            ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
            # Our own reconnect loop paces retries; keep gRPC's short so a restarted bridge is found quickly.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", int(bridge.reconnect_max_s * 1000)),
            # Each channel its own TCP connection: grpc would otherwise share one between channels with the
            # same target and options, and a new channel after `Move` would reach the draining replica again.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        # The proxy from our configuration (or the environment, resolved once by relay_router.egress,
        # with no_proxy applied): grpc tunnels through it with HTTP CONNECT, basic authentication
        # from the URL's user info. Otherwise grpc must not pick up a proxy variable on its own.
        if self.proxy:
            options.append(("grpc.http_proxy", self.proxy))
        else:
            options.append(("grpc.enable_http_proxy", 0))
        if bridge.insecure:
            return grpc.aio.insecure_channel(bridge.address, options=options)
        server_name = replica_server_name or bridge.server_name
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        assert bridge.ca_file is not None
        if self._tls is None:
            state = self.config.router.state_dir  # client.pem and client.key: issued by `relay-router enroll`
            self._tls = ReloadingClientCredentials(bridge.ca_file, state / "client.pem", state / "client.key")
        credentials, files = self._tls.credentials()
        if replica_server_name is None:
            self._channel_tls = files
        return grpc.aio.secure_channel(bridge.address, credentials, options=options)

    # -- certificate reload -------------------------------------------------------------------
    def reload_credentials(self) -> None:
        """SIGHUP: check the certificate files now; a change moves the link to a new channel when idle."""
        self._tls_check.set()

    def _credentials_outdated(self) -> bool:
        if self._tls is None:
            return False
        self._tls.refresh()
        return self._tls.changed_since(self._channel_tls)

    def _replace_channel(self) -> None:
        """Build the next channel from the current files; the old one closes once its streams have ended."""
        old, calls = self._channel, self._calls
        self._channel = self._make_channel()
        self._stub = pb_grpc.RelayStub(self._channel)
        self._calls = ChannelCalls()
        log.info("new connection to the bridge")
        if old is not None:
            self._retired.add(old)
            self._spawn(self._close_when_unused(old, calls))

    async def _close_when_unused(self, channel: grpc.aio.Channel, calls: ChannelCalls) -> None:
        await calls.idle.wait()
        self._retired.discard(channel)
        await channel.close(grace=5.0)  # unary blob RPCs still in flight get a moment

    async def _watch_certificates(self) -> None:
        """Every TLS_CHECK_S (or on SIGHUP): when the files changed, move to a new channel once idle."""
        while not self._stopping:
            try:
                await asyncio.wait_for(self._tls_check.wait(), TLS_CHECK_S)
            except TimeoutError:
                pass
            self._tls_check.clear()
            if not self._credentials_outdated():
                continue
            await self._calls.idle.wait()  # never cut a running association for a renewal
            if self._control_call is not None and self._credentials_outdated():
                log.info("certificate files changed: reconnecting to the bridge with them")
                self._moving = True
                self._control_call.cancel()  # run() builds the new channel and signs on again at once

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _track(self, call: grpc.aio.Call, association_id: str, route: CallRoute) -> None:
        self._calls.track(call)
        self._routes[association_id] = route
        call.add_done_callback(lambda _: self._routes.pop(association_id, None))

    def shared_devices(self) -> list[pb.SharedDevice]:
        return [
            pb.SharedDevice(
                ae_title=d.ae_title, description=d.description, share_with=d.share_with, grants=service_grants(d)
            )
            for d in self.config.shared
        ]

    async def run(self) -> None:
        """Keep the control stream up until `stop()`."""
        password = self.config.bridge.resolve_password()
        while True:
            try:
                self._channel = self._make_channel()
                break
            except CertificateFilesError as exc:  # e.g. a key that is not the certificate's: wait for a fix
                self.last_error = str(exc)
                log.error("cannot connect to the bridge: %s", exc)
                await asyncio.sleep(self.config.bridge.reconnect_max_s)
        self._stub = pb_grpc.RelayStub(self._channel)
        if not self.config.bridge.insecure:
            self._remove_reload_hook = add_reload_hook(self.reload_credentials)
            self._spawn(self._watch_certificates())
        delay = self.config.bridge.reconnect_min_s
        while not self._stopping:
            started = time.monotonic()
            if self._credentials_outdated() or self._new_connection:
                self._new_connection = False
                self._replace_channel()
            try:
                await self._control_session(password)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._moving or (task is not None and task.cancelling()):
                    raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    # Maybe a draining replica answered over our old connection: the next attempt opens a
                    # new one, so that a load balancer can pick a live replica.
                    self._new_connection = True
                if not self._moving:
                    previous, self.last_error = self.last_error, self._describe(exc)
                    if self.proxy and self.last_error != previous:  # once per new failure, not per retry
                        log.warning("cannot reach the bridge: %s", self.last_error)
            except Exception as exc:  # keep reconnecting whatever went wrong
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("control stream failed")
            finally:
                if self._session is not None and not self._stopping and not self._moving:
                    log.warning("lost the bridge: %s", self.last_error)
                self._session = None
                self.connected_since = None
            if self._stopping:
                break
            if self._moving:  # a planned move to a new channel: no backoff
                self._moving = False
                continue
            if time.monotonic() - started > 60:
                delay = self.config.bridge.reconnect_min_s  # the last session was healthy
            wait = random.uniform(delay / 2, delay)
            log.info("reconnecting to the bridge in %.1f s (%s)", wait, self.last_error)
            await asyncio.sleep(wait)
            self.reconnects += 1
            delay = min(delay * 2, self.config.bridge.reconnect_max_s)

    def _describe(self, exc: grpc.aio.AioRpcError) -> str:
        """The link's failure as `status` shows it; through a proxy, what the proxy said and what to check."""
        text = f"{exc.code().name}: {exc.details()}"
        if not self.proxy or exc.code() != grpc.StatusCode.UNAVAILABLE:
            return text
        details = exc.details() or ""
        proxy = redact(self.proxy)
        if "response code 407" in details:
            return (
                f"the proxy {proxy} refused the tunnel to the bridge: HTTP 407, check the proxy user and "
                f"password ({text})"
            )
        if "response code 403" in details:
            return (
                f"the proxy {proxy} refused the tunnel to the bridge: HTTP 403, it does not allow CONNECT to "
                f"{self.config.bridge.address} ({text})"
            )
        if "response code" in details:
            return f"the proxy {proxy} refused the tunnel to the bridge ({text})"
        lowered = details.lower()
        if "handshake failed" in lowered or "certificate" in lowered:
            return (
                f"the TLS handshake with the bridge through the proxy {proxy} failed: its certificate does not "
                "verify against ca_file; a TLS-inspecting proxy must exempt the bridge (docs/operations.md) "
                f"({text})"
            )
        if "connection refused" in lowered or "connect" in lowered or "timeout" in lowered:
            return f"the proxy {proxy} is unreachable or closed the tunnel ({text})"
        return f"through the proxy {proxy}: {text}"

    async def _control_session(self, password: str) -> None:
        assert self._stub is not None
        call = self._control_call = self._stub.Control()
        try:
            await call.write(
                pb.RouterMessage(
                    sign_on=pb.SignOn(
                        account=self.site,
                        password=password,
                        software_version=SOFTWARE_VERSION,
                        protocols=["relay.v1", DIRECT_JOIN_PROTOCOL] if self._direct_base else ["relay.v1"],
                        devices=self.shared_devices(),
                        identity=pb.Identity(
                            sign_key=self.identity.public.sign_key,
                            kem_key=self.identity.public.kem_key,
                            kem=KEM_NAME,
                        ),
                    )
                )
            )
            first = await call.read()
            if first is grpc.aio.EOF or not first.HasField("sign_on_result"):
                raise ConnectionError("the bridge closed the control stream during sign-on")
            result = first.sign_on_result
            if not result.ok:
                self.last_error = f"sign-on refused: {result.error}"
                self.audit.event(
                    "sign_on", "failure", site=self.site, bridge=self.config.bridge.address, detail=result.error
                )
                log.error("the bridge refused sign-on for %r: %s", self.site, result.error)
                return
            self._session = result.session
            self.connected_since = time.time()
            self.last_error = None
            log.info("signed on to the bridge at %s as %s", self.config.bridge.address, result.site)
            heartbeat = asyncio.create_task(self._heartbeats(call, max(result.heartbeat_interval_s, 1)))
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        self.last_error = "the bridge ended the control stream"
                        return
                    await self._handle(message)
                    if self._new_connection:
                        self.last_error = "moved by the bridge (draining)"
                        return
            finally:
                heartbeat.cancel()
        finally:
            self._control_call = None
            call.cancel()

    async def _heartbeats(self, call: grpc.aio.StreamStreamCall, interval: int) -> None:
        while True:
            await asyncio.sleep(interval)
            async with self._control_writes:
                await call.write(pb.RouterMessage(heartbeat=pb.Heartbeat(sent_unix_ms=int(time.time() * 1000))))

    async def publish_devices(self) -> bool:
        """Send the configured [[shared]] devices to the bridge now (after a configuration reload).

        False when not signed on: the next sign-on carries them. The bridge applies at most one
        publication per interval (2 s by default); the directory it sends afterwards shows the result.
        """
        call = self._control_call
        if call is None or self._session is None:
            return False
        async with self._control_writes:
            await call.write(pb.RouterMessage(publish=pb.PublishDevices(devices=self.shared_devices())))
        return True

    async def _handle(self, message: pb.BridgeMessage) -> None:
        if message.HasField("directory"):
            mismatched = self.peers.update(
                {i.site: PublicIdentity(i.identity.sign_key, i.identity.kem_key) for i in message.directory.identities}
            )
            for site, offered in mismatched.items():
                self.audit.event(
                    "identity_mismatch", "alert", site=site, offered=offered, pinned=self.peers.expected(site)
                )
            self.directory = [
                DirectoryEntry(d.site, d.ae_title, d.description, d.online, ordered(d.services))
                for d in message.directory.devices
            ]
            # Online until now: the sites online in the previous directory and in this one (the
            # directory is sent on changes only, so a stamp says when it was last known online).
            now = time.monotonic()
            self._online_at = {s: t for s, t in self._online_at.items() if now - t <= ONLINE_MEMORY_S}
            self._online_at.update((site, now) for site in self._listed_online)
            self._listed_online = {d.site for d in self.directory if d.online}
            self.directory_changed.set()
            self.directory_changed = asyncio.Event()
            log.info("directory: %d remote devices reachable", len(self.directory))
        elif message.HasField("audit"):
            notice = check_notice(message.audit)  # the bridge's event and fields are not trusted
            if notice is not None:
                self.audit.event(
                    notice.event,
                    "alert",
                    peer_site=notice.peer_site,
                    ae_title=notice.ae_title,
                    detail=notice.detail,
                    reported_by="bridge",
                )
        elif message.HasField("move"):
            # The replica is draining: sign on again over a new connection (a load balancer sends it to
            # another replica); running associations keep their streams on the old one until they end.
            log.info("the bridge asks this router to move (%s); reconnecting now", printable(message.move.reason[:64]))
            self._new_connection = True
            self._moving = True  # run() signs on again without a backoff; _control_session returns
            self.moved_at = time.monotonic()
        elif message.HasField("incoming"):
            task = asyncio.create_task(self._on_incoming(message.incoming))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def recently_online(self, site: str, within_s: float) -> bool:
        """The bridge lists a device of `site` online in its latest directory, or did until `within_s` s ago."""
        if site in self._listed_online:
            return True
        seen = self._online_at.get(site)
        return seen is not None and time.monotonic() - seen <= within_s

    def moved_recently(self, within_s: float) -> bool:
        """The bridge told this router to move (a draining replica) within the last `within_s` seconds."""
        return self.moved_at is not None and time.monotonic() - self.moved_at <= within_s

    def reconnecting(self, within_s: float) -> bool:
        """Not signed on, but was within `within_s` seconds (a move or a re-sign-on under way)."""
        if self.connected:
            return False
        return self._moving or self.moved_recently(within_s)

    async def wait_signed_on(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a session (polled: sign-ons are rare, and this needs no new state)."""
        deadline = time.monotonic() + timeout_s
        while not self.connected and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(SIGN_ON_POLL_S, left))
        return self.connected

    def _current_route(self) -> CallRoute:
        if self._session is None or self._stub is None:
            raise LinkDown(self.last_error or "not signed on to the bridge")
        return CallRoute(self._stub, (("relay-session", self._session),))

    async def open(self, request: pb.Open) -> tuple[AssociationStream, pb.Frame]:
        """Open an association stream; returns it with the bridge's answer (Accepted or Refused)."""
        route = self._current_route()
        call = route.stub.Associate(metadata=route.metadata)
        self._track(call, request.association_id, route)
        stream = AssociationStream(call)
        try:
            await stream.send(pb.Frame(open=request))
            answer = await asyncio.wait_for(stream.receive(), self.config.bridge.open_timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            call.cancel()
            raise LinkDown(f"the bridge did not accept the association stream: {exc}") from exc
        if answer is None:
            call.cancel()
            raise LinkDown("the bridge closed the association stream")
        return stream, answer

    # -- blob RPCs (cloud spill: relay_router.spill_store.BridgeBlobTransport) ------------------
    def _association_route(self, association_id: str) -> CallRoute:
        """The route of a running association; the current one otherwise (LinkDown when not signed on)."""
        return self._routes.get(association_id) or self._current_route()

    def _url_route(self, url: str) -> CallRoute:
        """The route a blob part URL was issued on (the current one for a URL not remembered)."""
        route = self._url_routes.get(url)
        return self._current_route() if route is None else route

    async def blob_slot(self, request: pb.BlobSlotRequest, *, timeout_s: float) -> pb.BlobSlotResponse:
        """A presigned URL for one part of a blob of one of our associations (gRPC errors pass through)."""
        route = self._association_route(request.association_id)
        answer: pb.BlobSlotResponse = await route.stub.BlobSlot(request, metadata=route.metadata, timeout=timeout_s)
        self._url_routes[answer.url] = route
        self._url_routes.move_to_end(answer.url)
        while len(self._url_routes) > MAX_ROUTED_URLS:
            self._url_routes.popitem(last=False)
        return answer

    async def put_blob_part(self, part: pb.BlobPart, *, timeout_s: float) -> None:
        """Store a part through the bridge (its file:// store, whose URLs are capabilities for this RPC)."""
        route = self._url_route(part.url)
        await route.stub.PutBlobPart(part, metadata=route.metadata, timeout=timeout_s)

    async def get_blob_part(self, part: pb.BlobPart, *, timeout_s: float) -> pb.BlobPart:
        route = self._url_route(part.url)
        answer: pb.BlobPart = await route.stub.GetBlobPart(part, metadata=route.metadata, timeout=timeout_s)
        return answer

    async def release_blob(self, request: pb.BlobSlotRequest, *, timeout_s: float) -> None:
        """The blob was delivered: the bridge may delete it now."""
        route = self._association_route(request.association_id)
        await route.stub.ReleaseBlob(request, metadata=route.metadata, timeout=timeout_s)

    async def join(self, association_id: str, offer: pb.DirectJoin | None = None) -> AssociationStream:
        """Join an association we were told of: at the replica it waits at when the notice offers that
        (relay_router.direct_join), else, or when that fails, through our own session. A direct join
        answers in the background: the caller checks the notice and reaches its device meanwhile."""
        route = self._current_route()  # LinkDown now, as for any join; also the fallback's route
        checked = None if offer is None or self._direct_base is None else check_offer(offer, self._direct_base)
        if checked is None:
            if offer is not None and offer.replica and self._direct_base is not None:
                log.warning(
                    "a direct-join offer that is not well-formed; joining the ordinary way",
                    extra={"assoc": association_id},
                )
            return await self._join_on(route, association_id)
        pending = await send_direct_join(self._replicas, association_id, checked)
        if pending is None:
            return await self._join_on(route, association_id)
        return JoiningStream(
            pending, lambda: self._joined_directly(pending), lambda: self._join_on(route, association_id)
        )

    def _joined_directly(self, pending: PendingJoin) -> AssociationStream:
        aid = pending.association_id
        # Its blob RPCs go there too, with the ticket as their credential (CallRoute).
        self._routes[aid] = CallRoute(pending.stub, ((TICKET_METADATA, pending.offer.ticket),))
        pending.call.add_done_callback(lambda _: self._routes.pop(aid, None))
        return AssociationStream(pending.call)

    async def _join_on(self, route: CallRoute, association_id: str) -> AssociationStream:
        call = route.stub.Associate(metadata=route.metadata)
        self._track(call, association_id, route)
        stream = AssociationStream(call)
        await stream.send(pb.Frame(join=pb.Join(association_id=association_id)))
        return stream

    async def stop(self) -> None:
        self._stopping = True
        if self._remove_reload_hook is not None:
            self._remove_reload_hook()
        for task in list(self._tasks):
            task.cancel()
        await self._replicas.close()
        for channel in [*self._retired, self._channel]:
            if channel is not None:
                await channel.close(grace=1.0)
