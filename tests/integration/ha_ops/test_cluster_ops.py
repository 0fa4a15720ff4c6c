"""Cluster-wide state, limits and drain with two real bridge replicas on one PostgreSQL cluster.

- Password guesses spread over A and B are throttled by their sum, not per replica (first: the
  routers' own sign-ons so far all succeeded, so the address has no failures yet).
- A router disabled through replica A's CLI while it is connected to replica B is cut within 2 s
  (LISTEN/NOTIFY wakes B), and signs on again once enabled.
- An enrollment token redeemed through A is refused through B.
- PostgreSQL stopped for 20 s: a running association keeps working, a new sign-on is refused at
  once with a transient error naming the database, and succeeds once it is back; the directory
  is intact afterwards.
- SIGTERM on A with a C-STORE running: the association completes byte-identical, the routers are
  told to move and sign on again through the balancer on B, where a new association works.
Tests run in this order (one module-scoped cluster).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import psycopg
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from protos.relay.v1 import relay_pb2 as pb
from protos.relay.v1 import relay_pb2_grpc as pb_grpc
from relay_bridge.control import DATABASE_AWAY
from relay_demo.datasets import fingerprints
from tests.integration.ha_ops.conftest import LOGIN_WINDOW_S, Replicas
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
OUTAGE_S = 20.0


def _stub(cluster: Replicas, replica: str) -> tuple[grpc.Channel, pb_grpc.RelayStub]:
    credentials = grpc.ssl_channel_credentials((cluster.net.workdir / "ca.pem").read_bytes())
    channel = grpc.secure_channel(
        f"{HOST}:{cluster.ports[replica]}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    return channel, pb_grpc.RelayStub(channel)


def _identity() -> pb.Identity:
    return pb.Identity(sign_key=os.urandom(32), kem_key=os.urandom(1216), kem="MLKEM768-X25519")


def _sign_on(cluster: Replicas, replica: str, account: str, password: str) -> pb.SignOnResult:
    channel, stub = _stub(cluster, replica)
    with channel:
        call = stub.Control(iter([pb.RouterMessage(sign_on=pb.SignOn(account=account, password=password))]))
        first = next(call)
        call.cancel()
    return first.sign_on_result


def _account(cluster: Replicas, name: str) -> dict[str, str]:
    added = cluster.admin("a", "router", "add", name, "--json")
    assert added.returncode == 0, added.stderr
    return json.loads(added.stdout)  # type: ignore[no-any-return]


def _association(port: int) -> Association:
    ae = AE(ae_title="WS")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE_B")
    assert assoc.is_established
    return assoc


def _signed_on_at(cluster: Replicas, replica: str, site: str) -> bool:
    return f"router {site} signed on from" in cluster.log(replica)


def test_password_guesses_spread_over_two_replicas_are_throttled_by_their_sum(replicas: Replicas) -> None:
    password = _account(replicas, "guessed")["password"]
    started = time.monotonic()
    for replica in ("a", "b", "a", "b", "a"):  # 5 = login_failures: 3 on A and 2 on B
        result = _sign_on(replicas, replica, "guessed", "not-the-password!")
        assert not result.ok and "wrong account name or password" in result.error
    refused = _sign_on(replicas, "b", "guessed", password)  # B saw only 2 failures itself
    assert time.monotonic() - started < LOGIN_WINDOW_S, "the guesses must fall in one window for this test"
    assert not refused.ok and "too many failed sign-on attempts" in refused.error
    assert "too many failed attempts across the replicas" in replicas.log("b")
    time.sleep(max(0.0, started + LOGIN_WINDOW_S + 0.5 - time.monotonic()))  # the window passes: usable again
    after = _sign_on(replicas, "a", "guessed", password)
    assert "too many" not in after.error and "identity" in after.error  # past the password (no keys sent)


def test_a_router_disabled_through_one_replica_is_cut_on_the_other_within_2_s(replicas: Replicas) -> None:
    cluster = replicas
    assert _signed_on_at(cluster, "b", "site-c") and not _signed_on_at(cluster, "a", "site-c")
    wait_until(lambda: "listening for directory changes" in cluster.log("b"), what="B's LISTEN connection")
    disabled = cluster.admin("a", "router", "disable", "site-c")
    assert disabled.returncode == 0, disabled.stderr
    written = time.monotonic()
    wait_until(lambda: "router site-c was disabled or removed" in cluster.log("b"), timeout=5, what="B cuts site-c")
    assert time.monotonic() - written < 2.0, "the replica holding the router cuts it within 2 s"
    wait_until(lambda: "account disabled" in cluster.net.log("site-c"), what="site-c told it is disabled")
    assert "site-c" not in cluster.log("a"), "replica A never held site-c"

    enabled = cluster.admin("b", "router", "enable", "site-c")
    assert enabled.returncode == 0, enabled.stderr
    wait_until(lambda: cluster.net.status("site-c").get("connected") is True, what="site-c signed on again")


def test_an_enrollment_token_works_once_in_the_whole_cluster(replicas: Replicas) -> None:
    account = _account(replicas, "enrollee")
    request = pb.EnrollRequest(
        account="enrollee",
        password=account["password"],
        enrollment_token=account["enrollment_token"],
        identity=_identity(),
    )
    channel, stub = _stub(replicas, "a")
    with channel:
        stub.Enroll(request, timeout=10)
    channel, stub = _stub(replicas, "b")
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.Enroll(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "enrollment token already used"


def test_associations_a_router_holds_on_another_replica_count_against_its_limit(replicas: Replicas) -> None:
    """Leases written by another replica (here by hand, as a replica holding 500 of site-a's associations
    would) make replica A refuse site-a's next Open; once they are gone, the Open is admitted."""
    cluster = replicas
    port = cluster.net.sites["site-a"].port
    assert port
    with psycopg.connect(cluster.url, password=cluster.postgres.password, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO association_leases(association_id, router, direction, replica, lease_until)"
            " SELECT md5(g::text), 'site-a', 'out', 'replica-elsewhere', extract(epoch from now()) + 600"
            " FROM generate_series(1, 500) g"  # max_associations_per_router's default
        )
        try:
            ae = AE(ae_title="WS")
            ae.add_requested_context(Verification)
            refused = ae.associate(HOST, port, ae_title="ARCHIVE_B")
            assert refused.is_rejected, "the cluster-wide count refuses the 501st association"
            assert "max_associations_per_router, counted over all replicas" in cluster.log("a")
        finally:
            conn.execute("DELETE FROM association_leases WHERE replica = 'replica-elsewhere'")
    admitted = _association(port)
    assert admitted.send_c_echo().Status == 0
    admitted.release()


def test_postgresql_stopped_for_20_s_running_associations_continue_sign_ons_fail_clearly(
    replicas: Replicas,
) -> None:
    cluster = replicas
    net = cluster.net
    assert net.sites["site-a"].port
    net.add_site("site-late", start=False)  # on replica B; its router first starts while the database is away
    assoc = _association(net.sites["site-a"].port)
    # `relay-bridge status` on any host lists the replicas from the database, with their load.
    status = cluster.admin("b", "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    replica_a = json.loads((net.workdir / "a" / "bridge.status.json").read_text())["replica"]
    assert report["replica"] != replica_a and report["draining"] is False  # B's own status file
    assert {"id": replica_a, "leased_associations": 1} in report["replicas"]
    try:
        cluster.pg_ctl("stop")
        stopped = time.monotonic()
        net.start_router("site-late")
        wait_until(
            lambda: DATABASE_AWAY in str(net.status("site-late").get("last_error")), timeout=15, what="a clear refusal"
        )
        assert time.monotonic() - stopped < 10, "a sign-on is refused within seconds, not after a long pool wait"
        assert "Unexpected error" not in net.log("site-late")
        while time.monotonic() - stopped < OUTAGE_S:
            assert assoc.send_c_echo().Status == 0, "the running association carries on"
            assert net.status("site-a")["connected"] and net.status("site-b")["connected"]
            time.sleep(2)
        cluster.pg_ctl("start")
        wait_until(lambda: net.status("site-late").get("connected") is True, timeout=20, what="sign-on once back")
    finally:
        assoc.release()
    fresh = _association(net.sites["site-a"].port)  # a new association after the outage
    assert fresh.send_c_echo().Status == 0
    fresh.release()
    listing = cluster.admin("a", "router", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    names = {r["name"] for r in json.loads(listing.stdout)}
    assert {"site-a", "site-b", "site-c", "site-late"} <= names  # the fixture's routers and this test's own
    shares = cluster.admin("b", "share", "list", "--json")
    assert any(s["ae_title"] == "ARCHIVE_B" and s["share_with"] == ["site-a"] for s in json.loads(shares.stdout))


def test_sigterm_drain_lets_a_running_c_store_finish_and_moves_the_routers(
    replicas: Replicas, ct_series: list[Path]
) -> None:
    cluster = replicas
    net = cluster.net
    assert net.bridge is not None and cluster.balancer is not None
    assert net.sites["site-a"].port
    assert cluster.balancer.chosen and set(cluster.balancer.chosen) == {cluster.ports["a"]}
    assoc = _association(net.sites["site-a"].port)
    assert assoc.send_c_store(pydicom.dcmread(ct_series[0])).Status == 0
    net.bridge.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in cluster.log("a"), what="A to drain")
    for path in ct_series[1:]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    assoc.release()
    assert net.bridge.wait(15) == 0
    wait_until(
        lambda: _signed_on_at(cluster, "b", "site-a") and _signed_on_at(cluster, "b", "site-b"),
        timeout=15,
        what="site-a and site-b to sign on at B",
    )
    assert "asks this router to move (draining)" in net.log("site-a") + net.log("site-b")
    assert cluster.ports["b"] in cluster.balancer.chosen
    net.wait_connected()
    archive = cluster.archive  # type: ignore[attr-defined]
    assert archive.fingerprints() == fingerprints(ct_series)
    moved = _association(net.sites["site-a"].port)
    assert moved.send_c_echo().Status == 0
    moved.release()
