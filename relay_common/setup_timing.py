"""Monotonic timestamps of an association's setup hops, for `benchmarks.cluster --profile-setup`.

Off unless the process starts with RELAY_SETUP_TIMING=1 (then one debug line per hop, on the
logger `relay.setup_timing`, whatever `[logging] level` says): the benchmark reads them from the
replicas' and routers' logs and lines them up per association. All processes run on one machine
there, so CLOCK_MONOTONIC (time.monotonic, time.perf_counter) is one clock for all of them.
"""

from __future__ import annotations

import logging
import os
import time

from relay_common.validate import printable

ENV = "RELAY_SETUP_TIMING"
ENABLED = os.environ.get(ENV) == "1"
log = logging.getLogger("relay.setup_timing")
if ENABLED:
    log.setLevel(logging.DEBUG)


def mark(hop: str, association_id: str) -> None:
    """Record that `association_id`'s setup reached `hop` now (nothing at all when off). Some hops come
    before the router's Open or Join is validated, so the id is logged made printable and bounded."""
    if ENABLED:
        assoc = printable(association_id, 64)
        log.debug("setup hop %s", hop, extra={"assoc": assoc, "hop": hop, "t": time.monotonic()})
