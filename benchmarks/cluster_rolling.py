"""The rolling-restart phase of `benchmarks.cluster`: failed associations during N rounds of restarts.

One round restarts r1, r2 and r3 one after another the way an upgrade does (SIGTERM, wait for the
exit, start again, wait until HAProxy's health check has it up again), while three pynetdicom
clients at site-a run associations back to back: C-ECHO to SCP_B (a cross-replica path before the
first restart), and C-STORE of a few small CT instances to SCP_B and to SCP_C. Every association
is counted as failed unless it was established, every DIMSE status was Success and it was
released. Setup (A-ASSOCIATE-RQ to A-ASSOCIATE-AC) is timed for each, and split into associations
that started while a replica was restarting and the others.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from benchmarks.common import summary
from tests.support.bridge_cluster import HOST, REPLICAS, BridgeCluster

SETTLE_S = 1.0  # steady traffic between two restarts


@dataclass
class Attempt:
    started: float
    setup_ms: float | None  # None: not established
    ok: bool
    what: str


@dataclass
class Client:
    name: str
    work: Callable[[], Attempt]
    attempts: list[Attempt] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.attempts.append(self.work())
            except Exception as exc:  # a failure to count, not a client that stops
                self.attempts.append(Attempt(time.monotonic(), None, False, f"{type(exc).__name__}: {exc}"))


def association(router_port: int, called: str, datasets: list[pydicom.Dataset]) -> Attempt:
    """One association: C-ECHO when `datasets` is empty, else one C-STORE each."""
    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    if datasets:
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    else:
        ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = ae.associate(HOST, router_port, ae_title=called)
    if not assoc.is_established:
        return Attempt(started, None, False, "not established (rejected or aborted)")
    setup_ms = (time.monotonic() - started) * 1000
    statuses = [assoc.send_c_store(ds) for ds in datasets] if datasets else [assoc.send_c_echo()]
    ok = all(bool(s) and s.Status == 0x0000 for s in statuses)
    assoc.release()
    ok = ok and not assoc.is_aborted
    return Attempt(started, setup_ms, ok, "ok" if ok else f"statuses {[getattr(s, 'Status', None) for s in statuses]}")


def rolling_restarts(cluster: BridgeCluster, router_port: int, files: list[Path], rounds: int) -> dict[str, object]:
    """Run `rounds` rolling restarts under traffic from site-a; the counts and setup times."""
    datasets = [pydicom.dcmread(f) for f in files[:2]]
    clients = [
        Client("echo SCP_B", lambda: association(router_port, "SCP_B", [])),
        Client("store SCP_B", lambda: association(router_port, "SCP_B", datasets)),
        Client("store SCP_C", lambda: association(router_port, "SCP_C", datasets)),
    ]
    load_before = os.getloadavg()[0]  # a shared machine: the figures only mean something beside its load
    threads = [threading.Thread(target=c.run, name=c.name, daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    windows: list[tuple[float, float]] = []  # (SIGTERM, HAProxy has it up again)
    drains: list[float] = []
    marked_down: list[float] = []  # SIGTERM to HAProxy's health check marking the replica down
    try:
        time.sleep(SETTLE_S)
        for _ in range(rounds):
            for rid in REPLICAS:
                process, haproxy = cluster.replicas[rid].process, cluster.haproxy
                assert process is not None and haproxy is not None
                logged = haproxy.log_path.stat().st_size
                began = time.monotonic()
                process.terminate()
                # With a TCP check this is only once the replica has exited; with /readyz or gRPC health, at
                # the first check after the SIGTERM.
                haproxy.wait_state(rid, up=False, after=logged, timeout=60)
                marked_down.append(time.monotonic() - began)
                if process.wait(60) != 0:
                    raise RuntimeError(f"{rid} exited with {process.returncode}")
                drains.append(time.monotonic() - began)
                cluster.start_replica(rid)
                haproxy.wait_state(rid, up=True, after=logged, timeout=30)
                windows.append((began, time.monotonic()))
                time.sleep(SETTLE_S)
    finally:
        for client in clients:
            client.stop.set()
        for thread in threads:
            thread.join(60)

    def restarting(a: Attempt) -> bool:
        return any(start <= a.started <= end for start, end in windows)

    attempts = [a for c in clients for a in c.attempts]
    failed = [a for a in attempts if not a.ok]
    during = [a.setup_ms for a in attempts if a.setup_ms is not None and restarting(a)]
    steady = [a.setup_ms for a in attempts if a.setup_ms is not None and not restarting(a)]
    return {
        "rounds": rounds,
        "restarts": len(windows),
        "associations": len(attempts),
        "per_client": {c.name: len(c.attempts) for c in clients},
        "failed": len(failed),
        "failures": [a.what for a in failed][:20],
        "drain_s": summary(drains),
        "marked_down_s": summary(marked_down),
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "setup_ms_during_restart": summary(during) if during else None,
        "setup_ms_steady": summary(steady) if steady else None,
    }


def rolling_table(r: dict[str, object]) -> list[str]:
    during, steady, drain, down = r["setup_ms_during_restart"], r["setup_ms_steady"], r["drain_s"], r["marked_down_s"]
    assert isinstance(drain, dict) and isinstance(down, dict)
    lines = [
        "",
        f"Rolling restarts: {r['rounds']} rounds ({r['restarts']} replica restarts: SIGTERM, exit, start,"
        f" HAProxy health check up) under {r['associations']} associations from site-a"
        f" ({r['per_client']}): **{r['failed']} failed** (must be 0). SIGTERM to HAProxy marking the"
        f" replica down: median {down['median']:.2f} s, max {down['max']:.2f} s. Drain to exit: median"
        f" {drain['median']:.2f} s, max {drain['max']:.2f} s. Load average (1 min) before and after:"
        f" {r['load_1min']}.",
        "",
        "| associations started | n | setup median (ms) | p90 (ms) | max (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, s in (("while a replica restarts", during), ("otherwise", steady)):
        if isinstance(s, dict):
            lines.append(f"| {label} | {s['n']} | {s['median']:.1f} | {s['p90']:.1f} | {s['max']:.1f} |")
    return lines
