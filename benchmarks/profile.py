"""Where a relay process spends its CPU: py-spy samples and per-thread CPU, sorted into cost centres.

`profile_processes` samples running processes with `py-spy record --native --format raw`
(collapsed stacks: one line per distinct stack, frames root first, then the sample count)
while a workload runs, and reads every thread's CPU time from /proc before and after:
py-spy only sees threads that run Python, so the CPU of gRPC's own C++ threads (TLS,
HTTP/2 framing in the EventEngine pollers) shows up only in the thread table.

`breakdown` assigns each sample to the cost centre of its innermost frame that matches
one (see COST_CENTRES), so "AES-GCM" counts the time inside `AESGCM.encrypt` but not the
Python around it. Used by `python -m benchmarks.loopback --profile DIR`; can be re-run on
saved stacks with `python -m benchmarks.profile DIR/*.txt`.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.common import CLOCK_TICKS

# (cost centre, pattern on one frame "function (file:line)" or a native symbol). Innermost match wins;
# order matters only when one frame matches several patterns.
COST_CENTRES: list[tuple[str, re.Pattern[str]]] = [
    ("copies (memcpy/memmove)", re.compile(r"^(__)?(memcpy|memmove|mempcpy)|__memmove_|__memcpy_")),
    (
        "AES-GCM (cryptography)",
        re.compile(r"aesgcm|AESGCM|aes_gcm|gcm_|aes_hw|EVP_(Cipher|Encrypt|Decrypt)|aead\.py|seal\.py"),
    ),
    ("zstd", re.compile(r"zstd|ZSTD|compress\.py")),
    ("TLS (BoringSSL)", re.compile(r"\bSSL_|ssl_|tls_|bssl|BIO_|alts|tsi_")),
    ("protobuf", re.compile(r"upb_|_upb|google/protobuf|SerializeToString|FromString|ParseFromString|message\.py")),
    ("gRPC core (C++)", re.compile(r"grpc_core|grpc_|chttp2|EventEngine|event_engine|absl|gpr_")),
    ("gRPC Python (cygrpc, aio)", re.compile(r"grpc/_cython|cygrpc|grpc/aio|_cython|__pyx_")),
    ("UL framer/connection (relay_router/ul)", re.compile(r"relay_router/ul/")),
    ("asyncio (streams, loop, locks)", re.compile(r"asyncio/|_asyncio|uvloop|selectors\.py|epoll")),
    (
        "relay driver (association, tunnel, splice, server)",
        re.compile(r"relay_router/(association|tunnel|service|pace|spill)\.py|relay_bridge/"),
    ),
    ("logging/metrics", re.compile(r"logging/|prometheus_client|relay_common/")),
    ("syscalls (send, recv, read, write)", re.compile(r"^(__)?(libc_)?(send|recv|read|write|sendmsg|recvmsg)\b")),
]
OTHER = "other (interpreter, unattributed)"
# Innermost frames of a thread that is waiting, not running: left out of the shares. py-spy's
# own idle detection does not work with --native, and gRPC waits on futexes through syscall().
IDLE = re.compile(
    r"^(epoll_wait|epoll_pwait|poll|select|pthread_cond_(timed)?wait|sem_(timed)?wait|__futex|futex|syscall|"
    r"PyThread_acquire_lock_timed|nanosleep|clock_nanosleep) "
)


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy raw output: 'frame;frame;... count' per line, root first."""
    stacks = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def centre_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for name, pattern in COST_CENTRES:
            if pattern.search(frame):
                return name
    return OTHER


def busy(stacks: Iterable[tuple[list[str], int]]) -> list[tuple[list[str], int]]:
    """The samples of threads that were running (or in a syscall that does work, e.g. sendmsg)."""
    return [(frames, n) for frames, n in stacks if frames and not any(IDLE.match(f) for f in frames[-3:])]


def breakdown(stacks: Iterable[tuple[list[str], int]]) -> tuple[dict[str, int], int]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, n in stacks:
        counts[centre_of(frames)] += n
        total += n
    return dict(counts.most_common()), total


def top_python(stacks: Iterable[tuple[list[str], int]], *, inclusive: bool, limit: int = 15) -> list[tuple[str, int]]:
    """Python functions by self (innermost Python frame) or inclusive samples."""
    counts: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        python = [f for f in frames if ".py:" in f]
        if not python:
            continue
        if inclusive:
            for f in set(python):
                counts[f] += n
        else:
            counts[python[-1]] += n
    return counts.most_common(limit)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed: gRPC runs several pollers)."""
    out: collections.Counter[str] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out["main (asyncio)" if task.name == str(pid) else name] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return dict(out)


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    used = {t: after[t] - before.get(t, 0.0) for t in after}
    return {t: v for t, v in used.items() if v > 0.005}


def profile_processes(
    pids: dict[str, int],
    workload: Callable[[], None],
    outdir: Path,
    *,
    seconds: float = 30.0,
    rate: int = 250,
) -> dict[str, object]:
    """Run `workload` repeatedly for `seconds` while py-spy samples every process in `pids`."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise FileNotFoundError("py-spy is not installed (pip install py-spy); it also needs root")
    outdir.mkdir(parents=True, exist_ok=True)
    before = {name: thread_cpu(pid) for name, pid in pids.items()}
    spies = {
        name: subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--native",
                "--rate",
                str(rate),
                "--duration",
                str(max(1, round(seconds))),
                "--format",
                "raw",
                "--output",
                str(outdir / f"{name.replace(' ', '-')}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(outdir / f"{name.replace(' ', '-')}.py-spy.log").open("w"),
        )
        for name, pid in pids.items()
    }
    runs = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        workload()
        runs += 1
    for spy in spies.values():
        spy.wait(timeout=seconds + 60)
    after = {name: thread_cpu(pid) for name, pid in pids.items()}
    threads = {name: _delta(before[name], after[name]) for name in pids}
    result: dict[str, object] = {"workload_runs": runs, "seconds": seconds, "rate": rate, "threads": threads}
    per_process = {}
    for name in pids:
        path = outdir / f"{name.replace(' ', '-')}.txt"
        stacks = busy(parse_collapsed(path.read_text())) if path.exists() else []
        centres, total = breakdown(stacks)
        per_process[name] = {
            "samples": total,
            "centres": centres,
            "top_self": top_python(stacks, inclusive=False),
            "top_inclusive": top_python(stacks, inclusive=True),
        }
    result["processes"] = per_process
    result["table"] = render(per_process, threads)
    (outdir / "breakdown.md").write_text(str(result["table"]) + "\n")
    return result


def perf_processes(
    pids: dict[str, int], workload: Callable[[], None], outdir: Path, *, seconds: float = 10.0
) -> dict[str, str]:
    """On-CPU samples of every thread (gRPC's C++ threads and the kernel included) with `perf record`.

    Python 3.11 frames show up as the interpreter; the split by shared object and symbol
    (kernel TCP copies, libc memmove, cygrpc with BoringSSL inside, the cryptography wheel,
    upb) is what py-spy cannot see. Returns each process's `perf report` by object and symbol.
    """
    perf = shutil.which("perf")
    if perf is None:
        raise FileNotFoundError("perf is not installed (apt-get install linux-perf)")
    outdir.mkdir(parents=True, exist_ok=True)
    recorders = {
        name: subprocess.Popen(
            [perf, "record", "-F", "999", "-g", "-p", str(pid), "-o", str(outdir / f"{_slug(name)}.perf.data")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    }
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        workload()
    for recorder in recorders.values():
        recorder.send_signal(2)  # SIGINT: perf writes its file and exits
        recorder.wait(timeout=60)
    reports = {}
    for name in pids:
        data = outdir / f"{_slug(name)}.perf.data"
        by_dso = _perf_report(perf, data, "dso", 12)
        by_symbol = _perf_report(perf, data, "dso,sym", 30)
        reports[name] = (
            f"### {name} (perf, all threads)\n\nBy object:\n```\n{by_dso}\n```\n\nBy symbol:\n```\n{by_symbol}\n```\n"
        )
        (outdir / f"{_slug(name)}.perf.txt").write_text(reports[name])
    return reports


def _perf_report(perf: str, data: Path, sort: str, lines: int) -> str:
    result = subprocess.run(
        [perf, "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio", "-g", "none"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [r for r in result.stdout.splitlines() if r.strip() and not r.startswith("#")]
    return "\n".join(rows[:lines])


def _slug(name: str) -> str:
    return name.replace(" ", "-")


def render(per_process: dict[str, dict[str, object]], threads: dict[str, dict[str, float]] | None = None) -> str:
    lines = ["## py-spy breakdown (share of busy samples of Python threads, innermost matching frame)", ""]
    for name, data in per_process.items():
        total = int(data["samples"]) or 1  # type: ignore[call-overload]
        lines += [f"### {name}: {data['samples']} samples", ""]
        if threads and threads.get(name):
            cpu = threads[name]
            lines.append(
                "CPU by thread (s): " + ", ".join(f"{t} {v:.2f}" for t, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
            )
            lines.append("")
        lines += ["| cost centre | share |", "|---|---:|"]
        lines += [f"| {c} | {n / total:.1%} |" for c, n in data["centres"].items()]  # type: ignore[attr-defined]
        lines += ["", "Top Python functions (self):", ""]
        lines += [f"- {n / total:.1%} {f}" for f, n in data["top_self"]]  # type: ignore[attr-defined]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cost centres of saved py-spy raw (collapsed) profiles.")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    per_process = {}
    for path in args.files:
        stacks = busy(parse_collapsed(path.read_text()))
        centres, total = breakdown(stacks)
        per_process[path.stem] = {
            "samples": total,
            "centres": centres,
            "top_self": top_python(stacks, inclusive=False),
            "top_inclusive": top_python(stacks, inclusive=True),
        }
    print(render(per_process))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
