"""The bridge's gRPC services: router sign-on, the directory, association splicing."""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.blobs import BlobBroker, BlobRefused
from relay_bridge.config import BridgeConfig
from relay_bridge.directory import Device, Directory
from relay_bridge.metrics import BridgeMetrics
from relay_bridge.pki import CsrError, issue_client_certificate
from relay_bridge.splice import Splice, close_frame
from relay_common.audit import AuditLog
from relay_common.config import parse_host_port

log = logging.getLogger("relay_bridge")
ASSOCIATION_ID = re.compile(r"^[0-9a-f]{32}\Z")
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}\Z")  # PS3.5 AE: no backslash, no control chars
HEARTBEAT_S = 15
DISABLED_POLL_S = 2.0


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


class LoginThrottle:
    """Counts failed sign-ons per account and per source address in a sliding window."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window = limit, window_s
        self._failures: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

    def _recent(self, key: str) -> collections.deque[float]:
        q, cutoff = self._failures[key], time.monotonic() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def blocked(self, *keys: str) -> bool:
        return any(len(self._recent(k)) >= self.limit for k in keys)

    def failed(self, *keys: str) -> None:
        for k in keys:
            self._recent(k).append(time.monotonic())


class RelayServicer:
    # The class that pumps one association (a seam for tests that play a malicious bridge).
    splice_class: type[Splice] = Splice
    enroll_port: int | None = None

    def __init__(self, config: BridgeConfig, directory: Directory, audit: AuditLog | None = None) -> None:
        self.config = config
        self.directory = directory
        self.audit = audit or AuditLog(None, app="relay-bridge")
        self.sessions: dict[str, RouterSession] = {}
        self.splices: dict[str, Splice] = {}
        self.throttle = LoginThrottle(config.limits.login_failures, config.limits.login_window_s)
        self.metrics = BridgeMetrics(self)
        self.blobs: BlobBroker | None = None  # the cloud spill's store; None: spill off
        self._blob_tasks: set[asyncio.Task[int]] = set()

    # -- directory ---------------------------------------------------------
    def directory_for(self, site: str) -> pb.Directory:
        devices = self.directory.reachable_by(site)
        identities = self.directory.identities()
        # Keys of the sites we may call, and of the sites that may call us (to verify them).
        owners = {d.router for d in devices}
        callers = {peer for d in self.directory.devices() if d.router == site for peer in d.share_with}
        owners |= set(identities) if "*" in callers else callers
        owners.discard(site)
        return pb.Directory(
            identities=[
                pb.SiteIdentity(
                    site=o,
                    identity=pb.Identity(sign_key=identities[o][0], kem_key=identities[o][1], kem="MLKEM768-X25519"),
                )
                for o in sorted(owners)
                if o in identities
            ],
            devices=[
                pb.RemoteDevice(
                    site=d.router, ae_title=d.ae_title, description=d.description, online=d.router in self.sessions
                )
                for d in devices
            ],
        )

    def broadcast_directory(self) -> None:
        for session in list(self.sessions.values()):
            session.send(pb.BridgeMessage(directory=self.directory_for(session.name)))

    # -- control stream ----------------------------------------------------
    async def Control(  # type: ignore[override]  # noqa: N802
        self, request_iterator: AsyncIterator[pb.RouterMessage], context: grpc.aio.ServicerContext
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF or not first.HasField("sign_on"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first control message must be SignOn")
        sign_on = first.sign_on
        source = _source_address(context.peer())
        error = self._certificate_problem(context, sign_on.account)
        if error is None:
            error = await self._authenticate(sign_on.account, sign_on.password, source)
        if error is None:
            error = _check_devices(sign_on.devices)
        if error is None:
            identity = sign_on.identity
            if len(identity.sign_key) != 32 or not identity.kem_key:
                error = "sign-on carries no identity keys (upgrade the router)"
            else:
                error = self.directory.check_identity(sign_on.account, identity.sign_key, identity.kem_key)
                if error:
                    log.warning("router %s refused from %s: identity key changed", sign_on.account, source)
        if error is not None:
            self.metrics.sign_on_failed(error)
            self.audit.event(
                "sign_on",
                "alert" if "too many" in error or "identity" in error else "failure",
                router=sign_on.account,
                source=source,
                detail=error,
            )
            await context.write(pb.BridgeMessage(sign_on_result=pb.SignOnResult(ok=False, error=error)))
            return
        session = RouterSession(sign_on.account, secrets.token_urlsafe(32), source)
        previous = self.sessions.get(session.name)
        if previous is not None:
            log.warning("router %s signed on again from %s; closing its previous session", session.name, source)
            previous.end()
        self.sessions[session.name] = session
        self.directory.publish(session.name, _devices(session.name, sign_on.devices))
        self.directory.touch(session.name)
        self.audit.event(
            "sign_on",
            "success",
            router=session.name,
            source=source,
            shared_devices=[d.ae_title for d in sign_on.devices],
        )
        self.metrics.signed_on()
        log.info("router %s signed on from %s (%d shared devices)", session.name, source, len(sign_on.devices))
        await context.write(
            pb.BridgeMessage(
                sign_on_result=pb.SignOnResult(
                    ok=True, session=session.token, site=session.name, heartbeat_interval_s=HEARTBEAT_S
                )
            )
        )
        self.broadcast_directory()
        reader = asyncio.create_task(self._read_control(session, context))
        watchdog = asyncio.create_task(self._watch_enabled(session))
        try:
            while (message := await session.outbox.get()) is not None:
                await context.write(message)
        finally:
            session.end()
            reader.cancel()
            watchdog.cancel()
            if self.sessions.get(session.name) is session:
                del self.sessions[session.name]
                log.info("router %s signed off", session.name)
                self.broadcast_directory()
            for assoc_id in list(session.associations):
                splice = self.splices.get(assoc_id)
                if splice is not None and not splice.joined.done():
                    splice.joined.cancel()

    def _certificate_problem(self, context: grpc.aio.ServicerContext, account: str | None) -> str | None:
        """With mutual TLS on: the peer must present a certificate, for this account when one is named."""
        if not self.config.server.require_client_cert:
            return None
        names = context.auth_context().get("x509_common_name") or []
        if not names:
            return "a client certificate is required: enroll this router (relay-router enroll)"
        if account is not None and names[0].decode() != account:
            return f"the client certificate belongs to {names[0].decode()!r}, not {account!r}"
        return None

    async def _authenticate(self, account: str, password: str, source: str) -> str | None:
        keys = (f"account:{account}", f"source:{source}")
        if self.throttle.blocked(*keys):
            log.warning("sign-on for %r from %s refused: too many failed attempts", account, source)
            return "too many failed sign-on attempts; try again later"
        problem = await asyncio.to_thread(self.directory.verify_password, account, password)
        if problem is None:
            return None
        self.throttle.failed(*keys)
        log.warning("sign-on for %r from %s failed: %s", account, source, problem)
        # Do not tell a stranger whether the account exists.
        return "account disabled" if problem == "account disabled" else "wrong account name or password"

    async def _read_control(self, session: RouterSession, context: grpc.aio.ServicerContext) -> None:
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                if message.HasField("heartbeat"):
                    session.send(pb.BridgeMessage(heartbeat=pb.Heartbeat(sent_unix_ms=message.heartbeat.sent_unix_ms)))
                elif message.HasField("publish"):
                    problem = _check_devices(message.publish.devices)
                    if problem:
                        log.warning("router %s published invalid devices: %s", session.name, problem)
                        continue
                    self.directory.publish(session.name, _devices(session.name, message.publish.devices))
                    self.broadcast_directory()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            session.end()

    async def _watch_enabled(self, session: RouterSession) -> None:
        """Cut a router's streams within seconds of `relay-bridge router disable`."""
        while not session.ended.is_set():
            await asyncio.sleep(DISABLED_POLL_S)
            router = await asyncio.to_thread(self.directory.router, session.name)
            if router is None or not router.enabled:
                log.warning("router %s was disabled or removed; cutting its streams", session.name)
                session.end()
                for assoc_id in list(session.associations):
                    splice = self.splices.get(assoc_id)
                    if splice is not None:
                        await splice.to_initiator.close(close_frame(pb.Close.ABORTED, "router disabled"))
                        await splice.to_destination.close(close_frame(pb.Close.ABORTED, "router disabled"))

    # -- enrollment --------------------------------------------------------
    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:  # noqa: N802
        source = _source_address(context.peer())
        account = request.account

        async def refuse(why: str) -> None:
            self.audit.event("enroll", "failure", router=account, source=source, detail=why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

        problem = await self._authenticate(account, request.password, source)
        if problem:
            await refuse(problem)
        identity = request.identity
        if len(identity.sign_key) != 32 or not identity.kem_key:
            await refuse("the request carries no identity keys")
        problem = self.directory.redeem_enrollment_token(account, request.enrollment_token)
        if problem:
            self.throttle.failed(f"account:{account}", f"source:{source}")
            await refuse(problem)
        certificate, ca_pem = b"", b""
        enrollment = self.config.enrollment
        if enrollment.ca_cert is not None and enrollment.ca_key is not None:
            ca_pem = enrollment.ca_cert.read_bytes()
            try:
                certificate = issue_client_certificate(
                    ca_pem, enrollment.ca_key.read_bytes(), request.csr_pem, account, days=enrollment.certificate_days
                )
            except CsrError as exc:
                await refuse(str(exc))
        self.directory.set_identity(account, identity.sign_key, identity.kem_key)
        self.audit.event("enroll", "success", router=account, source=source, certificate_issued=bool(certificate))
        log.info("router %s enrolled from %s", account, source)
        self.broadcast_directory()
        return pb.EnrollResponse(certificate_pem=certificate, ca_pem=ca_pem)

    # -- cloud spill (relay_bridge.blobs) --------------------------------
    async def _blob_caller(self, context: grpc.aio.ServicerContext, association_id: str = "") -> RouterSession:
        token = dict(context.invocation_metadata() or ()).get("relay-session", "")
        session = next((s for s in self.sessions.values() if secrets.compare_digest(s.token, token)), None)
        if session is None or session.ended.is_set():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid session: sign on first")
        problem = self._certificate_problem(context, session.name)
        if problem:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        if self.blobs is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this bridge has no spill blob store")
        if association_id and association_id not in session.associations:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not an association of this router")
        return session

    async def BlobSlot(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobSlotResponse:  # noqa: N802
        await self._blob_caller(context, request.association_id)
        assert self.blobs is not None
        try:
            blob_id, url, expires = await self.blobs.slot(
                request.association_id, request.blob_id, request.part, download=request.download
            )
        except BlobRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except Exception as exc:  # noqa: BLE001 - a store failure: the router falls back to inline frames
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"blob store: {exc}")
        return pb.BlobSlotResponse(blob_id=blob_id, url=url, expires_unix=expires)

    async def PutBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:  # noqa: N802
        session = await self._blob_caller(context)
        assert self.blobs is not None
        try:
            await self.blobs.put_part(request.url, request.data, session.associations)
        except BlobRefused as exc:
            self.audit.event("blob_refused", "alert", router=session.name, detail=str(exc))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except Exception as exc:  # noqa: BLE001
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"blob store: {exc}")
        return pb.BlobPartAck()

    async def GetBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPart:  # noqa: N802
        session = await self._blob_caller(context)
        assert self.blobs is not None
        try:
            data = await self.blobs.get_part(request.url, session.associations)
        except BlobRefused as exc:
            self.audit.event("blob_refused", "alert", router=session.name, detail=str(exc))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except Exception as exc:  # noqa: BLE001
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"blob store: {exc}")
        return pb.BlobPart(data=data)

    async def ReleaseBlob(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:  # noqa: N802
        await self._blob_caller(context, request.association_id)
        assert self.blobs is not None
        try:
            await self.blobs.release(request.association_id, request.blob_id)
        except BlobRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return pb.BlobPartAck()

    # -- association streams ---------------------------------------------
    async def Associate(  # type: ignore[override]  # noqa: N802
        self, request_iterator: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext
    ) -> None:
        token = dict(context.invocation_metadata() or ()).get("relay-session", "")
        session = next((s for s in self.sessions.values() if secrets.compare_digest(s.token, token)), None)
        if session is None or session.ended.is_set():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid session: sign on first")
        problem = self._certificate_problem(context, session.name)
        if problem:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        raw = await context.read()
        if raw is grpc.aio.EOF:
            return
        try:
            first = pb.Frame.FromString(raw)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame is not a relay.v1.Frame")
        if first.HasField("open"):
            await self._initiate(session, first.open, context)
        elif first.HasField("join"):
            await self._join(session, first.join, context)
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Open or Join")

    async def _refuse(self, context: grpc.aio.ServicerContext, reason: int, detail: str, assoc: str) -> None:
        log.info("association refused: %s", detail, extra={"assoc": assoc})
        self.metrics.refused(reason, assoc, detail)
        await context.write(_frame(refused=pb.Refused(reason=reason, detail=detail)))

    async def _initiate(self, session: RouterSession, op: pb.Open, context: grpc.aio.ServicerContext) -> None:
        aid = op.association_id
        limits = self.config.limits
        if not ASSOCIATION_ID.match(aid) or aid in self.splices:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "association_id must be 32 new hex digits")
        device = self.directory.device(op.to_site, op.called_ae_title)
        if device is None:
            return await self._refuse(
                context, pb.Refused.UNKNOWN_DEVICE, f"no device {op.called_ae_title!r} at site {op.to_site!r}", aid
            )
        if not device.shared_with(session.name):
            self.audit.event(
                "access_refused",
                "alert",
                router=session.name,
                to_site=op.to_site,
                called_ae=op.called_ae_title,
                calling_ae=op.calling_ae_title,
                association=aid,
            )
            owner = self.sessions.get(op.to_site)
            if owner is not None:
                owner.send(
                    pb.BridgeMessage(
                        audit=pb.AuditNotice(
                            event="access_refused",
                            peer_site=session.name,
                            ae_title=op.called_ae_title,
                            detail=f"{session.name} asked for {op.called_ae_title}, which is not shared with it",
                        )
                    )
                )
            log.warning(
                "router %s asked for %s/%s, which is not shared with it",
                session.name,
                op.to_site,
                op.called_ae_title,
                extra={"assoc": aid},
            )
            return await self._refuse(
                context,
                pb.Refused.NOT_PERMITTED,
                f"{op.to_site}/{op.called_ae_title} is not shared with {session.name}",
                aid,
            )
        destination = self.sessions.get(op.to_site)
        if destination is None:
            return await self._refuse(context, pb.Refused.SITE_OFFLINE, f"site {op.to_site!r} is offline", aid)
        busy = len(self.splices) >= limits.max_associations
        if busy or len(session.associations) >= limits.max_associations_per_router:
            return await self._refuse(context, pb.Refused.OVERLOADED, "the bridge's association limit is reached", aid)

        splice = self.splice_class(
            aid, session.name, op.to_site, op.called_ae_title, op.calling_ae_title, depth=limits.frame_queue_depth
        )
        self.splices[aid] = splice
        session.associations.add(aid)
        destination.associations.add(aid)
        try:
            notice = pb.IncomingAssociation(
                association_id=aid,
                from_site=session.name,
                called_ae_title=op.called_ae_title,
                first_frame=pb.Frame(data=op.first_data),
                handshake=op.handshake,
                features=op.features,
            )
            if not destination.send(pb.BridgeMessage(incoming=notice)):
                return await self._refuse(context, pb.Refused.OVERLOADED, f"site {op.to_site!r} is overloaded", aid)
            try:
                await asyncio.wait_for(asyncio.shield(splice.joined), limits.join_timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                if not splice.joined.done():
                    splice.joined.cancel()
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
                return await self._refuse(
                    context, pb.Refused.TIMEOUT, f"site {op.to_site!r} did not answer in time", aid
                )
            log.info(
                "association %s -> %s/%s spliced", session.name, op.to_site, op.called_ae_title, extra={"assoc": aid}
            )
            self.metrics.spliced(splice)
            await context.write(_frame(accepted=pb.Accepted(association_id=aid)))
            pump = asyncio.create_task(splice.pump(context.read, splice.to_destination, from_initiator=True))
            try:
                await splice.drain(splice.to_initiator, context.write)
            finally:
                await splice.to_initiator.close()  # unblock the partner if we are gone
                await _finish(pump)
        finally:
            self.splices.pop(aid, None)
            session.associations.discard(aid)
            destination.associations.discard(aid)
            if self.blobs is not None:  # whatever the routers did not release
                task = asyncio.get_running_loop().create_task(self.blobs.release(aid))
                self._blob_tasks.add(task)
                task.add_done_callback(self._blob_tasks.discard)
            self.audit.event(
                "association",
                "success" if splice.joined.done() and not splice.joined.cancelled() else "failure",
                association=aid,
                from_site=splice.from_site,
                to_site=splice.to_site,
                called_ae=splice.called_ae_title,
                calling_ae=splice.calling_ae_title,
                bytes_from_initiator=splice.bytes_from_initiator,
                bytes_from_destination=splice.bytes_from_destination,
                seconds=round(time.time() - splice.opened, 3),
            )
            log.info(
                "association closed: %d bytes from %s, %d bytes from %s, %d frames, %.1f s",
                splice.bytes_from_initiator,
                splice.from_site,
                splice.bytes_from_destination,
                splice.to_site,
                splice.frames,
                time.time() - splice.opened,
                extra={"assoc": aid},
            )
            self.metrics.closed(splice)

    async def _join(self, session: RouterSession, join: pb.Join, context: grpc.aio.ServicerContext) -> None:
        splice = self.splices.get(join.association_id)
        if splice is None or splice.to_site != session.name or splice.joined.done():
            await context.abort(grpc.StatusCode.NOT_FOUND, "no association waiting for this router with that id")
        splice.joined.set_result(None)
        pump = asyncio.create_task(splice.pump(context.read, splice.to_initiator, from_initiator=False))
        try:
            await splice.drain(splice.to_destination, context.write)
        finally:
            await splice.to_destination.close()
            await _finish(pump)


def _frame(**kind: object) -> bytes:
    return pb.Frame(**kind).SerializeToString()  # type: ignore[arg-type]


async def _finish(task: asyncio.Task[None]) -> None:
    """Give a pump a moment to see its stream's end, then stop it."""
    try:
        await asyncio.wait_for(task, 1.0)
    except (TimeoutError, asyncio.CancelledError):
        pass


def _check_devices(devices: list[pb.SharedDevice]) -> str | None:
    seen = set()
    for d in devices:
        if not AE_TITLE.match(d.ae_title) or d.ae_title.strip() != d.ae_title:
            return f"invalid AE title {d.ae_title!r} (1-16 characters, no backslash or control characters)"
        if d.ae_title in seen:
            return f"AE title {d.ae_title!r} is published twice"
        seen.add(d.ae_title)
    return None


def _devices(router: str, devices: list[pb.SharedDevice]) -> list[Device]:
    return [Device(router, d.ae_title, d.description, tuple(d.share_with)) for d in devices]


def _source_address(peer: str) -> str:
    # "ipv4:127.0.0.1:5555" -> "127.0.0.1"
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)  # grpc percent-encodes IPv6 brackets
    return rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer


def _handlers(servicer: RelayServicer) -> grpc.GenericRpcHandler:
    """relay.v1.Relay, with Associate frames left serialized (the bridge forwards bytes)."""
    return grpc.method_handlers_generic_handler(
        "relay.v1.Relay",
        {
            "Control": grpc.stream_stream_rpc_method_handler(
                servicer.Control,
                request_deserializer=pb.RouterMessage.FromString,
                response_serializer=pb.BridgeMessage.SerializeToString,
            ),
            # No (de)serializers: requests arrive and responses leave as bytes.
            "Associate": grpc.stream_stream_rpc_method_handler(servicer.Associate),
            "Enroll": grpc.unary_unary_rpc_method_handler(
                servicer.Enroll,
                request_deserializer=pb.EnrollRequest.FromString,
                response_serializer=pb.EnrollResponse.SerializeToString,
            ),
            **{
                name: grpc.unary_unary_rpc_method_handler(
                    getattr(servicer, name),
                    request_deserializer=req.FromString,
                    response_serializer=res.SerializeToString,
                )
                for name, req, res in (
                    ("BlobSlot", pb.BlobSlotRequest, pb.BlobSlotResponse),
                    ("PutBlobPart", pb.BlobPart, pb.BlobPartAck),
                    ("GetBlobPart", pb.BlobPart, pb.BlobPart),
                    ("ReleaseBlob", pb.BlobSlotRequest, pb.BlobPartAck),
                )
            },
        },
    )


def server_options(config: BridgeConfig) -> list[tuple[str, int]]:
    size = config.limits.max_frame_bytes + 64 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # Routers ping every 20 s to keep idle streams alive through load balancers.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.ping_timeout_ms", 10_000),  # what grpcio really uses to time a keepalive ping out
        ("grpc.so_reuseport", 0),
        # Start every stream with a large flow-control window; BDP probing still tunes it.
        ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
    ]


async def start(
    config: BridgeConfig, *, insecure: bool = False, servicer_class: type[RelayServicer] = RelayServicer
) -> tuple[grpc.aio.Server, int, RelayServicer]:
    """Build and start the server; returns it, the bound port and the servicer."""
    directory = Directory(config.storage.database)
    audit = AuditLog.from_section(config.audit, app="relay-bridge")
    servicer = servicer_class(config, directory, audit)
    servicer.blobs = BlobBroker.from_config(config)
    if servicer.blobs is not None:
        servicer.blobs.start()
    server = grpc.aio.server(options=server_options(config))
    server.add_generic_rpc_handlers([_handlers(servicer)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host, port = parse_host_port(config.server.listen)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if insecure:
        bound = server.add_insecure_port(address)
    else:
        assert config.server.tls_cert and config.server.tls_key
        pair = [(config.server.tls_key.read_bytes(), config.server.tls_cert.read_bytes())]
        if config.server.require_client_cert:
            assert config.server.client_ca is not None
            credentials = grpc.ssl_server_credentials(
                pair, root_certificates=config.server.client_ca.read_bytes(), require_client_auth=True
            )
        else:
            credentials = grpc.ssl_server_credentials(pair)
        bound = server.add_secure_port(address, credentials)
        if config.server.enroll_listen:
            # Server-authenticated only; Control and Associate refuse callers without a client certificate.
            enroll_host, enroll_port = parse_host_port(config.server.enroll_listen)
            servicer.enroll_port = server.add_secure_port(
                f"{enroll_host}:{enroll_port}", grpc.ssl_server_credentials(pair)
            )
    await server.start()
    await health_servicer.set("relay.v1.Relay", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound, servicer
