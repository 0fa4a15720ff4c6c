"""Raw DICOM sockets and polling for integration tests: read one PDU, send and read the answer, wait."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

HOST = "127.0.0.1"


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One whole PDU, or b"" if the router closed the connection."""
    sock.settimeout(timeout)
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return header
        header += chunk
    length = int.from_bytes(header[2:6], "big")
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return header + body


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_pdu(sock, timeout)


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition", step: float = 0.05):
    """Poll `predicate` until it returns something truthy; that value, or AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(step)
