"""The durable spool and the delivery pool on loopback: can they keep up with the accelerated WAN goals?

The accelerated routes add two local stages to every instance: a commit to the
spool at the near router (fsync of the file and of the directory before the
C-STORE response) and a C-STORE from the spool to the destination at the far
router. The WAN goal for 200 small objects (52 KB) is 0.20x of the VPN's 12 s,
about 2.4 s in all, so each stage must sustain well above 100 instances/s.

Measured here, on 127.0.0.1 and this machine's disk:

* spool commit: 200 instances written as the DIMSE receiver writes them (16 KiB
  chunks), with fsync (the default) and without (the lower bound);
* delivery: the same 200 instances from the spool into a real Orthanc, over 1, 2
  and 4 parallel associations (the pool's default is 4).

    python -m benchmarks.accel_spool --count 200 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import summary, write_results
from relay_demo.datasets import generate_ct_series, write_series
from relay_router.accel.delivery import DeliveryPool, Destination
from relay_router.accel.spool import Spool
from tests.support.orthanc import OrthancProcess
from tests.support.spool_child import ROUTE, spool_file


def commit_run(files: list[Path], root: Path, fsync: bool) -> list[float]:
    """Per-instance commit latencies (seconds) into a fresh spool."""
    spool = Spool(root, max_bytes=1 << 34, fsync=fsync)
    latencies = []
    try:
        for path in files:
            started = time.perf_counter()
            spool_file(spool, path)
            latencies.append(time.perf_counter() - started)
    finally:
        spool.close()
    return latencies


def delivery_run(files: list[Path], root: Path, orthanc: OrthancProcess, associations: int) -> float:
    """Seconds from start to the last instance confirmed by Orthanc."""
    orthanc.delete_all()
    spool = Spool(root, max_bytes=1 << 34)
    try:
        for path in files:
            spool_file(spool, path)
        pool = DeliveryPool(
            spool, ROUTE, Destination("127.0.0.1", orthanc.dicom_port, orthanc.aet, "BENCH"), associations=associations
        )
        started = time.perf_counter()
        pool.start()
        while not pool.idle():
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        pool.stop()
    finally:
        spool.close()
    stored = len(orthanc.instances())
    if stored != len(files):
        raise RuntimeError(f"Orthanc holds {stored} of {len(files)} instances")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="accel-spool")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-accel-") as tmp:
        work = Path(tmp)
        files = write_series(generate_ct_series(args.count, rows=160, cols=160, seed=7), work / "small")
        size = sum(p.stat().st_size for p in files)
        results: dict[str, object] = {"count": args.count, "bytes": size, "repeats": args.repeats}
        rows = []
        for fsync in (True, False):
            latencies: list[float] = []
            totals = []
            for repeat in range(args.repeats):
                run = commit_run(files, work / f"commit-{fsync}-{repeat}", fsync)
                latencies += run
                totals.append(sum(run))
            key = "commit_fsync" if fsync else "commit_no_fsync"
            per = summary([x * 1000 for x in latencies])
            rate = args.count / statistics.median(totals)
            results[key] = {"latency_ms": per, "instances_per_s": rate, "totals_s": totals}
            rows.append(
                f"| spool commit, fsync {'on' if fsync else 'off'} | {statistics.median(totals):.2f} s | "
                f"{rate:.0f} | median {per['median']:.2f} ms, p90 {per['p90']:.2f} ms |"
            )
        with OrthancProcess(work / "orthanc", aet="BENCH_DEST") as orthanc:
            for associations in (1, 2, 4):
                times = [
                    delivery_run(files, work / f"deliver-{associations}-{r}", orthanc, associations)
                    for r in range(args.repeats)
                ]
                median = statistics.median(times)
                results[f"delivery_{associations}"] = {"seconds": times, "instances_per_s": args.count / median}
                rows.append(
                    f"| delivery to Orthanc, {associations} association{'s' if associations > 1 else ''} | "
                    f"{median:.2f} s | {args.count / median:.0f} | min {min(times):.2f} s, max {max(times):.2f} s |"
                )
    table = "\n".join(
        [
            f"# Spool and delivery pool on loopback: {args.count} CT instances of "
            f"{size / args.count / 1000:.0f} KB, median of {args.repeats}",
            "",
            "`python -m benchmarks.accel_spool "
            f"--count {args.count} --repeats {args.repeats}` (2-core VM, shared; Orthanc 1.10 on 127.0.0.1)",
            "",
            "| stage | time | instances/s | detail |",
            "|---|---:|---:|---|",
            *rows,
        ]
    )
    json_path, md_path = write_results(args.name, results, table)
    print(table)
    print(f"\n{json_path}\n{md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
