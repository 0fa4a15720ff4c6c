"""Squid as the hospital's HTTP proxy, and a firewall that leaves the routers no other way out.

`Squid` runs the Debian `squid` binary with its own configuration in a temporary directory,
listening on 127.0.0.1 (basic authentication from a password file when asked). `RouterFirewall`
adds iptables rules (owner match) that reset every TCP connection the routers' user opens
directly to the given ports (the bridge, the blob store): the routers run as that user
(`command_prefix`), squid as its own (`proxy`), so only connections through squid get through.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from relay_demo.network import LocalRelayNetwork
from tests.support.ports import free_port, wait_for_port

HOST = "127.0.0.1"
ROUTER_USER = "nobody"  # the routers run as this user: its direct connections are blocked
SQUID_USER = "proxy"  # Debian's squid user


def require(tool: str, package: str) -> str:
    """The tool's path; a failure (never a skip) when it is missing: these tests prove proxy support."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"the proxy tests need {tool} (Debian: apt-get install {package})", pytrace=False)
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the proxy tests need root (iptables, and routers run as another user)", pytrace=False)


def world_dir(prefix: str) -> Path:
    """A temporary directory the routers' and squid's users can write (pytest's own is root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o777)
    return path


def as_router_user() -> list[str]:
    """The command prefix that runs a router as ROUTER_USER."""
    entry = pwd.getpwnam(ROUTER_USER)
    return [require("setpriv", "util-linux"), f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]


class Squid:
    """One squid process on 127.0.0.1; `users` maps user name to password (empty: no authentication)."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.binary = require("squid", "squid")
        self.users = users or {}
        self.dir = world_dir("relay-squid-")
        self.port = free_port()
        self.access_log = self.dir / "access.log"
        self.cache_log = self.dir / "cache.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, user: str = "", password: str = "") -> str:
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        return f"http://{auth}{HOST}:{self.port}"

    def _config(self) -> str:
        lines = [
            f"http_port {HOST}:{self.port}",
            f"pid_filename {self.dir / 'squid.pid'}",
            f"access_log stdio:{self.access_log} squid",
            f"cache_log {self.cache_log}",
            f"coredump_dir {self.dir}",
            f"cache_effective_user {SQUID_USER}",
            "cache deny all",
            "shutdown_lifetime 0 seconds",
            "acl loopback src 127.0.0.0/8",
            "acl CONNECT method CONNECT",
        ]
        if self.users:
            passwd = self.dir / "passwd"
            entries = []
            for user, password in self.users.items():
                hashed = subprocess.run(
                    # -stdin: a generated password may begin with "-" and would be read as an option.
                    ["openssl", "passwd", "-apr1", "-stdin"],
                    input=password + "\n",
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                entries.append(f"{user}:{hashed}\n")
            passwd.write_text("".join(entries))
            passwd.chmod(0o644)
            lines += [
                f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {passwd}",
                "auth_param basic realm relay-test",
                "acl authenticated proxy_auth REQUIRED",
                "http_access allow loopback authenticated",
            ]
        else:
            lines.append("http_access allow loopback")
        lines.append("http_access deny all")
        return "\n".join(line for line in lines if line) + "\n"

    def start(self) -> Squid:
        conf = self.dir / "squid.conf"
        conf.write_text(self._config())
        for log in (self.access_log, self.cache_log):
            log.touch()
            log.chmod(0o666)
        self.process = subprocess.Popen(
            [self.binary, "-N", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=(self.dir / "stderr").open("wb")
        )
        if wait_for_port(self.port, timeout=30, process=self.process):
            return self
        if self.process.poll() is not None:
            raise RuntimeError(f"squid exited: {self.log_text()}")
        raise TimeoutError(f"squid did not listen on {self.port}: {self.log_text()}")

    def log_text(self) -> str:
        parts = [(self.dir / "stderr"), self.cache_log]
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in parts if p.exists())

    def access(self) -> list[str]:
        """The access log's lines (squid writes them as each request ends)."""
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def stop(self) -> None:
        LocalRelayNetwork._stop(self.process, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class RouterFirewall:
    """iptables rules resetting ROUTER_USER's direct TCP connections to some loopback ports."""

    def __init__(self) -> None:
        self.iptables = require("iptables", "iptables")
        self.uid = pwd.getpwnam(ROUTER_USER).pw_uid
        self.rules: list[list[str]] = []

    def block(self, port: int) -> None:
        rule = [
            "OUTPUT",
            "-o",
            "lo",
            "-p",
            "tcp",
            "--dport",
            str(port),
            "-m",
            "owner",
            "--uid-owner",
            str(self.uid),
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]
        subprocess.run([self.iptables, "-w", "-I", *rule], check=True, capture_output=True)
        self.rules.append(rule)

    def direct_connect_fails(self, port: int) -> bool:
        """Whether ROUTER_USER really cannot connect to HOST:port directly (proves the rule works)."""
        probe = (
            f"import socket\ntry:\n socket.create_connection(({HOST!r}, {port}), timeout=3)\n"
            "except OSError:\n raise SystemExit(7)\n"
        )
        result = subprocess.run([*as_router_user(), sys.executable, "-c", probe], capture_output=True, timeout=30)
        return result.returncode == 7

    def clear(self) -> None:
        for rule in reversed(self.rules):
            subprocess.run([self.iptables, "-w", "-D", *rule], capture_output=True)
        self.rules.clear()


class InspectingProxy:
    """A TLS-inspecting proxy: it accepts CONNECT, then answers the client's TLS with its own certificate.

    The certificate is made up here (its own CA, as a hospital's inspection appliance has), so a
    client that pins the real server's CA must refuse it.
    """

    def __init__(self) -> None:
        import datetime
        import ssl

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.dir = Path(tempfile.mkdtemp(prefix="relay-inspect-"))
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Inspection CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256())
        )
        (self.dir / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.dir / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.dir / "cert.pem", self.dir / "key.pem")
        self.context.set_alpn_protocols(["h2"])
        self.connects: list[str] = []
        self.listener = socket.create_server((HOST, 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://{HOST}:{self.port}"
        import threading

        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._intercept, args=(conn,), daemon=True).start()

    def _intercept(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = conn.recv(1024)
                if not chunk:
                    return
                head += chunk
            self.connects.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass  # the client refused our certificate: what the test wants

    def stop(self) -> None:
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)
