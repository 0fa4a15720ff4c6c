"""The bridge and router container images, built and run as a site would: `make wheelhouse`-style
release, the images from deploy/container/Containerfile (deploy/container/build.sh: a debootstrap base
imported locally, buildah --isolation chroot, targets bridge and router sharing the release stage), run
with podman (runc, cgroupfs) as a non-root user, the bridge listening on port 443 by capability, state
in volumes. Two routers (host processes) relay a C-ECHO and a C-STORE through the bridge container, and
so does a router container to one of them; both images' health checks report them healthy.

Needs root, podman, buildah, runc and debootstrap (Debian packages); without them the test skips, and
fails under CI=true. The base image is built once and kept (localhost/dicom-relay-base:bookworm).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.approvals import ApprovalStore
from relay_router.seal import Identity
from tests.support.release import REPO, VERSION, run
from tests.support.wire import wait_until

# The first run on a machine debootstraps the base image (minutes): pytest-timeout counts fixture setup.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
HOST = "127.0.0.1"
# Loopback addresses and image tags of this run's own: other test sessions on the machine (several
# worktrees, one podman storage) may run this file at the same time, and port 443 is fixed.
_RUN = secrets.token_hex(4)
_NET = f"{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
BRIDGE_ADDRESS = f"127.43.{_NET}"  # a loopback address of its own, so that port 443 is free whatever else runs
CONTAINER = REPO / "deploy" / "container"
IMAGE = f"localhost/dicom-relay-bridge:smoke-test-{_RUN}"
ROUTER_IMAGE = f"localhost/dicom-relay-router:smoke-test-{_RUN}"
ROUTER_ADDRESS = f"127.44.{_NET}"  # the router container's DICOM listener, on a loopback address of its own
PODMAN_ENV = {"CONTAINERS_CONF": str(CONTAINER / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if check:
        return run(["podman", *args], timeout=timeout, env=PODMAN_ENV)
    env = {**os.environ, **PODMAN_ENV}
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def bridge_image(request: pytest.FixtureRequest) -> Iterator[str]:
    missing = [tool for tool in ("podman", "buildah", "runc", "debootstrap") if shutil.which(tool) is None]
    problem = f"missing {' '.join(missing)} (apt-get install -y podman buildah runc debootstrap)" if missing else None
    if os.geteuid() != 0:
        problem = "building and running the image needs root"
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(problem)
        pytest.skip(problem)
    house = request.getfixturevalue("release_wheelhouse")  # only once podman is known to be there
    env = {**PODMAN_ENV, "WHEELHOUSE": str(house), "IMAGE": IMAGE, "ROUTER_IMAGE": ROUTER_IMAGE}
    run([str(CONTAINER / "build.sh")], timeout=900, env=env)
    yield IMAGE
    podman("rmi", "--force", IMAGE, ROUTER_IMAGE, check=False)


def test_bridge_container_relays_echo_and_store(
    bridge_image: str,
    tmp_path: Path,
    archive_factory: Callable[..., DemoArchive],
    ct_series: list[Path],
    ct_fingerprints: dict[str, str],
) -> None:
    # The routers' side: CA and certificates from `relay-bridge init` on the host (routers verify the
    # name "localhost", which the development certificate carries).
    net = LocalRelayNetwork(tmp_path / "net", bridge_host=BRIDGE_ADDRESS).start(bridge=False)
    # The bridge's volume: configuration, certificate, key; the database and audit are created inside.
    volume = tmp_path / "bridge-volume"
    volume.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(net.workdir / name, volume / name)
    (volume / "bridge.toml").write_text(
        f'[server]\nlisten = "{BRIDGE_ADDRESS}:443"\ntls_cert = "server.pem"\ntls_key = "server.key"\n\n'
        '[storage]\ndatabase = "bridge.sqlite3"\n\n[metrics]\nlisten = ""\n'
    )
    # site-c's operator approved site-b's key (relay-router peers approve), before the first start.
    ApprovalStore(volume).approve("site-b", net.identity_fingerprint("site-b"))
    for path in [volume, *volume.iterdir()]:
        os.chown(path, 999, 999)  # the image's dicom-relay user
    volume.chmod(0o750)

    name = f"relay-bridge-{uuid.uuid4().hex[:8]}"
    podman(
        "run", "--detach", "--name", name, "--network", "host", "--health-interval", "disable",
        "--volume", f"{volume}:/var/lib/dicom-relay", bridge_image,
    )  # fmt: skip
    try:

        def bridge_admin(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            cmd = ["exec", "-i", name, "/opt/dicom-relay/bin/relay-bridge", "-c", "/var/lib/dicom-relay/bridge.toml"]
            return podman(*cmd, *args, check=False)

        def healthy() -> bool:
            return podman("healthcheck", "run", name, check=False).returncode == 0

        assert wait_until(healthy, timeout=60, what="the container's health check"), podman("logs", name).stderr
        status = json.loads(bridge_admin("status", "--json").stdout)
        assert status["running"] and status["version"] == VERSION and status["listen"] == f"{BRIDGE_ADDRESS}:443"
        # Non-root, yet listening on 443: the capability, nothing else.
        top = podman("top", name, "user", "args").stdout
        assert "dicom-relay" in top and "root" not in top, top
        assert (volume / "bridge.sqlite3").stat().st_uid == 999  # state in the volume, owned by the service user

        net.bridge_port = 443
        net.bridge_admin = bridge_admin  # type: ignore[method-assign]  # accounts are made inside the container
        archive = archive_factory("ARCHIVE_B")
        net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a", "site-c"])])
        net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")])
        net.wait_connected()

        ae = AE(ae_title="WS_A")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(HOST, net.sites["site-a"].port, ae_title="ARCHIVE_B")
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0
            for path in ct_series:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        finally:
            assoc.release()
        assert archive.fingerprints() == ct_fingerprints  # byte for byte through the containerised bridge
        # The bridge's own record (its status file is rewritten every second): one association relayed.
        wait_until(
            lambda: json.loads(bridge_admin("status", "--json").stdout)["recent"]["counts"].get("relayed") == 1,
            what="the relayed association in the bridge's status",
        )
        # A router container (site-c) relays to site-b's archive through the bridge container.
        more = write_series(generate_ct_series(2, seed=16), tmp_path / "series-c")
        _router_container_relays(net, bridge_admin, archive, more, tmp_path)
        assert archive.fingerprints() == {**ct_fingerprints, **fingerprints(more)}
    finally:
        logs = podman("logs", name, check=False)
        podman("rm", "--force", "--time", "5", name, check=False)
        net.stop()
        if logs.returncode == 0:
            (tmp_path / "bridge-container.log").write_text(logs.stdout + logs.stderr)


def _router_container_relays(
    net: LocalRelayNetwork,
    bridge_admin: Callable[..., subprocess.CompletedProcess[str]],
    archive: DemoArchive,
    files: list[Path],
    tmp_path: Path,
) -> None:
    """Run site-c from the router image (state and router.toml in a volume); C-ECHO and C-STORE through it."""
    account = json.loads(bridge_admin("router", "add", "site-c", "--json").stdout)
    volume = tmp_path / "router-volume"
    volume.mkdir()
    shutil.copy(net.workdir / "ca.pem", volume / "ca.pem")
    (volume / "router.toml").write_text(
        '[router]\nname = "site-c"\nstate_dir = "."\n\n'
        f'[bridge]\naddress = "{BRIDGE_ADDRESS}:443"\nca_file = "ca.pem"\nserver_name = "localhost"\n'
        f'password = "{account["password"]}"\nreconnect_min_s = 0.2\nreconnect_max_s = 2.0\n\n'
        f'[dicom]\nlisten = "{ROUTER_ADDRESS}:11112"\n\n[metrics]\nlisten = ""\n\n'
        '[audit]\nfile = "audit.jsonl"\n\n[[remote]]\nae_title = "ARCHIVE_B"\nsite = "site-b"\n'
    )
    # site-c's operator approved site-b's key (relay-router peers approve), before the first start.
    ApprovalStore(volume).approve("site-b", net.identity_fingerprint("site-b"))
    for path in [volume, *volume.iterdir()]:
        os.chown(path, 999, 999)
    volume.chmod(0o750)
    name = f"relay-router-{uuid.uuid4().hex[:8]}"
    podman(
        "run", "--detach", "--name", name, "--network", "host", "--health-interval", "disable",
        "--volume", f"{volume}:/var/lib/dicom-relay", ROUTER_IMAGE,
    )  # fmt: skip
    try:
        # Healthy = `relay-router check` exits 0: signed on, ARCHIVE_B online.
        healthy = lambda: podman("healthcheck", "run", name, check=False).returncode == 0  # noqa: E731
        assert wait_until(healthy, timeout=60, what="the router container's health check"), podman("logs", name).stderr
        top = podman("top", name, "user", "args").stdout
        assert "dicom-relay" in top and "root" not in top, top
        assert (volume / "identity.key").stat().st_uid == 999  # state in the volume, owned by the service user
        # site-b's operator approves the key site-c's router made, as site-c's operator read it out.
        net.approve("site-b", "site-c", Identity.load_or_create(volume / "identity.key").public.fingerprint)

        ae = AE(ae_title="WS_C")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(ROUTER_ADDRESS, 11112, ae_title="ARCHIVE_B")
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0
            for path in files:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        finally:
            assoc.release()
    finally:
        logs = podman("logs", name, check=False)
        podman("rm", "--force", "--time", "5", name, check=False)
        if logs.returncode == 0:
            (tmp_path / "router-container.log").write_text(logs.stdout + logs.stderr)
