"""Cluster benchmark: a local splice against a cross-replica association, and the failover time over many kills.

Run with `python -m benchmarks.cluster` (options: --instances, --repeats, --setups, --kills). Not a
test: it measures, writes benchmarks/results/<date>-cluster.{json,md} and prints the table.

Topology, all real processes on this machine: a throwaway PostgreSQL, three `relay-bridge serve`
replicas with `[cluster]` (default lease and renewal settings; r3 with `links = false`, as a
replica without the replica link), HAProxy (TCP mode, health checks, and routing on the TLS server
names r1.localhost, r2.localhost, r3.localhost for the direct join) with three frontends: "a"
prefers r1, "b" prefers r2, "d" prefers r3. Five routers: site-a and site-c through frontend a
(both on r1), site-b and site-e through frontend b (on r2), site-d through frontend d (on r3).
site-b, site-c, site-d and site-e each share a DCMTK storescp (`--ignore`: received, not written);
site-b and site-d run with `[bridge] direct_join = false`. From site-a:

* **local splice**: site-a -> site-c, both routers on r1;
* **cross-replica, direct join**: site-a -> site-e (held by r2): router E joins at r1 directly
  (its ticket, SNI r1.localhost), r1 splices both routers itself;
* **cross-replica** (over a link): site-a -> site-b, r1 forwards to r2 over a replica link;
* **cross-replica, Forward call**: site-a -> site-d, r1 forwards to r3 over a gRPC Forward call
  (r3 has no link server): the design before the links, side by side.

Measured per path, the paths interleaved round by round (setups too): association setup
(pynetdicom A-ASSOCIATE-RQ to A-ASSOCIATE-AC through both routers, C-ECHO context), and DCMTK
storescu of N generated CT instances, with the CPU seconds of every replica and router (from
/proc) per GB of data set bytes. Then the failover: SIGKILL of the
replica holding site-b, and the time to the first successful C-ECHO from site-a to site-b
(through another replica); the killed replica is restarted and the next kill takes whichever
replica holds site-b then. Router B reconnects after its default first delay (0.25-0.5 s) each
time, as a router does after a session that was up for over a minute. On a 2-core machine the
processes share cores: CPU seconds per GB are the honest figure here, wall-clock throughput is
not a cluster's.

Then (`--rolls`, default 3) rounds of rolling restarts of r1, r2, r3 under continuous C-ECHO and
C-STORE from site-a (benchmarks.cluster_rolling): failed associations (must be 0) and setup
latency while a replica restarts. `--phases rolling` runs only that phase; `--phases profile` times
`--setups` setups per path with every hop of each logged (benchmarks.cluster_setup_profile); `--health http` has
HAProxy check the replicas' `GET /readyz` (503 while draining), `--health grpc` their gRPC health
service, instead of a TCP connect.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from benchmarks.cluster_rolling import rolling_restarts, rolling_table
from benchmarks.cluster_setup_profile import profile, profile_table
from benchmarks.common import CpuMeter, dcmtk, free_port, run, summary, write_results
from relay_common import setup_timing
from relay_demo.datasets import generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.bridge_cluster import HOST, BridgeCluster, start_bridge_cluster
from tests.support.ports import wait_for_port
from tests.support.postgres import PostgresCluster, postgres_bindir

PATHS = {
    "local splice": "SCP_C",
    "cross-replica, direct join": "SCP_E",
    "cross-replica": "SCP_B",
    "cross-replica, Forward call": "SCP_D",
}
CROSS = ("cross-replica, direct join", "cross-replica", "cross-replica, Forward call")


def start_storescp(aet: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [dcmtk("storescp"), "--ignore", "-aet", aet, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if not wait_for_port(port):
        raise RuntimeError(f"storescp {aet} did not listen")
    return process, port


def setup_ms(router_port: int, called: str) -> float:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    start = time.perf_counter()
    assoc = ae.associate(HOST, router_port, ae_title=called)
    elapsed = (time.perf_counter() - start) * 1000
    if not assoc.is_established:
        raise RuntimeError(f"association to {called} not established")
    assoc.release()
    return elapsed


def echo_ok(router_port: int, called: str) -> bool:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate(HOST, router_port, ae_title=called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def compare_paths(
    router_port: int, files: list[Path], dataset_bytes: int, pids: dict[str, int], setups: int, repeats: int
) -> dict[str, dict[str, object]]:
    """Setup time and CPU per GB of both paths, interleaved (local, cross, local, cross...) so that
    both see the same load from whatever else runs on the machine; the CPU ratio is the median of
    the per-round ratios."""
    for called in PATHS.values():
        for _ in range(3):  # warm up: channels, caches, the replica links
            setup_ms(router_port, called)
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(setups):
        for path, called in PATHS.items():
            times[path].append(setup_ms(router_port, called))
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    cpu_runs: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
    for _ in range(repeats):
        for path, called in PATHS.items():
            meter = CpuMeter(pids)
            meter.start()
            start = time.perf_counter()
            run([dcmtk("storescu"), "-aec", called, "-aet", "BENCH", HOST, str(router_port), *map(str, files)])
            seconds[path].append(time.perf_counter() - start)
            cpu_runs[path].append(meter.stop())
    gb = dataset_bytes / 1e9
    results: dict[str, dict[str, object]] = {}
    tiers: dict[str, list[float]] = {}
    for path in PATHS:
        cpu = {name: statistics.median(r[name] for r in cpu_runs[path]) / gb for name in pids}
        tiers[path] = [sum(r[rid] for rid in ("r1", "r2", "r3")) / gb for r in cpu_runs[path]]
        results[path] = {
            "setup_ms": summary(times[path]),
            "store_seconds": summary(seconds[path]),
            "mb_per_s": dataset_bytes / 1e6 / statistics.median(seconds[path]),
            "cpu_s_per_gb": cpu,
            "bridge_tier_cpu_s_per_gb": statistics.median(tiers[path]),
            "bridge_tier_cpu_s_per_gb_runs": tiers[path],
        }
    for path in CROSS:
        rounds = zip(tiers["local splice"], tiers[path], strict=True)
        results[path]["cpu_ratio_per_round"] = [cross / local - 1 for local, cross in rounds]
        # Each round's cross setup against the local one timed just before it: on a loaded machine the
        # median of these paired differences moves less than the difference of the two medians.
        pairs = zip(times["local splice"], times[path], strict=True)
        results[path]["setup_added_paired_ms"] = summary([cross - local for local, cross in pairs])
    return results


def _load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


def holder(cluster: BridgeCluster, site: str) -> str | None:
    return cluster.presence().get(site)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=60, help="CT instances per storescu run (~0.5 MB each)")
    parser.add_argument("--repeats", type=int, default=3, help="storescu runs per path")
    parser.add_argument("--setups", type=int, default=30, help="association setups timed per path")
    parser.add_argument("--kills", type=int, default=20, help="replica kills for the failover distribution")
    parser.add_argument("--rolls", type=int, default=3, help="rounds of rolling restarts (each restarts all three)")
    parser.add_argument(
        "--phases", default="paths,failover,rolling", help="comma-separated: paths, failover, rolling, profile"
    )
    parser.add_argument(
        "--health", choices=("tcp", "grpc", "http"), default="tcp", help="HAProxy's replica health check"
    )
    parser.add_argument("--name", default="cluster", help="results file name (benchmarks/results/DATE-NAME.*)")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    if "profile" in phases:  # every replica and router logs its setup hops (run this phase alone)
        os.environ[setup_timing.ENV] = "1"
    load_before = os.getloadavg()

    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install -y postgresql)")
    work = Path(tempfile.mkdtemp(prefix="relay-bench-cluster-"))
    pg = PostgresCluster(bindir).start()
    scps = {aet: start_storescp(aet) for aet in PATHS.values()}
    cluster = start_bridge_cluster(
        work / "net",
        pg,
        {"a": ["r1", "r3", "r2"], "b": ["r2", "r3", "r1"], "d": ["r3", "r2", "r1"]},
        health=args.health,
        sni=True,
    )
    # r3 forwards over Forward calls only and accepts no replica link: r1 then reaches site-d (held
    # by r3) the way every cross-replica association went before the links, side by side.
    LocalRelayNetwork._stop(cluster.replicas["r3"].process)
    with cluster.replicas["r3"].config.open("a") as config:
        config.write("links = false\n")
    cluster.start_replica("r3")
    results: dict[str, dict[str, object]] = {}
    failovers: list[float] = []
    rolling: dict[str, object] | None = None
    hops: dict[str, dict[str, object]] = {}
    try:
        net, haproxy = cluster.net, cluster.haproxy
        assert haproxy is not None
        net.bridge_port = haproxy.ports["b"]
        net.add_site("site-e", shared=[Shared("SCP_E", HOST, scps["SCP_E"][1], ["site-a"])])
        site_b = net.add_site("site-b", shared=[Shared("SCP_B", HOST, scps["SCP_B"][1], ["site-a"])], start=False)
        site_b.extra_bridge["direct_join"] = False  # its associations go over the link: that path, side by side
        net.write_router_config(site_b)
        # The router's default first delay (reconnect_min_s = 0.5), every time: what a router whose
        # session was up for more than a minute waits. Kills every few seconds would otherwise
        # measure the router's growing backoff, not the cluster.
        config = net.router_config_path("site-b")
        text = config.read_text().replace("reconnect_min_s = 0.2", "reconnect_min_s = 0.5")
        config.write_text(text.replace("reconnect_max_s = 2.0", "reconnect_max_s = 0.5"))
        net.start_router("site-b")
        net.bridge_port = haproxy.ports["d"]
        site_d = net.add_site("site-d", shared=[Shared("SCP_D", HOST, scps["SCP_D"][1], ["site-a"])], start=False)
        site_d.extra_bridge["direct_join"] = False  # over a Forward call, as before the links
        net.write_router_config(site_d)
        net.start_router("site-d")
        net.bridge_port = haproxy.ports["a"]
        net.add_site("site-c", shared=[Shared("SCP_C", HOST, scps["SCP_C"][1], ["site-a"])])
        site_a = net.add_site(
            "site-a",
            remote=[Remote(aet, f"site-{aet[-1].lower()}") for aet in PATHS.values()],
        )
        assert site_a.port
        net.wait_connected(60)
        cluster.wait_presence({"site-a": "r1", "site-b": "r2", "site-c": "r1", "site-d": "r3", "site-e": "r2"})

        files = write_series(generate_ct_series(args.instances, patient_id="RELAY-BENCH-CLUSTER"), work / "ct")
        dataset_bytes = sum(f.stat().st_size for f in files)
        pids = {rid: r.process.pid for rid, r in cluster.replicas.items() if r.process}
        pids |= {name: s.process.pid for name, s in net.sites.items() if s.process}

        if "profile" in phases:
            logs = {rid: r.log for rid, r in cluster.replicas.items()}
            logs |= {f"router {name}": net.workdir / f"router-{name}.log" for name in net.sites}
            hops = profile(site_a.port, PATHS, logs, args.setups)
        if "paths" in phases:
            results = compare_paths(site_a.port, files, dataset_bytes, pids, args.setups, args.repeats)

        for _ in range(args.kills if "failover" in phases else 0):
            victim = holder(cluster, "site-b")
            assert victim is not None and victim != "r1", cluster.presence()
            killed = time.monotonic()
            cluster.kill(victim)
            while not echo_ok(site_a.port, "SCP_B"):
                if time.monotonic() - killed > 60:
                    raise RuntimeError("no C-ECHO succeeded within 60 s of a kill")
                time.sleep(0.05)
            failovers.append(time.monotonic() - killed)
            cluster.start_replica(victim)  # back at the same ports; HAProxy's checks see it up again
            time.sleep(1.0)
        if "rolling" in phases:
            rolling = rolling_restarts(cluster, site_a.port, files, args.rolls)
    finally:
        cluster.stop()
        for process, _ in scps.values():
            process.terminate()
            process.wait(10)
        pg.stop()

    lines = [
        f"# Cluster ({', '.join(sorted(phases))}): {args.instances} CT instances, {dataset_bytes / 1e6:.1f} MB;"
        f" {args.setups} setups and {args.repeats} stores per path; HAProxy {args.health} health checks",
    ]
    payload: dict[str, object] = {"instances": args.instances, "dataset_bytes": dataset_bytes, "health": args.health}
    if results:
        local = results["local splice"]
        lines += [
            "",
            "| path | setup median (ms) | setup p90 (ms) | store MB/s"
            " | r1 s/GB | r2 s/GB | r3 s/GB | bridge tier s/GB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for path, r in results.items():
            cpu = r["cpu_s_per_gb"]
            lines.append(
                f"| {path} | {r['setup_ms']['median']:.1f} | {r['setup_ms']['p90']:.1f} | {r['mb_per_s']:.1f}"  # type: ignore[index]
                f" | {cpu['r1']:.2f} | {cpu['r2']:.2f} | {cpu['r3']:.2f} | {r['bridge_tier_cpu_s_per_gb']:.2f} |"  # type: ignore[index]
            )
        added: dict[str, float] = {}
        ratios: dict[str, float] = {}
        lines.append("")
        for path in CROSS:
            cross = results[path]
            added[path] = cross["setup_ms"]["median"] - local["setup_ms"]["median"]  # type: ignore[index]
            ratios[path] = statistics.median(cross["cpu_ratio_per_round"])  # type: ignore[arg-type]
            rounds = ", ".join(f"{r:+.0%}" for r in cross["cpu_ratio_per_round"])  # type: ignore[attr-defined]
            paired = cross["setup_added_paired_ms"]["median"]  # type: ignore[index]
            lines.append(
                f"- **{path}** (vs the local splice): **{added[path]:+.1f} ms** setup at the median (goal: at most"
                f" +2 ms; median of the paired per-round differences {paired:+.1f} ms), **{ratios[path]:+.0%}** CPU"
                f" per GB at the bridge tier (goal: at most +25%; median of the per-round ratios {rounds})."
            )
        lines += [
            "",
            "The paths run interleaved (setups too), so each round sees the same load from whatever else runs.",
            f"Load (1, 5, 15 min) before: {_load(load_before)}; after: {_load(os.getloadavg())}.",
        ]
        payload |= {
            "paths": results,
            "added_setup_ms": added,
            "bridge_tier_cpu_ratio": ratios,
            "load_before": load_before,
            "load_after": os.getloadavg(),
        }
    if failovers:
        failover = summary(failovers)
        lines += [
            "",
            f"Failover over {len(failovers)} SIGKILLs of the replica holding site-b (kill -> first successful C-ECHO"
            f" through another replica): median **{failover['median']:.2f} s**, p90 {failover['p90']:.2f} s,"
            f" min {failover['min']:.2f} s, max {failover['max']:.2f} s (goal: at most 5 s).",
        ]
        payload |= {"failover_s": failovers, "failover": failover}
    if hops:
        lines += ["", "Where the setup time goes (the `profile` phase: every hop's monotonic time, logged):"]
        lines += profile_table(hops)
        lines.append(f"Load (1, 5, 15 min) before: {_load(load_before)}; after: {_load(os.getloadavg())}.")
        payload |= {"profile": hops, "load_before": load_before, "load_after": os.getloadavg()}
    if rolling is not None:
        lines += rolling_table(rolling)
        payload["rolling"] = rolling
    lines += [
        "",
        "All processes share this machine's cores (routers, three replicas, PostgreSQL, HAProxy, DCMTK):"
        " CPU seconds per GB are the comparable figure; throughput is one machine's, not a cluster's.",
    ]
    table = "\n".join(lines)
    json_path, md_path = write_results(args.name, payload, table)
    print(table)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
