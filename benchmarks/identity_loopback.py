"""Loopback: what a patient identity route costs end to end, against a plain route, side by side.

DCMTK storescu at site A pushes a CT series to one storescp at site B through real routers and a
bridge over TLS, two ways, alternating: a plain route (relayed byte for byte) and an identity
route (`patient_identity = true` at both ends: router A adds its issuer, router B relabels every
image with B's ID from its cross-reference table, the original kept in Other Patient IDs). The
figure that matters is the ratio; CPU seconds per GB of routers A and B are reported too.

    python -m benchmarks.identity_loopback --instances 100 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom

from benchmarks.common import DCMTK_ENV, CpuMeter, dcmtk, free_port, run, write_results
from relay_demo.datasets import generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared

PATHS = {"plain": "STORE_B", "identity": "STORE_B_ID"}


def storescu(port: int, called: str, files: list[Path]) -> None:
    run([dcmtk("storescu"), "-aet", "BENCH_SCU", "-aec", called, "127.0.0.1", str(port), *map(str, files)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="relay-bench-id-"))
    received = Path(
        tempfile.mkdtemp(prefix="relay-bench-id-rx-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    storescp = None
    net = None
    try:
        files = write_series(generate_ct_series(args.instances, patient_id="A-100"), work / "series")
        total = sum(f.stat().st_size for f in files)
        port = free_port()
        storescp = subprocess.Popen(
            [dcmtk("storescp"), "--disable-host-lookup", "-od", str(received), "-fe", ".dcm", str(port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        net = LocalRelayNetwork(work / "relay").start()
        table = {"source": [{"kind": "table"}]}
        site_b = net.add_site(
            "site-b",
            shared=[
                Shared("STORE", "127.0.0.1", port, ["site-a"]),
                Shared("STORE_ID", "127.0.0.1", port, ["site-a"], patient_issuer="HOSP-A"),
            ],
            identity={"issuer": "HOSP-B", **table},
        )
        site_a = net.add_site(
            "site-a",
            remote=[
                Remote("STORE_B", "site-b", "STORE"),
                Remote("STORE_B_ID", "site-b", "STORE_ID", patient_issuer="HOSP-B"),
            ],
            identity={"issuer": "HOSP-A", **table},
            compression=False,
        )
        config = net.router_config_path("site-b")
        link = ["pix", "add", "B-900", "A-100", "--other-issuer", "HOSP-A"]
        subprocess.run(
            [net.python, "-m", "relay_router.cli", "--config", str(config), *link],
            cwd=config.parent,
            env=net.env,
            check=True,
            capture_output=True,
        )
        net.wait_connected()
        assert site_a.port is not None and site_a.process and site_b.process
        meter = CpuMeter({"router A": site_a.process.pid, "router B": site_b.process.pid})
        times: dict[str, list[float]] = {name: [] for name in PATHS}
        cpu: dict[str, dict[str, list[float]]] = {name: {"router A": [], "router B": []} for name in PATHS}
        for called in PATHS.values():
            storescu(site_a.port, called, files[:2])  # warm up
        for i in range(args.repeats):
            for name, called in PATHS.items():
                shutil.rmtree(received, ignore_errors=True)
                received.mkdir()
                meter.start()
                start = time.perf_counter()
                storescu(site_a.port, called, files)
                times[name].append(time.perf_counter() - start)
                for process, seconds in meter.stop().items():
                    cpu[name][process].append(seconds / (total / 1e9))
                got = sorted(received.glob("*.dcm"))
                if len(got) != len(files):
                    raise RuntimeError(f"{name}: storescp received {len(got)} of {len(files)} files")
                patient = pydicom.dcmread(got[0], stop_before_pixels=True).PatientID
                if patient != ("B-900" if name == "identity" else "A-100"):
                    raise RuntimeError(f"{name}: the images arrived as {patient!r}")
                print(f"  run {i + 1} {name:<8} {times[name][-1]:.2f} s", flush=True)
        rows = {
            name: {
                "seconds_median": statistics.median(times[name]),
                "mb_per_s": total / 1e6 / statistics.median(times[name]),
                "router_a_cpu_s_per_gb": statistics.median(cpu[name]["router A"]),
                "router_b_cpu_s_per_gb": statistics.median(cpu[name]["router B"]),
            }
            for name in PATHS
        }
        ratio = rows["identity"]["mb_per_s"] / rows["plain"]["mb_per_s"]
        lines = [
            f"# Identity route vs plain route, loopback: {args.instances} CT instances ({total / 1e6:.1f} MB), "
            f"median of {args.repeats}",
            "",
            "| route | seconds | MB/s | router A CPU s/GB | router B CPU s/GB |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in rows.items():
            lines.append(
                f"| {name} | {row['seconds_median']:.2f} | {row['mb_per_s']:.1f} | "
                f"{row['router_a_cpu_s_per_gb']:.2f} | {row['router_b_cpu_s_per_gb']:.2f} |"
            )
        lines += [
            "",
            f"The identity route keeps **{ratio:.0%}** of the plain route's throughput (router A stamps its "
            "issuer on every image, router B relabels every image from its table).",
            f"Command: `python -m benchmarks.identity_loopback --instances {args.instances} --repeats {args.repeats}`.",
        ]
        table_text = "\n".join(lines)
        print(table_text)
        if not args.no_save:
            payload = {"config": {"instances": args.instances, "repeats": args.repeats}, "results": rows}
            print("wrote", *write_results("identity-loopback", payload, table_text))
    finally:
        if net is not None:
            net.stop()
        if storescp is not None:
            storescp.terminate()
            storescp.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(received, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
