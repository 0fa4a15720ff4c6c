"""Latency of a patient identity lookup per source: cross-reference table, PIX (MLLP), PIXm (HTTP), cache.

The PIX manager and PIXm endpoint are the test servers (tests/support/identity_servers.py) as
processes on loopback, so the figures are the router's own cost plus one loopback round trip:
the floor under what a real MPI adds. Each source is measured alone with the cache off
(`cache_ttl_s = 0`), then the cache hit. No audit file (an audit line per lookup is the same for all).

    python -m benchmarks.identity_lookup --lookups 300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import summary, write_results
from relay_router.identity.config import DomainSection, IdentitySection, SourceSection
from relay_router.identity.model import LookupOutcome, PatientRef
from relay_router.identity.sources import IdentityRuntime
from tests.support.identity_servers import IdentityServerProcess

WARM_UP = 100
OIDS = {"HOSP_A": "1.2.3", "HOSP_B": "1.2.9"}
PERSONS = {"persons": [[[f"A-{n}", "HOSP_A"], [f"B-{n}", "HOSP_B"]] for n in range(100)], "domains": OIDS}


async def measure(source: SourceSection | None, state: Path, lookups: int, ttl: float) -> list[float]:
    section = IdentitySection(
        issuer="HOSP_A",
        universal_id=OIDS["HOSP_A"],
        cache_ttl_s=ttl,
        source=[source or SourceSection(kind="table")],
        domain=[DomainSection(i, universal_id=o, universal_id_type="ISO") for i, o in OIDS.items()],
    )
    runtime = IdentityRuntime(section, state_dir=state)
    if runtime.table is not None:
        runtime.table.add_many(
            [(PatientRef(f"A-{n}", "HOSP_A"), PatientRef(f"B-{n}", "HOSP_B")) for n in range(100)],
            origin="import",
            replace=True,
        )
    await runtime.start()
    samples = []
    try:
        for i in range(lookups + WARM_UP):
            ref = PatientRef(f"A-{i % 100}", "HOSP_A")
            started = time.perf_counter()
            result = await runtime.resolver.lookup(ref, "HOSP_B")
            elapsed = time.perf_counter() - started
            if result.outcome is not LookupOutcome.MAPPED:
                raise RuntimeError(f"{ref} was not mapped: {result}")
            if i >= WARM_UP:  # warm-up: connections, imports, and every patient once (the cache case)
                samples.append(elapsed)
    finally:
        await runtime.stop()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pix = IdentityServerProcess("pix", PERSONS, work)
        pixm = IdentityServerProcess("pixm", PERSONS, work)
        try:
            cases = {
                "table": (None, 0.0),
                "pix": (
                    SourceSection(kind="pix", host="127.0.0.1", port=pix.port, receiving_application="PIXMGR"),
                    0.0,
                ),
                "pixm": (SourceSection(kind="pixm", url=f"http://127.0.0.1:{pixm.port}/fhir"), 0.0),
                "cached (pixm behind)": (SourceSection(kind="pixm", url=f"http://127.0.0.1:{pixm.port}/fhir"), 3600.0),
            }
            results = {}
            for name, (source, ttl) in cases.items():
                state = work / name.split()[0]
                samples = asyncio.run(measure(source, state, args.lookups, ttl))
                results[name] = {k: v * 1000 if k != "n" else v for k, v in summary(samples).items()}
        finally:
            pix.stop()
            pixm.stop()
    load = os.getloadavg()[0]
    lines = [
        f"Patient identity lookup latency, ms ({args.lookups} lookups per source, loopback servers; "
        f"load average {load:.1f} on {os.cpu_count()} CPUs while measuring)",
        "",
        "| source | median | p90 | max |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median']:.3f} | {r['p90']:.3f} | {r['max']:.3f} |")
    table = "\n".join(lines)
    json_path, _ = write_results(
        "identity-lookup", {"lookups": args.lookups, "load_average": load, "results_ms": results}, table
    )
    print(table)
    print(f"\nwritten: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
