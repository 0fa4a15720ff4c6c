"""CPU cost of the end-to-end handshake (relay_router.seal), per association, without processes.

`python -m benchmarks.handshake [ROUNDS]`: both halves with real keys, frame 0 sealed and opened,
the Confirm checked, plus one append to a replay record on disk. Prints the fastest and the
median time of each step; on a shared machine the fastest is the better estimate of CPU cost.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from relay_router.replay import SeenAssociations
from relay_router.seal import AssociationContext, Identity, initiate, respond, verify_confirmation
from relay_router.wire.features import Features


def main(argv: list[str] | None = None) -> int:
    rounds = int((argv if argv is not None else sys.argv[1:] or ["300"])[0])
    a, b = Identity.generate(), Identity.generate()
    offered = Features.offer(compression=True).names()
    request = os.urandom(300)  # stands for the A-ASSOCIATE-RQ
    steps: dict[str, list[float]] = {"initiator": [], "responder": [], "confirm check": [], "replay record": []}
    with tempfile.TemporaryDirectory() as tmp:
        record = SeenAssociations(Path(tmp) / "seen_associations")
        for n in range(rounds + 20):
            ctx = AssociationContext(os.urandom(16).hex(), "site-a", "site-b", "PACS")
            clock: list[float] = [time.perf_counter()]

            def lap(clock: list[float] = clock) -> None:
                clock.append(time.perf_counter())

            handshake, tx = initiate(a, b.public, ctx, offered)
            frame0 = tx.seal(request, 0)
            lap()
            confirmation, rx = respond(b, a.public, handshake, ctx, offered, offered)
            rx.open(frame0, 0)
            lap()
            verify_confirmation(b.public, tx, confirmation, offered, "site-b")
            lap()
            record.claim(ctx.association_id, handshake.sent_unix_ms)
            lap()
            if n >= 20:  # warm-up
                for name, start, end in zip(steps, clock, clock[1:], strict=False):
                    steps[name].append((end - start) * 1000)
    _report(steps, print)
    return 0


def _report(steps: dict[str, list[float]], out: Callable[[str], None]) -> None:
    for name, times in steps.items():
        out(f"{name:>14}: fastest {min(times):.3f} ms, median {statistics.median(times):.3f} ms")
    totals = [sum(t) for t in zip(*steps.values(), strict=True)]
    out(f"{'total':>14}: fastest {min(totals):.3f} ms, median {statistics.median(totals):.3f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
