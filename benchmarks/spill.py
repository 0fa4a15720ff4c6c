"""Cloud spill benchmark: large data sets inline through the bridge vs spilled through S3 (moto) on loopback.

Two pairs of routers send the same study to one storescp: site-a -> site-b
inline (spill off), site-s -> site-c spilling every data set above the
threshold through the bridge's S3 store (moto's server on 127.0.0.1). Reports
wall time, bytes through the bridge (audit "association" events), and CPU
seconds and peak RSS of the four router processes.

    .venv/bin/python -m benchmarks.spill [--instances 6 --size 2048 --repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DCMTK_ENV, dcmtk, free_port, run, summary, write_results
from relay_common.audit import read_events
from relay_demo.datasets import generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared

BUCKET = "relay-spill-bench"


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return cpu, hwm


def start_moto(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    import boto3

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=(work / "moto.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench"
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return proc, url
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=6)
    parser.add_argument("--size", type=int, default=2048, help="rows = columns of each 16-bit slice")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threshold", type=int, default=8 << 20)
    parser.add_argument("--part-bytes", type=int, default=4 << 20, help="routers' spill_part_bytes")
    parser.add_argument("--parallel", type=int, default=4, help="routers' spill_parallel")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="relay-spill-bench-"))
    received = Path(tempfile.mkdtemp(prefix="relay-spill-rx-"))
    moto = storescp = None
    net = None
    try:
        moto, moto_url = start_moto(work)
        print(f"generating {args.instances} CT instances of {args.size}x{args.size} ...", flush=True)
        files = write_series(generate_ct_series(args.instances, rows=args.size, cols=args.size), work / "series")
        total = sum(f.stat().st_size for f in files)
        scp_port = free_port()
        storescp = subprocess.Popen(
            [dcmtk("storescp"), "--disable-host-lookup", "-aet", "STORE", "-od", str(received), str(scp_port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true")
        spill = {"store": f"s3://{BUCKET}/spill-bench/", "endpoint_url": moto_url, "region": "us-east-1"}
        net = LocalRelayNetwork(work / "relay", env=env, bridge_spill=spill).start()
        net.add_site("site-b", shared=[Shared("STORE", "127.0.0.1", scp_port, ["site-a"])], spill_threshold_bytes=0)
        tuning = {
            "spill_part_bytes": args.part_bytes,
            "spill_parallel": args.parallel,
            # The routers open only URLs under their configured store endpoint (moto: plain http).
            "spill_endpoints": [moto_url.rstrip("/") + "/"],
            "spill_allow_insecure_http": True,
        }
        net.add_site("site-c", shared=[Shared("STORE", "127.0.0.1", scp_port, ["site-s"])], **tuning)
        a = net.add_site("site-a", remote=[Remote("STORE_B", "site-b", "STORE")], spill_threshold_bytes=0)
        s = net.add_site(
            "site-s", remote=[Remote("STORE_C", "site-c", "STORE")], spill_threshold_bytes=args.threshold, **tuning
        )
        net.wait_connected()
        assert a.port and s.port
        paths = {
            "inline": (a.port, "STORE_B", ("site-a", "site-b")),
            "spill": (s.port, "STORE_C", ("site-s", "site-c")),
        }
        times: dict[str, list[float]] = {k: [] for k in paths}
        cpu: dict[str, float] = {k: 0.0 for k in paths}
        # The bridge's and the store's CPU too: on a small machine the spill path can be CPU-bound.
        others = [net.bridge, moto]
        other_cpu: dict[str, dict[str, float]] = {k: {"bridge": 0.0, "moto": 0.0} for k in paths}
        for _ in range(args.repeats):
            for name, (port, called, sites) in paths.items():
                shutil.rmtree(received, ignore_errors=True)
                received.mkdir()
                before = [proc_usage(net.sites[x].process.pid)[0] for x in sites]  # type: ignore[union-attr]
                others_before = [proc_usage(p.pid)[0] for p in others]
                t0 = time.perf_counter()
                run([dcmtk("storescu"), "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)])
                times[name].append(time.perf_counter() - t0)
                after = [proc_usage(net.sites[x].process.pid)[0] for x in sites]  # type: ignore[union-attr]
                cpu[name] += sum(after) - sum(before)
                for key, p, b in zip(("bridge", "moto"), others, others_before, strict=True):
                    other_cpu[name][key] += proc_usage(p.pid)[0] - b
                got = len([p for p in received.rglob("*") if p.is_file()])
                if got != len(files):
                    raise RuntimeError(f"{name}: storescp received {got} of {len(files)} files")
                print(f"  {name:<6} {times[name][-1]:.2f} s", flush=True)
        rss = {
            name: {x: proc_usage(net.sites[x].process.pid)[1] for x in sites}  # type: ignore[union-attr]
            for name, (_, _, sites) in paths.items()
        }
        for name in list(net.sites):
            net.stop_router(name)
        events = [e for e in read_events(net.workdir / "audit.jsonl") if e["event"] == "association"]
        through = {
            name: sum(int(e["bytes_from_initiator"]) for e in events if e["from_site"] == sites[0])
            for name, (_, _, sites) in paths.items()
        }
        store: dict[str, dict[str, object]] = {}
        for name in paths:
            med = statistics.median(times[name])
            sent = total * len(times[name])
            store[name] = {
                "seconds": summary(times[name]),
                "mb_per_s": total / med / 1e6,
                "bridge_bytes": through[name],
                "bridge_bytes_fraction": through[name] / sent,
                "router_cpu_s_per_run": cpu[name] / len(times[name]),
                "bridge_cpu_s_per_run": other_cpu[name]["bridge"] / len(times[name]),
                "store_cpu_s_per_run": other_cpu[name]["moto"] / len(times[name]),
                "router_peak_rss_mb": {k: v / 1e6 for k, v in rss[name].items()},
            }
        payload = {
            "workload": {"instances": len(files), "bytes": total, "kind": f"CT {args.size}x{args.size} 16-bit"},
            "threshold_bytes": args.threshold,
            "part_bytes": args.part_bytes,
            "parallel": args.parallel,
            "store": "S3 (moto server on 127.0.0.1), presigned URLs",
            "paths": store,
        }
        rows = [
            "| path | median s | MB/s | bridge bytes (fraction) | CPU s/run: routers, bridge, store "
            "| peak RSS MB (send, recv) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in store.items():
            peaks = ", ".join(f"{v:.0f}" for v in r["router_peak_rss_mb"].values())  # type: ignore[attr-defined]
            rows.append(
                f"| {name} | {r['seconds']['median']:.2f} | {r['mb_per_s']:.1f} | "  # type: ignore[index]
                f"{r['bridge_bytes']} ({r['bridge_bytes_fraction']:.1%}) | {r['router_cpu_s_per_run']:.2f}, "
                f"{r['bridge_cpu_s_per_run']:.2f}, {r['store_cpu_s_per_run']:.2f} | {peaks} |"
            )
        table = "\n".join(rows)
        print(table)
        json_path, _ = write_results("spill" + (f"-{args.tag}" if args.tag else ""), payload, table)
        print(f"results: {json_path}")
        return 0
    finally:
        if net is not None:
            net.stop()
        for proc in (storescp, moto):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(received, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
