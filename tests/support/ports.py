"""TCP ports on the loopback interface for servers that tests start.

Tests never use fixed ports: several test sessions, the pytest-xdist workers of one session, and
the routers, bridge and archives inside one test all run side by side on the same machine.

`free_port()` does not ask the kernel for an ephemeral port (bind to port 0) any more: such a
port lies in the kernel's ephemeral range (``net.ipv4.ip_local_port_range``), so between the
moment the test learns it and the moment Orthanc or storescp binds it, any outgoing connection on
the machine may take it as its source port, and another xdist worker asking the kernel the same
question may be handed the same port again. Instead each worker takes ports from its own slice of
the range *below* the ephemeral range, in turn from a random starting point (so that two test
sessions on one machine rarely meet), and keeps only ports that it can bind right now. No port is
given twice by one process until its slice wraps around (thousands of ports later).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

__all__ = ["free_port", "port_slice", "wait_for_port"]

# Below 10000 live well-known services (PostgreSQL 5432, Orthanc 8042/4242...).
LOWEST_PORT = 10000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def port_slice(worker: str | None = None, workers: str | None = None) -> range:
    """The ports this process hands out: its xdist worker's share of [LOWEST_PORT, ephemeral low).

    ``worker``/``workers`` default to pytest-xdist's PYTEST_XDIST_WORKER ("gw2") and
    PYTEST_XDIST_WORKER_COUNT; a serial run gets the whole range.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "") if worker is None else worker
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "") if workers is None else workers
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    count = int(workers) if workers.isdigit() and int(workers) > 0 else 1
    top = _ephemeral_low()
    if top - LOWEST_PORT < 100 * count:  # an unusual kernel setting: too few ports below the ephemeral range
        raise RuntimeError(f"ip_local_port_range starts at {top}: too few ports below it for {count} workers")
    size = (top - LOWEST_PORT) // count
    start = LOWEST_PORT + (index % count) * size
    return range(start, start + size)


class _PortCursor:
    """Walks this process's slice from a random point; thread-safe (fixtures start servers in threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ports: range | None = None
        self._next = 0

    def take(self) -> int:
        with self._lock:
            if self._ports is None:
                self._ports = port_slice()
                self._next = random.SystemRandom().randrange(len(self._ports))  # not the seedable global
            ports = self._ports
            for _ in range(len(ports)):
                port = ports[self._next]
                self._next = (self._next + 1) % len(ports)
                if _bindable(port):
                    return port
        raise RuntimeError(f"no free TCP port on 127.0.0.1 in {ports.start}-{ports.stop - 1}")


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: a port still in TIME_WAIT is skipped too, as a server without it would fail.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_cursor = _PortCursor()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to, for a server the test is about to start.

    Returned ports are free at the time of the call, outside the kernel's ephemeral range and unique
    to this xdist worker. A test may also use one as "a port nothing listens on". A third party
    (another test session) can still bind it first; servers started on it must fail loudly (they do:
    the readiness checks time out with the server's log).
    """
    return _cursor.take()


def wait_for_port(
    port: int, *, host: str = "127.0.0.1", timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> bool:
    """Poll until something accepts TCP connections on ``host:port``; False on timeout, or at once when
    ``process`` (the server being waited for) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False
