"""What the bridge console shows, built from `BridgeState` on the event loop (no locks needed).

The bridge sees AE titles, site names, addresses and byte counts, never patient data; the page says so.
Every string here may come from a router (device titles, descriptions, sign-on account names): the
templates escape them (relay_common.console).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from relay_bridge.status import build_status, links
from relay_common.console.troubleshooting import entry_for

if TYPE_CHECKING:
    from relay_bridge.console.events import EventRing
    from relay_bridge.state import BridgeState


async def bridge_view(
    state: BridgeState, *, signed_off: dict[str, float], events: EventRing, started: float, port: int | None
) -> dict[str, Any]:
    directory = (await state.directory.routers(), await state.directory.devices())
    now = time.time()
    status = build_status(state, port=port, started=started, directory=directory, signed_off=signed_off)  # type: ignore[arg-type]
    active = []
    for splice in sorted(state.splices.values(), key=lambda s: s.opened):
        age = max(0.001, now - splice.opened)
        joined = splice.joined.done() and not splice.joined.cancelled()
        active.append(
            {
                "id": splice.association_id,
                "from_site": splice.from_site,
                "to_site": splice.to_site,
                "calling_ae": splice.calling_ae_title,
                "called_ae": splice.called_ae_title,
                "sent": splice.bytes_from_initiator,
                "received": splice.bytes_from_destination,
                "bytes": splice.bytes_from_initiator + splice.bytes_from_destination,
                "age": age,
                "opened": splice.opened,
                "state": "relaying" if joined else "waiting for the destination",
            }
        )
    recent = list(reversed(state.metrics.recent.last))
    finished = [r for r in recent if r.get("outcome") != "refused"]
    refused = [{**r, "help": entry_for(r.get("reason"))} for r in recent if r.get("outcome") == "refused"]
    broker = state.blobs
    spill = None
    if broker is not None:
        spill = {
            "store": broker.store.scheme,
            "put_urls": broker.slots["put"],
            "get_urls": broker.slots["get"],
            "stored": broker.served["stored"],
            "fetched": broker.served["fetched"],
        }
    return {
        "status": status,
        "sites": status["routers"],
        "links": links(status),
        "active": active,
        "finished": finished,
        "refused": refused,
        "events": events.newest(),
        "event_counts": dict(events.counts),
        "recent_counts": state.metrics.recent.counts(now),
        "spill": spill,
    }
