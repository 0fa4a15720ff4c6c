"""End to end: a real `relay-bridge serve` on PostgreSQL, two real routers, a C-ECHO through it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.postgres import PostgresCluster

HOST = "127.0.0.1"


def _use_postgres(net: LocalRelayNetwork, url: str, cluster: PostgresCluster) -> None:
    config = net.workdir / "bridge.toml"
    text = config.read_text()
    assert 'database = "bridge.sqlite3"' in text
    config.write_text(
        text.replace(
            'database = "bridge.sqlite3"',
            f'database = "{url}"\npassword_file = "{cluster.password_file}"\nstate_dir = "{net.workdir}"',
        )
    )


def test_serve_on_postgresql_relays_a_c_echo_between_two_routers(
    postgres_cluster: PostgresCluster, tmp_path: Path, archive_factory: Callable[..., DemoArchive]
) -> None:
    url = postgres_cluster.create_database()
    net = LocalRelayNetwork(tmp_path / "net").start(bridge=False)
    _use_postgres(net, url, postgres_cluster)
    try:
        # A database without the schema: serve refuses in one line and names the command.
        refused = subprocess.run(
            net._bridge_cmd("serve", "--listen", f"{HOST}:0"), capture_output=True, text=True, timeout=60, env=net.env
        )
        assert refused.returncode == 1
        assert "the PostgreSQL database is empty (no schema)" in refused.stderr
        assert "run `relay-bridge db upgrade`" in refused.stderr and "Traceback" not in refused.stderr

        upgraded = net.bridge_admin("db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        net.start_bridge()
        archive = archive_factory("ARCHIVE_B")
        net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
        net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")])
        net.wait_connected()

        ae = AE(ae_title="WS_A")
        ae.add_requested_context(Verification)
        assoc = ae.associate(HOST, net.sites["site-a"].port, ae_title="ARCHIVE_B")
        assert assoc.is_established
        status = assoc.send_c_echo()
        assoc.release()
        assert status.Status == 0x0000

        # The state is PostgreSQL's: accounts, identities recorded at sign-on, published shares; no SQLite file.
        with psycopg.connect(url, password=postgres_cluster.password) as conn:
            routers = conn.execute("SELECT name, sign_key IS NOT NULL, last_seen IS NOT NULL FROM routers ORDER BY 1")
            assert routers.fetchall() == [("site-a", True, True), ("site-b", True, True)]
            shares = conn.execute("SELECT router, ae_title, peer FROM shares").fetchall()
            assert shares == [("site-b", "ARCHIVE_B", "site-a")]
        assert not list(net.workdir.glob("*.sqlite3*"))
        status_file = net.workdir / "bridge.status.json"
        assert status_file.exists()  # `relay-bridge status` reads it from state_dir
        listing = net.bridge_admin("share", "list")
        assert listing.returncode == 0 and "ARCHIVE_B" in listing.stdout and "site-a" in listing.stdout
    finally:
        net.stop()
