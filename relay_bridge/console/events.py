"""Recent refusals and security alerts, for the console: a bounded ring fed by the bridge's audit log.

The console subscribes to `AuditLog.observers`, so every place that audits a failure or an alert (sign-on
refusals, access refused, forged blob URLs, ...) shows here without a hook of its own. Only the fields
below are kept, each cut to a bounded length: the bridge's audit carries no patient data, and the console
keeps none either.
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from typing import Any

KEEP = 200
FIELDS = ("router", "admin", "source", "to_site", "calling_ae", "called_ae", "association", "detail")
MAX_FIELD = 200


class EventRing:
    def __init__(self, keep: int = KEEP) -> None:
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.counts: collections.Counter[str] = collections.Counter()

    def observe(self, record: dict[str, Any]) -> None:
        """An audit record; failures and alerts are kept (called from any thread: deque appends are atomic)."""
        outcome = record.get("outcome")
        if outcome not in ("failure", "alert"):
            return
        event: dict[str, object] = {k: str(record[k])[:MAX_FIELD] for k in FIELDS if record.get(k) not in (None, "")}
        event.update(time=_epoch(record.get("time")), event=str(record.get("event", ""))[:64], outcome=outcome)
        self.events.append(event)
        self.counts[outcome] += 1

    def newest(self, n: int = 50) -> list[dict[str, Any]]:
        return list(reversed(self.events))[:n]


def _epoch(iso: object) -> float:
    try:
        return dt.datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return time.time()
