"""Small measuring tools run inside the namespaces (one process each, bounded in time).

    probe.py ping  --to ADDR [--count N] [--interval S]     ICMP echo round trips (raw socket, root)
    probe.py sink  --listen ADDR:PORT --seconds S           receive one TCP connection, report goodput
    probe.py send  --to ADDR:PORT --seconds S               send zeros for S seconds
    probe.py echo  --to ADDR:PORT --aec TITLE [--count N]   DICOM association + C-ECHO + release, timed
    probe.py find  --to ADDR:PORT --aec TITLE [--count N]   association + study-level C-FIND + release, timed
    probe.py http  --method M --url URL [--data S]          one HTTP(S) request (REST of Orthanc, moto), timed

Each prints one JSON object on stdout. Only the standard library, except
`echo` and `find`, which use pynetdicom.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import time


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(to: str, count: int, interval: float, timeout: float = 2.0) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    rtts: list[float] = []
    lost = 0
    for seq in range(count):
        payload = struct.pack("!d", time.perf_counter()) + b"drwan" * 8
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
        sent = time.perf_counter()
        sock.sendto(packet, (to, 0))
        deadline = sent + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                lost += 1
                break
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(2048)
            except TimeoutError:
                lost += 1
                break
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == 0 and rid == ident and rseq == seq:
                rtts.append((time.perf_counter() - sent) * 1000.0)
                break
        time.sleep(interval)
    return {
        "to": to,
        "sent": count,
        "lost": lost,
        "rtt_ms": {
            "median": statistics.median(rtts) if rtts else None,
            "min": min(rtts, default=None),
            "max": max(rtts, default=None),
            "mean": statistics.fmean(rtts) if rtts else None,
        },
    }


def sink(listen: str, seconds: float) -> dict[str, object]:
    host, port = listen.rsplit(":", 1)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
    server.listen(1)
    server.settimeout(seconds + 30)
    conn, _ = server.accept()
    conn.settimeout(seconds + 30)
    cc = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
    total = 0
    first = last = None
    marks: list[tuple[float, int]] = []
    while True:
        data = conn.recv(1 << 20)
        now = time.perf_counter()
        if not data:
            break
        if first is None:
            first = now
        total += len(data)
        last = now
        marks.append((now, total))
    conn.close()
    server.close()
    if first is None or last is None or last <= first:
        return {"bytes": total, "mbit_s": None}
    # Steady state: the second half of the transfer, past slow start.
    mid = first + (last - first) / 2
    mid_bytes = next(b for t, b in marks if t >= mid)
    return {
        "bytes": total,
        "seconds": last - first,
        "mbit_s": total * 8 / (last - first) / 1e6,
        "steady_mbit_s": (total - mid_bytes) * 8 / (last - mid) / 1e6 if last > mid else None,
        "congestion_control": cc,
    }


def send(to: str, seconds: float) -> dict[str, object]:
    host, port = to.rsplit(":", 1)
    deadline = time.monotonic() + 10
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    chunk = b"\0" * 65536
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent += sock.send(chunk)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the receiver to close: everything was delivered
    sock.close()
    return {"bytes": sent}


def _nodelay() -> None:
    """TCP_NODELAY on pynetdicom's sockets, like every DICOM process of the suite (DCMTK and Orthanc get
    TCP_NODELAY=1). Without it a C-FIND request (command and identifier: two PDUs, two writes) waits for the
    peer's delayed ACK of the first before the second leaves: ~80 ms more per query across the WAN."""
    from pynetdicom.transport import AssociationSocket

    create = AssociationSocket._create_socket

    def create_nodelay(self: AssociationSocket, address: object) -> socket.socket:
        sock = create(self, address)  # type: ignore[arg-type]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    AssociationSocket._create_socket = create_nodelay  # type: ignore[method-assign]


def echo(to: str, called: str, count: int, interval: float) -> dict[str, object]:
    from pynetdicom import AE

    _nodelay()
    host, port = to.rsplit(":", 1)
    ae = AE(ae_title="BENCH_SCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        assoc = ae.associate(host, int(port), ae_title=called)
        t1 = time.perf_counter()
        if not assoc.is_established:
            raise RuntimeError(f"association to {called} at {to} failed")
        status = assoc.send_c_echo()
        t2 = time.perf_counter()
        if status is None or status.Status != 0:
            raise RuntimeError(f"C-ECHO to {called} at {to} failed")
        assoc.release()
        t3 = time.perf_counter()
        samples.append({"associate_s": t1 - t0, "echo_s": t2 - t1, "release_s": t3 - t2, "total_s": t3 - t0})
        time.sleep(interval)
    return {"samples": samples}


def find(to: str, called: str, count: int, interval: float) -> dict[str, object]:
    """Study-level C-FIND (Study Root) for every study (no matching keys), timed like `echo`."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    _nodelay()
    host, port = to.rsplit(":", 1)
    ae = AE(ae_title="BENCH_SCU")
    ae.add_requested_context(FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyDescription",
                    "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"):  # fmt: skip
        setattr(query, keyword, "")
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        assoc = ae.associate(host, int(port), ae_title=called)
        t1 = time.perf_counter()
        if not assoc.is_established:
            raise RuntimeError(f"association to {called} at {to} failed")
        matches, final = 0, None
        for status, identifier in assoc.send_c_find(query, FIND):
            if status is None:
                break
            if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                matches += 1
            else:
                final = status.Status
        t2 = time.perf_counter()
        if final != 0:
            assoc.abort()
            raise RuntimeError(f"C-FIND to {called} at {to} ended with status {final}")
        assoc.release()
        t3 = time.perf_counter()
        samples.append(
            {"associate_s": t1 - t0, "find_s": t2 - t1, "release_s": t3 - t2, "total_s": t3 - t0, "matches": matches}
        )
        time.sleep(interval)
    return {"samples": samples}


def http(
    method: str, url: str, data: str | None, content_type: str, cafile: str | None, timeout: float, retry_s: float
) -> dict[str, object]:
    """One request; an HTTP error status is a result, not a failure. Connection errors are retried for retry_s."""
    import ssl
    import urllib.error
    import urllib.request

    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)))
    opener = urllib.request.build_opener(*handlers)
    body = data.encode() if data is not None else None
    deadline = time.monotonic() + retry_s
    while True:
        request = urllib.request.Request(url, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        t0 = time.perf_counter()
        try:
            with opener.open(request, timeout=timeout) as rsp:
                raw, status = rsp.read(), rsp.status
            break
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
            break
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    seconds = time.perf_counter() - t0
    return {"status": status, "seconds": seconds, "bytes": len(raw), "body": raw.decode(errors="replace")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ping")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.05)
    p = sub.add_parser("sink")
    p.add_argument("--listen", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p = sub.add_parser("send")
    p.add_argument("--to", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p = sub.add_parser("echo")
    p.add_argument("--to", required=True)
    p.add_argument("--aec", required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.05)
    p = sub.add_parser("find")
    p.add_argument("--to", required=True)
    p.add_argument("--aec", required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.05)
    p = sub.add_parser("http")
    p.add_argument("--method", default="GET")
    p.add_argument("--url", required=True)
    p.add_argument("--data")
    p.add_argument("--content-type", default="application/json")
    p.add_argument("--cafile")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--retry-s", type=float, default=0.0, help="retry connection errors for this long")
    args = parser.parse_args(argv)
    if args.cmd == "ping":
        result = ping(args.to, args.count, args.interval)
    elif args.cmd == "sink":
        result = sink(args.listen, args.seconds)
    elif args.cmd == "send":
        result = send(args.to, args.seconds)
    elif args.cmd == "find":
        result = find(args.to, args.aec, args.count, args.interval)
    elif args.cmd == "http":
        result = http(args.method, args.url, args.data, args.content_type, args.cafile, args.timeout, args.retry_s)
    else:
        result = echo(args.to, args.aec, args.count, args.interval)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
