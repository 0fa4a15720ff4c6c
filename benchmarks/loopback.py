"""Loopback benchmark: DCMTK storescu -> storescp directly and through router, bridge and router.

Run with `make bench-quick` (no root needed). Both paths run side by side in
one process tree on this machine, alternating, so that noise from other
tenants hits both alike; the figure that matters is the ratio.

Reports throughput (MB/s, instances/s) for a 100-instance 512x512 16-bit CT
series, and the round-trip time of a C-ECHO inside an open association, both
direct and relayed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pynetdicom import AE

from benchmarks.common import DCMTK_ENV, dcmtk, free_port, run, summary, write_results
from relay_demo.datasets import generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared

VERIFICATION = "1.2.840.10008.1.1"


def storescu(port: int, called: str, files: list[Path]) -> None:
    run([dcmtk("storescu"), "-aet", "BENCH_SCU", "-aec", called, "127.0.0.1", str(port), *map(str, files)])


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--echoes", type=int, default=200)
    args = parser.parse_args(argv)

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
        net = LocalRelayNetwork(work / "relay").start()
        net.add_site("site-b", shared=[Shared("STORE", "127.0.0.1", scp_port, ["site-a", "site-z"])])
        # Two sending sites: one relays plain (sealed) frames, the other compresses them too.
        site_a = net.add_site("site-a", remote=[Remote("STORE_B", "site-b", "STORE")], compression=False)
        site_z = net.add_site("site-z", remote=[Remote("STORE_B", "site-b", "STORE")])
        net.wait_connected()
        assert site_a.port is not None and site_z.port is not None

        paths = {
            "direct": (scp_port, "STORE"),
            "relay": (site_a.port, "STORE_B"),
            "relay+zstd": (site_z.port, "STORE_B"),
        }
        store_times: dict[str, list[float]] = {k: [] for k in paths}
        for port, called in paths.values():  # warm up every path
            storescu(port, called, files[:2])
        for i in range(args.repeats):
            for name, (port, called) in paths.items():
                shutil.rmtree(received, ignore_errors=True)
                received.mkdir()
                t0 = time.perf_counter()
                storescu(port, called, files)
                store_times[name].append(time.perf_counter() - t0)
                got = len(list(received.glob("*.dcm")))
                if got != len(files):
                    raise RuntimeError(f"{name}: storescp received {got} of {len(files)} files")
                print(f"  run {i + 1} {name:<6} {store_times[name][-1]:.2f} s", flush=True)

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
        ratio = store["relay"]["mb_per_s"] / store["direct"]["mb_per_s"]
        ratio_zstd = store["relay+zstd"]["mb_per_s"] / store["direct"]["mb_per_s"]
        added_ms = (echo["relay"]["rtt_s"]["median"] - echo["direct"]["rtt_s"]["median"]) * 1000  # type: ignore[index]
        payload = {
            "workload": {"instances": len(files), "bytes": total_bytes, "kind": "CT 512x512 16-bit, uncompressed"},
            "tls": True,
            "store": store,
            "store_ratio_relay_to_direct": ratio,
            "store_ratio_relay_zstd_to_direct": ratio_zstd,
            "relay": "end-to-end sealed frames (AES-256-GCM) inside TLS 1.3; relay+zstd also compresses frames",
            "echo": echo,
            "echo_added_ms_median": added_ms,
            "goals": {"store_ratio_min": 0.5, "echo_added_ms_max": 2.0},
            "command": "make bench-quick",
        }
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
                f"Relay keeps **{ratio:.0%}** of direct throughput (goal: at least 50%; {ratio_zstd:.0%} with "
                "zstd, which pays on WAN links, not on loopback); "
                f"C-ECHO adds **{added_ms:.2f} ms** at the median (goal: under 2 ms).",
            ]
        )
        json_path, md_path = write_results("loopback", payload, table)
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
