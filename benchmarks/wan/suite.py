"""WAN benchmark: raw path vs OpenVPN vs relay between two emulated hospital sites (root only).

    make bench                                   # full run, 24 Mbit/s, 40 ms RTT
    make bench BENCH_ARGS="--quick"              # development: smaller workloads, 1 repeat
    python -m benchmarks.wan --rtt-ms 100        # another RTT
    python -m benchmarks.wan --cleanup           # remove namespaces left by an interrupted run

Topology (benchmarks/wan/topology.py): namespaces for site A, site B and a hub
joined by veths; every link shaped with tbf and delayed by a TUN delay stage in
the hub. Modes:

    raw          storescu in A -> storescp in B, plain TCP through the hub
    vpn          the same through a site-to-site OpenVPN 2.6 tunnel (UDP through the hub)
    relay        storescu in A -> router A -> bridge (in the hub) -> router B -> storescp in B, routers
                 with their default [dicom] settings (zstd on, spill above 8 MiB through S3 in the hub)
    relay-plain  the same through a second router pair with compression and spill off (benchmarks/wan/relay.py)
    dicomweb     transfers only: STOW-RS from Orthanc in A to Orthanc in B over HTTPS (benchmarks/wan/dicomweb.py)

Workloads: echo (C-ECHO), find (study-level C-FIND to an Orthanc archive in B), ct, mr, compressed,
small, crdx (C-STORE of generated studies, benchmarks/wan/workloads.py), move (C-MOVE of the CT study
from the archive in B to a storescp in A; --move-modes, default vpn and relay: benchmarks/wan/archive.py).

Writes benchmarks/results/<date>-wan.json (plus .md and .png).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS, dcmtk, machine
from benchmarks.wan import report, workloads
from benchmarks.wan.archive import ARCHIVE_PORT, MOVE_AET, MOVE_PORT, Archive, extra_studies
from benchmarks.wan.dicomweb import DicomWeb
from benchmarks.wan.relay import BLOB_STORES, RelayModes
from benchmarks.wan.topology import (
    A_ADDR,
    B_ADDR,
    BLOB_ADDR,
    HUB_ADDR,
    NS_A,
    NS_B,
    NS_HUB,
    VPN_B_ADDR,
    LinkSpec,
    WanLab,
    cleanup,
)
from benchmarks.wan.vpn import Vpn

HERE = Path(__file__).resolve().parent
PROBE = str(HERE / "probe.py")
SCP_PORT = 11112
SCP_ACCEL_PORT = 11113  # relay-accel's destination: a forking storescp (the delivery pool opens several associations)
ACCEL_POLL_S = 0.01  # how often the receiving directory is looked at while relay-accel delivers
# Debian's DCMTK (and Orthanc) leave Nagle on; every DICOM process here runs with TCP_NODELAY=1.
DICOM_ENV = {**os.environ, "TCP_NODELAY": "1"}
LOCK = "/run/lock/drwan-bench.lock" if Path("/run/lock").is_dir() else "/tmp/drwan-bench.lock"
WORKLOADS = ("echo", "find", "ct", "mr", "compressed", "small", "crdx", "move")
LATENCY = ("echo", "find")  # many short associations per repeat, timed in-process
TRANSFERS = ("ct", "mr", "compressed", "small", "crdx")  # storescu -> storescp (dicomweb: STOW-RS)
RELAY_MODES = ("relay", "relay-plain", "relay-accel")
DIMSE_MODES = ("raw", "vpn", *RELAY_MODES)
DEFAULT_MODES = (*DIMSE_MODES, "dicomweb")
# ct 380 x 0.5 MB = 200 MB (the CT study); crdx 4 x 19 MB DX images (each above the spill threshold).
FULL_SIZES = {"ct": 380, "mr": 200, "compressed": 100, "small": 200, "crdx": 4}
QUICK_SIZES = {"ct": 20, "mr": 40, "compressed": 20, "small": 50, "crdx": 2}


class Deadline(Exception):
    pass


def estimate_minutes(args: argparse.Namespace, loads: dict[str, workloads.Workload], spec: LinkSpec) -> float:
    """A rough duration: bytes at the link's goodput plus one RTT per file (C-STORE-RSP), half the bytes
    through `relay` for uncompressed images below the spill threshold (zstd ~2x; a spilled image crosses
    both links one after the other), ~3 RTTs per echo/find association; plus setup and the emulation check."""
    goodput = spec.rate_mbit * 1e6 / 8 * 1448 / 1514 * 0.97
    rtt = spec.rtt_ms / 1000
    per_repeat = 0.0
    for name in args.workloads:
        for mode in args.modes:
            if not applies(args, name, mode):
                continue
            if name in LATENCY:
                per_repeat += args.echo_count * (3 * rtt + 0.05) + 0.7
            elif name in loads:
                w = loads[name]
                small = w.bytes / max(len(w.files), 1) < 8 << 20
                shrink = 2.0 if mode == "relay" and name != "compressed" and small else 1.0
                extra = 1.5 if mode == "dicomweb" else 0.7  # emptying Orthanc B, process starts
                per_repeat += w.bytes / shrink / goodput + len(w.files) * (rtt + 0.003) + extra
    # Network, VPN, relay, Orthancs and loading them (~25 MB/s locally), the emulation check, warm-ups.
    loading = sum(w.bytes for n, w in loads.items() if n in TRANSFERS) if "dicomweb" in args.modes else 0
    loading += loads["move"].bytes if "move" in loads else 0
    setup = 0.5 + 4 * args.check_seconds / 60 + loading / 40e6 / 60 + 0.05 * len(args.modes)
    return setup + per_repeat * args.repeats / 60


def applies(args: argparse.Namespace, name: str, mode: str) -> bool:
    """Which (workload, mode) pairs exist: DICOMweb only moves studies; C-MOVE runs in --move-modes."""
    if name == "move":
        return mode in args.move_modes
    if mode == "relay-accel":  # accelerated routes answer storage (and C-ECHO) locally: transfers only
        return name in TRANSFERS
    return mode != "dicomweb" or name in TRANSFERS


def uptime() -> str:
    """`uptime`'s line, kept in the results before and after a run (the load is part of every figure)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: other work on this machine skews every number."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class Measurements:
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    echo_parts: dict[tuple[str, str], list[dict[str, float]]] = field(default_factory=dict)
    cpu: dict[tuple[str, str], list[dict[str, float]]] = field(default_factory=dict)
    errors: list[dict[str, object]] = field(default_factory=list)
    failed: set[tuple[str, str]] = field(default_factory=set)
    late: dict[tuple[str, str], list[dict[str, float]]] = field(default_factory=dict)
    wire: dict[tuple[str, str], list[dict[str, int]]] = field(default_factory=dict)
    sender: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # relay-accel: storescu's own time
    first: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # C-STORE: first file stored at B


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.spec = LinkSpec(rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms, congestion_control=args.cc)
        self.work = Path(tempfile.mkdtemp(prefix="drwan-"))
        self.rx = Path(tempfile.mkdtemp(prefix="drwan-rx-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        self.lab = WanLab(self.spec, self.work / "lab", priority=args.priority)
        self.vpn: Vpn | None = None
        self.relay = RelayModes(
            self.lab, self.work / "relay", args.modes, args.relay_dicom, os.environ, blob_store=args.blob_store
        )
        self.scp: subprocess.Popen[bytes] | None = None
        self.scp_accel: subprocess.Popen[bytes] | None = None
        self._sender_s: float | None = None
        self._first_s: float | None = None
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.orthancs = Path(tempfile.mkdtemp(prefix="drwan-orthanc-", dir=shm))  # Orthanc storage in memory
        self.archive: Archive | None = None
        if {"find", "move"} & set(args.workloads) and set(args.modes) & set(DIMSE_MODES):
            self.archive = Archive(self.lab, self.orthancs / "archive", self.rx.with_name(self.rx.name + "-move"),
                                   self.work)  # fmt: skip
        self.dicomweb: DicomWeb | None = None
        if "dicomweb" in args.modes and (set(args.workloads) & set(TRANSFERS) or "dicomweb" in args.move_modes):
            self.dicomweb = DicomWeb(self.lab, self.orthancs / "dicomweb", self.work)
        self.deadline = time.monotonic() + args.max_minutes * 60
        self.cpu_pids: dict[str, int] = {}
        self.uptime: dict[str, str] = {}

    # -- infrastructure ------------------------------------------------------
    def start(self) -> None:
        log(
            f"building the WAN: {self.spec.rate_mbit:g} Mbit/s, {self.spec.rtt_ms:g} ms RTT, "
            f"{self.spec.congestion_control}"
        )
        self.lab.up()
        self.cpu_pids["delay"] = self.lab.delay_proc.pid  # type: ignore[union-attr]
        self.scp = self.lab.popen(
            NS_B,
            [dcmtk("storescp"), "--disable-host-lookup", "+xa", "-aet", "STORE", "-od", str(self.rx),
             "-fe", ".dcm", str(SCP_PORT)],
            env=DICOM_ENV, stdout=subprocess.DEVNULL, stderr=(self.work / "storescp.log").open("ab"),
        )  # fmt: skip
        self.cpu_pids["storescp"] = self.scp.pid
        if "vpn" in self.args.modes:
            log("starting OpenVPN (site A <-> site B, UDP through the hub)")
            self.vpn = Vpn(self.lab, self.work / "vpn").start()
            for site, proc in self.vpn.procs.items():
                self.cpu_pids[f"openvpn-{site}"] = proc.pid
        if self.relay.modes:
            log(
                f"starting the relay ({', '.join(self.relay.modes)}): bridge in the hub, a router pair per mode"
                + (", S3 blob store (moto) in the hub" if "relay" in self.relay.modes else "")
            )
            b_devices = {"STORE": SCP_PORT} | ({"ARCHIVE": ARCHIVE_PORT} if self.archive else {})
            a_devices = {MOVE_AET: MOVE_PORT} if self.archive and "move" in self.args.workloads else {}
            accel_devices = None
            if "relay-accel" in self.relay.modes:
                self.scp_accel = self.lab.popen(
                    NS_B,
                    [dcmtk("storescp"), "--fork", "--disable-host-lookup", "+xa", "-aet", "STORE", "-od",
                     str(self.rx), "-fe", ".dcm", str(SCP_ACCEL_PORT)],
                    env=DICOM_ENV, stdout=subprocess.DEVNULL, stderr=(self.work / "storescp-accel.log").open("ab"),
                )  # fmt: skip
                self.cpu_pids["storescp-accel"] = self.scp_accel.pid
                accel_devices = {"STORE": SCP_ACCEL_PORT}
            self.relay.start(b_devices, a_devices, accel_devices)
            self.cpu_pids.update(self.relay.pids)
        if self.archive is not None:
            log("starting the archive: Orthanc ARCHIVE in B (C-FIND, C-MOVE), storescp MOVE in A")
            self.archive.start(self.relay.ports_b)
            self.cpu_pids.update(self.archive.pids)
        if self.dicomweb is not None:
            log("starting DICOMweb: Orthanc + DICOMweb plugin in A and in B, HTTPS endpoint in B")
            self.dicomweb.start()
            self.cpu_pids.update(self.dicomweb.pids)

    def stop(self) -> None:
        for step in (
            lambda: self.archive.stop() if self.archive else None,
            lambda: self.dicomweb.stop() if self.dicomweb else None,
            self.relay.stop,
            lambda: self.vpn.stop() if self.vpn else None,
            lambda: (self.scp.terminate(), self.scp.wait(10)) if self.scp and self.scp.poll() is None else None,
            lambda: (
                (self.scp_accel.terminate(), self.scp_accel.wait(10))
                if self.scp_accel and self.scp_accel.poll() is None
                else None
            ),
            self.lab.teardown,
        ):
            try:
                step()
            except Exception as exc:  # tear everything down whatever fails
                log(f"teardown step failed: {exc}")
        if not self.args.keep_workdir:
            shutil.rmtree(self.work, ignore_errors=True)
        for path in (self.rx, self.rx.with_name(self.rx.name + "-move"), self.orthancs):
            shutil.rmtree(path, ignore_errors=True)

    def target(self, mode: str) -> tuple[str, int, str]:
        if mode == "raw":
            return B_ADDR, SCP_PORT, "STORE"
        if mode == "vpn":
            return VPN_B_ADDR, SCP_PORT, "STORE"
        return "127.0.0.1", self.relay.ports[mode], "STORE_B"

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Deadline()
        return left

    # -- emulation check -----------------------------------------------------
    def _ping(self, ns: str, to: str, count: int = 20) -> dict[str, object]:
        r = self.lab.run(ns, [sys.executable, PROBE, "ping", "--to", to, "--count", str(count)], timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"ping {to} from {ns} failed: {r.stderr[-1500:]}")
        return json.loads(r.stdout)

    def _tcp(self, src: str, dst: str, addr: str, seconds: float) -> dict[str, object]:
        sink = self.lab.popen(
            dst,
            [sys.executable, PROBE, "sink", "--listen", f"{addr}:5201", "--seconds", str(seconds)],
            stdout=subprocess.PIPE,
        )
        try:
            time.sleep(0.3)
            r = self.lab.run(src, [sys.executable, PROBE, "send", "--to", f"{addr}:5201", "--seconds", str(seconds)],
                             timeout=seconds + 60)  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(f"TCP probe {src} -> {addr} failed: {r.stderr[-1500:]}")
            out, _ = sink.communicate(timeout=60)
            return json.loads(out)
        finally:
            if sink.poll() is None:
                sink.kill()
                sink.wait()

    def check(self) -> dict[str, object]:
        secs = self.args.check_seconds
        log(f"emulation check: ping and {secs:g} s of raw TCP through the emulated links")
        check: dict[str, object] = {
            "ping_a_to_b": self._ping(NS_A, B_ADDR),
            "ping_a_to_hub": self._ping(NS_A, HUB_ADDR),
            "tcp_a_to_b": self._tcp(NS_A, NS_B, B_ADDR, secs),
            "tcp_b_to_a": self._tcp(NS_B, NS_A, A_ADDR, secs),
            "tcp_a_to_hub": self._tcp(NS_A, NS_HUB, HUB_ADDR, secs),
        }
        if self.vpn is not None:
            check["ping_vpn"] = self._ping(NS_A, VPN_B_ADDR)
            check["tcp_vpn"] = self._tcp(NS_A, NS_B, VPN_B_ADDR, secs)
        exp = (self.spec.rate_mbit * 1448 / 1514) * 0.97, self.spec.rate_mbit * 1448 / 1514 * 1.005
        for key in ("tcp_a_to_b", "tcp_b_to_a", "tcp_a_to_hub", "tcp_vpn"):
            if key in check:
                c = check[key]
                log(
                    f"  {key:<13} {c['mbit_s']:6.2f} Mbit/s "
                    f"(steady {c['steady_mbit_s']:.2f}; {c['congestion_control']})"
                )  # type: ignore[index]
        for key in ("ping_a_to_b", "ping_a_to_hub", "ping_vpn"):
            if key in check:
                c = check[key]["rtt_ms"]  # type: ignore[index]
                log(f"  {key:<13} {c['median']:6.2f} ms median (min {c['min']:.2f}, max {c['max']:.2f})")
        steady = check["tcp_a_to_b"]["steady_mbit_s"]  # type: ignore[index]
        rtt = check["ping_a_to_b"]["rtt_ms"]["median"]  # type: ignore[index]
        check["expected"] = {
            "tcp_mbit_s": [round(exp[0], 2), round(exp[1], 2)],
            "rtt_ms": [self.spec.rtt_ms, self.spec.rtt_ms + 2.0],
        }
        check["ok"] = bool(exp[0] <= steady <= exp[1] and self.spec.rtt_ms <= rtt <= self.spec.rtt_ms + 2.0)
        if not check["ok"]:
            log("  WARNING: the emulation is outside the expected range; numbers below are suspect")
        return check

    # -- measurements --------------------------------------------------------
    def _cpu_snapshot(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.cpu_pids.items()}

    def _late(self) -> dict[str, float]:
        tuns = self.lab.delay_counters(fresh=True).get("tuns", {})
        keys = ("packets", "late_over_1ms", "late_over_5ms", "late_over_20ms")
        return {k: sum(t.get(k, 0) for t in tuns.values()) for k in keys}  # type: ignore[union-attr]

    @contextlib.contextmanager
    def emulator_window(self) -> Iterator[dict[str, float]]:
        """Counts the packets the delay stage released late during a run (a starved CPU)."""
        before = self._late()
        delta: dict[str, float] = {}
        yield delta
        after = self._late()
        delta.update({k: after[k] - before.get(k, 0) for k in after})

    @contextlib.contextmanager
    def wire_window(self, mode: str) -> Iterator[dict[str, int]]:
        """Bytes sent on each site's uplink and downlink (tbf counters) and carried by the bridge during a run."""
        sent0, bridge0 = self.lab.sent_bytes(), self.relay.bridge_bytes()
        connections0 = self.relay.store_connections()
        audited = self.relay.association_events(mode)
        delta: dict[str, int] = {}
        yield delta
        # The bridge audits an association (with its byte counts) when it ends, a moment after the client
        # has exited: wait for that event, or its bytes land in the next run's window.
        # relay-accel's transfer association outlives the run (it lingers for the next study): no event to wait for.
        deadline = time.monotonic() + 10
        while mode in self.relay.modes and mode != "relay-accel" and self.relay.association_events(mode) <= audited:
            if time.monotonic() > deadline:
                log(f"  the bridge did not audit the {mode} association within 10 s; its bridge bytes are missing")
                break
            time.sleep(0.1)
        sent1, bridge1 = self.lab.sent_bytes(), self.relay.bridge_bytes()
        for key, dev in (("a_uplink", "tunA"), ("a_downlink", "ha0"), ("b_uplink", "tunB"), ("b_downlink", "hb0")):
            delta[key] = sent1[dev] - sent0[dev]
        if self.relay.blob_store == "s3" and mode in self.relay.modes:
            delta["store_connections"] = self.relay.store_connections() - connections0
        for relay_mode, value in bridge1.items():
            if relay_mode != "relay-accel":  # its association is audited when it ends, after the run
                delta[f"bridge_{relay_mode}"] = value - bridge0.get(relay_mode, 0)

    def store(
        self, mode: str, files: tuple[Path, ...], verify: bool, extra: list[str] | None = None
    ) -> tuple[float, dict[str, float]]:
        extra = extra or []
        host, port, called = self.target(mode)
        shutil.rmtree(self.rx, ignore_errors=True)
        self.rx.mkdir()
        # -R: propose only the files' own transfer syntaxes (else storescp may pick an uncompressed one
        # for JPEG 2000 files, which storescu cannot convert to).
        cmd = [dcmtk("storescu"), "-R", *extra, "-aet", "BENCH_SCU", "-aec", called, host, str(port), *map(str, files)]
        cpu0 = self._cpu_snapshot()
        since = time.time_ns()  # the files' mtimes are wall clock: arrivals are measured from here
        t0 = time.perf_counter()
        r = self.lab.run(NS_A, cmd, timeout=min(590.0, self._left()), env=DICOM_ENV)
        elapsed = time.perf_counter() - t0
        cpu1 = self._cpu_snapshot()
        if r.returncode != 0:
            raise RuntimeError(f"storescu ({mode}) failed ({r.returncode}): {r.stderr[-2000:]}")
        if mode == "relay-accel":  # storescu got router A's answers; the images are still on their way
            self._sender_s = elapsed
            self._wait_accel_arrival(len(files))
            cpu1 = self._cpu_snapshot()
        workloads.check_arrival(mode, self.rx, files, verify)
        self._first_s, last = workloads.arrival_times(self.rx, since)
        if mode == "relay-accel":  # end to end: storescu's start to the last instance stored at storescp
            elapsed = last
        return elapsed, {k: round(cpu1[k] - cpu0.get(k, 0.0), 3) for k in cpu1}

    def _wait_accel_arrival(self, count: int) -> None:
        """Until `count` files are in the receiving directory, then until both spools are empty (each file
        complete, every outcome back at router A) before anything reads them."""
        deadline = time.monotonic() + min(590.0, self._left())
        while len(list(self.rx.glob("*.dcm"))) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay-accel: {len(list(self.rx.glob('*.dcm')))} of {count} files arrived")
            time.sleep(ACCEL_POLL_S)
        while not self.relay.accel_drained():
            if time.monotonic() > deadline:
                raise RuntimeError("relay-accel: the spools did not drain")
            time.sleep(0.1)

    def echo(self, mode: str, count: int) -> list[dict[str, float]]:
        host, port, called = self.target(mode)
        r = self.lab.run(
            NS_A,
            [sys.executable, PROBE, "echo", "--to", f"{host}:{port}", "--aec", called, "--count", str(count)],
            timeout=min(300.0, self._left()),
        )
        if r.returncode != 0:
            raise RuntimeError(f"echo ({mode}) failed: {r.stderr[-2000:]}")
        return json.loads(r.stdout)["samples"]

    def run(self) -> dict[str, object]:
        args = self.args
        sizes = dict(QUICK_SIZES if args.quick else FULL_SIZES)
        for name in sizes:
            if getattr(args, f"{name}_images") is not None:
                sizes[name] = getattr(args, f"{name}_images")
        cache = Path(args.cache)
        loads: dict[str, workloads.Workload] = {}
        for name in args.workloads:
            if name in LATENCY:
                continue
            if name == "move":  # the archive holds the CT study; C-MOVE brings it to site A
                ct = workloads.build("ct", sizes["ct"], cache)
                loads[name] = workloads.Workload("move", ct.files, f"C-MOVE of the CT study: {ct.description}")
                continue
            log(f"preparing workload {name} ({sizes[name]} files) in {cache}")
            loads[name] = workloads.build(name, sizes[name], cache)
            log(f"  {loads[name].description}: {loads[name].bytes / 1e6:.1f} MB")
        load = [loadavg()]
        self.uptime = {"before": uptime()}
        minutes = estimate_minutes(args, loads, self.spec)
        log(f"estimated duration: {minutes:.0f} min (stops measuring after --max-minutes {args.max_minutes:g})")
        self.start()
        self._load_orthancs(loads, Path(args.cache))
        check = self.check()
        link = {"rate_mbit": self.spec.rate_mbit, "rtt_ms": self.spec.rtt_ms}
        modes = list(args.modes)
        self._warm_up(modes, loads)

        m = Measurements()
        total = args.repeats * sum(applies(args, n, md) for n in args.workloads for md in modes)
        done = 0
        started = time.monotonic()
        complete = True
        try:
            for rep in range(args.repeats):
                order = modes[rep % len(modes) :] + modes[: rep % len(modes)]  # rotate: no mode always goes first
                for name in args.workloads:
                    for mode in order:
                        if not applies(args, name, mode):
                            continue
                        self._left()
                        done += 1
                        if (name, mode) in m.failed:
                            continue
                        try:
                            shown = self._measure(name, mode, rep, loads, m)
                        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:  # only this mode stops
                            m.failed.add((name, mode))
                            m.errors.append({"workload": name, "mode": mode, "repeat": rep + 1, "error": str(exc)})
                            log(f"[{done}/{total}] {name} {mode} FAILED (not repeated): {str(exc)[-600:]}")
                            continue
                        eta = (time.monotonic() - started) / done * (total - done)
                        log(
                            f"[{done}/{total}] repeat {rep + 1}/{args.repeats} {name:<10} {mode:<5} {shown}"
                            f"  (ETA {eta / 60:.1f} min)"
                        )
                load.append(loadavg())
        except Deadline:
            complete = False
            log(f"time limit of {args.max_minutes:g} min reached: writing what was measured")
        self.uptime["after"] = uptime()
        return self._payload(check, link, loads, m, complete, load)

    def _load_orthancs(self, loads: dict[str, workloads.Workload], cache: Path) -> None:
        """Untimed: the archive gets a few small studies (and the CT study for C-MOVE); Orthanc A every study
        that DICOMweb will send."""
        if self.archive is not None:
            studies = [tuple(extra_studies(cache))] + ([loads["move"].files] if "move" in loads else [])
            log(f"loading the archive in B: {sum(len(s) for s in studies)} instances")
            self.archive.load(studies)
            log(f"  the archive holds {self.archive.studies} studies")
        if self.dicomweb is not None:
            for name in TRANSFERS:
                if name in loads:
                    log(f"loading {name} into Orthanc A (for STOW-RS)")
                    self.dicomweb.load(name, loads[name].files, loads[name].storescu_args)

    def _warm_up(self, modes: list[str], loads: dict[str, workloads.Workload]) -> None:
        log("warming up every path (2 files, one C-ECHO, one C-FIND each; STOW-RS of 2 files)")
        transfers = [loads[n] for n in TRANSFERS if n in loads]
        warm = transfers[0].files[:2] if transfers else ()
        warm_args = transfers[0].storescu_args if transfers else []
        for mode in modes:
            if mode == "dicomweb":
                if warm and self.dicomweb is not None:
                    self.dicomweb.warm(warm)
                continue
            if warm:
                self.store(mode, warm, verify=True, extra=warm_args)
            self.echo(mode, 1)
            if self.archive is not None:
                self.archive.find(mode, self.relay.ports, 1, timeout=60)

    def _measure(self, name: str, mode: str, rep: int, loads: dict[str, workloads.Workload], m: Measurements) -> str:
        with self.emulator_window() as late:
            shown = self._measure_one(name, mode, rep, loads, m)
        m.late.setdefault((name, mode), []).append(late)
        if late.get("late_over_5ms"):
            shown += f"  [emulator: {late['late_over_5ms']:.0f} of {late['packets']:.0f} packets >5 ms late]"
        return shown

    def _measure_one(
        self, name: str, mode: str, rep: int, loads: dict[str, workloads.Workload], m: Measurements
    ) -> str:
        if name in LATENCY:
            if name == "echo":
                parts = self.echo(mode, self.args.echo_count)
            else:
                assert self.archive is not None
                parts = self.archive.find(mode, self.relay.ports, self.args.echo_count, min(300.0, self._left()))
            m.echo_parts.setdefault((name, mode), []).extend(parts)
            m.samples.setdefault((name, mode), []).extend(p["total_s"] for p in parts)
            mid = report.summary([p["total_s"] for p in parts])["median"]
            return f"{mid * 1000:.0f} ms median of {len(parts)}"
        files, verify = loads[name].files, rep == 0
        with self.wire_window(mode) as wire:
            if name == "move" and mode == "dicomweb":
                assert self.dicomweb is not None
                cpu0 = self._cpu_snapshot()
                seconds = self.dicomweb.retrieve(files, loads[name].storescu_args, verify, min(590.0, self._left()))
                cpu1 = self._cpu_snapshot()
                used = {k: round(cpu1[k] - cpu0.get(k, 0.0), 3) for k in cpu1}
            elif name == "move":
                assert self.archive is not None
                cpu0 = self._cpu_snapshot()
                seconds = self.archive.move(mode, self.relay.ports, files, verify, min(590.0, self._left()))
                cpu1 = self._cpu_snapshot()
                used = {k: round(cpu1[k] - cpu0.get(k, 0.0), 3) for k in cpu1}
            elif mode == "dicomweb":
                assert self.dicomweb is not None
                cpu0 = self._cpu_snapshot()
                seconds = self.dicomweb.stow(name, files, verify, min(590.0, self._left()))
                cpu1 = self._cpu_snapshot()
                used = {k: round(cpu1[k] - cpu0.get(k, 0.0), 3) for k in cpu1}
            else:
                seconds, used = self.store(mode, files, verify=verify, extra=loads[name].storescu_args)
                if mode == "relay-accel" and self._sender_s is not None:
                    m.sender.setdefault((name, mode), []).append(self._sender_s)
                if self._first_s is not None:
                    m.first.setdefault((name, mode), []).append(self._first_s)
        wire = {k: v for k, v in wire.items() if not k.startswith("bridge_") or k == f"bridge_{mode}"}
        m.wire.setdefault((name, mode), []).append(wire)
        m.samples.setdefault((name, mode), []).append(seconds)
        m.cpu.setdefault((name, mode), []).append({k: v for k, v in used.items() if v > 0.005})
        cpu = ", ".join(f"{k} {v / seconds:.0%}" for k, v in sorted(used.items()) if v / seconds >= 0.05)
        up = "b_uplink" if name == "move" else "a_uplink"
        sent = f"{up[0].upper()} uplink {wire[up] / 1e6:.1f} MB" + (
            f", bridge {wire[f'bridge_{mode}'] / 1e6:.1f} MB" if f"bridge_{mode}" in wire else ""
        )
        if "store_connections" in wire:
            sent += f", {wire['store_connections']} connections to the blob store"
        if name in TRANSFERS and mode != "dicomweb":
            sent += f"; first image {m.first[(name, mode)][-1]:.2f} s"
            sent += f", sender {m.sender[(name, mode)][-1]:.2f} s" if mode == "relay-accel" else ""
        return f"{seconds:.2f} s, {loads[name].bytes / seconds / 1e6:.2f} MB/s  [{sent}; CPU: {cpu}]"

    def _payload(
        self,
        check: dict[str, object],
        link: dict[str, float],
        loads: dict[str, workloads.Workload],
        m: Measurements,
        complete: bool,
        load: list[list[float]],
    ) -> dict[str, object]:
        args = self.args
        samples, echo_parts, cpu = m.samples, m.echo_parts, m.cpu
        results = []
        for (name, mode), values in samples.items():
            files = len(loads[name].files) if name in loads else 0
            nbytes = loads[name].bytes if name in loads else 0
            rec = report.record(name, mode, link, files, nbytes, values)
            if name in LATENCY:
                parts = echo_parts[(name, mode)]
                rec[f"{name}_breakdown_ms"] = {
                    k: round(report.summary([p[k] for p in parts])["median"] * 1000, 2)
                    for k in ("associate_s", f"{name}_s", "release_s")
                }
            if (name, mode) in cpu:
                runs = cpu[(name, mode)]
                rec["cpu_s_median"] = {
                    k: round(report.summary([r.get(k, 0.0) for r in runs])["median"], 2)
                    for k in sorted({k for r in runs for k in r})
                }
            if (name, mode) in m.wire:
                runs = m.wire[(name, mode)]
                rec["wire_bytes_median"] = {
                    k: int(report.summary([r.get(k, 0) for r in runs])["median"])
                    for k in sorted(runs[0])
                    if k != "store_connections"
                }
                if "store_connections" in runs[0]:  # TCP connections the routers opened to the blob store, per run
                    rec["store_connections"] = [r.get("store_connections", 0) for r in runs]
            if (name, mode) in m.sender:
                rec["sender_seconds"] = report.summary(m.sender[(name, mode)])
            if (name, mode) in m.first:
                rec["first_image_seconds"] = report.summary(m.first[(name, mode)])
            if (name, mode) in m.late:
                runs = m.late[(name, mode)]
                rec["emulator"] = {
                    "packets": sum(r.get("packets", 0) for r in runs),
                    "late_over_5ms": sum(r.get("late_over_5ms", 0) for r in runs),
                    "late_over_20ms": sum(r.get("late_over_20ms", 0) for r in runs),
                }
            results.append(rec)
        order_key = {w: i for i, w in enumerate(WORKLOADS)}
        results.sort(key=lambda r: (order_key.get(r["workload"], 99), report.MODES.index(r["mode"])))  # type: ignore[arg-type]
        report.add_ratios(results)
        payload: dict[str, object] = {
            "link": {**link, **self.spec.as_dict()},
            "repeats": args.repeats,
            "complete": complete,
            "emulation_check": check,
            "topology": {
                "site_a": A_ADDR,
                "site_b": B_ADDR,
                "hub": HUB_ADDR,
                "blob_store": BLOB_ADDR,
                "vpn": "127.20.0.1 <-> 127.20.0.2",
                "delay": "TUN delay stage in the hub, RTT/2 per packet entering the hub (A<->hub RTT = RTT/2)",
                "shaping": "tbf per site uplink (hub TUN egress) and downlink (hub veth egress)",
            },  # fmt: skip
            "vpn": self.vpn.describe() if self.vpn else None,
            "relay": self.relay.describe() if self.relay.modes else None,
            "archive": {
                "software": "Orthanc 1.10 (Debian), AE ARCHIVE in site B, port 4242",
                "studies": self.archive.studies,
                "find": "pynetdicom: associate, study-level C-FIND (Study Root, every study), release",
                "move": "DCMTK movescu in A; the archive sends the CT study to storescp MOVE in A",
                "move_modes": args.move_modes,
            }
            if self.archive
            else None,
            "dicomweb": self.dicomweb.describe() if self.dicomweb else None,
            "workloads": {
                n: {"files": len(w.files), "bytes": w.bytes, "description": w.description} for n, w in loads.items()
            }
            | (
                {"echo": {"description": f"pynetdicom association + C-ECHO + release, {args.echo_count} per repeat"}}
                if "echo" in args.workloads
                else {}
            ),  # fmt: skip
            "results": results,
            "errors": m.errors,
            "loadavg": load,
            "uptime": self.uptime,
            "priority": args.priority,
            "delay_stage": self.lab.delay_counters(),
            "qdiscs": self.lab.qdisc_stats(),
            "command": args.command,
        }
        payload["goals"] = report.goals(results, check)
        return payload


def write(payload: dict[str, object], name: str, base: Path | None = None) -> list[Path]:
    """Write DATE-NAME.json, .md and .png into benchmarks/results (or next to `base`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if base is None:
        stamp = dt.date.today().isoformat()
        payload = {"name": name, "date": stamp, "machine": machine(), **payload}
        base = RESULTS / f"{stamp}-{name}"
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    paths[0].write_text(json.dumps(payload, indent=2) + "\n")
    table = report.markdown(payload)
    png = report.plot(payload, base.with_suffix(".png"))
    if png is not None:
        table += f"\n![time per workload and mode]({png.name})\n"
        paths.append(png)
    paths[1].write_text(table)
    print("\n" + table, flush=True)
    return paths


def _setting(text: str) -> int | float | bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small workloads, 1 repeat (development)")
    p.add_argument("--cleanup", action="store_true", help="remove what an interrupted run left, then exit")
    p.add_argument("--report", metavar="JSON", help="rewrite the table and plot of an earlier results file, then exit")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="round trip time site A <-> site B (default 40)")
    p.add_argument("--rate-mbit", type=float, default=24.0, help="rate of every link, each way (default 24)")
    p.add_argument("--cc", choices=("bbr", "reno"), default="bbr", help="TCP congestion control in the namespaces")
    p.add_argument("--repeats", type=int, help="runs per (workload, mode) (default 3; 1 with --quick)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"any of {', '.join(report.MODES)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"any of {', '.join(WORKLOADS)}")
    p.add_argument(
        "--move-modes",
        default="vpn,relay,dicomweb",
        help="modes the move workload runs in (default vpn,relay,dicomweb; dicomweb: a WADO-RS retrieve)",
    )
    p.add_argument("--ct-images", type=int, help=f"CT slices of 0.5 MB (default {FULL_SIZES['ct']} = 200 MB)")
    p.add_argument("--mr-images", type=int, help=f"MR slices of 0.13 MB (default {FULL_SIZES['mr']})")
    p.add_argument("--compressed-images", type=int, help=f"JPEG 2000 CT slices (default {FULL_SIZES['compressed']})")
    p.add_argument("--small-images", type=int, help=f"small objects of ~51 KB (default {FULL_SIZES['small']})")
    p.add_argument("--crdx-images", type=int, help=f"DX images of 19 MB (default {FULL_SIZES['crdx']})")
    p.add_argument(
        "--echo-count", type=int, help="associations per echo (and find) repeat (default 10; 5 with --quick)"
    )
    p.add_argument("--check-seconds", type=float, help="seconds of each raw TCP check (default 8; 4 with --quick)")
    p.add_argument("--max-minutes", type=float, default=90.0, help="stop measuring after this long (default 90)")
    p.add_argument(
        "--cache",
        default="/dev/shm/drwan-data"
        if Path("/dev/shm").is_dir()
        else os.path.join(tempfile.gettempdir(), "drwan-data"),
        help="generated DICOM files (in memory by default: no disk reads while measuring; removed afterwards)",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the generated files for the next run")
    p.add_argument("--name", help="results file name after the date (default wan, wan-quick, wan-rtt100ms, ...)")
    p.add_argument(
        "--relay-dicom",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra [dicom] setting for the routers of both relay modes, e.g. frame_bytes=32768 (repeatable; "
        "integer, decimal, true or false; relay-plain keeps compression and spill off)",
    )
    p.add_argument(
        "--priority",
        choices=("rt", "nice", "none"),
        default="rt",
        help="scheduling of every measured process, all modes alike: rt = SCHED_FIFO 5 (default; the delay "
        "stage runs at SCHED_FIFO 10), nice = nice -10, none; other work on a shared machine skews the rest",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and configs (printed at the end)")
    p.add_argument(
        "--blob-store",
        choices=BLOB_STORES,
        default="auto",
        help="where spilled parts go: s3 (moto in the hub, over the routers' HTTP connections, counted), bridge "
        "(the bridge's file store, through its RPCs); auto (default): s3 when the relay mode runs, else bridge",
    )
    args = p.parse_args(argv)
    given = shlex.join(argv if argv is not None else sys.argv[1:])
    if os.environ.get("MAKELEVEL"):  # started by `make bench`
        args.command = "make bench" + (f" BENCH_ARGS={shlex.quote(given)}" if given else "")
    else:
        args.command = ("python -m benchmarks.wan " + given).strip()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.echo_count = args.echo_count or (5 if args.quick else 10)
    args.check_seconds = args.check_seconds or (4.0 if args.quick else 8.0)
    try:
        args.relay_dicom = {k: _setting(v) for k, v in (item.split("=", 1) for item in args.relay_dicom)}
    except ValueError:
        p.error("--relay-dicom takes KEY=VALUE (integer, decimal, true or false)")
    args.modes = [m for m in args.modes.split(",") if m]
    args.move_modes = [m for m in args.move_modes.split(",") if m in args.modes]
    for m in args.move_modes:
        if m not in report.MODES:
            p.error(f"unknown mode {m} in --move-modes")
    args.workloads = [w for w in args.workloads.split(",") if w]
    for m in args.modes:
        if m not in report.MODES:
            p.error(f"unknown mode {m}")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w}")
    if args.name is None:
        suffix = "-quick" if args.quick else ""
        if args.rtt_ms != 40 or args.rate_mbit != 24 or args.cc != "bbr":
            suffix += f"-{args.rate_mbit:g}mbit-rtt{args.rtt_ms:g}ms-{args.cc}"
        if args.relay_dicom:
            suffix += "-" + "-".join(f"{k}{v}" for k, v in args.relay_dicom.items())
        args.name = "wan" + suffix
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.report:
        path = Path(args.report)
        payload = json.loads(path.read_text())
        payload["goals"] = report.goals(payload["results"], payload.get("emulation_check"))
        for written in write(payload, payload["name"], base=path.with_suffix("")):
            log(f"wrote {written}")
        return 0
    if os.geteuid() != 0:
        print("the WAN benchmark needs root (network namespaces, tc, TUN); try: sudo make bench", file=sys.stderr)
        return 2
    # One run at a time: namespaces, addresses and ports are fixed, and a second run would tear down the first.
    lock = open(LOCK, "w")  # held for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another WAN benchmark is running (lock {LOCK}); wait for it or stop it first", file=sys.stderr)
        return 3
    if args.cleanup:
        removed = cleanup()
        leftovers = [Path(args.cache), *Path(tempfile.gettempdir()).glob("drwan-*")]
        if Path("/dev/shm").is_dir():
            leftovers += [*Path("/dev/shm").glob("drwan-rx-*"), *Path("/dev/shm").glob("drwan-orthanc-*")]
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                print(f"  removed {path}")
        print(f"removed {len(removed)} namespaces" if removed else "no namespaces to remove")
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    atexit.register(cleanup, False)  # last resort, also after an unexpected exception
    bench = Bench(args)
    try:
        payload = bench.run()
    except KeyboardInterrupt:
        log("interrupted: tearing down")
        return 130
    finally:
        if args.keep_workdir:
            log(f"logs and configs kept in {bench.work}")
        bench.stop()
        if not args.keep_data:
            shutil.rmtree(args.cache, ignore_errors=True)
    for path in write(payload, args.name):
        log(f"wrote {path}")
    return 0
