"""Where the milliseconds of an association's setup go: the `profile` phase of benchmarks.cluster.

The replicas and routers run with RELAY_SETUP_TIMING=1 (relay_common.setup_timing): each logs a
monotonic timestamp at every hop of a setup. The benchmark times setups from site-a as in the
`paths` phase (pynetdicom A-ASSOCIATE-RQ -> A-ASSOCIATE-AC, the paths interleaved), then lines the
hops up per association: the origin replica's "open" inside a setup's window names the
association, and every hop of that association id, in whichever process, is placed relative to
the RQ. All processes share one machine, so CLOCK_MONOTONIC is one clock for all of them. The
logging itself costs a little on every hop: compare the hops with each other, and take the
setup figures from a `paths` run.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.bridge_cluster import HOST

LOGGER = "relay.setup_timing"
Hop = tuple[str, str]  # (process, hop)


def timed_setup(router_port: int, called: str) -> tuple[float, float]:
    """One association's A-ASSOCIATE-RQ and A-ASSOCIATE-AC times (monotonic, seconds)."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    start = time.perf_counter()
    assoc = ae.associate(HOST, router_port, ae_title=called)
    end = time.perf_counter()
    if not assoc.is_established:
        raise RuntimeError(f"association to {called} not established")
    assoc.release()
    return start, end


def read_hops(logs: Mapping[str, Path]) -> dict[str, list[tuple[str, str, float]]]:
    """Every timing line of every process log: association id -> [(process, hop, t)]."""
    hops: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
    for process, path in logs.items():
        for line in path.read_text(errors="replace").splitlines():
            if LOGGER not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("logger") == LOGGER:
                hops[str(entry["assoc"])].append((process, str(entry["hop"]), float(entry["t"])))
    return hops


def profile(
    router_port: int, paths: Mapping[str, str], logs: Mapping[str, Path], setups: int, origin: str = "r1"
) -> dict[str, dict[str, object]]:
    """Per path: the median time (ms after the RQ) at which each hop was reached, and the setup total."""
    for called in paths.values():
        for _ in range(3):  # warm up: channels, caches, links
            timed_setup(router_port, called)
    windows: dict[str, list[tuple[float, float]]] = {path: [] for path in paths}
    for _ in range(setups):
        for path, called in paths.items():
            windows[path].append(timed_setup(router_port, called))
    time.sleep(1.0)  # the last lines reach the log files
    hops = read_hops(logs)
    opens = sorted((t, aid) for aid, events in hops.items() for p, h, t in events if p == origin and h == "open")
    results: dict[str, dict[str, object]] = {}
    for path, spans in windows.items():
        offsets: dict[Hop, list[float]] = defaultdict(list)
        totals: list[float] = []
        for start, end in spans:
            inside = [aid for t, aid in opens if start <= t <= end]
            if len(inside) != 1:
                continue  # not one association in the window: cannot tell which
            totals.append((end - start) * 1000)
            seen: set[Hop] = set()
            for process, hop, t in sorted(hops[inside[0]], key=lambda e: e[2]):
                if (process, hop) not in seen:  # the first time each process reached the hop
                    seen.add((process, hop))
                    offsets[(process, hop)].append((t - start) * 1000)
        order = sorted(offsets, key=lambda k: statistics.median(offsets[k]))
        results[path] = {
            "setups": len(totals),
            "setup_ms_median": statistics.median(totals) if totals else None,
            "hops": [
                {"process": p, "hop": h, "ms_median": statistics.median(offsets[(p, h)]), "n": len(offsets[(p, h)])}
                for p, h in order
            ],
        }
    return results


def profile_table(results: Mapping[str, Mapping[str, object]]) -> list[str]:
    lines: list[str] = []
    for path, r in results.items():
        total = r["setup_ms_median"]
        lines += ["", f"**{path}** ({r['setups']} setups; A-ASSOCIATE-AC at {total:.1f} ms median):", ""]
        lines += ["| process | hop | ms after the RQ (median) | step (ms) |", "|---|---|---:|---:|"]
        previous = 0.0
        for hop in r["hops"]:  # type: ignore[attr-defined]
            lines.append(
                f"| {hop['process']} | {hop['hop']} | {hop['ms_median']:.2f} | {hop['ms_median'] - previous:+.2f} |"
            )
            previous = hop["ms_median"]
        lines.append(f"| pynetdicom | A-ASSOCIATE-AC | {total:.2f} | {total - previous:+.2f} |")  # type: ignore[operator]
    return lines
