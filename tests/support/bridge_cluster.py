"""Three `relay-bridge serve` replicas with `[cluster]` on one PostgreSQL database, for tests and benchmarks.

`BridgeCluster` writes one bridge configuration per replica (its own router-facing port, its own
`[cluster]` port and id, the shared database and cluster certificate) and starts them as real
processes; HAProxy (tests.support.haproxy) goes in front. `presence()` reads which replica holds
which site from the database, as the replicas themselves do.
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psycopg

from relay_demo.network import LocalRelayNetwork, _wait_ready
from tests.support.haproxy import HAProxy
from tests.support.ports import free_port
from tests.support.postgres import PostgresCluster

HOST = "127.0.0.1"
REPLICAS = ("r1", "r2", "r3")


@dataclass
class Replica:
    id: str
    port: int  # router-facing (TLS), behind HAProxy
    cluster_port: int  # internal Forward service (mutual TLS)
    config: Path
    metrics_port: int = 0  # [metrics] listen: Prometheus, and /readyz for HAProxy's HTTP check
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.config.with_suffix(".log")


@dataclass
class BridgeCluster:
    net: LocalRelayNetwork
    pg: PostgresCluster
    url: str
    replicas: dict[str, Replica] = field(default_factory=dict)
    haproxy: HAProxy | None = None

    def write_configs(self, *, renew_s: float | None = None, drain_grace_s: float = 2.0) -> None:
        work = self.net.workdir
        # The admin commands (router add, db upgrade) use bridge.toml: point it at PostgreSQL too.
        storage = (
            f'[storage]\ndatabase = "{self.url}"\npassword_file = "{self.pg.password_file}"\nstate_dir = "{work}"\n'
        )
        base = (work / "bridge.toml").read_text()
        (work / "bridge.toml").write_text(base.replace('[storage]\ndatabase = "bridge.sqlite3"\n', storage))
        for rid in REPLICAS:
            replica = Replica(rid, free_port(), free_port(), work / f"bridge-{rid}.toml", free_port())
            (work / rid).mkdir(exist_ok=True)
            replica.config.write_text(
                "[server]\n"
                f'listen = "{HOST}:{replica.port}"\ntls_cert = "server.pem"\ntls_key = "server.key"\n'
                f"drain_grace_s = {drain_grace_s}\n\n"
                f'[storage]\ndatabase = "{self.url}"\npassword_file = "{self.pg.password_file}"\n'
                f'state_dir = "{work / rid}"\n\n'
                f'[audit]\nfile = "{rid}/audit.jsonl"\n\n'
                f'[metrics]\nlisten = "{HOST}:{replica.metrics_port}"\n\n'
                "[cluster]\n"
                f'listen = "{HOST}:{replica.cluster_port}"\nadvertise = "{HOST}:{replica.cluster_port}"\n'
                f'replica_id = "{rid}"\n'
                'tls_cert = "cluster.pem"\ntls_key = "cluster.key"\nca = "cluster-ca.pem"\n'
                + ("" if renew_s is None else f"renew_s = {renew_s}\n")
            )
            self.replicas[rid] = replica

    def start_replica(self, rid: str) -> None:
        replica = self.replicas[rid]
        ready = replica.config.with_suffix(".ready")
        ready.unlink(missing_ok=True)
        replica.process = subprocess.Popen(
            [self.net.python, "-m", "relay_bridge.cli", "--config", str(replica.config), "serve"]
            + ["--ready-file", str(ready)],
            stdout=subprocess.DEVNULL,
            stderr=replica.log.open("ab"),
            env=self.net.env,
        )
        _wait_ready(ready, replica.process, replica.log)

    def kill(self, rid: str) -> None:
        process = self.replicas[rid].process
        assert process is not None and process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def log(self, rid: str) -> str:
        return self.replicas[rid].log.read_text(errors="replace")

    def presence(self) -> dict[str, str]:
        """Site -> replica id, live rows only (what the replicas themselves go by)."""
        with psycopg.connect(self.url, password=self.pg.password) as conn:
            now = time.time()
            rows = conn.execute(
                "SELECT p.site, p.replica FROM presence p JOIN replicas r ON r.id = p.replica"
                " WHERE p.lease_until >= %s AND r.lease_until >= %s",
                (now, now),
            ).fetchall()
        return dict(rows)

    def live_replicas(self) -> list[str]:
        with psycopg.connect(self.url, password=self.pg.password) as conn:
            rows = conn.execute("SELECT id FROM replicas WHERE lease_until >= %s ORDER BY id", (time.time(),))
            return [r for (r,) in rows.fetchall()]

    def wait_presence(self, expected: dict[str, str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.presence() == expected:
                return
            time.sleep(0.1)
        raise AssertionError(f"presence is {self.presence()}, expected {expected}")

    def stop(self) -> None:
        for name in self.net.sites:
            self.net.stop_router(name)
        for replica in self.replicas.values():
            LocalRelayNetwork._stop(replica.process)
        if self.haproxy is not None:
            self.haproxy.stop()


def replica_server_names() -> dict[str, str]:
    """The TLS server name of each replica (what a router joins it at directly) -> the replica."""
    return {f"{rid}.localhost": rid for rid in REPLICAS}


def start_bridge_cluster(
    work: Path,
    pg: PostgresCluster,
    frontends: dict[str, list[str]],
    *,
    renew_s: float | None = None,
    health: Literal["tcp", "grpc", "http"] = "tcp",
    drain_grace_s: float = 2.0,
    sni: bool = False,
    plain_frontends: frozenset[str] = frozenset(),
) -> BridgeCluster:
    """Cluster certificate, configurations, schema, three replicas and HAProxy with `frontends`
    (name -> replica ids, the first preferred); stop it with `stop()` (also when this raises).
    `renew_s`: the replicas' lease renewal interval (None: the default). `health`: HAProxy's check, a TCP
    connect, the replicas' gRPC health service, or `GET /readyz` on their metrics port (with both of the
    latter a draining replica leaves rotation at once; tests.support.haproxy). `drain_grace_s`: how long a
    replica's drain lets running associations finish before it cuts them (keep it above the longest one).
    `sni`: the direct join (docs/high-availability.md): the server certificate also names `<replica>.localhost`
    for each replica (`relay-bridge init --hostname`), and HAProxy routes those TLS server names to that replica,
    except on `plain_frontends` (a balancer without SNI routing)."""
    net = LocalRelayNetwork(work)
    if sni:  # before start(), which then keeps this bridge.toml and its certificates
        names = [f"--hostname={name}" for name in ("localhost", *replica_server_names().keys())]
        subprocess.run(
            [net.python, "-m", "relay_bridge.cli", "init", "--dir", str(work), "--listen", "127.0.0.1:0", *names]
            + ["--ip", "127.0.0.1"],
            check=True,
            capture_output=True,
            env=net.env,
        )
    net.start(bridge=False)
    made = net.bridge_admin("cluster-cert", "--dir", str(work))
    if made.returncode != 0:
        raise RuntimeError(made.stderr)
    cluster = BridgeCluster(net, pg, pg.create_database())
    try:
        cluster.write_configs(renew_s=renew_s, drain_grace_s=drain_grace_s)
        upgraded = net.bridge_admin("db", "upgrade")
        if upgraded.returncode != 0:
            raise RuntimeError(upgraded.stderr)
        for rid in REPLICAS:
            cluster.start_replica(rid)
        ports = {rid: r.port for rid, r in cluster.replicas.items()}
        cluster.haproxy = HAProxy(
            work,
            {name: [(r, ports[r]) for r in order] for name, order in frontends.items()},
            grpc_health_ca=work / "ca.pem" if health == "grpc" else None,
            readiness_ports={rid: r.metrics_port for rid, r in cluster.replicas.items()} if health == "http" else None,
            sni_routes=replica_server_names() if sni else None,
            plain_frontends=plain_frontends,
        )
        cluster.haproxy.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
