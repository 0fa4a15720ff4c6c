"""The replica link: one mutual-TLS TCP connection per forwarded association (framing in link_codec).

Why not the Forward gRPC call: the bridge's frames are small after the routers' compression
(12-31 KB on average in the cluster benchmark), and a Python gRPC stream pays a fixed cost per
message (completion-queue events, an eventfd wake-up, futures) on both replicas. A length-prefixed
frame on a TLS socket, decoded from whatever arrived in one read, costs a few microseconds of
Python per frame (docs/high-availability.md, "What a cross-replica association costs").

What stays as it was:
- **Backpressure**: the receiving end queues at most `READ_BUFFER_BYTES` of frames (or
  `READ_QUEUE_FRAMES` frames), then stops reading the socket (`pause_reading`); TCP flow control
  holds the sender, whose `write` waits while the transport's buffer is above its high-water
  mark. Nothing is buffered without bound.
- **Bytes opaque**: frames cross as the bytes they arrived as.
- **Mutual TLS with the cluster CA**: both ends present the cluster certificate; the client
  checks the server's name (`CLUSTER_NAME`), the server checks the client's after the handshake.
  Addresses: the host from the replicas table, the port as the holding replica itself answered on
  the authenticated gRPC channel (`Cluster/Link`); never anything a router sent.
- **Setup pays no handshake**: `LinkPool` keeps `WARM` connected links per peer replica and refills
  in the background after each use. A link carries one association, then closes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.cluster.link_codec import END, END_FRAME, FrameDecoder, Header, LinkProtocolError, encode
from relay_bridge.cluster.pki import CLUSTER_NAME
from relay_bridge.sessions import first_message
from relay_common.config import parse_host_port
from relay_common.validate import is_site_name

if TYPE_CHECKING:
    from relay_bridge.splice import AssociationService

log = logging.getLogger("relay_bridge.cluster")
REPLICA_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # as [cluster] replica_id
WARM = 4  # connected links kept ready per peer replica
# A link taken is replaced this long after: the new link's TLS handshake (CPU on both replicas)
# then does not compete with the association that is being set up.
REFILL_DELAY_S = 0.25
CONNECT_TIMEOUT_S = 3.0
MAX_IDLE_LINKS = 256  # links accepted and not yet carrying an association (a peer's warm pool is WARM)
FRAME_MARGIN = 64 * 1024  # above max_frame_bytes, as the gRPC message limits
WRITE_HIGH_WATER = 256 * 1024
# The receiving end stops reading the socket once this many bytes of frames wait to be taken (or
# `depth` frames, for large frames): as much as the HTTP/2 window a Forward call had
# (grpc.http2.lookahead_bytes), so a link holds no more than a call did, and a fast sender is not
# stopped and restarted for every frame.
READ_BUFFER_BYTES = 4 * 1024 * 1024
READ_QUEUE_FRAMES = 256


class LinkClosed(ConnectionError):
    """The link ended without its end mark (cut, reset, or broken framing), or was written after it ended."""


class LinkAborted(Exception):
    """The holding side refused the link (bad header, bad first frame): the connection is dropped."""


class Link(asyncio.Protocol):
    """One end of a link: bounded frame queue in, flow-controlled writes out.

    Its `read`/`write`/`done_writing`/`cancel` match the grpc.aio stream call the origin used,
    and `read` returns grpc.aio.EOF at the peer's end mark, so the splice pumps take either.
    """

    def __init__(
        self,
        max_frame_bytes: int,
        depth: int,
        *,
        server_side: bool,
        on_connected: Callable[[Link], None] | None = None,
    ) -> None:
        self._on_connected = on_connected
        self._decoder = FrameDecoder(max_frame_bytes + FRAME_MARGIN)
        self._depth = max(depth, 1)
        self._server_side = server_side
        self._frames: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes in _frames
        self._ended = False  # the peer's end mark arrived
        self._error: Exception | None = None
        self._lost = False
        self._reading_paused = False
        self._writing_paused = False
        self._sent_end = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # an idle warm link to a dead host
        if self._server_side and not presents_cluster_certificate(transport.get_extra_info("peercert")):
            log.error("link from %s without the cluster certificate; closed", self.peer)
            return self._fail(LinkClosed("the cluster certificate is required"))
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except LinkProtocolError as exc:
            log.warning("link from %s broke its framing: %s; closed", self.peer, exc)
            return self._fail(LinkClosed(str(exc)))
        for frame in frames:
            if self._ended:
                log.warning("link from %s sent a frame after its end mark; closed", self.peer)
                return self._fail(LinkClosed("a frame after the end mark"))
            if frame is END:
                self._ended = True
            else:
                self._frames.append(frame)
                self._queued += len(frame)
        if self._full() and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()  # TCP flow control holds the sender from here
        self._wake_reader()

    def eof_received(self) -> bool:
        return False  # close; connection_lost tells whether the end mark came first

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._error is None and not self._ended:
            self._error = LinkClosed(f"the link was cut ({exc or 'closed'})")
        self._wake_reader()
        self._wake_drain(LinkClosed("the link is closed"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain(None)

    # -- the call interface
    @property
    def usable(self) -> bool:
        """Connected, nothing received, nothing wrong: a warm link that can take an association."""
        return not self._lost and self._error is None and self.transport is not None and not self._frames

    async def read(self) -> bytes | object:
        """The next frame; grpc.aio.EOF after the peer's end mark. Raises LinkClosed if it was cut."""
        while not self._frames:
            if self._ended:
                return grpc.aio.EOF
            if self._error is not None:
                raise self._error
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        frame = self._frames.popleft()
        self._queued -= len(frame)
        if self._reading_paused and not self._full() and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return frame

    async def write(self, frame: bytes, *more: bytes) -> None:
        """Send one frame (or several, in one TLS write: the header and the Open); waits while the peer does
        not read (backpressure). Raises LinkClosed."""
        transport = self.transport
        if transport is None or self._lost or self._sent_end or transport.is_closing():
            raise LinkClosed("the link is closed")
        # One TLS write per call (a copy costs less than a second record).
        if more:
            transport.write(b"".join(part for f in (frame, *more) for part in (encode(f), f)))
        else:
            transport.write(encode(frame) + frame)
        while self._writing_paused and not self._lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    async def done_writing(self) -> None:
        """The end mark: nothing more will be sent on this link."""
        transport = self.transport
        if transport is not None and not self._lost and not self._sent_end and not transport.is_closing():
            self._sent_end = True
            transport.write(END_FRAME)

    def cancel(self) -> None:
        """Done with the link: closed after what is written (if the end mark went) or cut at once."""
        if self.transport is not None and not self.transport.is_closing():
            if self._sent_end:
                self.transport.close()
            else:
                self.transport.abort()

    # -- internals
    def _full(self) -> bool:
        """Enough is queued: stop reading (the peer's writes then wait on TCP flow control)."""
        return self._queued >= READ_BUFFER_BYTES or len(self._frames) >= self._depth

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._frames.clear()
        self._queued = 0
        if self.transport is not None:
            self.transport.abort()
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    def _wake_drain(self, error: Exception | None) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


def presents_cluster_certificate(peercert: object) -> bool:
    """The verified peer certificate (the TLS layer checked the cluster CA) names the cluster."""
    if not isinstance(peercert, dict):
        return False
    names = [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names == [CLUSTER_NAME]


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # both ends are ours
    context.load_cert_chain(cert, key)
    # The cluster CA only: a router's certificate, or a public CA's, never gets in.
    context.load_verify_locations(cafile=ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=ca)
    return context


class LinkContext:
    """The holding side's link, seen as the grpc.aio context accept_forwarded and the splice use."""

    def __init__(self, link: Link, origin: str) -> None:
        self.link = link
        self.origin = origin

    async def read(self) -> bytes | object:
        return await self.link.read()

    async def write(self, frame: bytes) -> None:
        await self.link.write(frame)

    async def abort(self, code: grpc.StatusCode, detail: str) -> None:
        log.warning("link from replica %s refused: %s (%s)", self.origin, detail, code.name)
        raise LinkAborted(detail)

    def peer(self) -> str:
        return self.link.peer


class LinkServer:
    """The holding side: accepts links from the other replicas and runs each association's destination end."""

    def __init__(self, associations: AssociationService, context: ssl.SSLContext) -> None:
        self.associations = associations
        self._context = context
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[Link] = set()
        self._idle = 0
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        limits = self.associations.state.config.limits
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Link(limits.max_frame_bytes, READ_QUEUE_FRAMES, server_side=True, on_connected=self._accepted),
            host or None,
            port,
            ssl=self._context,
            ssl_handshake_timeout=CONNECT_TIMEOUT_S,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _accepted(self, link: Link) -> None:
        """A link whose TLS handshake and certificate check passed."""
        if self._idle >= MAX_IDLE_LINKS:
            log.warning("more than %d idle links from other replicas; one more closed", MAX_IDLE_LINKS)
            link.cancel()
            return
        self._idle += 1
        task = asyncio.get_running_loop().create_task(self._serve(link), name="cluster-link")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, link: Link) -> None:
        self._links.add(link)
        idle = True
        try:
            raw = await link.read()  # a warm link waits here until the origin needs it
            self._idle, idle = self._idle - 1, False
            if not isinstance(raw, bytes):
                return
            header = Header.decode(raw)
            if not is_site_name(header.from_site):
                raise LinkProtocolError("the link header's site is not a site name")
            if not REPLICA_ID.fullmatch(header.origin):  # it is logged: no control characters
                raise LinkProtocolError("the link header's replica id is not one")
            await self._run(link, header)
        except (LinkClosed, LinkProtocolError, LinkAborted) as exc:
            if not isinstance(exc, LinkAborted) and not (idle and isinstance(exc, LinkClosed)):
                log.warning("link from %s ended: %s", link.peer, exc)
            link.cancel()
        except Exception:
            log.exception("link from %s failed", link.peer)
            link.cancel()
        else:
            await link.done_writing()
            link.cancel()
        finally:
            if idle:
                self._idle -= 1
            self._links.discard(link)

    async def _run(self, link: Link, header: Header) -> None:
        from relay_bridge.cluster.forward import accept_forwarded

        service = self.associations
        context = LinkContext(link, header.origin)
        raw = await first_message(
            context,
            service.state.config.limits,
            "Link",
            f"replica {context.origin!r}",
        )
        if not isinstance(raw, bytes):
            return
        try:
            first = pb.Frame.FromString(raw)
        except DecodeError:
            raise LinkAborted("the first frame is not a relay.v1.Frame") from None
        if not first.HasField("open"):
            raise LinkAborted("the first frame must be Open")
        await accept_forwarded(service, header.from_site, first.open, context)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class LinkPool:
    """The origin side: warm links per peer replica address, and the port each replica answered."""

    def __init__(self, context: ssl.SSLContext, *, max_frame_bytes: int, depth: int = READ_QUEUE_FRAMES) -> None:
        self._context = context
        self._max_frame_bytes = max_frame_bytes
        self._depth = depth
        self._ports: dict[str, int | None] = {}  # replica address -> its link port; None: it has none
        self._idle: dict[str, collections.deque[Link]] = {}
        self._refills: dict[str, asyncio.Task[None]] = {}

    async def take(self, address: str, discover: Callable[[], Awaitable[int | None]]) -> Link | None:
        """A connected link to the replica at `address`; None: use the Forward call instead.

        `discover` asks the replica for its link port once (None: it has none, an older version).
        """
        if address not in self._ports:
            self._ports[address] = await discover()  # raises when the replica cannot say now
        port = self._ports[address]
        if port is None:
            return None
        idle = self._idle.setdefault(address, collections.deque())
        link = None
        while idle:
            candidate = idle.popleft()
            if candidate.usable:
                link = candidate
                break
            candidate.cancel()
        if link is None:
            try:
                link = await self._connect(address, port)
            except (OSError, TimeoutError, ValueError) as exc:
                # Ask for the port again next time: a replica restarted at the same address has a new one.
                self.forget(address)
                log.info("no link to replica at %s (%s); using the Forward call", address, exc)
                return None
        self._refill(address, port)
        return link

    def forget(self, address: str) -> None:
        """The replica failed: ask its port again next time, drop its warm links."""
        self._ports.pop(address, None)
        for link in self._idle.pop(address, ()):
            link.cancel()

    async def _connect(self, address: str, port: int) -> Link:
        host, _ = parse_host_port(address, default_host="")
        if not host:
            raise ValueError(f"replica address {address!r} has no host")
        loop = asyncio.get_running_loop()
        _, link = await asyncio.wait_for(
            loop.create_connection(
                lambda: Link(self._max_frame_bytes, self._depth, server_side=False),
                host,
                port,
                ssl=self._context,
                server_hostname=CLUSTER_NAME,  # every replica's certificate names the cluster
                ssl_handshake_timeout=CONNECT_TIMEOUT_S,
            ),
            CONNECT_TIMEOUT_S,
        )
        return link

    def _refill(self, address: str, port: int) -> None:
        running = self._refills.get(address)
        if running is not None and not running.done():
            return

        async def refill() -> None:
            await asyncio.sleep(REFILL_DELAY_S)
            idle = self._idle.setdefault(address, collections.deque())
            while sum(1 for link in idle if link.usable) < WARM and self._ports.get(address) == port:
                try:
                    idle.append(await self._connect(address, port))
                except (OSError, TimeoutError, ValueError) as exc:
                    log.info("could not warm a link to replica at %s: %s", address, exc)
                    self.forget(address)
                    return

        self._refills[address] = asyncio.get_running_loop().create_task(refill(), name="cluster-link-warm")

    async def close(self) -> None:
        for task in self._refills.values():
            task.cancel()
        await asyncio.gather(*self._refills.values(), return_exceptions=True)
        self._refills.clear()
        for idle in self._idle.values():
            for link in idle:
                link.cancel()
        self._idle.clear()
