"""A site the bridge invents cannot reach a device shared with "*" (issue 17, items 10 and 11).

Real bridge and router processes over gRPC and TLS, a pynetdicom archive, no approvals made in
advance (`approve_peers=False`: as on a real network until the operators act). Site B shares its
archive with "*"; site A is its real partner; site C exists and never calls. The bridge invents a
site the way its operator can without touching the code: it creates the account `site-evil` and
runs a router under it, so the bridge offers that router's key for the invented name exactly as a
modified bridge would (its operator also approves B on that router: it does what it likes there).

What the test shows:
- B's directory carries no identities (it calls nobody); keys reach B with the associations only.
- A calling B before its operator approved B's key is refused at A (`[[remote]]` entries name
  their site, but its key still needs approval): `peer_unapproved`, outbound.
- site-evil's call is refused at B, with the log line and the audit event `peer_unapproved`, and
  the fingerprint the bridge offered waits in B's pending list; it never reaches the archive.
- A's operator reads A's fingerprint (`relay-router fingerprint`) to B's operator. Approving A
  with another fingerprint (here: the one the bridge offered for site-evil) is refused and changes
  nothing; with the right one, A's C-ECHO succeeds, and site-evil stays refused. C never appears.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.approvals import ApprovalStore
from tests.integration.test_reliability import echo, quiet_site
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


def peers_cli(net: LocalRelayNetwork, site: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`relay-router ...` as the site's operator runs it."""
    command = [net.python, "-m", "relay_router.cli", "--config", str(net.router_config_path(site)), *args]
    return subprocess.run(command, capture_output=True, text=True, env=net.env, timeout=60)


def audit_events(net: LocalRelayNetwork, site: str, event: str) -> list[dict[str, object]]:
    path = net.workdir / f"audit-{site}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e.get("event") == event]


def test_an_invented_site_is_refused_and_the_approved_partner_works(
    tmp_path_factory: pytest.TempPathFactory, archive_factory: Callable[..., DemoArchive]
) -> None:
    archive = archive_factory("ARCHIVE_B")
    net = LocalRelayNetwork(tmp_path_factory.mktemp("star"), approve_peers=False).start()
    try:
        quiet_site(net, "site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["*"])])
        for name in ("site-a", "site-c", "site-evil"):
            quiet_site(net, name, remote=[Remote("ARCHIVE_B", "site-b")])
        net.wait_connected()
        at_b, at_a = ApprovalStore(net.state_dir("site-b")), ApprovalStore(net.state_dir("site-a"))
        fp_a, fp_b, fp_evil = (net.identity_fingerprint(s) for s in ("site-a", "site-b", "site-evil"))
        assert at_b.known() == {} and at_b.pending() == {}  # no key of any site came with B's directory
        port_a, port_evil = net.sites["site-a"].port, net.sites["site-evil"].port
        assert port_a and port_evil

        # A has not approved B's key yet: refused at A, before anything crosses the bridge.
        assert not echo(port_a, "ARCHIVE_B")
        assert at_a.pending()["site-b"].fingerprint == fp_b
        assert "refusing WS_A -> site-b/ARCHIVE_B: site site-b is not approved" in net.log("site-a")
        (event,) = audit_events(net, "site-a", "peer_unapproved")
        assert event["outcome"] == "alert" and event["direction"] == "outbound" and event["fingerprint"] == fp_b
        assert peers_cli(net, "site-a", "peers", "approve", "site-b", "--fingerprint", fp_b).returncode == 0

        # The invented site: refused at B, logged, audited, pending with the key the bridge offered.
        ApprovalStore(net.state_dir("site-evil")).approve("site-b", fp_b)
        assert not echo(port_evil, "ARCHIVE_B")
        refused = "refused an association from site-evil: site site-evil is not approved: the bridge offers identity"
        assert f"{refused} {fp_evil}" in net.log("site-b")
        (event,) = audit_events(net, "site-b", "peer_unapproved")
        assert event["site"] == "site-evil" and event["direction"] == "inbound" and event["fingerprint"] == fp_evil
        assert event["outcome"] == "alert" and event["called_ae"] == "ARCHIVE_B"
        assert at_b.pending()["site-evil"].fingerprint == fp_evil and at_b.known() == {}

        # The real partner waits for approval too, until B's operator approves the fingerprint A's read out.
        assert not echo(port_a, "ARCHIVE_B")
        assert at_b.pending()["site-a"].fingerprint == fp_a
        wrong = peers_cli(net, "site-b", "peers", "approve", "site-a", "--fingerprint", fp_evil)
        assert wrong.returncode == 1 and f"NOT approved: the bridge offers {fp_a} for site-a" in wrong.stderr
        assert not echo(port_a, "ARCHIVE_B")
        right = peers_cli(net, "site-b", "peers", "approve", "site-a", "--fingerprint", fp_a)
        assert right.returncode == 0, right.stderr
        assert right.stdout.strip() == f"approved site-a with {fp_a}"
        assert wait_until(lambda: echo(port_a, "ARCHIVE_B"), timeout=20, step=0.3, what="A's C-ECHO to B")
        assert not echo(port_evil, "ARCHIVE_B")  # still refused
        assert at_b.known() == {"site-a": fp_a}
        assert set(at_b.pending()) == {"site-evil"}  # C, which never called, is nowhere
        listing = peers_cli(net, "site-b", "peers", "list").stdout
        assert f"site-a                   approved  {fp_a}" in listing
        assert f"site-evil                pending   {fp_evil}" in listing
    finally:
        net.stop()
