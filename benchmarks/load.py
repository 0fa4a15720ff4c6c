"""Load benchmark: three hospitals, 50+ concurrent associations of mixed services for a bounded time.

Run with `python -m benchmarks.load` (options: --duration, --concurrency, --instances). Not a test:
it measures, verifies, writes benchmarks/results/<date>-load.{json,md} and prints the table.

Topology: a bridge and three routers (site-1..3) as real processes, each site with an Orthanc
archive (PACS_1..3) shared with the other two and preloaded with its own CT study. Client threads
(pynetdicom, one association at a time each, calling AE LOAD_<n>) connect to a random site's router
and run, against a random other site's PACS:

* C-ECHO;
* C-FIND at study level (the answer must name the remote study);
* C-GET of the remote study (every instance's fingerprint checked as it arrives);
* C-MOVE of the remote study to the client's own site archive (Orthanc to Orthanc, both legs
  relayed; checked at the destination at the end);
* C-STORE of 4 new small CT instances (checked at the destination archive at the end).

Every instance stored or retrieved is verified at its destination by SOP Instance UID and pixel
SHA-256 (relay_demo.datasets.fingerprint). Reported: p50/p99 latency per service (association open
to release), operations and MB per second, failures, the most associations open at once, and the
peak RSS of the bridge and each router (sampled from /proc every 0.5 s).
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from benchmarks.common import write_results
from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.orthanc import OrthancProcess

HOST = "127.0.0.1"
SITES = ("site-1", "site-2", "site-3")
SERVICES = {"echo": 0.25, "find": 0.2, "get": 0.15, "move": 0.15, "store": 0.25}
STORE_BATCH = 4


def pacs(site: str) -> str:
    return "PACS_" + site.split("-")[1]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] if ordered else 0.0


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    failures: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    bytes: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    instances: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    stored: dict[str, tuple[str, str]] = field(default_factory=dict)  # SOP UID -> (site, pixel sha256)
    moved: set[tuple[str, str]] = field(default_factory=set)  # (destination site, source site)
    in_window: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))  # done by the deadline
    in_window_bytes: int = 0
    open_now: int = 0
    open_max: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def opened(self) -> None:
        with self.lock:
            self.open_now += 1
            self.open_max = max(self.open_max, self.open_now)

    def closed(self) -> None:
        with self.lock:
            self.open_now -= 1


@dataclass
class World:
    net: LocalRelayNetwork
    archives: dict[str, OrthancProcess]
    studies: dict[str, tuple[str, dict[str, str], int]]  # site -> (study UID, fingerprints, bytes)
    store_pool: list[Dataset]
    store_sizes: dict[str, int]


class Client(threading.Thread):
    def __init__(self, n: int, world: World, stats: Stats, deadline: float, seed: int) -> None:
        super().__init__(name=f"load-{n}", daemon=True)
        self.n, self.world, self.stats, self.deadline = n, world, stats, deadline
        self.rng = random.Random(seed)
        self.calling = f"LOAD_{n}"

    def run(self) -> None:
        names, weights = list(SERVICES), list(SERVICES.values())
        while time.monotonic() < self.deadline:
            service = self.rng.choices(names, weights)[0]
            here = self.rng.choice(SITES)
            there = self.rng.choice([s for s in SITES if s != here])
            started = time.perf_counter()
            try:
                moved = getattr(self, service)(here, there)
            except Exception as exc:  # every failure is counted and reported
                when = time.strftime("%H:%M:%S")
                with self.stats.lock:
                    self.stats.failures[service].append(f"{when} {here}->{there}: {type(exc).__name__}: {exc}"[:300])
                continue
            with self.stats.lock:
                self.stats.latencies[service].append(time.perf_counter() - started)
                self.stats.bytes[service] += moved
                if time.monotonic() <= self.deadline:
                    self.stats.in_window[service] += 1
                    self.stats.in_window_bytes += moved

    # -- one operation each: associate, do it, release ------------------------------------------------

    def _associate(self, here: str, there: str, *contexts: str, **kwargs: Any):
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for context in contexts:
            ae.add_requested_context(context)
        port = self.world.net.sites[here].port
        assert port is not None
        assoc = ae.associate(HOST, port, ae_title=pacs(there), **kwargs)
        if not assoc.is_established:
            raise RuntimeError("association not established" + (" (rejected)" if assoc.is_rejected else ""))
        self.stats.opened()
        return assoc

    def _release(self, assoc) -> None:
        try:
            assoc.release()
        finally:
            self.stats.closed()

    def echo(self, here: str, there: str) -> int:
        assoc = self._associate(here, there, Verification)
        try:
            status = assoc.send_c_echo()
        finally:
            self._release(assoc)
        if not status or status.Status != 0:
            raise RuntimeError(f"C-ECHO status {status}")
        return 0

    def _study_query(self, there: str) -> Dataset:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = self.world.studies[there][0]
        return query

    def find(self, here: str, there: str) -> int:
        assoc = self._associate(here, there, StudyRootQueryRetrieveInformationModelFind)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = f"LOAD-{there}"
        query.StudyInstanceUID = ""
        try:
            answers = [
                ds
                for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                if status and status.Status in (0xFF00, 0xFF01)
            ]
        finally:
            self._release(assoc)
        if [str(ds.StudyInstanceUID) for ds in answers] != [self.world.studies[there][0]]:
            raise RuntimeError(f"C-FIND answers {answers!r}")
        return 0

    def get(self, here: str, there: str) -> int:
        got: dict[str, str] = {}

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            uid, digest = fingerprint(ds)
            got[uid] = digest
            return 0

        assoc = self._associate(
            here,
            there,
            StudyRootQueryRetrieveInformationModelGet,
            CTImageStorage,
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        try:
            statuses = [
                s for s, _ in assoc.send_c_get(self._study_query(there), StudyRootQueryRetrieveInformationModelGet)
            ]
        finally:
            self._release(assoc)
        _, originals, size = self.world.studies[there]
        if not statuses or statuses[-1].Status != 0 or got != originals:
            raise RuntimeError(f"C-GET: status {statuses[-1] if statuses else None}, {len(got)}/{len(originals)} ok")
        with self.stats.lock:
            self.stats.instances["get"] += len(got)
        return size

    def move(self, here: str, there: str) -> int:
        assoc = self._associate(here, there, StudyRootQueryRetrieveInformationModelMove)
        try:
            responses = [
                s
                for s, _ in assoc.send_c_move(
                    self._study_query(there), pacs(here), StudyRootQueryRetrieveInformationModelMove
                )
            ]
        finally:
            self._release(assoc)
        _, originals, size = self.world.studies[there]
        final = responses[-1] if responses else None
        if final is None or final.Status != 0 or final.get("NumberOfFailedSuboperations", 0):
            raise RuntimeError(f"C-MOVE final status {final}")
        with self.stats.lock:
            self.stats.moved.add((here, there))
            self.stats.instances["move"] += len(originals)
        return size

    def store(self, here: str, there: str) -> int:
        batch = [self.rng.choice(self.world.store_pool) for _ in range(STORE_BATCH)]
        assoc = self._associate(here, there, CTImageStorage)
        try:
            statuses = [assoc.send_c_store(ds) for ds in batch]
        finally:
            self._release(assoc)
        if any(not s or s.Status != 0 for s in statuses):
            raise RuntimeError(f"C-STORE statuses {[getattr(s, 'Status', None) for s in statuses]}")
        with self.stats.lock:
            for ds in batch:
                uid, digest = fingerprint(ds)
                self.stats.stored[uid] = (there, digest)
            self.stats.instances["store"] += len(batch)
        return sum(self.world.store_sizes[str(ds.SOPInstanceUID)] for ds in batch)


def build_world(
    work: Path, instances: int, pool_size: int, owned: dict[str, object], *, verbose: bool = False
) -> World:
    """Start everything; what is started is also recorded in `owned`, so that it is stopped on failure."""
    archives: dict[str, OrthancProcess] = {}
    owned["archives"] = archives
    studies: dict[str, tuple[str, dict[str, str], int]] = {}
    for i, site in enumerate(SITES):
        files = write_series(
            generate_ct_series(instances, rows=256, cols=256, patient_id=f"LOAD-{site}", seed=100 + i), work / site
        )
        archive = OrthancProcess(
            work / f"orthanc-{site}",
            aet=pacs(site),
            always_allow=True,
            extra_config={"DicomThreadsCount": 40, "ConcurrentJobs": 4},
            verbose=verbose,
        ).start()
        archives[site] = archive
        archive.upload_many(files)
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        studies[site] = (study, fingerprints(files), sum(f.stat().st_size for f in files))
    net = LocalRelayNetwork(work / "relay")
    owned["net"] = net
    net.start()
    for site in SITES:
        others = [s for s in SITES if s != site]
        net.add_site(
            site,
            shared=[Shared(pacs(site), HOST, archives[site].dicom_port, ["*"])],
            remote=[Remote(pacs(o), o) for o in others],
            metrics_listen="",
        )
    for site in SITES:  # each archive reaches the others' archives through its own router (C-MOVE targets)
        port = net.sites[site].port
        assert port is not None
        archives[site].set_modalities({pacs(o): (pacs(o), HOST, port) for o in SITES if o != site})
    net.wait_connected()
    pool = []
    for k in range(pool_size // 50):
        pool += generate_ct_series(50, rows=64, cols=64, patient_id=f"LOAD-STORE-{k}", seed=1000 + k)
    sizes = {str(ds.SOPInstanceUID): len(ds.PixelData) for ds in pool}
    return World(net, archives, studies, pool, sizes)


def verify(world: World, stats: Stats) -> dict[str, int]:
    """Check every moved and stored instance at its destination archive."""
    result = {"verified": 0, "missing": 0, "mismatched": 0}
    for destination, source in sorted(stats.moved):
        held = world.archives[destination].fingerprints()
        for uid, digest in world.studies[source][1].items():
            key = "verified" if held.get(uid) == digest else "mismatched" if uid in held else "missing"
            result[key] += 1
    for uid, (site, digest) in stats.stored.items():
        archive = world.archives[site]
        found = archive.find_sop(uid)
        if found is None:
            result["missing"] += 1
        elif fingerprint(archive.instance_file(found))[1] != digest:
            result["mismatched"] += 1
        else:
            result["verified"] += 1
    result["verified"] += stats.instances["get"]  # checked on arrival
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--concurrency", type=int, default=50, help="client threads (default 50)")
    parser.add_argument("--instances", type=int, default=12, help="CT slices (256x256) per site study")
    parser.add_argument("--store-pool", type=int, default=1500, help="distinct instances clients C-STORE")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) for inspection")
    parser.add_argument("--verbose-archives", action="store_true", help="run Orthanc with --verbose (with --keep)")
    args = parser.parse_args(argv)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    work = Path(tempfile.mkdtemp(prefix="relay-load-"))
    owned: dict[str, object] = {}
    try:
        print(f"starting 3 Orthancs, a bridge and 3 routers in {work} ...", flush=True)
        world = build_world(work, args.instances, args.store_pool, owned, verbose=args.verbose_archives)
        pids = {"bridge": world.net.bridge.pid} if world.net.bridge else {}
        pids.update({s: world.net.sites[s].process.pid for s in SITES if world.net.sites[s].process})  # type: ignore[union-attr]
        peak = dict.fromkeys(pids, 0.0)
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                for name, pid in pids.items():
                    peak[name] = max(peak[name], rss_mb(pid))
                sampling.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stats = Stats()
        print(f"{args.concurrency} clients for {args.duration:.0f} s ...", flush=True)
        started = time.monotonic()
        clients = [Client(n, world, stats, started + args.duration, seed=n) for n in range(args.concurrency)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(args.duration + 300)
        elapsed = time.monotonic() - started  # until the last client is done (an operation may outlast the deadline)
        sampling.set()
        sampler.join(5)
        # Once every association has ended: is the memory given back?
        settle = time.monotonic() + 30
        while time.monotonic() < settle and any(world.net.status(s).get("active_associations") for s in SITES):
            time.sleep(0.2)
        after = {name: rss_mb(pid) for name, pid in pids.items()}
        print("verifying every moved and stored instance at its destination ...", flush=True)
        checked = verify(world, stats)

        per_service = {}
        for service in SERVICES:
            lat = stats.latencies.get(service, [])
            per_service[service] = {
                "ok": len(lat),
                "failed": len(stats.failures.get(service, [])),
                "p50_ms": percentile(lat, 50) * 1000,
                "p99_ms": percentile(lat, 99) * 1000,
                "mean_ms": statistics.fmean(lat) * 1000 if lat else 0.0,
                "ops_per_s": stats.in_window.get(service, 0) / args.duration,
                "instances": stats.instances.get(service, 0),
                "mb": stats.bytes.get(service, 0) / 1e6,
            }
        total_ok = sum(s["ok"] for s in per_service.values())
        total_failed = sum(s["failed"] for s in per_service.values())
        total_mb = sum(s["mb"] for s in per_service.values())
        payload: dict[str, object] = {
            "workload": {
                "sites": len(SITES),
                "clients": args.concurrency,
                "duration_s": elapsed,
                "mix": SERVICES,
                "study": f"{args.instances} CT 256x256 16-bit per site",
                "store_batch": f"{STORE_BATCH} CT 64x64 per association",
                "archives": "Orthanc 1.10 (DicomThreadsCount 40)",
            },
            "services": per_service,
            "total": {
                "ok": total_ok,
                "failed": total_failed,
                "ops_per_s": sum(stats.in_window.values()) / args.duration,
                "mb_per_s": stats.in_window_bytes / 1e6 / args.duration,
                "last_client_done_s": elapsed,
                "max_open_associations": stats.open_max,
            },
            "verification": checked,
            "peak_rss_mb": peak,
            "rss_after_mb": after,
            "failures_sample": {k: v[:5] for k, v in stats.failures.items()},
            "command": "python -m benchmarks.load",
        }
        rows = [
            f"| {name} | {s['ok']} | {s['failed']} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {s['ops_per_s']:.1f} | "
            f"{s['instances']} | {s['mb']:.1f} |"
            for name, s in per_service.items()
        ]
        mb_per_s = stats.in_window_bytes / 1e6 / args.duration
        table = "\n".join(
            [
                f"# Load: 3 sites, {args.concurrency} concurrent clients, {args.duration:.0f} s, mixed services "
                "(TLS 1.3 + end-to-end sealing + zstd)",
                "",
                "| service | ok | failed | p50 (ms) | p99 (ms) | ops/s | instances | MB |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
                *rows,
                f"| **all** | {total_ok} | {total_failed} | | | {sum(stats.in_window.values()) / args.duration:.1f} | "
                f"{sum(s['instances'] for s in per_service.values())} | {total_mb:.1f} |",
                "",
                f"Most associations open at once: **{stats.open_max}**. Throughput {mb_per_s:.1f} MB/s of DICOM "
                f"payload (ops/s and MB/s: operations finished within the {args.duration:.0f} s; the last client "
                f"finished after {elapsed:.0f} s). Verified at the destination: "
                f"**{checked['verified']}** instances, {checked['missing']} missing, {checked['mismatched']} "
                "different.",
                "",
                "Peak RSS (once the load has ended): "
                + ", ".join(f"{name} {mb:.0f} MB ({after[name]:.0f} MB)" for name, mb in peak.items())
                + ".",
                "",
                *(
                    [
                        "Failures (first of each): "
                        + "; ".join(f"{k}: {v[0]}".replace("\n", " ") for k, v in stats.failures.items())
                        + ". A C-STORE with statuses `[0, 0, None, ...]` is pynetdicom 3.0.4's requestor race "
                        "(its reactor thread can take the C-STORE-RSP off the queue before `send_c_store` waits "
                        "for it; the archive then times the association out after 30 s): the relay delivered "
                        "the response (traced), the client lost it.",
                        "",
                    ]
                    if stats.failures
                    else []
                ),
                "Latency is association open to release as the client sees it (C-GET/C-MOVE: a whole "
                f"{args.instances}-image study). One 2-core machine runs everything: the bridge, 3 routers, "
                "3 Orthancs and the Python clients.",
            ]
        )
        json_path, md_path = write_results("load", payload, table)
        print(table)
        for service, messages in stats.failures.items():
            print(f"\n{service} failures ({len(messages)}), first: {messages[:3]}")
        print(f"\nwrote {json_path} and {md_path}")
        return 1 if checked["missing"] or checked["mismatched"] else 0
    finally:
        net = owned.get("net")
        if isinstance(net, LocalRelayNetwork):
            net.stop()
        archives: dict[str, OrthancProcess] = owned.get("archives", {})  # type: ignore[assignment]
        for archive in archives.values():
            archive.terminate()
        for archive in archives.values():
            archive.wait()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
