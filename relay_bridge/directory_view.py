"""The directory each router is sent, built from one indexed in-memory view of the database.

The control service reads the devices and identities once per change (on the
directory's own thread), builds a `DirectoryView`, and answers every router's
`directory_for` from it: no database call per router, and no scan of every
device per router (devices are indexed by whom they are shared with).

A router's directory message is bounded (`max_bytes`): when the devices it may
reach do not fit, each owner site gets its turn in round-robin order, so one
site that publishes a lot cannot push the others out; what was left out is
logged with the limit's name.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.db.backend import DirectoryBackend
from relay_bridge.directory import Device

log = logging.getLogger("relay_bridge")
KEM_NAME = "MLKEM768-X25519"
EVERY_SITE = "*"


@dataclass
class DirectoryView:
    """Devices indexed by share target and by owner, and the identity keys, as read at one moment."""

    identities: dict[str, tuple[bytes, bytes]]
    by_key: dict[tuple[str, str], Device] = field(default_factory=dict)
    by_target: dict[str, list[Device]] = field(default_factory=lambda: collections.defaultdict(list))
    by_owner: dict[str, list[Device]] = field(default_factory=lambda: collections.defaultdict(list))

    @classmethod
    def build(cls, devices: Iterable[Device], identities: dict[str, tuple[bytes, bytes]]) -> DirectoryView:
        view = cls(identities)
        for d in devices:
            view.by_key[(d.router, d.ae_title)] = d
            view.by_owner[d.router].append(d)
            for target in set(d.share_with):
                view.by_target[target].append(d)
        return view

    def device(self, router: str, ae_title: str) -> Device | None:
        return self.by_key.get((router, ae_title))

    def reachable_by(self, site: str) -> list[Device]:
        """The devices `site` may call, in (owner, title) order."""
        found = {(d.router, d.ae_title): d for d in self.by_target.get(EVERY_SITE, ()) if d.router != site}
        found.update({(d.router, d.ae_title): d for d in self.by_target.get(site, ()) if d.router != site})
        return [found[k] for k in sorted(found)]

    def callers_of(self, site: str) -> set[str]:
        """The sites named as callers of `site`. A share with "*" names nobody: such a router gets
        each caller's identity in the `IncomingAssociation` of that call only, never every site's."""
        return {t for d in self.by_owner.get(site, ()) for t in d.share_with if t != EVERY_SITE}

    def for_site(self, site: str, online: Collection[str], *, max_bytes: int) -> pb.Directory:
        reachable = self.reachable_by(site)
        # Keys of the sites we may call, and of the sites that may call us (to verify them).
        owners = ({d.router for d in reachable} | self.callers_of(site)) - {site}
        message = pb.Directory(
            identities=[
                pb.SiteIdentity(
                    site=o,
                    identity=pb.Identity(sign_key=self.identities[o][0], kem_key=self.identities[o][1], kem=KEM_NAME),
                )
                for o in sorted(owners)
                if o in self.identities
            ]
        )
        budget = max_bytes - message.ByteSize()
        entries = [
            pb.RemoteDevice(
                site=d.router,
                ae_title=d.ae_title,
                description=d.description,
                online=d.router in online,
                services=d.services_for(site) or (),
            )
            for d in reachable
            if d.services_for(site) != ()  # granted nothing: not shown (its owner refuses it anyway)
        ]
        sizes = [e.ByteSize() + 4 for e in entries]  # + the field's tag and length
        if sum(sizes) <= budget:
            message.devices.extend(entries)
            return message
        kept = fair_share(list(zip(entries, sizes, strict=True)), budget)
        message.devices.extend(kept)
        log.error(
            "the directory for %s is cut to %d of %d devices: it would exceed %d bytes (max_directory_bytes)",
            site,
            len(kept),
            len(entries),
            max_bytes,
        )
        return message


class DirectoryCache:
    """The current `DirectoryView`, read again (on the directory's thread) after each change.

    Opens and directory messages are answered from memory; a change that lands while the view is
    being read makes the next use read it again (a generation count), so a stale view is never kept.
    Changes made by another process (`relay-bridge router disable` on the database) are seen within
    `max_age_s`.
    """

    def __init__(self, directory: DirectoryBackend, *, max_age_s: float = 2.0) -> None:
        self.directory = directory
        self.max_age_s = max_age_s
        self._view: DirectoryView | None = None
        self._read_at = 0.0
        self._generation = 0

    def changed(self) -> None:
        self._view = None
        self._generation += 1

    async def view(self) -> DirectoryView:
        view = self._view
        if view is None or time.monotonic() - self._read_at > self.max_age_s:
            generation = self._generation
            self._read_at = time.monotonic()
            devices = await self.directory.devices()
            identities = await self.directory.identities()
            view = DirectoryView.build(devices, identities)
            if generation == self._generation:
                self._view = view
        return view


def fair_share(entries: list[tuple[pb.RemoteDevice, int]], budget: int) -> list[pb.RemoteDevice]:
    """Entries taken one per owner site in turn until `budget` bytes are used, in their original order."""
    per_owner: dict[str, collections.deque[tuple[int, int]]] = collections.defaultdict(collections.deque)
    for index, (entry, size) in enumerate(entries):
        per_owner[entry.site].append((index, size))
    chosen: set[int] = set()
    queues = list(per_owner.values())
    for queue in itertools.cycle(queues):
        if not any(queues):
            break
        if not queue:
            continue
        index, size = queue[0]
        if size > budget:
            queue.clear()  # this owner's next device does not fit; the others may still
            continue
        queue.popleft()
        budget -= size
        chosen.add(index)
    return [entries[i][0] for i in sorted(chosen)]
