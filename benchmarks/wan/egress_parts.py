"""Blob parts over the emulated WAN: a new connection per request (the router before) against kept-alive ones.

    python -m benchmarks.wan.egress_parts --rtt-ms 100 --parts 20 --repeats 3 --name egress-parts-100ms

The lab of the WAN suite (benchmarks/wan/topology.py): site A reaches the hub at half the RTT, through
its shaped uplink and downlink (24 Mbit/s). In the hub, on BLOB_ADDR where the suite runs moto, a part
store that keeps connections alive as S3, GCS and MinIO do (moto's server does not: it answers every
request with `Connection: close`): Python's http.server speaking HTTP/1.1, PUT keeps the body in memory,
GET returns it, and it counts the connections it accepted. In site A, the router's HTTP client
(relay_router.egress) PUTs `--parts` parts of 1 MiB of random bytes (sealed parts do not compress), then
GETs them back, `--parallel` at a time: once with `http_request` (a new connection per request, as the
router did before) and once with one `HttpClient` (kept alive), alternating within each repeat. Reported:
seconds per part for each direction, and connections per run.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.wan.topology import BLOB_ADDR, NS_A, NS_HUB, LinkSpec, WanLab

PORT = 9100
PART = 1024 * 1024
RESULTS = Path(__file__).resolve().parents[1] / "results"


def serve(port: int) -> None:
    """The part store (run inside the hub)."""
    parts: dict[str, bytes] = {}
    counts = {"connections": 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with lock:
                counts["connections"] += 1

        def _send(self, body: bytes, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            parts[self.path] = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(b"")

        def do_GET(self) -> None:
            if self.path == "/connections":
                self._send(str(counts["connections"]).encode())
            elif self.path in parts:
                self._send(parts[self.path])
            else:
                self._send(b"", 404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((BLOB_ADDR, port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


def client(base: str, parts: int, parallel: int, pooled: bool, tag: str) -> dict[str, float]:
    """PUT then GET `parts` parts (run inside site A); seconds of each phase and connections made."""
    from relay_router.egress import HttpClient, ProxySettings, http_request

    proxies = ProxySettings()
    pool = HttpClient(proxies) if pooled else None
    data = os.urandom(PART)

    def request(method: str, url: str, body: bytes | None) -> bytes:
        if pool is not None:
            return pool.request(method, url, body)
        return http_request(method, url, body, proxies=proxies)

    def connections() -> int:
        return int(http_request("GET", f"{base}/connections", None, proxies=proxies))

    before = connections()
    urls = [f"{base}/{tag}/part-{i}" for i in range(parts)]
    with ThreadPoolExecutor(parallel) as workers:
        t0 = time.perf_counter()
        list(workers.map(lambda url: request("PUT", url, data), urls))
        t1 = time.perf_counter()
        back = list(workers.map(lambda url: request("GET", url, None), urls))
        t2 = time.perf_counter()
    assert all(b == data for b in back), "a part came back different"
    made = connections() - before - 1  # the first count's own connection
    if pool is not None:
        pool.close()
    return {"put_s": t1 - t0, "get_s": t2 - t1, "connections": made}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rtt-ms", type=float, default=100.0, help="site A <-> site B; A <-> hub is half of it")
    p.add_argument("--rate-mbit", type=float, default=24.0)
    p.add_argument("--parts", type=int, default=20)
    p.add_argument("--parallel", type=int, default=1, help="requests in flight (the router runs 4 per blob)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="egress-parts")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--pooled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="x", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.client:
        print(json.dumps(client(args.client, args.parts, args.parallel, args.pooled, args.tag)))
        return 0

    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lab = WanLab(LinkSpec(rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms), Path("/tmp/drwan-egress-parts"))
    runs: dict[str, list[dict[str, float]]] = {"new connection per request": [], "kept alive": []}
    with lab:
        server = lab.popen(
            NS_HUB, [sys.executable, "-m", "benchmarks.wan.egress_parts", "--serve", str(PORT)], stdout=subprocess.PIPE
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
            base = f"http://{BLOB_ADDR}:{PORT}"
            for repeat in range(args.repeats):
                order = [False, True] if repeat % 2 == 0 else [True, False]
                for pooled in order:
                    tag = f"r{repeat}{int(pooled)}"
                    cmd = [sys.executable, "-m", "benchmarks.wan.egress_parts", "--client", base, "--parts",
                           str(args.parts), "--parallel", str(args.parallel), "--tag", tag]  # fmt: skip
                    r = lab.run(NS_A, cmd + (["--pooled"] if pooled else []), timeout=600)
                    if r.returncode != 0:
                        raise RuntimeError(r.stderr[-2000:])
                    result = json.loads(r.stdout)
                    key = "kept alive" if pooled else "new connection per request"
                    runs[key].append(result)
                    print(
                        f"  {repeat + 1} {key:<27} " + "  ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True
                    )
        finally:
            server.terminate()
            server.wait(10)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    lines = [
        f"# Blob parts of 1 MiB, site A <-> a keep-alive store in the hub: {args.rate_mbit:g} Mbit/s, "
        f"{args.rtt_ms / 2:g} ms RTT to the hub ({args.rtt_ms:g} ms A <-> B), {args.parallel} in flight, "
        f"{args.parts} parts, median of {args.repeats}",
        "",
        "| client | PUT per part | GET per part | connections per run (PUTs + GETs) |",
        "|---|---:|---:|---:|",
    ]
    for key, values in runs.items():
        put = statistics.median(v["put_s"] for v in values) / args.parts
        get = statistics.median(v["get_s"] for v in values) / args.parts
        conns = statistics.median(v["connections"] for v in values)
        lines.append(f"| {key} | {put * 1000:.0f} ms | {get * 1000:.0f} ms | {conns:.0f} |")
    floor = PART * 8 / (args.rate_mbit * 1e6)
    lines += [
        "",
        f"A part's bytes alone take {floor * 1000:.0f} ms at {args.rate_mbit:g} Mbit/s (without TCP/IP headers).",
        "",
        f"Load (`uptime`) before: {uptime_before}; after: {uptime_after}.",
        "",
        "Command: `python -m benchmarks.wan.egress_parts " + " ".join(argv or sys.argv[1:]) + "`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{time.strftime('%Y-%m-%d')}-{args.name}"
    payload = {"args": vars(args), "runs": runs, "uptime": [uptime_before, uptime_after]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
