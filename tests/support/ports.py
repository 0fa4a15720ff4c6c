"""Ephemeral TCP ports on the loopback interface.

Tests never use fixed ports: several test sessions (and the routers, bridge and
archives inside one session) run side by side on the same machine.
"""

from __future__ import annotations

import socket
import time

__all__ = ["free_port", "wait_for_port"]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago.

    The kernel picks it (bind to port 0), then the socket is closed so that a
    child process (Orthanc, storescp) can bind it. There is a small race with
    other processes picking ports at the same time; callers that start a server
    on it should fail loudly (they do: the readiness checks time out).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, host: str = "127.0.0.1", timeout: float = 10.0) -> bool:
    """Poll until something accepts TCP connections on ``host:port``; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False
