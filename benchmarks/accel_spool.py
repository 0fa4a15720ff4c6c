"""The durable spool and the delivery pool on loopback: can they keep up with the accelerated WAN goals?

The accelerated routes add two local stages to every instance: a commit to the
spool at the near router (durable before the C-STORE response) and a C-STORE
from the spool to the destination at the far router. The WAN goal for 200 small
objects (52 KB) is 0.20x of the VPN's 12 s, about 2.4 s in all, and the sender's
own completion 0.10x, 1.2 s: 6 ms per C-STORE at the near router.

Measured here, on 127.0.0.1 and this machine's disk:

* store: DCMTK storescu sends the 200 instances on one association into the
  router's accelerated acceptor and spool (benchmarks/accel_store.py): the
  sender's completion as the near router makes it. Variants, alternated in
  every repeat: the spool with its journal (the default), the same code with
  journal=False (data file and directory synced per instance), and, with
  ``--baseline DIR`` (e.g. ``git worktree add DIR main``), the code in DIR;
* spool commit: 200 instances written as the DIMSE receiver writes them (16 KiB
  chunks), with the journal, with per-instance fsync, and without any sync (the
  lower bound);
* delivery: the same 200 instances from the spool into a real Orthanc, over 1, 2
  and 4 parallel associations (the pool's default is 4).

    python -m benchmarks.accel_spool --count 200 --repeats 3 [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.accel_store import __file__ as STORE_SCRIPT
from benchmarks.common import summary, write_results
from relay_demo.datasets import generate_ct_series, write_series
from relay_router.accel.delivery import DeliveryPool, Destination
from relay_router.accel.spool import Spool
from tests.support.orthanc import OrthancProcess
from tests.support.spool_child import ROUTE, spool_file


def commit_run(files: list[Path], root: Path, fsync: bool, journal: bool) -> list[float]:
    """Per-instance commit latencies (seconds) into a fresh spool (journaled: committed as the acceptor does)."""
    spool = Spool(root, max_bytes=1 << 34, fsync=fsync, journal=journal)
    latencies = []
    try:
        for path in files:
            started = time.perf_counter()
            spool_file(spool, path, deferred=journal)
            latencies.append(time.perf_counter() - started)
    finally:
        spool.close()
    return latencies


def store_variant(files: Path, code: Path, variant: str) -> dict[str, object]:
    """One storescu run into the acceptor, in a process of its own running the code in `code`."""
    flags = {"journal": [], "classic": ["--classic"], "baseline": ["--baseline"]}[variant]
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(
        # Run by path (the code in `code` may not have it), not as a script: its directory would shadow modules.
        [
            sys.executable,
            "-c",
            "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
            STORE_SCRIPT,
        ]
        + ["--files", str(files), "--json", *flags],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"store run ({variant}) failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


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
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with (store stage)")
    parser.add_argument("--no-delivery", action="store_true", help="skip the delivery stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    load_start = os.getloadavg()
    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-accel-") as tmp:
        work = Path(tmp)
        files = write_series(generate_ct_series(args.count, rows=160, cols=160, seed=7), work / "small")
        size = sum(p.stat().st_size for p in files)
        results: dict[str, object] = {"count": args.count, "bytes": size, "repeats": args.repeats}
        rows = []
        # The sender's completion: variants alternated within each repeat, so that load changes hit all alike.
        variants = [("journal", here), ("classic", here)]
        if args.baseline is not None:
            variants.append(("baseline", args.baseline.resolve()))
        store: dict[str, list[dict[str, object]]] = {name: [] for name, _ in variants}
        for _ in range(args.repeats):
            for name, code in variants:
                store[name].append(store_variant(work / "small", code, name))
        labels = {
            "journal": "this branch, journal (default)",
            "classic": "this branch, journal=False (file + directory fsync)",
            "baseline": f"baseline code ({args.baseline})",
        }
        for name, runs in store.items():
            seconds = [float(r["seconds"]) for r in runs]  # type: ignore[arg-type]
            commits = [x * 1000 for r in runs for x in r["commit_s"]]  # type: ignore[attr-defined]
            per = summary(commits)
            median = statistics.median(seconds)
            results[f"store_{name}"] = {"seconds": seconds, "commit_ms": per}
            rows.append(
                f"| store: storescu into the acceptor, {labels[name]} | {median:.2f} s | {args.count / median:.0f} | "
                f"{median / args.count * 1000:.1f} ms per C-STORE; commit median {per['median']:.2f} ms, "
                f"p90 {per['p90']:.2f} ms; runs {', '.join(f'{x:.2f}' for x in seconds)} s |"
            )
        commit_variants = {
            "commit_journal": ("spool commit, journal (default)", True, True),
            "commit_fsync": ("spool commit, journal=False (file + directory fsync)", True, False),
            "commit_no_fsync": ("spool commit, no sync at all (lower bound)", False, False),
        }
        latencies: dict[str, list[float]] = {key: [] for key in commit_variants}
        totals: dict[str, list[float]] = {key: [] for key in commit_variants}
        for repeat in range(args.repeats):
            for key, (_, fsync, journal) in commit_variants.items():
                run = commit_run(files, work / f"{key}-{repeat}", fsync, journal)
                latencies[key] += run
                totals[key].append(sum(run))
        for key, (label, _, _) in commit_variants.items():
            per = summary([x * 1000 for x in latencies[key]])
            rate = args.count / statistics.median(totals[key])
            results[key] = {"latency_ms": per, "instances_per_s": rate, "totals_s": totals[key]}
            rows.append(
                f"| {label} | {statistics.median(totals[key]):.2f} s | "
                f"{rate:.0f} | median {per['median']:.2f} ms, p90 {per['p90']:.2f} ms |"
            )
        if args.no_delivery:
            return _report(args, results, rows, size, load_start)
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
    return _report(args, results, rows, size, load_start)


def _report(
    args: argparse.Namespace, results: dict[str, object], rows: list[str], size: int, load_start: tuple[float, ...]
) -> int:
    load_end = os.getloadavg()
    results["load_start"], results["load_end"] = list(load_start), list(load_end)
    table = "\n".join(
        [
            f"# Spool and delivery pool on loopback: {args.count} CT instances of "
            f"{size / args.count / 1000:.0f} KB, median of {args.repeats}",
            "",
            f"`python -m benchmarks.accel_spool --count {args.count} --repeats {args.repeats}"
            f"{' --baseline ' + str(args.baseline) if args.baseline else ''}"
            f"{' --no-delivery' if args.no_delivery else ''}` (2-core VM, shared; Orthanc 1.10 on 127.0.0.1); "
            f"load average (1 min) {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end",
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
