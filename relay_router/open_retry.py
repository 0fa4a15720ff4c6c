"""Retrying an Open while the bridge moves a router between replicas (rolling restarts).

During a rolling restart of the bridge replicas an Open can be refused for a moment although
nothing is wrong: this router's replica or the partner's is draining (`Refused.DRAINING`; a
draining replica keeps the presence rows of the routers it moved until they sign on elsewhere, so
Opens towards them reach it and get DRAINING), the partner's router is between two replicas
(`SITE_OFFLINE` for a site the bridge listed online in its latest directory or within the last
2 s, `relay_router.tunnel.ONLINE_MEMORY_S`), or this router's own link is signing on again
after a `Move` (`LinkDown` within the window after the Move). The calling device is
waiting for its A-ASSOCIATE-AC, so the router retries, for at most `[bridge] open_retry_s`
(default 10 s, well inside the 30 s a DICOM SCU usually waits), instead of refusing it.

Why the router and not the bridge: the origin replica may be the one draining, so only the
router can take the Open elsewhere; and holding Opens at the bridge for sites that are not there
would let any router make the bridge hold state for nothing. Each attempt is a new association
(a new id, a new end-to-end handshake): the refused one never reached the partner router, and a
fresh handshake keeps the destination's replay check untouched. Permanent refusals, and a site
offline for longer than 2 s, and a bridge lost without a Move, are answered at once as before.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from protos.relay.v1 import relay_pb2 as pb
from relay_router.tunnel import ONLINE_MEMORY_S

# Pause between attempts: short, since the move itself takes a fraction of a second.
FIRST_PAUSE_S = 0.1
MAX_PAUSE_S = 0.5


class Link(Protocol):
    def recently_online(self, site: str, within_s: float) -> bool: ...

    def moved_recently(self, within_s: float) -> bool: ...

    async def wait_signed_on(self, timeout_s: float) -> bool: ...


def worth_retrying(reason: int | None, *, site_listed_online: bool) -> bool:
    """Whether a failed Open may succeed in a moment. `reason`: the Refused code, None for LinkDown."""
    if reason is None or reason == pb.Refused.DRAINING:
        return True
    return reason == pb.Refused.SITE_OFFLINE and site_listed_online


@dataclass
class OpenRetry:
    link: Link
    site: str
    window_s: float
    started: float = field(default_factory=time.monotonic)
    attempts: int = 1

    def left(self) -> float:
        return self.window_s - (time.monotonic() - self.started)

    async def again(self, reason: int | None) -> bool:
        """After a failed attempt: pause, wait for the link, and say whether to try once more."""
        if reason is None and not self.link.moved_recently(self.window_s):
            return False  # the bridge was lost, not left on purpose: refused at once as before
        if not worth_retrying(reason, site_listed_online=self.link.recently_online(self.site, ONLINE_MEMORY_S)):
            return False
        pause = min(MAX_PAUSE_S, FIRST_PAUSE_S * 2 ** (self.attempts - 1))
        if self.left() <= pause:
            return False
        await asyncio.sleep(pause)
        if not await self.link.wait_signed_on(max(0.0, self.left())):
            return False
        self.attempts += 1
        return True
