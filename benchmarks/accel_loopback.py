"""An accelerated route end to end on 127.0.0.1, with real processes: the CPU each one spends per C-STORE.

DCMTK storescu -> router A (accepts the association itself, spools, answers) -> bridge -> router B
(spools again, delivers over `[accelerate] associations` parallel associations) -> DCMTK storescp
(``--fork``). No WAN emulation: what is left is the CPU of each process per instance, which is what
limits the WAN suite's small objects on the shared 2-core VM (all processes share its cores there too).

Measured per run of `--count` instances (one storescu association):

* **sender**: storescu's wall time (its completion; router A answers from its spool);
* **end to end**: storescu's start to the last file in storescp's directory (polled every 5 ms);
* **CPU**: user + system seconds of router A, the bridge and router B (all threads, from /proc), per
  instance; CPU time hardly changes when other tenants load the machine, unlike wall time.

``--baseline DIR`` runs a second network from another source tree (e.g. ``git archive main``), side by
side: both are up at once, and the runs alternate within each repeat, so load hits them alike.
``--baseline-associations N`` gives the baseline's router B another ``[accelerate] associations`` (with
``--baseline .``: the same code, two association counts side by side).
``--workload crdx`` sends ``--count`` (default 4) radiographs of 19 MB instead of the small objects: each
is above the spill threshold, so it travels as a streamed blob through the bridge's own store (parts PUT and
GET through its blob RPCs) rather than in buckets.
``--profile DIR`` samples router A and router B with py-spy (``--nonblocking``, if installed) during one
more run of this tree and writes their collapsed stacks and a top list of Python functions.

    python -m benchmarks.accel_loopback --count 200 --repeats 3 --baseline /tmp/accel-main
    python -m benchmarks.accel_loopback --workload crdx --repeats 3 --baseline /tmp/accel-main
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

from benchmarks.common import DCMTK_ENV, CpuMeter, dcmtk, free_port, run, write_results
from relay_demo.datasets import generate_ct_series, generate_dx_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared


class Variant:
    """One relay network (bridge, router A, router B) running the code of one source tree."""

    def __init__(self, name: str, work: Path, scp_port: int, source: Path | None, associations: int = 4) -> None:
        self.name = name
        # `python -m` puts the working directory first on sys.path, before PYTHONPATH: main() leaves any source
        # tree (see there), and each variant names its own.
        env = {"PYTHONPATH": str(source or Path(__file__).resolve().parents[1])}
        self.net = LocalRelayNetwork(work / name, env=env).start()
        self.net.add_site(
            "site-b",
            shared=[Shared("STORE", "127.0.0.1", scp_port, ["site-a"], accelerate=True)],
            accelerate={"associations": associations},
        )
        self.net.add_site(
            "site-a",
            remote=[Remote("STORE_B", "site-b", "STORE", accelerate=True)],
            accelerate={"associations": associations},
        )
        self.net.wait_connected()
        port = self.net.sites["site-a"].port
        assert port is not None and self.net.bridge is not None
        self.port = port
        self.pids = {
            "router A": self.net.sites["site-a"].process.pid,  # type: ignore[union-attr]
            "bridge": self.net.bridge.pid,
            "router B": self.net.sites["site-b"].process.pid,  # type: ignore[union-attr]
        }

    def accel_status(self) -> dict[str, object]:
        status = self.net.status("site-a").get("accelerate")
        return status if isinstance(status, dict) else {}

    def drained(self) -> bool:
        """Both spools empty (router A has every outcome, router B removed what it delivered)."""
        for site in ("site-a", "site-b"):
            status = self.net.status(site).get("accelerate")
            if not isinstance(status, dict):
                return False
            entries = status.get("spool_entries", {})
            if not isinstance(entries, dict) or any(entries.values()):
                return False
        return True

    def wait_accelerated(self, files: list[Path], received: Path) -> None:
        """The route stays transparent until router A learned the destination's capabilities: warm it up."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run(
                [
                    dcmtk("storescu"),
                    "-aet",
                    "BENCH_SCU",
                    "-aec",
                    "STORE_B",
                    "127.0.0.1",
                    str(self.port),
                    *map(str, files[:2]),
                ]
            )
            routes = self.accel_status().get("routes", {})
            if isinstance(routes, dict) and routes.get("STORE_B", {}).get("capabilities_known"):
                wait_until(self.drained, 60, f"{self.name}: spools drained after the warm-up")
                clear(received)
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: the accelerated route never learned the destination's capabilities")


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f} s: {what}")


def clear(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()


def runqueue_wait(pid: int) -> float:
    """Seconds the process's live threads have waited for a CPU on a run queue (/proc/PID/task/*/schedstat):
    what other work on the machine costs a process beyond its own CPU time."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


def one_run(variant: Variant, files: list[Path], received: Path) -> dict[str, float]:
    clear(received)
    meter = CpuMeter(variant.pids)
    waited = runqueue_wait(variant.pids["router A"])
    meter.start()
    started = time.perf_counter()
    scu = subprocess.Popen(
        [dcmtk("storescu"), "-aet", "BENCH_SCU", "-aec", "STORE_B", "127.0.0.1", str(variant.port), *map(str, files)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sender = end_to_end = 0.0
    deadline = started + 300
    while time.perf_counter() < deadline:
        now = time.perf_counter()
        if not sender and scu.poll() is not None:
            sender = now - started
            if scu.returncode != 0:
                raise RuntimeError(f"storescu failed: {scu.stderr.read()[-500:] if scu.stderr else ''}")
        if sum(1 for _ in received.iterdir()) >= len(files):
            end_to_end = now - started
            if sender:
                break
        time.sleep(0.005)
    if not end_to_end or not sender:
        raise RuntimeError(f"{variant.name}: not all {len(files)} instances arrived")
    wait_until(variant.drained, 120, f"{variant.name}: spools drained")
    cpu = meter.stop()
    waited = runqueue_wait(variant.pids["router A"]) - waited
    return {
        "sender_s": sender,
        "end_to_end_s": end_to_end,
        **{f"cpu {k}": v for k, v in cpu.items()},
        "router A waited for a CPU": waited,
    }


def profile_run(variant: Variant, files: list[Path], received: Path, outdir: Path) -> str:
    """py-spy (non-blocking) on router A and router B during one run; the top Python functions of each."""
    from benchmarks.profile import busy, parse_collapsed, top_python

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    outdir.mkdir(parents=True, exist_ok=True)
    spies = {
        name: subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(variant.pids[name]),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--threads",
                "--output",
                str(outdir / f"{name.replace(' ', '-')}.txt"),
                "--duration",
                "600",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name in ("router A", "router B")
    }
    time.sleep(1.0)
    try:
        one_run(variant, files, received)
    finally:
        for proc in spies.values():
            proc.send_signal(2)  # SIGINT: py-spy writes what it has
        for proc in spies.values():
            proc.wait(30)
    lines = []
    for name in spies:
        stacks = busy(parse_collapsed((outdir / f"{name.replace(' ', '-')}.txt").read_text()))
        total = sum(n for _, n in stacks) or 1
        lines += [f"## {name}: {total} busy samples", "", "| inclusive | function |", "|---:|---|"]
        lines += [f"| {n / total:.1%} | `{f}` |" for f, n in top_python(stacks, inclusive=True, limit=45)]
        lines += ["", "| self | function |", "|---:|---|"]
        lines += [f"| {n / total:.1%} | `{f}` |" for f, n in top_python(stacks, inclusive=False, limit=25)]
        lines.append("")
    (outdir / "top.md").write_text("\n".join(lines))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workload",
        choices=("small", "crdx"),
        default="small",
        help="small: 160x160 CT slices (52 KB, bucketed); crdx: 3400x2800 DX radiographs (19 MB, streamed blobs)",
    )
    parser.add_argument("--count", type=int, help="instances per run (default 200 small, 4 crdx)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="source tree of the code to compare with (git archive)")
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of this tree's routers")
    parser.add_argument("--associations", type=int, default=4, help="[accelerate] associations of router B")
    parser.add_argument(
        "--baseline-associations",
        type=int,
        help="[accelerate] associations of the baseline's router B (default: --associations); with --baseline set "
        "to this tree, compares association counts side by side",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="processes that spin on a CPU during the runs (other tenants of a shared machine, made on purpose)",
    )
    parser.add_argument("--name", default="accel-loopback", help="result file name (without the date)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.count is None:
        args.count = 4 if args.workload == "crdx" else 200

    work = Path(tempfile.mkdtemp(prefix="bench-accel-loop-"))
    os.chdir(work)  # the processes inherit it: no source tree in the working directory (see Variant)
    received = Path(tempfile.mkdtemp(prefix="bench-accel-rx-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    storescp = None
    variants: list[Variant] = []
    spinners: list[subprocess.Popen[bytes]] = []  # --busy
    try:
        if args.workload == "crdx":
            files = write_series(generate_dx_series(args.count, seed=7), work / "crdx")
        else:
            files = write_series(generate_ct_series(args.count, rows=160, cols=160, seed=7), work / "small")
        scp_port = free_port()
        storescp = subprocess.Popen(
            [
                dcmtk("storescp"),
                "--fork",
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
        differ = args.baseline_associations not in (None, args.associations)
        this_name = f"this tree, {args.associations} assoc" if differ else "this tree"
        variants.append(Variant(this_name, work, scp_port, None, args.associations))
        if args.baseline is not None:
            baseline_associations = args.baseline_associations or args.associations
            base_name = f"baseline, {baseline_associations} assoc" if differ else "baseline"
            variants.append(Variant(base_name, work, scp_port, args.baseline.resolve(), baseline_associations))
        for variant in variants:
            variant.wait_accelerated(files, received)
        spinners.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy))
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
        for repeat in range(args.repeats):
            order = variants if repeat % 2 == 0 else variants[::-1]
            for variant in order:
                result = one_run(variant, files, received)
                result["load"] = float(Path("/proc/loadavg").read_text().split()[0])
                runs[variant.name].append(result)
                print(
                    f"  {repeat + 1} {variant.name:<10} " + "  ".join(f"{k} {v:.2f}" for k, v in result.items()),
                    flush=True,
                )
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        profile = profile_run(variants[0], files, received, args.profile) if args.profile else ""

        def med(name: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[name])

        keys = ["sender_s", "end_to_end_s", "cpu router A", "cpu bridge", "cpu router B"]
        table = [
            f"# Accelerated route on 127.0.0.1: {args.count} x {files[0].stat().st_size // 1000} KB, "
            f"median of {args.repeats}" + (f", {args.busy} spinning processes beside" if args.busy else ""),
            "",
            f"Load average {' '.join(load_before)} before, {' '.join(load_after)} after.",
            "",
            "| code | sender | end to end | router A CPU per C-STORE | bridge | router B | min-max sender "
            "| router A waited for a CPU, per C-STORE |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in variants:
            senders = [r["sender_s"] for r in runs[v.name]]
            table.append(
                f"| {v.name} | {med(v.name, 'sender_s'):.2f} s | {med(v.name, 'end_to_end_s'):.2f} s | "
                + " | ".join(f"{med(v.name, k) / args.count * 1000:.2f} ms" for k in keys[2:])
                + f" | {min(senders):.2f}-{max(senders):.2f} s"
                + f" | {med(v.name, 'router A waited for a CPU') / args.count * 1000:.2f} ms |"
            )
        text = "\n".join(table)
        print(text)
        if profile:
            print(profile)
        if not args.no_write:
            payload = {
                "count": args.count,
                "runs": runs,
                "load_before": load_before,
                "load_after": load_after,
                "baseline": str(args.baseline) if args.baseline else None,
                "command": "python -m benchmarks.accel_loopback " + " ".join(argv or sys.argv[1:]),
            }
            json_path, md_path = write_results(args.name, payload, text + ("\n\n" + profile if profile else ""))
            print(f"wrote {json_path} and {md_path}")
        return 0
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        for variant in variants:
            variant.net.stop()
        if storescp is not None:
            storescp.terminate()
            storescp.wait()
        shutil.rmtree(received, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
