"""Loopback benchmark: DCMTK storescu -> storescp directly and through router, bridge and router.

Run with `make bench-quick` (no root needed). Both paths run side by side in
one process tree on this machine, alternating, so that noise from other
tenants hits both alike; the figure that matters is the ratio.

Reports throughput (MB/s, instances/s) for a 100-instance 512x512 16-bit CT
series, the round-trip time of a C-ECHO inside an open association, both
direct and relayed, and the CPU seconds per GB of data set bytes that each
process on the path used (user + system, all threads, from /proc): router A,
the bridge and router B, plus storescu and storescp for scale. CPU seconds,
unlike wall time, hardly change when other tenants load the machine.

`--profile DIR` also samples router A, the bridge and router B with py-spy
(needs root and `pip install py-spy`) while the relay path stores the series
again and again, and writes their collapsed stacks and a breakdown by cost
centre (benchmarks/profile.py).
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pynetdicom import AE

from benchmarks.common import DCMTK_ENV, CpuMeter, dcmtk, free_port, run, summary, write_results
from relay_demo.datasets import generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared

VERIFICATION = "1.2.840.10008.1.1"


def storescu(port: int, called: str, files: list[Path]) -> None:
    run([dcmtk("storescu"), "-aet", "BENCH_SCU", "-aec", called, "127.0.0.1", str(port), *map(str, files)])


def children_cpu() -> float:
    """CPU seconds of finished child processes (storescu) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# Which measured processes each path goes through (router A is the sending site's router).
PATH_PROCESSES = {
    "direct": ("storescu", "storescp"),
    "relay": ("storescu", "router A", "bridge", "router B", "storescp"),
    "relay+zstd": ("storescu", "router A", "bridge", "router B", "storescp"),
}
RELAY_PROCESSES = ("router A", "bridge", "router B")
CPU_GOALS_S_PER_GB = {"router A": 3.0, "bridge": 2.0, "router B": 3.0}


def cpu_table(cpu: dict[str, dict[str, dict[str, float]]], repeats: int) -> list[str]:
    names = PATH_PROCESSES["relay"]
    return [
        f"CPU seconds per GB of data set bytes (user + system, median of {repeats}; min-max in brackets):",
        "",
        "| path | " + " | ".join(names) + " | relay total |",
        "|---|" + "---:|" * (len(names) + 1),
        *(
            f"| {path} | "
            + " | ".join(
                f"{cpu[path][n]['median']:.2f} ({cpu[path][n]['min']:.2f}-{cpu[path][n]['max']:.2f})"
                if n in cpu[path]
                else "-"
                for n in names
            )
            + " | "
            + (
                f"{sum(cpu[path][n]['median'] for n in RELAY_PROCESSES):.2f}"
                if all(n in cpu[path] for n in RELAY_PROCESSES)
                else "-"
            )
            + " |"
            for path in cpu
        ),
        "",
        "Goal with compression off (the relay row): "
        + ", ".join(f"{n} at most {g:.1f} s/GB" for n, g in CPU_GOALS_S_PER_GB.items())
        + ".",
    ]


CLOSED_LINE = re.compile(r"association closed: (\d+) bytes from (\S+), (\d+) bytes from \S+, (\d+) frames")


def frame_sizes(bridge_log: str, since: int) -> dict[str, float]:
    """Mean bytes per forwarded frame by sending site, from the bridge's 'association closed' lines.

    Frames are counted in both directions, so the mean is pulled down a little by the
    small C-STORE responses; it still shows whether router A sends full frames or small reads.
    """
    totals: dict[str, list[int]] = {}
    for m in CLOSED_LINE.finditer(bridge_log[since:]):
        t = totals.setdefault(m.group(2), [0, 0])
        t[0] += int(m.group(1)) + int(m.group(3))
        t[1] += int(m.group(4))
    return {site: b / f for site, (b, f) in totals.items() if f}


def echo_rtts(port: int, called: str, count: int) -> tuple[float, list[float]]:
    """(association setup seconds, C-ECHO round trips in seconds) over one association."""
    ae = AE(ae_title="BENCH_SCU")
    ae.add_requested_context(VERIFICATION)
    start = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    setup = time.perf_counter() - start
    if not assoc.is_established:
        raise RuntimeError(f"association to {called} on port {port} failed")
    rtts = []
    for _ in range(count):
        t0 = time.perf_counter()
        status = assoc.send_c_echo()
        rtts.append(time.perf_counter() - t0)
        if status.Status != 0:
            raise RuntimeError("C-ECHO failed")
    assoc.release()
    return setup, rtts


def _setting(text: str) -> object:
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--echoes", type=int, default=200)
    parser.add_argument("--paths", default="direct,relay,relay+zstd", help="comma-separated subset to measure")
    parser.add_argument("--tag", default="", help="suffix of the result files, e.g. 'before'")
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of the relay path")
    parser.add_argument("--profile-seconds", type=float, default=30.0)
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--router-dicom",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra [dicom] setting for every router, e.g. spill_threshold_bytes=0 (to price a setting)",
    )
    parser.add_argument(
        "--relay-env", action="append", default=[], metavar="KEY=VALUE", help="environment of bridge and routers"
    )
    parser.add_argument("--perf", type=Path, help="directory for `perf record` profiles of the relay path (root)")
    args = parser.parse_args(argv)
    chosen = [p for p in args.paths.split(",") if p]
    unknown = set(chosen) - set(PATH_PROCESSES)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {sorted(PATH_PROCESSES)}")

    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    received = Path(tempfile.mkdtemp(prefix="relay-bench-rx-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    storescp = None
    try:
        print(f"generating {args.instances} CT instances ...", flush=True)
        files = write_series(generate_ct_series(args.instances), work / "series")
        total_bytes = sum(f.stat().st_size for f in files)
        scp_port = free_port()
        storescp = subprocess.Popen(
            [
                dcmtk("storescp"),
                "--disable-host-lookup",
                "-aet",
                "STORE",
                "-od",
                str(received),
                "-fe",
                ".dcm",
                str(scp_port),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        env = dict(pair.split("=", 1) for pair in args.relay_env)
        net = LocalRelayNetwork(work / "relay", env=env).start()
        extra = {k: _setting(v) for k, v in (pair.split("=", 1) for pair in args.router_dicom)}
        net.add_site("site-b", shared=[Shared("STORE", "127.0.0.1", scp_port, ["site-a", "site-z"])], **extra)
        # Two sending sites: one relays plain (sealed) frames, the other compresses them too.
        site_a = net.add_site(
            "site-a", remote=[Remote("STORE_B", "site-b", "STORE")], **{"compression": False, **extra}
        )
        site_z = net.add_site("site-z", remote=[Remote("STORE_B", "site-b", "STORE")], **extra)
        net.wait_connected()
        assert site_a.port is not None and site_z.port is not None

        all_paths = {
            "direct": (scp_port, "STORE"),
            "relay": (site_a.port, "STORE_B"),
            "relay+zstd": (site_z.port, "STORE_B"),
        }
        paths = {name: all_paths[name] for name in chosen}
        assert net.bridge is not None and site_a.process and site_z.process and net.sites["site-b"].process
        pids = {
            "site-a": site_a.process.pid,
            "site-z": site_z.process.pid,
            "bridge": net.bridge.pid,
            "router B": net.sites["site-b"].process.pid,
            "storescp": storescp.pid,
        }
        meter = CpuMeter(pids)
        gigabytes = total_bytes / 1e9
        store_times: dict[str, list[float]] = {k: [] for k in paths}
        cpu_runs: dict[str, dict[str, list[float]]] = {k: {} for k in paths}
        for port, called in paths.values():  # warm up every path
            storescu(port, called, files[:2])
        log_start = len(net.log("bridge"))
        for i in range(args.repeats):
            for name, (port, called) in paths.items():
                shutil.rmtree(received, ignore_errors=True)
                received.mkdir()
                scu_before = children_cpu()
                meter.start()
                t0 = time.perf_counter()
                storescu(port, called, files)
                store_times[name].append(time.perf_counter() - t0)
                used = meter.stop()
                used["storescu"] = children_cpu() - scu_before
                used["router A"] = used["site-z" if name == "relay+zstd" else "site-a"]
                for process in PATH_PROCESSES[name]:
                    cpu_runs[name].setdefault(process, []).append(used[process] / gigabytes)
                got = len(list(received.glob("*.dcm")))
                if got != len(files):
                    raise RuntimeError(f"{name}: storescp received {got} of {len(files)} files")
                relay_cpu = "  ".join(
                    f"{p} {used[p] / gigabytes:.2f}" for p in RELAY_PROCESSES if p in PATH_PROCESSES[name]
                )
                print(
                    f"  run {i + 1} {name:<10} {store_times[name][-1]:.2f} s"
                    + (f"  CPU s/GB: {relay_cpu}" if relay_cpu else ""),
                    flush=True,
                )
        cpu = {path: {p: summary(v) for p, v in runs.items()} for path, runs in cpu_runs.items()}
        time.sleep(0.5)  # the bridge logs a splice when both ends have closed
        mean_frame = frame_sizes(net.log("bridge"), log_start)
        print("mean bytes per frame through the bridge: " + ", ".join(f"{k} {v:.0f}" for k, v in mean_frame.items()))
        profiles = None
        relay_pids = {"router A": site_a.process.pid, "bridge": net.bridge.pid, "router B": pids["router B"]}
        port, called = all_paths["relay"]
        if args.perf is not None:
            from benchmarks.profile import perf_processes

            reports = perf_processes(
                relay_pids, lambda: storescu(port, called, files), args.perf, seconds=args.profile_seconds
            )
            print("\n".join(reports.values()))
        if args.profile is not None:
            from benchmarks.profile import profile_processes

            profiles = profile_processes(
                relay_pids,
                lambda: storescu(port, called, files),
                args.profile,
                seconds=args.profile_seconds,
                rate=args.profile_rate,
            )

        echo: dict[str, dict[str, object]] = {}
        for name, (port, called) in paths.items():
            setup, rtts = echo_rtts(port, called, args.echoes)
            echo[name] = {"association_setup_s": setup, "rtt_s": summary(rtts)}

        store = {}
        for name, times in store_times.items():
            med = statistics.median(times)
            store[name] = {
                "seconds": summary(times),
                "mb_per_s": total_bytes / med / 1e6,
                "instances_per_s": len(files) / med,
            }
        ratios = {
            name: store[name]["mb_per_s"] / store["direct"]["mb_per_s"]
            for name in ("relay", "relay+zstd")
            if name in store and "direct" in store
        }
        added_ms = (
            (echo["relay"]["rtt_s"]["median"] - echo["direct"]["rtt_s"]["median"]) * 1000  # type: ignore[index]
            if "relay" in echo and "direct" in echo
            else None
        )
        payload = {
            "workload": {"instances": len(files), "bytes": total_bytes, "kind": "CT 512x512 16-bit, uncompressed"},
            "tls": True,
            "store": store,
            "store_ratio_relay_to_direct": ratios.get("relay"),
            "store_ratio_relay_zstd_to_direct": ratios.get("relay+zstd"),
            "relay": "end-to-end sealed frames (AES-256-GCM) inside TLS 1.3; relay+zstd also compresses frames",
            "cpu_s_per_gb": cpu,
            "mean_frame_bytes_by_sending_site": mean_frame,
            "cpu_note": "user+system CPU seconds of each process per 1e9 data set bytes, from /proc/<pid>/stat; "
            "storescu from getrusage(RUSAGE_CHILDREN); router A is site-a (relay) or site-z (relay+zstd)",
            "echo": echo,
            "echo_added_ms_median": added_ms,
            "goals": {"store_ratio_min": 0.5, "echo_added_ms_max": 2.0, "cpu_s_per_gb_max": CPU_GOALS_S_PER_GB},
            "profiles": profiles,
            "router_dicom": args.router_dicom,
            "relay_env": args.relay_env,
            "command": "make bench-quick" if argv is None else "python -m benchmarks.loopback " + " ".join(argv),
        }
        summary_line = []
        if "relay" in ratios:
            summary_line.append(f"Relay keeps **{ratios['relay']:.0%}** of direct throughput (goal: at least 50%")
            if "relay+zstd" in ratios:
                summary_line.append(f"; {ratios['relay+zstd']:.0%} with zstd, which pays on WAN links, not on loopback")
            summary_line.append("). ")
        if added_ms is not None:
            summary_line.append(f"C-ECHO adds **{added_ms:.2f} ms** at the median (goal: under 2 ms).")
        table = "\n".join(
            [
                f"# Loopback: {len(files)} CT instances ({total_bytes / 1e6:.1f} MB), TLS 1.3 + end-to-end sealing, "
                f"median of {args.repeats}",
                "",
                "| path | seconds | MB/s | instances/s | C-ECHO RTT median (ms) | association setup (ms) |",
                "|---|---:|---:|---:|---:|---:|",
                *(
                    f"| {n} | {s['seconds']['median']:.2f} | {s['mb_per_s']:.1f} | {s['instances_per_s']:.0f} | "
                    f"{echo[n]['rtt_s']['median'] * 1000:.2f} | {echo[n]['association_setup_s'] * 1000:.1f} |"  # type: ignore[index]
                    for n, s in store.items()
                ),
                "",
                "".join(summary_line),
                "",
                *cpu_table(cpu, args.repeats),
                "",
                "Mean bytes per frame through the bridge (both directions): "
                + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in mean_frame.items()),
                *(["", profiles["table"]] if profiles else []),
            ]
        )
        json_path, md_path = write_results("loopback" + (f"-{args.tag}" if args.tag else ""), payload, table)
        print(table)
        print(f"\nwrote {json_path} and {md_path}")
        return 0
    finally:
        if storescp is not None:
            storescp.terminate()
            storescp.wait()
        if "net" in locals():
            net.stop()
        shutil.rmtree(received, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
