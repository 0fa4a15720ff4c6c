"""A hospital whose only way out is an HTTP proxy (issue 15, item 1), with squid as that proxy.

Both routers run as another user (`nobody`) whose direct TCP connections to the bridge and to
the blob store (moto's S3) are reset by an owner-match iptables rule, so everything they do
must go through squid (on 127.0.0.1, with basic authentication): sign-on, a C-STORE whose big
slices spill A -> B, and a C-MOVE whose Orthanc sub-association spills B -> A. Squid's access
log shows each tunnel to the bridge and each PUT/GET of a part. A wrong proxy password gives a
clear message in `status` and the log.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared, Site
from relay_router.egress import with_password
from tests.integration.cloudstore.conftest import S3_BUCKET, ServerProcess
from tests.integration.cloudstore.spill_support import HOST, ROUTER, bucket_keys, endpoint
from tests.integration.conftest import OrthancPool
from tests.integration.proxy_support import ROUTER_USER, RouterFirewall, Squid, as_router_user, require_root, world_dir
from tests.support import dcmtk
from tests.support.orthanc import orthanc_binary

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
USER = "hospital"


def require_peers() -> None:
    """Orthanc, DCMTK, squid and iptables are what this test proves the relay with: missing, it fails."""
    require_root()
    missing = [] if orthanc_binary() else ["Orthanc"]
    missing += dcmtk.missing_tools(("storescu", "movescu"))
    if missing:
        pytest.fail(f"the proxy test needs {', '.join(missing)}", pytrace=False)


@pytest.fixture
def password() -> str:
    return secrets.token_urlsafe(12) + "@:%/"  # characters that must be percent-encoded in a proxy URL


@pytest.fixture
def squid(password: str) -> Iterator[Squid]:
    proxy = Squid({USER: password}).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def firewall() -> Iterator[RouterFirewall]:
    rules = RouterFirewall()
    yield rules
    rules.clear()


@pytest.fixture
def proxied_network(
    moto_server: ServerProcess, moto_env: dict[str, str], firewall: RouterFirewall
) -> Iterator[Callable[[], LocalRelayNetwork]]:
    """A bridge with moto as its store; routers (added by the test) run as the firewalled user."""
    nets: list[LocalRelayNetwork] = []
    workdir = world_dir("relay-proxy-")

    def make() -> LocalRelayNetwork:
        prefix = f"proxy-{os.getpid()}-{secrets.token_hex(4)}/"
        store = {"store": f"s3://{S3_BUCKET}/{prefix}", "endpoint_url": moto_server.url, "region": "us-east-1"}
        net = LocalRelayNetwork(
            workdir,
            env=moto_env,
            bridge_spill=store,
            command_prefix={"site-a": as_router_user(), "site-b": as_router_user()},
        ).start()
        nets.append(net)
        assert net.bridge_port
        moto_port = int(moto_server.url.rsplit(":", 1)[1].rstrip("/"))
        for port in (net.bridge_port, moto_port):
            firewall.block(port)
            assert firewall.direct_connect_fails(port), f"the firewall does not block port {port}"
        return net

    yield make
    for net in nets:
        net.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def add_site(net: LocalRelayNetwork, name: str, bridge: dict[str, object], **options: object) -> Site:
    site = net.add_site(name, start=False, **options)
    site.extra_bridge.update(bridge)
    net.write_router_config(site)
    # The test network approved the sites' keys to each other as root (identity keys, approvals: 0600):
    # hand every site's state to the user the routers run as.
    for other in net.sites:
        give_to_router_user(net.state_dir(other))
    net.start_router(name)
    return site


def give_to_router_user(path: Path) -> None:
    entry = pwd.getpwnam(ROUTER_USER)
    path.mkdir(parents=True, exist_ok=True)
    for item in [path, *path.rglob("*")]:
        os.chown(item, entry.pw_uid, entry.pw_gid)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_sign_on_c_store_and_c_move_spill_both_ways_through_an_authenticating_proxy(
    proxied_network: Callable[[], LocalRelayNetwork],
    squid: Squid,
    password: str,
    orthanc_factory: OrthancPool,
    moto_server: ServerProcess,
    tmp_path: Path,
) -> None:
    require_peers()
    study_uid = generate_uid()
    big = write_series(generate_ct_series(2, rows=1024, cols=1024, seed=31, study_uid=study_uid), tmp_path / "big")
    small = write_series(generate_ct_series(2, rows=128, cols=128, seed=32, study_uid=study_uid), tmp_path / "small")
    study = small[:1] + big + small[1:]
    originals = fingerprints(study)
    net = proxied_network()
    orthanc_a = orthanc_factory("ORTHANC_A")
    orthanc_b = orthanc_factory("ORTHANC_B", always_allow=True)
    # site-a has the password in the proxy URL; site-b reads it from a file (proxy_password_file).
    secret = net.workdir / "proxy-password"
    secret.write_text(password + "\n")
    secret.chmod(0o644)
    store = endpoint(moto_server.url)
    site_b = add_site(
        net,
        "site-b",
        {"proxy": squid.url(USER), "proxy_password_file": str(secret)},
        shared=[Shared("ORTHANC_B", HOST, orthanc_b.dicom_port, ["site-a"])],
        remote=[Remote("ORTHANC_A", "site-a")],
        **ROUTER,
        **store,
    )
    site_a = add_site(
        net,
        "site-a",
        {"proxy": with_password(squid.url(USER), password)},
        shared=[Shared("ORTHANC_A", HOST, orthanc_a.dicom_port, ["site-b"])],
        remote=[Remote("ORTHANC_B", "site-b")],
        **ROUTER,
        **store,
    )
    assert site_a.port and site_b.port
    orthanc_b.set_modalities({"ORTHANC_A": ("ORTHANC_A", HOST, site_b.port)})
    net.wait_connected()

    # C-STORE A -> B: the big slices spill, their parts PUT (A) and GET (B) through squid.
    dcmtk.storescu(HOST, site_a.port, "ORTHANC_B", "WS_A", study).check()
    assert orthanc_b.fingerprints() == originals
    # C-MOVE from ORTHANC_B to ORTHANC_A: the sub-association spills B -> A.
    moved = dcmtk.movescu(HOST, site_a.port, "ORTHANC_B", "WS_A", "ORTHANC_A", {"StudyInstanceUID": study_uid})
    moved.check()
    assert moved.completed == len(study) and not moved.failed
    wait_for(lambda: len(orthanc_a.instances()) >= len(study), "ORTHANC_A did not receive the study")
    assert orthanc_a.fingerprints() == originals
    log_a, log_b = net.log("site-a"), net.log("site-b")
    assert log_a.count("spilled ") == len(big) and log_b.count("spilled ") == len(big), "each big slice spills"
    assert "inline" not in log_a + log_b, "no data set fell back to inline frames"

    # Squid saw every connection: the routers' tunnels to the bridge (logged when they close),
    # and each part's PUT and GET, all authenticated as USER.
    parts = sum(-(-len(pydicom.dcmread(p).PixelData) // ROUTER["spill_part_bytes"]) for p in big)  # type: ignore[operator]
    net.stop_router("site-a")
    net.stop_router("site-b")
    bridge = f"CONNECT {HOST}:{net.bridge_port} {USER} "
    wait_for(lambda: sum(bridge in line for line in squid.access()) >= 2, f"no tunnels in {squid.access()}")
    store_lines = [line for line in squid.access() if f" {moto_server.url.rstrip('/')}/" in line]
    puts = [line for line in store_lines if " PUT " in line and f" {USER} " in line and "/200 " in line]
    gets = [line for line in store_lines if " GET " in line and f" {USER} " in line and "/200 " in line]
    assert len(puts) >= 2 * parts and len(gets) >= 2 * parts, "\n".join(squid.access())
    assert bucket_keys(moto_server, "proxy-") == [], "blobs remain in the bucket"


def test_a_wrong_proxy_password_is_a_clear_error(
    proxied_network: Callable[[], LocalRelayNetwork], squid: Squid, password: str
) -> None:
    require_root()
    net = proxied_network()
    add_site(net, "site-a", {"proxy": with_password(squid.url(USER), password + "x")})
    expected = f"the proxy http://{USER}:***@{HOST}:{squid.port} refused the tunnel to the bridge: HTTP 407"
    wait_for(lambda: expected in str(net.status("site-a").get("last_error")), f"status: {net.status('site-a')}")
    assert "check the proxy user and password" in str(net.status("site-a")["last_error"])
    assert not net.status("site-a").get("connected")
    log = net.log("site-a")
    assert f"cannot reach the bridge: {expected}" in log
    assert password not in log, "the proxy password must not be logged"
    assert any("TCP_DENIED/407" in line and f"CONNECT {HOST}:{net.bridge_port}" in line for line in squid.access())
