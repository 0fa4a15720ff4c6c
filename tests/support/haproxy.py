"""HAProxy (Debian `haproxy`) as the TCP load balancer in front of bridge replicas, for tests.

One frontend per entry in `frontends`: a listening port and the backend servers in order of
preference (the first is active, the others are backups used only while it is down). Health
checks are plain TCP connects every 250 ms, so a killed replica is out of rotation within a
fraction of a second; `option redispatch 1` sends a connection that fails to another server
at its first retry.

Two checks see a draining replica (it keeps its running associations, takes no new ones):
- `readiness_ports` (server -> the replica's `[metrics] listen` port): an HTTP check of `GET /readyz`,
  which answers 503 from the first moment of a drain (`http_readiness_check`; what
  docs/high-availability.md recommends);
- `grpc_health_ca` (the bridge's CA file): a `tcp-check` that asks the replicas' gRPC health service
  over TLS on their router-facing port (`grpc_health_check`), failing at once on NOT_SERVING; with
  `check_crt` it presents that client certificate (replicas with `require_client_cert`).

`sni_routes` (opt-in; TLS server name -> server): every frontend also routes a connection whose TLS
ClientHello names one of these to that server alone (`req.ssl_sni`), the direct join of
docs/high-availability.md; any other name goes to the frontend's backend as before.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from relay_demo.network import LocalRelayNetwork
from tests.support.ports import free_port, wait_for_port


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name (RFC 7541 6.2.2), no Huffman coding."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def grpc_health_request(authority: str) -> bytes:
    """One HTTP/2 connection's bytes for `grpc.health.v1.Health/Check` with an empty request (service "").

    HAProxy 2.6's `http-check send` cannot send a body with NUL bytes (a gRPC message is framed by a
    5-byte prefix), so the check is a `tcp-check` over TLS with ALPN h2 that sends these bytes.
    """
    headers = b"\x83\x87"  # :method POST, :scheme https (HPACK static table, indexed)
    headers += _literal(b":path", b"/grpc.health.v1.Health/Check") + _literal(b":authority", authority.encode())
    headers += _literal(b"content-type", b"application/grpc") + _literal(b"te", b"trailers")
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + _frame(0x4, 0, 0, b"")  # SETTINGS (defaults)
        + _frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + _frame(0x0, 0x1, 1, b"\x00\x00\x00\x00\x00")  # DATA, END_STREAM: an empty HealthCheckRequest
    )


# The answer's gRPC message for SERVING: uncompressed, 2 bytes, field 1 (status) = 1. NOT_SERVING is 08 02.
GRPC_SERVING = "00000000020801"
GRPC_ANY_STATUS = "0000000002080[0-3]"  # UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN


def grpc_health_check(ca_file: Path, server_name: str, client_crt: Path | None = None) -> list[str]:
    """HAProxy backend lines: a server counts as up only while its gRPC health service says SERVING.
    `client_crt` (certificate and key in one PEM file): presented to replicas with `require_client_cert`."""
    crt = "" if client_crt is None else f" crt {client_crt}"
    return [
        "    option tcp-check",
        # The name goes on the server line (check-sni, verifyhost): with `sni` on the connect rule instead,
        # HAProxy 2.6 checks the certificate against another name and every check fails.
        "    tcp-check connect ssl alpn h2",
        f"    tcp-check send-binary {grpc_health_request(server_name).hex()}",
        # Two rules, so that NOT_SERVING fails the check the moment it arrives: the first waits until an
        # answer with any status is in; the second (min-recv 0) then judges those bytes without waiting
        # for more. A single `expect binary SERVING` would wait for `timeout check` on NOT_SERVING.
        f"    tcp-check expect rbinary {GRPC_ANY_STATUS}",
        f"    tcp-check expect min-recv 0 binary {GRPC_SERVING}",
        f"    default-server ca-file {ca_file} verify required verifyhost {server_name} check-sni {server_name}{crt}",
    ]


def http_readiness_check() -> list[str]:
    """HAProxy backend lines: a server is up while `GET /readyz` on its check port answers 200 (503 while it
    drains; the port is the bridge's `[metrics] listen`, given per server with `port`)."""
    return [
        "    option httpchk",
        "    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host relay-bridge",
        "    http-check expect status 200",
    ]


def sni_routing(routes: dict[str, str]) -> list[str]:
    """HAProxy frontend lines: a TLS connection whose server name is a key of `routes` goes to that server's
    own backend (`be_sni_<server>`). The frontend waits for the ClientHello (at most 2 s; it is the client's
    first message, so in practice no wait), then routes on its SNI; other names, and no SNI, go to the
    default backend."""
    if not routes:
        return []
    lines = ["    tcp-request inspect-delay 2s", "    tcp-request content accept if { req.ssl_hello_type 1 }"]
    for name, server in sorted(routes.items()):
        lines.append(f"    use_backend be_sni_{server} if {{ req.ssl_sni -i {name} }}")
    return lines


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


@dataclass
class HAProxy:
    workdir: Path
    # frontend name -> servers (name, port on 127.0.0.1), the first preferred
    frontends: dict[str, list[tuple[str, int]]]
    ports: dict[str, int] = field(default_factory=dict)
    # The bridge's CA: check the replicas' gRPC health service (NOT_SERVING while draining), not a TCP connect.
    grpc_health_ca: Path | None = None
    server_name: str = "localhost"
    # With grpc_health_ca: the client certificate (and key, one PEM file) the check presents.
    check_crt: Path | None = None
    # Server name -> its readiness port (the bridge's [metrics] listen): check `GET /readyz` there.
    readiness_ports: dict[str, int] | None = None
    # TLS server name -> server name: route on SNI to that server (sni_routing), else the frontend's backend.
    sni_routes: dict[str, str] | None = None
    # With sni_routes: the frontends that do not route on SNI (a balancer without it, for the fallback).
    plain_frontends: frozenset[str] = frozenset()
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    @property
    def stats_socket(self) -> str:
        """A name in the abstract socket namespace (a path under pytest's directories can be longer than a
        Unix socket's 108 bytes); unique per workdir."""
        return "relay-haproxy-" + hashlib.sha256(str(self.workdir.resolve()).encode()).hexdigest()[:16]

    def _show_stat(self) -> list[dict[str, str]]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            # HAProxy binds abstract names padded with NULs to the whole sun_path (108 bytes): connect to the same.
            sock.connect(("\0" + self.stats_socket).ljust(108, "\0"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return [dict(row) for row in csv.DictReader(data.decode().lstrip("# ").splitlines())]

    def stat(self, server: str) -> dict[str, str]:
        """`show stat` for `server` (its first backend): "status" (UP/DOWN), "check_status" (L7OK, L6RSP,
        L7STS, L4CON, ...), "last_chk" (the check's last word: "SSL handshake failure", ...)."""
        rows = self._show_stat()
        for row in rows:
            if row.get("svname") == server:
                return row
        raise AssertionError(f"HAProxy has no server {server}: {rows}")

    def wait_up(self, server: str, timeout: float = 15.0) -> None:
        """Wait until every backend has `server` UP (its checks pass)."""
        deadline = time.monotonic() + timeout
        while True:
            states = {r["pxname"]: r["status"] for r in self._show_stat() if r.get("svname") == server}
            if states and all(state == "UP" for state in states.values()):
                return
            assert time.monotonic() < deadline, f"HAProxy does not have {server} up: {states}"
            time.sleep(0.05)

    def wait_check(self, server: str, check_status: str, timeout: float = 10.0) -> dict[str, str]:
        """Wait until `server`'s last check ended with `check_status` (e.g. L7OK: the check passed)."""
        deadline = time.monotonic() + timeout
        stat = self.stat(server)
        while stat["check_status"] != check_status and time.monotonic() < deadline:
            time.sleep(0.05)
            stat = self.stat(server)
        assert stat["check_status"] == check_status, f"{server}: {stat['check_status']} {stat['last_chk']!r}"
        return stat

    def config(self) -> str:
        lines = [
            "global",
            "    maxconn 512",
            f"    stats socket abns@{self.stats_socket} level admin",  # check results: stat()
            "defaults",
            "    mode tcp",
            # HAProxy waits min(timeout connect, 1 s) before it retries a refused connection on
            # another server: a short connect timeout (loopback) moves routers off a dead replica sooner.
            "    timeout connect 250ms",
            "    timeout client 1h",
            "    timeout server 1h",
            "    timeout check 1s",
            "    retries 2",
            "    option redispatch 1",  # every retry may go to another server
            "    default-server inter 250 fastinter 100 downinter 250 fall 1 rise 1",
        ]
        for name, servers in self.frontends.items():
            self.ports.setdefault(name, free_port())
            lines += [f"frontend fe_{name}", f"    bind 127.0.0.1:{self.ports[name]}", f"    default_backend be_{name}"]
            lines += [] if name in self.plain_frontends else sni_routing(self.sni_routes or {})
            lines += [f"backend be_{name}"]
            if self.readiness_ports is not None:
                lines += http_readiness_check()
            elif self.grpc_health_ca is not None:
                lines += grpc_health_check(self.grpc_health_ca, self.server_name, self.check_crt)
            for i, (server, port) in enumerate(servers):
                check_port = "" if self.readiness_ports is None else f" port {self.readiness_ports[server]}"
                lines.append(f"    server {server} 127.0.0.1:{port} check{check_port}{' backup' if i else ''}")
        server_ports = {server: port for servers in self.frontends.values() for server, port in servers}
        for server in sorted(set((self.sni_routes or {}).values())):
            # A plain TCP check: a draining replica still takes the joins of the associations it admitted.
            lines += [f"backend be_sni_{server}", f"    server {server} 127.0.0.1:{server_ports[server]} check"]
        return "\n".join(lines) + "\n"

    def start(self) -> HAProxy:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (Debian: apt-get install -y haproxy)")
        self.config_path.write_text(self.config())
        check = subprocess.run([binary, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its configuration: {check.stdout}{check.stderr}")
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(self.config_path)], stdout=subprocess.DEVNULL, stderr=self.log_path.open("ab")
        )
        for name, port in self.ports.items():
            if not wait_for_port(port, process=self.process):
                self.stop()
                raise RuntimeError(f"haproxy frontend {name} did not listen on {port}: {self.log_path.read_text()}")
        return self

    def wait_state(self, server: str, *, up: bool, timeout: float = 10.0, after: int = 0) -> str:
        """Wait until HAProxy's health check has marked `server` (its name, in any backend) UP or DOWN in its
        log; returns that line (it says why: "Layer7 wrong status, code: 503", "Layer7 timeout", ...).
        `after`: ignore the log's first `after` bytes (e.g. the log's size before a SIGTERM)."""
        word = "UP" if up else "DOWN"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[after:].decode(errors="replace")
            lines = [ln for ln in text.splitlines() if f"/{server} is " in ln]
            if lines and f"is {word}" in lines[-1]:
                return lines[-1]
            time.sleep(0.02)
        raise AssertionError(f"HAProxy did not mark {server} {word}:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        LocalRelayNetwork._stop(self.process, timeout=10)
