"""Everything accelerated routes need at run time, owned by `RouterService` (created only when configured).

Near side (a `[[remote]]` entry with `accelerate = true`): the spool, one `NearTransfer` per entry, the
capabilities learned from each far router. Far side (a `[[shared]]` device with `accelerate = true`):
the same spool, one delivery pool per device (relay_router.accel.delivery, parallel associations), the
capabilities probed from each device, the outcomes owed to near routers and the live `FarSession`s
that pass them on. The hooks in outbound.py and inbound.py call `acceptor_for` and `far_session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay_common.audit import AuditLog
from relay_router.accel.capabilities import CapabilityCache, DeviceCapabilities
from relay_router.accel.commitment import CommitmentService
from relay_router.accel.delivery import DeliveryOutcome, DeliveryPool, Destination, Outcome
from relay_router.accel.metrics import DeliveryStats, register_accel_metrics
from relay_router.accel.moves import MoveKey, MoveRegistry, MoveWatch, PartnerSenders, move_fields
from relay_router.accel.receive import FarSession, OutcomeBook, far_route_name
from relay_router.accel.spool import EntryState, Spool, SpoolEntry
from relay_router.accel.transfer import NearTransfer, route_name
from relay_router.config import RouterConfig, SharedDevice, spool_dir
from relay_router.routing import Route
from relay_router.spill import BlobTransport, SpillState
from relay_router.tunnel import BridgeLink

log = logging.getLogger("relay_router.accel")


def configured(config: RouterConfig) -> bool:
    return any(r.accelerate for r in config.remote) or any(d.accelerate for d in config.shared)


class AccelRuntime:
    def __init__(
        self,
        config: RouterConfig,
        link: BridgeLink,
        audit: AuditLog | None = None,
        *,
        blobs: BlobTransport | None = None,
        spill: SpillState | None = None,
    ) -> None:
        self.config = config
        self.link = link
        self.audit = audit  # the far sessions' security alerts (relay_router.accel.receive)
        # Cloud spill, shared with the transparent associations: large instances go by reference.
        self.blobs = blobs
        self.spill = spill or SpillState()
        section = config.accelerate
        self.spool = Spool(
            spool_dir(config),
            max_bytes=section.spool_max_bytes,
            max_attempts=section.max_attempts,
            retry_max_s=section.retry_max_s,
        )
        state: Path = config.router.state_dir / "accel"
        self.near_capabilities = CapabilityCache(state / "capabilities-near.json", section.capability_refresh_s)
        self.far_capabilities = CapabilityCache(state / "capabilities-far.json", section.capability_refresh_s)
        self.book = OutcomeBook(state / "outcomes.json")
        self.near: dict[str, NearTransfer] = {
            r.ae_title: NearTransfer(
                config,
                link,
                self.spool,
                self.near_capabilities,
                local_ae=r.ae_title,
                route=Route(r.site, r.target),
                audit=audit,
                blobs=blobs,
                spill=self.spill,
            )
            for r in config.remote
            if r.accelerate
        }
        # Storage commitment on the near routes (relay_router.accel.commitment): outcomes from the spool.
        self.commitment: CommitmentService | None = None
        if self.near:
            self.commitment = CommitmentService(
                state,
                self.spool,
                section,
                (t.route_name for t in self.near.values()),
                accepts=self._destination_accepts,
                audit=audit,
            )
            self.spool.on_change = self.commitment.spool_changed
        # Accelerated retrieval (relay_router.accel.moves): final C-MOVE responses held until delivery here.
        self.moves: MoveRegistry | None = None
        self.move_partners = PartnerSenders(state / "move-partners.json")
        if any(d.accelerate for d in config.shared):
            self.moves = MoveRegistry(section.move_hold_max_s)
        self.stats = DeliveryStats()  # the delivery pools' counters (relay_router.accel.metrics)
        self.pools: dict[str, DeliveryPool] = {}
        self.sessions: dict[str, set[FarSession]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.moves is not None:
            self.moves.start(self._loop)
        self._settle_delivered()
        if self.commitment is not None:
            task = asyncio.create_task(self.commitment.run(), name="accel-commitment")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for transfer in self.near.values():
            task = asyncio.create_task(transfer.run(), name=f"accel-{transfer.route_name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        dicom = self.config.dicom
        for device in self.config.shared:
            if not device.accelerate:
                continue
            pool = DeliveryPool(
                self.spool,
                far_route_name(device),
                Destination(device.host, device.port, device.ae_title, self.config.router.name[:16]),
                associations=self.config.accelerate.associations,
                on_outcome=self._delivered,
                connect_timeout=dicom.connect_timeout_s,
                dimse_timeout=dicom.dimse_timeout_s,
                stats=self.stats,
            )
            pool.start()
            self.pools[device.ae_title] = pool
        log.info(
            "accelerated routes: %d near ([[remote]]), %d far ([[shared]]); spool %s",
            len(self.near),
            len(self.pools),
            self.spool.root,
        )

    def _settle_delivered(self) -> None:
        """DELIVERED entries left by a crash between the device's answer and their removal: the outcome is
        owed (far side; the book ignores a repeat) and the data can go."""
        for entry in self.spool.entries(state=EntryState.DELIVERED):
            site, origin = entry.meta.get("origin_site", ""), entry.meta.get("origin_id", "")
            if site and origin:
                self.book.add(site, origin, entry.sop_instance_uid, 0x0000, "")
            self.spool.remove(entry.id)

    def end_sessions(self) -> None:
        """Shutdown: far sessions end at once instead of holding the grace period (nothing is lost: what the
        near router sent without a STORED answer is sent again on its next stream)."""
        for sessions in self.sessions.values():
            for session in list(sessions):
                session.stop()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(pool.stop, 10.0) for pool in self.pools.values()))
        self.spool.close()
        if self.commitment is not None:
            self.commitment.close()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """The spool and delivery families on the router's /metrics (relay_router.accel.metrics)."""
        routes = [t.route_name for t in self.near.values()]
        routes += [far_route_name(d) for d in self.config.shared if d.accelerate]
        register_accel_metrics(registry, lambda: self.spool, self.stats, lambda: routes)
        if self.commitment is not None:
            self.commitment.register_metrics(registry)

    # -- near side -----------------------------------------------------------------------------------
    def capabilities_for(self, local_ae: str, config: RouterConfig) -> DeviceCapabilities | None:
        """What the far device accepts, if this title is an accelerated route (in the running `config`, which
        a reload may have changed) and it was ever learned."""
        if local_ae not in self.near or not any(r.ae_title == local_ae and r.accelerate for r in config.remote):
            return None
        return self.near_capabilities.get(local_ae)

    def _destination_accepts(self, route: str, sop_class: str) -> bool | None:
        """Whether the far device takes `sop_class` (storage commitment's 0x0122), None if not learned."""
        titles = [title for title, transfer in self.near.items() if transfer.route_name == route]
        capabilities = self.near_capabilities.get(titles[0]) if titles else None
        return None if capabilities is None else sop_class in capabilities.contexts

    def committed(self, local_ae: str) -> None:
        transfer = self.near.get(local_ae)
        if transfer is not None:
            transfer.wake()

    def near_route(self, local_ae: str) -> str:
        return route_name(local_ae)

    # -- far side ------------------------------------------------------------------------------------
    def accepts(self, device: SharedDevice) -> bool:
        return device.accelerate and device.ae_title in self.pools

    def move_watch(self, site: str, calling_ae: str, association_id: str, config: RouterConfig) -> MoveWatch | None:
        """The C-MOVE watch of an outbound transparent association to `site` (relay_router.accel.moves), if
        this router takes accelerated transfers at all."""
        if self.moves is None:
            return None

        def accelerated(title: str) -> str | None:
            """Which device a C-MOVE to `title` (the site's title for it) comes back to accelerated: one of our
            accelerated [[shared]] devices (in the running `config`, which a reload may have changed) that
            `site` may send to and has sent to the accelerated way (relay_router.accel.moves.PartnerSenders)."""
            device = self.move_partners.device_for(site, title)
            accelerated = any(
                d.ae_title == device and d.accelerate and d.ae_title in self.pools and d.services_for(site)
                for d in config.shared
            )
            return device if accelerated else None

        return self.moves.watch(site, calling_ae, accelerated, association_id)

    def transparent_inbound(self, site: str, device: SharedDevice) -> None:
        """`site` relayed an association to accelerated `device` transparently (relay_router.inbound): its
        C-MOVE sub-operations may come that way too (relay_router.accel.moves)."""
        if not device.accelerate:
            return
        self.move_partners.discard(site, device.ae_title)
        if self.moves is not None:
            self.moves.transparent_seen(site, device.ae_title)

    def session_started(self, session: FarSession) -> None:
        self.sessions.setdefault(session.from_site, set()).add(session)

    def session_ended(self, session: FarSession) -> None:
        self.sessions.get(session.from_site, set()).discard(session)

    def wake_pool(self, device: SharedDevice) -> None:
        pool = self.pools.get(device.ae_title)
        if pool is not None:
            pool.wake()

    def _delivered(self, result: DeliveryOutcome) -> None:
        """The delivery pool's callback (a worker thread): a final outcome is owed to the near router."""
        if result.outcome is Outcome.RETRY:
            return
        entry = result.entry
        site, origin = entry.meta.get("origin_site", ""), entry.meta.get("origin_id", "")
        if not site or not origin:
            return
        # No DIMSE status (unsendable file, no response until max_attempts): PS3.7 C 0x0110, processing failure.
        status = result.status if result.status is not None else 0x0110
        originator, message_id = move_fields(entry.meta)
        if self.moves is not None and originator is not None and message_id is not None:
            # entry.route: the device it was delivered to (relay_router.accel.receive.far_route_name)
            self.moves.finished(MoveKey(site, originator, message_id), entry.sop_instance_uid, status, entry.route)
        self.book.add(site, origin, entry.sop_instance_uid, status, result.error)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the book sends it next time
                asyncio.run_coroutine_threadsafe(self._report(site, entry, status, result.error), self._loop)

    async def _report(self, site: str, entry: SpoolEntry, status: int, error: str) -> None:
        for session in list(self.sessions.get(site, ())):
            await session.report(entry, status, error)

    def status(self) -> dict[str, object]:
        used, limit, counts = self.spool.usage()
        return {
            "spool_bytes": used,
            "spool_max_bytes": limit,
            "spool_entries": {str(state): count for state, count in counts.items()},
            "outcomes_unreported": self.book.count(),
            "commitment": None if self.commitment is None else self.commitment.status(),
            "moves": None if self.moves is None else self.moves.status(),
            "routes": {
                title: {
                    "site": t.route.site,
                    "ae_title": t.route.ae_title,
                    "connected": t.connected,
                    "capabilities_known": self.near_capabilities.get(title) is not None,
                    "in_flight": len(t.in_flight),
                    "last_error": t.last_error,
                }
                for title, t in self.near.items()
            },
        }
