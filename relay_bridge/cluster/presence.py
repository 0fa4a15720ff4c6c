"""This replica's leased rows: its registration, and one presence row per control stream it holds.

`claim` runs at each sign-on (a newer sign-on of the same site replaces the row at once, on
whichever replica it lands), `release` when a control stream ends (it deletes only this
replica's own row, never the newer holder's). Every `renew_s` the loop renews the replica's
lease and its sites' leases; a site whose row now names another replica was signed on there
since, so this replica's stream for it is stale and is cut (`on_lost`). The replica that takes a
site over also tells the previous holder at once (`on_taken`, then the Evict call of
relay_bridge.cluster.forward, which lands in `evicted`); the renewal is the safety net when that
call cannot get through. The loop also keeps the
set of sites online anywhere in the cluster (`online`), so each router's directory shows a
site held by another replica as online, and calls `on_change` when that set changes.

The same renewal keeps **where** each site is held (`holders`): an Open towards a site held by
another replica takes the holder from there instead of querying the database on the way (a
sign-on's claim is one query less on every cross-replica association's setup). The map is at most
`renew_s` old (older entries are not used: the database is asked); it is replaced whole at each
renewal, so it holds no more than the live presence rows (and at most `MAX_HOLDERS`). A site
that moved since is found by the Open itself: the replica it reaches no longer holds the site and
refuses it as offline, and the origin drops the entry, asks the database and forwards once more
(relay_bridge.cluster.forward).

Database errors never end the loop: they are logged, and the leases run on until the next
successful renewal (a replica that cannot renew for `lease_s` disappears from the others' view,
which is what its routers see anyway when it cannot reach the database).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from relay_bridge.db.backend import DirectoryBackend
from relay_bridge.db.replicas import Replica
from relay_common.errors import RelayError

log = logging.getLogger("relay_bridge.cluster")
# Rows whose lease ended this long ago are deleted by whichever replica renews next (they are
# already invisible; this only keeps the tables small).
EXPIRED_ROWS_KEPT_S = 300.0
MAX_HOLDERS = 100_000  # sites whose holder is kept in memory (the cluster's sites; more: the database is asked)


@dataclass(frozen=True)
class Location:
    """Where a site's control stream is held: another replica's id and internal address. `cached`: from
    the in-memory map of the last renewal, not read from the database for this Open."""

    replica: str
    address: str
    cached: bool = field(default=False, compare=False)


@dataclass
class Load:
    """What this replica reports in its row (read when it renews)."""

    draining: Callable[[], bool] = lambda: False
    sites: Callable[[], int] = lambda: 0
    associations: Callable[[], int] = lambda: 0


@dataclass
class PresenceKeeper:
    directory: DirectoryBackend
    replica_id: str
    address: str
    lease_s: float = 10.0
    renew_s: float = 2.0
    load: Load = field(default_factory=Load)
    # A site signed on at another replica since: cut this replica's stream for it.
    on_lost: Callable[[str], None] = lambda site: None
    # This replica took `site` (signed on at `since`) over from the live replica at `Location`.
    on_taken: Callable[[str, float, Location], None] = lambda site, since, previous: None
    # The set of sites online anywhere changed: the routers' directories should be sent again.
    on_change: Callable[[], None] = lambda: None
    started: float = field(default_factory=time.time)
    online: frozenset[str] = frozenset()
    # Sites whose row this replica wrote and has not released; only these can be found lost (a
    # sign-on whose claim is still on its way is not).
    _claimed: dict[str, float] = field(default_factory=dict)
    _claiming: set[str] = field(default_factory=set)  # claims on their way to the database
    _task: asyncio.Task[None] | None = None
    # site -> (the other replica holding it, when that was read; monotonic): see `locate`.
    _holders: dict[str, tuple[Location, float]] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def _row(self, now: float) -> Replica:
        return Replica(
            self.replica_id,
            self.address,
            self.started,
            now + self.lease_s,
            self.load.draining(),
            self.load.sites(),
            self.load.associations(),
        )

    async def start(self) -> None:
        """Register (raises if the database cannot be reached: a replica that cannot register must not serve).

        Rows left by an earlier life of this replica id (killed, restarted within the lease) go first:
        renewing them would keep sites "online" here that are held nowhere.
        """
        await self.directory.remove_replica(self.replica_id)
        await self.directory.register_replica(self._row(time.time()))
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cluster-presence")

    async def stop(self) -> None:
        """Clean exit: remove this replica's rows (the others stop forwarding here at once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.directory.remove_replica(self.replica_id)
        except RelayError as exc:
            log.warning("could not remove this replica's rows (they expire with their lease): %s", exc)

    async def claim(self, site: str, since: float) -> bool:
        """Record that this replica holds `site`'s control stream (signed on at `since`).

        False: an even newer sign-on of the site is recorded elsewhere, so this one is already stale.
        """
        self._claiming.add(site)
        try:
            previous = await self.directory.locate(site, time.time())
            claimed = await self.directory.claim_presence(site, self.replica_id, since, time.time() + self.lease_s)
        finally:
            self._claiming.discard(site)
        if claimed:
            self._claimed[site] = since
            self._holders.pop(site, None)  # held here now (and the sessions are asked first anyway)
            if previous is not None and previous[0] != self.replica_id:
                self.on_taken(site, since, Location(*previous))
        return claimed

    def evicted(self, site: str, since: float) -> bool:
        """Another replica says `site` signed on there at `since`: cut our stream if it is older."""
        self._holders.pop(site, None)  # wherever it was: read it from the database next time
        ours = self._claimed.get(site)
        if ours is None or ours >= since:
            return False
        del self._claimed[site]
        log.warning("router %s signed on at another replica; its stream here is stale and is cut", site)
        self.on_lost(site)
        return True

    async def release(self, site: str, since: float) -> None:
        """The control stream signed on at `since` ended (only that sign-on's row is removed)."""
        if self._claimed.get(site) != since:
            return  # another sign-on of the site at this replica holds the row now
        del self._claimed[site]
        try:
            await self.directory.release_presence(site, self.replica_id)
        except RelayError as exc:
            log.warning("could not remove the presence row of %s (it expires with its lease): %s", site, exc)

    async def locate(self, site: str, *, fresh: bool = False) -> Location | None:
        """The other replica holding `site`: from the map of the last renewal while it is at most `renew_s`
        old (marked `cached`), else (or with `fresh`) from the database, whose answer is kept."""
        entry = None if fresh else self._holders.get(site)
        if entry is not None and self.clock() - entry[1] <= self.renew_s:
            return entry[0]
        read_at = self.clock()
        found = await self.directory.locate(site, time.time())
        if found is None or found[0] == self.replica_id:
            self._holders.pop(site, None)
            return None  # not held, or our own row for a stream that ended (the caller checked its sessions)
        if site in self._holders or len(self._holders) < MAX_HOLDERS:
            self._holders[site] = (Location(*found, cached=True), read_at)
        return Location(*found)

    def forget_holder(self, site: str, location: Location) -> None:
        """`location` turned out not to hold `site` (it refused the Open as offline): ask the database next."""
        entry = self._holders.get(site)
        if entry is not None and entry[0] == location:
            del self._holders[site]

    def online_with(self, local: Collection[str]) -> frozenset[str]:
        """Sites signed on here (`local`) or at any live replica (as of the last renewal)."""
        return frozenset(local) | self.online

    async def renew(self) -> None:
        """One renewal: this replica's lease, its sites' leases, lost sites, the sites online anywhere."""
        now = time.time()
        await self.directory.register_replica(self._row(now))
        held = await self.directory.renew_presence(self.replica_id, now + self.lease_s)
        for site in [s for s in self._claimed if s not in held]:
            del self._claimed[site]
            log.warning("router %s signed on at another replica; its stream here is stale and is cut", site)
            self.on_lost(site)
        # Rows of ours that no stream here stands behind (a release that failed while the database
        # was away): renewing them would keep the site "online" here for ever.
        for site in held - self._claimed.keys() - self._claiming:
            await self.directory.release_presence(site, self.replica_id)
        read_at = self.clock()
        presence = await self.directory.live_presence(now)
        addresses = {r.id: r.address for r in await self.directory.live_replicas(now)}
        holders: dict[str, tuple[Location, float]] = {}
        for row in presence:
            if row.replica != self.replica_id and row.replica in addresses and len(holders) < MAX_HOLDERS:
                holders[row.site] = (Location(row.replica, addresses[row.replica], cached=True), read_at)
        self._holders = holders
        online = frozenset(p.site for p in presence)
        if online != self.online:
            self.online = online
            self.on_change()
        await self.directory.expire_replicas(now - EXPIRED_ROWS_KEPT_S)

    async def _loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.renew_s)
            try:
                await self.renew()
            except RelayError as exc:
                if not failing:
                    log.error("cannot renew this replica's leases: %s", exc)
                failing = True
                continue
            except Exception:  # a bug must not stop the leases: the replica would vanish from the cluster
                log.exception("renewing this replica's leases failed")
                continue
            if failing:
                log.info("this replica's leases are renewed again")
            failing = False
