"""Rate limits for what a hostile router can make the bridge write: refusal audits and their log lines.

Every refusal is still answered and counted in the metrics; only its audit
event is limited, per key (a source address, a router), to `burst` events and
then `per_s` events a second. The next event written for a key says how many
were left out (`suppressed`), so the audit trail stays honest about volume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    dropped: int = 0


class AuditLimiter:
    """Token buckets per key; the table is bounded (the oldest keys are forgotten first)."""

    def __init__(self, *, burst: int = 20, per_s: float = 1.0, max_keys: int = 10_000) -> None:
        self.burst, self.per_s, self.max_keys = burst, per_s, max_keys
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        bucket = self._buckets.pop(key, None) or _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.per_s)
        bucket.stamp = now
        self._buckets[key] = bucket  # re-inserted: the dict's order is least recently used first
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        bucket.dropped += 1
        return False

    def suppressed(self, key: str) -> int:
        """How many events for `key` were left out since the last one written (and reset that count)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0
        dropped, bucket.dropped = bucket.dropped, 0
        return dropped
