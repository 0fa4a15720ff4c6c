"""The control stream (sign-on, published devices, the directory and its changes, heartbeats) and enrollment.

One Control call per router. Sign-on decides in a fixed order: client
certificate, password (throttled), published devices, identity keys; each
refusal is a typed `SignOnRefused` whose failure gives the metric label and the
audit outcome, and whose detail is the text the router is shown. After sign-on
the stream carries the router's heartbeats and publications in, and the
directory, incoming-association notices and audit notices out.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Iterable

import grpc
import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import admission
from relay_bridge.admission import SignOnRefused, shown
from relay_bridge.cluster.tickets import DIRECT_JOIN_PROTOCOL
from relay_bridge.config import LimitsSection
from relay_bridge.db.backend import is_postgres_url
from relay_bridge.db.notify import DirectoryWatcher
from relay_bridge.db.postgres import DatabaseUnavailable
from relay_bridge.directory import Device
from relay_bridge.directory_view import DirectoryView
from relay_bridge.sessions import RouterSession, first_message, source_address, throttle_keys
from relay_bridge.splice import abandon_pending, abort_associations
from relay_bridge.state import BridgeState
from relay_common.pki import CsrError, issue_client_certificate
from relay_common.setup_timing import mark
from relay_common.validate import is_site_name

log = logging.getLogger("relay_bridge")
HEARTBEAT_S = 15
# What a router is told when the database is away at its sign-on (it retries with its backoff).
DATABASE_AWAY = "the bridge's database is unavailable for a moment; the router retries on its own"
# Directory changes that arrive within this many seconds reach the routers in one broadcast, and
# broadcasts are at least this far apart (a router signing on again and again must not make the
# bridge rebuild everyone's directory each time).
BROADCAST_COALESCE_S = 0.05
MIN_BROADCAST_INTERVAL_S = 0.5


class ControlService:
    """Control and Enroll, and the directory each router is sent."""

    def __init__(self, state: BridgeState) -> None:
        self.state = state
        self._background: set[asyncio.Task[None]] = set()
        self._broadcast_pending = False
        self._last_broadcast = 0.0
        # Started with the first sign-on: LISTEN/NOTIFY and the periodic checks (relay_bridge.db.notify).
        self.watcher: DirectoryWatcher | None = None

    def ensure_watcher(self) -> DirectoryWatcher:
        if self.watcher is None:
            storage = self.state.config.storage
            postgres = is_postgres_url(storage.database)
            self.watcher = DirectoryWatcher(
                self.state,
                refresh=self.refresh,
                cut=self.cut,
                listen_url=str(storage.database) if postgres else None,
                password_file=storage.password_file,
            )
            self.watcher.start()
        return self.watcher

    def refresh(self) -> None:
        """The directory changed somewhere: read it again and send every router its own."""
        self.directory_changed()
        self.request_broadcast()

    async def cut(self, session: RouterSession) -> None:
        """End a disabled or removed router's control stream and abort its associations."""
        self.directory_changed()
        session.end()
        await abort_associations(self.state.splices, session, "router disabled")

    # -- the directory a router sees -----------------------------------------------------
    async def view(self) -> DirectoryView:
        """The indexed directory, read from the database once per change (on its own thread)."""
        return await self.state.directory_cache.view()

    def directory_changed(self) -> None:
        self.state.directory_cache.changed()

    async def directory_for(self, site: str) -> pb.Directory:
        view = await self.view()
        return view.for_site(site, self.state.online_sites(), max_bytes=self.state.config.limits.max_directory_bytes)

    async def broadcast_directory(self) -> None:
        for session in list(self.state.sessions.values()):
            session.send(pb.BridgeMessage(directory=await self.directory_for(session.name)))

    def request_broadcast(self) -> None:
        """Send every router its directory soon; requests that arrive meanwhile are served by the same one."""
        if self._broadcast_pending:
            return
        self._broadcast_pending = True

        async def broadcast() -> None:
            wait = max(BROADCAST_COALESCE_S, self._last_broadcast + MIN_BROADCAST_INTERVAL_S - time.monotonic())
            await asyncio.sleep(wait)
            self._broadcast_pending = False
            self._last_broadcast = time.monotonic()
            await self.broadcast_directory()

        self._in_background(broadcast())

    # -- sign-on ----------------------------------------------------------------------------
    async def authenticate(self, account: str, password: str, source: str) -> SignOnRefused | None:
        """Check a password against the directory, counting failures per account and per address.

        The attempt is counted before the (slow) hash and only one per account and per
        address runs at a time, so concurrent guesses cannot slip past the limit.
        """
        attempt = self.state.throttle.begin(*throttle_keys(account, source))
        if attempt is None:
            log.warning(
                "sign-on for %s from %s refused: too many failed attempts, or another attempt still running",
                shown(account, 64),
                source,
            )
            return admission.throttled()
        shared = self.state.shared_sign_ons
        with attempt:
            try:
                if shared is not None and not await shared.begin(attempt.id, attempt.keys):
                    attempt.succeeded()  # not a guess that was checked: the cluster-wide count refused it
                    log.warning(
                        "sign-on for %s from %s refused: too many failed attempts across the replicas",
                        shown(account, 64),
                        source,
                    )
                    return admission.throttled()
                problem = await self.state.directory.verify_password(account, password)
            except DatabaseUnavailable:
                attempt.succeeded()  # the database's outage is nobody's failed guess
                raise
            if problem is None:
                attempt.succeeded()
                if shared is not None:
                    await shared.succeeded(attempt.id)
                return None
        log.warning("sign-on for %s from %s failed: %s", shown(account, 64), source, problem)
        return admission.account_refusal(problem)

    async def sign_on_refusal(
        self, context: grpc.aio.ServicerContext, sign_on: pb.SignOn, source: str
    ) -> SignOnRefused | None:
        problem = self.state.sessions.certificate_problem(context, sign_on.account)
        if problem is not None:
            return logged(SignOnRefused(admission.SignOnFailure.CERTIFICATE, problem), sign_on.account, source)
        refusal = await self.authenticate(sign_on.account, sign_on.password, source)  # logs its refusals
        if refusal is not None:
            return refusal
        refusal = admission.devices_refusal(sign_on.devices, directory_limits(self.state.config.limits))
        if refusal is not None:
            return logged(refusal, sign_on.account, source)
        identity = sign_on.identity
        if not admission.has_identity_keys(identity):
            refusal = SignOnRefused(admission.SignOnFailure.NO_IDENTITY, admission.NO_IDENTITY)
            return logged(refusal, sign_on.account, source)
        mismatch = await self.state.directory.check_identity(sign_on.account, identity.sign_key, identity.kem_key)
        if mismatch is None:
            return None
        log.warning("router %s refused from %s: identity key changed", sign_on.account, source)
        return admission.identity_refusal(sign_on.account, mismatch)

    async def Control(
        self, request_iterator: AsyncIterator[pb.RouterMessage], context: grpc.aio.ServicerContext
    ) -> None:
        state = self.state
        source = source_address(context.peer())
        first = await first_message(context, state.config.limits, "Control", source)
        if not isinstance(first, pb.RouterMessage) or not first.HasField("sign_on"):  # EOF, or not a SignOn
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first control message must be SignOn")
            return  # abort raises; this tells the type checker too
        sign_on = first.sign_on
        self.ensure_watcher()
        try:
            refusal = await self.sign_on_refusal(context, sign_on, source)
        except DatabaseUnavailable as exc:
            # Transient, said at once (not a 15 s pool wait ending in "Unexpected error"); the router retries.
            log.warning("sign-on for %s from %s: %s", shown(sign_on.account, 64), source, exc)
            state.metrics.sign_on_failed(admission.SignOnFailure.OTHER)
            await context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_AWAY)
            return
        if refusal is not None:
            state.metrics.sign_on_failed(refusal.failure)
            if state.refusal_audits.allow(f"sign_on:{source}"):
                state.audit.event(
                    "sign_on",
                    refusal.audit_outcome,
                    router=account_field(sign_on.account),
                    source=source,
                    detail=refusal.detail,
                    suppressed=state.refusal_audits.suppressed(f"sign_on:{source}"),
                )
            await context.write(pb.BridgeMessage(sign_on_result=pb.SignOnResult(ok=False, error=refusal.detail)))
            return
        session = RouterSession(sign_on.account, secrets.token_urlsafe(32), source)
        session.direct_join = DIRECT_JOIN_PROTOCOL in sign_on.protocols  # the notice may then offer it
        previous = state.sessions.get(session.name)
        if previous is not None:
            log.warning("router %s signed on again from %s; closing its previous session", session.name, source)
            previous.end()
        state.sessions[session.name] = session
        tasks: list[asyncio.Task[None]] = []
        try:  # from here on, however the call ends (even cancelled mid-way), the session is removed
            try:
                await state.directory.publish(session.name, published(session.name, sign_on.devices))
                await state.directory.touch(session.name)
            except DatabaseUnavailable as exc:
                log.warning("sign-on of %s from %s: %s", session.name, source, exc)
                await context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_AWAY)
            if state.cluster is not None and not await state.cluster.presence.claim(session.name, session.since):
                log.warning("router %s signed on again at another replica meanwhile; this stream ends", session.name)
                return
            state.audit.event(
                "sign_on",
                "success",
                router=session.name,
                source=source,
                shared_devices=[d.ae_title for d in sign_on.devices],
            )
            state.metrics.signed_on()
            log.info("router %s signed on from %s (%d shared devices)", session.name, source, len(sign_on.devices))
            await context.write(
                pb.BridgeMessage(
                    sign_on_result=pb.SignOnResult(
                        ok=True, session=session.token, site=session.name, heartbeat_interval_s=HEARTBEAT_S
                    )
                )
            )
            self.directory_changed()
            session.send(pb.BridgeMessage(directory=await self.directory_for(session.name)))  # its own, at once
            self.request_broadcast()  # the others learn it is online with the next broadcast
            tasks.append(asyncio.create_task(self._read_control(session, context)))
            while (message := await session.outbox.get()) is not None:
                await context.write(message)
                if message.HasField("incoming"):
                    mark("notice written", message.incoming.association_id)
        finally:
            session.end()
            for task in tasks:
                task.cancel()
            abandon_pending(state.splices, session)
            # Its presence row, unless a newer sign-on holds the site. While this replica drains, the row
            # stays (renewed) until the router's sign-on elsewhere replaces it or this replica exits: an
            # Open towards the site meanwhile is forwarded here and refused DRAINING, which the calling
            # router retries, instead of SITE_OFFLINE for a site that is only moving (docs/high-availability.md).
            if state.cluster is not None and not state.draining:
                self._in_background(state.cluster.presence.release(session.name, session.since))
            if state.draining:  # moved with associations still running here: their blob RPCs go on
                state.sessions.keep_moved(session)
            if state.sessions.get(session.name) is session:
                del state.sessions[session.name]
                log.info("router %s signed off", session.name)
                # In a task of its own: gRPC cancels this call when the router's connection closes, which
                # may be while the others are told; the news that this site is offline must still reach them.
                self.request_broadcast()

    def _in_background(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read_control(self, session: RouterSession, context: grpc.aio.ServicerContext) -> None:
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                if message.HasField("heartbeat"):
                    session.send(pb.BridgeMessage(heartbeat=pb.Heartbeat(sent_unix_ms=message.heartbeat.sent_unix_ms)))
                elif message.HasField("publish"):
                    await self._publication(session, list(message.publish.devices))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            session.end()

    async def _publication(self, session: RouterSession, devices: list[pb.SharedDevice]) -> None:
        """Check a publication, then apply it at most once per `publish_interval_s`: a router that
        publishes faster has its latest publication applied when its interval is over."""
        limits = self.state.config.limits
        problem = admission.check_devices(devices, directory_limits(limits))
        if problem:
            log.warning("router %s published invalid devices: %s", session.name, problem)
            if self.state.refusal_audits.allow(f"publish:{session.name}"):
                self.state.audit.event(
                    "publish",
                    "failure",
                    router=session.name,
                    detail=problem,
                    suppressed=self.state.refusal_audits.suppressed(f"publish:{session.name}"),
                )
            return
        waiting = session.pending_publication is not None
        session.pending_publication = devices
        if waiting:
            return  # the publication already waiting will apply these devices instead
        delay = session.published_at + limits.publish_interval_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # reads stop meanwhile: HTTP/2 pushes back on a flooding router
        latest, session.pending_publication = session.pending_publication, None
        session.published_at = time.monotonic()
        try:
            await self.state.directory.publish(session.name, published(session.name, latest or []))
        except DatabaseUnavailable as exc:  # the router keeps its session; it publishes again on its next change
            log.warning("publication of %s not applied: %s", session.name, exc)
            return
        self.directory_changed()
        self.request_broadcast()

    # -- enrollment ---------------------------------------------------------------------------
    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        try:
            return await self._enroll(request, context)
        except DatabaseUnavailable as exc:  # transient, and said so (the router's enroll command may retry)
            log.warning("enrollment of %s: %s", shown(request.account, 64), exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_AWAY)
            raise AssertionError("unreachable: abort raises") from None

    async def _enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        state = self.state
        source = source_address(context.peer())
        account = request.account

        async def refuse(why: str) -> None:
            if state.refusal_audits.allow(f"enroll:{source}"):
                state.audit.event(
                    "enroll",
                    "failure",
                    router=account_field(account),
                    source=source,
                    detail=why,
                    suppressed=state.refusal_audits.suppressed(f"enroll:{source}"),
                )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

        if request.ByteSize() > state.config.limits.max_first_message_bytes:
            await refuse(f"the request is larger than {state.config.limits.max_first_message_bytes} bytes")

        refusal = await self.authenticate(account, request.password, source)
        if refusal is not None:
            await refuse(refusal.detail)
        identity = request.identity
        if not admission.has_identity_keys(identity):
            await refuse("the request carries no identity keys")
        problem = await state.directory.redeem_enrollment_token(account, request.enrollment_token)
        if problem is not None:
            state.throttle.failed(*throttle_keys(account, source))
            if state.shared_sign_ons is not None:
                await state.shared_sign_ons.failed_again(secrets.token_hex(8), throttle_keys(account, source))
            await refuse(str(problem))
        certificate, ca_pem = b"", b""
        enrollment = state.config.enrollment
        if enrollment.ca_cert is not None and enrollment.ca_key is not None:
            ca_pem = enrollment.ca_cert.read_bytes()
            try:
                certificate = issue_client_certificate(
                    ca_pem, enrollment.ca_key.read_bytes(), request.csr_pem, account, days=enrollment.certificate_days
                )
            except CsrError as exc:
                await refuse(str(exc))
        await state.directory.set_identity(account, identity.sign_key, identity.kem_key)
        state.audit.event("enroll", "success", router=account, source=source, certificate_issued=bool(certificate))
        log.info("router %s enrolled from %s", account, source)
        self.directory_changed()
        self.request_broadcast()
        return pb.EnrollResponse(certificate_pem=certificate, ca_pem=ca_pem)


def logged(refusal: SignOnRefused, account: str, source: str) -> SignOnRefused:
    """Log a refusal that no earlier line explained; the level and the alert field come from its type."""
    if refusal.security:
        log.error(
            "sign-on for %s from %s refused: %s",
            shown(account, 64),
            source,
            refusal.detail,
            extra={"security_alert": refusal.failure.value},
        )
    else:
        log.warning("sign-on for %s from %s refused: %s", shown(account, 64), source, refusal.detail)
    return refusal


def directory_limits(limits: LimitsSection) -> admission.DirectoryLimits:
    return admission.DirectoryLimits(limits.max_devices_per_router, limits.max_share_with)


def account_field(account: str) -> str:
    """An account name as sent, for a log line or audit field: bounded and escaped unless it is valid."""
    return account if is_site_name(account) else shown(account)


def published(router: str, devices: Iterable[pb.SharedDevice]) -> list[Device]:
    return [Device(router, d.ae_title, d.description, tuple(d.share_with), published_grants(d)) for d in devices]


# A published grant names service groups (relay_router.services); the bridge checks their shape, not the
# vocabulary (a newer router may name a group this bridge does not know), and bounds their number.
MAX_GRANTS_PER_DEVICE = 256
MAX_GROUPS_PER_GRANT = 16
_GROUP_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def published_grants(device: pb.SharedDevice) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The device's service grants, minus malformed ones: a grant for a bad site name is dropped, a bad
    group name is left out of its grant (so the site gets less, never more), and each site counts once."""
    grants: dict[str, tuple[str, ...]] = {}
    for grant in device.grants[:MAX_GRANTS_PER_DEVICE]:
        if grant.site in grants or not (grant.site == "*" or is_site_name(grant.site)):
            continue
        names = [s for s in grant.services[:MAX_GROUPS_PER_GRANT] if _GROUP_NAME.fullmatch(s)]
        grants[grant.site] = tuple(dict.fromkeys(names))
    return tuple(grants.items())
