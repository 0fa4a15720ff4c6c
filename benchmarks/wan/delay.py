"""Packet-level delay stage for the WAN emulation (this kernel has no netem).

Runs inside the hub namespace. The hub policy-routes every packet that arrives
from a site's veth into that site's TUN device; this program reads each packet,
holds it in a FIFO for the one-way delay and writes it back into the same TUN,
and the kernel routes it on (to the other site, or to a process in the hub).
No TCP is terminated here: every packet of every protocol (TCP, UDP of the VPN,
ICMP) is delayed alike, so congestion control sees a real RTT.

    python delay.py --delay-ms 20 --stats FILE tunA tunB

Every TUN gets the same delay; one FIFO per TUN keeps packet order. Stats
(packets, bytes, write errors, maximum queue, lateness of releases, with counts
of packets released more than 1, 5 and 20 ms late) are written to FILE as JSON
every 2 s, on SIGUSR1 (at once) and on SIGTERM/SIGINT.

The program asks for SCHED_FIFO (it is "the network": other work on the
machine must not delay packets); it sleeps in select() whenever no packet is
due, so it never spins. Without that right it falls back to nice -15.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    """Attach to an existing (persistent) TUN device created with `ip tuntap add mode tun`."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to every packet")
    parser.add_argument("--stats", help="write counters here (JSON)")
    parser.add_argument("--ready", help="touch this file once all TUNs are attached")
    parser.add_argument("--max-seconds", type=float, default=4 * 3600, help="exit after this long (safety bound)")
    parser.add_argument("tun", nargs="+")
    args = parser.parse_args(argv)

    # Packets must not wait behind other processes for a CPU: this is "the network".
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        scheduling = "SCHED_FIFO 10"
    except (OSError, AttributeError):
        try:
            os.nice(-15)
            scheduling = "nice -15"
        except OSError:
            scheduling = "default"
    delay = args.delay_ms / 1000.0
    fds = {open_tun(name): name for name in args.tun}
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {fd: collections.deque() for fd in fds}
    stats = {
        name: {
            "packets": 0,
            "bytes": 0,
            "write_errors": 0,
            "max_queue": 0,
            "max_late_ms": 0.0,
            "late_sum_ms": 0.0,
            "late_over_1ms": 0,
            "late_over_5ms": 0,
            "late_over_20ms": 0,
        }
        for name in fds.values()
    }
    stopping = False
    dump_now = False
    dumps = 0

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    def request_dump(*_: object) -> None:
        nonlocal dump_now
        dump_now = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, request_dump)

    def dump() -> None:
        nonlocal dumps
        dumps += 1
        if args.stats:
            tmp = args.stats + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"delay_ms": args.delay_ms, "scheduling": scheduling, "dumps": dumps, "tuns": stats}, fh)
            os.replace(tmp, args.stats)

    if args.ready:
        open(args.ready, "w").close()
    started = last_dump = time.monotonic()
    readers = list(fds)
    while not stopping:
        now = time.monotonic()
        next_due = None
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                due, packet = queue.popleft()
                try:
                    os.write(fd, packet)
                except OSError:
                    stats[fds[fd]]["write_errors"] += 1
                    continue
                s = stats[fds[fd]]
                late = (now - due) * 1000.0
                s["late_sum_ms"] += late
                if late > 1.0:
                    s["late_over_1ms"] += 1
                    if late > 5.0:
                        s["late_over_5ms"] += 1
                        if late > 20.0:
                            s["late_over_20ms"] += 1
                if late > s["max_late_ms"]:
                    s["max_late_ms"] = late
            if queue and (next_due is None or queue[0][0] < next_due):
                next_due = queue[0][0]
        if dump_now or now - last_dump > 2.0:
            dump_now = False
            dump()
            last_dump = now
            if now - started > args.max_seconds:
                break
        timeout = 0.1 if next_due is None else min(0.1, max(0.0, next_due - time.monotonic()))
        try:
            ready, _, _ = select.select(readers, [], [], timeout)
        except InterruptedError:
            continue
        arrived = time.monotonic()
        for fd in ready:
            queue = queues[fd]
            s = stats[fds[fd]]
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                queue.append((arrived + delay, packet))
                s["packets"] += 1
                s["bytes"] += len(packet)
            if len(queue) > s["max_queue"]:
                s["max_queue"] = len(queue)
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
