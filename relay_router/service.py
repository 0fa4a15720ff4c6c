"""The router service: DICOM on the hospital LAN, associations through the bridge.

Outbound: a local device connects to the router's DICOM port; the router reads
its A-ASSOCIATE-RQ, finds the remote device by Called AE Title, opens an
association stream through the bridge and relays the association
(relay_router/outbound.py).
Inbound: the bridge announces an association for a device this router shares;
the router joins the stream, connects to the device and relays
(relay_router/inbound.py).
Who may call what and where it goes is decided in relay_router/routing.py.
This module holds the lifecycle, the route table of the current directory and
the status.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from protos.relay.v1 import relay_pb2 as pb
from relay_common.audit import AuditLog
from relay_common.config import ConfigError, parse_host_port
from relay_common.tlsreload import add_reload_hook
from relay_router.accel.runtime import AccelRuntime
from relay_router.accel.runtime import configured as accel_configured
from relay_router.association import RelayedAssociation
from relay_router.config import RouterConfig, SharedDevice, config_changes, load, with_reloadable
from relay_router.host import tune_socket
from relay_router.identity.wiring import IdentityWiring
from relay_router.inbound import InboundCalls
from relay_router.metrics import RouterMetrics
from relay_router.outbound import OutboundCalls
from relay_router.outcome import Outcome
from relay_router.pace import PathPace
from relay_router.replay import SeenAssociations
from relay_router.routing import (
    Callers,
    Limits,
    PendingRequests,
    Route,
    RouteCache,
    RouteEvent,
    RouteTable,
)
from relay_router.spill import BridgeBlobTransport, SpillState
from relay_router.status import status_extra
from relay_router.tunnel import BridgeLink
from relay_router.ul import Action

log = logging.getLogger("relay_router")
__all__ = ["Route", "RouterService", "tune_socket"]  # Route lives in relay_router.routing, tune_socket in host


class RouterService(OutboundCalls, InboundCalls):
    def __init__(
        self,
        config: RouterConfig,
        *,
        status_file: Path | None = None,
        config_path: Path | None = None,
        file_config: RouterConfig | None = None,
    ) -> None:
        self.config = config
        # SIGHUP re-reads config_path; restart-only keys are compared with the file as it was loaded
        # (file_config: before command-line overrides such as serve --listen).
        self.config_path = config_path
        self._file_config = file_config or config
        self.config_loaded_at = time.time()
        self._remove_reload_hook: Callable[[], None] | None = None
        self._reloads: set[asyncio.Task[bool]] = set()
        self.status_file = status_file
        self.audit = AuditLog.from_section(config.audit, app="relay-router", source_id=config.router.name)
        self.link = BridgeLink(config, self._incoming, self.audit)
        self.blobs = BridgeBlobTransport(self.link)  # cloud spill: blob parts via URLs the bridge signs
        self.spill = SpillState()  # ... its counters (relay_router.metrics) and pause after a store failure
        self.paces: dict[str, PathPace] = {}  # the speed of the path to each remote site (relay_router.pace)
        self.shared: dict[str, SharedDevice] = {d.ae_title: d for d in config.shared}
        self.active: dict[str, Outcome] = {}
        self.relays: set[RelayedAssociation] = set()
        # Verified association ids, kept on disk for the freshness window: refuses replays, across restarts too.
        self._seen_associations = SeenAssociations(config.router.state_dir / "seen_associations")
        pinned = {p.site for p in config.pin}
        self._routes = RouteCache(config.remote, self.shared, expose_all=config.dicom.expose_all, pinned=pinned)
        dicom = config.dicom
        self.limits = Limits(
            dicom.max_associations, dicom.outbound_limit, dicom.inbound_limit, dicom.inbound_per_site_limit
        )
        # The LAN allow-list; [[shared]] hosts are added once they are resolved, in start().
        self.callers = Callers.build(config.local, {})
        self.pending = PendingRequests(dicom.max_pending_requests, dicom.max_pending_per_address)
        self._pending_logged = 0.0
        self.history: collections.deque[Outcome] = collections.deque(maxlen=1000)
        self._server: asyncio.base_events.Server | None = None
        self._tls_server: asyncio.base_events.Server | None = None
        self.tls_port: int | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.port: int | None = None
        self.metrics = RouterMetrics(self)
        self.identity = IdentityWiring(lambda: self.config, self.audit)  # patient identity routes (issue 14)
        # Accelerated routes (issue 13): spool, transfers, delivery pools; None unless configured.
        self.accel = (
            AccelRuntime(config, self.link, self.audit, blobs=self.blobs, spill=self.spill)
            if accel_configured(config)
            else None
        )
        if self.accel is not None:
            self.accel.register_metrics(self.metrics.registry)

    # -- routing table -------------------------------------------------------
    def route_table(self) -> RouteTable:
        """The table of the current directory (relay_router.routing; rebuilt only when the directory changes)."""
        table = self._routes.table(self.link.directory)
        for event in self._routes.take_events():
            self._report_route_event(event)
        return table

    def _report_route_event(self, event: RouteEvent) -> None:
        """Log and audit what changed in the routes expose_all derives from the directory (the bridge's word).

        A title that stops leading to its pinned site is an alert (audit event `route_changed`, or
        `route_conflict` when a second site publishes it), whether or not it is routed afterwards.
        """
        sites = " and ".join(event.sites)
        extra = {"route_event": event.kind, "ae_title": event.title}
        if event.kind == "route_conflict":
            was = f" (it led to {event.previous})" if event.previous else ""
            log.warning(
                "expose_all: AE title %r is published by several sites (%s); it is not routed%s",
                event.title,
                sites,
                was,
                extra=extra,
            )
            self.audit.event(
                "route_conflict",
                "alert" if event.previous else "failure",
                ae_title=event.title,
                sites=list(event.sites),
                previous_site=event.previous,
                routed=False,
            )
        elif event.kind == "route_changed" or event.previous is not None:
            routed = event.kind == "route_changed"
            log.warning(
                "expose_all: AE title %r now leads to site %s instead of pinned site %s%s",
                event.title,
                sites,
                event.previous,
                "" if routed else "; that site has no [[pin]], so the title is not routed",
                extra=extra,
            )
            self.audit.event(
                "route_changed",
                "alert",
                ae_title=event.title,
                site=event.sites[0],
                previous_site=event.previous,
                routed=routed,
            )
        else:
            log.info(
                "expose_all: AE title %r at site %s is not routed: the site has no [[pin]] in router.toml",
                event.title,
                sites,
                extra=extra,
            )

    def routes(self) -> dict[str, Route]:
        """Local AE title -> remote device, from [[remote]] and (with expose_all) the directory."""
        return dict(self.route_table().routes)

    def local_alias(self, site: str, ae_title: str) -> str | None:
        """The local title under which a remote device is exposed here, if any."""
        return self.route_table().local_alias(site, ae_title)

    # -- lifecycle -----------------------------------------------------------
    async def _resolve_shared_hosts(self) -> dict[str, list[str]]:
        """The addresses each [[shared]] device's host has now: they may call through the router without a
        [[local]] entry. Resolved at start and on each configuration reload (SIGHUP)."""
        loop = asyncio.get_running_loop()
        resolved: dict[str, list[str]] = {}
        for device in self.config.shared:
            try:
                infos = await loop.getaddrinfo(device.host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve %s (shared device %s): %s", device.host, device.ae_title, exc)
                continue
            resolved[device.ae_title] = sorted({str(info[4][0]) for info in infos})
        return resolved

    async def load_callers(self) -> None:
        """Build the LAN allow-list, with the [[shared]] hosts resolved now (only when [[local]] entries exist);
        at start and on every configuration reload."""
        if self.config.local:
            self.callers = Callers.build(self.config.local, await self._resolve_shared_hosts())
        else:
            self.callers = Callers.build((), {})

    async def start(self) -> None:
        host, port = parse_host_port(self.config.dicom.listen)
        await self.load_callers()
        # The reader's buffer limit: until the A-ASSOCIATE-RQ is complete nothing past it is read
        # (outbound._read_request), and afterwards the relay drains the buffer as it goes.
        limit = self.config.dicom.max_request_bytes
        self._server = await asyncio.start_server(self._local_connection, host, port, limit=limit)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.config.dicom.tls_listen:
            await self._start_tls_listener(limit)
        await self.identity.start()  # the ADT feed, when [identity] adt_listen is set
        self._link_task = asyncio.create_task(self.link.run())
        if self.accel is not None:
            self.accel.start()
        if self.config_path is not None:
            self._remove_reload_hook = add_reload_hook(self._reload_requested)
        if self.status_file is not None:
            self._status_task = asyncio.create_task(self._write_status())
        log.info(
            "listening for DICOM on %s:%d; %d shared, %d remote devices configured",
            host,
            self.port,
            len(self.config.shared),
            len(self.config.remote),
        )

    def tls_context(self) -> ssl.SSLContext:
        """The LAN side's TLS (PS3.15 B.1/B.3 over BCP 195): TLS 1.2 or later, Python's default cipher choice
        (forward-secret AEAD suites), the router's own certificate; a device certificate when tls_ca_file is set."""
        dicom = self.config.dicom
        assert dicom.tls_cert_file is not None and dicom.tls_key_file is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(dicom.tls_cert_file, dicom.tls_key_file)
        if dicom.tls_ca_file is not None:
            context.load_verify_locations(cafile=dicom.tls_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def _start_tls_listener(self, limit: int) -> None:
        host, port = parse_host_port(self.config.dicom.tls_listen)
        self._tls_server = await asyncio.start_server(
            self._local_connection,
            host,
            port,
            limit=limit,
            ssl=self.tls_context(),
            # The handshake happens before the handler runs: bound it like the A-ASSOCIATE-RQ.
            ssl_handshake_timeout=self.config.dicom.artim_timeout_s,
        )
        self.tls_port = self._tls_server.sockets[0].getsockname()[1]
        client = "device certificates required" if self.config.dicom.tls_ca_file else "no device certificates"
        log.info("listening for DICOM over TLS on %s:%d (%s)", host, self.tls_port, client)

    # -- configuration reload (SIGHUP) ---------------------------------------------------------
    def _reload_requested(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload_config(), name="config-reload")
        self._reloads.add(task)  # a reference until it is done (stop() cancels one still running)
        task.add_done_callback(self._reloads.discard)

    async def reload_config(self) -> bool:
        """Re-read the configuration file and apply [[shared]], [[remote]], [[local]] and [[pin]].

        Running associations keep what they were admitted with (route, peer key, caller check); new
        ones use the new sections. An invalid file changes nothing; keys that need a restart are
        reported and not applied. Returns whether the file was valid.
        """
        assert self.config_path is not None
        try:
            new = await asyncio.to_thread(load, self.config_path)
            # Checks across sections run on the merged result too (a route's patient_identity needs the
            # running [identity] issuer, which only a restart changes).
            merged = with_reloadable(self.config, new)
        except (ConfigError, ValueError) as exc:
            log.error("configuration reload failed, keeping the running configuration: %s", exc)
            self.audit.event("config_reload", "failure", file=str(self.config_path), detail=str(exc))
            return False
        changes = config_changes(self._file_config, new)
        for key in changes.needs_restart:
            log.warning("configuration reload: needs a restart: %s (not applied)", key)
        self._file_config = new
        self.config = merged
        self.link.config = self.config
        self.shared = {d.ae_title: d for d in self.config.shared}
        self._routes.reconfigure(self.config.remote, self.shared, pinned={p.site for p in self.config.pin})
        for site, offered in self.link.peers.set_pins({p.site: p.fingerprint for p in self.config.pin}).items():
            self.audit.event(
                "identity_mismatch", "alert", site=site, offered=offered, pinned=self.link.peers.expected(site)
            )
        await self.load_callers()
        published = "shared" in changes.applied and await self._publish_shared()
        self.config_loaded_at = time.time()
        sections = ", ".join(f"[[{name}]]" for name in changes.applied)
        log.info(
            "configuration reloaded from %s: %s%s",
            self.config_path,
            f"{sections} changed" if sections else "no change applied",
            f"; needs a restart: {', '.join(changes.needs_restart)}" if changes.needs_restart else "",
        )
        self.audit.event(
            "config_reload",
            "success",
            file=str(self.config_path),
            changed=list(changes.applied),
            needs_restart=list(changes.needs_restart),
            published=published,
        )
        return True

    async def _publish_shared(self) -> bool:
        """Send the new [[shared]] list to the bridge (which applies one publication per 2 s at most)."""
        try:
            sent = await self.link.publish_devices()
        except Exception as exc:  # a broken link: the next sign-on carries the new list
            log.warning("could not publish the new shared devices now (%s); the next sign-on carries them", exc)
            return False
        if sent:
            log.info("published %d shared devices to the bridge", len(self.config.shared))
        else:
            log.warning("not signed on to the bridge: the new shared devices are published at the next sign-on")
        return sent

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running associations finish for `grace_s`, then abort the rest."""
        if self._remove_reload_hook is not None:
            self._remove_reload_hook()
        for reload in list(self._reloads):
            reload.cancel()
        await asyncio.gather(*self._reloads, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        if self._tls_server is not None:
            self._tls_server.close()
        if self.accel is not None:
            self.accel.end_sessions()  # accelerated transfers resume by themselves: they need no grace period
        if self._tasks:
            log.info("waiting up to %.0f s for %d associations", grace_s, len(self._tasks))
            _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
            for relay in list(self.relays):  # still running after the grace period: abort, never just drop
                await relay.abort("the router is shutting down", close_reason=pb.Close.SHUTDOWN)
            if pending:
                _, pending = await asyncio.wait(pending, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.accel is not None:
            await self.accel.stop()
        await self.link.stop()
        for own in (self._link_task, self._status_task):
            if own is not None:
                own.cancel()
                await asyncio.gather(own, return_exceptions=True)
        await self.identity.stop()

    async def _run(self, relay: RelayedAssociation, initial: list[Action] | None = None) -> None:
        self.relays.add(relay)
        try:
            await relay.run(initial)
        finally:
            self.relays.discard(relay)
            self.metrics.relay_finished(relay)

    def _track(self, coro: object) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _finished(self, outcome: Outcome) -> None:
        self.active.pop(outcome.association_id, None)
        outcome.ended = outcome.ended or time.time()
        self.history.append(outcome)
        self.metrics.finished(outcome)
        self.audit.event(
            "association",
            outcome.audit_outcome,
            association=outcome.association_id,
            direction=outcome.direction,
            site=outcome.site,
            calling_ae=outcome.calling_ae,
            called_ae=outcome.called_ae,
            result=outcome.result,
            reason=outcome.reason,
            detail=outcome.detail,
            **({"address": outcome.address} if outcome.address else {}),
            abstract_syntaxes=list(outcome.abstract_syntaxes),
            bytes_out=outcome.bytes_to_remote,
            bytes_in=outcome.bytes_to_local,
            seconds=round(outcome.ended - outcome.started, 3),
            studies=outcome.studies or None,  # DICOM Instances Transferred when any (relay_router.studytap)
            queries=outcome.queries or None,  # DICOM Query messages (C-FIND identifiers)
        )

    # -- reporting -----------------------------------------------------------
    def status(self) -> dict[str, object]:
        return {
            "site": self.config.router.name,
            "connected": self.link.connected,
            "connected_since": self.link.connected_since,
            "last_error": self.link.last_error,
            "reconnects": self.link.reconnects,
            "dicom_port": self.port,
            **({"dicom_tls_port": self.tls_port} if self.tls_port is not None else {}),
            "directory": [asdict(e) for e in self.link.directory],
            "routes": {title: asdict(route) for title, route in sorted(self.routes().items())},
            "active_associations": len(self.active),
            "config_loaded_at": self.config_loaded_at,
            **status_extra(self),
            **({"accelerate": self.accel.status()} if self.accel is not None else {}),
        }

    async def _write_status(self) -> None:
        """Keep `status_file` current (atomically replaced) for supervisors and tests."""
        assert self.status_file is not None
        previous = ""
        while True:
            text = json.dumps(self.status(), sort_keys=True)
            if text != previous:
                tmp = self.status_file.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.replace(self.status_file)
                previous = text
            await asyncio.sleep(0.2)
