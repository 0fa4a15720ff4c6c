"""Two real bridge replicas (`relay-bridge serve` processes) on one throwaway PostgreSQL cluster.

Replica A is the network's own bridge (`net.bridge`, bridge.toml); replica B runs from a copy of
its configuration with its own state directory and port. Routers are real processes: site-a and
site-b reach the replicas through a health-checked TCP balancer (so both land on A, the first
SERVING one, and move to B when A drains); site-c connects to B directly.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared, _wait_ready
from tests.integration.ha_ops.balancer import HealthCheckedBalancer
from tests.support.postgres import PostgresCluster, require_postgres, running_cluster

HOST = "127.0.0.1"
LOGIN_WINDOW_S = 4.0  # short, so that the brute-force test does not lock out the later sign-ons


@dataclass
class Replicas:
    net: LocalRelayNetwork
    postgres: PostgresCluster
    url: str
    balancer: HealthCheckedBalancer | None = None
    b: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def log(self, replica: str) -> str:
        path = self.net.workdir / ("bridge.log" if replica == "a" else "bridge-b.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def admin(self, replica: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`relay-bridge ...` with replica `replica`'s configuration (any host's CLI writes the one database)."""
        config = self.net.workdir / ("bridge.toml" if replica == "a" else "bridge-b.toml")
        command = [self.net.python, "-m", "relay_bridge.cli", "--config", str(config), *args]
        return subprocess.run(command, capture_output=True, text=True, env=self.net.env, timeout=60)

    def start_b(self) -> None:
        ready = self.net.workdir / "bridge-b.ready"
        ready.unlink(missing_ok=True)
        log = self.net.workdir / "bridge-b.log"
        command = [self.net.python, "-m", "relay_bridge.cli", "--config", str(self.net.workdir / "bridge-b.toml")]
        self.b = subprocess.Popen(
            [*command, "serve", "--listen", f"{HOST}:0", "--ready-file", str(ready)],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=self.net.env,
        )
        self.ports["b"] = _wait_ready(ready, self.b, log)

    def pg_ctl(self, action: str) -> None:
        """Stop or start the PostgreSQL server (same data directory, same port)."""
        pg = self.postgres
        if action == "stop":
            pg._run("pg_ctl", "-D", str(pg.data), "-m", "fast", "-w", "-t", "30", "stop")
            return
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={pg.port} -c unix_socket_directories={pg.root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        pg._run("pg_ctl", "-D", str(pg.data), "-l", str(pg.log), "-o", options, "-w", "-t", "60", "start")


def _configure(net: LocalRelayNetwork, url: str, postgres: PostgresCluster) -> None:
    config = net.workdir / "bridge.toml"
    text = config.read_text()
    storage = f'database = "{url}"\npassword_file = "{postgres.password_file}"\n'
    text = text.replace('database = "bridge.sqlite3"\n', storage + f'state_dir = "{net.workdir / "a"}"\n')
    text = text.replace('tls_key = "server.key"\n', 'tls_key = "server.key"\ndrain_grace_s = 30\n')
    text += f'\n[limits]\nlogin_window_s = {LOGIN_WINDOW_S}\n\n[metrics]\nlisten = ""\n'
    config.write_text(text)
    (net.workdir / "bridge-b.toml").write_text(text.replace(f'"{net.workdir / "a"}"', f'"{net.workdir / "b"}"'))
    for sub in ("a", "b"):
        (net.workdir / sub).mkdir(exist_ok=True)


@pytest.fixture(scope="session")
def ha_postgres() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the HA tests (each module makes its own database)."""
    with running_cluster(require_postgres("PostgreSQL for the HA tests")) as postgres:
        yield postgres


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    archive_factory_module: Callable[..., DemoArchive],
    ha_postgres: PostgresCluster,
) -> Iterator[Replicas]:
    postgres = ha_postgres
    net = LocalRelayNetwork(tmp_path_factory.mktemp("ha-ops") / "net").start(bridge=False)
    cluster = Replicas(net, postgres, postgres.create_database())
    try:
        _configure(net, cluster.url, postgres)
        upgraded = net.bridge_admin("db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        net.start_bridge()
        assert net.bridge_port
        cluster.ports["a"] = net.bridge_port
        cluster.start_b()
        cluster.balancer = HealthCheckedBalancer([cluster.ports["a"], cluster.ports["b"]], net.workdir / "ca.pem")
        cluster.balancer.start()
        archive = archive_factory_module("ARCHIVE_B")
        net.bridge_port = cluster.balancer.port  # site-a and site-b: through the balancer
        net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
        net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")])
        net.bridge_port = cluster.ports["b"]  # site-c: on replica B directly
        net.add_site("site-c")
        net.wait_connected()
        cluster.archive = archive  # type: ignore[attr-defined]
        yield cluster
    finally:
        net.stop()
        LocalRelayNetwork._stop(cluster.b)
        if cluster.balancer is not None:
            cluster.balancer.stop()


@pytest.fixture(scope="module")
def archive_factory_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., DemoArchive]]:
    archives: list[DemoArchive] = []

    def make(ae_title: str) -> DemoArchive:
        archive = DemoArchive(ae_title, 0, tmp_path_factory.mktemp(f"archive-{ae_title}"), None).start()
        archives.append(archive)
        return archive

    yield make
    for archive in archives:
        archive.stop()
