"""HAProxy (Debian `haproxy`) as the TCP load balancer in front of bridge replicas, for tests.

One frontend per entry in `frontends`: a listening port and the backend servers in order of
preference (the first is active, the others are backups used only while it is down). Health
checks are plain TCP connects every 250 ms, so a killed replica is out of rotation within a
fraction of a second; `option redispatch 1` sends a connection that fails to another server
at its first retry.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import free_port, wait_for_port


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


@dataclass
class HAProxy:
    workdir: Path
    # frontend name -> servers (name, port on 127.0.0.1), the first preferred
    frontends: dict[str, list[tuple[str, int]]]
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    def config(self) -> str:
        lines = [
            "global",
            "    maxconn 512",
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
            lines += [f"backend be_{name}"]
            for i, (server, port) in enumerate(servers):
                lines.append(f"    server {server} 127.0.0.1:{port} check{' backup' if i else ''}")
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
            if not wait_for_port(port):
                self.stop()
                raise RuntimeError(f"haproxy frontend {name} did not listen on {port}: {self.log_path.read_text()}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
